"""Megatron-style tensor parallelism: differentiable TP collectives, column/row-parallel
linear layers, the vocab-parallel embedding and the vocab-parallel fused cross-entropy.

Nothing here reads a global: every function and layer takes its tensor-parallel process group
explicitly (None, or a group of size 1, means no tensor parallelism).
"""

from megatron.core.tensor_parallel.cross_entropy import (
    vocab_parallel_cross_entropy_loss,
    vocab_parallel_linear_cross_entropy,
)
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    all_reduce_sequence_parallel_grads,
    split_qkv,
    split_swiglu_fc1,
)
from megatron.core.tensor_parallel.mappings import (
    SEQUENCE_DIM,
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "all_reduce_sequence_parallel_grads",
    "split_qkv",
    "split_swiglu_fc1",
    "SEQUENCE_DIM",
    "copy_to_tensor_parallel_region",
    "gather_from_sequence_parallel_region",
    "reduce_from_tensor_parallel_region",
    "reduce_scatter_to_sequence_parallel_region",
    "scatter_to_sequence_parallel_region",
    "vocab_parallel_cross_entropy_loss",
    "vocab_parallel_linear_cross_entropy",
]
