"""Several datasets mixed by weight (`--data-path 0.3 A 0.7 B`).

Sample t of the blend comes from the dataset furthest below its target share so far: the
argmax over d of weight_d * max(t, 1) - taken_d (ties to the lower index), as in Megatron-LM.
After any prefix of t samples each dataset's count is within about one sample of weight * t.

    dataset_index         uint8/int16[n]  which dataset serves blend sample t
    dataset_sample_index  int64[n]        which of that dataset's samples (its k-th, in order)
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from megatron.core.datasets.index_cache import load_or_build
from megatron.core.parallel_state import ProcessGroups

BLEND_NAMES = ("dataset_index", "dataset_sample_index")


def normalise_weights(weights: Sequence[float]) -> list[float]:
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"blend weights must be non-negative and not all zero, got {list(weights)}")
    return [float(w) / total for w in weights]


def build_blending_indices(weights: Sequence[float], num_samples: int) -> dict[str, np.ndarray]:
    """Greedy assignment of `num_samples` blend samples to datasets; see the module docstring.

    A plain Python loop over samples with a small inner loop over datasets: about 0.4 s per
    million samples for two datasets (benchmarks/data.py), run once and cached.
    """
    w = normalise_weights(weights)
    D = len(w)
    taken = [0] * D
    which = np.empty(num_samples, dtype=np.uint8 if D < 256 else np.int16)
    sample = np.empty(num_samples, dtype=np.int64)
    for t in range(num_samples):
        scale = t if t > 1 else 1
        best, best_gap = 0, w[0] * scale - taken[0]
        for d in range(1, D):
            gap = w[d] * scale - taken[d]
            if gap > best_gap:
                best, best_gap = d, gap
        which[t] = best
        sample[t] = taken[best]
        taken[best] += 1
    return {"dataset_index": which, "dataset_sample_index": sample}


def cached_blending_indices(weights: Sequence[float], num_samples: int, cache_dir: str, name: str,
                            groups: Optional[ProcessGroups] = None,
                            log: Callable[[str], None] = lambda message: None) -> dict[str, np.ndarray]:
    """`build_blending_indices`, cached under `cache_dir` (built by rank 0, see index_cache)."""
    w = normalise_weights(weights)
    description = {"class": "BlendedDataset", "weights": w, "num_samples": num_samples}
    return load_or_build(cache_dir, name, description, BLEND_NAMES, lambda: build_blending_indices(w, num_samples),
                         groups, log)


class BlendedDataset(Dataset):
    """Blend sample t is sample `dataset_sample_index[t]` of dataset `dataset_index[t]`."""

    def __init__(self, datasets: Sequence[Optional[Dataset]], dataset_index: np.ndarray,
                 dataset_sample_index: np.ndarray):
        self.datasets = list(datasets)
        self.dataset_index = dataset_index
        self.dataset_sample_index = dataset_sample_index
        needed = np.bincount(dataset_index, minlength=len(self.datasets))
        for d, (ds, n) in enumerate(zip(self.datasets, needed)):
            if n and (ds is None or len(ds) < n):
                raise ValueError(f"blend component {d} has {0 if ds is None else len(ds)} samples, needs {n}")

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, t: int) -> dict[str, torch.Tensor]:
        if not 0 <= t < len(self):
            raise IndexError(f"sample {t} out of range for {len(self)} samples")
        return self.datasets[int(self.dataset_index[t])][int(self.dataset_sample_index[t])]
