"""Study files of `lab claims` (experiments/*.toml) and the rule that turns their checks into verdicts.

A study file is data: the keys of a config file (see `lab config`), a `[sweep]` table of dotted keys ->
lists (or several `[[sweep]]` tables, whose grids are joined; a key "a,b" = [[a1, b1], [a2, b2]] varies
two keys together), and a `[claim]` table:

    id, title, guide, measured    table order, name, the guide's statement, what is measured (words)
    measure                       a measurement of lab.claim_measures.MEASURES
    [claim.params]                its parameters (each measurement lists its defaults)
    [[claim.check]]               metric, min and/or max, stat: seeds (each seed: min <= value <= max), mean
                                  or geomean (mean over seeds with a 95% interval, see judge)
    agree                         share of seeds that must agree (default 0.75, in (0.5, 1])
    note                          context printed with the claim in the report (optional)
    [claim.quick]                 --quick: swept keys get these lists, other keys override the base config

Verdict of a check over the seeds (stat "seeds"): pass when at least `agree` of them pass, fail when at
least `agree` fail, otherwise inconclusive (seeds disagree, or runs failed so values are NaN); stat "mean"
or "geomean": pass when the interval lies within the bounds, fail when wholly outside, otherwise
inconclusive. Verdict of the claim:
"does not hold" if a check fails, "holds" if all pass, otherwise "inconclusive". Nothing else decides it.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lab import claim_comparison, claim_training, config  # noqa: F401 — they register their measurements
from lab.claim_measures import MEASURES
from lab.config import Config, ConfigError, suggest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
VERDICTS = ("holds", "does not hold", "inconclusive")
STATS = ("seeds", "mean", "geomean")
CLAIM_KEYS = ("id", "title", "guide", "measured", "measure", "params", "check", "agree", "note", "quick")

@dataclass(frozen=True)
class Check:
    """A threshold on one metric. stat 'seeds': judged seed by seed (see judge); 'mean' or 'geomean': the
    mean (of logs, for ratios) over seeds with an approximate 95% interval, mean ± 2 standard errors."""

    metric: str
    min: float | None = None
    max: float | None = None
    stat: str = "seeds"

    def passes(self, value: float) -> bool | None:
        """True/False per seed; None when the value is NaN (the run could not be measured)."""
        if value is None or math.isnan(value):
            return None
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    def condition(self) -> str:
        """'>= 3', '<= 0.01', or a range: '16 ± 1e-06' when centred on a round number, else 'in [a, b]'."""
        if self.min is None:
            return f"≤ {self.max:.6g}"
        if self.max is None:
            return f"≥ {self.min:.6g}"
        mid, half = (self.min + self.max) / 2, (self.max - self.min) / 2
        if half and half < 1e-3 * abs(mid):
            return f"{mid:.6g} ± {half:.1g}"
        return f"in [{self.min:.6g}, {self.max:.6g}]"


@dataclass
class Study:
    path: Path
    id: str
    title: str
    guide: str
    measured: str
    measure: str
    params: dict
    checks: list[Check]
    agree: float = 0.75
    note: str = ""
    grid: list[tuple[Config, dict]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.stem


# ---------------------------------------------------------------------------------------------------
# Study files


def load_study(path: Path, quick: bool = False) -> Study:
    """Parse and validate one study file; every problem is a one-line ConfigError naming the file."""
    path = Path(path)
    table = config.read_toml(path)
    claim = table.pop("claim", None)
    where = path.name
    if not isinstance(claim, dict):
        raise ConfigError(f"{where}: no [claim] table (id, title, guide, measured, measure, [[claim.check]])")
    for key in claim:
        if key not in CLAIM_KEYS:
            raise ConfigError(f"{where}: unknown [claim] key '{key}'{suggest(key, CLAIM_KEYS)}")
    for key in ("id", "title", "guide", "measured", "measure"):
        if not isinstance(claim.get(key), str) or not claim[key].strip():
            raise ConfigError(f"{where}: [claim] needs {key} = \"...\" (a non-empty string)")
    if claim["measure"] not in MEASURES:
        raise ConfigError(f"{where}: unknown measure '{claim['measure']}' (available: {', '.join(sorted(MEASURES))})"
                          f"{suggest(claim['measure'], MEASURES)}")
    spec = MEASURES[claim["measure"]]
    params = claim.get("params", {})
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: [claim.params] must be a table")
    for key, value in params.items():
        if key not in spec.defaults:
            raise ConfigError(f"{where}: measure '{claim['measure']}' takes no parameter '{key}' "
                              f"(it takes: {', '.join(spec.defaults) or 'none'}){suggest(key, spec.defaults)}")
        if not _same_kind(value, spec.defaults[key]):  # (a string "4" failed only after every run had trained)
            raise ConfigError(f"{where}: [claim.params] {key} must be {_kind_of(spec.defaults[key])} like its "
                              f"default {spec.defaults[key]!r}; got {value!r}")
    checks = [_check(where, c, spec) for c in _as_list(claim.get("check"), where, "[[claim.check]]")]
    if not checks:
        raise ConfigError(f"{where}: no [[claim.check]]: a verdict needs at least one metric with min or max")
    agree = claim.get("agree", 0.75)
    if isinstance(agree, bool) or not isinstance(agree, (int, float)) or not 0.5 < agree <= 1:
        raise ConfigError(f"{where}: [claim] agree must be a number in (0.5, 1]; got {agree!r}")
    st = Study(path, claim["id"].strip(), claim["title"].strip(), claim["guide"].strip(), claim["measured"].strip(),
               claim["measure"], {**spec.defaults, **params}, checks, float(agree), str(claim.get("note", "")))
    sweeps = [_flat_sweep(where, s) for s in _as_list(table.pop("sweep", None), where, "[sweep]")]
    if not spec.needs_runs:
        if table or sweeps:
            raise ConfigError(f"{where}: measure '{st.measure}' trains nothing; remove the config keys and [sweep]")
        return st
    overrides = claim.get("quick", {}) if quick else {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where}: [claim.quick] must be a table")
    base = {"name": path.stem, **config.flatten(table)}
    for key, value in config.flatten(overrides).items():
        blocks = [s for s in sweeps if key in s]
        for s in blocks:  # checked as the block's own values are (zipped keys: lists of their width)
            s[key] = _flat_sweep(f"{where} [claim.quick]", {key: value if isinstance(value, list) else [value]})[key]
        if not blocks:
            base[key] = value
    try:
        st.grid = expand(config.from_flat(base), sweeps)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    if not st.grid:
        raise ConfigError(f"{where}: the sweep has no runs")
    return st


def expand(base: Config, sweeps: list[dict[str, list]]) -> list[tuple[Config, dict]]:
    """The union of the grids of every sweep block (as lab.sweeps.expand, plus keys "a,b" varied together);
    a config that two blocks both produce is trained once."""
    out, seen = [], set()
    for block in sweeps or [{}]:
        dims = [(k.split(","), v if "," in k else [[x] for x in v]) for k, v in block.items()]
        for combo in itertools.product(*(values for _, values in dims)):
            swept = {k.strip(): v for (keys, _), vals in zip(dims, combo) for k, v in zip(keys, vals)}
            cfg = config.from_flat({**config.to_flat(base), **swept})
            key = json.dumps(config.to_flat(cfg), sort_keys=True, default=str)
            if key not in seen:
                seen.add(key)
                out.append((cfg, swept))
    return out


def _as_list(value, where: str, what: str) -> list:
    if value is None:
        return []
    value = value if isinstance(value, list) else [value]
    if not all(isinstance(v, dict) for v in value):
        raise ConfigError(f"{where}: {what} must be a table or an array of tables")
    return value


def _same_kind(value, default) -> bool:
    """Whether a measure parameter's value is of its default's kind: a number, a flag, text or a list."""
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


def _kind_of(default) -> str:
    if isinstance(default, bool):
        return "true or false"
    return {int: "a number", float: "a number", str: "a string", list: "a list"}.get(type(default), "a value")


def _flat_sweep(where: str, table: dict) -> dict[str, list]:
    out, varied = {}, set()
    for key, values in config.flatten(table).items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: [sweep] {key} must be a non-empty list of values")
        for part in (k.strip() for k in key.split(",")):  # one key varied twice: the last would silently win
            if part in varied:
                raise ConfigError(f"{where}: [sweep] {part} is varied twice in one block")
            varied.add(part)
        width = len(key.split(","))
        if width > 1 and not all(isinstance(v, list) and len(v) == width for v in values):
            raise ConfigError(f"{where}: [sweep] \"{key}\" varies {width} keys together: each value must be a "
                              f"list of {width}")
        out[key] = values
    return out


def _check(where: str, table, spec) -> Check:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: each [[claim.check]] must be a table")
    unknown = set(table) - {"metric", "min", "max", "stat"}
    if unknown:
        raise ConfigError(f"{where}: [[claim.check]] takes metric, min, max, stat; got '{min(unknown)}'")
    stat = table.get("stat", "seeds")
    if stat not in STATS:
        raise ConfigError(f"{where}: check stat must be one of {', '.join(STATS)}; got {stat!r}")
    metric = table.get("metric")
    if not isinstance(metric, str) or metric not in spec.labels:
        raise ConfigError(f"{where}: check metric {metric!r} is not measured (metrics: {', '.join(spec.labels)})"
                          f"{suggest(str(metric), spec.labels)}")
    bounds = {}
    for key in ("min", "max"):
        v = table.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise ConfigError(f"{where}: check {metric}: {key} must be a finite number (leave it out for no "
                              f"bound); got {v!r}")
        bounds[key] = None if v is None else float(v)
    if bounds["min"] is None and bounds["max"] is None:
        raise ConfigError(f"{where}: check {metric} needs min or max")
    if None not in bounds.values() and bounds["min"] > bounds["max"]:
        raise ConfigError(f"{where}: check {metric}: min {bounds['min']:g} > max {bounds['max']:g}")
    if stat == "geomean" and any(v is not None and v <= 0 for v in bounds.values()):
        raise ConfigError(f"{where}: check {metric}: a geomean check needs positive bounds")
    return Check(metric, bounds["min"], bounds["max"], stat)


def load_all(folder: Path = EXPERIMENTS, quick: bool = False, only: list[str] | None = None) -> list[Study]:
    """Every study of the folder, in claim order (1, 2, ..., 7a, 7b, ..., 11); `only` keeps those ids."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"experiments folder not found: {folder}")
    studies = [load_study(p, quick) for p in sorted(folder.glob("*.toml"))]
    ids = [s.id for s in studies]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ConfigError(f"{folder}: claim id {dupes[0]!r} is used by more than one study")
    if only is not None:
        unknown = [i for i in only if i not in ids]
        if unknown:
            raise ConfigError(f"no study with claim id {unknown[0]!r}; ids: {', '.join(ids)}")
        studies = [s for s in studies if s.id in only]
    if not studies:
        raise ConfigError(f"{folder}: no study files (*.toml)")
    return sorted(studies, key=lambda s: _order(s.id))


def _order(claim_id: str):
    digits = "".join(itertools.takewhile(str.isdigit, claim_id))
    return (int(digits) if digits else math.inf, claim_id)


# ---------------------------------------------------------------------------------------------------
# Verdicts


def judge(check: Check, values: list[float], agree: float) -> tuple[str, int, int, tuple[float, float] | None]:
    """(outcome, seeds passing, seeds failing, interval).

    stat 'seeds': pass when at least `agree` of the seeds pass, fail when at least `agree` fail.
    stat 'mean' / 'geomean': the interval mean ± 2 standard errors over the seeds (of log values for
    'geomean', mapped back): pass when it lies within [min, max], fail when it lies wholly outside,
    inconclusive when it straddles a bound or fewer than 2 seeds give a finite (positive) value.
    """
    outcomes = [check.passes(v) for v in values]
    passed, failed = outcomes.count(True), outcomes.count(False)
    n = len(values)
    if check.stat == "seeds":
        if n and passed >= agree * n:
            return "pass", passed, failed, None
        if n and failed >= agree * n:
            return "fail", passed, failed, None
        return "inconclusive", passed, failed, None
    v = np.asarray(values, dtype=float)
    ok = np.isfinite(v) & ((v > 0) if check.stat == "geomean" else True)
    if ok.sum() < 2 or not ok.all():
        return "inconclusive", passed, failed, None
    x = np.log(v) if check.stat == "geomean" else v
    half = 2 * x.std(ddof=1) / math.sqrt(x.size)
    lo, hi = x.mean() - half, x.mean() + half
    if check.stat == "geomean":
        lo, hi = math.exp(lo), math.exp(hi)
    inside = (check.min is None or lo >= check.min) and (check.max is None or hi <= check.max)
    outside = (check.min is not None and hi < check.min) or (check.max is not None and lo > check.max)
    return ("pass" if inside else "fail" if outside else "inconclusive"), passed, failed, (float(lo), float(hi))


def verdict(outcomes: list[str]) -> str:
    if "fail" in outcomes:
        return "does not hold"
    if outcomes and all(o == "pass" for o in outcomes):
        return "holds"
    return "inconclusive"
