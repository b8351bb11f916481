"""Write a whole output directory or nothing.

    with atomic_directory("/ckpt/out") as tmp:
        ...write files under tmp...
    # now /ckpt/out holds them; on an exception nothing is published

Files are written into a hidden sibling `.<name>.tmp-<pid>` (same file system) that is renamed
to the target when the block finishes. A process killed mid-write leaves only that hidden
temporary directory, never a valid-looking output.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Iterator


def check_output_dir(path: str, flag: str = "--save-dir") -> None:
    """Raise ValueError (naming `flag`) unless `path` is absent or an empty directory."""
    if os.path.lexists(path) and not (os.path.isdir(path) and not os.listdir(path)):
        raise ValueError(f"{flag} {path} already exists and is not empty; give a new directory")


@contextlib.contextmanager
def atomic_directory(path: str, flag: str = "--save-dir") -> Iterator[str]:
    """Yield a fresh temporary directory that becomes `path` when the block exits normally.

    `path` must be absent or an empty directory (ValueError naming `flag` otherwise). On an
    exception the temporary directory is removed and `path` is left as it was.
    """
    path = os.path.abspath(path)
    check_output_dir(path, flag)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        _fsync_tree(tmp)
        if os.path.isdir(path):
            os.rmdir(path)  # empty, checked above
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_tree(root: str) -> None:
    """Flush every file under `root` to disk before the rename publishes them."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
