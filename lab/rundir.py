"""Run directories: atomic creation, atomic result files, and reading them back.

    runs/<sweep>/<name>/
        config.toml         the resolved config (TOML)
        data.npz            the data the run saw (lab.data.load reads it)
        summary.json        status, params, reference optimum, final metrics, steps to converge, wall time
        events.out.tfevents.*   TensorBoard scalars, histograms, hparams, config text, figures
        figures/            PNG figures (single runs)

Every file is written to a temporary name and renamed, so a reader never sees half a file, and
directories are made with one `mkdir` that fails if the name exists, so two sweeps writing into the
same runs directory never share or overwrite a run. A study makes its run directories durable in
batches (lab.atomic.deferred_sync; the order that keeps --resume right is in lab.study), not with an
fsync per file.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import tempfile
from pathlib import Path

import tomli_w

from lab.atomic import write_atomic  # re-exported: run-directory code calls rundir.write_atomic
from lab.config import name_problem

SUMMARY = "summary.json"
CONFIG = "config.toml"


def check_name(name: str) -> str:
    """A run or sweep name must be one plain directory name: the config's rule (lab.config.name_problem)."""
    problem = name_problem(name)
    if problem:
        raise ValueError(f"name: {problem}")
    return name


def create(parent: Path, name: str) -> Path:
    """Create parent/name atomically; if it exists, parent/name-2, -3, ... (never an overwrite)."""
    check_name(name)
    parent.mkdir(parents=True, exist_ok=True)
    for i in range(1, 100_000):
        path = parent / (name if i == 1 else f"{name}-{i}")
        try:
            path.mkdir()  # atomic: exactly one creator succeeds
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"no free run directory name for {name!r} in {parent}")


def config_values(flat: dict) -> dict:
    """A flat config (or a run's swept values) as summary.json records it: infinities as the strings "inf" and
    "-inf". jsonable would make them null, as it does an unset value; loss.alpha = -inf (Welsch) then read
    as unset in `lab report` and matched any alpha on --resume. (No config value is NaN.)"""
    return {k: (f"{v}" if isinstance(v, float) and math.isinf(v) else v) for k, v in flat.items()}


def jsonable(v):
    """v as summary.json stores it: tuples as lists, NaN and infinities as null (JSON has no NaN)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v


def write_summary(run_dir: Path, summary: dict) -> None:
    write_atomic(Path(run_dir) / SUMMARY, json.dumps(jsonable(summary), indent=2, sort_keys=True) + "\n")


def write_config(run_dir: Path, table: dict) -> None:
    write_atomic(Path(run_dir) / CONFIG, tomli_w.dumps(table))


# Fields of summary.json that readers use as tables (lab.study._finish writes them as dicts).
_TABLE_FIELDS = ("final", "params", "swept", "config", "reference", "resolved", "last_finite")


def read_summary(run_dir: Path) -> dict:
    """The run's summary, or {'status': 'broken', 'error': ...} when it is missing, unreadable, or well-formed
    JSON of the wrong shape (no string status, or a table field such as `final` that is not a table)."""
    path = Path(run_dir) / SUMMARY
    try:
        summary = json.loads(path.read_text())
    except FileNotFoundError:
        return {"status": "broken", "error": "summary.json missing"}
    except (ValueError, OSError) as e:
        return {"status": "broken", "error": f"summary.json unreadable: {e.__class__.__name__}"}
    if not isinstance(summary, dict) or not isinstance(summary.get("status"), str):
        return {"status": "broken", "error": "summary.json unreadable: no status"}
    wrong = [k for k in _TABLE_FIELDS if summary.get(k) is not None and not isinstance(summary[k], dict)]
    if wrong:
        return {"status": "broken", "error": f"summary.json unreadable: '{wrong[0]}' is not a table"}
    return summary


def fmt(v, digits: int = 4, missing: str = "-") -> str:
    """A value of a summary as short text (lab run's line, lab report's tables, lab claims' report).

    Numbers get `digits` significant digits; whole numbers (below 1e15) and numbers from 10**(digits-1)
    print without decimals; below 1e-3 and from 1e5 scientific. None and NaN give `missing`,
    infinities 'inf' / '-inf', booleans 'true' / 'false', anything else str(v).
    """
    if v is None or isinstance(v, bool):
        return missing if v is None else str(v).lower()
    if isinstance(v, numbers.Integral):
        return str(int(v))
    if not isinstance(v, numbers.Real):
        return str(v)
    v = float(v)
    if math.isnan(v):
        return missing
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    if abs(v) < 1e-3 or abs(v) >= 1e5:
        return f"{v:.{digits - 1}e}"
    return f"{v:.0f}" if abs(v) >= 10 ** (digits - 1) else f"{v:.{digits}g}"


def find_runs(root: Path) -> list[Path]:
    """Every run directory below root: those with a config.toml or a summary.json."""
    root = Path(root)
    found = {p.parent for pattern in (CONFIG, SUMMARY) for p in root.rglob(pattern)}
    return sorted(found)


def check_writable(path: Path) -> None:
    """Fail early (before training) if runs cannot be written below `path`: make it and write a probe file.

    Asking os.access is not enough (root passes it on read-only or virtual file systems), so this tries.
    """
    path = Path(path)
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"runs directory {path} is not a directory ({probe} is a file)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path, prefix=".write-probe-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise ValueError(f"runs directory {path} is not writable ({e.strerror or e.__class__.__name__})") from None
