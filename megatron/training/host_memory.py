"""Keep freed host memory for reuse when training on CPU.

PyTorch's CPU tensors come from the C library's malloc. glibc serves large blocks with fresh
mmap pages and returns a freed heap top to the operating system (its thresholds for both adapt
as the process runs), so a training step that allocates and frees the same activations every
step page-faults and zero-fills many of them again: about 21,000 page faults a step in the model
of `benchmarks/vs_hf_mixtral.py`. Raising glibc's mmap and trim thresholds keeps freed blocks in
the heap, where the next step reuses them, much as a GPU caching allocator does: 100-1,000
faults a step, and the step about 9% faster (`benchmarks/RESULTS.md`). Peak resident memory is
unchanged; memory freed after the peak is kept by the process rather than returned.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling on 64-bit systems
_TRIM_THRESHOLD = 2**30


def keep_freed_host_memory() -> bool:
    """Set glibc's malloc to serve blocks up to 32 MiB from the heap and to keep up to 1 GiB of
    freed heap. Returns False (and changes nothing) where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
