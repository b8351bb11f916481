"""A cache of index arrays as `.npy` files, keyed by a hash of everything that determines them.

    arrays = load_or_build(cache_dir, "corpus_train", description, build, groups)

`description` is a JSON-able dict of the inputs (a digest of the document lengths, the
sequence length, the seed, ...). Its hash names the files, so changing any input names new
files and the old ones are simply not used. Rank 0 builds and writes (each file under a
temporary name, then renamed); the other ranks wait at a barrier and then map the files. A
rank that still cannot see them (a cache directory that is not shared between nodes) builds
its own copy, which is identical because building is deterministic.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from typing import Callable, Optional

import numpy as np
import torch.distributed as dist

from megatron.core.atomic_file import atomic_file
from megatron.core.parallel_state import ProcessGroups

CACHE_VERSION = 2
"""Bump when the way indices are built changes, so old caches are not reused (2: Megatron-Core
0.16's recipe, sequences as the unit)."""


def digest(array: np.ndarray) -> str:
    """sha256 of an array's bytes and dtype: a short stand-in for the array in a description."""
    h = hashlib.sha256(str(array.dtype).encode())
    h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def cache_key(description: dict) -> str:
    text = json.dumps({"cache_version": CACHE_VERSION, **description}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def default_cache_dir(prefix: str) -> str:
    """`cache/` next to the dataset (Megatron-LM's habit), or a per-user temporary directory
    when that is not writable."""
    beside = os.path.join(os.path.dirname(os.path.abspath(prefix)), "cache")
    if _writable(beside):
        return beside
    fallback = os.path.join(tempfile.gettempdir(), f"megatron-index-cache-{os.getuid()}")
    warnings.warn(f"cannot write index cache {beside}; using {fallback} (set --data-cache-path)")
    return fallback


def _writable(directory: str) -> bool:
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:
        return False
    return os.access(directory, os.W_OK)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _is_main(groups: Optional[ProcessGroups]) -> bool:
    """Rank 0 of the run: from `groups`, else from torch.distributed, else (one process) True."""
    if groups is not None:
        return groups.is_main
    return not _distributed() or dist.get_rank() == 0


def _load(paths: dict[str, str]) -> Optional[dict[str, np.ndarray]]:
    """The cached arrays, memory-mapped, or None when any is missing or unreadable."""
    try:
        return {n: np.load(p, mmap_mode="r", allow_pickle=False) for n, p in paths.items()}
    except (OSError, ValueError, EOFError):
        return None


def _write(stem: str, paths: dict[str, str], arrays: dict[str, np.ndarray], description: dict) -> None:
    """Each array to its path, plus `<stem>-description.json`, readable, of what determined them."""
    try:
        os.makedirs(os.path.dirname(stem), exist_ok=True)
        for n, path in paths.items():
            with atomic_file(path) as f:
                np.save(f, arrays[n])
        with open(stem + "-description.json", "w") as f:
            json.dump(description, f, indent=2, sort_keys=True)
    except OSError as e:
        warnings.warn(f"cannot write the index cache {stem}-* ({e}); indices stay in memory")


def load_or_build(cache_dir: str, name: str, description: dict, names: tuple[str, ...],
                  build: Callable[[], dict[str, np.ndarray]], groups: Optional[ProcessGroups] = None,
                  log: Callable[[str], None] = lambda message: None) -> dict[str, np.ndarray]:
    """Arrays `names` for `description`: read from the cache, or built (by rank 0) and cached.

    `build()` returns a dict holding every name. Must be called by all ranks together when
    torch.distributed is initialised (it contains one barrier).
    """
    key = cache_key(description)
    stem = os.path.join(cache_dir, f"{name}-{key}")
    paths = {n: f"{stem}-{n}.npy" for n in names}
    built = None
    if _is_main(groups) and _load(paths) is None:
        log(f"building indices {name} ({key[:8]}) in {cache_dir}")
        built = build()
        _write(stem, paths, built, description)
    if _distributed():
        dist.barrier()
    cached = _load(paths)
    if cached is not None:
        return cached
    if built is None:  # this rank cannot see rank 0's files
        built = build()
        _write(stem, paths, built, description)
    return built
