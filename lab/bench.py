"""How fast a study runs, measured against the usual PyTorch loop (`scripts/bench`; not a timed test).

The study: 5 losses (mse, mae, huber, log_cosh, quantile) x 4 datasets (clean, outliers, heavy_tailed,
skewed) x 10 seeds = 200 runs of a linear model, n = 1000, 2000 full-batch SGD steps, every scalar tag
every 10 steps, histograms every 200. Measured:

- lab: the whole study through `lab.study.execute` in a fresh Python process (interpreter start,
  imports, datasets, exact references, training, event files, run directories, summaries): the
  process's wall time, start-up included, and its peak resident memory.
- baseline, in this process: the usual loop per run (lab.usual_loop.run) on the same data from the
  same initial parameters: `nn.Linear`, the lab's loss module, `torch.optim.SGD`, autograd, `loss.item()` every
  step for the convergence and oscillation windows, every tag computed per run with `.item()` and
  written with `torch.utils.tensorboard.SummaryWriter.add_scalar` at the same steps, histograms with
  `add_histogram`. It runs on a subset of the runs (at least 10, every loss and dataset) and its time
  per run is scaled linearly to the study; its final parameters must equal the lab's (float32).
- logging overhead: the same study with logging off (`train.log_every = 0`: no metric rows, no
  scalar or histogram events; run directories, config, hparams and summaries are still written)
  and with every tag logged every step; overheads are relative to logging off, on the study's
  in-process time (imports and interpreter start excluded, so they are not diluted), the median over
  repeats of each repeat's ratio (the modes of a repeat run back to back, in an order that rotates
  from repeat to repeat). On a CPU both cadences are also timed with every log row computed in the training process (LAB_ROW_WORKER=0),
  to show what the row worker on the second core (lab.row_worker) buys, and every step with the rows'
  sums free (`_free_rows`: every row answered at once with placeholder sums, in the loop or by the
  worker): the floor of what logging every step costs the training process whatever computes the rows
  (the tags, the histories, the event records, the files).
- single run: one run as a population of one (lab.trainer.train) against the hand-written minimal
  loop (lab.usual_loop.minimal: nn.Linear, loss, backward, SGD step; no logging), per loss.
- second core (CPU): the population trained with logging off, alone and beside a process that
  computes log rows on the other core, in turns: what a busy row worker costs the training process
  on this machine, whatever is moved to it.
- scale: 10,000 runs of the same kind (500 seeds), fully logged, each with its own run directory.

The comparisons (the usual loop and its parameters, single runs, torch.compile, the second core) are
measured by lab.bench_comparisons, the table rendered by lab.bench_table.

`python -m lab.bench --out bench.json --markdown bench.md` writes the figures as JSON and as a
Markdown table; `--device cuda` runs everything on the GPU; `--threads N` fixes torch's intra-op
threads in every process (default: torch's choice).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lab.bench_comparisons import compare_params, compiled_population, run_baseline, second_core, single_runs
from lab.bench_table import markdown  # the figures as the README's table, with the targets

LOSSES = ("mse", "mae", "huber", "log_cosh", "quantile")
DATASETS = ("clean", "outliers", "heavy_tailed", "skewed")


def study_flat(device: str = "cpu", steps: int = 2000, n: int = 1000, log_every: int = 10) -> dict:
    """The fixed part of the benchmark study's config (dotted keys)."""
    return {"name": "bench", "device": device, "dtype": "float32", "data.n": n, "train.steps": steps,
            "train.log_every": log_every, "train.hist_every": 200, "train.figures": False,
            "optim.name": "sgd", "optim.lr": 0.05}


def study_sweep(seeds: int = 10) -> dict:
    return {"loss.name": list(LOSSES), "data.kind": list(DATASETS), "seed": list(range(seeds))}


def study_runs(flat: dict, sweep: dict) -> list:
    """The study's runs (lab.sweeps.Run), named as `lab sweep` names them. log_every 0 means logging off."""
    from lab import sweeps

    off = flat.get("train.log_every") == 0
    runs = sweeps.sweep_runs({**flat, "train.log_every": 10} if off else flat, sweep)
    if off:  # not a config value users set: the benchmark's "logging off"
        for r in runs:
            r.config = dataclasses.replace(r.config, train=dataclasses.replace(r.config.train, log_every=0))
    return runs


# ---------------------------------------------------------------------------------------------------
# The lab: a fresh process running the study, start-up included.


def _child(spec_path: str) -> None:
    """Body of `python -m lab.bench --child SPEC`: run the study, write timings and peak memory."""
    t0 = time.perf_counter()
    spec = json.loads(Path(spec_path).read_text())
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    from lab import study

    t_import = time.perf_counter() - t0
    if spec.get("free_rows"):
        _free_rows()
    worker_mb = _measure_row_workers()
    runs = study_runs(spec["flat"], spec["sweep"])
    t1 = time.perf_counter()
    _, interrupted = study.execute(runs, Path(spec["runs_dir"]))
    t_execute = time.perf_counter() - t1
    statuses = [r.summary["status"] for r in runs]
    out = {"import_s": t_import, "execute_s": t_execute, "runs": len(runs), "interrupted": interrupted,
           "completed": statuses.count("completed"), "peak_rss_mb": _peak_rss_mb(),
           "worker_private_mb": worker_mb[0],
           "train_s": sum(r.summary.get("wall_s", 0.0) for r in runs)}
    if spec["flat"]["device"] == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    Path(spec["result"]).write_text(json.dumps(out))


def _free_rows() -> None:
    """Make every log row's sums free in this process (and in a row worker it forks): each row is answered at
    once with sums of ones (and histograms of ones) instead of lab.log_row.row_sums. The values logged
    are placeholders; what is timed is everything else logging does."""
    import torch

    from lab import log_row, row_worker

    def answered_at_once(pop, e, psi, P, histograms, chain, psi_out=None, e_out=None):
        sums = torch.ones(log_row.row_sums_size(pop), P.shape[0], dtype=P.dtype, device=P.device)
        return sums, (torch.ones(log_row.row_histograms_shape(pop), dtype=P.dtype, device=P.device)
                      if histograms else None)

    row_worker._compute = answered_at_once


def _measure_row_workers() -> list[float]:
    """[the largest private memory of a log-row worker (lab.row_worker) in MB, read as it ends]: what a
    worker adds to the study's memory. Its resident memory would mostly count pages it shares with the
    training process (copy on write since the fork); its private pages are its own allocations and the
    old copies of pages the training process has written since. 0: no worker ran."""
    from lab import row_worker

    largest, close = [0.0], row_worker.Rows.close

    def close_measured(rows):
        if rows.pid is not None:
            largest[0] = max(largest[0], _private_mb(rows.pid))
        close(rows)

    row_worker.Rows.close = close_measured
    return largest


def _private_mb(pid: int) -> float:
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:  # not Linux: no worker runs there
        return 0.0
    return sum(int(line.split()[1]) for line in lines if line.startswith(("Private_Clean:", "Private_Dirty:"))) / 1024


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_study(flat: dict, sweep: dict, runs_dir: Path, threads: int | None, env: dict | None = None,
              free_rows: bool = False) -> dict:
    """Time the study in a fresh interpreter: wall time from spawn to exit, plus the child's own figures.
    env: environment variables for that interpreter on top of this one's (LAB_ROW_WORKER); free_rows:
    the log rows' sums cost nothing there (`_free_rows`)."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    spec = runs_dir / "bench-spec.json"
    result = runs_dir / "bench-result.json"
    spec.write_text(json.dumps({"flat": flat, "sweep": sweep, "runs_dir": str(runs_dir), "threads": threads,
                                "result": str(result), "free_rows": free_rows}))
    if hasattr(os, "sync"):
        # The study syncs its files before writing summaries (lab.study), and a sync also writes back what
        # earlier measurements left in the page cache (an every-step study leaves ~200 MB): start clean.
        os.sync()
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lab.bench", "--child", str(spec)], capture_output=True, text=True,
                          check=False, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"study process failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    out = json.loads(result.read_text())
    out["wall_s"] = wall
    return out


def machine(device: str) -> dict:
    import torch

    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "cpu": model, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "train_threads": 1 if device == "cpu" else None,  # lab.trainer.train trains on one CPU thread
            "python": platform.python_version()}
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr and exit code 2, not argparse's usage block
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="scripts/bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench.json", help="write the figures here as JSON (default: bench.json)")
    p.add_argument("--markdown", help="also write the figures as a Markdown table")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, help="torch intra-op threads in every process (default: torch's)")
    p.add_argument("--seeds", type=int, default=10, help="seeds per loss and dataset (default 10: 200 runs)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--baseline-runs", type=int, default=10, help="runs of the usual loop, scaled up (>= 10)")
    p.add_argument("--scale-runs", type=int, default=10_000, help="runs of the scale point (0: skip)")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats of the lab study (best counts)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the population step")
    p.add_argument("--keep", help="keep the run directories below this directory")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args.child)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # as the `lab` command exits (lab.cli.entry): no interpreter teardown
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("error: --device cuda: no CUDA GPU is available", file=sys.stderr)
            return 2
    if args.seeds < 1 or args.steps < 1 or args.baseline_runs < 1 or args.repeats < 1 or args.scale_runs < 0:
        print("error: --seeds, --steps, --baseline-runs and --repeats must be >= 1, --scale-runs >= 0",
              file=sys.stderr)
        return 2
    for path in filter(None, (args.out, args.markdown)):  # fail now, not after minutes of measuring
        parent = Path(path).resolve().parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            print(f"error: cannot write {path}: {parent} is not a writable directory", file=sys.stderr)
            return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lab-bench-"))

    def save(fig: dict) -> None:
        # After each stage, so that a benchmark stopped in its scale point or its compile keeps the rest.
        Path(args.out).write_text(json.dumps(fig, indent=2) + "\n")
        if args.markdown:
            Path(args.markdown).write_text(markdown(fig))

    # A `timeout` or a kill ends the benchmark through SystemExit, so the temporary run directories go too.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        fig = _measure(args, root, save)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(markdown(fig))
    print(f"figures written to {args.out}")
    return 0


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _measure(args, root: Path, save) -> dict:
    flat, sweep = study_flat(args.device, args.steps), study_sweep(args.seeds)
    n_runs = len(LOSSES) * len(DATASETS) * args.seeds
    # The logging modes take turns, repeat after repeat, so that a slow spell of a shared machine falls on
    # all of them rather than on one; the overheads are medians of each repeat's paired figures (`paired`).
    # On a CPU, also with every log row computed in the training process (LAB_ROW_WORKER=0): what the
    # row worker (lab.row_worker) buys. On a GPU no worker runs, so those modes would repeat the others.
    # Also on a CPU: every step with the rows' sums free (`_free_rows`), the floor of the rest of logging.
    modes = [("off", 0, None), ("every_step", 1, None)]
    if args.device == "cpu":
        in_loop = {"LAB_ROW_WORKER": "0"}
        modes += [("default_in_loop", flat["train.log_every"], in_loop), ("every_step_in_loop", 1, in_loop),
                  ("every_step_free_rows", 1, None)]
    # The order rotates from repeat to repeat, so that no mode always follows the same one: on the 2-core
    # machine a study's non-training part (run directories, files, syncs) moved by up to 0.5 s with what
    # ran before it, as much as the overhead measured. The default study is also the lab's own timed run.
    labs, tries = [], {name: [] for name, _, _ in modes}
    turns = [("default", flat["train.log_every"], None), *modes]
    for i in range(args.repeats):
        order = turns[i % len(turns):] + turns[:i % len(turns)]
        _say(f"lab: {n_runs}-run study in a fresh process, logging {', '.join(m[0] for m in order)} "
             f"({i + 1}/{args.repeats})")
        for name, log_every, env in order:
            if name == "default":
                labs.append(run_study(flat, sweep, root / f"lab{i}", args.threads))
                continue
            tries[name].append(run_study({**flat, "train.log_every": log_every}, sweep, root / f"{name}{i}",
                                         args.threads, env, free_rows=name.endswith("_free_rows")))
    # Removed only now: on the 2-core machine (ext4 mounted with online discard) every study after a removal
    # of run directories spent up to 0.3 s more making its own (more after each removal, fading over
    # minutes once they stop), noise as large as the overhead measured.
    for name in tries:
        for i in range(args.repeats):
            shutil.rmtree(root / f"{name}{i}", ignore_errors=True)
    lab = min(labs, key=lambda r: r["wall_s"])
    lab_dir = root / f"lab{labs.index(lab)}"
    best = {name: min(runs, key=lambda r: r["execute_s"]) for name, runs in tries.items()}
    tries["default"] = labs

    def paired(name: str, of) -> float:
        # The median over repeats of of(mode's run, logging-off run) within each repeat: the modes of one
        # repeat run back to back, so a slow spell of a shared machine weighs on both sides, where the
        # best of each mode taken apart may come from different spells (on the 2-core machine that moved
        # the every-step figure by up to 40 points between benchmarks).
        return statistics.median(of(t, o) for t, o in zip(tries[name], tries["off"]))

    def overhead(name: str) -> float:  # relative, on the study's in-process time
        return paired(name, lambda t, o: t["execute_s"] / o["execute_s"] - 1)

    def seconds(name: str, part: str) -> float:  # what logging adds to a part of the study
        return paired(name, lambda t, o: t[part] - o[part])

    _say(f"baseline: the usual loop on {max(args.baseline_runs, 10)} runs")
    runs = study_runs(flat, sweep)
    baseline = run_baseline(runs, max(args.baseline_runs, 10), root / "baseline")
    same = compare_params(baseline, runs, lab_dir)
    _say("single run: population of one against the minimal loop")
    single = single_runs(flat, LOSSES)
    _say("second core: training alone, and beside a process computing log rows")
    core = second_core([r.config for r in study_runs({**flat, "train.log_every": 0}, sweep)])  # (None: GPU, 1 core)
    baseline_total = baseline["per_run_s"] * n_runs
    fig = {
        "device": args.device, "machine": machine(args.device), "runs": n_runs, "steps": args.steps,
        "lab_s": lab["wall_s"], "lab_import_s": lab["import_s"], "lab_execute_s": lab["execute_s"],
        "lab_train_s": lab["train_s"], "lab_runs_completed": lab["completed"],
        "lab_wall_s_all": [r["wall_s"] for r in labs],
        "lab_per_run_s": lab["wall_s"] / n_runs,
        "baseline_runs": baseline["runs"], "baseline_per_run_s": baseline["per_run_s"], "baseline_s": baseline_total,
        "baseline_note": f"the usual loop ran {baseline['runs']} of the {n_runs} runs; its time per run is "
                         f"scaled linearly to {n_runs} runs",
        "speedup": baseline_total / lab["wall_s"],
        "same_final_params": same["same"], "max_param_abs_diff": same["max_abs_diff"],
        "max_param_rel_diff": same["max_rel_diff"],
        "steps_per_s": n_runs * args.steps / lab["wall_s"],
        "peak_mb": lab["peak_rss_mb"],
        "logging_off_execute_s": best["off"]["execute_s"], "logging_every_step_execute_s": best["every_step"]["execute_s"],
        "logging_overhead_default": overhead("default"), "logging_overhead_every_step": overhead("every_step"),
        "logging_execute_s_all": {name: [r["execute_s"] for r in runs] for name, runs in tries.items()},
        "logging_train_s_all": {name: [r["train_s"] for r in runs] for name, runs in tries.items()},
        # where the overhead goes: seconds added to the study, and to it inside lab.trainer.train (rows,
        # histograms and the event encoding of the callbacks; the rest is run directories, files and syncs)
        "logging_added_s": {name: {"study": seconds(name, "execute_s"), "train": seconds(name, "train_s")}
                            for name in tries if name != "off"},
        "peak_worker_mb": lab["worker_private_mb"],
        "single_run": single["per_loss"], "single_run_ratio": single["ratio_off"],
        "single_run_ratio_logged": single["ratio_logged"],
        "scale_runs": None, "scale_10k_s": None, "scale_10k_peak_mb": None,
        "pending": [name for name, asked in (("scale", args.scale_runs), ("compile", args.compile)) if asked],
    }
    if core is not None:
        fig["second_core"] = core
    for name in ("default_in_loop", "every_step_in_loop", "every_step_free_rows"):
        if name in best:
            fig[f"logging_overhead_{name}"] = overhead(name)
    if args.device == "cuda":
        fig["peak_gpu_mb"] = lab.get("peak_gpu_mb")
    save(fig)
    if args.scale_runs:
        seeds = math.ceil(args.scale_runs / (len(LOSSES) * len(DATASETS)))
        _say(f"scale: {seeds * len(LOSSES) * len(DATASETS)} runs, fully logged")
        scale = run_study(flat, study_sweep(seeds), root / "scale", args.threads)
        fig.update(scale_runs=scale["runs"], scale_10k_s=scale["wall_s"], scale_10k_peak_mb=scale["peak_rss_mb"],
                   scale_completed=scale["completed"], scale_peak_worker_mb=scale["worker_private_mb"])
        if args.device == "cuda":
            fig["scale_peak_gpu_mb"] = scale.get("peak_gpu_mb")
        shutil.rmtree(root / "scale", ignore_errors=True)
        fig["pending"].remove("scale")
        save(fig)
    if args.compile:
        _say("torch.compile: the population step compiled (in process)")
        fig["compile"] = compiled_population([r.config for r in runs])
        fig["pending"].remove("compile")
        save(fig)
    return fig


if __name__ == "__main__":
    sys.exit(main())
