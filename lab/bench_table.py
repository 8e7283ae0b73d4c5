"""The figures of `scripts/bench` (lab.bench) as the README's Markdown table, and the issue's targets.

`markdown(fig)` renders the figures that `python -m lab.bench --out` writes as JSON, so a table can be
made again from saved figures without measuring anything; `scripts/readme --bench` puts the tables
into the README.
"""

from __future__ import annotations

TARGETS = {"speedup": 50.0, "logging_overhead_default": 0.10, "logging_overhead_every_step": 0.25,
           "single_run_ratio": 1.5, "scale_10k_s": 300.0}


def _spread(fig: dict, name: str) -> str:
    """'; repeats +a% to +b%': the smallest and largest of the repeats' paired overheads (mode / off - 1,
    within each repeat), which the median sums up; '' where the figures hold no repeats."""
    runs = fig.get("logging_execute_s_all", {})
    ratios = [t / o - 1 for t, o in zip(runs.get(name, []), runs.get("off", []))]
    return f"; repeats {min(ratios):+.0%} to {max(ratios):+.0%}" if len(ratios) > 1 else ""


def markdown(fig: dict) -> str:
    """The figures as a Markdown table (for the README's performance section)."""
    m = fig["machine"]
    where = f"{m['cores']} cores, {m['cpu']}" + (f", {m['gpu']}" if m.get("gpu") else "")
    study = f"{fig['runs']}-run study"
    split = (f"{fig['lab_import_s']:.1f} s imports, {fig['lab_execute_s']:.1f} s study "
             f"({fig['lab_train_s']:.1f} s in lab.trainer.train), rest: interpreter start and exit; "
             f"repeats: {', '.join(f'{t:.1f}' for t in fig['lab_wall_s_all'])} s")
    rows = [
        (f"{study}, lab (start-up included)", f"{fig['lab_s']:.1f} s ({fig['lab_s'] / fig['runs'] * 1e3:.1f} ms/run)"),
        (f"{study}, usual loop ({fig['baseline_runs']} runs timed, scaled to {fig['runs']})",
         f"{fig['baseline_s']:.0f} s ({fig['baseline_per_run_s'] * 1e3:.0f} ms/run)"),
        ("lab time split", split),
        ("speedup", f"{fig['speedup']:.0f}x (target >= {TARGETS['speedup']:.0f}x)"),
        ("same final parameters", f"{fig['same_final_params']} (max rel. diff {fig['max_param_rel_diff']:.1e})"),
        ("steps/s (runs x steps / lab time)", f"{fig['steps_per_s']:.3g}"),
        (f"peak memory, {study}", _memory(fig.get("peak_mb"), fig.get("peak_gpu_mb"), fig.get("peak_worker_mb"))),
        ("logging overhead vs logging off, default cadence (study time, median of repeats)",
         f"{fig['logging_overhead_default']:+.0%} (target <= 10%{_spread(fig, 'default')})"
         + _in_loop(fig, "default_in_loop")),
        ("logging overhead vs logging off, every tag every step (study time, median of repeats)",
         f"{fig['logging_overhead_every_step']:+.0%} (target <= 25%{_spread(fig, 'every_step')})"
         + _in_loop(fig, "every_step_in_loop") + _free_rows(fig)),
        ("single run / minimal loop (no logging)", f"{fig['single_run_ratio']:.2f}x (target <= 1.5x)"),
    ]
    if fig.get("logging_added_s"):
        added = fig["logging_added_s"]
        split_text = "; ".join(f"{label} {added[name]['study']:+.2f} s, of which {added[name]['train']:+.2f} s in training"
                          for name, label in (("default", "default"), ("every_step", "every step"),
                                              ("default_in_loop", "default, rows in the training process"),
                                              ("every_step_in_loop", "every step, rows in the training process"),
                                              ("every_step_free_rows", "every step, rows' sums free"))
                          if name in added)
        rows.insert(rows.index(next(r for r in rows if r[0].startswith("single run"))),
                    ("logging: seconds added to the study, and to lab.trainer.train (median of repeats)", split_text))
    if fig.get("second_core"):
        core = fig["second_core"]
        pairs = ", ".join(f"{a:.2f} -> {b:.2f} s" for a, b in zip(core["alone_s"], core["beside_s"]))
        rows.append(("training beside log rows on the second core (logging off; median of pairs, alone -> beside)",
                     f"{core['slowdown']:+.0%} ({pairs})"))
    if fig.get("scale_10k_s") is not None:
        memory = _memory(fig["scale_10k_peak_mb"], fig.get("scale_peak_gpu_mb"), fig.get("scale_peak_worker_mb"))
        scale = f"{fig['scale_10k_s']:.0f} s, {memory} peak (target < 300 s)"
        rows.append((f"{fig['scale_runs']:,} runs, fully logged", scale))
    if fig.get("compile"):
        c = fig["compile"]
        compiled = (f"eager {c['eager_s']:.1f} s, compiled {c['compiled_s']:.1f} s "
                    f"+ {c['compiled_first_s'] - c['compiled_s']:.1f} s compiling")
        rows.append(("torch.compile (200 runs, in process)", compiled))
    for stage in fig.get("pending", []):  # asked for, but the benchmark stopped before it ended
        rows.append(({"scale": "10,000 runs, fully logged", "compile": "torch.compile (200 runs, in process)"}[stage],
                     "not finished"))
    threads = f"{m['threads']} intra-op threads" + (" (training: 1)" if m.get("train_threads") == 1 else "")
    head = f"Measured by `scripts/bench` on {where}, torch {m['torch']}, {threads}, device {fig['device']}."
    lines = [head, "", "| measure | value |", "| --- | --- |"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    met, missed = targets_met(fig)
    notes = ("The usual loop is one `nn.Linear`, one `torch.optim.SGD` and one `SummaryWriter` per run, logging the "
             "same tags at the same steps, on the same data from the same initial parameters.")
    if fig["device"] == "cpu":
        notes += (" Training uses one intra-op thread on a CPU (two were up to 20x slower whenever another process "
                  "shared the cores), and the log rows' sums a second core (lab.row_worker); \"rows in the training "
                  "process\" is the same study with LAB_ROW_WORKER=0.")
        if "logging_overhead_every_step_free_rows" in fig:
            notes += (" \"Rows' sums free\" answers every row at once with placeholder sums: what logging every step "
                      "costs whatever computes the rows (tags, histories, event records, files), its floor on this "
                      "machine.")
        notes += " Timings on shared cores move by 10-30% between runs, the baseline's too."
    else:
        notes += (" Memory: the process's peak resident memory, then the GPU's peak allocated memory. The targets "
                  "are set for 2 CPU cores; on a GPU they are shown for comparison.")
    if met:
        notes += " Targets met: " + ", ".join(met) + "."
    if missed:
        notes += " Not met: " + ", ".join(missed) + "."
    return "\n".join(lines) + "\n\n" + notes + "\n"


def _memory(rss_mb: float, gpu_mb: float | None, worker_mb: float | None = None) -> str:
    worker = f" + {worker_mb:.0f} MB row worker (private)" if worker_mb else ""
    return f"{rss_mb:.0f} MB" + (f" + {gpu_mb:.0f} MB GPU" if gpu_mb is not None else "") + worker


def _free_rows(fig: dict) -> str:
    value = fig.get("logging_overhead_every_step_free_rows")
    if value is None:
        return ""
    spread = _spread(fig, "every_step_free_rows")  # "; repeats ...", here in parentheses of its own
    return f"; rows' sums free: {value:+.0%}" + (f" ({spread[2:]})" if spread else "")


def _in_loop(fig: dict, name: str) -> str:
    value = fig.get(f"logging_overhead_{name}")
    return "" if value is None else f"; rows in the training process: {value:+.0%}"


def targets_met(fig: dict) -> tuple[list[str], list[str]]:
    """The issue's targets, each as 'name (value vs target)', split into met and missed."""
    checks = [("speedup", fig["speedup"], ">=", TARGETS["speedup"], "{:.0f}x"),
              ("default logging overhead", fig["logging_overhead_default"], "<=", TARGETS["logging_overhead_default"],
               "{:+.0%}"),
              ("every-step logging overhead", fig["logging_overhead_every_step"], "<=",
               TARGETS["logging_overhead_every_step"], "{:+.0%}"),
              ("single run", fig["single_run_ratio"], "<=", TARGETS["single_run_ratio"], "{:.2f}x")]
    if fig.get("scale_10k_s") is not None:
        checks.append(("10,000 runs", fig["scale_10k_s"], "<", TARGETS["scale_10k_s"], "{:.0f} s"))
    met, missed = [], []
    for name, value, op, target, form in checks:
        ok = value >= target if op == ">=" else value <= target if op == "<=" else value < target
        (met if ok else missed).append(f"{name} ({form.format(value)} vs {op} {form.format(target)})")
    return met, missed
