"""Checkpoint state in a layout-free form, and its sharded view for torch.distributed.checkpoint.

Everything is keyed by parameter name and shaped like the parameter, whatever the parallel
layout: optimizer moments are gathered out of the distributed optimizer's flat shards, tensor-
parallel slices are gathered into whole tensors by the sharding table
(`megatron.core.tensor_parallel.sharding`; experts over the expert-tensor-parallel group), and
expert tensors (leading dimension = local experts) become DTensors sharded over the
expert-parallel mesh dimension, so that a checkpoint saved at one world size, T, ETP and EP size
loads at another: torch.distributed.checkpoint reads each rank's slice of the global tensors,
and `shard_tensor_parallel` keeps this rank's tensor-parallel slice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from megatron.core.optimizer import is_expert_param
from megatron.core.parallel_state import ProcessGroups
from megatron.core.tensor_parallel.sharding import TensorSplit, tensor_split

if TYPE_CHECKING:
    from megatron.core.distributed import Optimizer

MOMENTS = ("exp_avg", "exp_avg_sq")
MAIN_PARAM = "main_param"
"""The fp32 main parameter, saved beside the moments by runs with bf16/fp16 parameters."""


def optimizer_state_by_name(model: nn.Module, optimizer: "Optimizer") -> dict:
    """{'step': int, 'state': {param name: {'exp_avg': T, 'exp_avg_sq': T[, 'main_param': T]}}},
    each T fp32 and shaped like the model parameter (experts: this rank's experts);
    'main_param' only when the optimizer holds fp32 main parameters (bf16/fp16 runs).
    Collective under the distributed optimizer."""
    names = {p: n for n, p in model.named_parameters()}
    inner = optimizer.inner
    step = max((int(s["step"]) for s in inner.state.values() if "step" in s), default=0)
    if not optimizer.shard_views:
        state = {names[p]: {k: inner.state[p][k].detach().clone() if p in inner.state else torch.zeros_like(p)
                            for k in MOMENTS} for p in names}
        return {"step": step, "state": state}
    keys = MOMENTS + ((MAIN_PARAM,) if optimizer.has_main_params else ())
    state = {}
    for section in optimizer.sections:
        for key in keys:
            flat = torch.zeros_like(section.grad_buffer)
            for sec, view in optimizer.shard_views:
                if sec is not section:
                    continue
                value = view.shard.detach() if key == MAIN_PARAM else inner.state.get(view.shard, {}).get(key)
                if value is not None:
                    o = section.offsets[view.param]
                    flat[o + view.start:o + view.end] = value
            if section.shard and section.size > 1:  # shards are disjoint: a sum assembles them
                dist.all_reduce(flat, group=section.group)
            for p in section.params:
                o = section.offsets[p]
                state.setdefault(names[p], {})[key] = flat[o:o + p.numel()].view_as(p).clone()
    return {"step": step, "state": state}


def load_optimizer_state_by_name(model: nn.Module, optimizer: "Optimizer", saved: dict) -> None:
    """Inverse of `optimizer_state_by_name`, for this run's layout (parameter names must match).

    Saved 'main_param' entries become the optimizer's parameters (and, rounded, the model's),
    whatever this run's precision; without them the parameters keep their values (the model's
    weights, see `Optimizer.load_main_params`). Moments are cast to the optimizer's dtype.
    Collective under the distributed optimizer."""
    name_of = {p: n for n, p in model.named_parameters()}
    missing = sorted(set(name_of.values()) - set(saved["state"]))
    if missing:
        raise ValueError(f"optimizer state is missing {len(missing)} parameters (e.g. {missing[0]})")
    mains = {p: saved["state"][n][MAIN_PARAM] for p, n in name_of.items() if MAIN_PARAM in saved["state"][n]}
    if mains:
        optimizer.load_main_params(mains)
    # Each optimizer parameter is a whole model parameter, or a flat slice of one.
    source = {p: (n, None, None) for p, n in name_of.items()}
    source.update({v.shard: (name_of[v.param], v.start, v.end) for _, v in optimizer.shard_views})
    state, groups, index = {}, [], 0
    for group in optimizer.inner.param_groups:
        ids = []
        for p in group["params"]:
            name, start, end = source[p]
            entry = saved["state"][name]
            take = (lambda t: t) if start is None else (lambda t, a=start, z=end: t.reshape(-1)[a:z])
            state[index] = {"step": torch.tensor(float(saved["step"]), dtype=torch.float32),
                            **{k: take(entry[k]).to(p.device, p.dtype).clone() for k in MOMENTS}}
            ids.append(index)
            index += 1
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
    optimizer.inner.load_state_dict({"state": state if saved["step"] > 0 else {}, "param_groups": groups})


def shard_experts(tensors: dict[str, torch.Tensor], groups: ProcessGroups) -> dict:
    """Wrap expert tensors as DTensors sharded (dim 0) over the EP mesh dimension and replicated
    over the other dimensions of the expert mesh ("expert_dp", and "etp": expert tensors here
    are whole along their FFN dimension, see `gather_tensor_parallel`); other tensors stay plain
    (replicated)."""
    if groups.ep_size == 1:
        return dict(tensors)
    from torch.distributed.tensor import DTensor, Replicate, Shard

    names = groups.mesh.mesh_dim_names
    placements = [Shard(0) if dim == "ep" else Replicate() for dim in names]
    out = {}
    for name, t in tensors.items():
        if is_expert_param(name):
            out[name] = DTensor.from_local(t, groups.mesh, placements, run_check=False)
        else:
            out[name] = t
    return out


def _split_of(name: str, swiglu: bool, groups: ProcessGroups) -> tuple[Optional[TensorSplit], Optional[dist.ProcessGroup], int, int]:
    """(split, group, rank, size) of parameter `name` on this rank: the tensor-parallel group for
    dense tensors, the expert-tensor-parallel group for experts; split None when replicated."""
    split = tensor_split(name, swiglu)
    if split is None:
        return None, None, 0, 1
    group = groups.etp if split.expert else groups.tp
    if group is None or dist.get_world_size(group) == 1:
        return None, None, 0, 1
    return split, group, dist.get_rank(group), dist.get_world_size(group)


def gather_tensor_parallel(tensors: dict[str, torch.Tensor], groups: ProcessGroups, swiglu: bool,
                           param_name=lambda key: key) -> dict[str, torch.Tensor]:
    """Whole tensors from this rank's tensor-parallel slices: each tensor that the sharding table
    splits is all-gathered over `groups.tp` (experts: `groups.etp`) and joined with
    `TensorSplit.unshard`; experts stay this rank's experts (whole along their FFN dimension).
    `param_name(key)` is the parameter name of a key (for keys such as 'name/exp_avg').
    Collective over the TP and ETP groups: every rank calls it with the same keys in the same order."""
    out = {}
    for key, t in tensors.items():
        split, group, _, size = _split_of(param_name(key), swiglu, groups)
        if split is None:
            out[key] = t
            continue
        local = t.contiguous()
        parts = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(parts, local, group=group)
        out[key] = split.unshard(parts)
    return out


def shard_tensor_parallel(tensors: dict[str, torch.Tensor], groups: ProcessGroups, swiglu: bool,
                          param_name=lambda key: key) -> dict[str, torch.Tensor]:
    """Inverse of `gather_tensor_parallel`: this rank's slice of each whole tensor (no communication)."""
    out = {}
    for key, t in tensors.items():
        split, _, rank, size = _split_of(param_name(key), swiglu, groups)
        out[key] = t if split is None else split.shard(t, rank, size)
    return out


def whole_like(tensors: dict[str, torch.Tensor], groups: ProcessGroups, swiglu: bool,
               param_name=lambda key: key) -> dict[str, torch.Tensor]:
    """Zero tensors shaped like the whole tensors `gather_tensor_parallel` would return (the
    split dimension times the group size), to read a checkpoint into."""
    out = {}
    for key, t in tensors.items():
        split, _, _, size = _split_of(param_name(key), swiglu, groups)
        shape = list(t.shape)
        if split is not None:
            shape[split.dim] *= size
        out[key] = torch.zeros(shape, dtype=t.dtype, device=t.device)
    return out


def local_tensors(tensors: dict) -> dict[str, torch.Tensor]:
    """Inverse of `shard_experts`: this rank's local tensors."""
    from torch.distributed.tensor import DTensor

    return {k: v.to_local() if isinstance(v, DTensor) else v for k, v in tensors.items()}


def _examples(keys: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def tensor_mismatches(expected: Mapping[str, Optional[tuple]], actual: Mapping[str, Optional[tuple]]) -> list[str]:
    """What differs between two {name: shape} maps (a None shape is not compared), as phrases
    such as "missing tensors: a, b" for an error message; empty when they agree."""
    missing = [k for k in expected if k not in actual]
    unexpected = [k for k in actual if k not in expected]
    wrong = [f"{k} {tuple(actual[k])} != {tuple(expected[k])}" for k in expected
             if k in actual and expected[k] is not None and actual[k] is not None
             and tuple(actual[k]) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"missing tensors: {_examples(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_examples(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes: {_examples(wrong)}")
    return problems
