"""lab.bench_table: the benchmark's figures as the README's table, and the issue's targets."""

import json
from pathlib import Path

import pytest

from lab import bench_table

ROOT = Path(__file__).resolve().parents[1]


def test_the_saved_cpu_table_is_the_rendering_of_the_saved_figures():
    # experiments/bench/cpu.md (in the README) must be what the saved cpu.json renders to: the table
    # cannot drift from the measured figures. (cuda.md came from an earlier version of the table.)
    fig = json.loads((ROOT / "experiments/bench/cpu.json").read_text())
    assert bench_table.markdown(fig) == (ROOT / "experiments/bench/cpu.md").read_text()
    assert (ROOT / "experiments/bench/cpu.md").read_text().strip() in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("speedup,every,expect_missed", [(60.0, 0.2, []), (40.0, 0.2, ["speedup"]),
                                                         (60.0, 0.9, ["every-step logging overhead"])])
def test_targets_are_reported_as_met_or_missed(speedup, every, expect_missed):
    fig = {"speedup": speedup, "logging_overhead_default": 0.05, "logging_overhead_every_step": every,
           "single_run_ratio": 0.4, "scale_10k_s": 250.0}
    met, missed = bench_table.targets_met(fig)
    assert [m.split(" (")[0] for m in missed] == expect_missed
    assert len(met) + len(missed) == 5
    assert all("vs" in m for m in met + missed)


def test_the_overheads_show_the_range_of_their_repeats():
    # Three repeats, each mode's study against the logging-off study of the same repeat: default
    # 2.2/2.0, 2.4/2.0, 3.0/2.5 -> +10%, +20%, +20%; the median (the figure) lies inside the range shown.
    runs = {"off": [2.0, 2.0, 2.5], "default": [2.2, 2.4, 3.0]}
    assert bench_table._spread({"logging_execute_s_all": runs}, "default") == "; repeats +10% to +20%"
    assert bench_table._spread({"logging_execute_s_all": {"off": [2.0], "default": [2.2]}}, "default") == ""
    assert bench_table._spread({}, "every_step") == ""  # figures saved before the repeats were kept


def test_seconds_added_keep_their_sign():
    # On the GPU the default cadence once measured 0.01 s less than logging off (noise): the table
    # wrote "+-0.01 s".
    fig = json.loads((ROOT / "experiments/bench/cpu.json").read_text())
    fig["logging_added_s"]["default"] = {"study": -0.01, "train": 0.09}
    table = bench_table.markdown(fig)
    assert "default -0.01 s, of which +0.09 s in training" in table and "+-" not in table
