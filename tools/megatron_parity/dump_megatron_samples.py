"""Record the samples Megatron-Core serves for small synthetic datasets, as a test fixture.

    /path/to/mcore-venv/bin/python tools/megatron_parity/dump_megatron_samples.py \\
        --out tests/data/megatron_parity/megatron_core_samples.json

Runs ONLY in a separate virtual environment with megatron-core (and torch) installed, from a
directory that is not a moetron checkout: both packages are called `megatron`. The committed
fixture was produced with megatron-core 0.16.1 (its compiled dataset helpers), torch 2.13 CPU,
numpy 2.4. See README.md in this directory.

For every case (a set of Megatron-LM data flags) it builds the train/valid/test datasets with
Megatron-Core's BlendedMegatronDatasetBuilder, asking each split for the sizes Megatron-LM's
`get_train_valid_test_num_samples` gives, and records per split: the dataset length, the
first samples' tokens in full, and sha256 digests of every sample's tokens (and labels and
loss masks) in served order. tests/unit/test_megatron_parity.py rebuilds the same datasets
with this project's writer and asserts equality.

Only numpy, json and hashlib are imported at module level, so the dataset recipe
(`DATASETS`, `documents`, `write_dataset`) can be imported without megatron-core.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import sys
import tempfile

import numpy as np

VOCAB = 1000
"""NullTokenizer --vocab-size: ids 0..999, end of document 1000."""
EOD = VOCAB
FIRST = 3
"""Samples recorded in full per split."""

DATASETS = {
    # name: seed, documents, sequence lengths [lo, hi], sequences per document [lo, hi]
    "A": {"seed": 11, "documents": 40, "lengths": [1, 30], "sequences_per_document": [1, 1]},
    "B": {"seed": 12, "documents": 60, "lengths": [5, 50], "sequences_per_document": [1, 1]},
    "C": {"seed": 13, "documents": 25, "lengths": [0, 20], "sequences_per_document": [1, 1]},
    "D": {"seed": 14, "documents": 30, "lengths": [1, 12], "sequences_per_document": [1, 4]},
    "E": {"seed": 15, "documents": 7, "lengths": [3, 9], "sequences_per_document": [1, 1]},
}
"""Synthetic datasets. D is written like Megatron-LM's --split-sentences output: several
sequences per document. C has empty sequences. E has 7 sequences (split rounding)."""

BASE = {"seq_length": 8, "seed": 1234, "split": "969,30,1", "train_iters": 20, "global_batch_size": 4,
        "eval_interval": 10, "eval_iters": 2, "eod_mask_loss": False}

CASES = [
    # A's train split (36 sequences, 585 tokens) gives 73 samples an epoch. 204 samples need 3
    # epochs, 58 from the last = int(0.8 * 73): all epochs shuffled together (the boundary)
    {"name": "single_epochs_together", "data_path": ["A"], "split": "90,5,5", "train_iters": 51},
    # 203 samples: 57 from the last epoch, below the boundary: the last epoch shuffled separately
    {"name": "single_separate_final_epoch", "data_path": ["A"], "split": "90,5,5", "train_iters": 29,
     "global_batch_size": 7},
    # the same flags with a weight: A is asked for ceil(203 * 1.005) = 205 samples: together again
    {"name": "single_weighted_prefix", "data_path": ["1.0", "A"], "split": "90,5,5", "train_iters": 29,
     "global_batch_size": 7},
    {"name": "single_eod_mask_loss", "data_path": ["B"], "split": "8,1,1", "eod_mask_loss": True,
     "seq_length": 16, "seed": 7},
    {"name": "weighted_blend", "data_path": ["0.3", "A", "0.7", "B"], "split": "80,10,10", "train_iters": 40},
    {"name": "unweighted_blend", "data_path": ["A", "B"], "split": "80,10,10", "train_iters": 10,
     "eval_interval": 20, "eval_iters": 1},
    # valid starts at round(0.9 * 25) = round(22.5) = 22 in C (half to even); no test split
    {"name": "three_way_blend_zero_test_split", "data_path": ["2", "A", "1", "B", "1", "C"], "split": "90,10,0",
     "train_iters": 30, "seed": 99},
    {"name": "per_split_paths", "train_data_path": ["0.4", "A", "0.6", "B"], "valid_data_path": ["C"],
     "test_data_path": ["A", "E"], "train_iters": 25, "eval_interval": 30, "eval_iters": 2},
    {"name": "per_split_single_weighted", "train_data_path": ["0.5", "B"], "valid_data_path": ["0.2", "A", "0.8", "C"],
     "test_data_path": ["E"], "train_iters": 12},
    {"name": "split_sentences_file", "data_path": ["D"], "split": "7,2,1", "train_iters": 15, "eval_iters": 3},
    {"name": "split_rounding_1_1_1", "data_path": ["E"], "split": "1,1,1", "seq_length": 4, "train_iters": 6,
     "eval_interval": 3, "eval_iters": 1, "global_batch_size": 2},
]
"""Megatron-LM flag sets; missing keys take BASE's values."""


# ---------------------------------------------------------------------- the synthetic datasets
def documents(spec: dict) -> list[list[np.ndarray]]:
    """Per document, its sequences (int arrays). Token ids are random below VOCAB; every
    document's last sequence ends with EOD (an empty sequence stays empty)."""
    rng = np.random.RandomState(spec["seed"])
    out = []
    for _ in range(spec["documents"]):
        count = rng.randint(spec["sequences_per_document"][0], spec["sequences_per_document"][1] + 1)
        lengths = rng.randint(spec["lengths"][0], spec["lengths"][1] + 1, size=count)
        sequences = [rng.randint(0, VOCAB, size=n).astype(np.int64) for n in lengths]
        if len(sequences[-1]):
            sequences[-1][-1] = EOD
        out.append(sequences)
    return out


def write_dataset(prefix: str, docs: list[list[np.ndarray]]) -> None:
    """`<prefix>.bin/.idx` in Megatron's format (uint16 tokens), written with numpy alone."""
    lengths = [len(s) for d in docs for s in d]
    document_index = np.cumsum([0] + [len(d) for d in docs])
    offsets = np.cumsum([0] + lengths[:-1]) * 2
    with open(prefix + ".bin", "wb") as f:
        for d in docs:
            for s in d:
                f.write(np.asarray(s, dtype="<u2").tobytes())
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8))
        f.write(struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(document_index)))
        f.write(np.asarray(lengths, dtype="<i4").tobytes())
        f.write(np.asarray(offsets, dtype="<i8").tobytes())
        f.write(np.asarray(document_index, dtype="<i8").tobytes())


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def case_flags(case: dict) -> dict:
    return {**BASE, **case}


def megatron_lm_sizes(flags: dict) -> list[int]:
    """Megatron-LM's `get_train_valid_test_num_samples` (iteration-based training)."""
    gbs = flags["global_batch_size"]
    return [flags["train_iters"] * gbs,
            (flags["train_iters"] // flags["eval_interval"] + 1) * flags["eval_iters"] * gbs,
            flags["eval_iters"] * gbs]


def split_digests(samples: list[dict]) -> dict:
    """sha256 of every sample's tokens, labels and loss mask in served order (int64/float32 bytes)."""
    out = {}
    for key, dtype in (("tokens", np.int64), ("labels", np.int64), ("loss_mask", np.float32)):
        h = hashlib.sha256()
        for s in samples:
            h.update(np.ascontiguousarray(s[key], dtype=dtype).tobytes())
        out[key] = h.hexdigest()
    return out


# ---------------------------------------------------------------------- Megatron-Core
def build_with_megatron_core(flags: dict, paths: dict, cache: str):
    """Megatron-Core's train/valid/test datasets for these flags (datasets named by `paths`)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.utils import get_blend_from_list
    from megatron.core.tokenizers import MegatronTokenizer

    def blend(names):
        return None if not names else get_blend_from_list([paths.get(n, n) for n in names])

    per_split = any(k in flags for k in ("train_data_path", "valid_data_path", "test_data_path"))
    config = GPTDatasetConfig(
        random_seed=flags["seed"],
        sequence_length=flags["seq_length"],
        blend=None if per_split else blend(flags["data_path"]),
        blend_per_split=[blend(flags.get(k)) for k in ("train_data_path", "valid_data_path", "test_data_path")]
        if per_split else None,
        split=None if per_split else flags["split"],
        path_to_cache=cache,
        tokenizer=MegatronTokenizer.from_pretrained(metadata_path={"library": "null"}, vocab_size=VOCAB),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=flags["eod_mask_loss"],
        create_attention_mask=False,
    )
    sizes = megatron_lm_sizes(flags)
    return sizes, BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()


def describe(dataset) -> dict:
    """Length, first samples, digests, and the epochs of each underlying GPT dataset."""
    if dataset is None:
        return None
    samples = [dataset[i] for i in range(len(dataset))]
    parts = getattr(dataset, "datasets", [dataset])
    return {
        "length": len(dataset),
        "first_tokens": [s["tokens"].tolist() for s in samples[:FIRST]],
        "sha256": split_digests([{k: s[k].numpy() for k in ("tokens", "labels", "loss_mask")} for s in samples]),
        "epochs": [len(p.document_index) // len(p.indices) for p in parts],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="fixture JSON to write")
    args = p.parse_args(argv)
    import megatron.core
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
    with tempfile.TemporaryDirectory() as tmp:
        paths, files = {}, {}
        for name, spec in DATASETS.items():
            paths[name] = os.path.join(tmp, name)
            write_dataset(paths[name], documents(spec))
            files[name] = {s: file_sha256(paths[name] + s) for s in (".bin", ".idx")}
        results = []
        for case in CASES:
            flags = case_flags(case)
            sizes, datasets = build_with_megatron_core(flags, paths, os.path.join(tmp, "cache", case["name"]))
            results.append({"flags": flags, "sizes": sizes, "splits": [describe(d) for d in datasets]})
            print(case["name"], sizes, [None if d is None else len(d) for d in datasets], file=sys.stderr)
    dist.destroy_process_group()
    fixture = {
        "producer": f"megatron-core {megatron.core.__version__}, torch {torch.__version__}, numpy {np.__version__}",
        "vocab_size": VOCAB,
        "datasets": DATASETS,
        "dataset_sha256": files,
        "cases": results,
    }
    with open(args.out, "w") as f:
        json.dump(fixture, f, indent=1)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
