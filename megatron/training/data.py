"""Datasets and loaders for the loop: train, validation and test, for this data-parallel rank.

As in Megatron-LM, each split is asked for (`num_samples`):
    train  --train-samples, or train_iters * global_batch_size
    valid  (train_iters // eval_interval + 1) * eval_iters * global_batch_size
    test   eval_iters * global_batch_size
Training batches follow Megatron's sampler from `consumed_train_samples`, so a resumed run sees
exactly the next batch. Validation reads one loader from `consumed_valid_samples`: every
evaluation continues where the previous one stopped, also across a resume. The test set is
read once, from its first sample.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from megatron.core.config import Config
from megatron.core.datasets.errors import DataError
from megatron.core.datasets.gpt_dataset import SPLIT_NAMES
from megatron.core.datasets.mock_dataset import MockGPTDataset
from megatron.core.datasets.samplers import MegatronPretrainingSampler
from megatron.core.parallel_state import ProcessGroups

SIZE_FLAGS = ("--train-iters (or --train-samples) x --global-batch-size",
              "(--train-iters // --eval-interval + 1) x --eval-iters x --global-batch-size",
              "--eval-iters x --global-batch-size")


def num_samples(cfg: Config) -> tuple[int, int, int]:
    """Samples each split must provide (Megatron-LM's `get_train_valid_test_num_samples`)."""
    t = cfg.training
    train = t.train_samples if t.train_samples is not None else t.train_iters * t.global_batch_size
    valid = (t.train_iters // t.eval_interval + 1) * t.eval_iters * t.global_batch_size
    return train, valid, t.eval_iters * t.global_batch_size


def build_datasets(cfg: Config, groups: Optional[ProcessGroups] = None
                   ) -> tuple[Dataset, Optional[Dataset], Optional[Dataset]]:
    """Train, validation and test datasets (None for a split with no samples or no data).

    Raises DataError when a dataset holds fewer samples than its split needs (only an
    unweighted blend can: it holds one epoch of each dataset)."""
    sizes = num_samples(cfg)
    d, m = cfg.data, cfg.model
    if d.mock_data:
        vocab = d.vocab_size or m.vocab_size
        make = lambda n, split: MockGPTDataset(n, m.seq_length, vocab, cfg.training.seed, split) if n else None
        return make(sizes[0], "train"), make(sizes[1], "valid"), make(sizes[2], "test")
    from megatron.core.datasets.builder import build_gpt_datasets

    datasets = build_gpt_datasets(cfg, sizes, groups)
    path_flags = ["--data-path"] * 3 if d.data_path else ["--train-data-path", "--valid-data-path", "--test-data-path"]
    for name, dataset, size, flags, path_flag in zip(SPLIT_NAMES, datasets, sizes, SIZE_FLAGS, path_flags):
        if dataset is not None and len(dataset) < size:
            raise DataError(f"{path_flag}: the {name} blend holds {len(dataset)} samples but {flags} needs {size}; "
                            f"a blend without weights holds one epoch of each dataset: give weights "
                            f"(0.5 A 0.5 B) to draw more epochs")
    return datasets


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
