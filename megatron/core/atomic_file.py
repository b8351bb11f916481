"""Write a file whole or not at all.

    with atomic_file("/data/cache/x.npy") as f:
        np.save(f, array)

The block writes to a temporary sibling (same directory, so the same file system) that replaces
`path` when the block finishes; on an exception it is removed and `path` is left as it was. A
process killed mid-write leaves only a `.<name>.<pid>.tmp` file, never a half-written `path`.
The file gets the permissions a plain `open` would (the umask applies).
"""

from __future__ import annotations

import contextlib
import os
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "wb", fsync: bool = False) -> Iterator[IO]:
    """Yield a file opened with `mode` ("wb" or "w") that becomes `path` when the block exits
    normally; with `fsync` its bytes reach the disk before the rename publishes them."""
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
