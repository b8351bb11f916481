"""Synthetic GPT data that needs no files: deterministic, and learnable so the loss falls.

Sequences are random walks on a fixed sparse "grammar": every token v has `branching`
possible successors, drawn once from the seed. Sample i is generated from (seed, split, i)
alone, so any rank, worker or resumed run sees exactly the same sample for the same index.
A model that learns the grammar reaches a loss of ln(branching) (1.386 nats for 4), far
below the ln(V) it starts at.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

SPLITS = {"train": 0, "valid": 1, "test": 2}


class MockGPTDataset(Dataset):
    """num_samples samples of `seq_length` tokens (+1 for the shifted labels)."""

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int = 1234,
                 split: str = "train", branching: int = 4):
        self.num_samples = num_samples
        self.seq_length = seq_length
        self.vocab_size = vocab_size
        self.seed = seed
        self.split_id = SPLITS[split]
        rng = np.random.default_rng([seed, 7919])
        self.successors = rng.integers(0, vocab_size, size=(vocab_size, branching))

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.split_id, int(idx)])
        choices = rng.integers(0, self.successors.shape[1], size=self.seq_length)
        tokens = np.empty(self.seq_length + 1, dtype=np.int64)
        tokens[0] = rng.integers(0, self.vocab_size)
        for t in range(self.seq_length):
            tokens[t + 1] = self.successors[tokens[t], choices[t]]
        return sample_from_tokens(torch.from_numpy(tokens))


def sample_from_tokens(tokens_S1: torch.Tensor, eod_token: int | None = None) -> dict[str, torch.Tensor]:
    """seq_length+1 tokens -> the model's inputs, labels, loss mask and positions."""
    tokens = tokens_S1[:-1].contiguous()
    labels = tokens_S1[1:].contiguous()
    loss_mask = torch.ones(tokens.shape, dtype=torch.float32)
    if eod_token is not None:  # Megatron's --eod-mask-loss: no loss where the input is end-of-document
        loss_mask[tokens == eod_token] = 0.0
    position_ids = torch.arange(tokens.shape[0], dtype=torch.int64)
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}
