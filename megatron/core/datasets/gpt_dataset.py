"""GPT samples: `seq_length + 1` tokens cut from a stream of shuffled documents.

For one split (a range of document ids) of one indexed dataset, three arrays define it all:

    document_index  int32[E*M]    the split's M document ids, shuffled afresh in each of E epochs
    sample_index    int[N, 2]     where sample i starts: (position in document_index, token offset)
    shuffle_index   int[n]        the order samples are served in: samples of epoch 0 shuffled,
                                  then those of epoch 1 shuffled, ...; n = the requested count

Concatenating the documents in `document_index` order gives one token stream; sample i is
tokens [i*S, i*S + S] of it (S + 1 tokens, so neighbouring samples share one token, as in
Megatron-LM: the last input token of one sample is the first of the next). E is the fewest
epochs whose tokens cover the requested samples. The arrays are built with vectorised numpy
(no compiled helpers) and cached as `.npy` files by `index_cache`.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from megatron.core.datasets.index_cache import digest, load_or_build
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.mock_dataset import sample_from_tokens
from megatron.core.parallel_state import ProcessGroups

SPLIT_NAMES = ("train", "valid", "test")
INDEX_NAMES = ("document_index", "sample_index", "shuffle_index")


# ---------------------------------------------------------------------- splits
def parse_split(split: str) -> list[float]:
    """`--split '969,30,1'` (or `969/30/1`) -> normalised [train, valid, test] weights."""
    try:
        weights = [float(w) for w in split.replace("/", ",").split(",")]
    except ValueError:
        raise ValueError(f"--split {split!r}: give comma-separated numbers such as 969,30,1") from None
    if not 1 <= len(weights) <= 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"--split {split!r}: give up to three non-negative weights, not all zero, such as 969,30,1")
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    return [w / total for w in weights]


def split_boundaries(weights: list[float], num_documents: int) -> list[int]:
    """Document-id boundaries [0, a, b, num_documents] of the train/valid/test ranges.

    Each split gets round(weight * num_documents) documents; any rounding excess is taken off
    the later boundaries (Megatron-LM's rule, so both frameworks split a corpus identically).
    """
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + int(round(w * num_documents)))
    excess = bounds[-1] - num_documents
    return [bounds[0]] + [b - excess for b in bounds[1:]]


# ---------------------------------------------------------------------- index building
def num_epochs_needed(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Fewest epochs whose tokens give `num_samples` samples of seq_length + 1 tokens."""
    return max(1, math.ceil((num_samples * seq_length + 1) / tokens_per_epoch))


def build_document_index(document_ids_M: np.ndarray, num_epochs: int, rng: np.random.Generator) -> np.ndarray:
    """int32[E*M]: each epoch a fresh permutation of the document ids."""
    ids = np.asarray(document_ids_M, dtype=np.int32)
    return np.concatenate([rng.permutation(ids) for _ in range(num_epochs)]) if len(ids) else ids


def build_sample_index(lengths_in_order: np.ndarray, seq_length: int) -> np.ndarray:
    """[N, 2] start of every complete sample: (position in the document index, token offset).

    lengths_in_order: int[E*M] tokens of each document in document-index order. Sample i starts
    at token i*seq_length of the concatenated stream; N = (total tokens - 1) // seq_length.
    Empty documents are skipped naturally (a start never lands inside one).
    """
    ends = np.cumsum(lengths_in_order, dtype=np.int64)
    total = int(ends[-1]) if len(ends) else 0
    n = max(total - 1, 0) // seq_length
    starts = np.arange(n, dtype=np.int64) * seq_length
    position = np.searchsorted(ends, starts, side="right")
    offset = starts - (ends[position] - lengths_in_order[position])
    fits32 = len(lengths_in_order) < 2**31 and (len(offset) == 0 or int(offset.max()) < 2**31)
    return np.stack([position, offset], axis=1).astype(np.int32 if fits32 else np.int64)


def build_shuffle_index(num_samples: int, samples_per_epoch_start: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The first `num_samples` of: epoch 0's samples permuted, then epoch 1's, and so on.

    samples_per_epoch_start: int[E+1], the first sample id starting in each epoch (and N).
    """
    pieces, have = [], 0
    for lo, hi in zip(samples_per_epoch_start[:-1], samples_per_epoch_start[1:]):
        if have >= num_samples:
            break
        pieces.append(lo + rng.permutation(int(hi - lo)))
        have += int(hi - lo)
    order = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    return order[:num_samples].astype(np.int64 if order.size and order.max() >= 2**32 else np.uint32)


def build_indices(document_lengths: np.ndarray, document_ids_M: np.ndarray, seq_length: int,
                  num_samples: int, seed: int) -> dict[str, np.ndarray]:
    """The three index arrays of a split; see the module docstring. Pure and deterministic."""
    tokens_per_epoch = int(document_lengths[document_ids_M].sum(dtype=np.int64))
    epochs = num_epochs_needed(tokens_per_epoch, seq_length, num_samples)
    document_index = build_document_index(document_ids_M, epochs, np.random.default_rng([seed, 0]))
    lengths_in_order = document_lengths[document_index]
    sample_index = build_sample_index(lengths_in_order, seq_length)
    epoch_starts = np.ceil(np.arange(epochs + 1) * tokens_per_epoch / seq_length).astype(np.int64)
    epoch_starts = np.minimum(epoch_starts, len(sample_index))
    shuffle_index = build_shuffle_index(num_samples, epoch_starts, np.random.default_rng([seed, 1]))
    return {"document_index": document_index, "sample_index": sample_index, "shuffle_index": shuffle_index}


# ---------------------------------------------------------------------- the dataset
class GPTDataset(Dataset):
    """`num_samples` samples from documents [lo, hi) of an indexed dataset.

    Item i is the dict of `sample_from_tokens`: tokens, labels, loss_mask, position_ids, each
    of length seq_length (loss_mask zero where the input token is `eod_token`, when given).
    """

    def __init__(self, indexed: IndexedDataset, document_range: tuple[int, int], num_samples: int,
                 seq_length: int, seed: int, cache_dir: str, split_name: str = "train",
                 eod_token: Optional[int] = None, groups: Optional[ProcessGroups] = None,
                 log: Callable[[str], None] = lambda message: None):
        lo, hi = document_range
        if not 0 <= lo < hi <= indexed.num_documents:
            raise ValueError(f"document range [{lo}, {hi}) is empty or outside the {indexed.num_documents} "
                             f"documents of {indexed.prefix}")
        self.indexed = indexed
        self.seq_length = seq_length
        self.num_samples = num_samples
        self.eod_token = eod_token
        self.document_lengths = indexed.document_lengths
        self.document_starts = indexed.document_starts
        split_lengths = self.document_lengths[lo:hi]
        if split_lengths.sum() == 0:
            raise ValueError(f"{indexed.prefix}: documents [{lo}, {hi}) ({split_name}) hold no tokens")
        description = {
            "class": type(self).__name__,
            "dataset": os.path.basename(indexed.prefix),
            "split": split_name,
            "document_range": [lo, hi],
            "document_lengths_sha256": digest(split_lengths),
            "seq_length": seq_length,
            "num_samples": num_samples,
            "seed": seed,
        }
        document_ids = np.arange(lo, hi, dtype=np.int64)
        arrays = load_or_build(
            cache_dir, f"{os.path.basename(indexed.prefix)}-{split_name}", description, INDEX_NAMES,
            lambda: build_indices(self.document_lengths, document_ids, seq_length, num_samples, seed), groups, log)
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]
        if len(self.shuffle_index) != num_samples:
            raise ValueError(f"index cache for {indexed.prefix} ({split_name}) is inconsistent; delete {cache_dir}")

    def __len__(self) -> int:
        return self.num_samples

    def sample_tokens(self, i: int) -> np.ndarray:
        """int64[seq_length + 1]: the tokens of sample i (in served order)."""
        position, offset = (int(v) for v in self.sample_index[self.shuffle_index[i]])
        need = self.seq_length + 1
        pieces = []
        while need > 0:
            doc = self.document_index[position]
            start = self.document_starts[doc] + offset
            take = min(need, int(self.document_lengths[doc]) - offset)
            pieces.append(self.indexed.tokens[start:start + take])
            need -= take
            position += 1
            offset = 0
        return np.concatenate(pieces).astype(np.int64)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples} samples")
        return sample_from_tokens(torch.from_numpy(self.sample_tokens(i)), self.eod_token)
