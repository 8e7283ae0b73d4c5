"""The `lab` commands that train: `lab run` (one config) and `lab sweep` (a grid of them, with --resume).

Both read a TOML config and KEY=VALUE words (`split_values`, `_load`), check everything a run needs
before anything is written or trained (names, device, memory, data, the runs directory), train
through lab.study and print one line per run. Bad input raises ConfigError: lab.cli prints it as one
line and exits 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lab.config import ConfigError


def split_values(text: str) -> list[str]:
    """'mse,mae' -> ['mse', 'mae']; commas inside [...] or quotes do not split: '[32],[64,64]' -> 2 values."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def _load(args, sweep_words: bool):
    """The base config and its sweep (KEY=V1,V2 words sweep in `lab sweep`)."""
    from lab import config

    fixed, swept, given = [], {}, {}
    for word in args.overrides:
        key, eq, text = word.partition("=")
        if eq and key.strip() in given:  # which of the two would win is a guess: ask for one
            raise ConfigError(f"{key.strip()} is given twice on the command line ({given[key.strip()]} and {word})")
        given[key.strip()] = word
        values = split_values(text) if eq else [text]
        if len(values) > 1 and not sweep_words:
            raise ConfigError(f"{word}: several values; lab run trains one config (lab sweep trains each value)")
        if len(values) > 1:
            swept[key.strip()] = [config.parse_word(v) for v in values]
        else:
            fixed.append(word)
    return config.load(args.config, fixed, sweep=swept)


def _check_before_training(cfgs, names: list[str]) -> None:
    """Names, device and memory: the first checks, before anything is written or trained."""
    from lab import rundir, sweeps, trainer

    for name in names:
        rundir.check_name(name)
    for device in dict.fromkeys(c.device for c in cfgs):
        trainer.resolve_device(device)  # a clear ValueError for device=cuda without a GPU
    sweeps.check_fits(list(cfgs))  # before a sweep directory is made: a refused study leaves nothing behind


def _check_data_and_runs_dir(todo, runs_dir: Path, prefix: str = "") -> None:
    """The data of the runs to train, then the runs directory: the last checks before anything is written.

    Each dataset is drawn here, once: training reuses it. Data its dtype cannot hold is bad input
    (one line, exit 2), not a failed run: the same draw would overflow on every try.
    """
    from lab import data, rundir, study

    try:
        study.draw_data(todo)  # after check_fits: data too large for memory is refused, not drawn
    except data.DataRangeError as e:
        raise ConfigError(f"{prefix}{e}; nothing was trained") from None
    rundir.check_writable(runs_dir)  # makes runs_dir: only once the input is accepted


def _note_device(cfgs) -> None:
    """Said only once the input is accepted, so that refused input stays one line on stderr."""
    if any(c.device == "auto" for c in cfgs) and not _cuda():
        print("note: device=auto found no CUDA GPU; training on the CPU", file=sys.stderr)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run(args) -> int:
    from lab import config

    if args.config:
        refuse_claim_study(args.config)
    cfg, sweep = _load(args, sweep_words=False)
    # after the config is read: a missing file or a typo fails without the torch import
    from lab import study, sweeps
    if sweep:
        try:
            config.validate(cfg)
        except config.ConfigError as e:
            raise config.ConfigError(f"{e} (this file has a [sweep] table: train it with lab sweep)") from None
    runs_dir = Path(args.runs_dir)
    name = args.name or cfg.name
    run = sweeps.Run(config=cfg, name=name)
    _check_before_training([cfg], [name])
    _check_data_and_runs_dir([run], runs_dir)
    if sweep:
        print(f"note: {args.config} has a [sweep] table; lab run trains only its base config "
              f"(lab sweep trains the grid)", file=sys.stderr)
    _note_device([cfg])
    _, interrupted = study.execute([run], runs_dir, figures=cfg.train.figures and not args.no_figures)
    s = run.summary
    print(run.dir)
    print(one_line_summary(s))
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


def one_line_summary(s: dict) -> str:
    """status, final loss, gap to the exact optimum, fitted parameters, steps to converge."""
    from lab.rundir import fmt

    final = s.get("final") or {}
    params = " ".join(f"{k}={fmt(v)}" for k, v in (s.get("params") or {}).items())
    line = (f"{s['status']}  loss={fmt(final.get('loss/train'))}  gap={fmt(final.get('convergence/gap'))}  "
            f"{params}  steps_to_converge={fmt(s.get('steps_to_converge'))}")
    if s.get("error"):
        line += f"  error: {s['error']}"
    return line


def sweep(args) -> int:
    from lab import rundir

    study_file = _claim_study(args.config)
    if study_file is not None:  # experiments/*.toml: its grid (with [[sweep]] blocks) comes from the study
        cfg, runs = _study_runs(study_file, args)
    else:
        cfg, sweep = _load(args, sweep_words=True)
        from lab import sweeps  # after the config is read, as in _run
        runs = sweeps.sweep_runs(cfg, sweep)
    from lab import study
    runs_dir = Path(args.runs_dir)
    name = args.name or cfg.name
    _check_before_training([r.config for r in runs], [name] + [r.name for r in runs])
    sweep_dir = runs_dir / name
    if args.resume and sweep_dir.exists() and not sweep_dir.is_dir():
        raise ConfigError(f"resume: {sweep_dir} is not a sweep directory (a file has that name)")
    resume = args.resume and sweep_dir.exists()
    todo = _resume(runs, sweep_dir) if resume else runs
    # Data that overflows refuses the whole sweep, as any other bad value does: such a run could only
    # ever fail, the fix is a different value in the grid, and a refusal costs no training.
    _check_data_and_runs_dir(todo, runs_dir, prefix="sweep: ")
    _note_device([r.config for r in runs])
    if resume:
        for r in todo:
            if r.dir is not None:  # a fresh start: no duplicate steps in TensorBoard
                for f in r.dir.glob("events.out.tfevents.*"):
                    f.unlink()
        print(f"resume: {len(runs) - len(todo)} of {len(runs)} runs already completed in {sweep_dir}", file=sys.stderr)
    else:
        # A new sweep never writes into an existing one: runs/<name>-2, -3, ... (--resume continues one).
        sweep_dir = rundir.create(runs_dir, name)
    progress = _Progress(len(todo))
    _, interrupted = study.execute(todo, sweep_dir, on_done=progress.done)
    progress.close()
    if todo and cfg.train.figures:
        _sweep_figures(runs, sweep_dir)
    statuses = [r.summary["status"] for r in todo if r.summary]
    counts = {s: statuses.count(s) for s in dict.fromkeys(statuses)}
    done = ", ".join(f"{v} {k}" for k, v in counts.items()) if counts else "nothing to do"
    print(f"{sweep_dir}: {len(runs)} runs; trained now: {done}")
    if interrupted:
        return 130
    return 1 if "failed" in counts else 0


def refuse_claim_study(path: str) -> None:
    """lab run and lab config read run configs: a claim study is trained by lab sweep or lab claims."""
    if _claim_study(path) is not None:
        raise ConfigError(f"{path} is a claim study, not a run config: lab sweep {path} trains its grid, "
                         f"lab claims measures every claim")


def _claim_study(path: str) -> Path | None:
    """The path if it is a claim study (a TOML file with a [claim] table), else None."""
    from lab import config

    table = config.read_toml(path)
    return Path(path) if isinstance(table.get("claim"), dict) else None


def _study_runs(path: Path, args):
    """The runs of a claim study's grid, with fixed KEY=VALUE overrides applied to every run."""
    from lab import claim_studies, config, sweeps

    if any(len(split_values(w.partition("=")[2])) > 1 for w in args.overrides):
        raise ConfigError(f"{path} is a claim study: its sweep is in the file; give single values only")
    fixed = config.parse_overrides(args.overrides)
    st = claim_studies.load_study(path)
    if not st.grid:
        raise config.ConfigError(f"{path} trains nothing: measure '{st.measure}' measures the loss functions only; "
                                 f"run lab claims")
    # A fixed value of a key the study sweeps drops that key from the sweep, as in any config: the runs it
    # made identical are one run (they were trained once each, as name-2, name-3, ..., with the swept value
    # they no longer had recorded).
    grid, seen = [], set()
    for cfg, swept in st.grid:
        cfg = config.from_flat({**config.to_flat(cfg), **fixed})
        if repr(cfg) not in seen:
            seen.add(repr(cfg))
            grid.append((cfg, {k: v for k, v in swept.items() if k not in fixed}))
    runs = sweeps.name_runs(grid)
    base = config.from_flat({"name": path.stem})
    return base, runs


def _resume(runs, sweep_dir: Path):
    """Match runs to existing directories by name; skip completed ones, retrain the others in place.

    A completed run trained from a different config is an error: resuming would mix two studies.
    Only reads: the caller clears the old event files once every check has passed.
    """
    from lab import config, rundir

    if (sweep_dir / rundir.SUMMARY).exists():
        raise ValueError(f"{sweep_dir} is a run directory, not a sweep directory; use another --name")
    todo = []
    for r in runs:
        d = sweep_dir / r.name
        if d.exists() and not d.is_dir():  # (else every resume would train the run anew into name-2, -3, ...)
            raise ValueError(f"--resume: {d} is a file, not the run's directory; move it away or use another --name")
        if d.is_dir():
            s = rundir.read_summary(d)
            # (a completed summary without its config cannot vouch for the run: it is trained again)
            if s.get("status") == "completed" and isinstance(s.get("config"), dict):
                _check_same_config(d, s["config"], rundir.jsonable(rundir.config_values(config.to_flat(r.config))))
                r.summary, r.dir = s, d
                continue
            r.dir = d
        todo.append(r)
    return todo


def _check_same_config(run_dir: Path, old: dict, new: dict) -> None:
    from lab.config import NEUTRAL_KEYS

    differ = [k for k in sorted(set(old) | set(new)) if k not in NEUTRAL_KEYS and old.get(k) != new.get(k)]
    if differ:
        k = differ[0]
        raise ValueError(f"--resume: {run_dir} was trained with {k} = {old.get(k)!r}, the config now says "
                         f"{new.get(k)!r}; start a new sweep (without --resume) or use another --name")


def _sweep_figures(runs, sweep_dir):
    """Comparison figures once per sweep (not per run)."""
    try:
        from lab import figures
        figures.sweep_figures(runs, sweep_dir)
    except Exception as e:  # noqa: BLE001 — a figure never costs the results
        print(f"note: sweep figures skipped: {e.__class__.__name__}: {e}", file=sys.stderr)


class _Progress:
    """A bar when stdout is a terminal; one line per finished run otherwise (logs, pipes, CI)."""

    def __init__(self, total: int, stream=None):
        self.stream = stream or sys.stdout  # (None where the command started with stdout closed)
        self.total, self.count = total, 0
        self.tty = self.stream is not None and self.stream.isatty()

    def done(self, run):
        self.count += 1
        try:
            if self.stream is None:
                return
            if self.tty:
                width = 30
                filled = int(width * self.count / max(self.total, 1))
                print(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.count}/{self.total} {run.name:<40.40}",
                      end="", flush=True, file=self.stream)
            else:
                print(f"[{self.count}/{self.total}] {run.dir}  {one_line_summary(run.summary)}", flush=True,
                      file=self.stream)
        except OSError:  # a reader that left (`| head`), a full disk: the progress stops, never the study
            self.stream = None

    def close(self):
        if self.tty and self.total and self.stream is not None:
            print(file=self.stream)
