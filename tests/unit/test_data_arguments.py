"""Data and tokenizer flags are checked at config time, with errors naming the flag."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import numpy as np
import pytest

from megatron.core.datasets.indexed_dataset import write_dataset
from megatron.training.arguments import config_from_args, parse_args

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL_FLAGS = ("--num-layers 1 --hidden-size 16 --num-attention-heads 2 --seq-length 8 --micro-batch-size 2 "
               "--train-iters 2 --lr 1e-3 --make-vocab-size-divisible-by 1")


@pytest.fixture
def prefix(tmp_path):
    p = str(tmp_path / "d")
    write_dataset(p, [[1, 2, 3]] * 5, np.uint16)
    return p


def config(extra: str):
    return config_from_args(parse_args(shlex.split(MODEL_FLAGS) + shlex.split(extra)), world_size=1)


def test_null_tokenizer_vocabulary_counts_the_end_of_document(prefix):
    assert config(f"--data-path {prefix} --tokenizer-type NullTokenizer --vocab-size 100").model.vocab_size == 101


@pytest.mark.parametrize("extra, flag", [
    ("--tokenizer-type GPTSentencePieceTokenizer --tokenizer-model /no/such.model", "--tokenizer-model"),
    ("--tokenizer-type GPTSentencePieceTokenizer", "--tokenizer-model"),
    ("--tokenizer-type WordPiece --tokenizer-model x", "--tokenizer-type"),
    ("--tokenizer-type NullTokenizer", "--vocab-size"),
    ("--vocab-size 10 --eod-mask-loss", "--eod-mask-loss"),
    ("--vocab-size 10 --split 9,x", "--split"),
])
def test_bad_data_flags_name_the_flag(prefix, extra, flag):
    with pytest.raises(ValueError, match=flag):
        config(f"--data-path {prefix} {extra}")


def test_cli_reports_a_missing_tokenizer_model_in_one_line(prefix):
    result = subprocess.run(
        [sys.executable, "pretrain_gpt.py", *shlex.split(MODEL_FLAGS), "--data-path", prefix,
         "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", "/no/such.model"],
        capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip() == "pretrain_gpt.py: error: --tokenizer-model: /no/such.model does not exist"


def test_split_sizes_follow_megatron_lm(prefix):
    from megatron.training.data import num_samples

    common = f"--data-path {prefix} --vocab-size 10 --global-batch-size 4 --eval-interval 10 --eval-iters 3"
    assert num_samples(config(f"{common} --train-iters 25")) == (100, (25 // 10 + 1) * 3 * 4, 3 * 4)
    by_samples = config_from_args(parse_args(shlex.split(MODEL_FLAGS.replace("--train-iters 2 ", "")) +
                                             shlex.split(f"{common} --train-samples 103")), world_size=1)
    assert by_samples.training.train_iters == 25  # 103 // 4: no partial last batch, as Megatron-LM
    assert num_samples(by_samples) == (103, 3 * 3 * 4, 3 * 4)
