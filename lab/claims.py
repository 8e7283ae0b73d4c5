"""`lab claims`: every claim of the guide, measured on real training runs; one table, a report, figures.

    experiments/*.toml -> Study (lab.claim_studies: a config grid + its [claim]) -> runs, all trained in
    one lab.study.execute call (so studies that share a population train together) -> Measurement
    (lab.claim_measures, lab.claim_training, lab.claim_comparison) -> checks against the study's
    thresholds -> verdict -> table on stdout, DIR/report.md, DIR/table.md, DIR/claims.json,
    DIR/figures/*.png and the same images in TensorBoard (lab.claim_report).

Verdicts come only from the measurements and the thresholds in the study files (see lab.claim_studies).
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from lab import rundir, study, sweeps, trainer
from lab.claim_measures import MEASURES, MissingRun
from lab.claim_report import numbers, spread, table_markdown, table_text, write_figures, write_report  # noqa: F401
from lab.claim_studies import (  # noqa: F401
    EXPERIMENTS,
    VERDICTS,
    Check,
    Study,
    expand,
    judge,
    load_all,
    load_study,
    verdict,
)
from lab.config import ConfigError

MARKER = ".lab-claims"  # marks a folder as lab claims output, so a rerun may clear it


@dataclass
class CheckResult:
    check: Check
    label: str
    values: list[float]
    outcome: str  # pass | fail | inconclusive
    passed: int
    failed: int
    interval: tuple[float, float] | None = None  # stat mean / geomean: mean ± 2 standard errors


@dataclass
class ClaimResult:
    study: Study
    values: dict[str, list[float]]
    labels: dict[str, str]
    checks: list[CheckResult]
    verdict: str
    details: str = ""
    plots: dict = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    runs: list = field(default_factory=list, repr=False)  # the study's runs (summaries, directories)


def evaluate(st: Study, runs: list[sweeps.Run]) -> ClaimResult:
    """Measure one study's runs and judge its checks. A measurement that raises makes the claim inconclusive."""
    spec = MEASURES[st.measure]
    labels = {m: spec.label(m, st.params) for m in spec.labels}
    statuses = _statuses(runs)
    try:
        m = spec.fn(runs, st.params)
    except MissingRun as e:  # a study-file mistake: its message says which run, no exception name needed
        return _unmeasured(st, runs, f"measurement failed: {e}")
    except Exception as e:  # noqa: BLE001 — one broken measurement must not cost the other claims
        return _unmeasured(st, runs, f"measurement failed: {e.__class__.__name__}: {e}")
    checks = []
    for c in st.checks:
        values = [float(v) for v in m.values.get(c.metric, [])]
        outcome, passed, failed, interval = judge(c, values, st.agree)
        checks.append(CheckResult(c, labels[c.metric], values, outcome, passed, failed, interval))
    return ClaimResult(st, m.values, labels, checks, verdict([c.outcome for c in checks]), m.details, m.plots,
                       statuses, runs=runs)


def _unmeasured(st: Study, runs: list[sweeps.Run], error: str) -> ClaimResult:
    """A claim with no numbers (its measurement failed, or was never reached): every check inconclusive."""
    spec = MEASURES[st.measure]
    labels = {m: spec.label(m, st.params) for m in spec.labels}
    checks = [CheckResult(c, labels[c.metric], [], "inconclusive", 0, 0) for c in st.checks]
    return ClaimResult(st, {}, labels, checks, "inconclusive", statuses=_statuses(runs), runs=runs, error=error)


def _statuses(runs: list[sweeps.Run]) -> dict[str, int]:
    """How many of the runs ended in each status ('missing' for a run without a summary)."""
    statuses: dict[str, int] = {}
    for r in runs:
        s = (r.summary or {}).get("status", "missing")
        statuses[s] = statuses.get(s, 0) + 1
    return statuses


# ---------------------------------------------------------------------------------------------------
# Running everything


@dataclass
class Report:
    results: list[ClaimResult]
    out: Path
    quick: bool
    runs: int
    train_s: float
    total_s: float
    interrupted: bool = False
    populations: int = 0
    figures: dict[str, Path] = field(default_factory=dict)
    interrupted_while: str | None = None  # training | measuring | drawing figures


def run(quick: bool = False, out: Path | str = "runs/claims", experiments: Path | str = EXPERIMENTS,
        only: list[str] | None = None, log=None) -> Report:
    """Load every study, train all their runs in one call, measure, judge, write the report and figures."""
    t0 = time.perf_counter()
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    studies = load_all(Path(experiments), quick, only)
    out = _prepare_out(Path(out))
    by_study: dict[str, list[sweeps.Run]] = {}
    for st in studies:
        by_study[st.id] = []
        for cfg, swept in st.grid:
            r = sweeps.Run(config=cfg, name=sweeps.run_name(cfg, swept), swept=swept)
            r.dir = rundir.create(out / "runs" / st.name, r.name)
            by_study[st.id].append(r)
    all_runs = [r for rs in by_study.values() for r in rs]
    populations = len({trainer.population_key(r.config) for r in all_runs})
    report = Report([], out, quick, len(all_runs), 0.0, 0.0, populations=populations)
    # A Ctrl-C (or SIGTERM) stops the training, the measuring or the figures, never the report: the claims
    # not measured yet are inconclusive, and report.md, table.md and claims.json say so. As in lab.study,
    # the first signal stops the work and any later one waits for the files. The handler is in place
    # before the training starts (lab.study's own takes over while it trains), so that a signal in the
    # instant between the training's end and the measuring finds it too.
    with study._Stop() as stop:
        phase, stopped = "training", False  # stopped: by a signal this handler caught (not lab.study's)
        try:
            if all_runs:
                log(f"lab claims{' --quick' if quick else ''}: {len(all_runs)} runs of {len(by_study)} studies "
                    f"in {populations} populations -> {out}")
                progress = _Progress(studies, by_study, log)
                with _one_thread():
                    _, interrupted = study.execute(all_runs, out / "runs", figures=False, on_done=progress.done)
                if interrupted:  # the runs it did not finish say so; the claims are measured on what there is
                    report.interrupted, report.interrupted_while = True, "training"
            report.train_s = time.perf_counter() - t0
            phase = "measuring"
            for st in studies:
                report.results.append(evaluate(st, by_study[st.id]))
            phase = "drawing figures"  # (after a Ctrl-C while measuring nobody waits for figures)
            write_figures(report.results, out / "figures", tensorboard=True, paths=report.figures)
            stop.requested = True  # the report is three small files: a signal from here on waits for them
        except KeyboardInterrupt:
            if phase == "training" and all((r.summary or {}).get("status") in ("completed", "diverged", "failed")
                                           for r in all_runs):
                phase = "measuring"  # every run had ended: the signal came as the measuring was to begin
            report.interrupted, report.interrupted_while, stopped = True, phase, True
            report.train_s = report.train_s or time.perf_counter() - t0
        stop.requested = True
        measured = len(report.results)
        report.results += [_unmeasured(st, by_study[st.id], "not measured: interrupted")
                           for st in studies[measured:]]
        report.total_s = time.perf_counter() - t0
        write_report(report)
    if stop.deferred and not report.interrupted:  # a signal came while the report was written: the exit says so
        report.interrupted = True
        log(f"interrupted after the report was written; report: {out / 'report.md'}")
    if stopped:  # (a training that lab.study stopped has said so in the progress line)
        log(f"interrupted while {report.interrupted_while}: {measured} of {len(studies)} claims measured, "
            f"{len(report.figures)} figures drawn; report: {out / 'report.md'}")
    return report


def _prepare_out(out: Path) -> Path:
    """Make `out` (or clear what an earlier `lab claims` wrote there); refuse any other non-empty folder."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise ConfigError(f"--out {out} is not empty and was not written by `lab claims`; choose a new folder")
        for name in ("runs", "figures"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("report.md", "claims.json", "table.md"):
            (out / name).unlink(missing_ok=True)
    rundir.check_writable(out)
    out.mkdir(parents=True, exist_ok=True)
    rundir.write_atomic(out / MARKER, "written by `lab claims`; the next run clears runs/, figures/ and the reports\n")
    return out


@contextlib.contextmanager
def _one_thread():
    """Populations here are small: intra-op threads cost more than they give (and stall on a busy machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Progress:
    """One stderr line per study once all its runs are done, saying how they ended: 'trained' when every
    run completed, 'trained ... (2 diverged, 1 failed; ...)' when some did not, 'interrupted ... (3 of 8
    runs finished; ...)' when a Ctrl-C stopped the others."""

    def __init__(self, studies, by_study, log):
        self.owner = {id(r): st for st in studies for r in by_study[st.id]}
        self.runs = {st.id: by_study[st.id] for st in studies}
        self.left = {st.id: len(by_study[st.id]) for st in studies}
        self.log, self.t0 = log, time.perf_counter()

    def done(self, run):
        st = self.owner.get(id(run))
        if st is None:
            return
        self.left[st.id] -= 1
        if self.left[st.id] == 0:
            word, detail = self.outcome(self.runs[st.id])
            self.log(f"  {word} {st.id:>3} {st.title} ({detail}{time.perf_counter() - self.t0:.1f} s)")

    @staticmethod
    def outcome(runs) -> tuple[str, str]:
        """('trained' or 'interrupted', what the runs' statuses add, ending in '; ' when not empty)."""
        statuses = _statuses(runs)
        if statuses.get("interrupted"):
            return "interrupted", f"{len(runs) - statuses['interrupted']} of {len(runs)} runs finished; "
        others = ", ".join(f"{n} {s}" for s, n in statuses.items() if s != "completed")
        return "trained", f"{others}; " if others else ""


def main(args) -> int:
    """`lab claims [--quick] [--out DIR] [--only IDS]`: 0 all runs done, 1 a run or measurement failed, 130
    interrupted (while training, measuring or drawing; the table and report of what was done are written)."""
    only = getattr(args, "only", None)
    report = run(quick=args.quick, out=Path(args.out), experiments=Path(getattr(args, "experiments", None)
                                                                          or EXPERIMENTS),
                 only=[i.strip() for i in only.split(",")] if only else None)
    print(table_text(report.results))
    print(f"report: {report.out / 'report.md'} ({report.total_s:.0f} s)")
    print(f"TensorBoard: tensorboard --logdir {report.out}")
    if report.interrupted:
        return 130
    failed = any(r.error or r.statuses.get("failed") for r in report.results)
    return 1 if failed else 0
