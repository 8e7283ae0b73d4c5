"""Atomic writes: the old file survives a failed write, and no temporary file is left behind."""

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
