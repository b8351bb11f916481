"""Megatron's memory-mapped indexed dataset: a `.bin` of raw tokens and an `.idx` that indexes it.

Layout of the `.idx` file (all little-endian), the same bytes Megatron-LM reads and writes:

    magic            9 bytes   b"MMIDIDX\\x00\\x00"
    version          uint64    1
    dtype code       uint8     1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16
    sequence count   uint64    N
    document count   uint64    M + 1   (the length of the document index array below)
    sequence lengths int32[N]  tokens in each sequence
    sequence offsets int64[N]  byte offset of each sequence in `.bin`
    document index   int64[M+1] document d is sequences [index[d], index[d+1]); index[0] = 0

`.bin` is the sequences' tokens back to back in the dtype above. `preprocess_data.py` writes one
sequence per document. Files from a Megatron-LM run with `--split-sentences` have several
sequences per document (a document is the contiguous run of its sequences' tokens). GPT
datasets split, shuffle and cut *sequences*, as Megatron-Core does; the document index is
only read back for inspection.

    IndexedDatasetWriter   streams documents to `.bin`, then writes the `.idx`
    IndexedDataset         memory-maps both files, validates them, serves token slices
"""

from __future__ import annotations

import os
import struct
from typing import Iterable, Optional, Sequence

import numpy as np

from megatron.core.datasets.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8
"""Bytes before the sequence-length array: magic, version, dtype code, two counts."""

DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
CODE_OF_DTYPE: dict[np.dtype, int] = {dtype: code for code, dtype in DTYPE_CODES.items()}


class IndexedDatasetError(DataError):
    """A `.bin/.idx` pair that cannot be read: `<file>: <what is wrong>; <what to do>`."""


REDO = "preprocess the data again (tools/preprocess_data.py) or copy the file again"


def optimal_dtype(vocab_size: Optional[int]) -> np.dtype:
    """Token dtype Megatron picks for a vocabulary: uint16 below 65500 ids, else int32."""
    return np.dtype(np.uint16) if vocab_size is not None and vocab_size < 65500 else np.dtype(np.int32)


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def sequence_starts(lengths_N: np.ndarray) -> np.ndarray:
    """int64[N+1]: token offset of each sequence when they lie back to back, plus the total."""
    starts = np.zeros(len(lengths_N) + 1, dtype=np.int64)
    np.cumsum(lengths_N, dtype=np.int64, out=starts[1:])
    return starts


def encode_index(dtype: np.dtype, sequence_lengths: np.ndarray, document_index: np.ndarray) -> bytes:
    """The exact bytes of an `.idx` file for these sequence lengths and document index.

    sequence_lengths: int[N] tokens per sequence. document_index: int[M+1], starting at 0,
    non-decreasing, ending at N. Offsets are derived: sequences lie back to back in `.bin`.
    """
    dtype = np.dtype(dtype)
    lengths_N = np.asarray(sequence_lengths, dtype=np.int32)
    doc_index = np.asarray(document_index, dtype=np.int64)
    offsets_N = sequence_starts(lengths_N)[:-1] * dtype.itemsize
    header = MAGIC + struct.pack("<Q", VERSION) + struct.pack("<B", CODE_OF_DTYPE[dtype])
    header += struct.pack("<Q", len(lengths_N)) + struct.pack("<Q", len(doc_index))
    return header + lengths_N.astype("<i4").tobytes() + offsets_N.astype("<i8").tobytes() + doc_index.astype("<i8").tobytes()


class IndexedDatasetWriter:
    """Writes documents to `<prefix>.bin` as they come; `finalize` writes `<prefix>.idx`.

    Paths can be given separately so that a caller can write to temporary names and rename
    both files into place when done (see tools/preprocess_data.py).
    """

    def __init__(self, bin_file: str, dtype: np.dtype):
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise ValueError(f"dtype {self.dtype} has no Megatron code; use one of {sorted(map(str, CODE_OF_DTYPE))}")
        self.bin_file = bin_file
        self._stream = open(bin_file, "wb")
        self._lengths: list[int] = []
        self._document_index: list[int] = [0]

    def add_document(self, tokens: Sequence[int] | np.ndarray, sequence_lengths: Optional[Sequence[int]] = None) -> None:
        """Append one document. Its tokens form one sequence unless `sequence_lengths` splits them."""
        array = np.asarray(tokens, dtype=self.dtype)
        lengths = [len(array)] if sequence_lengths is None else [int(n) for n in sequence_lengths]
        if sum(lengths) != len(array):
            raise ValueError(f"sequence lengths sum to {sum(lengths)} but the document has {len(array)} tokens")
        self._stream.write(array.tobytes(order="C"))
        self._lengths.extend(lengths)
        self._document_index.append(len(self._lengths))

    def add_documents(self, documents: Iterable[Sequence[int] | np.ndarray]) -> None:
        for tokens in documents:
            self.add_document(tokens)

    def finalize(self, idx_file: str) -> None:
        """Close `.bin` and write the index of everything added to `idx_file`."""
        self._stream.close()
        with open(idx_file, "wb") as f:
            f.write(encode_index(self.dtype, np.asarray(self._lengths, dtype=np.int64), self._document_index))

    def close(self) -> None:
        """Close `.bin` without writing an index (an abandoned write)."""
        self._stream.close()

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, *exc) -> None:
        if not self._stream.closed:
            self._stream.close()


def write_dataset(prefix: str, documents: Iterable[Sequence[int] | np.ndarray], dtype: np.dtype) -> None:
    """Write `<prefix>.bin/.idx` holding `documents` (one sequence each)."""
    with IndexedDatasetWriter(bin_path(prefix), dtype) as writer:
        writer.add_documents(documents)
        writer.finalize(idx_path(prefix))


class IndexedDataset:
    """Read-only view of `<prefix>.bin/.idx`, memory-mapped, validated when opened.

    Attributes (numpy arrays backed by the `.idx` map):
        sequence_lengths  int32[N]
        sequence_offsets  int64[N]   byte offsets into `.bin`
        sequence_starts   int64[N+1] token offset of each sequence in `tokens`, plus the total
        document_index    int64[M+1]
        tokens            dtype[total tokens], the whole `.bin`
        document_lengths  int64[M]   tokens in each document

    Sequences are addressed by `dataset[i]` (as Megatron does); documents by `document(d)`.
    Pickling keeps only the prefix, so DataLoader workers reopen the maps instead of copying.
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        self._open()

    def __getstate__(self) -> dict:
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.prefix = state["prefix"]
        self._open()

    def _open(self) -> None:
        index_file, data_file = idx_path(self.prefix), bin_path(self.prefix)
        for path in (index_file, data_file):
            if not os.path.isfile(path):
                raise IndexedDatasetError(f"{path}: no such file; give the prefix of a .bin/.idx pair")
        header = _read_header(index_file)
        self.dtype, num_sequences, num_doc_entries = header
        index = np.memmap(index_file, dtype=np.uint8, mode="r")
        lengths_at = HEADER_BYTES
        offsets_at = lengths_at + 4 * num_sequences
        documents_at = offsets_at + 8 * num_sequences
        end = documents_at + 8 * num_doc_entries
        size = len(index)
        # Megatron's multimodal files append one int8 mode per sequence; nothing else may follow.
        if size < end:
            raise IndexedDatasetError(
                f"{index_file}: truncated: its header promises {num_sequences} sequences and "
                f"{num_doc_entries} document-index entries ({end} bytes) but the file has {size} bytes; {REDO}")
        if size not in (end, end + num_sequences):
            raise IndexedDatasetError(
                f"{index_file}: corrupt: {size - end} unexpected bytes after the document index; {REDO}")
        self.sequence_lengths = index[lengths_at:offsets_at].view("<i4")
        self.sequence_offsets = index[offsets_at:documents_at].view("<i8")
        self.document_index = index[documents_at:end].view("<i8")
        self.sequence_starts = sequence_starts(self.sequence_lengths)
        self._validate_index(index_file)
        total_tokens = int(self.sequence_starts[-1])
        expected = total_tokens * self.dtype.itemsize
        actual = os.path.getsize(data_file)
        if actual != expected:
            what = "truncated" if actual < expected else "larger than its index says"
            raise IndexedDatasetError(
                f"{data_file}: {what}: {os.path.basename(index_file)} describes {total_tokens} tokens of "
                f"{self.dtype} ({expected} bytes) but the file has {actual} bytes; {REDO}")
        self.tokens = (np.memmap(data_file, dtype=self.dtype, mode="r") if total_tokens
                       else np.empty(0, dtype=self.dtype))
        self.document_lengths = np.diff(self.sequence_starts[self.document_index])
        """int64[M]: tokens in each document (the sum of its sequences)."""

    def _validate_index(self, index_file: str) -> None:
        lengths, offsets, documents = self.sequence_lengths, self.sequence_offsets, self.document_index
        if len(lengths) and lengths.min() < 0:
            raise IndexedDatasetError(f"{index_file}: corrupt: negative sequence length; {REDO}")
        if not np.array_equal(offsets, self.sequence_starts[:-1] * self.dtype.itemsize):
            raise IndexedDatasetError(f"{index_file}: corrupt: sequence byte offsets do not follow the lengths; {REDO}")
        if len(documents) == 0 or documents[0] != 0 or documents[-1] != len(lengths) or np.any(np.diff(documents) < 0):
            raise IndexedDatasetError(
                f"{index_file}: corrupt: the document index must rise from 0 to the sequence count "
                f"({len(lengths)}); {REDO}")

    # ------------------------------------------------------------------ sizes
    def __len__(self) -> int:
        """Number of sequences (Megatron's length of an indexed dataset)."""
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_index) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_starts[-1])

    # ------------------------------------------------------------------ access
    def __getitem__(self, i: int) -> np.ndarray:
        """Tokens of sequence i (a view into the map)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} out of range for {len(self)} sequences in {self.prefix}")
        i %= len(self)
        return self.tokens[self.sequence_starts[i]:self.sequence_starts[i + 1]]

    def get(self, i: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """`length` tokens of sequence i from `offset` (Megatron's `get`)."""
        sequence = self[i]
        return sequence[offset:] if length is None else sequence[offset:offset + length]

    def document(self, d: int) -> np.ndarray:
        """Tokens of document d, all its sequences back to back."""
        first, last = self.document_index[d], self.document_index[d + 1]
        return self.tokens[self.sequence_starts[first]:self.sequence_starts[last]]


def _read_header(index_file: str) -> tuple[np.dtype, int, int]:
    """(token dtype, sequence count, document-index entries) from the first bytes of `.idx`."""
    with open(index_file, "rb") as f:
        head = f.read(HEADER_BYTES)
    if not head.startswith(MAGIC):
        if MAGIC.startswith(head):
            raise IndexedDatasetError(f"{index_file}: truncated: {len(head)} bytes, shorter than the header; {REDO}")
        raise IndexedDatasetError(
            f"{index_file}: not a Megatron indexed dataset (magic {head[:len(MAGIC)]!r}, expected {MAGIC!r}); "
            f"give the .idx written with its .bin by tools/preprocess_data.py or Megatron-LM")
    if len(head) < HEADER_BYTES:
        raise IndexedDatasetError(
            f"{index_file}: truncated: {len(head)} bytes, shorter than the {HEADER_BYTES}-byte header; {REDO}")
    (version,) = struct.unpack("<Q", head[9:17])
    if version != VERSION:
        raise IndexedDatasetError(
            f"{index_file}: index version {version}; only version {VERSION} is known; {REDO}")
    code = head[17]
    if code not in DTYPE_CODES:
        raise IndexedDatasetError(
            f"{index_file}: corrupt: unknown dtype code {code} (known: {sorted(DTYPE_CODES)}); {REDO}")
    num_sequences, num_doc_entries = struct.unpack("<QQ", head[18:34])
    return DTYPE_CODES[code], num_sequences, num_doc_entries
