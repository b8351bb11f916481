"""Contiguous gradient buffers, bucketed reduction, and the optimizer's main parameters.

Parameters are split into two sections by how their gradients are reduced:

* dense parameters: averaged over the data-parallel group;
* expert parameters: summed over the expert-data-parallel group. Their gradient already holds
  the contributions of every rank in the expert-parallel group (the all-to-all backward
  brought them), so both sections are scaled by 1 / data-parallel size.

Each section owns one flat fp32 gradient buffer, cut into buckets of whole parameters (in
reverse registration order, the order backward produces them), each padded to a multiple of
the group size. Every parameter's `main_grad` is its view of that buffer. A bucket is reduced
once per optimizer step, after the last micro-batch: right away while backward continues when
overlap is on, or all together in `finish_grad_sync`. Reduction is therefore always in fp32.

Precision (`params_dtype`):

* fp32 parameters: `param.grad` is the buffer view itself, so autograd accumulates
  micro-batches in place and nothing is copied.
* bf16/fp16 parameters (Megatron's mixed-precision layout): the model parameters are views of a
  flat `param_buffer` in that dtype; autograd produces a low-precision `param.grad`, which
  `accumulate_main_grad` (a post-accumulate-grad hook) adds into the fp32 view and frees. The
  optimizer updates fp32 main parameters, views of a flat `main_buffer` cast from the fp32
  values the parameters had when the section was built, and `copy_main_to_params` rounds them
  back into the model.

With the distributed optimizer a bucket is reduce-scattered instead of all-reduced: rank r of
the group owns chunk r of every bucket, updates that chunk's main parameters, and the updated
parameters are all-gathered back. Results equal the unsharded path. A rank's "owned range" of a
bucket is that chunk, or the whole bucket without the distributed optimizer.
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
    """Elements [start, end) of `param.view(-1)` that the optimizer parameter `shard` (a flat
    leaf, its .grad a view of the fp32 grad buffer) stands for: this rank's slice under the
    distributed optimizer, the whole parameter otherwise."""

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
    params_dtype: the model parameters' dtype; the parameters must still hold their fp32
        initial values when the section is built (they are cast here).
    """

    def __init__(self, params: list[nn.Parameter], group, scale: float, shard: bool,
                 bucket_size: int, device: torch.device, params_dtype: torch.dtype = torch.float32):
        self.params = params
        self.group = group
        self.scale = scale
        self.shard = shard
        self.mixed = params_dtype != torch.float32
        self.size = _group_size(group)
        self.rank = _group_rank(group)
        self.offsets: dict[nn.Parameter, int] = {}
        self.buckets: list[Bucket] = []
        self._layout(bucket_size)
        total = self.buckets[-1].end if self.buckets else 0
        self.grad_buffer = torch.zeros(total, dtype=torch.float32, device=device)
        self.main_buffer = self._fp32_owned_values() if self.mixed else None
        self.param_buffer = None
        if shard or self.mixed:  # parameters become views of one flat buffer (all-gather, one copy back)
            self.param_buffer = torch.zeros(total, dtype=params_dtype, device=device)
            for p in params:
                view = self._view(self.param_buffer, p)
                view.copy_(p.data)
                p.data = view
        for p in params:
            p.main_grad = self._view(self.grad_buffer, p)
            if not self.mixed:
                p.grad = p.main_grad

    def _fp32_owned_values(self) -> torch.Tensor:
        """[sum of owned-range lengths] fp32: the parameters' current values over this rank's
        owned ranges, bucket after bucket (padding zero)."""
        parts = []
        for b in self.buckets:
            lo, hi = self.owned_range(b)
            part = torch.zeros(hi - lo, dtype=torch.float32, device=self.grad_buffer.device)
            for p in b.params:
                a, z = max(lo, self.offsets[p]), min(hi, self.offsets[p] + p.numel())
                if a < z:
                    part[a - lo:z - lo] = p.detach().reshape(-1)[a - self.offsets[p]:z - self.offsets[p]]
            parts.append(part)
        return torch.cat(parts) if parts else self.grad_buffer.new_zeros(0)

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
        parts = []
        for b in self.buckets:
            owned_lo, owned_hi = self.owned_range(b)
            a, z = max(lo, owned_lo), min(hi, owned_hi)
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
        """Chunk `rank` of the bucket's range of `buffer` (what reduce-scatter leaves here)."""
        c = (bucket.end - bucket.start) // self.size
        return buffer[bucket.start + self.rank * c: bucket.start + (self.rank + 1) * c]

    def owned_range(self, bucket: Bucket) -> tuple[int, int]:
        """[lo, hi) of the section's buffers whose optimizer state lives on this rank."""
        if not self.shard:
            return bucket.start, bucket.end
        c = (bucket.end - bucket.start) // self.size
        return bucket.start + self.rank * c, bucket.start + (self.rank + 1) * c

    def accumulate_main_grad(self, param: nn.Parameter) -> None:
        """Post-accumulate-grad hook of mixed precision: main_grad (fp32) += grad; free grad."""
        param.main_grad.add_(param.grad)
        param.grad = None

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

    # ---- the optimizer's parameters
    def shard_views(self) -> list["ShardView"]:
        """The optimizer parameters of this section: one flat leaf per (parameter, owned range)
        overlap, its .grad a view of the grad buffer. It shares storage with the param buffer
        (fp32, distributed optimizer) or with the fp32 main buffer (bf16/fp16). Empty for fp32
        without the distributed optimizer: the optimizer then holds the model parameters."""
        if not (self.shard or self.mixed):
            return []
        views, main_start = [], 0
        for b in self.buckets:
            lo, hi = self.owned_range(b)
            for p in b.params:
                p_lo, p_hi = self.offsets[p], self.offsets[p] + p.numel()
                a, z = max(lo, p_lo), min(hi, p_hi)
                if a >= z:
                    continue
                values = (self.main_buffer[main_start + a - lo:main_start + z - lo] if self.mixed
                          else self.param_buffer[a:z])
                shard = nn.Parameter(values, requires_grad=True)
                shard.grad = self.grad_buffer[a:z]
                views.append(ShardView(p, shard, a - p_lo, z - p_lo))
            main_start += hi - lo
        return views

    def copy_main_to_params(self) -> None:
        """Round the updated fp32 main parameters into this rank's owned ranges of the params."""
        if not self.mixed:
            return
        main_start = 0
        for b in self.buckets:
            lo, hi = self.owned_range(b)
            self.param_buffer[lo:hi].copy_(self.main_buffer[main_start:main_start + hi - lo])
            main_start += hi - lo

    def all_gather_params(self) -> None:
        if not self.shard or self.size == 1:
            return
        handles = [all_gather_into(self.param_buffer[b.start:b.end], self.local_chunk(self.param_buffer, b).clone(),
                                   self.group, async_op=True) for b in self.buckets]
        for h in handles:
            h.wait()


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple
