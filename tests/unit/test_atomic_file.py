"""atomic_file: the target is replaced whole, or left as it was."""

import os

import pytest

from megatron.core.atomic_file import atomic_file


def test_replaces_target_when_block_finishes(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with atomic_file(str(path), "w", fsync=True) as f:
        f.write("new")
        assert path.read_text() == "old"  # nothing visible before the block ends
    assert path.read_text() == "new"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_failed_write_leaves_target_and_no_temporary(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_file(str(path)) as f:
            f.write(b"partial")
            raise RuntimeError("killed")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]
