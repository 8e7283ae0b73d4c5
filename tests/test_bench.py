"""Tests for lab.bench (scripts/bench): it runs end to end on a small study, writes every figure the
issue asks for, compares the same runs with the usual loop, and reports its targets truthfully.
No timing is asserted (speed is measured by the benchmark, never by tests)."""

import json

import pytest

from lab import bench

REQUIRED = ("speedup", "same_final_params", "logging_overhead_default", "logging_overhead_every_step",
            "single_run_ratio", "scale_10k_s", "scale_10k_peak_mb", "machine")


def test_a_small_benchmark_writes_every_figure(tmp_path):
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    code = bench.main(["--seeds", "1", "--steps", "30", "--baseline-runs", "10", "--scale-runs", "40",
                       "--repeats", "1", "--out", str(out), "--markdown", str(md)])
    assert code == 0
    fig = json.loads(out.read_text())
    assert set(REQUIRED) <= set(fig)
    assert fig["runs"] == 20 and fig["lab_runs_completed"] == 20 and fig["baseline_runs"] == 10
    # the usual loop (nn.Linear + torch.optim.SGD + autograd) and the lab reach the same parameters
    assert fig["same_final_params"] is True
    assert fig["scale_runs"] == 40 and fig["scale_10k_s"] > 0
    assert {"cores", "cpu", "torch"} <= set(fig["machine"])
    # on a CPU both cadences are timed again with the rows in the training process
    assert fig["logging_overhead_default_in_loop"] > -1 and fig["logging_overhead_every_step_in_loop"] > -1
    # where the overhead goes: a study-level figure and the part inside the trainer, for each logged mode
    assert set(fig["logging_added_s"]) == {"default", "every_step", "default_in_loop", "every_step_in_loop",
                                           "every_step_free_rows"}
    assert fig["logging_overhead_every_step_free_rows"] > -1
    assert all(set(v) == {"study", "train"} for v in fig["logging_added_s"].values())
    assert len(fig["logging_execute_s_all"]["off"]) == len(fig["logging_train_s_all"]["every_step"]) == 1
    text = md.read_text()
    from lab import row_worker
    if row_worker._cores() >= 2 and hasattr(__import__("os"), "fork"):  # training alone and beside busy rows, in turns
        core = fig["second_core"]
        assert len(core["alone_s"]) == len(core["beside_s"]) == 3 and min(core["alone_s"] + core["beside_s"]) > 0
        assert min(core["busy_cpu_s"]) > 0.5 * min(core["beside_s"])  # the busy process computed rows throughout
        assert core["slowdown"] == pytest.approx(sorted(b / a for a, b in zip(core["alone_s"], core["beside_s"]))[1] - 1)
        assert "| training beside log rows on the second core" in text
    assert "| speedup |" in text and ("Targets met:" in text or "Not met:" in text)
    assert "rows in the training process: " in text and "of which +" in text and "rows' sums free: " in text
    assert text.startswith("Measured by `scripts/bench` on ") and " cores, " in text.splitlines()[0]


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="a row worker needs fork")
def test_a_study_process_reports_its_row_worker(tmp_path):
    # LAB_ROW_WORKER reaches the study's process: with 1 a worker runs (and its memory is counted), with 0 none.
    flat = {**bench.study_flat(steps=30), "data.n": 100}
    forced = bench.run_study(flat, bench.study_sweep(1), tmp_path / "w1", None, {"LAB_ROW_WORKER": "1"})
    none = bench.run_study(flat, bench.study_sweep(1), tmp_path / "w0", None, {"LAB_ROW_WORKER": "0"})
    assert forced["completed"] == none["completed"] == 20
    assert forced["worker_private_mb"] > 0 and none["worker_private_mb"] == 0


@pytest.mark.parametrize("worker", ["0", "1"])
def test_a_study_process_with_free_rows_logs_placeholder_sums(tmp_path, worker):
    # The floor of logging's cost ("rows' sums free"): every row is answered with sums of ones, in the loop
    # or by the worker. Expected: val_mse is then the placeholder sum over n_val = 200 points (1 / 200) for
    # every run, where the same study with real rows logs each run's own validation error.
    if worker == "1" and not hasattr(__import__("os"), "fork"):
        pytest.skip("a row worker needs fork")
    flat = {**bench.study_flat(steps=30), "data.n": 100}
    env = {"LAB_ROW_WORKER": worker}
    free = bench.run_study(flat, bench.study_sweep(1), tmp_path / "free", None, env, free_rows=True)
    real = bench.run_study(flat, bench.study_sweep(1), tmp_path / "real", None, env)
    assert free["completed"] == real["completed"] == 20
    assert (free["worker_private_mb"] > 0) == (real["worker_private_mb"] > 0) == (worker == "1")

    def val_mse(folder):
        return [json.loads(p.read_text())["final"]["loss/val_mse"] for p in folder.rglob("summary.json")]

    assert val_mse(tmp_path / "free") == [pytest.approx(1 / 200, rel=1e-6)] * 20
    real_values = val_mse(tmp_path / "real")
    assert len(set(real_values)) == 20 and all(v != pytest.approx(1 / 200, rel=1e-6) for v in real_values)


def test_bad_arguments_are_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--seeds", "many"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert bench.main(["--seeds", "0"]) == 2


def test_a_benchmark_killed_in_its_scale_point_keeps_what_it_measured(tmp_path, monkeypatch):
    # SIGTERM (as `timeout` sends) arrives while the scale point runs: the figures measured before it are
    # on disk, the table says the scale point did not finish, the temporary run directories are gone,
    # and the process's own SIGTERM handler is back.
    import os
    import signal
    import tempfile

    real = bench.run_study

    def run_study(flat, sweep, runs_dir, threads, env=None, free_rows=False):
        if runs_dir.name == "scale":
            os.kill(os.getpid(), signal.SIGTERM)
        return real(flat, sweep, runs_dir, threads, env, free_rows)

    monkeypatch.setattr(bench, "run_study", run_study)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    before = signal.getsignal(signal.SIGTERM)
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    with pytest.raises(SystemExit) as stopped:
        bench.main(["--seeds", "1", "--steps", "20", "--scale-runs", "40", "--repeats", "1", "--out", str(out),
                    "--markdown", str(md)])
    assert stopped.value.code == 128 + signal.SIGTERM
    fig = json.loads(out.read_text())
    assert fig["pending"] == ["scale"] and fig["scale_10k_s"] is None and fig["speedup"] > 0
    assert "| 10,000 runs, fully logged | not finished |" in md.read_text()
    # The benchmark's run directories are gone. (torch may make its compile cache, torchinductor_<user>,
    # in the same temporary folder when the test runs alone: not the benchmark's to remove.)
    assert list((tmp_path / "tmp").glob("lab-bench-*")) == []
    assert signal.getsignal(signal.SIGTERM) is before
