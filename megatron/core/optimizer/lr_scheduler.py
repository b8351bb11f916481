"""Megatron's learning-rate schedule, counted in optimizer steps.

Linear warmup from `lr_warmup_init` to `lr` over `lr_warmup_iters`, then decay to `min_lr` at
`lr_decay_iters` (constant, linear, cosine, inverse-square-root, or WSD: constant, then a
final `lr_wsd_decay_iters` annealing phase), then `min_lr`. Like Megatron, the schedule
advances only on successful (non-skipped) steps.
"""

from __future__ import annotations

import math

import torch

from megatron.core.config import OptimizerConfig


def learning_rate(cfg: OptimizerConfig, step: int) -> float:
    """The learning rate after `step` successful optimizer steps."""
    max_lr, min_lr = cfg.lr, cfg.min_lr
    warmup, decay = cfg.lr_warmup_iters, cfg.lr_decay_iters
    if warmup > 0 and step <= warmup:
        return cfg.lr_warmup_init + (max_lr - cfg.lr_warmup_init) * step / warmup
    style = cfg.lr_decay_style
    if style == "constant":
        return max_lr
    if style == "inverse-square-root":
        return max(min_lr, max_lr * math.sqrt(max(warmup, 1)) / math.sqrt(max(step, 1)))
    if step > decay:
        return min_lr
    if style == "WSD":
        anneal_start = decay - cfg.lr_wsd_decay_iters
        if step <= anneal_start:
            coeff = 1.0
        else:
            r = (step - anneal_start) / cfg.lr_wsd_decay_iters
            coeff = {
                "linear": 1.0 - r,
                "cosine": 0.5 * (math.cos(math.pi * r) + 1.0),
                "exponential": 2.0 * math.pow(0.5, r) - 1.0,
                "minus_sqrt": 1.0 - math.sqrt(r),
            }[cfg.lr_wsd_decay_style]
    else:
        ratio = (step - warmup) / max(decay - warmup, 1)
        coeff = 1.0 - ratio if style == "linear" else 0.5 * (math.cos(math.pi * ratio) + 1.0)
    return min_lr + coeff * (max_lr - min_lr)


class OptimizerParamScheduler:
    """Sets every param group's lr from the schedule; `step()` after each successful update."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: OptimizerConfig):
        self.optimizer = optimizer
        self.cfg = cfg
        self.num_steps = 0
        self._apply()

    def _apply(self) -> None:
        lr = learning_rate(self.cfg, self.num_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @property
    def lr(self) -> float:
        return learning_rate(self.cfg, self.num_steps)

    def step(self, increment: int = 1) -> None:
        self.num_steps += increment
        self._apply()

    def state_dict(self) -> dict:
        return {"num_steps": self.num_steps}

    def load_state_dict(self, state: dict) -> None:
        self.num_steps = int(state["num_steps"])
        self._apply()
