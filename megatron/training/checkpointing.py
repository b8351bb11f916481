"""Saving and resuming: Megatron's checkpoint layout, written crash-safely.

    <save>/latest_checkpointed_iteration.txt        the newest complete iteration
    <save>/iter_0000100/mp_rank_00/model_optim_rng.pt            --ckpt-format torch, EP = 1
    <save>/iter_0000100/mp_rank_00_001/model_optim_rng.pt        ... expert-parallel rank 1

A checkpoint is written under a temporary name and renamed when every rank has finished; the
`latest` file moves last. A process killed during a save leaves the previous checkpoint as
the one that loads.
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
import warnings
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron.core.config import Config
from megatron.core.parallel_state import ProcessGroups
from megatron.training.logger import print_rank_0

if TYPE_CHECKING:
    from megatron.training.train import Trainer

TRACKER = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 3.0


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into this run; the message says what differs."""


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def rank_dir_name(groups: ProcessGroups) -> str:
    """mp_rank_00, or mp_rank_00_EEE with expert parallelism (TP = PP = 1)."""
    return "mp_rank_00" if groups.ep_size == 1 else f"mp_rank_00_{groups.ep_rank:03d}"


def rng_state() -> dict:
    state = {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "cuda_rng_state": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "rng_tracker_states": {},
    }
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if state.get("cuda_rng_state") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng_state"])


def _barrier(groups: ProcessGroups) -> None:
    if groups.world_size > 1:
        dist.barrier()


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_torch_save(obj, path: str) -> None:
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def checkpoint_payload(trainer: "Trainer", cfg: Config, args) -> dict:
    """Everything one rank writes: Megatron's keys plus this framework's train state and config."""
    ck = cfg.checkpoint
    state = trainer.state
    payload = {
        "args": args,
        "config": dataclasses.asdict(cfg),
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": state.iteration,
        "model": trainer.model.state_dict(),
        "train_state": dataclasses.asdict(state),
        "num_floating_point_operations_so_far": state.floating_point_operations_so_far,
    }
    if not ck.no_save_optim:
        payload["optimizer"] = trainer.optimizer.state_dict()
        payload["opt_param_scheduler"] = trainer.scheduler.state_dict()
        if trainer.scaler is not None:
            payload["grad_scaler"] = trainer.scaler.state_dict()
    if not ck.no_save_rng:
        payload["rng_state"] = [rng_state()]
    return payload


def save_checkpoint(trainer: "Trainer", cfg: Config, groups: ProcessGroups, args=None) -> str:
    """Write iteration `trainer.state.iteration` under `--save`; returns its directory."""
    if cfg.checkpoint.ckpt_format != "torch":
        from megatron.training import dist_checkpointing

        return dist_checkpointing.save(trainer, cfg, groups, args)
    root = cfg.checkpoint.save
    final = iteration_dir(root, trainer.state.iteration)
    tmp = final + ".tmp"
    if groups.is_main:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier(groups)
    payload = checkpoint_payload(trainer, cfg, args)
    if groups.expert_dp is None or dist.get_rank(groups.expert_dp) == 0:  # one replica of each EP shard writes
        rank_dir = os.path.join(tmp, rank_dir_name(groups))
        os.makedirs(rank_dir, exist_ok=True)
        _atomic_torch_save(payload, os.path.join(rank_dir, "model_optim_rng.pt"))
    _barrier(groups)
    if groups.is_main:
        publish(root, final, tmp, trainer.state.iteration)
    _barrier(groups)
    print_rank_0(groups.is_main, f"  saved checkpoint at iteration {trainer.state.iteration:7d} to {root}")
    return final


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
    _atomic_write_text(os.path.join(root, TRACKER), str(iteration))


def read_tracker(root: str) -> Optional[int]:
    """The iteration named by `latest_checkpointed_iteration.txt`, or None when absent."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    if text == "release":
        return 0
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"--load: {path} holds {text!r}, not an iteration number") from None


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
    directory = iteration_dir(ck.load, iteration)
    if not os.path.isdir(directory):
        raise CheckpointError(f"--load: {TRACKER} names iteration {iteration} but {directory} is missing")
    if os.path.isdir(os.path.join(directory, "__0_0.distcp")) or os.path.isfile(os.path.join(directory, ".metadata")):
        from megatron.training import dist_checkpointing

        dist_checkpointing.load(trainer, cfg, groups, directory)
    else:
        _load_legacy(trainer, cfg, groups, directory)
    print_rank_0(groups.is_main, f"  loaded checkpoint from {ck.load} at iteration {trainer.state.iteration}")


def _load_legacy(trainer: "Trainer", cfg: Config, groups: ProcessGroups, directory: str) -> None:
    path = os.path.join(directory, rank_dir_name(groups), "model_optim_rng.pt")
    if not os.path.isfile(path):
        raise CheckpointError(f"--load: {path} is missing (saved with another expert-parallel size? "
                              "use --ckpt-format torch_dist to reshard)")
    try:
        payload = torch.load(path, map_location=groups.device, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise CheckpointError(f"--load: cannot read {path}: {e}") from None
    load_model_state(trainer.model, payload["model"], path)
    restore_training_state(trainer, cfg, payload, path)


def load_model_state(model: torch.nn.Module, state: dict, source: str) -> None:
    """Strict load that names every missing, unexpected or mis-shaped tensor."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensors (e.g. {', '.join(unexpected[:3])})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:3])})")
    if problems:
        raise CheckpointError(f"--load: {source} does not match this model: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def restore_training_state(trainer: "Trainer", cfg: Config, payload: dict, source: str) -> None:
    """Iteration, samples, optimizer, schedule, scaler and RNG, as --finetune/--no-load-* allow."""
    ck = cfg.checkpoint
    if ck.finetune:
        return
    ts = payload.get("train_state")
    trainer.state.iteration = int(payload["iteration"])
    if ts is not None:
        trainer.state.consumed_train_samples = int(ts["consumed_train_samples"])
        trainer.state.floating_point_operations_so_far = float(ts["floating_point_operations_so_far"])
    elif payload.get("args") is not None:
        trainer.state.consumed_train_samples = int(getattr(payload["args"], "consumed_train_samples", 0))
    if not ck.no_load_optim:
        if "optimizer" not in payload:
            raise CheckpointError(f"--load: {source} has no optimizer state (saved with --no-save-optim); "
                                  "pass --no-load-optim")
        trainer.optimizer.load_state_dict(payload["optimizer"])
        trainer.scheduler.load_state_dict(payload["opt_param_scheduler"])
        if trainer.scaler is not None and "grad_scaler" in payload:
            trainer.scaler.load_state_dict(payload["grad_scaler"])
    if not ck.no_load_rng and "rng_state" in payload:
        set_rng_state(payload["rng_state"][0])


def finalize(trainer: "Trainer") -> None:
    """Wait for any background save to complete."""
    pending = getattr(trainer, "pending_save", None)
    if pending is not None:
        pending.result()
        trainer.pending_save = None
