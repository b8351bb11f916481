"""Weight initialisation (Megatron's): normal(0, std) everywhere, and std / sqrt(2 L) for the
projections that write into the residual stream (attention output, FFN output), so that the
residual's variance does not grow with depth. Biases start at zero."""

import math

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
