"""GPT samples over documents: cutting, epochs, splits, blending, the index cache, resuming."""

from __future__ import annotations

import multiprocessing
import os
import shlex

import numpy as np
import pytest
import torch

from megatron.core.datasets import gpt_dataset
from megatron.core.datasets.blended_dataset import build_blending_indices
from megatron.core.datasets.builder import build_gpt_datasets
from megatron.core.datasets.gpt_dataset import GPTDataset, parse_split, split_boundaries
from megatron.core.datasets.indexed_dataset import IndexedDataset, write_dataset
from megatron.core.parallel_state import ProcessGroups
from megatron.training.arguments import config_from_args, parse_args

MODEL_FLAGS = (
    "--num-layers 1 --hidden-size 16 --num-attention-heads 2 --seq-length 8 --max-position-embeddings 8 "
    "--micro-batch-size 2 --global-batch-size 4 --train-iters 10 --lr 1e-3 --eval-iters 2 --num-workers 0 "
    "--tokenizer-type NullTokenizer --vocab-size 1000 --make-vocab-size-divisible-by 1"
)


def make_config(extra: str):
    return config_from_args(parse_args(shlex.split(MODEL_FLAGS) + shlex.split(extra)), world_size=1)


def numbered_documents(lengths, base=0) -> list[np.ndarray]:
    """Documents whose tokens say where they come from: document d holds 10*d, 10*d+1, ..."""
    return [np.arange(base + 10 * d, base + 10 * d + n) for d, n in enumerate(lengths)]


@pytest.fixture
def corpus(tmp_path):
    lengths = [7, 3, 0, 9, 5, 1, 8, 6, 2, 4]
    prefix = str(tmp_path / "corpus")
    write_dataset(prefix, numbered_documents(lengths), np.uint16)
    return prefix, lengths


def stream(ds: GPTDataset) -> np.ndarray:
    """The token stream of the dataset's document index: its documents back to back."""
    return np.concatenate([ds.indexed.document(int(d)) for d in ds.document_index])


def test_samples_are_consecutive_windows_of_the_shuffled_stream(corpus, tmp_path):
    prefix, lengths = corpus
    S = 4
    ds = GPTDataset(IndexedDataset(prefix), (0, len(lengths)), 30, S, seed=7, cache_dir=str(tmp_path / "c"))
    tokens = stream(ds)
    epochs = len(ds.document_index) // len(lengths)
    assert epochs == -(-(30 * S + 1) // sum(lengths))  # the fewest epochs that cover 30 samples
    for e in range(epochs):  # every epoch visits every document once, in its own order
        assert sorted(ds.document_index[e * 10:(e + 1) * 10]) == list(range(10))
    assert not all(np.array_equal(ds.document_index[:10], ds.document_index[e * 10:(e + 1) * 10])
                   for e in range(1, epochs))
    served = set()
    for i in range(len(ds)):
        j = int(ds.shuffle_index[i])
        served.add(j)
        sample = ds[i]
        np.testing.assert_array_equal(sample["tokens"], tokens[j * S:j * S + S])
        np.testing.assert_array_equal(sample["labels"], tokens[j * S + 1:j * S + S + 1])
        assert sample["loss_mask"].tolist() == [1.0] * S
        assert sample["position_ids"].tolist() == list(range(S))
    assert len(served) == len(ds) == 30


def test_first_epoch_is_served_before_the_second(corpus, tmp_path):
    prefix, lengths = corpus
    S, total = 4, sum(lengths)
    ds = GPTDataset(IndexedDataset(prefix), (0, 10), 25, S, seed=1, cache_dir=str(tmp_path / "c"))
    first_epoch = -(-total // S)  # samples starting in epoch 0
    starts = ds.shuffle_index.astype(np.int64) * S
    assert (starts[:first_epoch] < total).all() and (starts[first_epoch:] >= total).all()
    assert sorted(ds.shuffle_index[:first_epoch]) == list(range(first_epoch))


def test_seed_changes_order_not_content(corpus, tmp_path):
    prefix, _ = corpus
    indexed = IndexedDataset(prefix)
    a = GPTDataset(indexed, (0, 10), 8, 4, seed=1, cache_dir=str(tmp_path / "c"))
    b = GPTDataset(indexed, (0, 10), 8, 4, seed=2, cache_dir=str(tmp_path / "c"))
    assert not np.array_equal(a.document_index, b.document_index)
    assert sorted(a.document_index) == sorted(b.document_index)


def test_eod_tokens_are_masked_out_of_the_loss(tmp_path):
    eod = 99
    prefix = str(tmp_path / "e")
    write_dataset(prefix, [[1, 2, 3, eod], [4, 5, eod], [6, 7, 8, 9, eod]], np.uint16)
    ds = GPTDataset(IndexedDataset(prefix), (0, 3), 6, 3, seed=0, cache_dir=str(tmp_path / "c"), eod_token=eod)
    for i in range(len(ds)):
        s = ds[i]
        assert torch.equal(s["loss_mask"] == 0, s["tokens"] == eod)  # Megatron: masked where the input is EOD


def test_split_boundaries_follow_megatron_rounding():
    assert split_boundaries(parse_split("969,30,1"), 1000) == [0, 969, 999, 1000]
    assert split_boundaries(parse_split("969, 30, 1".replace(" ", "")), 10) == [0, 10, 10, 10]
    assert split_boundaries(parse_split("1,1,1"), 10) == [0, 4, 7, 10]  # 3+3+3, the missing one shifts all
    assert split_boundaries(parse_split("98/2"), 100) == [0, 98, 100, 100]
    for bad in ("", "a,b", "-1,2", "0,0,0", "1,1,1,1"):
        with pytest.raises(ValueError, match="--split"):
            parse_split(bad)


def test_splits_hold_only_their_documents(corpus, tmp_path):
    prefix, lengths = corpus
    cfg = make_config(f"--data-path {prefix} --split 6,2,2 --data-cache-path {tmp_path / 'c'}")
    datasets = build_gpt_datasets(cfg, (40, 8, 8), None)
    for ds, (lo, hi) in zip(datasets, [(0, 6), (6, 8), (8, 10)]):
        assert sorted(set(ds.document_index.tolist())) == list(range(lo, hi))
        seen = np.concatenate([ds[i]["tokens"].numpy() for i in range(len(ds))])
        assert ((seen // 10 >= lo) & (seen // 10 < hi)).all()
    assert [len(ds) for ds in datasets] == [40, 8, 8]


def test_split_without_documents_or_samples_is_none(corpus, tmp_path):
    prefix, _ = corpus
    cfg = make_config(f"--data-path {prefix} --split 100,0,0 --data-cache-path {tmp_path / 'c'}")
    train, valid, test = build_gpt_datasets(cfg, (5, 8, 8), None)
    assert len(train) == 5 and valid is None and test is None
    cfg = make_config(f"--data-path {prefix} --split 9,1,0 --data-cache-path {tmp_path / 'c'}")
    assert build_gpt_datasets(cfg, (5, 0, 0), None)[1] is None


def test_explicit_train_valid_test_paths(tmp_path):
    paths = []
    for name, base in (("tr", 0), ("va", 1000), ("te", 2000)):
        paths.append(str(tmp_path / name))
        write_dataset(paths[-1], numbered_documents([5, 6, 7], base), np.uint16)
    cfg = make_config(f"--train-data-path {paths[0]} --valid-data-path {paths[1]} --test-data-path {paths[2]} "
                      f"--vocab-size 3000 --data-cache-path {tmp_path / 'c'}")
    datasets = build_gpt_datasets(cfg, (10, 4, 4), None)
    for ds, base in zip(datasets, (0, 1000, 2000)):
        tokens = ds[0]["tokens"].numpy()
        assert ((tokens >= base) & (tokens < base + 1000)).all()


def test_blend_proportions_within_one_percent(tmp_path):
    for w in ([0.3, 0.7], [0.2, 0.5, 0.3], [0.05, 0.95]):
        which = build_blending_indices(w, 10_000)["dataset_index"]
        share = np.bincount(which, minlength=len(w)) / 10_000
        np.testing.assert_allclose(share, w, atol=0.01)
        for t in (100, 1000, 5000):  # and along the way, within about one sample
            assert (np.abs(np.bincount(which[:t], minlength=len(w)) - np.array(w) * t) <= 1.0 + 1e-9).all()


def test_data_path_weights_blend_two_corpora(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_dataset(a, numbered_documents([30] * 20, 0), np.uint16)
    write_dataset(b, numbered_documents([30] * 20, 500), np.uint16)
    cfg = make_config(f"--data-path 0.3 {a} 0.7 {b} --split 1,0,0 --data-cache-path {tmp_path / 'c'}")
    train, _, _ = build_gpt_datasets(cfg, (1000, 0, 0), None)
    assert len(train) == 1000
    from_b = sum(int(train[i]["tokens"][0] >= 500) for i in range(len(train)))
    assert abs(from_b / 1000 - 0.7) <= 0.01


def built_names(log_lines):
    return [line for line in log_lines if line.startswith("building")]


def test_cache_is_reused_and_rebuilt_when_its_inputs_change(corpus, tmp_path, monkeypatch):
    prefix, lengths = corpus
    cache = str(tmp_path / "c")
    log: list[str] = []
    first = GPTDataset(IndexedDataset(prefix), (0, 10), 20, 4, 3, cache, log=log.append)
    files = sorted(os.listdir(cache))
    assert len(built_names(log)) == 1 and len(files) == 4  # three .npy + a description

    def no_rebuild(*args, **kwargs):
        raise AssertionError("indices rebuilt although cached")

    monkeypatch.setattr(gpt_dataset, "build_indices", no_rebuild)
    again = GPTDataset(IndexedDataset(prefix), (0, 10), 20, 4, 3, cache, log=log.append)
    np.testing.assert_array_equal(again.sample_index, first.sample_index)
    assert isinstance(again.shuffle_index, np.memmap)
    monkeypatch.undo()

    for change in ({"num_samples": 21}, {"seq_length": 5}, {"seed": 4}):
        args = {"num_samples": 20, "seq_length": 4, "seed": 3, **change}
        GPTDataset(IndexedDataset(prefix), (0, 10), cache_dir=cache, log=log.append, **args)
    # new data under the same name: one document longer
    write_dataset(prefix, numbered_documents([8] + lengths[1:]), np.uint16)
    GPTDataset(IndexedDataset(prefix), (0, 10), 20, 4, 3, cache, log=log.append)
    assert len(built_names(log)) == 5
    assert len(os.listdir(cache)) == 5 * 4


def test_damaged_cache_file_is_rebuilt(corpus, tmp_path):
    prefix, _ = corpus
    cache = tmp_path / "c"
    good = GPTDataset(IndexedDataset(prefix), (0, 10), 20, 4, 3, str(cache))
    expected = np.array(good.sample_index)
    (victim,) = [p for p in cache.iterdir() if p.name.endswith("sample_index.npy")]
    victim.write_bytes(victim.read_bytes()[:20])
    log: list[str] = []
    rebuilt = GPTDataset(IndexedDataset(prefix), (0, 10), 20, 4, 3, str(cache), log=log.append)
    assert len(built_names(log)) == 1
    np.testing.assert_array_equal(rebuilt.sample_index, expected)


def test_default_cache_sits_next_to_the_data(corpus):
    prefix, _ = corpus
    cfg = make_config(f"--data-path {prefix} --split 1,0,0")
    build_gpt_datasets(cfg, (4, 0, 0), None)
    assert any(n.endswith("shuffle_index.npy") for n in os.listdir(os.path.join(os.path.dirname(prefix), "cache")))


def _build_on_rank(rank: int, init_file: str, prefix: str, cache: str, out) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    log: list[str] = []
    ds = GPTDataset(IndexedDataset(prefix), (0, 10), 20, 4, 3, cache, groups=ProcessGroups(rank=rank, world_size=2),
                    log=log.append)
    out.put((rank, len(built_names(log)), [int(v) for v in ds.shuffle_index]))
    dist.destroy_process_group()


def test_rank_zero_builds_and_the_other_rank_reads(corpus, tmp_path):
    prefix, _ = corpus
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_build_on_rank, args=(r, str(tmp_path / "init"), prefix, str(tmp_path / "c"), out))
             for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert [(rank, builds) for rank, builds, _ in results] == [(0, 1), (1, 0)]
    assert results[0][2] == results[1][2]


def test_resumed_loader_sees_exactly_the_next_samples(corpus, tmp_path):
    """With worker processes, a loader restarted at `consumed_samples` continues the same stream."""
    from megatron.training.data import build_loader

    prefix, _ = corpus
    cfg = make_config(f"--data-path {prefix} --split 1,0,0 --num-workers 2 --data-cache-path {tmp_path / 'c'}")
    train, _, _ = build_gpt_datasets(cfg, (40, 0, 0), None)
    groups = ProcessGroups()
    full = [b["tokens"] for b in build_loader(train, cfg, groups, consumed_samples=0)]
    consumed = 3 * cfg.training.global_batch_size
    resumed = [b["tokens"] for b in build_loader(train, cfg, groups, consumed_samples=consumed)]
    skipped = consumed // cfg.training.micro_batch_size
    assert len(resumed) == len(full) - skipped > 0
    for a, b in zip(full[skipped:], resumed):
        assert torch.equal(a, b)
