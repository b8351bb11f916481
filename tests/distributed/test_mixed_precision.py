"""--bf16 with the distributed optimizer on 2 gloo ranks equals --bf16 in one process, and each
rank holds only its 1/DP share of the fp32 main parameters (and of the moments)."""

from __future__ import annotations

import torch

from megatron.core.dist_checkpointing import optimizer_state_by_name
from megatron.core.parallel_state import ProcessGroups, groups_from_mesh
from megatron.training.data import build_datasets, build_loader, micro_batches
from megatron.training.train import Trainer
from tests.distributed.harness import run_distributed
from tests.helpers import make_config

FLAGS = "--bf16 --global-batch-size 8 --micro-batch-size 2 --num-experts 4 --moe-router-topk 2 --lr 1e-2"
STEPS = 4


def _train(cfg, groups) -> dict:
    trainer = Trainer(cfg, groups)
    train_ds, _, _ = build_datasets(cfg)
    batches = micro_batches(build_loader(train_ds, cfg, groups), groups.device)
    losses = [trainer.train_step([next(batches) for _ in range(cfg.num_microbatches)]).lm_loss for _ in range(STEPS)]
    optimizer_params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    state = optimizer_state_by_name(trainer.model, trainer.optimizer)["state"]  # collective
    return dict(losses=losses,
                main_numel=sum(p.numel() for p in optimizer_params),
                moment_numel=sum(s["exp_avg"].numel() for s in trainer.optimizer.inner.state.values()),
                model_numel=sum(p.numel() for p in trainer.model.parameters()),
                main_dtypes={p.dtype for p in optimizer_params},
                params={n: p.detach().clone() for n, p in trainer.model.named_parameters()},
                mains={n: s["main_param"] for n, s in state.items()})


def _worker(rank: int, world: int) -> dict:
    torch.use_deterministic_algorithms(True)
    cfg = make_config(f"{FLAGS} --use-distributed-optimizer --overlap-grad-reduce --ddp-bucket-size 3000",
                      world_size=world)
    return _train(cfg, groups_from_mesh(1, torch.device("cpu"), "gloo"))


def test_bf16_distributed_optimizer_dp2_equals_one_process():
    ranks = run_distributed(_worker, 2)
    single = _train(make_config(FLAGS), ProcessGroups())
    total = single["model_numel"]
    assert single["main_numel"] == total and single["main_dtypes"] == {torch.float32}
    for r in ranks:
        # 1/DP of the main parameters and moments each (up to the padding of buckets to 2 ranks)
        assert abs(r["main_numel"] - total / 2) <= 8 and r["moment_numel"] == r["main_numel"], r["main_numel"]
        assert r["main_dtypes"] == {torch.float32}
        # Measured on CPU: losses agree to 1.2e-7 relative (fp32 reduction, same rounding points).
        for a, b in zip(r["losses"], single["losses"]):
            assert abs(a - b) / b < 1e-5, (r["losses"], single["losses"])
    assert sum(r["main_numel"] for r in ranks) >= total
    for name, p in ranks[0]["params"].items():
        assert p.dtype == torch.bfloat16 and torch.equal(p, ranks[1]["params"][name]), name  # all-gathered
        assert torch.equal(ranks[0]["mains"][name], ranks[1]["mains"][name]), name
        assert torch.equal(p, ranks[0]["mains"][name].to(torch.bfloat16)), name
