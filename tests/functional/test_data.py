"""Data end to end: validation continues through the valid set across evaluations and resumes,
the test set is read once from its start, and damaged data stops the run with one line."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import pretrain_gpt
from megatron.core.datasets.indexed_dataset import write_dataset
from megatron.core.pipeline_parallel.schedules import NoPipelining
from megatron.training import checkpointing
from megatron.training.data import build_datasets
from megatron.training.train import TrainState, pretrain
from tests.helpers import TINY_FLAGS, make_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA_FLAGS = TINY_FLAGS.replace("--mock-data ", "").replace("--vocab-size 64", "--vocab-size 60") + \
    " --tokenizer-type NullTokenizer --split 8,1,1"
EVAL_LINE = re.compile(r" (validation|test) loss at (.*?) \| lm loss value: (\S+)")


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    prefix = str(tmp_path / "corpus")
    write_dataset(prefix, [rng.integers(0, 60, size=n) for n in rng.integers(5, 40, size=200)], np.uint16)
    return prefix


def config(corpus, tmp_path, extra: str):
    return make_config(f"--data-path {corpus} --data-cache-path {tmp_path / 'cache'} {extra}", base=DATA_FLAGS)


@pytest.fixture
def evaluated(monkeypatch):
    """Tokens of every micro-batch the model sees in evaluation mode, in order."""
    seen: list[torch.Tensor] = []
    loss = NoPipelining._loss

    def spy(self, batch):
        if not self.model.training:
            seen.append(batch["tokens"].clone())
        return loss(self, batch)

    monkeypatch.setattr(NoPipelining, "_loss", spy)
    return seen


def samples(dataset, lo: int, hi: int) -> torch.Tensor:
    return torch.stack([dataset[i]["tokens"] for i in range(lo, hi)])


EVAL = "--train-iters 6 --eval-interval 2 --eval-iters 1"
"""Evaluations at iterations 2, 4, 6 and at the end: 4 x 4 samples = the valid split's size."""


def test_each_evaluation_continues_through_the_valid_set(corpus, tmp_path, evaluated, capsys):
    cfg = config(corpus, tmp_path, EVAL)
    state = pretrain(cfg)
    _, valid, test = build_datasets(cfg)
    batches = torch.cat(evaluated).reshape(5, 4, -1)  # 4 validations, then the test, of 4 samples each
    for k in range(4):
        assert torch.equal(batches[k], samples(valid, 4 * k, 4 * k + 4)), f"evaluation {k}"
    assert not torch.equal(batches[0], batches[1])
    assert torch.equal(batches[4], samples(test, 0, 4))
    assert state.consumed_valid_samples == 16
    labels = [(split, at) for split, at, _ in EVAL_LINE.findall(capsys.readouterr().out)]
    assert labels == [("validation", "iteration 2"), ("validation", "iteration 4"), ("validation", "iteration 6"),
                      ("validation", "iteration 6 on validation set"), ("test", "iteration 6 on test set")]


@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
def test_resumed_run_evaluates_the_samples_the_uninterrupted_run_did(corpus, tmp_path, evaluated, capsys, fmt):
    pretrain(config(corpus, tmp_path, f"{EVAL} --ckpt-format {fmt}"))
    full, full_log = list(evaluated), EVAL_LINE.findall(capsys.readouterr().out)
    evaluated.clear()
    save = tmp_path / "ckpt"
    pretrain(config(corpus, tmp_path, f"{EVAL} --ckpt-format {fmt} --save {save} --exit-interval 3"))
    pretrain(config(corpus, tmp_path, f"{EVAL} --ckpt-format {fmt} --load {save}"))
    assert len(evaluated) == len(full) and all(torch.equal(a, b) for a, b in zip(evaluated, full))
    assert EVAL_LINE.findall(capsys.readouterr().out) == full_log  # the same losses, bit for bit


def restored(common: dict, train_samples=None) -> TrainState:
    trainer = type("T", (), {"state": TrainState()})()
    cfg = make_config("--no-load-optim --no-load-rng --eval-interval 4 --eval-iters 3")
    cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, train_samples=train_samples))
    checkpointing.restore_training_state(trainer, cfg, common, None, None, "ckpt")
    return trainer.state


def test_valid_position_from_checkpoints_with_and_without_it():
    ours = {"iteration": 9, "train_state": dataclasses.asdict(TrainState(9, 36, consumed_valid_samples=60))}
    assert restored(ours).consumed_valid_samples == 60
    megatron_lm = {"iteration": 9, "args": type("Args", (), {"consumed_train_samples": 36,
                                                             "consumed_valid_samples": 48})()}
    assert restored(megatron_lm).consumed_valid_samples == 48
    older = {"iteration": 9, "train_state": {"consumed_train_samples": 36, "floating_point_operations_so_far": 0.0}}
    assert restored(older).consumed_valid_samples == (9 // 4) * 3 * 4  # Megatron-LM's fallback
    assert restored({"iteration": 9, "args": None}).consumed_valid_samples == 24
    assert restored(older, train_samples=40).consumed_valid_samples == 0  # as Megatron-LM: no fallback


# ---------------------------------------------------------------------- damaged data
def damage(path: str, how: str) -> None:
    data = bytearray(open(path, "rb").read())
    if how == "truncate":
        data = data[:len(data) // 2]
    elif how == "magic":
        data[:4] = b"\x00\x00\x00\x00"
    elif how == "dtype":
        data[17] = 42
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("suffix, how, what", [
    (".idx", "truncate", "truncated"),
    (".idx", "magic", "not a Megatron indexed dataset"),
    (".idx", "dtype", "unknown dtype code 42"),
    (".bin", "truncate", "truncated"),
])
def test_damaged_dataset_is_one_line_and_exit_2(corpus, tmp_path, capsys, suffix, how, what):
    damage(corpus + suffix, how)
    argv = DATA_FLAGS.split() + ["--data-path", corpus, "--data-cache-path", str(tmp_path / "cache")]
    assert pretrain_gpt.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"pretrain_gpt.py: error: {corpus}{suffix}: ") and what in err


def test_token_id_outside_the_vocabulary_from_worker_processes(tmp_path):
    """As a user runs it (a subprocess: a failed DataLoader's workers would take seconds to shut
    down in this process)."""
    prefix = str(tmp_path / "bad")
    docs = [np.arange(1, 30) for _ in range(6)]  # 10 samples an epoch: training reads them all
    docs[5][3] = 4000
    write_dataset(prefix, docs, np.uint16)
    argv = DATA_FLAGS.split() + ["--data-path", prefix, "--data-cache-path", str(tmp_path / "cache"),
                                 "--num-workers", "2", "--split", "1,0,0"]
    result = subprocess.run([sys.executable, "pretrain_gpt.py", *argv], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"pretrain_gpt.py: error: {prefix}.bin: sequence 5 holds token id 4000, ") and \
        "vocabulary of 61 ids" in result.stderr
