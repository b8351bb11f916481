"""Expert + data parallelism on CPU gloo ranks equals the single-process run.

Each scenario trains a few steps on 2 or 4 ranks and on one process with the same global batch
(micro-batch 2 with gradient accumulation as the reference), and compares the loss curve, the
gradient norms, the first step's gradients of every parameter (unsharded optimizer) and the
final parameters: relative difference < 1e-5 in fp32.
"""

from __future__ import annotations

import pytest
import torch

from megatron.core.optimizer import is_expert_param
from megatron.core.parallel_state import ProcessGroups, groups_from_mesh
from tests.distributed.harness import run_scenarios
from tests.helpers import make_config, rel_diff, train_steps

BASE = "--global-batch-size 8 --micro-batch-size 2 --num-experts 4 --moe-router-topk 2 --moe-z-loss-coeff 1e-3 " \
       "--clip-grad 0.05"
STEPS = 3
ZERO_TOKENS_BIAS = [0.0, 0.0, -1e4, -1e4]  # experts 2 and 3 never chosen: EP rank 1 of 2 gets no tokens

# (name, world size, expert-parallel size, extra flags, force a zero-token rank)
SCENARIOS = [
    ("ep2-alltoall", 2, 2, "--moe-token-dispatcher-type alltoall", False),
    ("ep2-allgather-capacity-distopt", 2, 2,
     "--moe-token-dispatcher-type allgather --moe-expert-capacity-factor 1.0 --use-distributed-optimizer", False),
    ("ep2-alltoall-zero-token-rank", 2, 2,
     "--moe-token-dispatcher-type alltoall --moe-router-score-function sigmoid --moe-router-enable-expert-bias "
     "--moe-router-bias-update-rate 0", True),
    ("ep4-alltoall-capacity-pad-distopt", 4, 4,
     "--moe-token-dispatcher-type alltoall --moe-expert-capacity-factor 1.0 --moe-pad-expert-input-to-capacity "
     "--use-distributed-optimizer", False),
    ("ep4-allgather", 4, 4, "--moe-token-dispatcher-type allgather", False),
    ("dp2xep2-alltoall-distopt-overlap", 4, 2,
     "--moe-token-dispatcher-type alltoall --use-distributed-optimizer --overlap-grad-reduce --ddp-bucket-size 2000",
     False),
    ("dp2xep2-allgather-capacity-overlap", 4, 2,
     "--moe-token-dispatcher-type allgather --moe-expert-capacity-factor 1.0 --overlap-grad-reduce "
     "--ddp-bucket-size 2000", False),
    ("dp4-distopt", 4, 1, "--use-distributed-optimizer", False),
    # The other routers, under each dispatcher (group-limited: each token on one EP rank's experts).
    ("ep2-alltoall-group-limited", 2, 2, "--moe-token-dispatcher-type alltoall --moe-router-num-groups 2 "
     "--moe-router-group-topk 1", False),
    ("ep2-allgather-group-limited-sigmoid-bias-capacity", 2, 2, "--moe-token-dispatcher-type allgather "
     "--moe-router-num-groups 2 --moe-router-group-topk 1 --moe-router-score-function sigmoid "
     "--moe-router-enable-expert-bias --moe-router-bias-update-rate 0.01 --moe-expert-capacity-factor 1.0", False),
    ("ep2-alltoall-sinkhorn", 2, 2, "--moe-token-dispatcher-type alltoall --moe-router-load-balancing-type sinkhorn "
     "--moe-aux-loss-coeff 0", False),
    ("ep2-allgather-sinkhorn-top1", 2, 2, "--moe-token-dispatcher-type allgather --moe-router-topk 1 "
     "--moe-router-load-balancing-type sinkhorn --moe-aux-loss-coeff 0", False),
    ("ep2-alltoall-noisy-topk", 2, 2, "--moe-token-dispatcher-type alltoall --moe-router-type noisy_topk "
     "--moe-aux-loss-coeff 1e-2", False),
    ("ep2-allgather-noisy-topk-fp64-capacity", 2, 2, "--moe-token-dispatcher-type allgather --moe-router-type "
     "noisy_topk --moe-aux-loss-coeff 1e-2 --moe-router-dtype fp64 --moe-expert-capacity-factor 1.0", False),
    ("ep2-alltoall-expert-choice-pad", 2, 2, "--moe-token-dispatcher-type alltoall --moe-router-type expert_choice "
     "--moe-aux-loss-coeff 0 --moe-expert-capacity-factor 1.0 --moe-pad-expert-input-to-capacity", False),
    ("ep2-allgather-expert-choice", 2, 2, "--moe-token-dispatcher-type allgather --moe-router-type expert_choice "
     "--moe-aux-loss-coeff 0 --moe-expert-capacity-factor 0.5", False),
]


def _flags(extra: str, ep: int) -> str:
    return f"{BASE} {extra} --expert-model-parallel-size {ep}"


def _worker(rank: int, world: int, scenarios: list) -> list:
    torch.use_deterministic_algorithms(True)
    out = []
    for name, _, ep, extra, zero in scenarios:
        cfg = make_config(_flags(extra, ep), world_size=world)
        groups = groups_from_mesh(ep, torch.device("cpu"), "gloo")
        out.append(train_steps(cfg, groups, STEPS, ZERO_TOKENS_BIAS if zero else None,
                               keep_grads="--use-distributed-optimizer" not in extra))
    return out


def _reference(extra: str, zero: bool) -> dict:
    cfg = make_config(f"{BASE} {extra}".replace("--use-distributed-optimizer", "").replace("--overlap-grad-reduce", ""))
    return train_steps(cfg, ProcessGroups(), STEPS, ZERO_TOKENS_BIAS if zero else None)


def _local_slice(name: str, ref: torch.Tensor, got: torch.Tensor, offset: int) -> torch.Tensor:
    return ref[offset:offset + got.shape[0]] if is_expert_param(name) else ref


@pytest.fixture(scope="module")
def parallel_results():
    return run_scenarios(_worker, SCENARIOS)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_parallel_equals_single_process(scenario, parallel_results):
    name, world, ep, extra, zero = scenario
    ref = _reference(extra, zero)
    ranks = parallel_results[name]
    for res in ranks:
        for a, b in zip(res["losses"], ref["losses"]):
            assert abs(a - b) / abs(b) < 1e-5, (name, res["losses"], ref["losses"])
        for a, b in zip(res["norms"], ref["norms"]):
            assert abs(a - b) / abs(b) < 1e-5, (name, res["norms"], ref["norms"])
        for n, p in res["params"].items():
            expected = _local_slice(n, ref["params"][n], p, res["expert_offset"])
            assert rel_diff(p, expected) < 1e-5, (name, n)
        if res["grads"] is not None:
            for n, g in res["grads"].items():
                expected = _local_slice(n, ref["grads"][n], g, res["expert_offset"])
                if expected.norm() == 0:
                    assert g.norm() == 0, (name, n)
                else:
                    assert rel_diff(g, expected) < 1e-5, (name, n)
        # Expert loads are summed over all ranks: the global counts of the reference.
        for a, b in zip(res["loads"], ref["loads"]):
            for la, lb in zip(a, b):
                torch.testing.assert_close(la, lb)
    if zero:
        assert all(float(load[2:].sum()) == 0 for step in ranks[0]["loads"] for load in step)


def test_expert_weights_differ_across_ep_ranks_and_match_across_replicas(parallel_results):
    ranks = parallel_results["dp2xep2-allgather-capacity-overlap"]  # mesh (expert_dp=2, ep=2): ep rank = rank % 2
    w = "decoder.layers.0.mlp.experts.weight1"
    assert not torch.allclose(ranks[0]["params"][w], ranks[1]["params"][w])
    torch.testing.assert_close(ranks[0]["params"][w], ranks[2]["params"][w], rtol=0, atol=0)
    torch.testing.assert_close(ranks[1]["params"][w], ranks[3]["params"][w], rtol=0, atol=0)
    dense = "decoder.layers.0.self_attention.linear_qkv.weight"
    for r in ranks[1:]:
        torch.testing.assert_close(r["params"][dense], ranks[0]["params"][dense], rtol=0, atol=0)
