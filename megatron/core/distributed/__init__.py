"""Data parallelism around a single-device model: gradient reduction and the optimizer over it.

`DataParallel(model, groups, parallel_cfg, params_dtype)` gives the model flat fp32 gradient
buffers (see `param_and_grad_buffer`), casts its parameters to `params_dtype`, reduces the
gradients once per optimizer step (overlapped with backward under `--overlap-grad-reduce`),
computes the global gradient norm, clips, and builds the optimizer: AdamW over the model
parameters (fp32, unsharded), or over fp32 main parameters that stand for them (bf16/fp16
parameters, or this rank's shard under `--use-distributed-optimizer`), which are copied back
into the model and all-gathered after each step.

Bytes per parameter (model parameter + fp32 gradient + optimizer state):

    fp32:                        4 + 4 + 8          (AdamW's two moments)
    bf16/fp16:                   2 + 4 + 12         (fp32 main parameter + two moments)
    bf16 + distributed optimizer 2 + 4 + 12 / DP

Under pipeline parallelism each stage reduces its own parameters over its data-parallel
ranks; the gradient norm sums every stage's share over the pipeline group; and when input and
output embeddings are tied, the first and last stage's copies of the word embedding get the
sum of both gradients (the last stage's copy is left out of the norm, counted once).

Under tensor parallelism, replicated parameters that saw only part of the tokens or heads
(tagged `sequence_parallel`: norms and the router under sequence parallelism, q/k norms) get
their gradients summed over the tensor-parallel group after the data-parallel reduction (both
are sums, so the order does not matter); the norm counts each slice of a split parameter once
and each replicated parameter once (on tensor-parallel rank 0). Expert parameters likewise:
slices split over the expert-tensor-parallel group (ETP) count on every rank, those replicated
over it (the experts' output bias) on ETP rank 0; their gradients are already whole on every
ETP rank (see `GroupedExperts`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from megatron.core.config import OptimizerConfig, ParallelConfig, TrainingConfig
from megatron.core.distributed.param_and_grad_buffer import Section, ShardView
from megatron.core.optimizer import adamw, is_expert_param, param_groups
from megatron.core.parallel_state import ProcessGroups
from megatron.core.tensor_parallel.mappings import all_reduce_in_place

DEFAULT_BUCKET_SIZE = 40_000_000


def params_dtype(training: TrainingConfig) -> torch.dtype:
    """The model parameters' dtype: bf16 under `--bf16`, fp16 under `--fp16`, else fp32."""
    return torch.bfloat16 if training.bf16 else torch.float16 if training.fp16 else torch.float32


class DataParallel:
    """Owns gradient buffers and their reduction for `model` (a plain nn.Module whose
    parameters are fp32; they are cast to `dtype` here)."""

    def __init__(self, model: nn.Module, groups: ProcessGroups, parallel: ParallelConfig,
                 dtype: torch.dtype = torch.float32, tied_embedding: Optional[str] = None):
        """tied_embedding: name of the word embedding when the first and last pipeline stage
        each hold a copy of it (tied input and output weights), else None."""
        self.model = model
        self.groups = groups
        self.shard = parallel.use_distributed_optimizer
        self.overlap = parallel.overlap_grad_reduce
        bucket = parallel.ddp_bucket_size or max(DEFAULT_BUCKET_SIZE, 1)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        dense = [p for n, p in reversed(named) if not is_expert_param(n)]
        expert = [p for n, p in reversed(named) if is_expert_param(n)]
        scale = 1.0 / groups.dp_size
        device = groups.device
        self.dense = Section(dense, groups.dp, scale, self.shard, bucket, device, dtype)
        self.expert = Section(expert, groups.expert_dp, scale, self.shard, bucket, device, dtype)
        self.sections = [s for s in (self.dense, self.expert) if s.params]
        # Groups over which each section's local squared norm is summed to a stage's norm: the
        # ranks holding different values (tensor-parallel slices; experts over EP x ETP), and
        # the data-parallel ranks too when the optimizer shards the buffers. Then over stages.
        self.norm_groups = {
            id(self.dense): groups.tp_dp if self.shard else groups.tp,
            id(self.expert): groups.tp_dp if self.shard else groups.ep_etp,
        }
        self.tp_partial = [p for p in dense if getattr(p, "sequence_parallel", False)]
        """Replicated parameters whose gradients are partial sums over the tensor-parallel group."""
        tied = dict(named).get(tied_embedding) if groups.embedding is not None and tied_embedding else None
        self.tied_embedding = tied
        """This stage's copy of the tied word embedding (first or last pipeline stage), else None."""
        self.norm_excluded = [tied] if tied is not None and groups.pp_rank == groups.pp_size - 1 else []
        if groups.tp_rank > 0:  # replicated over TP: counted on TP rank 0
            self.norm_excluded += [p for p in dense if not getattr(p, "tensor_model_parallel", False)
                                   and p is not tied]
        if groups.etp_size > 1 and dist.get_rank(groups.etp) > 0:  # replicated over ETP (bias2): on ETP rank 0
            self.norm_excluded += [p for p in expert if not getattr(p, "tensor_model_parallel", False)]
        self._started: set = set()
        self._passes: dict = {}
        self._passes_per_step = 1
        if self.overlap or dtype != torch.float32:
            self._register_hooks()

    # ------------------------------------------------------------------ reduction
    def _register_hooks(self) -> None:
        for section in self.sections:
            owner = section.bucket_of()
            for p in section.params:
                p.register_post_accumulate_grad_hook(self._make_hook(section, owner[p]))

    def _make_hook(self, section: Section, bucket):
        """After autograd accumulated `param.grad`: move it into main_grad (bf16/fp16), then,
        under overlap, start the bucket's reduction once all its parameters have seen this
        step's last backward pass (a tied embedding copy waits for `finish_grad_sync`, which
        first sums it with the other stage's copy)."""
        def hook(param: torch.Tensor) -> None:
            if section.mixed:
                section.accumulate_main_grad(param)
            if not self.overlap:
                return
            self._passes[param] = self._passes.get(param, 0) + 1
            if self._passes[param] < self._passes_per_step or param is self.tied_embedding:
                return
            bucket.pending.discard(param)
            if not bucket.pending and id(bucket) not in self._started:
                self._started.add(id(bucket))
                section.start_bucket(bucket)
        return hook

    def zero_grad(self, backward_passes: int = 1) -> None:
        """Start a step of `backward_passes` backward passes per parameter (micro-batches):
        overlapped reduction starts after the last of them."""
        for section in self.sections:
            section.zero_grad()
            for b in section.buckets:
                b.pending = set(b.params)
        self._started = set()
        self._passes: dict = {}
        self._passes_per_step = backward_passes

    def finish_grad_sync(self) -> None:
        """Sum the tied embedding copies' gradients (pipelining), then reduce every bucket not yet
        reduced and wait for all of them."""
        for section in self.sections:  # weight gradients a schedule added by hand, not through autograd's hooks
            if section.mixed:
                for p in section.params:
                    if p.grad is not None:
                        section.accumulate_main_grad(p)
        if self.tied_embedding is not None:
            dist.all_reduce(self.dense.grad_view(self.tied_embedding), group=self.groups.embedding)
        for section in self.sections:
            section.finish(self._started)
        self._started = set()
        self._sum_partial_grads_over_tp()

    def _sum_partial_grads_over_tp(self) -> None:
        """Sum the gradients of `tp_partial` parameters over the tensor-parallel group (one flat
        all-reduce; under the distributed optimizer every TP peer owns the same buffer ranges)."""
        all_reduce_in_place([self.dense.grad_view(p) for p in self.tp_partial], self.groups.tp)

    # ------------------------------------------------------------------ norms and clipping
    def _owned_grads(self, section: Section) -> list[torch.Tensor]:
        if not self.shard:
            return [section.grad_buffer]
        return [section.local_chunk(section.grad_buffer, b) for b in section.buckets]

    def grad_norm(self) -> float:
        """Global L2 norm of the reduced gradients of the whole model, identical on every rank."""
        total = torch.zeros((), dtype=torch.float32, device=self.groups.device)
        for section in self.sections:
            sq = sum((_sq(g) for g in self._owned_grads(section)), start=total.new_zeros(()))
            sq = sq - sum((_sq(g) for p in self.norm_excluded if p in section.offsets
                           for g in section.owned_parts(p)), start=total.new_zeros(()))
            group = self.norm_groups[id(section)]
            if group is not None and dist.get_world_size(group) > 1:
                dist.all_reduce(sq, group=group)
            total = total + sq
        if self.groups.pp is not None:
            dist.all_reduce(total, group=self.groups.pp)
        return math.sqrt(total.item())

    def scale_grads(self, factor: float) -> None:
        for section in self.sections:
            for g in self._owned_grads(section):
                g.mul_(factor)

    # ------------------------------------------------------------------ optimizer
    def build_optimizer(self, cfg: OptimizerConfig) -> "Optimizer":
        """AdamW over the model parameters (fp32, unsharded), or over the sections' fp32 main
        parameters, with Megatron's weight-decay groups either way."""
        views = [(section, view) for section in self.sections for view in section.shard_views()]
        if not views:
            return Optimizer(adamw(param_groups(self.model, cfg.weight_decay), cfg), self.sections)
        names = {p: n for n, p in self.model.named_parameters()}
        decay, no_decay = [], []
        for _, view in views:
            no_wd = view.param.dim() == 1 or names[view.param].endswith(".bias")
            (no_decay if no_wd else decay).append(view.shard)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return Optimizer(adamw(groups, cfg), self.sections, views)


def _sq(g: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(g, dtype=torch.float32).square()


class Optimizer:
    """AdamW, plus what follows a step: rounding fp32 main parameters into bf16/fp16 model
    parameters, and the parameter all-gather of the distributed optimizer.

    `shard_views` lists which slice of which model parameter each optimizer parameter stands
    for (empty for fp32 without the distributed optimizer: the optimizer holds the model
    parameters).
    """

    def __init__(self, inner: torch.optim.Optimizer, sections: list[Section],
                 shard_views: Optional[list[tuple[Section, ShardView]]] = None):
        self.inner = inner
        self.sections = sections
        self.shard_views = shard_views or []

    @property
    def param_groups(self):
        return self.inner.param_groups

    @property
    def has_main_params(self) -> bool:
        """Whether the optimizer holds fp32 copies of low-precision model parameters."""
        return any(section.mixed for section in self.sections)

    def step(self) -> None:
        self.inner.step()
        self.copy_main_to_model()

    def copy_main_to_model(self) -> None:
        """Make the model parameters (every rank's whole copy) equal the main parameters."""
        for section in self.sections:
            section.copy_main_to_params()
            section.all_gather_params()

    @torch.no_grad()
    def load_main_params(self, values: dict[nn.Parameter, torch.Tensor]) -> None:
        """Set the optimizer's parameters from whole-parameter `values` (any float dtype, the
        model parameter's shape), and the model parameters to match (rounded)."""
        if not self.shard_views:
            for p, value in values.items():
                p.copy_(value)
            return
        for _, view in self.shard_views:
            if view.param in values:
                view.shard.copy_(values[view.param].reshape(-1)[view.start:view.end])
        self.copy_main_to_model()

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)
