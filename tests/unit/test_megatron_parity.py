"""Same flags, same samples as Megatron-Core: every split of every case in the fixture that
tools/megatron_parity/dump_megatron_samples.py recorded with megatron-core 0.16.1.

The synthetic datasets are rebuilt here with this project's writer (and must be byte-identical
to the ones Megatron-Core read); the datasets are then built through the real flag parser and
every sample, in served order, is compared by digest (the first few in full).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex

import numpy as np
import pytest

from megatron.core.datasets.indexed_dataset import IndexedDatasetWriter
from megatron.training.arguments import config_from_args, parse_args
from megatron.training.data import build_datasets, num_samples

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE = os.path.join(REPO, "tests", "data", "megatron_parity", "megatron_core_samples.json")


def _dump_script():
    """The recipe half of the dump script (it imports megatron-core only inside main)."""
    path = os.path.join(REPO, "tools", "megatron_parity", "dump_megatron_samples.py")
    spec = importlib.util.spec_from_file_location("dump_megatron_samples", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DUMP = _dump_script()
with open(FIXTURE) as _f:
    RECORDED = json.load(_f)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """The fixture's synthetic datasets, written with IndexedDatasetWriter; name -> prefix."""
    root = tmp_path_factory.mktemp("parity")
    prefixes = {}
    for name, spec in RECORDED["datasets"].items():
        prefix = str(root / name)
        with IndexedDatasetWriter(prefix + ".bin", np.uint16) as writer:
            for sequences in DUMP.documents(spec):
                writer.add_document(np.concatenate(sequences), [len(s) for s in sequences])
            writer.finalize(prefix + ".idx")
        for suffix, digest in RECORDED["dataset_sha256"][name].items():
            assert DUMP.file_sha256(prefix + suffix) == digest, f"{name}{suffix} differs from Megatron-Core's input"
        prefixes[name] = prefix
    return prefixes


def flags_for(case: dict, prefixes: dict, cache: str) -> list[str]:
    """This project's command line for a fixture case (Megatron-LM's flags)."""
    f = case["flags"]
    argv = shlex.split(
        f"--num-layers 1 --hidden-size 16 --num-attention-heads 2 --seq-length {f['seq_length']} "
        f"--max-position-embeddings {f['seq_length']} --micro-batch-size 1 --global-batch-size {f['global_batch_size']} "
        f"--train-iters {f['train_iters']} --eval-interval {f['eval_interval']} --eval-iters {f['eval_iters']} "
        f"--seed {f['seed']} --lr 1e-3 --tokenizer-type NullTokenizer --vocab-size {RECORDED['vocab_size']} "
        f"--make-vocab-size-divisible-by 1 --num-workers 0 --data-cache-path {cache}")
    if f["eod_mask_loss"]:
        argv.append("--eod-mask-loss")
    for key in ("data_path", "train_data_path", "valid_data_path", "test_data_path"):
        if key in f:
            argv += ["--" + key.replace("_", "-")] + [prefixes.get(p, p) for p in f[key]]
    if "data_path" in f:
        argv += ["--split", f["split"]]
    return argv


@pytest.mark.parametrize("case", RECORDED["cases"], ids=[c["flags"]["name"] for c in RECORDED["cases"]])
def test_samples_equal_megatron_core(case, datasets, tmp_path):
    cfg = config_from_args(parse_args(flags_for(case, datasets, str(tmp_path / "cache"))), world_size=1)
    assert list(num_samples(cfg)) == case["sizes"]
    for split, (ours, theirs) in enumerate(zip(build_datasets(cfg), case["splits"])):
        if theirs is None:
            assert ours is None, f"split {split}: Megatron-Core builds none"
            continue
        assert len(ours) == theirs["length"], f"split {split}"
        samples = [ours[i] for i in range(len(ours))]
        assert [s["tokens"].tolist() for s in samples[:len(theirs["first_tokens"])]] == theirs["first_tokens"]
        assert DUMP.split_digests([{k: s[k].numpy() for k in s} for s in samples]) == theirs["sha256"], f"split {split}"


def test_fixture_covers_the_recipe_branches():
    """The cases exercise what they claim: multi-epoch splits with and without a separate final
    epoch, blends, per-split paths, a file with several sequences per document, an absent split."""
    from megatron.core.datasets.gpt_dataset import samples_before_separate_final_epoch

    names = {c["flags"]["name"]: c for c in RECORDED["cases"]}
    assert RECORDED["producer"].startswith("megatron-core 0.16.1")
    together, separate = names["single_epochs_together"], names["single_separate_final_epoch"]
    assert together["splits"][0]["epochs"] == separate["splits"][0]["epochs"] == [3]
    tokens, seq = 585, 8  # A's training split
    assert samples_before_separate_final_epoch(tokens, seq, together["sizes"][0], 3) is None
    assert samples_before_separate_final_epoch(tokens, seq, separate["sizes"][0], 3) is not None
    assert names["three_way_blend_zero_test_split"]["splits"][2] is None
    assert RECORDED["datasets"]["D"]["sequences_per_document"][1] > 1
