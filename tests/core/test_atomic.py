"""core.atomic: a replaced file is the old one or the new one, and a failed write leaves no trace."""

from __future__ import annotations

import stat

import numpy as np
import pytest

from core.atomic import TEMP_PREFIX, write_atomic


def test_write_atomic_replaces_the_file_with_its_mode_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "labels.json"
    target.write_bytes(b"old")
    assert write_atomic(target, b"new") == target
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # readable by a service running as another user
    assert [p.name for p in tmp_path.iterdir()] == ["labels.json"]


def test_write_atomic_takes_a_writer_function(tmp_path):
    target = tmp_path / "a.npz"
    write_atomic(target, lambda f: np.savez_compressed(f, x=np.arange(3)))
    np.testing.assert_array_equal(np.load(target)["x"], np.arange(3))


def test_a_failed_write_keeps_the_old_file_and_removes_the_temp_file(tmp_path):
    target = tmp_path / "labels.json"
    target.write_bytes(b"old")

    def fail(f) -> None:
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, fail)
    assert target.read_bytes() == b"old"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX)]
