"""Saving and resuming in Megatron's layout, written crash-safely, reshardable with torch_dist.

    <save>/latest_checkpointed_iteration.txt           the newest complete iteration
    <save>/iter_0000100/                               --ckpt-format torch_dist (default):
        .metadata, __R_0.distcp                        torch.distributed.checkpoint shards
        common.pt                                      iteration, schedule, scaler, args, config
        rng_rank_00000.pt ...                          each rank's RNG states
    <save>/iter_0000100/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt   --ckpt-format torch (legacy)

Model and optimizer tensors are keyed by parameter name and shaped like the whole model's
parameters in torch_dist (tensor-parallel slices gathered by the sharding table, experts sharded
over EP; see `megatron.core.dist_checkpointing`), so a torch_dist checkpoint loads under any
world size, tensor-, expert-tensor-, expert- and pipeline-parallel size. The legacy files are
Megatron-LM's: each holds one (tensor-parallel rank, pipeline rank, expert-parallel rank)'s
slices, model tensors under Megatron-Core's names for `--transformer-impl` / `--moe-grouped-gemm`
(`megatron_layout`), `args` with the attributes Megatron-LM reads to resume; any Megatron-LM
legacy checkpoint loads (its layout is detected). Each model chunk's layers are numbered from 0
as in Megatron-LM (`model`, or `model0`, `model1`, ... with virtual stages); loading renumbers
them by the split the saved `args` describe, which must be the run's, as must T and ETP. Every
file is read without running code from it (`safe_load`).

A checkpoint is written under `iter_N.tmp` and renamed when every rank has finished; the
`latest` file moves last. A process killed during a save therefore leaves the previous
checkpoint as the one that loads, and the half-written directory never looks valid.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import math
import os
import random
import re
import shutil
import warnings
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron.core.atomic_file import atomic_file
from megatron.core.config import Config
from megatron.core.dist_checkpointing import (
    MAIN_PARAM,
    MOMENTS,
    gather_tensor_parallel,
    load_optimizer_state_by_name,
    local_tensors,
    optimizer_state_by_name,
    shard_experts,
    shard_tensor_parallel,
    tensor_mismatches,
    whole_like,
)
from megatron.core.parallel_state import ProcessGroups
from megatron.training import megatron_layout
from megatron.training.logger import print_rank_0
from megatron.training.safe_load import CheckpointError, load_file, read_dcp_metadata, safe_reader

if TYPE_CHECKING:
    from megatron.training.train import Trainer

# torch.distributed.checkpoint warns when it runs in one process, which is this framework's intent
# for single-process runs (also from the background thread of an asynchronous save).
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

TRACKER = "latest_checkpointed_iteration.txt"
COMMON = "common.pt"
CHECKPOINT_VERSION = 3.0
# Config fields that decide tensor shapes: a checkpoint that differs in one cannot load.
SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                "kv_channels", "vocab_size", "swiglu", "normalization", "add_bias_linear", "add_qkv_bias",
                "qk_layernorm", "untie_embeddings_and_output_weights", "position_embedding_type")
MOE_SHAPE_FIELDS = ("num_experts", "ffn_hidden_size", "layer_pattern", "shared_expert_ffn_hidden_size",
                    "enable_expert_bias")


# ---------------------------------------------------------------------------- paths and files

def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def rank_dir_name(ep_size: int, ep_rank: int, pp_size: int = 1, pp_rank: int = 0, tp_rank: int = 0) -> str:
    """Megatron's rank directory: mp_rank_TT (tensor-parallel rank), then _PPP with pipeline
    stages, then _EEE with expert parallelism (mp_rank_01_001_002: tensor-parallel rank 1,
    pipeline rank 1, expert-parallel rank 2), as Megatron-LM's `get_checkpoint_name`."""
    name = f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return name if ep_size == 1 else f"{name}_{ep_rank:03d}"


def legacy_rank_files(tp_size: int, ep_size: int, etp_size: int) -> dict[tuple[int, int], tuple[int, int]]:
    """{(tensor-parallel rank, expert-parallel rank): (the lowest rank of a pipeline stage with
    both, its expert-tensor-parallel rank)}: the legacy files mp_rank_TT[_PPP]_EEE of a stage, who
    writes each, and whose expert slices it holds (dense ranks (DP, T), experts (EDP, EP, ETP),
    innermost last). With MoE parallel folding (ETP < T) not every (TT, EEE) pair exists, as in
    Megatron-LM. The pairs repeat every lcm(T, EP x ETP) ranks, so they do not depend on DP."""
    out: dict[tuple[int, int], tuple[int, int]] = {}
    for r in range(math.lcm(tp_size, ep_size * etp_size)):
        out.setdefault((r % tp_size, (r // etp_size) % ep_size), (r, r % etp_size))
    return out


def is_model_entry(key: str) -> bool:
    """Whether a legacy payload key holds model tensors: `model`, or `model0`, `model1`, ... (one
    per virtual pipeline chunk)."""
    return re.fullmatch(r"model\d*", key) is not None


def has_model_entry(payload) -> bool:
    return isinstance(payload, dict) and any(is_model_entry(k) for k in payload)


def legacy_model_entries(chunks: list[dict]) -> dict:
    """The payload's model entries: `model`, or `model0`, `model1`, ... with virtual stages."""
    return {"model": chunks[0]} if len(chunks) == 1 else {f"model{v}": c for v, c in enumerate(chunks)}


def legacy_model_chunks(payload: dict, num_chunks: int, source: str) -> list[dict]:
    """The per-chunk model state dicts of a legacy file; ValueError naming `source` when its
    entries do not match the `num_chunks` chunks the saved args describe."""
    keys = ["model"] if num_chunks == 1 else [f"model{v}" for v in range(num_chunks)]
    found = sorted(k for k in payload if is_model_entry(k))
    if found != sorted(keys):
        raise ValueError(f"{source} holds model entries {found or 'none'}, but its args describe {num_chunks} "
                         f"model chunk(s) a pipeline rank ({', '.join(keys)})")
    return [payload[k] for k in keys]


def tied_embeddings(model_config) -> bool:
    return not model_config.untie_embeddings_and_output_weights


def _barrier(groups: ProcessGroups) -> None:
    if groups.world_size > 1:
        dist.barrier()


def _atomic_torch_save(obj, path: str) -> None:
    with atomic_file(path) as f:
        torch.save(obj, f)


def rng_state(tracker=None) -> dict:
    """This rank's RNG states, Megatron-LM's keys; `tracker`: the model's tensor-parallel dropout
    stream (`TensorParallelRNG`, None below T = 2), saved under `rng_tracker_states`."""
    return {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "rng_tracker_states": tracker.state_dict() if tracker is not None else {},
    }


def set_rng_state(state: dict, tracker=None) -> None:
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if state.get("cuda_rng_state") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    if tracker is not None:
        tracker.load_state_dict(state.get("rng_tracker_states") or {})


def read_tracker(root: str, flag: str = "--load") -> Optional[int]:
    """The iteration named by `latest_checkpointed_iteration.txt` ('release' = 0), or None."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    if text == "release":
        return 0
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{flag}: {path} holds {text!r}, not an iteration number") from None


def checkpoint_dir_for(root: str, iteration: int) -> str:
    """`iter_NNNNNNN`, or `release` for converted checkpoints."""
    release = os.path.join(root, "release")
    return release if iteration == 0 and os.path.isdir(release) else iteration_dir(root, iteration)


def is_torch_dist(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, ".metadata"))


# ---------------------------------------------------------------------------- what is saved

def common_state(trainer: "Trainer", cfg: Config, args) -> dict:
    """Everything that is not a model or optimizer tensor (identical on every rank)."""
    state = trainer.state
    common = {
        "args": checkpoint_args(args, cfg, state, trainer.groups),
        "config": dataclasses.asdict(cfg),
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": state.iteration,
        "train_state": dataclasses.asdict(state),
        "num_floating_point_operations_so_far": state.floating_point_operations_so_far,
    }
    if not cfg.checkpoint.no_save_optim:
        common["opt_param_scheduler"] = trainer.scheduler.state_dict()
        if trainer.scaler is not None:
            common["grad_scaler"] = trainer.scaler.state_dict()
    return common


def checkpoint_args(args: Optional[argparse.Namespace], cfg: Config, state, groups: ProcessGroups) -> argparse.Namespace:
    """The saved `args`: this run's flags plus what Megatron-LM reads to resume, under its names."""
    p = cfg.parallel
    pipeline = megatron_layout.pipeline_args(
        p.pipeline_layout(cfg.model.num_layers), p.num_layers_per_virtual_pipeline_stage,
        p.decoder_first_pipeline_num_layers, p.decoder_last_pipeline_num_layers,
        p.account_for_embedding_in_pipeline_split, p.account_for_loss_in_pipeline_split)
    return megatron_layout.megatron_args(
        args, cfg.model, transformer_impl=cfg.checkpoint.transformer_impl,
        moe_grouped_gemm=cfg.checkpoint.moe_grouped_gemm, ckpt_format=cfg.checkpoint.ckpt_format,
        make_vocab_size_divisible_by=cfg.data.make_vocab_size_divisible_by, tokenizer_type=cfg.data.tokenizer_type,
        expert_model_parallel_size=groups.ep_size, data_parallel_size=groups.dp_size, world_size=groups.world_size,
        tensor_model_parallel_size=groups.tp_size, expert_tensor_parallel_size=groups.etp_size,
        sequence_parallel=p.sequence_parallel and groups.tp_size > 1,
        micro_batch_size=cfg.training.micro_batch_size, global_batch_size=cfg.training.global_batch_size,
        iteration=state.iteration, consumed_train_samples=state.consumed_train_samples,
        consumed_valid_samples=getattr(state, "consumed_valid_samples", 0), skipped_train_samples=0, **pipeline)


def tensor_state(trainer: "Trainer", cfg: Config) -> dict:
    """{'model': {name: T}, 'optimizer': {'step': int, 'state': {name: {moment: T}}}} (local
    tensors: this rank's tensor-parallel slices and experts)."""
    out = {"model": trainer.model.state_dict()}
    if not cfg.checkpoint.no_save_optim:
        out["optimizer"] = optimizer_state_by_name(trainer.model, trainer.optimizer)
    return out


# ---------------------------------------------------------------------------- saving

def save_checkpoint(trainer: "Trainer", cfg: Config, groups: ProcessGroups, args=None) -> str:
    """Write iteration `trainer.state.iteration` under `--save`; returns its final directory."""
    finalize(trainer, groups)  # a previous asynchronous save publishes first
    root = cfg.checkpoint.save
    final = iteration_dir(root, trainer.state.iteration)
    tmp = final + ".tmp"
    if groups.is_main:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier(groups)
    common = common_state(trainer, cfg, args)
    tensors = tensor_state(trainer, cfg)  # collective under the distributed optimizer
    rng = None if cfg.checkpoint.no_save_rng else rng_state(trainer.model.tp.rng)
    if cfg.checkpoint.ckpt_format == "torch":
        layout = megatron_layout.layout_for(cfg.checkpoint.transformer_impl, cfg.checkpoint.moe_grouped_gemm)
        _save_legacy(tmp, common, tensors, rng, groups, layout, cfg)
    else:
        pending = _save_torch_dist(trainer, tmp, common, tensors, rng, groups, cfg.checkpoint.async_save,
                                   cfg.model.swiglu)
        if pending is not None:
            trainer.pending_save = (pending, root, final, tmp, trainer.state.iteration)
            print_rank_0(groups.is_main, f"  started asynchronous checkpoint of iteration {trainer.state.iteration}")
            return final
    _publish_all(groups, root, final, tmp, trainer.state.iteration)
    return final


def writes_legacy_file(groups: ProcessGroups) -> bool:
    """Whether this rank writes its legacy file: the lowest rank of its pipeline stage with its
    tensor- and expert-parallel ranks (the other ranks with both hold the same slices)."""
    stage = groups.world_size // groups.pp_size
    writer, _ = legacy_rank_files(groups.tp_size, groups.ep_size, groups.etp_size)[(groups.tp_rank, groups.ep_rank)]
    return writer == groups.rank % stage


def _save_legacy(tmp: str, common: dict, tensors: dict, rng, groups: ProcessGroups,
                 layout: megatron_layout.Layout, cfg: Config) -> None:
    """One file per (tensor-parallel rank, pipeline rank, expert-parallel rank), as Megatron-LM
    writes them, holding this rank's slices: each model chunk's layers numbered from 0 (`model`,
    or `model0`, `model1`, ... with virtual stages). The optimizer state keeps our global
    parameter names (and this rank's slices)."""
    if not writes_legacy_file(groups):
        return  # another rank holds the same slices
    pipeline = cfg.parallel.pipeline_layout(cfg.model.num_layers)
    chunks = megatron_layout.split_pipeline_chunks(tensors["model"], pipeline, groups.pp_rank,
                                                   tied_embeddings(cfg.model))
    payload = {**common, **legacy_model_entries([megatron_layout.to_megatron(c, layout) for c in chunks])}
    if "optimizer" in tensors:
        payload["optimizer"] = tensors["optimizer"]
    if rng is not None:
        payload["rng_state"] = [rng]
    rank_dir = os.path.join(tmp, rank_dir_name(groups.ep_size, groups.ep_rank, pipeline.num_stages, groups.pp_rank,
                                               groups.tp_rank))
    os.makedirs(rank_dir, exist_ok=True)
    _atomic_torch_save(payload, os.path.join(rank_dir, "model_optim_rng.pt"))


def _save_torch_dist(trainer, tmp: str, common: dict, tensors: dict, rng, groups: ProcessGroups, use_async: bool,
                     swiglu: bool):
    """Whole tensors (tensor-parallel slices gathered, identical to a T = 1 save; every TP rank
    offers the same plain tensors and torch.distributed.checkpoint writes one copy), experts
    sharded over EP; `common.pt` from rank 0, each rank's RNG state."""
    import torch.distributed.checkpoint as dcp

    state = {"model": shard_experts(gather_tensor_parallel(tensors["model"], groups, swiglu), groups)}
    if "optimizer" in tensors:
        opt = tensors["optimizer"]
        common["optimizer_step"] = opt["step"]
        state["optimizer"] = {name: {k: _shard_one(name, v, groups) for k, v in
                                     gather_tensor_parallel(moments, groups, swiglu, lambda _, n=name: n).items()}
                              for name, moments in opt["state"].items()}
    if groups.is_main:
        _atomic_torch_save(common, os.path.join(tmp, COMMON))
    if rng is not None:
        _atomic_torch_save(rng, os.path.join(tmp, f"rng_rank_{groups.rank:05d}.pt"))
    no_dist = groups.world_size == 1
    if use_async:
        if trainer.checkpoint_group is None and not no_dist:  # async writes must not share the training group
            trainer.checkpoint_group = dist.new_group(backend="gloo")
        return dcp.async_save(state, checkpoint_id=tmp, no_dist=no_dist, process_group=trainer.checkpoint_group)
    dcp.save(state, checkpoint_id=tmp, no_dist=no_dist)
    return None


def _shard_one(name: str, tensor: torch.Tensor, groups: ProcessGroups):
    return shard_experts({name: tensor}, groups)[name]


def _publish_all(groups: ProcessGroups, root: str, final: str, tmp: str, iteration: int) -> None:
    _barrier(groups)
    if groups.is_main:
        publish(root, final, tmp, iteration)
    _barrier(groups)
    print_rank_0(groups.is_main, f"  saved checkpoint at iteration {iteration:7d} to {root}")


def publish(root: str, final: str, tmp: str, iteration: int) -> None:
    """Rename the finished temporary directory into place, then move the `latest` pointer."""
    if os.path.exists(final):
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    with atomic_file(os.path.join(root, TRACKER), "w", fsync=True) as f:
        f.write(str(iteration))


def finalize(trainer: "Trainer", groups: Optional[ProcessGroups] = None) -> None:
    """Wait for an asynchronous save still in flight, then publish it."""
    pending = trainer.pending_save
    if pending is None:
        return
    future, root, final, tmp, iteration = pending
    trainer.pending_save = None
    completion = getattr(future, "upload_completion", future)
    completion.result()
    _publish_all(groups or trainer.groups, root, final, tmp, iteration)


# ---------------------------------------------------------------------------- loading

def load_checkpoint(trainer: "Trainer", cfg: Config, groups: ProcessGroups) -> None:
    """Restore `trainer` from `--load` when it holds a checkpoint; warn and start fresh when not."""
    ck = cfg.checkpoint
    if ck.load is None:
        return
    iteration = read_tracker(ck.load)
    if iteration is None:
        if groups.is_main:
            warnings.warn(f"--load {ck.load}: no {TRACKER} found; starting from random initialisation")
        return
    directory = checkpoint_dir_for(ck.load, iteration)
    if not os.path.isdir(directory):
        raise CheckpointError(f"--load: {TRACKER} names iteration {iteration} but {directory} is missing")
    if is_torch_dist(directory):
        common, tensors, rng = _load_torch_dist(trainer, cfg, groups, directory)
    else:
        common, tensors, rng = _load_legacy(cfg, groups, directory, trainer.model)
    load_model_state(trainer.model, tensors["model"], directory)
    if trainer.optimizer.has_main_params:  # from the checkpoint's weights, unrounded when they are fp32
        weights = {p: tensors["model"][n] for n, p in trainer.model.named_parameters()}
        trainer.optimizer.load_main_params(weights)
    restore_training_state(trainer, cfg, common, tensors.get("optimizer"), rng, directory)
    print_rank_0(groups.is_main, f"  loaded checkpoint from {ck.load} at iteration {trainer.state.iteration}")


def _load_legacy(cfg: Config, groups: ProcessGroups, directory: str, model: torch.nn.Module):
    """This rank's file (its tensor-, pipeline and expert-parallel rank), its chunks renumbered to
    global layer indices by the split its `args` describe, which must be this run's, as must its
    tensor- and expert-tensor-parallel sizes."""
    pipeline = cfg.parallel.pipeline_layout(cfg.model.num_layers)
    check_legacy_tensor_parallel(directory, groups)
    name = rank_dir_name(groups.ep_size, groups.ep_rank, pipeline.num_stages, groups.pp_rank, groups.tp_rank)
    path = os.path.join(directory, name, "model_optim_rng.pt")
    if not os.path.isfile(path):
        found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(directory, "mp_rank_*")))
        raise CheckpointError(
            f"--load: {path} is missing (the checkpoint has {', '.join(found) or 'no rank files'}; it was saved "
            "with another pipeline- or expert-parallel size: convert it with tools/checkpoint/reshard.py "
            "--target-pipeline-parallel-size / --target-expert-parallel-size)")
    payload = load_file(path)
    if not has_model_entry(payload):
        raise CheckpointError(f"--load: {path} holds no 'model' entry; it is not a model checkpoint")
    check_compatible(payload.get("config"), cfg, directory)
    check_legacy_tensor_parallel(directory, groups, payload.get("args"))
    try:
        saved = megatron_layout.pipeline_from_args(payload.get("args"), cfg.model.num_layers)
    except ValueError as e:
        raise CheckpointError(f"--load: {path}: {e}") from None
    if saved != pipeline:
        raise CheckpointError(
            f"--load: {directory} was saved with {megatron_layout.describe_pipeline(saved)}; this run has "
            f"{megatron_layout.describe_pipeline(pipeline)}: convert it with tools/checkpoint/reshard.py "
            "--target-pipeline-parallel-size, or save with --ckpt-format torch_dist")
    try:
        chunks = legacy_model_chunks(payload, pipeline.num_chunks, path)
        merged = megatron_layout.merge_pipeline_chunks(chunks, pipeline, groups.pp_rank, tied_embeddings(cfg.model),
                                                       path)
        state, _ = megatron_layout.from_megatron(merged, megatron_layout.num_local_experts(model.state_dict()), path)
    except ValueError as e:
        raise CheckpointError(f"--load: {e}") from None
    tensors = {"model": state}
    if "optimizer" in payload:
        tensors["optimizer"] = payload["optimizer"]
    rng = payload["rng_state"][0] if payload.get("rng_state") else None
    return payload, tensors, rng


def saved_tensor_parallel_sizes(args) -> tuple[int, int]:
    """(T, ETP) that a legacy checkpoint's `args` record (Megatron-LM's ETP defaults to T)."""
    T = int(getattr(args, "tensor_model_parallel_size", None) or 1)
    return T, int(getattr(args, "expert_tensor_parallel_size", None) or T)


def saved_tensor_parallel_size(directory: str) -> int:
    """T of a legacy checkpoint, from its rank directory names (every tensor-parallel rank writes)."""
    ranks = [int(m.group(1)) for m in map(re.compile(r"^mp_rank_(\d\d)(_\d\d\d){0,2}$").match, os.listdir(directory))
             if m is not None]
    return max(ranks, default=0) + 1


def check_legacy_tensor_parallel(directory: str, groups: ProcessGroups, args=None) -> None:
    """Legacy files hold one tensor-parallel rank's slices: T (from the rank directories, and the
    saved `args` when given) and, for MoE models, ETP must be the run's; one-line CheckpointError."""
    T = saved_tensor_parallel_size(directory)
    ETP = None
    if args is not None:
        T, ETP = saved_tensor_parallel_sizes(args)
        if not getattr(args, "num_experts", None):
            ETP = None
    if T != groups.tp_size:
        raise CheckpointError(f"--load: {directory} was saved with --tensor-model-parallel-size {T}, this run has "
                              f"{groups.tp_size}: convert it with tools/checkpoint/reshard.py "
                              "--target-tensor-parallel-size, or save with --ckpt-format torch_dist")
    if ETP is not None and ETP != groups.etp_size:
        raise CheckpointError(f"--load: {directory} was saved with --expert-tensor-parallel-size {ETP}, this run "
                              f"has {groups.etp_size}: convert it with tools/checkpoint/reshard.py "
                              "--target-expert-tensor-parallel-size, or save with --ckpt-format torch_dist")


def _load_torch_dist(trainer, cfg: Config, groups: ProcessGroups, directory: str):
    import torch.distributed.checkpoint as dcp

    common_path = os.path.join(directory, COMMON)
    if not os.path.isfile(common_path):
        raise CheckpointError(f"--load: {common_path} is missing; the checkpoint is incomplete")
    common = load_file(common_path)
    check_compatible(common.get("config"), cfg, directory)
    metadata = read_dcp_metadata(directory)
    want_optim = not (cfg.checkpoint.finetune or cfg.checkpoint.no_load_optim)
    has_optim = any(k.startswith("optimizer.") for k in metadata.state_dict_metadata)
    if want_optim and not has_optim:
        raise CheckpointError(f"--load: {directory} has no optimizer state (saved with --no-save-optim, "
                              "or converted); pass --no-load-optim, or --finetune")
    # Read in fp32, whatever either side's precision: an fp32 checkpoint's weights then seed a
    # bf16 run's main parameters unrounded (bf16 values read into fp32 exactly).
    # Whole tensors (experts: this rank's, whole along the FFN), this rank's slices kept after reading.
    swiglu = cfg.model.swiglu
    local = {k: _fp32_copy(v) for k, v in trainer.model.state_dict().items()}
    target = {"model": shard_experts(whole_like(local, groups, swiglu), groups)}
    check_tensor_shapes(metadata, whole_model_shapes(cfg), "model", directory)
    if want_optim:
        saved_keys = set(metadata.state_dict_metadata)
        target["optimizer"] = {name: {k: _shard_one(name, v, groups) for k, v in
                                      whole_like(m, groups, swiglu, lambda _, n=name: n).items()}
                               for name, m in _optimizer_target(trainer, saved_keys).items()}
    try:
        dcp.load(target, storage_reader=safe_reader(directory), no_dist=groups.world_size == 1)
    except (Exception, dcp.api.CheckpointException) as e:  # noqa: BLE001 - DCP's error is a BaseException
        raise CheckpointError(f"--load: cannot read {directory} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); it is corrupt or incomplete") from None
    tensors = {"model": shard_tensor_parallel(local_tensors(target["model"]), groups, swiglu)}
    if want_optim:
        tensors["optimizer"] = {"step": common.get("optimizer_step", 0),
                                "state": {n: shard_tensor_parallel(local_tensors(m), groups, swiglu,
                                                                   lambda _, n=n: n)
                                          for n, m in target["optimizer"].items()}}
    rng_path = os.path.join(directory, f"rng_rank_{groups.rank:05d}.pt")
    rng = load_file(rng_path) if os.path.isfile(rng_path) else None
    return common, tensors, rng


def _fp32_copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float() if t.is_floating_point() else t.detach().clone()


def _optimizer_target(trainer: "Trainer", saved_keys: set) -> dict:
    """{name: {key: fp32 T}} to read into: the moments, and `main_param` where the checkpoint
    has it (a bf16/fp16 run's), whatever this run's precision."""
    state = optimizer_state_by_name(trainer.model, trainer.optimizer)["state"]
    shapes = {n: p for n, p in trainer.model.named_parameters()}
    out = {}
    for name, entry in state.items():
        entry = {k: v for k, v in entry.items() if k in MOMENTS}
        if f"optimizer.{name}.{MAIN_PARAM}" in saved_keys:
            entry[MAIN_PARAM] = torch.zeros(shapes[name].shape, dtype=torch.float32, device=shapes[name].device)
        out[name] = entry
    return out


def whole_model_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """{name: global shape} of every tensor of the whole model (all pipeline stages, all experts),
    from a model built on the meta device (no memory, no computation)."""
    from megatron.core.models.gpt import GPTModel

    with torch.device("meta"):
        model = GPTModel(cfg.model)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_tensor_shapes(metadata, expected: dict[str, tuple], prefix: str, source: str) -> None:
    """Every tensor the model has is in the checkpoint with the same global shape, and no more."""
    saved = {k[len(prefix) + 1:]: getattr(m, "size", None) for k, m in metadata.state_dict_metadata.items()
             if k.startswith(prefix + ".")}
    problems = tensor_mismatches(expected, saved)
    if problems:
        raise CheckpointError(f"--load: {source} does not match this model: " + "; ".join(problems))


def check_compatible(saved_config: Optional[dict], cfg: Config, source: str) -> None:
    """Name every shape-determining setting in which the checkpoint differs from this run."""
    if not saved_config:
        return
    saved_model = saved_config.get("model", {})
    ours = dataclasses.asdict(cfg.model)
    diffs = [f"{f}: checkpoint {saved_model.get(f)!r} vs run {ours[f]!r}"
             for f in SHAPE_FIELDS if f in saved_model and saved_model[f] != ours[f]]
    saved_moe, our_moe = saved_model.get("moe"), ours.get("moe")
    if (saved_moe is None) != (our_moe is None):
        diffs.append(f"num_experts: checkpoint {saved_moe and saved_moe['num_experts']} vs run "
                     f"{our_moe and our_moe['num_experts']}")
    elif saved_moe and our_moe:
        diffs += [f"moe.{f}: checkpoint {_norm(saved_moe.get(f))!r} vs run {_norm(our_moe[f])!r}"
                  for f in MOE_SHAPE_FIELDS if f in saved_moe and _norm(saved_moe[f]) != _norm(our_moe[f])]
    if diffs:
        raise CheckpointError(f"--load: {source} was saved from a different model: " + "; ".join(diffs))


def _norm(value):
    return list(value) if isinstance(value, (tuple, list)) else value


def load_model_state(model: torch.nn.Module, state: dict, source: str) -> None:
    """Strict load that names every missing, unexpected or mis-shaped tensor."""
    problems = tensor_mismatches({k: tuple(v.shape) for k, v in model.state_dict().items()},
                                 {k: tuple(v.shape) for k, v in state.items()})
    if problems:
        raise CheckpointError(f"--load: {source} does not match this model: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def is_own_optimizer_state(optimizer) -> bool:
    """Whether a checkpoint's `optimizer` entry is this framework's {'step', 'state': {name: moments}}."""
    return isinstance(optimizer, dict) and set(optimizer) == {"step", "state"}


def restore_training_state(trainer: "Trainer", cfg: Config, common: dict, optimizer: Optional[dict],
                           rng: Optional[dict], source: str) -> None:
    """Iteration, samples, optimizer, schedule, scaler and RNG, as --finetune/--no-load-* allow."""
    ck = cfg.checkpoint
    if ck.finetune:
        return
    # Megatron-LM's own fallbacks: older files name it `total_iters`; a release checkpoint may have neither.
    trainer.state.iteration = int(common.get("iteration", common.get("total_iters", 0)))
    ts = common.get("train_state")
    megatron_args = common.get("args")
    valid = None
    if ts is not None:
        trainer.state.consumed_train_samples = int(ts["consumed_train_samples"])
        trainer.state.floating_point_operations_so_far = float(ts["floating_point_operations_so_far"])
        valid = ts.get("consumed_valid_samples")
    elif megatron_args is not None:  # Megatron-LM's checkpoint
        trainer.state.consumed_train_samples = int(getattr(megatron_args, "consumed_train_samples", 0))
        trainer.state.floating_point_operations_so_far = float(common.get("num_floating_point_operations_so_far", 0))
    if valid is None and megatron_args is not None:
        valid = getattr(megatron_args, "consumed_valid_samples", None)
    t = cfg.training
    if not valid and trainer.state.iteration > 0 and t.train_samples is None:
        # Megatron-LM's fallback for checkpoints without the position: every evaluation so far
        valid = (trainer.state.iteration // t.eval_interval) * t.eval_iters * t.global_batch_size
    trainer.state.consumed_valid_samples = int(valid or 0)
    if not ck.no_load_optim:
        if optimizer is None or "opt_param_scheduler" not in common:
            raise CheckpointError(f"--load: {source} has no optimizer state (saved with --no-save-optim, "
                                  "or converted); pass --no-load-optim, or --finetune")
        if not is_own_optimizer_state(optimizer):
            raise CheckpointError(f"--load: {source} holds Megatron-LM's optimizer state, which this framework "
                                  "does not read; pass --no-load-optim (the model, iteration and data position "
                                  "still load), or --finetune")
        try:
            load_optimizer_state_by_name(trainer.model, trainer.optimizer, optimizer)
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"--load: {source}: {e}") from None
        trainer.scheduler.load_state_dict(common["opt_param_scheduler"])
        if trainer.scaler is not None and "grad_scaler" in common:
            trainer.scaler.load_state_dict(common["grad_scaler"])
    if not ck.no_load_rng and rng is not None:
        set_rng_state(rng, trainer.model.tp.rng)
