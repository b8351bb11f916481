"""The dense feed-forward block: SwiGLU or GELU.

`linear_fc1` maps D -> 2F for SwiGLU (gate half first, then the up half, as Megatron-Core) or
D -> F for GELU; `linear_fc2` maps F -> D. Under tensor parallelism fc1 is column-parallel (for
SwiGLU each rank holds its F / T slice of the gate and of the up half, so the activation stays
local) and fc2 row-parallel.
"""

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.config import ModelConfig
from megatron.core.fusions.swiglu import swiglu
from megatron.core.tensor_parallel import split_swiglu_fc1
from megatron.core.tensor_parallel.context import TensorParallel
from megatron.core.transformer import init


def activation(config: ModelConfig):
    return swiglu if config.swiglu else F.gelu


class MLP(nn.Module):
    """x_BSD -> y_BSD (x_BsD -> y_BsD under sequence parallelism) through an FFN of hidden size
    `ffn_hidden_size`."""

    def __init__(self, config: ModelConfig, ffn_hidden_size: int, tp: TensorParallel = TensorParallel()):
        super().__init__()
        fc1_out = 2 * ffn_hidden_size if config.swiglu else ffn_hidden_size
        fc1 = init.linear(config.hidden_size, fc1_out, config.add_bias_linear, init.init_std(config))
        self.linear_fc1 = tp.column(fc1, split=split_swiglu_fc1) if config.swiglu else tp.column(fc1)
        self.linear_fc2 = tp.row(init.linear(ffn_hidden_size, config.hidden_size, config.add_bias_linear,
                                             init.output_init_std(config)))
        self.act = activation(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))
