"""Datasets and loaders for the loop: train, validation and test, for this data-parallel rank.

Training batches follow Megatron's sampler from `consumed_train_samples`, so a resumed run
sees exactly the next batch. Validation and test use the same first `eval_iters` global
batches at every evaluation, so successive validation losses are comparable.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from megatron.core.config import Config
from megatron.core.datasets.mock_dataset import MockGPTDataset
from megatron.core.datasets.samplers import MegatronPretrainingSampler
from megatron.core.parallel_state import ProcessGroups


def num_samples(cfg: Config) -> tuple[int, int, int]:
    """Samples each split must provide: the whole run for train, one evaluation for the others."""
    t = cfg.training
    evals = t.eval_iters * t.global_batch_size
    return t.train_iters * t.global_batch_size, evals, evals


def build_datasets(cfg: Config, groups: Optional[ProcessGroups] = None
                   ) -> tuple[Dataset, Optional[Dataset], Optional[Dataset]]:
    """Train, validation and test datasets (None for a split with no samples or no data)."""
    n_train, n_valid, n_test = num_samples(cfg)
    d, m = cfg.data, cfg.model
    if d.mock_data:
        vocab = d.vocab_size or m.vocab_size
        make = lambda n, split: MockGPTDataset(n, m.seq_length, vocab, cfg.training.seed, split) if n else None
        return make(n_train, "train"), make(n_valid, "valid"), make(n_test, "test")
    from megatron.core.datasets.builder import build_gpt_datasets

    return build_gpt_datasets(cfg, (n_train, n_valid, n_test), groups)


def build_loader(dataset: Dataset, cfg: Config, groups: ProcessGroups, consumed_samples: int = 0) -> DataLoader:
    sampler = MegatronPretrainingSampler(len(dataset), consumed_samples, cfg.training.micro_batch_size,
                                         groups.dp_rank, groups.dp_size)
    workers = cfg.data.num_workers
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=groups.device.type == "cuda",
        persistent_workers=False,
        # A private generator keeps worker seeding from consuming the global RNG, so a resumed
        # run's dropout stream matches the uninterrupted run's.
        generator=torch.Generator().manual_seed(cfg.training.seed),
        prefetch_factor=4 if workers else None,
    )


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def micro_batches(loader: DataLoader, device: torch.device) -> Iterator[dict]:
    for batch in loader:
        yield to_device(batch, device)
