"""Contiguous gradient buffers, bucketed reduction, and the sharded (ZeRO-1) optimizer layout.

Parameters are split into two sections by how their gradients are reduced:

* dense parameters: averaged over the data-parallel group;
* expert parameters: summed over the expert-data-parallel group. Their gradient already holds
  the contributions of every rank in the expert-parallel group (the all-to-all backward
  brought them), so both sections are scaled by 1 / data-parallel size.

Each section owns one flat fp32 gradient buffer; every `param.grad` is a view into it, so
autograd accumulates micro-batches in place and reduction needs no copies. The buffer is cut
into buckets of whole parameters (in reverse registration order, the order backward produces
them), each padded to a multiple of the group size. A bucket is reduced once per optimizer
step, after the last micro-batch: right away while backward continues when overlap is on, or
all together in `finish_grad_sync`.

With the distributed optimizer a bucket is reduce-scattered instead of all-reduced: rank r of
the group owns chunk r of every bucket, updates the matching slice of the parameters, and the
updated parameters are all-gathered back (`ShardedSection`). Results equal the unsharded path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def reduce_scatter(out: torch.Tensor, inp: torch.Tensor, group, async_op: bool = False):
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(out, inp, group=group, async_op=async_op)


def all_gather_into(out: torch.Tensor, inp: torch.Tensor, group, async_op: bool = False):
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, inp, group=group, async_op=async_op)


@dataclass
class ShardView:
    """Elements [start, end) of `param.view(-1)` owned by this rank, as the leaf `shard`."""

    param: nn.Parameter
    shard: nn.Parameter
    start: int
    end: int


@dataclass
class Bucket:
    """A padded range [start, end) of a section's buffers holding whole parameters."""

    start: int
    end: int
    params: list[nn.Parameter]
    pending: set = field(default_factory=set)
    handle: Optional[object] = None


class Section:
    """Parameters that share a reduction group: their flat grad buffer and its buckets.

    group: the process group gradients are reduced over (None in a single process).
    scale: factor applied before the sum-reduction (1 / data-parallel size).
    shard: reduce-scatter (distributed optimizer) instead of all-reduce.
    """

    def __init__(self, params: list[nn.Parameter], group, scale: float, shard: bool,
                 bucket_size: int, device: torch.device):
        self.params = params
        self.group = group
        self.scale = scale
        self.shard = shard
        self.size = _group_size(group)
        self.rank = _group_rank(group)
        self.offsets: dict[nn.Parameter, int] = {}
        self.buckets: list[Bucket] = []
        self._layout(bucket_size)
        total = self.buckets[-1].end if self.buckets else 0
        self.grad_buffer = torch.zeros(total, dtype=torch.float32, device=device)
        self.param_buffer = None
        if shard:  # parameters become views of one flat buffer, so chunks can be all-gathered in place
            self.param_buffer = torch.zeros(total, dtype=params[0].dtype if params else torch.float32, device=device)
            for p in params:
                view = self._view(self.param_buffer, p)
                view.copy_(p.data)
                p.data = view
        for p in params:
            p.grad = self._view(self.grad_buffer, p)

    def _layout(self, bucket_size: int) -> None:
        start, offset, members = 0, 0, []
        for i, p in enumerate(self.params):
            self.offsets[p] = offset
            offset += p.numel()
            members.append(p)
            if offset - start >= bucket_size or i == len(self.params) - 1:
                end = start + _round_up(offset - start, self.size)
                self.buckets.append(Bucket(start, end, members))
                start = offset = end
                members = []

    def _view(self, buffer: torch.Tensor, p: nn.Parameter) -> torch.Tensor:
        o = self.offsets[p]
        return buffer[o:o + p.numel()].view_as(p)

    def grad_view(self, p: nn.Parameter) -> torch.Tensor:
        """p's gradient in the flat buffer."""
        return self._view(self.grad_buffer, p)

    def owned_parts(self, p: nn.Parameter) -> list[torch.Tensor]:
        """The parts of p's gradient this rank owns: all of it, or with sharding its slices
        inside this rank's chunk of each bucket."""
        lo, hi = self.offsets[p], self.offsets[p] + p.numel()
        if not self.shard:
            return [self.grad_buffer[lo:hi]]
        parts = []
        for b in self.buckets:
            c = (b.end - b.start) // self.size
            a, z = max(lo, b.start + self.rank * c), min(hi, b.start + (self.rank + 1) * c)
            if a < z:
                parts.append(self.grad_buffer[a:z])
        return parts

    def bucket_of(self) -> dict[nn.Parameter, Bucket]:
        return {p: b for b in self.buckets for p in b.params}

    # ---- reduction
    def start_bucket(self, bucket: Bucket) -> None:
        grads = self.grad_buffer[bucket.start:bucket.end]
        if self.scale != 1.0:
            grads.mul_(self.scale)
        if self.size == 1:
            return
        if self.shard:
            chunk = self.local_chunk(self.grad_buffer, bucket)
            bucket.handle = reduce_scatter(chunk, grads, self.group, async_op=True)
        else:
            bucket.handle = dist.all_reduce(grads, group=self.group, async_op=True)

    def local_chunk(self, buffer: torch.Tensor, bucket: Bucket) -> torch.Tensor:
        c = (bucket.end - bucket.start) // self.size
        return buffer[bucket.start + self.rank * c: bucket.start + (self.rank + 1) * c]

    def finish(self, started: set) -> None:
        for b in self.buckets:
            if id(b) not in started:
                self.start_bucket(b)
        for b in self.buckets:
            if b.handle is not None:
                b.handle.wait()
                b.handle = None

    def zero_grad(self) -> None:
        self.grad_buffer.zero_()

    # ---- sharded optimizer layout
    def shard_views(self) -> list["ShardView"]:
        """This rank's slice of each parameter, as a leaf Parameter sharing storage with the
        param buffer, its .grad a view of the grad buffer."""
        pairs = []
        for b in self.buckets:
            c = (b.end - b.start) // self.size
            lo, hi = b.start + self.rank * c, b.start + (self.rank + 1) * c
            for p in b.params:
                p_lo, p_hi = self.offsets[p], self.offsets[p] + p.numel()
                a, z = max(lo, p_lo), min(hi, p_hi)
                if a >= z:
                    continue
                shard = nn.Parameter(self.param_buffer[a:z], requires_grad=True)
                shard.grad = self.grad_buffer[a:z]
                pairs.append(ShardView(p, shard, a - p_lo, z - p_lo))
        return pairs

    def all_gather_params(self) -> None:
        if self.size == 1:
            return
        handles = [all_gather_into(self.param_buffer[b.start:b.end], self.local_chunk(self.param_buffer, b).clone(),
                                   self.group, async_op=True) for b in self.buckets]
        for h in handles:
            h.wait()


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple
