"""Expert-load health numbers reduced over 2 CPU gloo ranks equal the single-process run's."""

from __future__ import annotations

import pytest
import torch

from megatron.core.parallel_state import ProcessGroups, groups_from_mesh
from tests.distributed.harness import run_scenarios
from tests.helpers import make_config

BASE = "--global-batch-size 8 --micro-batch-size 2 --num-experts 4 --moe-router-topk 2 --moe-expert-capacity-factor 1.0"
STEPS = 2
# (name, world size, expert-parallel size, tensor-parallel size, extra flags)
SCENARIOS = [
    ("dp2xep2", 2, 2, 1, "--expert-model-parallel-size 2"),
    ("tp2-sp", 2, 1, 2, "--tensor-model-parallel-size 2 --sequence-parallel"),
]


def _health_per_step(cfg, groups) -> list:
    from megatron.training.data import build_datasets, build_loader, micro_batches
    from megatron.training.train import Trainer

    trainer = Trainer(cfg, groups)
    batches = micro_batches(build_loader(build_datasets(cfg)[0], cfg, groups), groups.device)
    out = []
    for _ in range(STEPS):
        result = trainer.train_step([next(batches) for _ in range(cfg.num_microbatches)])
        out.append([(load.layer, load.tokens_per_expert_E.clone(), load.health()) for load in result.moe_loads])
    return out


def _worker(rank: int, world: int, scenarios: list) -> list:
    out = []
    for _, _, ep, tp, extra in scenarios:
        cfg = make_config(f"{BASE} {extra}", world_size=world)
        out.append(_health_per_step(cfg, groups_from_mesh(ep, torch.device("cpu"), "gloo", tp_size=tp)))
    return out


@pytest.fixture(scope="module")
def results():
    return run_scenarios(_worker, SCENARIOS)


@pytest.mark.parametrize("name", [s[0] for s in SCENARIOS])
def test_health_matches_single_process(results, name):
    ref = _health_per_step(make_config(BASE), ProcessGroups())
    for rank_result in results[name]:  # every rank logs the same global numbers
        for step, ref_step in zip(rank_result, ref):
            for (layer, counts, h), (ref_layer, ref_counts, ref_h) in zip(step, ref_step):
                assert layer == ref_layer
                torch.testing.assert_close(counts, ref_counts)
                assert set(h) == set(ref_h) and "token_entropy" in h
                for k in h:
                    assert h[k] == pytest.approx(ref_h[k], rel=1e-4, abs=1e-6), (name, layer, k)
