"""Shared test helpers: tiny configs built through the real flag parser."""

from __future__ import annotations

import shlex

import torch

from megatron.core.config import Config
from megatron.training.arguments import config_from_args, parse_args

TINY_FLAGS = (
    "--num-layers 2 --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 4 "
    "--group-query-attention --num-query-groups 2 --seq-length 16 --max-position-embeddings 16 "
    "--position-embedding-type rope --normalization RMSNorm --swiglu --disable-bias-linear "
    "--hidden-dropout 0 --attention-dropout 0 --vocab-size 64 --make-vocab-size-divisible-by 1 "
    "--mock-data --micro-batch-size 2 --global-batch-size 4 --train-iters 4 --lr 1e-3 "
    "--num-experts 4 --moe-router-topk 2 --moe-aux-loss-coeff 1e-2 --log-interval 1 "
    "--eval-iters 0 --num-workers 0"
)


def make_config(extra: str = "", world_size: int = 1, base: str = TINY_FLAGS) -> Config:
    """A validated Config from the tiny flags plus `extra` (later flags win)."""
    return config_from_args(parse_args(shlex.split(base) + shlex.split(extra)), world_size=world_size)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def train_steps(cfg: Config, groups, steps: int, expert_bias=None, keep_grads: bool = True,
                model_state: dict | None = None) -> dict:
    """Run `steps` optimizer steps with the real Trainer (starting from `model_state` if given);
    return losses, grad norms, first-step gradients (the fp32 `main_grad`) and final parameters
    (names as in the model; expert tensors are this rank's slice)."""
    from megatron.training.data import build_datasets, build_loader, micro_batches
    from megatron.training.train import Trainer

    trainer = Trainer(cfg, groups)
    if model_state is not None:
        trainer.model.load_state_dict(model_state)
        if trainer.optimizer.has_main_params:  # bf16/fp16: the fp32 main parameters too
            trainer.optimizer.load_main_params({p: model_state[n] for n, p in trainer.model.named_parameters()})
    if expert_bias is not None:
        for router in trainer.routers:
            router.expert_bias.copy_(torch.tensor(expert_bias))
    train_ds, _, _ = build_datasets(cfg)
    batches = micro_batches(build_loader(train_ds, cfg, groups), groups.device)
    losses, norms, grads, loads = [], [], None, []
    for step in range(steps):
        result = trainer.train_step([next(batches) for _ in range(cfg.num_microbatches)])
        losses.append(result.lm_loss)
        norms.append(result.grad_norm)
        loads.append([l.tokens_per_expert_E for l in result.moe_loads])
        if step == 0 and keep_grads:
            grads = {n: p.main_grad.detach().clone() for n, p in trainer.model.named_parameters()}
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in trainer.model.named_buffers()}
    layer = next((l.mlp for l in trainer.model.decoder.layers if l.is_moe), None)  # this rank's layers
    offset = layer.dispatcher.local_expert_offset if layer is not None else 0
    return dict(losses=losses, norms=norms, grads=grads, params=params, buffers=buffers, loads=loads,
                expert_offset=offset, rank=groups.rank)


def assert_same_curves(res: dict, ref: dict, name: str, rtol: float = 1e-5) -> None:
    """A parallel run's losses and gradient norms within `rtol` of the single process's, and its
    per-layer expert loads equal."""
    for a, b in zip(res["losses"], ref["losses"]):
        assert abs(a - b) / abs(b) < rtol, (name, res["losses"], ref["losses"])
    for a, b in zip(res["norms"], ref["norms"]):
        assert abs(a - b) / abs(b) < rtol, (name, res["norms"], ref["norms"])
    for a, b in zip(res["loads"], ref["loads"]):
        for la, lb in zip(a, b):
            torch.testing.assert_close(la, lb)


def load_tool(name: str):
    """Import tools/<name>.py as a module (tools are scripts, not a package)."""
    import importlib.util
    import os
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(name, os.path.join(repo, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # worker processes unpickle its functions by module name
    spec.loader.exec_module(module)
    return module
