"""Bytes per parameter of each precision layout, measured on the tensors a training run holds.

    python benchmarks/precision_layout.py          # fp32 / bf16 / fp32+ZeRO-1 / bf16+ZeRO-1 (DP=2, gloo)

For each layout it builds the real Trainer (a small MoE on mock data), runs one optimizer step
so that AdamW's state exists, and adds up on each rank: the model parameters, the fp32
gradient buffers, and the optimizer state (fp32 main parameters when they are separate tensors,
and the two moments). Each sum is divided by the model's parameter count. Buffers are padded to
the data-parallel size, so sharded figures are a hair above the formula.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.core.parallel_state import ProcessGroups, destroy, groups_from_mesh  # noqa: E402
from megatron.training.arguments import config_from_args, parse_args  # noqa: E402
from megatron.training.data import build_datasets, build_loader, micro_batches  # noqa: E402
from megatron.training.train import Trainer  # noqa: E402

MODEL = ("--num-layers 4 --hidden-size 256 --ffn-hidden-size 512 --num-attention-heads 8 --seq-length 64 "
         "--max-position-embeddings 64 --position-embedding-type rope --normalization RMSNorm --swiglu "
         "--disable-bias-linear --vocab-size 1024 --make-vocab-size-divisible-by 128 --mock-data "
         "--micro-batch-size 2 --global-batch-size 4 --train-iters 1 --lr 1e-3 --num-experts 8 "
         "--moe-router-topk 2 --eval-iters 0 --num-workers 0 --log-interval 1")
LAYOUTS = [("fp32", "", 1), ("bf16", "--bf16", 1), ("fp32 + distributed optimizer, DP=2", "--use-distributed-optimizer", 2),
           ("bf16 + distributed optimizer, DP=2", "--bf16 --use-distributed-optimizer", 2)]


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(cfg, groups: ProcessGroups) -> dict:
    """{'param': B, 'grad': B, 'main': B, 'moments': B, 'numel': N} on this rank after one step."""
    trainer = Trainer(cfg, groups)
    train_ds, _, _ = build_datasets(cfg)
    batches = micro_batches(build_loader(train_ds, cfg, groups), groups.device)
    trainer.train_step([next(batches) for _ in range(cfg.num_microbatches)])
    params = list(trainer.model.parameters())
    optimizer_params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    state = trainer.optimizer.inner.state.values()
    return {
        "param": _bytes(params),
        "grad": _bytes(s.grad_buffer for s in trainer.dp.sections)
        + _bytes(p.grad for p in params if p.grad is not None and p.grad is not p.main_grad),
        "main": _bytes(optimizer_params) if trainer.optimizer.has_main_params else 0,
        "moments": _bytes(s[k] for s in state for k in ("exp_avg", "exp_avg_sq")),
        "numel": sum(p.numel() for p in params),
    }


def _config(extra: str, world: int):
    return config_from_args(parse_args(shlex.split(MODEL) + shlex.split(extra)), world_size=world)


def _worker(rank: int, world: int, port: int, out_dir: str, extra: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    groups = groups_from_mesh(1, torch.device("cpu"), "gloo")
    try:
        torch.save(measure(_config(extra, world), groups), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        destroy(groups)  # collects the trainer's reference cycles before the groups go


def run(extra: str, world: int) -> dict:
    """Rank 0's figures of one layout on `world` gloo ranks (one process when world = 1)."""
    if world == 1:
        return measure(_config(extra, 1), ProcessGroups())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(world, port, out_dir, extra), nprocs=world, start_method="spawn")
        return torch.load(os.path.join(out_dir, "rank0.pt"))


def main(argv=None) -> None:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args(argv)
    print(f"{'layout':<38} {'param':>6} {'grad':>6} {'main':>6} {'moments':>8} {'total':>7}  (bytes per parameter, rank 0)")
    for name, extra, world in LAYOUTS:
        r = run(extra, world)
        per = {k: r[k] / r["numel"] for k in ("param", "grad", "main", "moments")}
        print(f"{name:<38} {per['param']:6.2f} {per['grad']:6.2f} {per['main']:6.2f} {per['moments']:8.2f} "
              f"{sum(per.values()):7.2f}")


if __name__ == "__main__":
    main()
