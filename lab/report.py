"""`lab report`: one table over the runs below a directory, read back from their summary.json files.

    run | <keys that differ> | status | loss | gap | val_mse | flip_rate | outlier_grad | <params> | conv_step

The key columns are the swept keys of the runs plus any other config key whose value differs between
them. With `--by KEY,...` rows are grouped by those keys and every number becomes mean ± std (sample
standard deviation, n - 1) over the runs of the group, typically the seeds. A run whose summary is
missing or unreadable (killed mid-write, still training) is listed as `broken`, never skipped.

Reads only JSON and TOML: no torch import, so a report is instant.
"""

from __future__ import annotations

import csv
import io
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
NEUTRAL_KEYS = ("name", "train.figures", "device")  # never a reason for a key column


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
        Path(args.csv).write_text(render_csv(result))
    if args.markdown:
        Path(args.markdown).write_text(render_markdown(result))
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
        out.append({"run": d.name if rel == "." else rel, "summary": summary, "config": flat})
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
        if k not in keys and k not in NEUTRAL_KEYS and len({_text(c.get(k)) for c in known}) > 1:
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
    return Table(header, rows)


def aggregate(runs: list[dict], by: list[str]) -> Table:
    """One row per distinct value of the `by` keys: runs, statuses, and mean ± std of every number."""
    valid = config.keys()
    for k in by:
        if k not in valid:
            raise ValueError(f"report --by: unknown key '{k}'{config._suggest(k, valid)}")
    params = _param_columns(runs)
    numbers = [c for c, _ in METRICS] + params + ["conv_step"]
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault(tuple(_text(r["config"].get(k)) for k in by), []).append(r)
    header = [*by, "runs", "status", *numbers, "converged"]
    rows = []
    for key in sorted(groups, key=lambda t: [_natural(x) for x in t]):
        members = groups[key]
        statuses = [m["summary"].get("status", "broken") for m in members]
        status = ", ".join(f"{statuses.count(s)} {s}" for s in dict.fromkeys(statuses))
        values = [_row_values(m, params) for m in members]
        stats = [MeanStd.of([v[c] for v in values]) for c in numbers]
        converged = sum(v["conv_step"] is not None for v in values)
        rows.append([*key, len(members), status, *stats, f"{converged}/{len(members)}"])
    return Table(header, rows, frozenset(numbers))


class MeanStd:
    """Mean ± sample std (n - 1) of the finite values of a group; n counts them."""

    def __init__(self, mean: float, std: float | None, n: int):
        self.mean, self.std, self.n = mean, std, n

    @classmethod
    def of(cls, values: list) -> MeanStd | None:
        finite = [v for v in values if v is not None and math.isfinite(v)]
        if not finite:
            return None
        return cls(statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else None, len(finite))

    def __str__(self) -> str:
        return _fmt(self.mean) if self.std is None else f"{_fmt(self.mean)} ± {self.std:.2g}"


def _num(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() and abs(v) < 1e15 else f"{v:.4g}"
    return str(v)


def _text(v) -> str:
    """A cell as text: lists as a,b; None as '-'."""
    if isinstance(v, (list, tuple)):
        return ",".join(_text(x) for x in v)
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, MeanStd):
        return str(v)
    return _fmt(v)


# ---------------------------------------------------------------------------------------------
# Rendering


def render_text(t: Table) -> str:
    cells = [t.header] + [[_text(v) for v in row] for row in t.rows]
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
    return text == "-" or bool(re.fullmatch(r"-?[\d.]+(e[-+]?\d+)?( ± [\d.e+-]+)?", text))


def render_markdown(t: Table) -> str:
    def cell(v):
        return _text(v).replace("|", "\\|")
    lines = ["| " + " | ".join(t.header) + " |", "|" + "|".join(" --- " for _ in t.header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in t.rows]
    return "\n".join(lines) + "\n"


def render_csv(t: Table) -> str:
    """Full-precision numbers; an aggregated column becomes two, <name>_mean and <name>_std."""
    header = []
    for h in t.header:
        header += [f"{h}_mean", f"{h}_std"] if h in t.stats else [h]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in t.rows:
        line = []
        for h, v in zip(t.header, row):
            if h in t.stats:
                line += ["", ""] if v is None else [repr(v.mean), "" if v.std is None else repr(v.std)]
            elif isinstance(v, float):
                line.append(repr(v))
            elif isinstance(v, (list, tuple, bool)):
                line.append(_text(v))
            else:
                line.append("" if v is None else v)
        w.writerow(line)
    return buf.getvalue()
