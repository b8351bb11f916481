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
