"""Train, validation and test datasets from `--data-path` (split by `--split`) or from
`--train-data-path / --valid-data-path / --test-data-path`, blended by weight when several
datasets are named.

    build_gpt_datasets(cfg, (n_train, n_valid, n_test), groups) -> (train, valid, test)

Each returned dataset has exactly the requested number of samples (None where a split has no
documents or no samples are requested); its items are `sample_from_tokens` dicts.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import numpy as np
from torch.utils.data import Dataset

from megatron.core.config import Config, DataConfig
from megatron.core.datasets.data_paths import parse_weighted_paths
from megatron.core.datasets.blended_dataset import BlendedDataset, cached_blending_indices
from megatron.core.datasets.gpt_dataset import SPLIT_NAMES, GPTDataset, parse_split, split_boundaries
from megatron.core.datasets.index_cache import default_cache_dir
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.parallel_state import ProcessGroups


def eod_token(data: DataConfig) -> int:
    """The end-of-document id of the configured tokenizer (for `--eod-mask-loss`)."""
    from megatron.core.tokenizer import build_tokenizer

    if data.tokenizer_type is None:
        raise ValueError("--eod-mask-loss needs --tokenizer-type (and --tokenizer-model) to know the end-of-document id")
    return build_tokenizer(data.tokenizer_type, data.tokenizer_model, data.vocab_size).eod


def build_gpt_datasets(cfg: Config, sizes: tuple[int, int, int], groups: Optional[ProcessGroups] = None
                       ) -> tuple[Optional[Dataset], Optional[Dataset], Optional[Dataset]]:

    d = cfg.data
    is_main = groups is None or groups.is_main
    builder = _Builder(cfg, groups, eod_token(d) if d.eod_mask_loss else None,
                       print if is_main else (lambda message: None))
    if d.data_path:
        blend = parse_weighted_paths(d.data_path, "--data-path")
        weights = parse_split(d.split)
        datasets = [builder.split_blend(blend, weights, i, n) for i, n in enumerate(sizes)]
    else:
        named = [(d.train_data_path, "--train-data-path"), (d.valid_data_path, "--valid-data-path"),
                 (d.test_data_path, "--test-data-path")]
        datasets = [builder.split_blend(parse_weighted_paths(paths, flag), None, i, n) if paths else None
                    for i, ((paths, flag), n) in enumerate(zip(named, sizes))]
    if sizes[0] and datasets[0] is None:
        raise ValueError("no training documents: --split gives the training split no documents; raise its share")
    return datasets[0], datasets[1], datasets[2]


class _Builder:
    """Opens each indexed dataset once and builds per-split GPT datasets and blends."""

    def __init__(self, cfg: Config, groups: Optional[ProcessGroups], eod: Optional[int], log):
        self.cfg = cfg
        self.groups = groups
        self.eod = eod
        self.log = log
        self._opened: dict[str, IndexedDataset] = {}

    def indexed(self, prefix: str) -> IndexedDataset:
        if prefix not in self._opened:
            self._opened[prefix] = IndexedDataset(prefix)
        return self._opened[prefix]

    def cache_dir(self, prefix: str) -> str:
        return self.cfg.data.data_cache_path or default_cache_dir(prefix)

    def document_range(self, prefix: str, split: int, split_weights: Optional[list[float]]) -> tuple[int, int]:
        """Document ids [lo, hi) of `split`: by `--split` weights, or all of them when None."""
        num_documents = self.indexed(prefix).num_documents
        if split_weights is None:
            return 0, num_documents
        bounds = split_boundaries(split_weights, num_documents)
        return bounds[split], bounds[split + 1]

    def has_tokens(self, prefix: str, split: int, split_weights: Optional[list[float]]) -> bool:
        lo, hi = self.document_range(prefix, split, split_weights)
        return hi > lo and int(self.indexed(prefix).document_lengths[lo:hi].sum()) > 0

    def gpt(self, prefix: str, split: int, split_weights: Optional[list[float]], num_samples: int) -> Optional[GPTDataset]:
        """The split's documents of one dataset, or None when they hold no tokens."""
        if not self.has_tokens(prefix, split, split_weights):
            return None
        return GPTDataset(self.indexed(prefix), self.document_range(prefix, split, split_weights), num_samples,
                          self.cfg.model.seq_length, self.cfg.training.seed, self.cache_dir(prefix),
                          SPLIT_NAMES[split], self.eod, self.groups, self.log)

    def split_blend(self, blend: list[tuple[float, str]], split_weights: Optional[list[float]], split: int,
                    num_samples: int) -> Optional[Dataset]:
        """One split: a single GPT dataset, or a blend of several by weight."""
        if num_samples == 0:
            return None
        if len(blend) == 1:
            return self.gpt(blend[0][1], split, split_weights, num_samples)
        name = SPLIT_NAMES[split]
        present = [(w, p) for w, p in blend if w > 0 and self.has_tokens(p, split, split_weights)]
        for w, p in blend:
            if w > 0 and (w, p) not in present:
                warnings.warn(f"{p} has no {name} documents under --split {self.cfg.data.split}; "
                              f"the {name} blend leaves it out")
        if not present:
            return None
        stems = "+".join(os.path.basename(p) for _, p in present)
        arrays = cached_blending_indices([w for w, _ in present], num_samples, self.cache_dir(present[0][1]),
                                         f"blend-{name}-{stems}"[:120], self.groups, self.log)
        counts = np.bincount(arrays["dataset_index"], minlength=len(present))
        components = [self.gpt(p, split, split_weights, int(n)) if n else None for (_, p), n in zip(present, counts)]
        return BlendedDataset(components, arrays["dataset_index"], arrays["dataset_sample_index"])
