"""Normalization layers: RMSNorm and LayerNorm, both on PyTorch's fused kernels."""

from torch import nn

from megatron.core.config import ModelConfig


def build_norm(config: ModelConfig, dim: int | None = None) -> nn.Module:
    """A `config.normalization` layer over the last `dim` (default hidden size) features."""
    dim = config.hidden_size if dim is None else dim
    if config.normalization == "RMSNorm":
        return nn.RMSNorm(dim, eps=config.norm_epsilon)
    return nn.LayerNorm(dim, eps=config.norm_epsilon)
