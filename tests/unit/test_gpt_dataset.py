"""GPT samples over sequences: Megatron-Core's recipe checked by hand (document and shuffle
order, epochs, the separate final epoch, split rounding, blend sizes), special ids, sequences
as the unit, the index cache, resuming. tests/unit/test_megatron_parity.py checks the same
against samples recorded from Megatron-Core itself."""

from __future__ import annotations

import math
import multiprocessing
import os
import shlex

import numpy as np
import pytest
import torch

from megatron.core.datasets import gpt_dataset
from megatron.core.datasets.blended_dataset import BlendedDataset, build_blending_indices
from megatron.core.datasets.builder import build_gpt_datasets
from megatron.core.datasets.gpt_dataset import (
    NO_PAD, GPTDataset, TokenRules, pad_id, parse_split, sample_from_megatron_tokens, split_bookends, split_range,
)
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetError, IndexedDatasetWriter, write_dataset
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


# ---------------------------------------------------------------------- the recipe, by hand
FIVE = [3, 5, 2, 6, 4]
"""Five documents, 20 tokens: with seq_length 4 an epoch gives (20 - 1) // 4 = 4 samples."""


@pytest.fixture
def five(tmp_path):
    prefix = str(tmp_path / "five")
    write_dataset(prefix, numbered_documents(FIVE), np.uint16)
    return IndexedDataset(prefix)


def expected_samples(seed: int, epochs: int, separate_final: bool, seq_length: int = 4) -> list[list[int]]:
    """Served samples from the rule, spelled out: one RandomState; the document ids once per
    epoch, shuffled all together (or the last epoch alone); samples of S+1 tokens every S
    tokens of the stream; the sample order shuffled (samples before the final epoch, then the
    rest, separately)."""
    rng = np.random.RandomState(seed)
    if separate_final:
        head, tail = np.tile(np.arange(5, dtype=np.int32), epochs - 1), np.arange(5, dtype=np.int32)
        rng.shuffle(head)
        rng.shuffle(tail)
        order = np.concatenate([head, tail])
    else:
        order = np.tile(np.arange(5, dtype=np.int32), epochs)
        rng.shuffle(order)
    stream = np.concatenate([numbered_documents(FIVE)[d] for d in order])
    total = (epochs * 20 - 1) // seq_length
    if separate_final:
        before = ((epochs - 1) * 20 - 1) // seq_length
        head, tail = np.arange(before, dtype=np.uint32), np.arange(before, total, dtype=np.uint32)
        rng.shuffle(head)
        rng.shuffle(tail)
        shuffle = np.concatenate([head, tail])
    else:
        shuffle = np.arange(total, dtype=np.uint32)
        rng.shuffle(shuffle)
    return [stream[j * seq_length:j * seq_length + seq_length + 1].tolist() for j in shuffle]


def served(ds: GPTDataset) -> list[list[int]]:
    return [ds.sample_tokens(i)[0].tolist() for i in range(len(ds))]


@pytest.mark.parametrize("num_samples, epochs, separate", [
    (3, 1, False),    # one epoch: all 4 samples built and shuffled
    (4, 1, False),    # 4 * 4 + 1 = 17 tokens still fit one epoch
    (12, 3, False),   # 3 epochs; 12 - 9 = 3 samples from the last, not below int(0.8 * 4) = 3
    (11, 3, True),    # 2 samples from the last epoch: below the boundary, shuffled alone
    (10, 3, True),
    (9, 2, False),    # 9 - 4 = 5 > 3 from the second epoch
])
def test_document_and_shuffle_order_follow_the_rule(five, tmp_path, num_samples, epochs, separate):
    ds = GPTDataset(five, (0, 5), num_samples, 4, seed=5, cache_dir=str(tmp_path / "c"))
    assert len(ds.document_index) == 5 * epochs
    assert len(ds) == (epochs * 20 - 1) // 4 >= num_samples  # every built sample, not the count asked
    assert served(ds) == expected_samples(5, epochs, separate)


def test_separate_final_epoch_keeps_earlier_epochs_first(five, tmp_path):
    ds = GPTDataset(five, (0, 5), 10, 4, seed=1, cache_dir=str(tmp_path / "c"))
    assert sorted(ds.document_index[10:]) == list(range(5))  # the last epoch shuffled alone
    assert sorted(ds.shuffle_index[:9]) == list(range(9)) and sorted(ds.shuffle_index[9:]) == [9, 10, 11, 12, 13]
    together = GPTDataset(five, (0, 5), 12, 4, seed=1, cache_dir=str(tmp_path / "c"))
    assert sorted(together.shuffle_index) == list(range(14))


def test_samples_share_one_boundary_token(five, tmp_path):
    ds = GPTDataset(five, (0, 5), 4, 4, seed=3, cache_dir=str(tmp_path / "c"))
    stream = np.concatenate([five.document(int(d)) for d in ds.document_index])
    for i in range(len(ds)):
        j = int(ds.shuffle_index[i])
        sample = ds[i]
        np.testing.assert_array_equal(sample["tokens"], stream[j * 4:j * 4 + 4])
        np.testing.assert_array_equal(sample["labels"], stream[j * 4 + 1:j * 4 + 5])
        assert sample["loss_mask"].tolist() == [1.0] * 4 and sample["position_ids"].tolist() == [0, 1, 2, 3]


def test_sample_index_matches_megatron_layout(corpus, tmp_path):
    """Row 0 is (0, 0) even before an empty sequence; row j > 0 is the sequence holding token
    j*S; the last row is where the last sample ends."""
    prefix, lengths = corpus
    ds = GPTDataset(IndexedDataset(prefix), (0, 10), 5, 4, seed=0, cache_dir=str(tmp_path / "c"))
    order_lengths = np.array(lengths)[ds.document_index]
    ends = np.cumsum(order_lengths)
    assert ds.sample_index[0].tolist() == [0, 0] and ds.sample_index.dtype == np.int32
    for j in range(1, len(ds.sample_index)):
        position, offset = ds.sample_index[j]
        assert ends[position] - order_lengths[position] + offset == 4 * j and order_lengths[position] > offset


def test_seed_changes_order_not_content(corpus, tmp_path):
    prefix, _ = corpus
    indexed = IndexedDataset(prefix)
    a = GPTDataset(indexed, (0, 10), 8, 4, seed=1, cache_dir=str(tmp_path / "c"))
    b = GPTDataset(indexed, (0, 10), 8, 4, seed=2, cache_dir=str(tmp_path / "c"))
    assert not np.array_equal(a.document_index, b.document_index)
    assert sorted(a.document_index) == sorted(b.document_index)


# ---------------------------------------------------------------------- splits
def ranges(split: str, n: int):
    return [None if b is None else split_range(b, n) for b in split_bookends(parse_split(split))]


def test_split_ranges_round_like_megatron():
    assert ranges("969,30,1", 1000) == [(0, 969), (969, 999), (999, 1000)]
    assert ranges("969,30,1", 7) == [(0, 7), (7, 7), (7, 7)]       # 6.783 -> 7: valid and test empty
    assert ranges("1,1,1", 7) == [(0, 2), (2, 5), (5, 7)]          # 2.33 -> 2, 4.67 -> 5
    assert ranges("1,1,1", 10) == [(0, 3), (3, 7), (7, 10)]
    assert ranges("0.5,0.5,0", 7) == [(0, 4), (4, 7), None]        # 3.5 -> 4; a zero-weight split is absent
    assert ranges("1,1,0", 5) == [(0, 2), (2, 5), None]            # 2.5 -> 2: half to even, not 3
    assert ranges("90,10,0", 25) == [(0, 22), (22, 25), None]      # 22.5 -> 22
    assert ranges("98/2", 100) == [(0, 98), (98, 100), None]
    assert ranges("0,1,0", 9) == [None, (0, 9), None]


def test_split_weights_are_float64_normalised():
    assert parse_split("969,30,1") == [969 / 1000, 30 / 1000, 1 / 1000]
    bookends = split_bookends(parse_split("1,1,1"))
    assert bookends[1] == (1 / 3, 1 / 3 + 1 / 3) and bookends[2][1] == 1 / 3 + 1 / 3 + 1 / 3
    for bad in ("", "a,b", "-1,2", "0,0,0", "1,1,1,1"):
        with pytest.raises(ValueError, match="--split"):
            parse_split(bad)


def test_splits_hold_only_their_sequences(corpus, tmp_path):
    prefix, lengths = corpus
    cfg = make_config(f"--data-path {prefix} --split 6,2,2 --data-cache-path {tmp_path / 'c'}")
    datasets = build_gpt_datasets(cfg, (40, 8, 8), None)
    for ds, (lo, hi) in zip(datasets, [(0, 6), (6, 8), (8, 10)]):
        assert sorted(set(ds.document_index.tolist())) == list(range(lo, hi))
        seen = np.concatenate([ds[i]["tokens"].numpy() for i in range(len(ds))])
        assert ((seen // 10 >= lo) & (seen // 10 < hi)).all()
    assert [len(ds) >= n for ds, n in zip(datasets, (40, 8, 8))] == [True] * 3


def test_split_without_sequences_or_samples_is_none(corpus, tmp_path):
    prefix, _ = corpus
    cfg = make_config(f"--data-path {prefix} --split 100,0,0 --data-cache-path {tmp_path / 'c'}")
    train, valid, test = build_gpt_datasets(cfg, (5, 8, 8), None)
    assert len(train) >= 5 and valid is None and test is None
    cfg = make_config(f"--data-path {prefix} --split 9,1,0 --data-cache-path {tmp_path / 'c'}")
    assert build_gpt_datasets(cfg, (5, 0, 0), None)[1] is None


def test_split_sentences_file_splits_and_shuffles_sequences(tmp_path):
    """Megatron-LM's --split-sentences output: several sequences per document. Splits are
    ranges of sequences, and sequences are shuffled on their own."""
    prefix = str(tmp_path / "sentences")
    sequences_per_document = [3, 1, 2, 4]
    with IndexedDatasetWriter(prefix + ".bin", np.uint16) as writer:
        s = 0
        for count in sequences_per_document:
            writer.add_document(np.concatenate([np.arange(100 * (s + k), 100 * (s + k) + 3) for k in range(count)]),
                                [3] * count)
            s += count
        writer.finalize(prefix + ".idx")
    indexed = IndexedDataset(prefix)
    assert len(indexed) == 10 and indexed.num_documents == 4
    cfg = make_config(f"--data-path {prefix} --split 7,2,1 --data-cache-path {tmp_path / 'c'}")
    train, valid, test = build_gpt_datasets(cfg, (4, 2, 1), None)
    assert sorted(set(train.document_index.tolist())) == list(range(7))  # sequences 0-6: document 3 is cut
    assert sorted(set(valid.document_index.tolist())) == [7, 8] and set(test.document_index.tolist()) == {9}
    first_epoch = train.document_index[:7].tolist()
    assert first_epoch[first_epoch.index(0) + 1:first_epoch.index(0) + 3] != [1, 2]  # not kept as a document
    stream = np.concatenate([indexed[int(s)] for s in train.document_index])
    np.testing.assert_array_equal(train.sample_tokens(0)[0], stream[8 * int(train.shuffle_index[0]):][:9])


# ---------------------------------------------------------------------- special ids
def test_eod_tokens_are_masked_out_of_the_loss(tmp_path):
    eod = 99
    prefix = str(tmp_path / "e")
    write_dataset(prefix, [[1, 2, 3, eod], [4, 5, eod], [6, 7, 8, 9, eod]], np.uint16)
    ds = GPTDataset(IndexedDataset(prefix), (0, 3), 6, 3, seed=0, cache_dir=str(tmp_path / "c"),
                    rules=TokenRules(eod_mask=eod))
    for i in range(len(ds)):
        s = ds[i]
        assert torch.equal(s["loss_mask"] == 0, s["tokens"] == eod)  # Megatron: masked where the input is EOD


def test_pad_label_is_masked_and_pad_ids_become_zero():
    sample = sample_from_megatron_tokens(torch.tensor([7, 5, 8, 5, 9]), TokenRules(eod_mask=9, pad=5))
    assert sample["tokens"].tolist() == [7, 0, 8, 0] and sample["labels"].tolist() == [0, 8, 0, 9]
    assert sample["loss_mask"].tolist() == [0.0, 1.0, 0.0, 1.0]  # where the label was the pad id
    unchanged = sample_from_megatron_tokens(torch.tensor([7, 5, 8]), TokenRules())
    assert unchanged["tokens"].tolist() == [7, 5] and unchanged["loss_mask"].tolist() == [1.0, 1.0]


def test_pad_id_is_ignored_when_absent_or_colliding():
    from types import SimpleNamespace as Tok

    from megatron.core.tokenizer import build_tokenizer

    assert pad_id(Tok(pad=3, eos=2, eod=2)) == 3
    assert pad_id(Tok(pad=2, eos=2, eod=2)) == NO_PAD      # Qwen-style: pad is the eos token
    assert pad_id(Tok(pad=4, eos=2, eod=4)) == NO_PAD
    assert pad_id(Tok(pad=None, eos=2, eod=2)) == NO_PAD
    assert pad_id(build_tokenizer("NullTokenizer", None, 100)) == NO_PAD


def write_with_token(tmp_path, bad: int) -> str:
    prefix = str(tmp_path / "bad")
    docs = [np.arange(10, 20) for _ in range(6)]
    docs[3][4] = bad
    write_dataset(prefix, docs, np.int32)
    return prefix


def test_token_id_outside_the_vocabulary_names_sequence_and_id(tmp_path):
    prefix = write_with_token(tmp_path, 500)
    ds = GPTDataset(IndexedDataset(prefix), (0, 6), 10, 4, 0, str(tmp_path / "c"), rules=TokenRules(vocab_size=100))
    with pytest.raises(IndexedDatasetError) as e:
        for i in range(len(ds)):
            ds[i]
    message = str(e.value)
    assert message.startswith(prefix + ".bin: sequence 3 holds token id 500") and "vocabulary of 100 ids" in message
    assert "\n" not in message



# ---------------------------------------------------------------------- blends
def test_blend_order_is_greedy_by_weight():
    which = build_blending_indices([0.3, 0.7], 10)["dataset_index"].tolist()
    assert which == [1, 0, 1, 1, 0, 1, 1, 0, 1, 1]  # t = 0 and t = 1 both scale the weights by 1
    for w in ([0.3, 0.7], [0.2, 0.5, 0.3], [0.05, 0.95]):
        which = build_blending_indices(w, 10_000)["dataset_index"]
        for t in (100, 1000, 5000, 10_000):  # within about one sample of the share all along
            assert (np.abs(np.bincount(which[:t], minlength=len(w)) - np.array(w) * t) <= 1.0 + 1e-9).all()
    np.testing.assert_array_equal(build_blending_indices([3, 7], 50)["dataset_index"],
                                  build_blending_indices([0.3, 0.7], 50)["dataset_index"])


def two_corpora(tmp_path, sizes=(20, 20)):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_dataset(a, numbered_documents([30] * sizes[0], 0), np.uint16)
    write_dataset(b, numbered_documents([30] * sizes[1], 500), np.uint16)
    return a, b


def test_weighted_blend_sizes(tmp_path):
    """Each dataset is asked for ceil(ceil(n * w) * 1.005) samples; the blend holds sum ceil(n * w)."""
    a, b = two_corpora(tmp_path)
    cfg = make_config(f"--data-path 0.3 {a} 0.7 {b} --split 1,0,0 --data-cache-path {tmp_path / 'c'}")
    train, _, _ = build_gpt_datasets(cfg, (7, 0, 0), None)
    assert isinstance(train, BlendedDataset)
    assert len(train) == math.ceil(7 * 0.3) + math.ceil(7 * 0.7) == 8
    assert [ds.num_samples for ds in train.datasets] == [4, 6]  # ceil(3 * 1.005), ceil(5 * 1.005)
    big, _, _ = build_gpt_datasets(cfg, (1000, 0, 0), None)
    assert len(big) == 1000 and [ds.num_samples for ds in big.datasets] == [302, 704]
    from_b = sum(int(big[i]["tokens"][0] >= 500) for i in range(len(big)))
    assert from_b == 700


def test_single_weighted_prefix_is_a_blend_of_one(tmp_path):
    a, _ = two_corpora(tmp_path)
    cfg = make_config(f"--data-path 1.0 {a} --split 1,0,0 --data-cache-path {tmp_path / 'c'}")
    train, _, _ = build_gpt_datasets(cfg, (203, 0, 0), None)
    assert len(train) == 203 and train.datasets[0].num_samples == 205
    plain, _, _ = build_gpt_datasets(make_config(f"--data-path {a} --split 1,0,0 --data-cache-path {tmp_path / 'c'}"),
                                     (203, 0, 0), None)
    assert isinstance(plain, GPTDataset) and plain.num_samples == 203


def test_unweighted_blend_is_one_epoch_of_each_by_length(tmp_path):
    a, b = two_corpora(tmp_path, sizes=(10, 30))
    cfg = make_config(f"--data-path {a} {b} --split 1,0,0 --data-cache-path {tmp_path / 'c'}")
    train, _, _ = build_gpt_datasets(cfg, (50, 0, 0), None)
    lengths = [len(ds) for ds in train.datasets]
    assert [ds.num_samples for ds in train.datasets] == [None, None]
    assert lengths == [(300 - 1) // 8, (900 - 1) // 8] and len(train) == 50
    expected = build_blending_indices(lengths, 50)["dataset_index"]
    np.testing.assert_array_equal(train.dataset_index, expected)
    capped, _, _ = build_gpt_datasets(cfg, (10_000, 0, 0), None)
    assert len(capped) == sum(lengths)  # capped at one epoch of everything


def test_unweighted_blend_leaves_out_a_dataset_without_a_whole_sample(tmp_path):
    a, _ = two_corpora(tmp_path)
    tiny = str(tmp_path / "tiny")
    write_dataset(tiny, [[1, 2, 3]], np.uint16)  # 3 tokens: no sample of 8 + 1
    cfg = make_config(f"--data-path {tiny} {a} --split 1,0,0 --data-cache-path {tmp_path / 'c'}")
    with pytest.warns(UserWarning, match="tiny: its train split holds less than one sample"):
        train, _, _ = build_gpt_datasets(cfg, (20, 0, 0), None)
    assert len(train.datasets) == 1 and set(train.dataset_index.tolist()) == {0} and len(train) == 20


def test_unweighted_blend_too_small_for_training_is_an_error(tmp_path):
    from megatron.core.datasets.errors import DataError
    from megatron.training.data import build_datasets

    a, b = two_corpora(tmp_path, sizes=(2, 2))
    cfg = make_config(f"--data-path {a} {b} --split 1,0,0 --data-cache-path {tmp_path / 'c'} --train-iters 100")
    with pytest.raises(DataError, match="--data-path: the train blend holds 14 samples but .* needs 400"):
        build_datasets(cfg)


def test_explicit_train_valid_test_paths(tmp_path):
    paths = []
    for name, base in (("tr", 0), ("va", 1000), ("te", 2000)):
        paths.append(str(tmp_path / name))
        write_dataset(paths[-1], numbered_documents([5, 6, 7], base), np.uint16)
    cfg = make_config(f"--train-data-path {paths[0]} --valid-data-path 0.5 {paths[1]} --test-data-path {paths[2]} "
                      f"--vocab-size 3000 --data-cache-path {tmp_path / 'c'}")
    datasets = build_gpt_datasets(cfg, (10, 4, 4), None)
    for ds, base in zip(datasets, (0, 1000, 2000)):
        assert isinstance(ds, GPTDataset)  # a single prefix is used whole, weighted or not
        assert sorted(set(ds.document_index.tolist())) == [0, 1, 2]
        tokens = ds[0]["tokens"].numpy()
        assert ((tokens >= base) & (tokens < base + 1000)).all()


# ---------------------------------------------------------------------- the index cache
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


def test_cache_of_the_old_recipe_is_not_reused(corpus, tmp_path, monkeypatch):
    from megatron.core.datasets import index_cache

    prefix, _ = corpus
    cache = str(tmp_path / "c")
    monkeypatch.setattr(index_cache, "CACHE_VERSION", 1)
    GPTDataset(IndexedDataset(prefix), (0, 10), 20, 4, 3, cache)
    monkeypatch.undo()
    log: list[str] = []
    GPTDataset(IndexedDataset(prefix), (0, 10), 20, 4, 3, cache, log=log.append)
    assert index_cache.CACHE_VERSION >= 2 and len(built_names(log)) == 1


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
