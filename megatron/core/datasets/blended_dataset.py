"""Several datasets mixed by weight (`--data-path 0.3 A 0.7 B`), in Megatron-Core's order.

The weights are normalised (float64), then blend sample t comes from the dataset furthest below
its share so far: the argmax over d of weight_d * max(t, 1) - taken_d, ties to the lower index.
After any prefix of t samples each dataset's count is within about one sample of weight * t.

    dataset_index         uint8/int16[n]  which dataset serves blend sample t
    dataset_sample_index  int64[n]        which of that dataset's samples (its k-th, in order)
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from megatron.core.datasets.data_paths import normalize
from megatron.core.datasets.errors import DataError
from megatron.core.datasets.index_cache import load_or_build
from megatron.core.parallel_state import ProcessGroups

BLEND_NAMES = ("dataset_index", "dataset_sample_index")


def build_blending_indices(weights: Sequence[float], num_samples: int) -> dict[str, np.ndarray]:
    """Greedy assignment of `num_samples` blend samples to datasets; see the module docstring.

    `weights` are normalised here (as Megatron-Core's blend does, even when already normalised).
    A plain Python loop over samples with a small inner loop over datasets: about 0.4 s per
    million samples for two datasets (benchmarks/data.py), run once and cached.
    """
    if any(w <= 0 for w in weights):
        raise ValueError(f"blend weights must be positive, got {list(weights)}")
    w = normalize(weights)
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
    description = {"class": "BlendedDataset", "weights": [float(w) for w in weights], "num_samples": num_samples}
    return load_or_build(cache_dir, name, description, BLEND_NAMES, lambda: build_blending_indices(weights, num_samples),
                         groups, log)


class BlendedDataset(Dataset):
    """Blend sample t is sample `dataset_sample_index[t]` of dataset `dataset_index[t]`.

    `names` (one per dataset) appear in the error raised when a dataset has fewer samples than
    the blend takes from it.
    """

    def __init__(self, datasets: Sequence[Dataset], dataset_index: np.ndarray, dataset_sample_index: np.ndarray,
                 names: Optional[Sequence[str]] = None):
        self.datasets = list(datasets)
        self.dataset_index = dataset_index
        self.dataset_sample_index = dataset_sample_index
        needed = np.bincount(dataset_index, minlength=len(self.datasets))
        for d, (ds, n) in enumerate(zip(self.datasets, needed)):
            if len(ds) < n:
                name = names[d] if names else f"dataset {d}"
                raise DataError(f"{name}: the blend takes {n} samples from it but it has {len(ds)}; "
                                f"Megatron-Core fails here too (raise --mid-level-dataset-surplus there)")

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, t: int) -> dict[str, torch.Tensor]:
        if not 0 <= t < len(self):
            raise IndexError(f"sample {t} out of range for {len(self)} samples")
        return self.datasets[int(self.dataset_index[t])][int(self.dataset_sample_index[t])]
