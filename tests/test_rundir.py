"""Run directories: atomic creation and writes, broken runs read as broken, names that stay inside."""

import json
import os
import threading

import pytest

from lab import rundir


def test_create_never_reuses_a_directory(tmp_path):
    made = [rundir.create(tmp_path, "clean-mse-s0") for _ in range(3)]
    assert [p.name for p in made] == ["clean-mse-s0", "clean-mse-s0-2", "clean-mse-s0-3"]
    assert all(p.is_dir() for p in made)


def test_concurrent_creators_get_distinct_directories(tmp_path):
    # 8 threads racing for the same name: mkdir is atomic, so every one gets its own directory.
    out, barrier = [], threading.Barrier(8)

    def worker():
        barrier.wait()
        out.append(rundir.create(tmp_path, "race"))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(out)) == 8
    assert sorted(p.name for p in out) == sorted(["race"] + [f"race-{i}" for i in range(2, 9)])


@pytest.mark.parametrize("bad", ["a/b", "..", ".", "", ".hidden", "x\\y", "a b", "new\nline", "x" * 201])
def test_names_that_escape_or_no_file_system_takes_are_refused(tmp_path, bad):
    # The config's own rule for `name` (lab.config.name_problem), also for --name and run names.
    with pytest.raises(ValueError, match="name: (use letters|at most 200 bytes)"):
        rundir.create(tmp_path, bad)
    assert list(tmp_path.iterdir()) == []
    assert rundir.create(tmp_path, "ünïcode-1.5_x").name == "ünïcode-1.5_x"


def test_write_atomic_leaves_no_temporary_and_replaces_whole(tmp_path):
    p = tmp_path / "summary.json"
    rundir.write_summary(tmp_path, {"status": "completed", "x": float("nan"), "y": [1.0, float("inf")]})
    rundir.write_summary(tmp_path, {"status": "diverged", "final": {"loss": 2.5}})
    assert json.loads(p.read_text()) == {"status": "diverged", "final": {"loss": 2.5}}
    assert [f.name for f in tmp_path.iterdir()] == ["summary.json"]


def test_write_atomic_failure_keeps_the_old_file(tmp_path):
    rundir.write_summary(tmp_path, {"status": "completed"})

    class Boom:
        pass

    with pytest.raises(TypeError):
        rundir.write_summary(tmp_path, {"status": "x", "bad": Boom()})  # not JSON-serialisable
    assert json.loads((tmp_path / "summary.json").read_text()) == {"status": "completed"}
    assert [f.name for f in tmp_path.iterdir()] == ["summary.json"]


def test_nan_is_written_as_null(tmp_path):
    rundir.write_summary(tmp_path, {"status": "completed", "gap": float("nan")})
    assert json.loads((tmp_path / "summary.json").read_text())["gap"] is None


@pytest.mark.parametrize("content,error", [
    (None, "missing"), ('{"status": "compl', "unreadable"), ("[1, 2]", "unreadable"), ('{"final": {}}', "no status"),
    ('{"status": 3}', "no status"),
    # Well-formed JSON of the wrong shape: readers index these fields as tables.
    ('{"status": "completed", "final": [1], "swept": [1]}', "'final' is not a table"),
    ('{"status": "completed", "params": "slope"}', "'params' is not a table"),
    ('{"status": "completed", "config": 3}', "'config' is not a table"),
    ('{"status": "completed", "reference": [0.5]}', "'reference' is not a table"),
])
def test_broken_summaries_read_as_broken(tmp_path, content, error):
    if content is not None:
        (tmp_path / "summary.json").write_text(content)
    s = rundir.read_summary(tmp_path)
    assert s["status"] == "broken" and error in s["error"]


def test_find_runs_lists_half_written_runs(tmp_path):
    a = rundir.create(tmp_path / "sweep", "a")
    rundir.write_config(a, {"name": "a", "loss": {"name": "mse"}})
    b = rundir.create(tmp_path / "sweep", "b")
    rundir.write_summary(b, {"status": "completed"})
    (tmp_path / "sweep" / "not-a-run").mkdir()
    assert rundir.find_runs(tmp_path) == [a, b]
    assert rundir.read_summary(a)["status"] == "broken"
    assert (a / "config.toml").read_text().startswith('name = "a"')


def test_unwritable_directory_is_detected(tmp_path):
    # /proc refuses new directories even to root (CI runs as root, where chmod 500 would not stop it).
    with pytest.raises(ValueError, match="not writable"):
        rundir.check_writable("/proc/lab-runs")
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(ValueError, match="not writable"):
            rundir.check_writable(ro / "runs")


def test_file_in_the_way_is_detected(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        rundir.check_writable(tmp_path / "file" / "runs")


def test_a_summary_with_null_tables_is_not_broken(tmp_path):
    # A failed run's summary has no params/final; null for them is as good as absent.
    (tmp_path / "summary.json").write_text('{"status": "failed", "final": null, "params": {}}')
    assert rundir.read_summary(tmp_path)["status"] == "failed"


def test_jsonable_is_what_summary_json_stores():
    assert rundir.jsonable({"a": (1, 2.5), "b": [float("-inf"), float("nan")], "c": "x"}) == \
        {"a": [1, 2.5], "b": [None, None], "c": "x"}


@pytest.mark.parametrize("value,digits,missing,text", [
    (0.28123, 4, "-", "0.2812"),      # 4 significant digits
    (1234.56, 4, "-", "1235"),        # from 10**(digits-1): whole numbers
    (12345.6, 4, "-", "12346"),
    (123456.7, 4, "-", "1.235e+05"),  # from 1e5: scientific
    (0.00012, 3, "n/a", "1.20e-04"),  # below 1e-3: scientific
    (150000.0, 4, "-", "150000"),     # whole numbers stay whole (steps to converge)
    (3100.4, 3, "n/a", "3100"),
    (12.345, 3, "n/a", "12.3"),
    (7, 4, "-", "7"),
    (None, 4, "-", "-"),
    (float("nan"), 3, "n/a", "n/a"),
    (float("-inf"), 4, "-", "-inf"),
    (True, 4, "-", "true"),
    ("mse", 4, "-", "mse"),
])
def test_fmt_worked_values(value, digits, missing, text):
    assert rundir.fmt(value, digits, missing) == text
