"""The `lab` command line: run, sweep, report, claims, losses, config.

Every user mistake ends as one line on stderr and exit code 2 — never a traceback. Exit codes:
0 success, 1 a run failed, 2 bad input, 3 `lab run` diverged, 130 interrupted.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

EPILOG = """\
examples:
  lab losses                                   every loss with its formula and parameters
  lab config                                   every config key with its default and meaning
  lab run configs/outliers.toml                train one run into runs/
  lab run configs/clean.toml loss.name=huber loss.delta=0.5 optim.lr=0.1
  lab sweep configs/clean.toml loss.name=mse,mae,huber seed=0,1,2
  lab sweep experiments/oscillation.toml --resume
  lab report runs/oscillation --by loss.name
  lab claims --quick                           every claim of the guide, measured
  tensorboard --logdir runs                    compare runs (scalars, HParams, custom scalars)

config files are TOML (see configs/); KEY=VALUE words override them (dotted keys,
TOML values: numbers, true/false, [lists], strings). In a sweep, KEY=V1,V2 lists values.

exit codes: 0 ok, 1 a run failed, 2 bad input, 3 the run diverged, 130 interrupted.
"""


class UsageError(Exception):
    """Bad input; printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + message and exits 2; keep it to one line
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lab", description="A training-behaviour lab for regression losses (MSE, MAE, Huber, ...).",
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = sub.add_parser("run", help="train one run", description="Train one run and write its run directory.")
    run.add_argument("config", help="TOML config file")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. loss.delta=0.5")
    run.add_argument("--runs-dir", default="runs", help="parent of run directories (default: runs)")
    run.add_argument("--name", help="run directory name (default: from the config)")
    run.add_argument("--no-figures", action="store_true", help="skip the end-of-run figures")

    sw = sub.add_parser("sweep", help="train the grid of a sweep",
                        description="Train every combination of the swept values, in as few populations as possible.")
    sw.add_argument("config", help="TOML config file (its [sweep] table lists values)")
    sw.add_argument("overrides", nargs="*", metavar="KEY=V1,V2", help="a value or a comma list of values to sweep")
    sw.add_argument("--runs-dir", default="runs", help="parent of the sweep directory (default: runs)")
    sw.add_argument("--name", help="sweep directory name (default: the config's name)")
    sw.add_argument("--resume", action="store_true", help="skip runs whose summary.json says completed")

    rep = sub.add_parser("report", help="table over finished runs", description="One table over the runs below DIR.")
    rep.add_argument("dir", help="directory holding run directories")
    rep.add_argument("--by", help="aggregate (mean ± std) over the other keys, grouped by these comma-separated keys")
    rep.add_argument("--csv", help="also write the table as CSV")
    rep.add_argument("--markdown", help="also write the table as Markdown")

    cl = sub.add_parser("claims", help="measure every claim of the guide",
                        description="Run the studies in experiments/ and print each claim's measurement and verdict.")
    cl.add_argument("--quick", action="store_true", help="fewer seeds and steps (under 2 minutes on 2 cores)")
    cl.add_argument("--out", default="runs/claims", help="output directory (default: runs/claims)")

    sub.add_parser("losses", help="list every loss with its formula and parameters")
    sub.add_parser("config", help="list every config key with its default and meaning")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            build_parser().print_help()
            return 0
        return _dispatch(args)
    except UsageError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def _fail(message: str) -> int:
    print("error: " + " ".join(message.split()), file=sys.stderr)
    return 2


def _dispatch(args) -> int:
    from lab.config import ConfigError  # noqa: PLC0415 — `lab --help` stays fast without torch

    try:
        if args.command == "losses":
            from lab import losses  # noqa: PLC0415
            print(losses.describe())
            return 0
        if args.command == "config":
            from lab import config  # noqa: PLC0415
            print("config keys (TOML sections [data], [model], [loss], [optim], [train]; top-level name, seed, "
                  "device, dtype):\n" + config.describe())
            return 0
        if args.command == "run":
            return _run(args)
        if args.command == "sweep":
            return _sweep(args)
        if args.command == "report":
            from lab import report  # noqa: PLC0415
            return report.main(args)
        if args.command == "claims":
            from lab import claims  # noqa: PLC0415
            return claims.main(args)
    except (ConfigError, ValueError, OSError) as e:
        return _fail(str(e))
    raise UsageError(f"unknown command {args.command!r}")


def _setup(args, sweep_words: bool):
    """Load the config (+ overrides), check the device and the runs directory before any training."""
    from lab import config, rundir, trainer  # noqa: PLC0415

    if sweep_words:
        fixed, swept = [], {}
        for word in args.overrides:
            key, _, text = word.partition("=")
            if "," in text and not text.strip().startswith("["):
                swept[key.strip()] = [config._parse_word(v) for v in text.split(",")]
            else:
                fixed.append(word)
        cfg, sweep = config.load(args.config, fixed)
        sweep.update(swept)
    else:
        cfg, sweep = config.load(args.config, args.overrides)
        sweep = {}
    if cfg.device == "cuda":
        trainer.resolve_device("cuda")  # raises a clear ValueError without a GPU
    elif cfg.device == "auto" and not _cuda():
        print("note: device=auto found no CUDA GPU; training on the CPU", file=sys.stderr)
    runs_dir = Path(args.runs_dir)
    rundir.check_writable(runs_dir)
    if getattr(args, "name", None):
        rundir.check_name(args.name)
    return cfg, sweep, runs_dir


def _cuda() -> bool:
    import torch  # noqa: PLC0415

    return torch.cuda.is_available()


def _run(args) -> int:
    from lab import study  # noqa: PLC0415

    cfg, _, runs_dir = _setup(args, sweep_words=False)
    run = study.Run(config=cfg, name=args.name or cfg.name)
    runs, interrupted = study.execute([run], runs_dir, figures=cfg.train.figures and not args.no_figures)
    s = run.summary
    print(run.dir)
    print(_one_line_summary(s))
    if interrupted or s["status"] == "interrupted":
        return 130
    if s["status"] == "diverged":
        print(f"run diverged at step {s.get('diverged_step')}: the loss or parameters became non-finite "
              f"(try a smaller optim.lr, train.normalize_targets=true or optim.clip_grad_norm)", file=sys.stderr)
        return 3
    if s["status"] == "failed":
        print(f"run failed: {s.get('error')}", file=sys.stderr)
        return 1
    return 0


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _one_line_summary(s: dict) -> str:
    final = s.get("final") or {}
    params = " ".join(f"{k}={_fmt(v)}" for k, v in (s.get("params") or {}).items())
    return (f"{s['status']}  loss={_fmt(final.get('loss/train'))}  gap={_fmt(final.get('convergence/gap'))}  "
            f"{params}  steps_to_converge={_fmt(s.get('steps_to_converge'))}").rstrip()


def _sweep(args) -> int:
    from lab import rundir, study  # noqa: PLC0415

    cfg, sweep, runs_dir = _setup(args, sweep_words=True)
    name = args.name or cfg.name
    rundir.check_name(name)
    sweep_dir = runs_dir / name
    grid = study.expand(cfg, sweep)
    runs = [study.Run(config=c, name=study.run_name(c, swept), swept=swept) for c, swept in grid]
    todo = runs
    if args.resume and sweep_dir.exists():
        todo = _resume(runs, sweep_dir)
        print(f"resume: {len(runs) - len(todo)} of {len(runs)} runs already completed", file=sys.stderr)
    progress = _Progress(len(todo))
    _, interrupted = study.execute(todo, sweep_dir, on_done=progress.done)
    progress.close()
    if len(todo):
        _sweep_figures(runs, sweep_dir)
    statuses = [r.summary["status"] for r in todo if r.summary]
    counts = {s: statuses.count(s) for s in dict.fromkeys(statuses)}
    print(f"{sweep_dir}: " + ", ".join(f"{v} {k}" for k, v in counts.items()) if counts else f"{sweep_dir}: nothing to do")
    if interrupted:
        return 130
    return 1 if "failed" in counts else 0


def _resume(runs, sweep_dir: Path):
    """Match runs to existing directories by name; reuse those not completed, skip completed ones."""
    from lab import rundir  # noqa: PLC0415

    todo = []
    for r in runs:
        d = sweep_dir / r.name
        if d.is_dir():
            s = rundir.read_summary(d)
            if s.get("status") == "completed":
                r.summary, r.dir = s, d
                continue
            for f in d.glob("events.out.tfevents.*"):  # a fresh start: no duplicate steps in TensorBoard
                f.unlink()
            r.dir = d
        todo.append(r)
    return todo


def _sweep_figures(runs, sweep_dir):
    """Comparison figures once per sweep (not per run)."""
    try:
        from lab import figures  # noqa: PLC0415
        figures.sweep_figures(runs, sweep_dir)
    except Exception as e:  # noqa: BLE001 — a figure never costs the results
        print(f"note: sweep figures skipped: {e.__class__.__name__}: {e}", file=sys.stderr)


class _Progress:
    """A bar when stdout is a terminal; one line per finished run otherwise."""

    def __init__(self, total: int):
        self.total, self.count, self.tty = total, 0, sys.stdout.isatty()

    def done(self, run):
        self.count += 1
        if self.tty:
            width = 30
            filled = int(width * self.count / max(self.total, 1))
            print(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.count}/{self.total}", end="", flush=True)
        else:
            print(f"{run.summary['status']:<11} {run.dir}  {_one_line_summary(run.summary)}", flush=True)

    def close(self):
        if self.tty and self.total:
            print()
