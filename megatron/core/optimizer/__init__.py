"""AdamW over Megatron's parameter groups (no weight decay on norms and biases)."""

from __future__ import annotations

import torch
from torch import nn

from megatron.core.config import OptimizerConfig


def is_expert_param(name: str) -> bool:
    """Parameters split over the expert-parallel group (reduced over expert-data-parallel)."""
    return ".experts." in name


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed matrices, and undecayed biases and norm weights (1-D parameters)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() == 1 or name.endswith(".bias") else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def adamw(params, cfg: OptimizerConfig) -> torch.optim.AdamW:
    """torch.optim.AdamW, fused when every parameter lives on a device that supports it."""
    flat = [p for g in params for p in g["params"]] if params and isinstance(params[0], dict) else list(params)
    fused = bool(flat) and all(p.device.type in ("cpu", "cuda") for p in flat)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                             weight_decay=cfg.weight_decay, fused=fused)
