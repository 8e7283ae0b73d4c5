"""`lab report`: one table over the runs below a directory, read back from their summary.json files.

    run | <keys that differ> | status | loss | gap | val_mse | flip_rate | outlier_grad | <params> | conv_step

The key columns are the swept keys of the runs plus any other config key whose value differs between
them; config values are shown exactly (0.001 and 0.0010001 stay apart), measured numbers rounded. With
`--by KEY,...` rows are grouped by the exact values of those keys and every number becomes mean ± std
(sample standard deviation, n - 1) over the completed runs of the group, typically the seeds: a diverged
run's last finite parameters or a failed run's missing ones never mix into a mean, and a cell averaged
over fewer runs than the group holds says so, e.g. `0.28 ± 0.01 (n=2/3)` (steps to converge average
the runs that converged; `converged` counts them). A run whose summary is missing or unreadable (killed
mid-write, still training) is listed as `broken`, never skipped.

Reads only JSON and TOML: no torch import, so a report is instant.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
import tomllib
from pathlib import Path
from typing import NamedTuple

from lab import config, rundir

# Final metrics shown, as (column, summary `final` tag).
METRICS = (("loss", "loss/train"), ("gap", "convergence/gap"), ("val_mse", "loss/val_mse"),
           ("flip_rate", "oscillation/flip_rate"), ("outlier_grad", "grad/outlier_share"))


def main(args) -> int:
    """Print the table for args.dir (grouped by args.by); write args.csv / args.markdown if given."""
    root = Path(args.dir)
    if not root.is_dir():
        raise ValueError(f"report: {root} is not a directory")
    runs = load_runs(root)
    if not runs:
        raise ValueError(f"report: no runs below {root} (a run directory holds summary.json or config.toml)")
    by = [k.strip() for k in args.by.split(",") if k.strip()] if args.by else []
    result = aggregate(runs, by) if by else table(runs)
    print(render_text(result))
    if args.csv:
        rundir.write_atomic(Path(args.csv), render_csv(result))
    if args.markdown:
        rundir.write_atomic(Path(args.markdown), render_markdown(result))
    return 0


def load_runs(root: Path) -> list[dict]:
    """Every run below root as {'run': relative name, 'summary': dict, 'config': flat config}."""
    out = []
    for d in rundir.find_runs(root):
        summary = rundir.read_summary(d)
        flat = summary.get("config")
        if not isinstance(flat, dict):
            flat = _config_from_toml(d)
        rel = d.relative_to(root).as_posix()
        out.append({"run": d.resolve().name if rel == "." else rel, "summary": summary, "config": flat})  # (".": the folder itself)
    return sorted(out, key=lambda r: _natural(r["run"]))


def _config_from_toml(d: Path) -> dict:
    """A broken run's config.toml, if that at least was written (it is written before training)."""
    try:
        return config.flatten(tomllib.loads((d / rundir.CONFIG).read_text()))
    except (OSError, ValueError):
        return {}


def _natural(text: str):
    """Sort key with numbers compared as numbers: s2 before s10."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text)]


def key_columns(runs: list[dict]) -> list[str]:
    """Swept keys (in sweep order), then every other config key whose value differs between runs."""
    keys = list(dict.fromkeys(k for r in runs for k in (r["summary"].get("swept") or {})))
    # Which keys differ is judged on runs with a complete config (from summary.json): a broken run's
    # partial config.toml would otherwise make every key look different.
    known = [r["config"] for r in runs if isinstance(r["summary"].get("config"), dict)] or \
        [r["config"] for r in runs if r["config"]]
    all_keys = dict.fromkeys(k for c in known for k in c)
    for k in all_keys:
        if k not in keys and k not in config.NEUTRAL_KEYS and len({_exact(c.get(k)) for c in known}) > 1:
            keys.append(k)
    return keys


def _param_columns(runs: list[dict]) -> list[str]:
    return list(dict.fromkeys(p for r in runs for p in (r["summary"].get("params") or {})))


def _row_values(run: dict, params: list[str]) -> dict:
    s = run["summary"]
    final = s.get("final") or {}
    values = {col: _num(final.get(tag)) for col, tag in METRICS}
    values.update({p: _num((s.get("params") or {}).get(p)) for p in params})
    values["conv_step"] = _num(s.get("steps_to_converge"))
    return values


class Table(NamedTuple):
    header: list[str]
    rows: list[list]
    stats: frozenset = frozenset()  # columns whose cells are MeanStd (or None)
    exact: frozenset = frozenset()  # config-key columns: values shown exactly, never rounded


def table(runs: list[dict]) -> Table:
    """One row per run: run, key columns, status, metrics, params, steps to converge, note."""
    keys, params = key_columns(runs), _param_columns(runs)
    numbers = [c for c, _ in METRICS] + params + ["conv_step"]
    header = ["run", *keys, "status", *numbers, "note"]
    rows = []
    for r in runs:
        s, values = r["summary"], _row_values(r, params)
        note = s.get("error") or (f"diverged at step {s['diverged_step']}" if s.get("diverged_step") is not None else "")
        rows.append([r["run"], *(r["config"].get(k) for k in keys), s.get("status", "broken"),
                     *(values[c] for c in numbers), note])
    return Table(header, rows, exact=frozenset(keys))


def aggregate(runs: list[dict], by: list[str]) -> Table:
    """One row per distinct value of the `by` keys: runs, statuses, and mean ± std of every number."""
    valid = config.keys()
    for k in by:
        if k not in valid:
            raise ValueError(f"report --by: unknown key '{k}'{config.suggest(k, valid)}")
    params = _param_columns(runs)
    numbers = [c for c, _ in METRICS] + params + ["conv_step"]
    # Grouped by the exact values (0.001 and 0.0010001 are two groups), shown as the first member's values.
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault(tuple(_exact(r["config"].get(k)) for k in by), []).append(r)
    header = [*by, "runs", "status", *numbers, "converged"]
    rows = []
    for key in sorted(groups, key=lambda t: [_order(json.loads(x)) for x in t]):
        members = groups[key]
        statuses = [m["summary"].get("status", "broken") for m in members]
        status = ", ".join(f"{statuses.count(s)} {s}" for s in dict.fromkeys(statuses))
        values = [_row_values(m, params) for m, s in zip(members, statuses) if s == "completed"]
        stats = [MeanStd.of([v[c] for v in values], of=None if c == "conv_step" else len(members))
                 for c in numbers]
        converged = sum(v["conv_step"] is not None for v in values)
        rows.append([*(members[0]["config"].get(k) for k in by), len(members), status, *stats,
                     f"{converged}/{len(members)}"])
    return Table(header, rows, frozenset(numbers), frozenset(by))


class MeanStd:
    """Mean ± sample std (n - 1) of the finite values of a group; n counts them, `of` is the group's size
    (shown as '(n=2/3)' when fewer values than runs went into the mean; None: not shown)."""

    def __init__(self, mean: float, std: float | None, n: int, of: int | None = None):
        self.mean, self.std, self.n, self.of = mean, std, n, of

    @classmethod
    def of(cls, values: list, of: int | None = None) -> MeanStd | None:
        finite = [v for v in values if v is not None and math.isfinite(v)]
        if not finite:
            return None
        # Values near the float64 limit (a diverging run's 1e308) overflow the mean's sum and the std's
        # squares: those are computed on the values scaled by a power of two, exactly, and scaled back.
        largest = max(abs(v) for v in finite)
        scale = math.ldexp(1.0, math.frexp(largest)[1] - 1) if largest > 2.0**500 else 1.0  # <= largest
        scaled = [v / scale for v in finite]
        std = statistics.stdev(scaled) * scale if len(finite) > 1 else None
        return cls(statistics.fmean(scaled) * scale, std, len(finite), of)

    def __str__(self) -> str:
        text = rundir.fmt(self.mean) if self.std is None else f"{rundir.fmt(self.mean)} ± {self.std:.2g}"
        return text if self.of is None or self.n >= self.of else f"{text} (n={self.n}/{self.of})"


def _num(v) -> int | float | None:
    """A summary's number; None for anything else, a non-finite value, or an integer past the float range
    (a hand-edited summary.json may hold any of them). An integer stays one, so that the CSV writes a
    step count as 43, not 43.0."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    if not math.isfinite(f):
        return None
    return v if isinstance(v, int) else f


def _order(v):
    """Sort key of a config value: numbers by value (0.05 before 0.1), then text naturally (s2 before s10)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (0, float(v), [])
    return (1, 0.0, _natural(_text(v, exact=True)))


def _exact(v) -> str:
    """A config value as an exact, hashable key (JSON): what grouping and 'does this key differ' compare."""
    # default=str: a hand-written config.toml may hold what JSON has no type for (a TOML date)
    return json.dumps(rundir.jsonable(v), sort_keys=True, default=str)


def _text(v, exact: bool = False) -> str:
    """A cell as text: lists as a,b; None as '-'; numbers rounded (rundir.fmt), or with exact=True (config
    values) as Python writes them, shortest round-trip: 0.0010001 stays 0.0010001."""
    if isinstance(v, (list, tuple)):
        return ",".join(_text(x, exact) for x in v)
    if isinstance(v, MeanStd):
        return str(v)
    if exact and isinstance(v, float) and math.isfinite(v) and not (v.is_integer() and abs(v) < 1e15):
        return repr(v)
    return rundir.fmt(v)


# ---------------------------------------------------------------------------------------------
# Rendering


def render_text(t: Table) -> str:
    cells = [t.header] + [[_text(v, h in t.exact) for h, v in zip(t.header, row)] for row in t.rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(t.header))]
    numeric = [all(_is_number(r[i]) for r in cells[1:]) for i in range(len(t.header))]
    lines = []
    for j, r in enumerate(cells):
        parts = [c.rjust(w) if numeric[i] and j else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(parts).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _is_number(text: str) -> bool:
    return text == "-" or bool(re.fullmatch(r"-?[\d.]+(e[-+]?\d+)?( ± [\d.e+-]+)?( \(n=\d+/\d+\))?", text))


def render_markdown(t: Table) -> str:
    def cell(h, v):
        return _text(v, h in t.exact).replace("|", "\\|")
    lines = ["| " + " | ".join(t.header) + " |", "|" + "|".join(" --- " for _ in t.header) + "|"]
    lines += ["| " + " | ".join(cell(h, v) for h, v in zip(t.header, row)) + " |" for row in t.rows]
    return "\n".join(lines) + "\n"


def render_csv(t: Table) -> str:
    """Full-precision numbers; an aggregated column becomes three, <name>_mean, <name>_std and <name>_n (how
    many runs the mean is over)."""
    header = []
    for h in t.header:
        header += [f"{h}_mean", f"{h}_std", f"{h}_n"] if h in t.stats else [h]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in t.rows:
        line = []
        for h, v in zip(t.header, row):
            if h in t.stats:
                line += ["", "", 0] if v is None else [repr(v.mean), "" if v.std is None else repr(v.std), v.n]
            elif isinstance(v, float):
                line.append(repr(v))
            elif isinstance(v, (list, tuple, bool)):
                line.append(_text(v, exact=True))
            else:
                line.append("" if v is None else v)
        w.writerow(line)
    return buf.getvalue()
