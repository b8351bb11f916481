"""Pipeline parallelism on CPU gloo ranks equals the single-process run.

Each scenario trains a few steps with pipeline stages (alone, or beside expert and data
parallelism, interleaved, uneven, tied or untied embeddings, a dense-only stage) and in one
process with the same global batch (gradient reduction overlapped with backward in two), and compares the loss curve, the gradient norms, the
expert loads and every final parameter each rank holds: relative difference < 1e-5 in fp32.
The aux loss and z-loss are on everywhere; one scenario routes with sigmoid scores and the
expert bias, one with the global aux loss.
"""

from __future__ import annotations

import re

import pytest
import torch

from megatron.core.optimizer import is_expert_param
from megatron.core.parallel_state import ProcessGroups, groups_from_mesh
from tests.distributed.harness import run_scenarios
from tests.helpers import assert_same_curves, make_config, rel_diff, train_steps

BASE = ("--num-layers 4 --global-batch-size 8 --micro-batch-size 2 --num-experts 4 --moe-router-topk 2 "
        "--moe-z-loss-coeff 1e-3 --clip-grad 0.05")
STEPS = 3
PARALLEL_FLAGS = re.compile(r"--(pipeline-model-parallel-size|expert-model-parallel-size|virtual-pipeline-model-"
                            r"parallel-size|decoder-first-pipeline-num-layers|decoder-last-pipeline-num-layers|"
                            r"num-layers-per-virtual-pipeline-stage) \d+|--use-distributed-optimizer|"
                            r"--account-for-\w+-in-pipeline-split|--pipeline-schedule \w+")

# (name, world size, extra flags)
SCENARIOS = [
    ("pp2", 2, "--pipeline-model-parallel-size 2"),
    ("pp2-interleaved", 2, "--pipeline-model-parallel-size 2 --virtual-pipeline-model-parallel-size 2"),
    ("pp2-interleaved-zero-bubble-recompute", 2, "--pipeline-model-parallel-size 2 "
     "--virtual-pipeline-model-parallel-size 2 --pipeline-schedule InterleavedZeroBubble --moe-layer-recompute"),
    ("pp2-untied-sigmoid-bias", 2, "--pipeline-model-parallel-size 2 --untie-embeddings-and-output-weights "
     "--moe-router-score-function sigmoid --moe-router-enable-expert-bias --moe-router-bias-update-rate 0.01"),
    ("pp2-dense-first-stage-uneven", 2, "--pipeline-model-parallel-size 2 --decoder-first-pipeline-num-layers 1 "
     "--moe-layer-freq ([0]*2+[1]*2)"),
    ("pp3-uneven-first-last", 3, "--pipeline-model-parallel-size 3 --decoder-first-pipeline-num-layers 1 "
     "--decoder-last-pipeline-num-layers 1"),
    ("pp4", 4, "--pipeline-model-parallel-size 4 --moe-router-load-balancing-type global_aux_loss"),
    ("pp2xep2", 4, "--pipeline-model-parallel-size 2 --expert-model-parallel-size 2 "
     "--moe-token-dispatcher-type alltoall"),
    ("pp2xdp2-distopt-overlap", 4, "--pipeline-model-parallel-size 2 --use-distributed-optimizer "
     "--overlap-grad-reduce --ddp-bucket-size 2000"),
    ("pp2xdp2-interleaved-overlap", 4, "--pipeline-model-parallel-size 2 --virtual-pipeline-model-parallel-size 2 "
     "--overlap-grad-reduce --ddp-bucket-size 2000 --global-batch-size 16"),
    # Noisy top-k redraws each micro-batch's noise in recompute; sinkhorn and group-limited routing.
    ("pp2-interleaved-zero-bubble-recompute-noisy-topk", 2, "--pipeline-model-parallel-size 2 "
     "--virtual-pipeline-model-parallel-size 2 --pipeline-schedule InterleavedZeroBubble --moe-layer-recompute "
     "--moe-router-type noisy_topk"),
    ("pp2-sinkhorn", 2, "--pipeline-model-parallel-size 2 --moe-router-load-balancing-type sinkhorn "
     "--moe-aux-loss-coeff 0"),
    ("pp2-group-limited", 2, "--pipeline-model-parallel-size 2 --moe-router-num-groups 2 --moe-router-group-topk 1"),
]


def _parallel_sizes(extra: str) -> tuple[int, int]:
    pp = re.search(r"--pipeline-model-parallel-size (\d+)", extra)
    ep = re.search(r"--expert-model-parallel-size (\d+)", extra)
    return int(pp.group(1)) if pp else 1, int(ep.group(1)) if ep else 1


def _worker(rank: int, world: int, scenarios: list) -> list:
    torch.use_deterministic_algorithms(True)
    out = []
    for name, _, extra in scenarios:
        cfg = make_config(f"{BASE} {extra}", world_size=world)
        pp, ep = _parallel_sizes(extra)
        groups = groups_from_mesh(ep, torch.device("cpu"), "gloo", pp_size=pp)
        out.append(train_steps(cfg, groups, STEPS, keep_grads=False))
    return out


def _reference(extra: str) -> dict:
    return train_steps(make_config(f"{BASE} {PARALLEL_FLAGS.sub('', extra)}"), ProcessGroups(), STEPS)


@pytest.fixture(scope="module")
def pipeline_results():
    return run_scenarios(_worker, SCENARIOS)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_pipeline_equals_single_process(scenario, pipeline_results):
    name, world, extra = scenario
    ref = _reference(extra)
    ranks = pipeline_results[name]
    held = set()
    for res in ranks:
        assert_same_curves(res, ref, name)
        for n, p in res["params"].items():
            expected = ref["params"][n]
            if is_expert_param(n):
                expected = expected[res["expert_offset"]:res["expert_offset"] + p.shape[0]]
            assert rel_diff(p, expected) < 1e-5, (name, n)
            held.add(n)
        for n, b in res["buffers"].items():
            if n.endswith("expert_bias"):
                torch.testing.assert_close(b, ref["buffers"][n], rtol=1e-5, atol=1e-7)
    assert held == set(ref["params"]), (name, set(ref["params"]) - held)
