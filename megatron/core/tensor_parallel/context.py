"""`TensorParallel`: how a model built for one device splits its layers over a TP group.

The model code builds every layer whole, exactly as on one device (same shapes, same draws from
the RNG), then hands it to this object, which keeps this rank's slice:

    self.linear_qkv = tp.column(init.linear(D, QKV, ...), split=split_qkv(G))
    self.linear_proj = tp.row(init.linear(H * d, D, ...))

With T = 1 every method returns its argument unchanged, so a single device runs the plain
`nn.Linear`/`nn.Embedding` modules. With T > 1, every layout of ranks starts from the single
process's weights (checkpoint conversion uses the same split functions).

Sequence parallelism: activations between the tensor-parallel regions are x_BsD, this rank's
s = S / T consecutive positions of every sequence. `tag_replicated` marks parameters that then
see only a shard of the tokens (norms, the router, position embeddings) so that their gradients
are summed over the group (`all_reduce_sequence_parallel_grads`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from megatron.core.tensor_parallel import mappings
from megatron.core.tensor_parallel.random import TensorParallelRNG
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    Split,
    VocabParallelEmbedding,
    split_rows,
)


@dataclass(frozen=True)
class TensorParallel:
    """A tensor-parallel group (None: one device) and whether sequence parallelism is on."""

    group: Optional[dist.ProcessGroup] = None
    sequence_parallel: bool = False
    rng: Optional[TensorParallelRNG] = None
    """The per-rank dropout stream of regions where ranks hold different data (T > 1)."""

    @property
    def size(self) -> int:
        return mappings.group_size(self.group)

    @property
    def rank(self) -> int:
        return mappings.group_rank(self.group)

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def shards_sequence(self) -> bool:
        """Whether activations between regions are sequence shards x_BsD."""
        return self.sequence_parallel and self.enabled

    def dropout_rng(self, sharded: bool = True):
        """Context for dropout on activations that differ across the group (`sharded`): the
        tensor-parallel stream; on replicated activations, or without TP, the default one."""
        if sharded and self.enabled and self.rng is not None:
            return self.rng.fork()
        return contextlib.nullcontext()

    def column(self, linear: nn.Linear, split: Split = split_rows) -> nn.Module:
        """A whole nn.Linear (D -> O) as this rank's column-parallel slice (D -> O / T)."""
        if not self.enabled:
            return linear
        return ColumnParallelLinear.from_full(linear.weight, linear.bias, self.group, self.sequence_parallel, split)

    def row(self, linear: nn.Linear) -> nn.Module:
        """A whole nn.Linear (I -> D) as this rank's row-parallel slice (I / T -> D)."""
        if not self.enabled:
            return linear
        return RowParallelLinear.from_full(linear.weight, linear.bias, self.group, self.sequence_parallel)

    def vocab_embedding(self, embedding: nn.Embedding) -> nn.Module:
        """A whole word embedding (V rows) as this rank's V / T rows."""
        if not self.enabled:
            return embedding
        return VocabParallelEmbedding.from_full(embedding.weight, self.group, self.sequence_parallel)

    def tag_replicated(self, params: Iterable[nn.Parameter], partial_grads: Optional[bool] = None) -> None:
        """Mark replicated parameters whose gradients are partial sums over the group (by default:
        those that see only a sequence shard under sequence parallelism)."""
        if partial_grads is None:
            partial_grads = self.shards_sequence
        if partial_grads and self.enabled:
            for p in params:
                p.sequence_parallel = True

    def scatter_sequence(self, x_BSD: torch.Tensor) -> torch.Tensor:
        """Replicated x_BSD -> this rank's shard x_BsD (backward all-gathers)."""
        return mappings.scatter_to_sequence_parallel_region(x_BSD, self.group)

    def gather_sequence(self, x_BsD: torch.Tensor) -> torch.Tensor:
        """Shards x_BsD -> x_BSD on every rank (backward reduce-scatters)."""
        return mappings.gather_from_sequence_parallel_region(x_BsD, self.group)

    def sequence_shard(self, t_BS: torch.Tensor) -> torch.Tensor:
        """This rank's positions of a per-token tensor (no autograd), when sequences are sharded."""
        return mappings.split_along_dim(t_BS, self.group, 1) if self.shards_sequence else t_BS
