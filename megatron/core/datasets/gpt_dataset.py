"""GPT samples: `seq_length + 1` tokens cut from a stream of shuffled sequences, built exactly as
Megatron-Core 0.16 builds them, so the same flags serve the same samples in the same order.

The unit is the *sequence* of the `.idx` file (one per document as preprocess_data.py writes;
several per document in files from Megatron-LM's `--split-sentences`). For one split, a range
[lo, hi) of sequence ids, three arrays define everything:

    document_index  int32[E*M]      the split's M sequence ids once per epoch, shuffled
    sample_index    int[N+1, 2]     where sample j starts: (position in document_index, offset)
    shuffle_index   uint32[N]       the order samples are served in

The recipe, with one `numpy.random.RandomState(seed)` used first for the document index and then
for the shuffle index:
- E is the fewest epochs whose T tokens each give the requested samples: E*T >= n*S + 1
  (one epoch when no count is requested, as in an unweighted blend).
- All E epochs' ids are shuffled together, unless E > 1 and the last epoch contributes fewer
  than int(0.8 * samples per epoch) samples: then epochs 1..E-1 are shuffled together and the
  last epoch separately ("separate final epoch").
- Concatenating the sequences in document-index order gives one token stream; sample j is
  tokens [j*S, j*S + S] of it (neighbouring samples share one token). N = (E*T - 1) // S.
- The shuffle index permutes all N samples; with a separate final epoch it permutes the
  samples before the final epoch, then the rest, separately.
The dataset's length is N, every built sample (not the requested count). The arrays are built
with vectorised numpy and cached as `.npy` files by `index_cache`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from megatron.core.datasets.data_paths import normalize
from megatron.core.datasets.errors import DataError
from megatron.core.datasets.index_cache import digest, load_or_build
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetError, bin_path
from megatron.core.datasets.mock_dataset import sample_from_tokens
from megatron.core.parallel_state import ProcessGroups

SPLIT_NAMES = ("train", "valid", "test")
INDEX_NAMES = ("document_index", "sample_index", "shuffle_index")
SEPARATE_FINAL_EPOCH_BELOW = 0.80
"""A last epoch supplying fewer than this share of an epoch's samples is shuffled separately."""
NO_PAD = -1
"""Megatron-Core's pad id when the tokenizer has no distinct one: an id no uint16 data holds."""


# ---------------------------------------------------------------------- splits
def parse_split(split: str) -> list[float]:
    """`--split '969,30,1'` (or `969/30/1`) -> [train, valid, test] weights normalised in float64."""
    try:
        weights = [float(w) for w in split.replace("/", ",").split(",")]
    except ValueError:
        raise ValueError(f"--split {split!r}: give comma-separated numbers such as 969,30,1") from None
    if not 1 <= len(weights) <= 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"--split {split!r}: give up to three non-negative weights, not all zero, such as 969,30,1")
    return normalize(weights + [0.0] * (3 - len(weights)))


def split_bookends(weights: list[float]) -> list[Optional[tuple[float, float]]]:
    """Per split, its (start, end) fraction of the data: cumulative sums of the normalised
    weights, added left to right in Python floats; None for a split of zero weight."""
    cumulative = [0.0]
    for w in weights:
        cumulative.append(cumulative[-1] + w)
    return [(a, b) if b > a else None for a, b in zip(cumulative[:-1], cumulative[1:])]


def split_range(bookend: tuple[float, float], num_sequences: int) -> tuple[int, int]:
    """Sequence ids [lo, hi) of a split: each end is round(fraction * num_sequences), with
    Python's round (half to even)."""
    return int(round(bookend[0] * float(num_sequences))), int(round(bookend[1] * float(num_sequences)))


# ---------------------------------------------------------------------- index building
def num_epochs_needed(tokens_per_epoch: int, seq_length: int, num_samples: Optional[int]) -> int:
    """Fewest epochs whose tokens give `num_samples` samples (one epoch when None)."""
    if num_samples is None:
        return 1
    return max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))


def samples_before_separate_final_epoch(tokens_per_epoch: int, seq_length: int, num_samples: Optional[int],
                                        num_epochs: int) -> Optional[int]:
    """Samples built from the epochs before the last when the last epoch is shuffled separately,
    else None (all epochs shuffled together)."""
    if num_epochs == 1 or num_samples is None:
        return None
    before = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
    per_epoch = (tokens_per_epoch - 1) // seq_length
    from_final = num_samples - before
    return before if from_final < int(SEPARATE_FINAL_EPOCH_BELOW * per_epoch) else None


def build_document_index(sequence_ids_M: np.ndarray, num_epochs: int, separate_final: bool,
                         rng: np.random.RandomState) -> np.ndarray:
    """int32[E*M]: the ids repeated once per epoch and shuffled in place by `rng`, all epochs
    together, or the first E-1 together and then the last one alone."""

    def shuffled(epochs: int) -> np.ndarray:
        index = np.tile(np.asarray(sequence_ids_M, dtype=np.int32), epochs)
        rng.shuffle(index)
        return index

    if not separate_final or num_epochs == 1:
        return shuffled(num_epochs)
    first = shuffled(num_epochs - 1)
    return np.concatenate([first, shuffled(1)])


def build_sample_index(lengths_in_order: np.ndarray, seq_length: int, num_samples: int,
                       dtype: np.dtype) -> np.ndarray:
    """[num_samples + 1, 2]: (position in the document index, token offset) where each sample
    starts, plus where the last one ends.

    lengths_in_order: int[E*M] tokens of each sequence in document-index order. Row j > 0 is
    the sequence holding token j*S of the stream (empty sequences never hold one); row 0 is
    (0, 0). Sample j is tokens from row j up to row j+1's token, inclusive.
    """
    ends = np.cumsum(lengths_in_order, dtype=np.int64)
    starts = np.arange(1, num_samples + 1, dtype=np.int64) * seq_length
    position = np.searchsorted(ends, starts, side="right")
    offset = starts - (ends[position] - lengths_in_order[position])
    index = np.zeros((num_samples + 1, 2), dtype=dtype)
    index[1:, 0] = position
    index[1:, 1] = offset
    return index


def build_shuffle_index(num_first: int, total: int, rng: np.random.RandomState) -> np.ndarray:
    """[total]: a permutation of [0, num_first) followed by one of [num_first, total)."""
    dtype = np.uint32 if total < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_first, dtype=dtype)
    rng.shuffle(first)
    if num_first == total:
        return first
    last = np.arange(num_first, total, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate([first, last])


def build_indices(sequence_lengths: np.ndarray, sequence_ids_M: np.ndarray, seq_length: int,
                  num_samples: Optional[int], seed: int) -> dict[str, np.ndarray]:
    """The three index arrays of a split; see the module docstring. Pure and deterministic.

    sequence_lengths: int32[all sequences of the dataset]; sequence_ids_M: the split's ids.
    """
    tokens_per_epoch = int(np.sum(sequence_lengths[sequence_ids_M], dtype=np.int64))
    epochs = num_epochs_needed(tokens_per_epoch, seq_length, num_samples)
    before_final = samples_before_separate_final_epoch(tokens_per_epoch, seq_length, num_samples, epochs)
    rng = np.random.RandomState(seed)
    document_index = build_document_index(sequence_ids_M, epochs, before_final is not None, rng)
    total = (epochs * tokens_per_epoch - 1) // seq_length
    fits32 = max(len(document_index), int(sequence_lengths.max())) <= np.iinfo(np.int32).max
    sample_index = build_sample_index(sequence_lengths[document_index], seq_length, total,
                                      np.dtype(np.int32 if fits32 else np.int64))
    shuffle_index = build_shuffle_index(total if before_final is None else before_final, total, rng)
    return {"document_index": document_index, "sample_index": sample_index, "shuffle_index": shuffle_index}


# ---------------------------------------------------------------------- serving samples
@dataclass(frozen=True)
class TokenRules:
    """What a sample does with particular ids, as Megatron-Core's GPTDataset does.

    eod_mask:   no loss where the *input* token is this id (`--eod-mask-loss`), or None.
    pad:        no loss where the *label* is this id, and the id replaced by 0 in tokens and
                labels. The tokenizer's pad id, or NO_PAD when it has none or it equals its
                eos/eod id (see `pad_id`).
    vocab_size: every other id must lie in [0, vocab_size), the model's embedding rows;
                None skips the check.
    """

    eod_mask: Optional[int] = None
    pad: int = NO_PAD
    vocab_size: Optional[int] = None


def pad_id(tokenizer) -> int:
    """The id Megatron-Core treats as padding for this tokenizer: its `pad`, unless it has none
    or it collides with its eos or eod id (Megatron-Core then masks nothing)."""
    pad = getattr(tokenizer, "pad", None)
    if pad is None or pad in (getattr(tokenizer, "eos", None), tokenizer.eod):
        return NO_PAD
    return int(pad)


def sample_from_megatron_tokens(tokens_S1: torch.Tensor, rules: TokenRules) -> dict[str, torch.Tensor]:
    """seq_length+1 tokens -> tokens, labels, loss_mask, position_ids, with `rules.eod_mask` and
    `rules.pad` applied (in Megatron-Core's order: masks first, then pad ids replaced by 0)."""
    sample = sample_from_tokens(tokens_S1, rules.eod_mask)
    pad = rules.pad
    if bool((tokens_S1 == pad).any()):
        sample["loss_mask"][sample["labels"] == pad] = 0.0
        sample["tokens"][sample["tokens"] == pad] = 0
        sample["labels"][sample["labels"] == pad] = 0
    return sample


class GPTDataset(Dataset):
    """Samples from sequences [lo, hi) of an indexed dataset, at least `num_samples` of them
    (one epoch's worth when None); `len()` is every sample built.

    Item i is the dict of `sample_from_megatron_tokens`: tokens, labels, loss_mask,
    position_ids, each int64/float32[seq_length].
    """

    def __init__(self, indexed: IndexedDataset, sequence_range: tuple[int, int], num_samples: Optional[int],
                 seq_length: int, seed: int, cache_dir: str, split_name: str = "train",
                 rules: TokenRules = TokenRules(), groups: Optional[ProcessGroups] = None,
                 log: Callable[[str], None] = lambda message: None):
        lo, hi = sequence_range
        if not 0 <= lo < hi <= len(indexed):
            raise DataError(f"{bin_path(indexed.prefix)}: the {split_name} split, sequences [{lo}, {hi}), is empty "
                            f"or outside its {len(indexed)} sequences; change --split or use more data")
        self.indexed = indexed
        self.seq_length = seq_length
        self.num_samples = num_samples
        self.rules = rules
        split_lengths = indexed.sequence_lengths[lo:hi]
        if int(np.sum(split_lengths, dtype=np.int64)) == 0:
            raise DataError(f"{bin_path(indexed.prefix)}: the {split_name} split, sequences [{lo}, {hi}), holds "
                            f"no tokens; change --split or use more data")
        description = {
            "class": type(self).__name__,
            "dataset": os.path.basename(indexed.prefix),
            "split": split_name,
            "sequence_range": [lo, hi],
            "sequence_lengths_sha256": digest(split_lengths),
            "longest_sequence": int(indexed.sequence_lengths.max()),
            "seq_length": seq_length,
            "num_samples": num_samples,
            "seed": seed,
        }
        sequence_ids = np.arange(lo, hi, dtype=np.int32)
        arrays = load_or_build(
            cache_dir, f"{os.path.basename(indexed.prefix)}-{split_name}", description, INDEX_NAMES,
            lambda: build_indices(indexed.sequence_lengths, sequence_ids, seq_length, num_samples, seed),
            groups, log)
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]
        if len(self.shuffle_index) != len(self.sample_index) - 1 or len(self.shuffle_index) < (num_samples or 0):
            raise DataError(f"{cache_dir}: the index cache for {indexed.prefix} ({split_name}) is inconsistent; "
                            f"delete it and run again")

    def __len__(self) -> int:
        return len(self.shuffle_index)

    def sample_tokens(self, i: int) -> tuple[np.ndarray, list[int], list[int]]:
        """Served sample i: (int64[seq_length + 1] tokens, ids of the sequences they come from,
        tokens taken from each)."""
        j = int(self.shuffle_index[i])
        (first, start), (last, end) = ((int(p), int(o)) for p, o in self.sample_index[j:j + 2])
        starts = self.indexed.sequence_starts
        pieces, sequences = [], []
        for position in range(first, last + 1):
            sequence = int(self.document_index[position])
            lo = starts[sequence] + (start if position == first else 0)
            hi = starts[sequence] + end + 1 if position == last else starts[sequence + 1]
            pieces.append(self.indexed.tokens[lo:hi])
            sequences.append(sequence)
        return np.concatenate(pieces).astype(np.int64), sequences, [len(p) for p in pieces]

    def check_ids(self, tokens: np.ndarray, sequences: list[int], taken: list[int]) -> None:
        """Raise IndexedDatasetError naming the sequence when a token id is outside the vocabulary."""
        vocab, pad = self.rules.vocab_size, self.rules.pad
        if vocab is None or (tokens.max() < vocab and tokens.min() >= 0):
            return
        bad = ((tokens >= vocab) | (tokens < 0)) & (tokens != pad)
        if not bad.any():
            return
        at = int(np.argmax(bad))
        piece = int(np.searchsorted(np.cumsum(taken), at, side="right"))
        raise IndexedDatasetError(
            f"{bin_path(self.indexed.prefix)}: sequence {sequences[piece]} holds token id {int(tokens[at])}, outside "
            f"the model's vocabulary of {vocab} ids; train with the tokenizer the data was preprocessed with "
            f"(--tokenizer-type, --tokenizer-model, --vocab-size)")

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        tokens, sequences, taken = self.sample_tokens(i)
        self.check_ids(tokens, sequences, taken)
        return sample_from_megatron_tokens(torch.from_numpy(tokens), self.rules)
