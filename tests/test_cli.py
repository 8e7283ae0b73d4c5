"""The `lab` command line end to end: real subprocesses for the main paths, in-process for the error table.

A subprocess costs a Python start and a torch import (3-8 s on 2 cores), so only what needs a real
process (exit codes, stdout/stderr separation, no traceback) goes through one; the rest calls
`lab.cli.main` in this process, which is the same code the `lab` script runs.
"""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lab import cli, config, rundir, sweeps

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs").glob("*.toml"))

# Small and fast: 20 steps over 60 points, CPU, no figures (matplotlib costs more than the training).
TINY = """\
name = "tiny"
device = "cpu"
[data]
kind = "outliers"
n = 60
n_val = 30
[train]
steps = 20
log_every = 10
hist_every = 10
figures = false
"""


def lab(*words, cwd=None):
    """Run the real command line in a fresh process."""
    return subprocess.run([sys.executable, "-m", "lab", *map(str, words)], capture_output=True, text=True,
                          cwd=cwd, timeout=120, check=False)


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


def run_in_process(capsys, *words):
    rc = cli.main([str(w) for w in words])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Real processes: run, sweep, resume, report, and exit code 2 for bad input.


def test_run_trains_one_run_and_prints_its_directory_and_summary(tiny, tmp_path):
    res = lab("run", tiny, "loss.name=huber", "--runs-dir", tmp_path / "runs", "loss.delta=0.5")
    assert res.returncode == 0, res.stderr
    out = res.stdout.splitlines()
    run_dir = Path(out[0])
    assert run_dir == tmp_path / "runs" / "tiny"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 20
    assert summary["config"]["loss.delta"] == 0.5  # the override after --runs-dir was applied
    # The one-line summary shows the same numbers as summary.json.
    assert out[1].startswith("completed  loss=")
    assert f"slope={summary['params']['slope']:.4g}" in out[1]
    assert {p.name for p in run_dir.iterdir()} >= {"config.toml", "data.npz", "summary.json"}
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    # The saved config.toml loads back to the same config.
    again, _ = config.load(run_dir / "config.toml")
    assert config.to_flat(again) == summary["config"]


def test_sweep_2x2_writes_4_runs_and_resume_trains_nothing(tiny, tmp_path):
    runs = tmp_path / "runs"
    res = lab("sweep", tiny, "loss.name=mse,mae", "seed=0,1", "--runs-dir", runs)
    assert res.returncode == 0, res.stderr
    sweep_dir = runs / "tiny"
    names = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and p.name != "figures")
    assert names == ["outliers-mae-s0", "outliers-mae-s1", "outliers-mse-s0", "outliers-mse-s1"]
    summaries = [json.loads((sweep_dir / n / "summary.json").read_text()) for n in names]
    assert all(s["status"] == "completed" for s in summaries)
    assert all(s["population_size"] == 4 for s in summaries)  # one shared population
    assert {(s["swept"]["loss.name"], s["swept"]["seed"]) for s in summaries} == {
        ("mse", 0), ("mse", 1), ("mae", 0), ("mae", 1)}
    # Not a terminal: one line per finished run, then the total.
    lines = res.stdout.splitlines()
    assert [line.split()[0] for line in lines[:4]] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    assert lines[-1] == f"{sweep_dir}: 4 runs; trained now: 4 completed"

    stamps = {p: p.stat().st_mtime_ns for p in sweep_dir.rglob("*") if p.is_file()}
    again = lab("sweep", tiny, "loss.name=mse,mae", "seed=0,1", "--runs-dir", runs, "--resume")
    assert again.returncode == 0, again.stderr
    assert "resume: 4 of 4 runs already completed" in again.stderr
    assert again.stdout.strip() == f"{sweep_dir}: 4 runs; trained now: nothing to do"
    assert {p: p.stat().st_mtime_ns for p in sweep_dir.rglob("*") if p.is_file()} == stamps

    rep = lab("report", sweep_dir, "--by", "loss.name")
    assert rep.returncode == 0, rep.stderr
    rows = [line.split() for line in rep.stdout.splitlines()[2:]]
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [("mae", "2", "2", "completed"), ("mse", "2", "2", "completed")]
    # The mean of the mse group's final loss equals the mean of its two summaries.
    mse = [s["final"]["loss/train"] for s in summaries if s["swept"]["loss.name"] == "mse"]
    assert rows[1][4] == f"{sum(mse) / 2:.4g}"


# These fail before the torch import, so each process costs a fraction of a second.
@pytest.mark.parametrize("words,message", [
    (["run", "{dir}/missing.toml"], "config file not found"),
    (["run", "{bad}"], "line 2, column 9"),
    (["run", "{tiny}", "loss.detla=0.5"], "did you mean 'loss.delta'?"),
    (["report", "{dir}/nothing-here"], "is not a directory"),
    (["bogus"], "invalid choice: 'bogus'"),
])
def test_bad_input_exits_2_with_one_line_in_a_real_process(words, message, tiny, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[loss]\ndelta = \n")
    res = lab(*[w.format(dir=tmp_path, tiny=tiny, bad=bad) for w in words])
    assert res.returncode == 2
    assert message in one_error_line(res.stderr)
    assert res.stdout == ""


def test_help_reads_like_a_manual():
    res = lab("--help")
    assert res.returncode == 0
    for text in ("examples:", "lab sweep configs/outliers.toml loss.name=mse,mae,huber seed=0,1,2",
                 "lab report runs/outliers --by loss.name", "tensorboard --logdir runs", "exit codes:"):
        assert text in res.stdout
    # Every preset the help names exists.
    for word in res.stdout.split():
        if word.startswith("configs/"):
            assert (ROOT / word).exists(), word


# ---------------------------------------------------------------------------------------------
# In process: the table of bad inputs (same code path as the script), sweeps that fail or diverge.

BAD_INPUTS = [
    (["train.steps=abc"], "train.steps: expected an integer, got 'abc'"),
    (["optim.lr=nan"], "optim.lr: must be a finite number"),
    (["optim.lr=inf"], "optim.lr: must be a finite number"),
    (["optim.lr=-0.1"], "optim.lr must be > 0"),
    (["loss.name=huber", "loss.delta=0"], "huber: delta must be > 0"),
    (["loss.name=quantile", "loss.tau=1.5"], "tau must be in (0, 1)"),
    (["data.outlier_fraction=1"], "outlier_fraction=1.0 is not allowed"),
    (["train.steps=0"], "train.steps must be > 0"),
    (["data.n=1"], "n=1 is not allowed"),
    (["loss.delta=0.5"], "loss.delta = 0.5 is not a parameter of loss 'mse'"),
    (["name=a/b"], "name: use letters"),
    (["--name", "a/b"], "name: use letters, digits"),
    (["--name", ".."], "name: use letters, digits"),
    (["seed"], "not of the form key=value"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["loss.name=mse,mae"], "several values; lab run trains one config"),
    (["--runs-dir", "{tiny}/sub"], "is not a directory"),  # below a file
    # float32 holds at most 3.4e38: y = 1e38 * (2x + 1 + noise) overflows wherever |2x + 1 + noise| > 3.4
    (["data.target_scale=1e38"], "targets are not finite in float32"),
    # Student-t with df = 0.01 has P(|t| > v) ~ v^-0.01: a third of the 60 draws lie beyond 3.4e38
    (["data.kind=heavy_tailed", "data.df=0.01"], "or raise df"),
]


@pytest.mark.parametrize("words,message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line(words, message, tiny, tmp_path, capsys):
    words = [w.format(tiny=tiny) for w in words]
    rc, _, err = run_in_process(capsys, "run", tiny, "--runs-dir", tmp_path / "runs", *words)
    assert rc == 2
    assert message in one_error_line(err)
    assert not (tmp_path / "runs").exists()  # nothing written before the input was checked


def test_a_bad_value_in_a_sweep_exits_2_before_training(tiny, tmp_path, capsys):
    rc, _, err = run_in_process(capsys, "sweep", tiny, "loss.name=mse,maae", "--runs-dir", tmp_path / "runs")
    assert rc == 2 and "did you mean 'mae'?" in one_error_line(err)
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_a_gpu_exits_2(tiny, tmp_path, capsys):
    rc, _, err = run_in_process(capsys, "run", tiny, "device=cuda", "--runs-dir", tmp_path)
    assert rc == 2 and "no CUDA GPU" in one_error_line(err)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_runs_dir_exits_2(tiny, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    rc, _, err = run_in_process(capsys, "run", tiny, "--runs-dir", locked / "runs")
    assert rc == 2 and "not writable" in one_error_line(err)


def test_a_failing_run_is_recorded_and_the_sweep_goes_on(tiny, tmp_path, capsys, monkeypatch):
    from lab import study

    real_make = study.data.make

    def make(kind, seed=0, **kw):  # the seed-1 dataset cannot be drawn
        if seed == 1:
            raise RuntimeError("disk on fire")
        return real_make(kind, seed=seed, **kw)

    monkeypatch.setattr(study.data, "make", make)
    rc, out, _ = run_in_process(capsys, "sweep", tiny, "seed=0,1,2", "--runs-dir", tmp_path)
    assert rc == 1  # a run failed
    status = {d.name: rundir.read_summary(d)["status"] for d in (tmp_path / "tiny").iterdir() if d.is_dir()}
    assert status == {"outliers-mse-s0": "completed", "outliers-mse-s1": "failed", "outliers-mse-s2": "completed"}
    assert "disk on fire" in rundir.read_summary(tmp_path / "tiny" / "outliers-mse-s1")["error"]
    assert out.splitlines()[-1].endswith("2 completed, 1 failed")


def test_a_diverging_run_is_recorded_and_the_sweep_succeeds(tiny, tmp_path, capsys):
    # For a line on x ~ U(-2, 2) the largest curvature of MSE is 2 E[x^2] = 8/3, so SGD diverges
    # for lr > 0.75 (configs/diverge.toml) and converges below.
    rc, _, _ = run_in_process(capsys, "sweep", tiny, "data.kind=clean", "optim.lr=0.1,1.5", "train.steps=200",
                                "--runs-dir", tmp_path)
    assert rc == 0
    sweep_dir = tmp_path / "tiny"
    assert rundir.read_summary(sweep_dir / "clean-mse-lr0.1-s0")["status"] == "completed"
    diverged = rundir.read_summary(sweep_dir / "clean-mse-lr1.5-s0")
    assert diverged["status"] == "diverged" and 0 < diverged["diverged_step"] < 200


def test_a_new_sweep_never_writes_into_an_old_one(tiny, tmp_path, capsys):
    for _ in range(2):
        assert run_in_process(capsys, "sweep", tiny, "seed=0,1", "--runs-dir", tmp_path / "runs")[0] == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["tiny", "tiny-2"]
    assert len(rundir.find_runs(tmp_path / "runs" / "tiny-2")) == 2


def test_resume_retrains_only_unfinished_runs(tiny, tmp_path, capsys):
    words = ["sweep", tiny, "seed=0,1,2", "--runs-dir", tmp_path]
    assert run_in_process(capsys, *words)[0] == 0
    sweep_dir = tmp_path / "tiny"
    (sweep_dir / "outliers-mse-s1" / "summary.json").unlink()  # as if killed before the end
    kept = (sweep_dir / "outliers-mse-s0" / "summary.json").read_text()
    rc, out, err = run_in_process(capsys, *words, "--resume")
    assert rc == 0
    assert "resume: 2 of 3 runs already completed" in err
    assert out.splitlines()[-1] == f"{sweep_dir}: 3 runs; trained now: 1 completed"
    assert rundir.read_summary(sweep_dir / "outliers-mse-s1")["status"] == "completed"
    assert len(list((sweep_dir / "outliers-mse-s1").glob("events.out.tfevents.*"))) == 1  # the old one removed
    assert (sweep_dir / "outliers-mse-s0" / "summary.json").read_text() == kept


def test_resume_retrains_a_completed_summary_that_lost_its_config(tiny, tmp_path, capsys):
    # A summary that says completed but holds no config cannot vouch for the run: trained again, where
    # the config check used to report "was trained with data.intercept = None".
    words = ["sweep", tiny, "seed=0,1", "--runs-dir", tmp_path]
    assert run_in_process(capsys, *words)[0] == 0
    (tmp_path / "tiny" / "outliers-mse-s1" / "summary.json").write_text('{"status": "completed"}')
    rc, _, err = run_in_process(capsys, *words, "--resume")
    assert rc == 0 and "resume: 1 of 2 runs already completed" in err
    assert rundir.read_summary(tmp_path / "tiny" / "outliers-mse-s1")["config"]["seed"] == 1


def test_a_key_given_twice_on_the_command_line_is_refused(tiny, tmp_path, capsys):
    # seed=0,1 seed=2: the sweep used to win whatever the order; which one was meant is a guess.
    for words in (["seed=0,1", "seed=2"], ["seed=2", "seed=0,1"], ["optim.lr=0.1", "optim.lr=0.2"]):
        rc, _, err = run_in_process(capsys, "sweep", tiny, *words, "--runs-dir", tmp_path)
        assert rc == 2 and "is given twice on the command line" in one_error_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.toml"]


@pytest.mark.parametrize("command", ["run", "config"])
def test_lab_run_or_config_on_a_claim_study_says_how_to_train_it(tmp_path, capsys, command):
    # (they read it as a run config: "unknown key 'claim.id'; did you mean 'train.window'?")
    study = ROOT / "experiments" / "penalty_scaling.toml"
    rc, _, err = run_in_process(capsys, command, study, *(["--runs-dir", tmp_path] if command == "run" else []))
    assert rc == 2 and "is a claim study, not a run config: lab sweep" in one_error_line(err)


def test_resume_refuses_a_changed_config(tiny, tmp_path, capsys):
    assert run_in_process(capsys, "sweep", tiny, "seed=0,1", "--runs-dir", tmp_path)[0] == 0
    rc, _, err = run_in_process(capsys, "sweep", tiny, "seed=0,1", "train.steps=30", "--runs-dir", tmp_path,
                                "--resume")
    assert rc == 2 and "was trained with train.steps = 20, the config now says 30" in one_error_line(err)


def test_resume_tells_minus_infinity_from_unset(tiny, tmp_path, capsys):
    # summary.json stored loss.alpha = -inf (Welsch) as null, as it stores an unset value: a resume with
    # the default alpha took the Welsch runs for its own, and lab report showed '-'.
    words = ["sweep", tiny, "loss.name=general", "seed=0,1", "--runs-dir", tmp_path]
    assert run_in_process(capsys, *words, "loss.alpha=-inf")[0] == 0
    summary = json.loads((tmp_path / "tiny" / "outliers-general-s0" / "summary.json").read_text())
    assert summary["config"]["loss.alpha"] == "-inf"
    rc, _, err = run_in_process(capsys, *words, "--resume")
    assert rc == 2 and "was trained with loss.alpha = '-inf', the config now says None" in one_error_line(err)
    rc, _, err = run_in_process(capsys, *words, "loss.alpha=-inf", "--resume")
    assert rc == 0 and "2 of 2 runs already completed" in err
    rc, out, _ = run_in_process(capsys, "report", tmp_path / "tiny", "--by", "loss.alpha")
    assert rc == 0 and out.splitlines()[2].startswith("-inf ")


def test_resume_onto_a_file_where_a_run_directory_was_is_refused(tiny, tmp_path, capsys):
    # Each resume trained the run again into outliers-mse-s1-2, -3, ...: the file kept its name taken.
    assert run_in_process(capsys, "sweep", tiny, "seed=0,1", "--runs-dir", tmp_path)[0] == 0
    run = tmp_path / "tiny" / "outliers-mse-s1"
    for f in run.iterdir():
        f.unlink()
    run.rmdir()
    run.write_text("not a run")
    rc, _, err = run_in_process(capsys, "sweep", tiny, "seed=0,1", "--runs-dir", tmp_path, "--resume")
    assert rc == 2 and f"--resume: {run} is a file, not the run's directory" in one_error_line(err)
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir() if p.is_dir()) == ["outliers-mse-s0"]


def test_resume_onto_a_file_of_the_sweep_name_is_refused_in_one_line(tiny, tmp_path, capsys):
    (tmp_path / "fileA").write_text("not a sweep")
    rc, _, err = run_in_process(capsys, "sweep", tiny, "seed=0,1", "--name", "fileA", "--runs-dir", tmp_path,
                                "--resume")
    assert rc == 2 and "is not a sweep directory" in one_error_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fileA", "tiny.toml"]  # nothing trained or made


def test_a_sweep_whose_run_names_would_be_too_long_trains_every_run(tiny, tmp_path, capsys):
    # 70 taus make a name past any file system's limit; lab.sweeps.run_name cuts it and adds a hash, so the
    # three runs train (before, the long one ended the sweep mid-way and lost the runs after it).
    taus = "[" + ",".join(f"{0.01 * (i + 1):.2f}" for i in range(70)) + "]"
    rc, out, _ = run_in_process(capsys, "sweep", tiny, "loss.name=quantile", f"loss.tau=[0.5],{taus},[0.2,0.8]",
                                "--runs-dir", tmp_path)
    assert rc == 0 and "3 completed" in out
    names = sorted(p.name for p in (tmp_path / "tiny").iterdir() if p.is_dir())
    assert len(names) == 3 and all(len(n.encode()) <= sweeps.LONG_NAME for n in names)


def test_sweep_values_from_the_file_and_list_values_on_the_command_line(tiny, tmp_path, capsys):
    tiny.write_text(TINY + '[sweep]\n"loss.name" = ["mse", "quantile"]\n')
    rc, _, _ = run_in_process(capsys, "sweep", tiny, "loss.tau=[0.1,0.9]", "--runs-dir", tmp_path)
    assert rc == 0  # tau applies to the quantile run only: one list value, two model outputs
    s = rundir.read_summary(tmp_path / "tiny" / "outliers-quantile-s0")
    assert s["config"]["loss.tau"] == [0.1, 0.9] and set(s["params"]) == {"slope_0", "intercept_0", "slope_1",
                                                                          "intercept_1"}
    assert "loss.tau" not in rundir.read_summary(tmp_path / "tiny" / "outliers-mse-s0")["config"]


def test_config_command_lists_keys_and_resolves_a_file(capsys):
    rc, out, _ = run_in_process(capsys, "config")
    assert rc == 0 and all(f"  {k} " in out for k in config.keys())  # noqa: SIM118 — config.keys() is a function
    rc, out, _ = run_in_process(capsys, "config", ROOT / "configs" / "huber.toml", "loss.delta=0.25")
    assert rc == 0 and 'name = "huber"\ndelta = 0.25' in out


# ---------------------------------------------------------------------------------------------
# Presets: each trains (20 steps) and says what it shows.


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_runs(preset, tmp_path, capsys):
    assert preset.read_text().startswith("# "), "a preset starts with a comment saying what it shows"
    command = "sweep" if "[sweep]" in preset.read_text() else "run"
    # diverge.toml keeps its steps: the parameters grow by |1 - lr * 8/3| = 5/3 a step, so float32
    # overflows after ~100 steps, not 20.
    steps = [] if preset.stem == "diverge" else ["train.steps=20"]
    rc, _, err = run_in_process(capsys, command, preset, *steps, "train.figures=false", "device=cpu",
                                  "--runs-dir", tmp_path)
    summaries = [rundir.read_summary(d) for d in rundir.find_runs(tmp_path)]
    if preset.stem == "diverge":  # divergence is the point
        assert rc == 3 and summaries[0]["status"] == "diverged"
        return
    assert rc == 0, err
    assert summaries and all(s["status"] == "completed" for s in summaries)


def test_presets_cover_every_dataset_kind_and_loss_family():
    from lab import data

    loaded = [config.load(p)[0] for p in PRESETS if "[sweep]" not in p.read_text()]
    assert {c.data.kind for c in loaded} == set(data.available())
    families = {"mse", "mae", "huber", "log_cosh", "quantile"}
    assert families <= {c.loss.name for c in loaded}
    assert {c.loss.name for c in loaded} & {"cauchy", "tukey", "general"}


def test_a_claim_study_sweeps_its_own_grid(tmp_path, capsys):
    # experiments/huber_delta.toml has two [[sweep]] blocks (mse/mae x 10 seeds; huber x 8 (delta, lr) pairs x
    # 10 seeds) and a "loss.delta,optim.lr" key varied together: 20 + 80 runs, each named by what it sweeps.
    study = Path(__file__).resolve().parents[1] / "experiments" / "huber_delta.toml"
    code, _, err = run_in_process(capsys, "sweep", str(study), "train.steps=5", "train.figures=false",
                                    "--runs-dir", str(tmp_path))
    assert code == 0, err
    runs = rundir.find_runs(tmp_path / "huber_delta")
    assert len(runs) == 100
    s = rundir.read_summary(tmp_path / "huber_delta" / "outliers-huber-delta0.03-lr1.6667-s4")
    assert s["config"]["loss.delta"] == 0.03 and s["config"]["optim.lr"] == 1.6667 and s["config"]["train.steps"] == 5
    code, _, err = run_in_process(capsys, "sweep", str(study), "seed=1,2", "--runs-dir", str(tmp_path))
    assert code == 2 and "claim study" in err


def test_a_fixed_value_of_a_key_a_claim_study_sweeps_drops_it_from_the_sweep(tmp_path, capsys):
    # seed=0 on huber_delta.toml (10 seeds) trained each config 10 times (name-2 ... name-10), each summary
    # recording a swept seed its config did not have. Expected: one run per remaining grid point (2 + 8),
    # no repeated names, no seed among the swept values, seed 0 in every config.
    study = Path(__file__).resolve().parents[1] / "experiments" / "huber_delta.toml"
    code, _, err = run_in_process(capsys, "sweep", str(study), "seed=0", "train.steps=5", "train.figures=false",
                                  "--runs-dir", str(tmp_path))
    assert code == 0, err
    runs = rundir.find_runs(tmp_path / "huber_delta")
    summaries = [rundir.read_summary(r) for r in runs]
    assert len(runs) == 10 and not any(r.name.endswith("-2") for r in runs)
    assert all("seed" not in s["swept"] and s["config"]["seed"] == 0 for s in summaries)
    assert sorted(s["swept"].get("loss.delta", 0) for s in summaries) == [0, 0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0]


@pytest.mark.parametrize("model,params", [("linear", {"slope", "intercept"}), ("constant", {"value"})])
def test_a_one_element_tau_list_trains_like_a_single_tau(model, params, tiny, tmp_path, capsys):
    # loss.tau=[0.5] used to give a one-output model named slope_0 while the reference answered slope:
    # KeyError 'slope' in every run. Now it is the run tau = 0.5.
    rc, _, err = run_in_process(capsys, "run", tiny, "loss.name=quantile", "loss.tau=[0.5]", f"model.kind={model}",
                                "--runs-dir", tmp_path)
    assert rc == 0, err
    s = rundir.read_summary(tmp_path / "tiny")
    assert s["status"] == "completed" and set(s["params"]) == params == set(s["reference"]["params"])
    assert s["config"]["loss.tau"] == 0.5


def test_sweep_refuses_a_loss_only_claim_study(tmp_path, capsys):
    study = ROOT / "experiments" / "penalty_scaling.toml"
    rc, _, err = run_in_process(capsys, "sweep", study, "--runs-dir", tmp_path / "runs")
    assert rc == 2
    line = one_error_line(err)
    assert "measures the loss functions only" in line and "lab claims" in line
    assert not (tmp_path / "runs").exists()  # no empty sweep directory


def test_sweep_too_large_for_memory_leaves_no_directory(tiny, tmp_path, capsys):
    rc, _, err = run_in_process(capsys, "sweep", tiny, "data.n=2000000000", "seed=0,1", "--runs-dir", tmp_path / "runs")
    assert rc == 2 and "too large for memory" in one_error_line(err)
    assert not (tmp_path / "runs" / "tiny").exists()


@pytest.mark.parametrize("words", [["model.kind=mlp", "model.hidden=[50000,50000]", "seed=0,1"],
                                   ["train.window=100000000", "dtype=float64", "seed=" + ",".join(map(str, range(100)))]])
def test_sweep_too_large_by_its_model_or_window_is_refused(tiny, tmp_path, capsys, words):
    # The estimate counted data points only: 2 runs of a 2.5-billion-parameter MLP (~16 copies of 10 GB
    # each; 13-15 measured for MLPs of 1-4 million parameters), or 100 runs with a history of 10^8 steps
    # (2.4 GB each), started training and died of memory: a torch error as each run's failure, exit 1.
    rc, _, err = run_in_process(capsys, "sweep", tiny, *words, "--runs-dir", tmp_path / "runs")
    assert rc == 2 and "too large for memory" in one_error_line(err)
    assert not (tmp_path / "runs" / "tiny").exists()


def test_the_memory_estimate_grows_with_the_model_and_the_optimizer():
    def estimate(**flat):
        return sweeps.estimate_bytes([config.from_flat({"data.n": 50, "data.n_val": 20, **flat})])

    line, mlp = estimate(), estimate(**{"model.kind": "mlp", "model.hidden": [1000, 1000]})
    params = 1000 + 1000 + 1000 * 1000 + 1000 + 1000 + 1  # the MLP 1 -> 1000 -> 1000 -> 1, weights and biases
    assert mlp - line >= 16 * 4 * params  # 16 float32 copies a parameter at least
    adam = estimate(**{"model.kind": "mlp", "model.hidden": [1000, 1000], "optim.name": "adam"})
    assert adam - mlp == 2 * 4 * params  # its two moments


def test_sweep_figures_are_written_atomically(tiny, tmp_path, capsys, monkeypatch):
    written = []
    real = rundir.write_atomic

    def spy(path, payload):
        written.append(Path(path).name)
        real(path, payload)

    monkeypatch.setattr(rundir, "write_atomic", spy)
    rc, _, err = run_in_process(capsys, "sweep", tiny, "loss.name=mse,mae", "train.figures=true",
                                "--runs-dir", tmp_path)
    assert rc == 0, err
    assert {"final_gap.png", "index.json"} <= set(written)
    assert json.loads((tmp_path / "tiny" / "figures" / "index.json").read_text())["runs"] == \
        ["outliers-mse-s0", "outliers-mae-s0"]


def test_the_command_exits_with_mains_code_and_all_its_output():
    # `python -m lab` ends with os._exit (lab.cli.entry, no interpreter teardown): what main() printed
    # must still all arrive, through a pipe, with main()'s exit code (0 here, 2 for bad input).
    import contextlib

    from lab import cli

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert cli.main(["config"]) == 0
    proc = lab("config")
    assert proc.returncode == 0
    assert proc.stdout == buffer.getvalue() and len(proc.stdout) > 2000
    bad = lab("run", "no-such-file.toml")
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1


def test_a_sweep_listing_a_value_twice_is_refused(tmp_path):
    # `seed=0,0` would train the same run twice (as -s0 and -s0-2): one line, exit 2, nothing trained.
    proc = lab("sweep", "configs/clean.toml", "seed=0,0", "train.steps=5", "--runs-dir", tmp_path / "runs",
               cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: sweep: the same run twice (seed=0)") and proc.stderr.count("\n") == 1
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("summary.json"))


# ---------------------------------------------------------------------------------------------
# Data the run's dtype cannot hold is bad input (exit 2, nothing written); divergence is a result (exit 3).


def test_run_refuses_data_that_overflows_its_dtype_in_a_real_process(tmp_path):
    # 1e38 * (2x + 1 + 0.5 z) exceeds float32's 3.4e38 for 40 of the 200 seed-0 points (the float64
    # draw holds them all, so dtype=float64 is a fix and the message says so).
    res = lab("run", "configs/clean.toml", "data.target_scale=1e38", "train.steps=5", "--runs-dir", tmp_path / "runs",
              cwd=ROOT)
    assert res.returncode == 2
    assert one_error_line(res.stderr) == (
        "error: targets are not finite in float32 (40 of 200 values of y overflow): lower target_scale / noise / "
        "outlier_scale, or raise df, or set dtype=float64; nothing was trained")
    assert res.stdout == ""
    assert not (tmp_path / "runs").exists()  # no run directory, no failed summary.json


def test_a_diverging_run_is_a_result_not_bad_input_in_a_real_process(tmp_path):
    # configs/diverge.toml: finite data, lr = 1 above MSE's ceiling 0.75: training itself overflows.
    res = lab("run", "configs/diverge.toml", "device=cpu", "train.figures=false", "--runs-dir", tmp_path, cwd=ROOT)
    assert res.returncode == 3
    assert res.stderr.splitlines()[-1].startswith("run diverged at step ") and "error:" not in res.stderr
    run_dir = tmp_path / "diverge"
    assert rundir.read_summary(run_dir)["status"] == "diverged"
    assert (run_dir / "data.npz").exists()


def test_sweep_refuses_every_run_when_some_data_overflows(tiny, tmp_path, capsys):
    rc, out, err = run_in_process(capsys, "sweep", tiny, "data.target_scale=1,1e38", "seed=0,1",
                                  "--runs-dir", tmp_path / "runs")
    assert rc == 2 and out == ""
    line = one_error_line(err)
    assert line.startswith("error: sweep: 2 of 4 runs draw data their dtype cannot hold "
                           "(data.target_scale=1e+38, seed=0; data.target_scale=1e+38, seed=1); the first: "
                           "targets are not finite in float32")
    assert line.endswith("; nothing was trained")
    assert not (tmp_path / "runs").exists()  # the fine runs were not trained either


def test_a_sweep_with_many_overflowing_runs_counts_them_all_and_names_five(tiny, tmp_path, capsys):
    seeds = ",".join(map(str, range(7)))
    rc, _, err = run_in_process(capsys, "sweep", tiny, "dtype=float32,float64", "data.target_scale=1e38",
                                f"seed={seeds}", "--runs-dir", tmp_path / "runs")
    assert rc == 2
    line = one_error_line(err)
    # float64 holds 1e38 * (outlier-sized values): only the 7 float32 runs are refused
    assert "sweep: 7 of 14 runs" in line and "dtype=float32, seed=4 and 2 more)" in line
    assert "seed=5" not in line and "float64, seed" not in line
    assert not (tmp_path / "runs").exists()


def test_resume_refuses_overflowing_data_and_leaves_the_sweep_as_it_was(tiny, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert run_in_process(capsys, "sweep", tiny, "seed=0,1", "--runs-dir", runs)[0] == 0
    sweep_dir = runs / "tiny"
    (sweep_dir / "outliers-mse-s1" / "summary.json").unlink()  # as if killed before the end
    files = {p: p.read_bytes() for p in sweep_dir.rglob("*") if p.is_file()}
    # Resuming only the unfinished s1, now with targets float32 cannot hold.
    rc, _, err = run_in_process(capsys, "sweep", tiny, "seed=1", "data.target_scale=1e38", "--runs-dir", runs,
                                "--resume")
    assert rc == 2 and "targets are not finite in float32" in one_error_line(err)
    # s1 keeps its event file (a resume that goes ahead deletes it): a refused resume changes nothing.
    assert {p: p.read_bytes() for p in sweep_dir.rglob("*") if p.is_file()} == files
    assert [p.name for p in runs.iterdir()] == ["tiny"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sweep_on_cuda_logs_what_the_same_sweep_logs_on_cpu(tiny, tmp_path, capsys):
    # Reference: the same sweep on the CPU. Data, initial parameters and minibatches come from CPU
    # generators, so each run is the same run on either device; float64 makes the GPU's other order of
    # summation show only in the last digits. Every scalar of every run must agree, and a single run
    # on the GPU must draw its figures (tensors come back to the CPU for matplotlib).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sweep = ("loss.name=mse,mae,quantile", "data.kind=outliers,skewed", "dtype=float64", "train.steps=60")
    scalars = {}
    for device in ("cpu", "cuda"):
        rc, _, err = run_in_process(capsys, "sweep", tiny, *sweep, f"device={device}", "--runs-dir",
                                    tmp_path / device)
        assert rc == 0, err
        for summary_path in sorted((tmp_path / device / "tiny").glob("*/summary.json")):
            summary = json.loads(summary_path.read_text())
            assert summary["status"] == "completed" and summary["config"]["device"] == device
            acc = EventAccumulator(str(summary_path.parent), size_guidance={"scalars": 0})
            acc.Reload()
            scalars[device, summary_path.parent.name] = {
                tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    names = sorted(name for device, name in scalars if device == "cpu")
    assert len(names) == 6 and names == sorted(name for device, name in scalars if device == "cuda")
    for name in names:
        cpu, gpu = scalars["cpu", name], scalars["cuda", name]
        assert cpu.keys() == gpu.keys() and "loss/train" in cpu
        for tag in cpu:
            assert [s for s, _ in gpu[tag]] == [s for s, _ in cpu[tag]], (name, tag)
            assert np.allclose([v for _, v in gpu[tag]], [v for _, v in cpu[tag]], rtol=1e-6, atol=1e-9,
                               equal_nan=True), (name, tag)
    rc, out, err = run_in_process(capsys, "run", tiny, "device=cuda", "train.figures=true", "--runs-dir",
                                  tmp_path / "one")
    assert rc == 0, err
    assert {p.name for p in (Path(out.splitlines()[0]) / "figures").glob("*.png")} == {"fit.png", "residuals.png"}


def test_help_imports_neither_torch_nor_the_config_machinery():
    # `lab --help` and a mistyped command answer at once: the commands' modules (lab.cli_train, lab.config,
    # torch) are imported only when a command runs. Checked in a fresh interpreter, where nothing is
    # imported yet (this process has imported everything).
    code = ("import sys, contextlib, io\nfrom lab import cli\nwith contextlib.redirect_stdout(io.StringIO()):\n"
            "    code = cli.main([])  # no command: the help\n"
            "print(code, sorted(m for m in sys.modules if m.startswith(('lab', 'torch', 'numpy'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "0 ['lab', 'lab.cli']"
