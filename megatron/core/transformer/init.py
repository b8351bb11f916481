"""Weight initialisation (Megatron's): normal(0, std) everywhere, and std / sqrt(2 L) for the
projections that write into the residual stream (attention output, FFN output), so that the
residual's variance does not grow with depth. Biases start at zero."""

import contextlib
import math
from typing import Optional

import torch
from torch import nn

from megatron.core.config import ModelConfig


def init_std(config: ModelConfig) -> float:
    return config.init_method_std


def output_init_std(config: ModelConfig) -> float:
    return config.init_method_std / math.sqrt(2.0 * config.num_layers)


def linear(in_features: int, out_features: int, bias: bool, std: float) -> nn.Linear:
    """An nn.Linear initialised with normal(0, std) weights and zero bias."""
    layer = nn.Linear(in_features, out_features, bias=bias)
    nn.init.normal_(layer.weight, mean=0.0, std=std)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


def normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    with torch.no_grad():
        return tensor.normal_(0.0, std)


@contextlib.contextmanager
def seeded(seed: Optional[int], piece: int):
    """Draw the weights of one piece of the model (the embedding: -1, layer i: i, the output
    layer: L) from its own seed, so that a pipeline stage building only some pieces gets the same
    weights as one process building them all. A no-op without a seed (the caller's RNG stream is
    used as is)."""
    if seed is None:
        yield
        return
    device = torch.get_default_device()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed + 1_000_003 * (piece + 2))
        yield
