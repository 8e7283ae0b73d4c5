"""Output of `lab claims`: the terminal table, DIR/report.md, DIR/claims.json and the figures.

Everything here reads finished ClaimResults (lab.claims); nothing decides a verdict.
"""

from __future__ import annotations

import json
import math
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lab import rundir
from lab.claim_measures import fmt, table

if TYPE_CHECKING:
    from lab.claims import ClaimResult, Report


def spread(values: list[float]) -> str:
    """mean ± std over seeds (just the value for one seed); non-finite values are counted, not averaged."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return "n/a"
    finite = v[np.isfinite(v)]
    if finite.size == v.size:
        return fmt(float(v[0])) if v.size == 1 else f"{fmt(float(finite.mean()))} ± {fmt(float(finite.std()))}"
    if finite.size == 0:
        kinds = sorted({fmt(float(x)) for x in v})
        return kinds[0] if len(kinds) == 1 else "/".join(kinds)
    return f"{fmt(float(finite.mean()))} ± {fmt(float(finite.std()))} ({v.size - finite.size} of {v.size} not finite)"


def numbers(res: ClaimResult) -> str:
    """The checked numbers of a claim, one clause per check."""
    if res.error:
        return res.error
    return "; ".join(f"{c.label} = {value(c)} ({c.check.condition()}{seeds_passing(c)})" for c in res.checks)


def value(c) -> str:
    """The number a check judged: mean ± std over seeds, or for mean/geomean checks that mean and its interval."""
    if c.check.stat == "seeds" or not c.values:
        return spread(c.values)
    v = np.asarray(c.values, dtype=float)
    centre = float(np.exp(np.log(v).mean())) if c.check.stat == "geomean" and (v > 0).all() else float(v.mean())
    name = "geometric mean" if c.check.stat == "geomean" else "mean"
    interval = f", 95% CI {fmt(c.interval[0])} to {fmt(c.interval[1])}" if c.interval else ""
    return f"{name} {fmt(centre)}{interval}"


def seeds_passing(c) -> str:
    return f" in {c.passed}/{len(c.values)} seeds" if len(c.values) > 1 else ""


def write_figures(results: list[ClaimResult], folder: Path | str, tensorboard: bool = False,
                  paths: dict[str, Path] | None = None) -> dict[str, Path]:
    """Draw every claim's figures into folder/<name>.png (and, with tensorboard, as images in folder's
    event file). Returns name -> path. A figure that fails to draw is skipped with a note on stderr.

    paths: a dict filled in as each figure is written (and returned), so that a caller interrupted
    midway (Ctrl-C) still knows the figures already on disk; the event file is closed either way.
    """
    from lab import figures

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    writer = None
    if tensorboard:
        from lab.events import EventWriter
        writer = EventWriter(folder)
    paths = {} if paths is None else paths
    try:
        for res in results:
            for name, payload in res.plots.items():
                try:
                    png = figures.claim_figure(payload)
                except Exception as e:  # noqa: BLE001 — a figure never costs the measurements
                    print(f"note: figure {name} skipped: {e.__class__.__name__}: {e}", file=sys.stderr)
                    continue
                rundir.write_atomic(folder / f"{name}.png", png)
                paths[name] = folder / f"{name}.png"
                if writer is not None:
                    writer.add_image(f"claims/{name}", png)
    finally:
        if writer is not None:
            writer.close()
    return paths


# ---------------------------------------------------------------------------------------------------
# Output: terminal table, report.md, claims.json


def table_rows(results: list[ClaimResult]) -> list[list[str]]:
    return [[f"{r.study.id}. {r.study.title}", r.study.measured, numbers(r), r.verdict] for r in results]


def table_text(results: list[ClaimResult], widths=(24, 34, 52, 13)) -> str:
    """The claims table for a terminal: wrapped cells, one blank line between claims."""
    header = ["claim", "measured", "numbers", "verdict"]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    for row in table_rows(results):
        cells = [textwrap.wrap(c, w) or [""] for c, w in zip(row, widths)]
        for i in range(max(map(len, cells))):
            lines.append("  ".join((c[i] if i < len(c) else "").ljust(w) for c, w in zip(cells, widths)).rstrip())
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def table_markdown(results: list[ClaimResult]) -> str:
    rows = [[c.replace("|", "\\|") for c in row[:3]] + [f"**{row[3]}**"] for row in table_rows(results)]
    return "\n".join(["| claim | measured | numbers | verdict |", "|---|---|---|---|"]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def write_report(report: Report) -> None:
    out, results = report.out, report.results
    seeds = {r.study.id: len({c.seed for c, _ in r.study.grid}) for r in results if r.study.grid}
    intro = (f"`lab claims{' --quick' if report.quick else ''}`: {report.runs} training runs in "
             f"{report.populations} populations, trained in {report.train_s:.1f} s; {report.total_s:.1f} s with measurements and figures. Verdicts come from "
             "the thresholds in each study file (experiments/*.toml): a check passes when its share `agree` of "
             "the seeds pass (numbers are mean ± std over seeds).")
    tensorboard = ("TensorBoard (every run's scalars, histograms, hparams; the figures as images): "
                   f"`tensorboard --logdir {out}`")
    lines = ["# The guide's claims, measured", "", intro, "", table_markdown(results), "", tensorboard, ""]
    if report.interrupted:
        lines += [_interruption(report), ""]
    for r in results:
        st = r.study
        lines += [f"## {st.id}. {st.title}: {r.verdict}", "", f"> {st.guide}", "",
                  f"Measured: {st.measured} (`{st.path.name}`, measure `{st.measure}`"
                  + (f", {seeds[st.id]} seeds, {len(st.grid)} runs" if st.id in seeds else ", no training") + ").", ""]
        if st.note:
            lines += [st.note, ""]
        if r.error:
            lines += [f"**{r.error}**", ""]
        if any(k != "completed" for k in r.statuses):
            lines += ["Run statuses: " + ", ".join(f"{n} {k}" for k, n in r.statuses.items()) + ".", ""]
        rows = [["check", "condition", "value", "seeds passing", "outcome"]]
        rows += [[c.label, c.check.condition() + ("" if c.check.stat == "seeds" else f" ({c.check.stat})"),
                  value(c), f"{c.passed}/{len(c.values)}", c.outcome] for c in r.checks]
        checked = {c.check.metric for c in r.checks}
        rows += [[r.labels[k], "(not checked)", spread(v), "", ""] for k, v in r.values.items() if k not in checked]
        lines += [table(rows[0], rows[1:]), ""]
        if r.details:
            lines += [r.details, ""]
        lines += [f"![{name}](figures/{name}.png)" for name in r.plots if name in report.figures] + [""]
    rundir.write_atomic(out / "report.md", "\n".join(lines))
    rundir.write_atomic(out / "table.md", table_markdown(results) + "\n")
    rundir.write_atomic(out / "claims.json", json.dumps(_json_numbers(_json(report)), indent=2, default=_plain) + "\n")


def _interruption(report: Report) -> str:
    """The report's line on a Ctrl-C: what it stopped, and what that leaves inconclusive or undrawn."""
    runs_cut = "Some runs did not finish; their claims are inconclusive."
    skipped = [r.study.id for r in report.results if r.error == "not measured: interrupted"]
    if report.interrupted_while in ("training", "measuring") and skipped:  # (training: stopped before measuring)
        line = (f"**Interrupted** while {report.interrupted_while}: claim{'s' if len(skipped) > 1 else ''} "
                f"{', '.join(skipped)} not measured (inconclusive); no figures drawn.")
    elif report.interrupted_while == "measuring":
        line = "**Interrupted** after measuring every claim: no figures drawn."
    elif report.interrupted_while == "drawing figures":
        planned = sum(len(r.plots) for r in report.results)
        line = (f"**Interrupted** while drawing the figures: every claim measured; {len(report.figures)} of "
                f"{planned} figures drawn (the others are missing below).")
    else:
        return f"**Interrupted**: {runs_cut[0].lower()}{runs_cut[1:]}"
    return line + (" " + runs_cut if any("interrupted" in r.statuses for r in report.results) else "")


def _json(report: Report) -> dict:
    return {"quick": report.quick, "runs": report.runs, "populations": report.populations, "train_s": report.train_s, "total_s": report.total_s,
            "interrupted": report.interrupted, "interrupted_while": report.interrupted_while,
            "figures": {k: str(v) for k, v in report.figures.items()},
            "claims": [{"id": r.study.id, "title": r.study.title, "guide": r.study.guide,
                        "measured": r.study.measured, "study": r.study.path.name, "verdict": r.verdict,
                        "error": r.error, "statuses": r.statuses,
                        "checks": [{"metric": c.check.metric, "label": c.label, "min": c.check.min,
                                    "max": c.check.max, "stat": c.check.stat, "values": c.values,
                                    "passed": c.passed, "failed": c.failed, "interval": c.interval,
                                    "outcome": c.outcome} for c in r.checks],
                        "values": r.values} for r in report.results]}


def _plain(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return str(v)


def _json_numbers(v):
    """Numbers as claims.json writes them. JSON has no NaN or infinity: those become the strings "nan",
    "inf", "-inf". Whole numbers below 1e15 (as lab.rundir.fmt) become integers: the measurements are
    floats so that a missing one can be NaN, and a step count read 43.0."""
    if isinstance(v, float):
        if not math.isfinite(v):
            return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
        return int(v) if v.is_integer() and abs(v) < 1e15 else v
    if isinstance(v, dict):
        return {k: _json_numbers(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_numbers(x) for x in v]
    return v
