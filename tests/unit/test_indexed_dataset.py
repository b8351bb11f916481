"""The `.bin/.idx` format: exact bytes, round trips, Megatron-LM-written files, corrupt files."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from megatron.core.datasets.indexed_dataset import (
    DTYPE_CODES,
    IndexedDataset,
    IndexedDatasetError,
    IndexedDatasetWriter,
    optimal_dtype,
    write_dataset,
)


def hand_built_idx(dtype_code: int, itemsize: int, sequence_lengths: list[int], document_index: list[int]) -> bytes:
    """The `.idx` bytes, spelled out field by field from the format description (docs/architecture.md)."""
    out = b"MMIDIDX\x00\x00"
    out += (1).to_bytes(8, "little")  # version
    out += bytes([dtype_code])
    out += len(sequence_lengths).to_bytes(8, "little")
    out += len(document_index).to_bytes(8, "little")  # entries of the document index: documents + 1
    for n in sequence_lengths:
        out += n.to_bytes(4, "little", signed=True)
    offset = 0
    for n in sequence_lengths:
        out += offset.to_bytes(8, "little", signed=True)
        offset += n * itemsize
    for d in document_index:
        out += d.to_bytes(8, "little", signed=True)
    return out


def test_idx_bytes_match_hand_built_layout(tmp_path):
    docs = [[5, 6, 7], [], [65000, 1], [42]]
    write_dataset(str(tmp_path / "d"), docs, np.uint16)
    expected = hand_built_idx(8, 2, [3, 0, 2, 1], [0, 1, 2, 3, 4])
    assert (tmp_path / "d.idx").read_bytes() == expected
    assert (tmp_path / "d.bin").read_bytes() == struct.pack("<6H", 5, 6, 7, 65000, 1, 42)


@pytest.mark.parametrize("code", sorted(DTYPE_CODES))
def test_round_trip_every_dtype(tmp_path, code):
    dtype = DTYPE_CODES[code]
    rng = np.random.default_rng(code)
    docs = [rng.integers(0, 100, size=n).astype(dtype) for n in (4, 1, 0, 9)]
    if dtype.kind == "f":
        docs[0] = np.array([0.5, -1.25, 3.0, 1e-3], dtype=dtype)
    write_dataset(str(tmp_path / "d"), docs, dtype)
    ds = IndexedDataset(str(tmp_path / "d"))
    assert ds.dtype == dtype
    assert (tmp_path / "d.idx").read_bytes()[17] == code
    assert len(ds) == ds.num_documents == 4
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(ds[i], doc)
        np.testing.assert_array_equal(ds.document(i), doc)
        assert ds[i].dtype == dtype
    np.testing.assert_array_equal(ds.document_lengths, [4, 1, 0, 9])
    np.testing.assert_array_equal(ds.get(3, offset=2, length=3), docs[3][2:5])


def test_reads_megatron_file_with_several_sequences_per_document(tmp_path):
    # Megatron-LM with --split-sentences: document 0 = sequences 0-1, document 1 = sequence 2.
    lengths, document_index = [2, 3, 1], [0, 2, 3]
    (tmp_path / "m.idx").write_bytes(hand_built_idx(4, 4, lengths, document_index))
    (tmp_path / "m.bin").write_bytes(np.array([1, 2, 3, 4, 5, 6], dtype="<i4").tobytes())
    ds = IndexedDataset(str(tmp_path / "m"))
    assert len(ds) == 3 and ds.num_documents == 2
    np.testing.assert_array_equal(ds[1], [3, 4, 5])
    np.testing.assert_array_equal(ds.document(0), [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(ds.document(1), [6])
    np.testing.assert_array_equal(ds.sequence_starts, [0, 2, 5, 6])


def test_writer_records_sequence_split_documents(tmp_path):
    with IndexedDatasetWriter(str(tmp_path / "w.bin"), np.int32) as writer:
        writer.add_document([1, 2, 3, 4, 5], sequence_lengths=[2, 3])
        writer.add_document([6])
        writer.finalize(str(tmp_path / "w.idx"))
    assert (tmp_path / "w.idx").read_bytes() == hand_built_idx(4, 4, [2, 3, 1], [0, 2, 3])
    with pytest.raises(ValueError, match="sum to"):
        IndexedDatasetWriter(str(tmp_path / "x.bin"), np.int32).add_document([1, 2], sequence_lengths=[3])


def test_optimal_dtype_follows_megatron():
    assert optimal_dtype(65499) == np.uint16
    assert optimal_dtype(65500) == np.int32
    assert optimal_dtype(None) == np.int32


@pytest.fixture
def small_dataset(tmp_path):
    prefix = str(tmp_path / "s")
    write_dataset(prefix, [[1, 2, 3], [4, 5], [6]], np.uint16)
    return prefix


@pytest.mark.parametrize("cut, message", [
    (5, "truncated"),            # inside the magic
    (20, "truncated"),           # inside the header
    (40, "truncated"),           # inside the sequence lengths
    (-3, "truncated"),           # inside the document index
])
def test_truncated_idx_is_a_clear_error(small_dataset, cut, message):
    data = open(small_dataset + ".idx", "rb").read()
    open(small_dataset + ".idx", "wb").write(data[:cut])
    with pytest.raises(IndexedDatasetError, match=message) as e:
        IndexedDataset(small_dataset)
    assert str(e.value).startswith(small_dataset + ".idx: ") and "preprocess the data again" in str(e.value)


@pytest.mark.parametrize("position, value, message", [
    (0, b"X", "not a Megatron indexed dataset"),
    (9, b"\x02", "version 2"),
    (17, b"\x09", "unknown dtype code 9"),
    (34, b"\x07", "offsets do not follow"),   # first sequence length 3 -> 7
])
def test_corrupt_idx_is_a_clear_error(small_dataset, position, value, message):
    data = bytearray(open(small_dataset + ".idx", "rb").read())
    data[position:position + 1] = value
    open(small_dataset + ".idx", "wb").write(bytes(data))
    with pytest.raises(IndexedDatasetError, match=message) as e:
        IndexedDataset(small_dataset)
    assert str(e.value).startswith(small_dataset + ".idx: ")


def test_bad_document_index_is_a_clear_error(tmp_path):
    (tmp_path / "b.idx").write_bytes(hand_built_idx(8, 2, [1, 1], [0, 3]))
    (tmp_path / "b.bin").write_bytes(b"\x00" * 4)
    with pytest.raises(IndexedDatasetError, match="document index"):
        IndexedDataset(str(tmp_path / "b"))


def test_trailing_garbage_in_idx_is_an_error(small_dataset):
    with open(small_dataset + ".idx", "ab") as f:
        f.write(b"\x00" * 11)
    with pytest.raises(IndexedDatasetError, match="unexpected bytes"):
        IndexedDataset(small_dataset)


@pytest.mark.parametrize("change, message", [(-2, "truncated"), (+2, "larger than its index")])
def test_bin_of_wrong_size_is_a_clear_error(small_dataset, change, message):
    data = open(small_dataset + ".bin", "rb").read()
    open(small_dataset + ".bin", "wb").write(data[:change] if change < 0 else data + b"\x00" * change)
    with pytest.raises(IndexedDatasetError, match=message) as e:
        IndexedDataset(small_dataset)
    assert str(e.value).startswith(small_dataset + ".bin: ")


def test_missing_file_is_a_clear_error(small_dataset):
    os.unlink(small_dataset + ".bin")
    with pytest.raises(IndexedDatasetError, match="no such file") as e:
        IndexedDataset(small_dataset)
    assert str(e.value).startswith(small_dataset + ".bin: ")


def test_pickles_by_prefix_not_by_content(small_dataset):
    import pickle

    ds = IndexedDataset(small_dataset)
    blob = pickle.dumps(ds)
    assert len(blob) < 200 + len(small_dataset)
    np.testing.assert_array_equal(pickle.loads(blob).document(1), [4, 5])


def test_error_raised_in_a_loader_worker_is_still_one_line(small_dataset):
    """DataLoader re-raises a worker's exception as type(text of its traceback), through torch's
    ExceptionWrapper (used here directly: a failed loader's workers take seconds to shut down)."""
    from torch._utils import ExceptionWrapper

    data = bytearray(open(small_dataset + ".idx", "rb").read())
    data[17] = 42
    open(small_dataset + ".idx", "wb").write(bytes(data))
    try:
        IndexedDataset(small_dataset)
    except IndexedDatasetError as e:
        direct, wrapped = str(e), ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(IndexedDatasetError) as from_worker:
        wrapped.reraise()
    assert str(from_worker.value) == direct and "\n" not in direct
