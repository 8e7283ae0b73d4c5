"""Nothing lost, nothing confusing: divergence, interruption, bad input, fuzzing, determinism, safety.

Behaviour of the command line is tested through the command line: subprocesses where exit codes,
signals and stderr matter, `lab.cli.main` in-process where only the result does (same code path, no
3-second interpreter start-up per case).
"""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lab import cli, rundir

LAB = [sys.executable, "-m", "lab"]
FAST = ["train.steps=30", "data.n=32", "data.n_val=16", "train.figures=false", "device=cpu"]


def lab(*args, timeout=120, **kw):
    return subprocess.run([*LAB, *args], check=False, capture_output=True, text=True, timeout=timeout, **kw)


def toml(tmp_path, text, name="c.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def event_scalars(run_dir: Path) -> dict:
    """Every scalar tag TensorBoard's own reader finds in the run directory -> list of steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# ---------------------------------------------------------------------------------------------- divergence


def test_diverged_run_says_why_and_exits_3(tmp_path):
    # lr * curvature of MSE (2 E[x^2] = 2.7 here) far above 2: each step multiplies the error by ~25, and
    # targets in the thousands reach float32 overflow within the 30 steps.
    cfg = toml(tmp_path, 'name = "boom"\n[data]\ntarget_scale = 1000.0\n[optim]\nlr = 10.0\n')
    r = lab("run", str(cfg), *FAST, "--runs-dir", str(tmp_path / "runs"))
    assert r.returncode == 3, r.stderr
    assert "diverged" in r.stderr and "Traceback" not in r.stderr
    s = json.loads((tmp_path / "runs" / "boom" / "summary.json").read_text())
    assert s["status"] == "diverged"
    assert isinstance(s["diverged_step"], int) and 0 <= s["diverged_step"] < 30
    assert s["last_finite"] and all(math.isfinite(v) for v in s["last_finite"].values())
    tags = event_scalars(tmp_path / "runs" / "boom")  # logs stay readable
    assert "loss/train" in tags and tags["loss/train"][0] == 0


def test_sweep_goes_on_past_a_diverged_run(tmp_path):
    cfg = toml(tmp_path, 'name = "sw"\n[data]\ntarget_scale = 1000.0\n')
    code = cli.main(["sweep", str(cfg), *FAST, "optim.lr=1e-7,10.0", "--runs-dir", str(tmp_path)])
    assert code == 0  # completed or diverged runs only: success
    statuses = sorted(rundir.read_summary(d)["status"] for d in rundir.find_runs(tmp_path / "sw"))
    assert statuses == ["completed", "diverged"]


# -------------------------------------------------------------------------------------------- interruption


def _processes_with(marker: str) -> list[int]:
    """Pids of the processes whose environment holds `marker` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            pass
    return found


@pytest.mark.parametrize("sig,worker,twice", [(signal.SIGINT, False, False), (signal.SIGTERM, False, False),
                                              (signal.SIGINT, True, False), (signal.SIGINT, False, True)])
def test_interrupted_sweep_keeps_finished_runs_and_resume_completes_the_rest(tmp_path, sig, worker, twice):
    # twice: a second signal 10 ms after the first, as an impatient Ctrl-C Ctrl-C, ends the sweep the same way
    # (where it lands in the writing of the runs' files: tests/test_study.py, deterministically).
    # Two populations (different step counts): the short one finishes, the long one is interrupted.
    # worker: the log rows on a forked worker (LAB_ROW_WORKER=1), and the signal sent to the whole process
    # group as a terminal's Ctrl-C is: the worker ignores it, the sweep stops as without one, and no
    # process is left behind (the worker carries a marker in its environment, inherited at the fork).
    if worker and not (sys.platform == "linux" and hasattr(os, "fork")):
        pytest.skip("a row worker needs fork (Linux)")
    cfg = toml(tmp_path, 'name = "sw"\ndevice = "cpu"\n[train]\nfigures = false\nlog_every = 10\n'
                         '[data]\nn = 32\nn_val = 8\n[sweep]\n"train.steps" = [20, 200000]\n')
    runs = tmp_path / "runs"
    marker = f"LAB_TEST_MARK={os.getpid()}-{time.time_ns()}"
    env = {**os.environ, "LAB_ROW_WORKER": "1" if worker else "0", marker.split("=")[0]: marker.split("=")[1]}
    proc = subprocess.Popen([*LAB, "sweep", str(cfg), "--runs-dir", str(runs)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=worker)
    try:
        deadline = time.time() + 90
        # Wait until the long run has written its first scalars (the first flush of 50 log steps).
        while time.time() < deadline:
            events = list(runs.glob("sw/*steps200000*/events.out.tfevents.*"))
            if events and events[0].stat().st_size > 2000:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the long run never logged")
        if worker:
            assert len(_processes_with(marker)) == 2  # the sweep and its row worker
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
            if twice:
                time.sleep(0.01)
                proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "worker" not in err  # no fall-back either
    assert _processes_with(marker) == []
    dirs = {d.name: rundir.read_summary(d) for d in rundir.find_runs(runs / "sw")}
    short = next(s for n, s in dirs.items() if "steps20" in n)
    long = next((n, s) for n, s in dirs.items() if "steps200000" in n)
    assert short["status"] == "completed" and short["steps"] == 20
    assert long[1]["status"] == "interrupted"
    assert len(event_scalars(runs / "sw" / long[0])["loss/train"]) >= 50  # flushed and readable
    short_dir = next(d for d in rundir.find_runs(runs / "sw") if "steps20" in d.name)
    before = (short_dir / "summary.json").read_bytes()

    # Resume: exactly the interrupted run is trained again (cheaply: the long run now gets 30 steps).
    cfg.write_text(cfg.read_text().replace("200000", "30"))
    r = lab("sweep", str(cfg), "--runs-dir", str(runs), "--resume")
    assert r.returncode == 0, r.stderr
    assert "1 of 2 runs already completed" in r.stderr
    assert (short_dir / "summary.json").read_bytes() == before  # untouched
    statuses = [rundir.read_summary(d)["status"] for d in rundir.find_runs(runs / "sw")]
    assert statuses.count("completed") >= 2


# ---------------------------------------------------------------------------------------------- bad input

BAD = [
    # (config text, extra words, expected fragment of the one-line message)
    (None, [], "not found"),
    ("[loss\nname = 'mse'", [], "line 1"),
    ("", ["loss.detla=0.5"], "did you mean 'loss.delta'"),
    ("", ["train.steps=many"], "expected an integer"),
    ("", ["optim.lr=nan"], "finite"),
    ("", ["optim.lr=inf"], "finite"),
    ("", ["optim.lr=-0.1"], "optim.lr"),
    ("", ["loss.name=huber", "loss.delta=0"], "delta"),
    ("", ["loss.name=quantile", "loss.tau=1.5"], "tau"),
    ("", ["data.kind=outliers", "data.outlier_fraction=1.0"], "outlier_fraction"),
    ("", ["train.steps=0"], "train.steps"),
    ("", ["data.n=1"], "n"),
    ("", ["loss.delta=0.5"], "delta"),  # mse takes no delta
    ("", ["data.df=3"], "df"),  # clean data takes no df
    ("", ["device=tpu"], "device"),
    ("", ["name=../escape"], "name"),
    ("", ["optim.name=rmsprop"], "optim.name"),
    ("", ["model.hidden=[0]", "model.kind=mlp"], "hidden"),
    ("", ["seed=4611686018427387904"], "seed must be < 2**62"),  # 2**62: the data draw seeds 2 * seed + 1
    ("", ["loss.name=huber", "loss.delta=1e-320"], "loss.delta"),  # would underflow to 'instant convergence'
]


@pytest.mark.parametrize("text,words,fragment", BAD)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, text, words, fragment):
    path = tmp_path / "missing.toml" if text is None else toml(tmp_path, text)
    code = cli.main(["run", str(path), *words, "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line and not line.startswith("note:")]
    assert len(lines) == 1, err
    assert fragment in lines[0]
    assert not list((tmp_path / "runs").glob("*/summary.json"))  # nothing was trained


def test_bad_input_through_a_real_process(tmp_path):
    cfg = toml(tmp_path, "[loss]\nname = 'mse'\ndelta = 1.0\n")
    r = lab("run", str(cfg), "--runs-dir", str(tmp_path / "runs"))
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "delta" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu_is_refused_and_auto_falls_back(tmp_path, capsys):
    cfg = toml(tmp_path, "")
    assert cli.main(["run", str(cfg), "device=cuda", "--runs-dir", str(tmp_path)]) == 2
    assert "cuda" in capsys.readouterr().err
    assert cli.main(["run", str(cfg), *FAST[:-1], "device=auto", "--runs-dir", str(tmp_path)]) == 0
    assert "note:" in capsys.readouterr().err


def test_unwritable_runs_dir_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert cli.main(["run", str(toml(tmp_path, "")), "--runs-dir", str(tmp_path / "file" / "runs")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert cli.main(["run", str(toml(tmp_path, "")), "--runs-dir", "/proc/lab-runs"]) == 2


@pytest.mark.parametrize("name", ["a/b", "..", "../x"])
def test_run_names_never_leave_the_runs_dir(tmp_path, capsys, name):
    assert cli.main(["run", str(toml(tmp_path, "")), *FAST, "--name", name, "--runs-dir", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob("r/**/summary.json"))


def test_study_too_large_for_memory_is_refused_before_allocation(tmp_path, capsys):
    code = cli.main(["run", str(toml(tmp_path, "")), "data.n=2000000000", "--runs-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "too large for memory" in err and "GiB" in err


# ------------------------------------------------------------------------------------------------- fuzzing

KEYS = ["loss.name", "loss.delta", "loss.tau", "optim.lr", "optim.name", "optim.momentum", "data.kind", "data.noise",
        "data.outlier_fraction", "data.df", "model.kind", "optim.schedule", "train.normalize_targets", "seed", "nonsense",
        "loss.delt", "train.batch_size", "optim.clip_grad_norm"]
VALUES = st.one_of(st.integers(-3, 5), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                   st.sampled_from(["mse", "mae", "huber", "quantile", "outliers", "heavy_tailed", "adam", "cosine",
                                    "linear", "constant", "[0.1,0.9]", "[", "x=y", ""]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(words=st.lists(st.tuples(st.sampled_from(KEYS), VALUES), max_size=5))
def test_fuzzed_overrides_either_run_or_exit_2_with_one_line(tmp_path, capsys, words):
    argv = ["run", str(toml(tmp_path, "")), *[f"{k}={v}" for k, v in words], *FAST, "--runs-dir", str(tmp_path / "r")]
    code = cli.main(argv)
    err = capsys.readouterr().err
    if code == 2:
        lines = [line for line in err.splitlines() if line and not line.startswith("note:")]
        assert len(lines) == 1 and lines[0].startswith("error:"), err
    else:
        assert code in (0, 3), err  # completed, or diverged (a random lr may well diverge)
        assert "Traceback" not in err


# --------------------------------------------------------------------------------------------- determinism


def test_same_config_and_seed_give_bitwise_identical_summaries(tmp_path):
    cfg = toml(tmp_path, "seed = 7\n[data]\nkind = 'outliers'\n[loss]\nname = 'huber'\n")
    for name in ("a", "b"):
        assert cli.main(["run", str(cfg), *FAST, "--name", name, "--runs-dir", str(tmp_path)]) == 0
    a, b = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("a", "b"))
    for key in ("params", "final", "reference", "steps_to_converge", "status"):
        assert a[key] == b[key], key


def test_a_run_in_a_sweep_equals_it_alone(tmp_path):
    cfg = toml(tmp_path, "dtype = 'float64'\nname = 'sw'\n")
    assert cli.main(["sweep", str(cfg), *FAST, "loss.name=mse,mae,huber", "seed=0,1", "--runs-dir", str(tmp_path)]) == 0
    assert cli.main(["run", str(cfg), *FAST, "loss.name=mae", "seed=1", "--name", "alone", "--runs-dir",
                     str(tmp_path)]) == 0
    swept = json.loads((tmp_path / "sw" / "clean-mae-s1" / "summary.json").read_text())
    alone = json.loads((tmp_path / "alone" / "summary.json").read_text())
    assert swept["population_size"] == 6 and alone["population_size"] == 1
    for k, v in alone["params"].items():
        assert abs(swept["params"][k] - v) <= 1e-10


# -------------------------------------------------------------------------------------------------- safety


def test_configs_are_never_executed(tmp_path, capsys):
    marker = tmp_path / "pwned"
    cfg = toml(tmp_path, f'name = "__import__(\'os\').system(\'touch {marker}\')"\n')
    assert cli.main(["run", str(cfg), *FAST, "--runs-dir", str(tmp_path)]) == 2
    assert not marker.exists()


def test_no_network_connections(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the lab tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert cli.main(["run", str(toml(tmp_path, "")), *FAST, "--runs-dir", str(tmp_path)]) == 0


def test_torch_load_is_only_used_with_weights_only():
    # The lab loads data with numpy (allow_pickle=False); any torch.load must pass weights_only=True.
    src = Path(__file__).resolve().parents[1] / "lab"
    for path in src.rglob("*.py"):
        text = path.read_text()
        for i, line in enumerate(text.splitlines()):
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path.name}:{i + 1}"
            if "np.load(" in line or "numpy.load(" in line:
                assert "allow_pickle=True" not in line, f"{path.name}:{i + 1}"
    assert "np.load(" in (src / "data" / "dataset.py").read_text()  # the scan saw the dataset loader


# ---------------------------------------------------------------------------------------------- closed output


def test_a_sweep_whose_reader_left_writes_every_summary_and_exits_0(tmp_path):
    # `lab sweep ... | head -1`: the reader gone, the first progress line raised BrokenPipeError inside the
    # loop that writes the population's summaries, so the runs after it lost theirs, and the command said
    # "error: [Errno 32] Broken pipe" with exit code 2 (bad input). The pipe is closed here before the sweep
    # prints anything, so every line it prints meets it.
    cfg = toml(tmp_path, 'name = "pipe"\n')
    proc = subprocess.Popen([*LAB, "sweep", str(cfg), *FAST, "seed=0,1,2,3", "--runs-dir", str(tmp_path / "runs")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in err and "error" not in err
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "runs").rglob("summary.json")]
    assert len(summaries) == 4 and {s["status"] for s in summaries} == {"completed"}


def test_a_command_started_with_stdout_closed_ends_without_a_traceback(tmp_path):
    # `lab report R >&-`: Python's sys.stdout is None there, and the exit's flush raised AttributeError.
    cfg = toml(tmp_path, 'name = "shut"\n')
    runs = tmp_path / "runs"
    for args in (["sweep", str(cfg), *FAST, "seed=0,1", "--runs-dir", str(runs)], ["report", str(runs)]):
        r = subprocess.run([*LAB, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=120,
                           check=False, pass_fds=(), preexec_fn=lambda: os.close(1))
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert len(list(runs.rglob("summary.json"))) == 2
