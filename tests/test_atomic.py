"""Atomic writes: the old file survives a failed write, no temporary file is left behind, and each file is
fsynced unless a deferred block makes many durable with one sync(2)."""

import threading
from pathlib import Path

import pytest

from lab import atomic, rundir


def test_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "f.txt"
    atomic.write_atomic(p, "first")
    atomic.write_atomic(p, b"second")
    assert p.read_bytes() == b"second"
    assert [f.name for f in tmp_path.iterdir()] == ["f.txt"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    p = tmp_path / "f.txt"
    atomic.write_atomic(p, "old")
    with pytest.raises(TypeError):
        atomic.write_atomic(p, 12345)  # not str or bytes: fails after the temporary file was made
    assert p.read_text() == "old"
    assert [f.name for f in tmp_path.iterdir()] == ["f.txt"]


def test_run_directories_and_datasets_share_one_implementation():
    from lab import data

    assert rundir.write_atomic is atomic.write_atomic is data.write_atomic


@pytest.fixture
def calls(monkeypatch):
    """Every fsync and sync(2) made, in order: ('fsync', fd) or ('sync', None)."""
    made = []
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: made.append(("fsync", fd)))
    monkeypatch.setattr(atomic.os, "sync", lambda: made.append(("sync", None)))
    return made


def test_each_write_is_fsynced_outside_a_deferred_block(tmp_path, calls):
    atomic.write_atomic(tmp_path / "a", "1")
    atomic.write_atomic(tmp_path / "b", "2")
    assert [kind for kind, _ in calls] == ["fsync", "fsync"]


@pytest.mark.skipif(not atomic._SYNC_WAITS, reason="needs a sync(2) that waits (Linux)")
def test_a_deferred_block_syncs_once_and_only_when_asked(tmp_path, calls):
    with atomic.deferred_sync():
        for i in range(5):
            atomic.write_atomic(tmp_path / f"f{i}", str(i))
        assert calls == []  # no fsync per file
        atomic.sync()
        assert calls == [("sync", None)]
        with atomic.deferred_sync():  # nested: still deferred, and syncs on leaving
            atomic.write_atomic(tmp_path / "nested", "x")
        assert calls == [("sync", None)] * 2
    assert calls == [("sync", None)] * 3  # leaving: what was written since is made durable
    assert sorted(f.name for f in tmp_path.iterdir()) == ["f0", "f1", "f2", "f3", "f4", "nested"]
    atomic.write_atomic(tmp_path / "after", "y")  # outside again: fsync per file
    assert calls[-1][0] == "fsync"


@pytest.mark.skipif(not atomic._SYNC_WAITS, reason="needs a sync(2) that waits (Linux)")
def test_deferring_is_per_thread_and_survives_an_exception(tmp_path, calls):
    with pytest.raises(RuntimeError), atomic.deferred_sync():
        thread = threading.Thread(target=atomic.write_atomic, args=(tmp_path / "other", "t"))
        thread.start()
        thread.join()
        assert [kind for kind, _ in calls] == ["fsync"]  # another thread's write is not deferred
        raise RuntimeError("training failed")
    assert [kind for kind, _ in calls] == ["fsync", "sync"]  # left through an exception: still synced
    atomic.write_atomic(tmp_path / "after", "y")
    assert calls[-1][0] == "fsync"


def test_a_symlink_keeps_pointing_at_its_target_which_is_replaced(tmp_path):
    target, link = tmp_path / "real.csv", tmp_path / "link.csv"
    target.write_text("old")
    link.symlink_to(target)
    atomic.write_atomic(link, "new")
    assert link.is_symlink() and target.read_text() == "new"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["link.csv", "real.csv"]


def test_a_pipe_is_written_through_not_replaced(tmp_path):
    # A rename would put a regular file where the FIFO (or a device: `--csv /dev/stdout`) was.
    import os
    import stat

    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    atomic.write_atomic(fifo, "through the pipe")
    reader.join(timeout=10)
    assert got == [b"through the pipe"] and stat.S_ISFIFO(fifo.stat().st_mode)
    assert [f.name for f in tmp_path.iterdir()] == ["out.fifo"]


def test_a_redirected_stdout_gets_the_write_in_order_with_the_rest_of_the_output(tmp_path):
    # `lab report --csv /dev/stdout > out.txt`: a rename would replace out.txt and lose what the process
    # prints later; opening /dev/stdout again would overwrite what it printed before.
    import subprocess
    import sys

    out = tmp_path / "out.txt"
    code = "from lab import atomic; print('before'); atomic.write_atomic('/dev/stdout', 'csv\\n'); print('after')"
    with open(out, "w") as f:
        subprocess.run([sys.executable, "-c", code], stdout=f, check=True, cwd=Path(__file__).resolve().parents[1])
    assert out.read_text() == "before\ncsv\nafter\n"


def test_a_new_file_gets_the_umask_mode_and_a_replaced_one_keeps_its_own(tmp_path):
    # mkstemp makes 0600 files: summaries and reports were unreadable to another user (a TensorBoard
    # server), where open() under umask 022 gives 0644. Expected: 0666 & ~umask; an existing file's mode.
    import os
    import stat

    new = tmp_path / "new.json"
    atomic.write_atomic(new, "{}")
    assert stat.S_IMODE(new.stat().st_mode) == 0o666 & ~atomic._UMASK
    kept = tmp_path / "kept.csv"
    kept.write_text("old")
    os.chmod(kept, 0o640)
    atomic.write_atomic(kept, "new")
    assert stat.S_IMODE(kept.stat().st_mode) == 0o640 and kept.read_text() == "new"
