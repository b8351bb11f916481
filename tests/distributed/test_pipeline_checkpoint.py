"""Checkpoints under pipeline parallelism: exact resume at P = 2, and a P = 2 checkpoint (model
and optimizer) continuing at P = 1 and at P = 4 with the uninterrupted run's losses."""

from __future__ import annotations

import contextlib
import io

import torch

from megatron.core.parallel_state import groups_from_mesh
from megatron.training.train import pretrain
from tests.distributed.harness import run_distributed
from tests.distributed.test_pipeline_parallel import _parallel_sizes
from tests.functional.test_training import losses_from
from tests.helpers import make_config

COMMON = ("--num-layers 4 --global-batch-size 8 --micro-batch-size 2 --num-experts 4 --train-iters 5 "
          "--lr-warmup-iters 1 --moe-z-loss-coeff 1e-3 --eval-interval 2 --eval-iters 1")


def _train(rank: int, world: int, extra: str) -> dict:
    cfg = make_config(f"{COMMON} {extra}", world_size=world)
    pp, ep = _parallel_sizes(extra)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        pretrain(cfg, groups=groups_from_mesh(ep, torch.device("cpu"), "gloo", pp_size=pp))
    return losses_from(out.getvalue())


def _run(world: int, extra: str) -> dict:
    if world == 1:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            pretrain(make_config(f"{COMMON} {extra}"))
        return losses_from(out.getvalue())
    return run_distributed(_train, world, extra)[0]


def test_pipeline_checkpoint_resumes_and_reshards(tmp_path):
    pp2 = "--pipeline-model-parallel-size 2 --use-distributed-optimizer"
    full = _run(2, pp2)
    first = _run(2, f"{pp2} --save {tmp_path} --exit-interval 3")
    resumed = _run(2, f"{pp2} --load {tmp_path}")
    assert sorted(first) == [1, 2, 3] and sorted(resumed) == [4, 5]
    assert {**first, **resumed} == full
    on_one = _run(1, f"--load {tmp_path}")
    on_four = _run(4, f"--load {tmp_path} --pipeline-model-parallel-size 4")
    for other in (on_one, on_four):
        assert sorted(other) == [4, 5]
        for it in (4, 5):
            assert abs(float(other[it]) - float(full[it])) / float(full[it]) < 1e-5, (other, full)
