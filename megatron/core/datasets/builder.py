"""Train, validation and test datasets from the data flags, as Megatron-Core 0.16's
BlendedMegatronDatasetBuilder builds them for Megatron-LM:

    build_gpt_datasets(cfg, (n_train, n_valid, n_test), groups) -> (train, valid, test)

For each split with a requested size n > 0 (None otherwise):
- `--data-path A` (one prefix, no weight): A's split, at least n samples.
- `--data-path 0.3 A 0.7 B` (weights, even for a single prefix): weights w normalised; dataset
  d is asked for ceil(ceil(n * w_d) * 1.005) samples of its split, and the blend holds
  sum_d ceil(n * w_d) samples in the greedy order of `blended_dataset`.
- `--data-path A B` (no weights): one epoch of each dataset's split, blended by their lengths;
  the blend holds min(n, total length) samples.
- `--train-data-path/--valid-data-path/--test-data-path`: the same per split over the whole of
  each dataset, except that a single prefix is used as is even with a weight.
Splits of `--split` are ranges of sequence ids (`gpt_dataset.split_range`); a zero-weight split
is absent.

Where Megatron-Core cannot build a split at all (it loops forever on a split without tokens, and
asserts on a zero weight or on an unweighted blend member without a whole sample), this builder
leaves the dataset out of that split with a warning; a training split left empty is an error.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Optional

from torch.utils.data import Dataset

from megatron.core.config import Config
from megatron.core.datasets.blended_dataset import BlendedDataset, cached_blending_indices
from megatron.core.datasets.data_paths import Blend, normalize, parse_blend
from megatron.core.datasets.errors import DataError
from megatron.core.datasets.gpt_dataset import (
    SPLIT_NAMES, GPTDataset, TokenRules, pad_id, parse_split, split_bookends, split_range,
)
from megatron.core.datasets.index_cache import default_cache_dir
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.parallel_state import ProcessGroups

SURPLUS = 0.005
"""Extra share of samples each blended dataset builds (Megatron-LM's --mid-level-dataset-surplus default)."""
WHOLE = (0.0, 1.0)
"""The bookend of a dataset used whole (per-split paths)."""


def token_rules(cfg: Config) -> TokenRules:
    """End-of-document masking, the pad id and the vocabulary size for the configured tokenizer."""
    d = cfg.data
    if d.tokenizer_type is None:
        return TokenRules(vocab_size=cfg.model.vocab_size)
    from megatron.core.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(d.tokenizer_type, d.tokenizer_model, d.vocab_size)
    return TokenRules(tokenizer.eod if d.eod_mask_loss else None, pad_id(tokenizer), cfg.model.vocab_size)


def build_gpt_datasets(cfg: Config, sizes: tuple[int, int, int], groups: Optional[ProcessGroups] = None
                       ) -> tuple[Optional[Dataset], Optional[Dataset], Optional[Dataset]]:
    d = cfg.data
    is_main = groups is None or groups.is_main
    builder = _Builder(cfg, groups, token_rules(cfg), print if is_main else (lambda message: None))
    if d.data_path:
        blend = parse_blend(d.data_path, "--data-path")
        bookends = split_bookends(parse_split(d.split))
        datasets = [builder.split(blend, bookends[i], i, n, per_split=False) for i, n in enumerate(sizes)]
    else:
        named = [(d.train_data_path, "--train-data-path"), (d.valid_data_path, "--valid-data-path"),
                 (d.test_data_path, "--test-data-path")]
        datasets = [builder.split(parse_blend(paths, flag), WHOLE, i, n, per_split=True) if paths else None
                    for i, ((paths, flag), n) in enumerate(zip(named, sizes))]
    if sizes[0] and datasets[0] is None:
        raise DataError(f"--split {d.split}: the training split holds no sequences; raise its share")
    return datasets[0], datasets[1], datasets[2]


class _Builder:
    """Opens each indexed dataset once and builds per-split GPT datasets and blends."""

    def __init__(self, cfg: Config, groups: Optional[ProcessGroups], rules: TokenRules, log):
        self.cfg = cfg
        self.groups = groups
        self.rules = rules
        self.log = log
        self._opened: dict[str, IndexedDataset] = {}

    def indexed(self, prefix: str) -> IndexedDataset:
        if prefix not in self._opened:
            self._opened[prefix] = IndexedDataset(prefix)
        return self._opened[prefix]

    def cache_dir(self, prefix: str) -> str:
        return self.cfg.data.data_cache_path or default_cache_dir(prefix)

    def sequence_range(self, prefix: str, bookend: tuple[float, float]) -> tuple[int, int]:
        return split_range(bookend, len(self.indexed(prefix)))

    def has_tokens(self, prefix: str, bookend: tuple[float, float]) -> bool:
        lo, hi = self.sequence_range(prefix, bookend)
        return hi > lo and int(self.indexed(prefix).sequence_lengths[lo:hi].sum(dtype="int64")) > 0

    def gpt(self, prefix: str, bookend: tuple[float, float], split: int, num_samples: Optional[int]) -> GPTDataset:
        return GPTDataset(self.indexed(prefix), self.sequence_range(prefix, bookend), num_samples,
                          self.cfg.model.seq_length, self.cfg.training.seed, self.cache_dir(prefix),
                          SPLIT_NAMES[split], self.rules, self.groups, self.log)

    def split(self, blend: Blend, bookend: Optional[tuple[float, float]], split: int, num_samples: int,
              per_split: bool) -> Optional[Dataset]:
        """One split: a single GPT dataset or a blend (see the module docstring); None when the
        split is absent, nothing is requested, or no named dataset has sequences in it."""
        if num_samples == 0 or bookend is None:
            return None
        prefixes, weights = self.present(blend, bookend, split)
        if not prefixes:
            return None
        if len(prefixes) == 1 and (weights is None or per_split):
            return self.gpt(prefixes[0], bookend, split, num_samples)
        if weights is None:
            return self.blend_by_length(prefixes, bookend, split, num_samples)
        return self.blend_by_weight(prefixes, weights, bookend, split, num_samples)

    def blend_by_weight(self, prefixes: list[str], weights: list[float], bookend: tuple[float, float], split: int,
                        num_samples: int) -> BlendedDataset:
        """Each dataset asked for ceil(ceil(n * w) * 1.005) samples; the blend holds sum ceil(n * w)."""
        w = normalize(weights)
        targets = [int(math.ceil(num_samples * wd)) for wd in w]
        parts = [self.gpt(p, bookend, split, int(math.ceil(t * (1 + SURPLUS)))) for p, t in zip(prefixes, targets)]
        return self.blend(prefixes, parts, w, sum(targets), split)

    def blend_by_length(self, prefixes: list[str], bookend: tuple[float, float], split: int,
                        num_samples: int) -> Optional[BlendedDataset]:
        """One epoch of each dataset, weighted by its length; min(n, total length) samples."""
        parts = [self.gpt(p, bookend, split, None) for p in prefixes]
        for p, ds in zip(prefixes, parts):
            if not len(ds):
                warnings.warn(f"{p}: its {SPLIT_NAMES[split]} split holds less than one sample; "
                              f"the blend by length leaves it out")
        prefixes, parts = [p for p, ds in zip(prefixes, parts) if len(ds)], [ds for ds in parts if len(ds)]
        if not parts:
            return None
        lengths = [len(ds) for ds in parts]
        return self.blend(prefixes, parts, lengths, min(num_samples, sum(lengths)), split)

    def blend(self, prefixes: list[str], parts: list[GPTDataset], weights: list[float], size: int,
              split: int) -> BlendedDataset:
        """`size` samples of `parts` in the greedy order of `weights` (cached)."""
        name = SPLIT_NAMES[split]
        stems = "+".join(os.path.basename(p) for p in prefixes)
        arrays = cached_blending_indices(weights, size, self.cache_dir(prefixes[0]), f"blend-{name}-{stems}"[:120],
                                         self.groups, self.log)
        return BlendedDataset(parts, arrays["dataset_index"], arrays["dataset_sample_index"], prefixes)

    def present(self, blend: Blend, bookend: tuple[float, float], split: int) -> Blend:
        """The blend without datasets of zero weight or without tokens in this split (each left
        out with a warning)."""
        name = SPLIT_NAMES[split]
        weights = blend.weights or [1.0] * len(blend.prefixes)
        kept = []
        for w, p in zip(weights, blend.prefixes):
            if w <= 0:
                warnings.warn(f"{p} has weight 0; the {name} blend leaves it out")
            elif not self.has_tokens(p, bookend):
                warnings.warn(f"{p} has no {name} sequences under --split {self.cfg.data.split}; "
                              f"it is left out of the {name} data")
            else:
                kept.append((w, p))
        return Blend([p for _, p in kept], None if blend.weights is None else [w for w, _ in kept])
