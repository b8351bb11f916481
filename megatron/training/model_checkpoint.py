"""Model-only access to legacy (`--ckpt-format torch`) checkpoints, for conversion tools.

    <root>/latest_checkpointed_iteration.txt        an iteration number, or `release`
    <root>/iter_0000100/mp_rank_00/model_optim_rng.pt         EP = 1
    <root>/iter_0000100/mp_rank_00_{000,001,...}/model_optim_rng.pt   expert-parallel ranks

Each file holds at least `model` (the rank's state dict), `config` (`dataclasses.asdict` of
the run's `Config`), `args` (the argparse namespace of its flags) and `iteration`.
`load_model_checkpoint` merges expert-parallel shards into one EP = 1 state dict.
`save_model_checkpoint` writes a converted checkpoint: iteration 0, tracker `release`, no
optimizer state (load it for training with `--finetune`, or `--no-load-optim --no-load-rng`).

Note: Megatron-LM keeps a `release` checkpoint in `<root>/release/`; this framework's loader
(`checkpointing.read_tracker`) reads `release` as iteration 0 and looks in `iter_0000000/`, so
that is where converted checkpoints go. Both directory names are accepted when reading.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from megatron.core.config import ModelConfig, MoEConfig
from megatron.training.atomic_dir import atomic_directory
from megatron.training.checkpointing import CHECKPOINT_VERSION, TRACKER, iteration_dir

MODEL_FILE = "model_optim_rng.pt"
_RANK_DIR = re.compile(r"^mp_rank_(\d\d)(?:_(\d\d\d))?$")
_EXPERT_KEY = ".mlp.experts."


@dataclass
class ModelCheckpoint:
    """A model's weights and what rebuilds it.

    state_dict: GPTModel names, EP = 1. config: `dataclasses.asdict(Config)` as saved.
    args: the saved flag namespace (None if absent). extra: other payload entries worth
    carrying through a conversion (e.g. `hf_config`, the config.json it came from).
    """

    model_config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    config: dict
    args: Optional[argparse.Namespace]
    iteration: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def model_config_from_dict(config: dict) -> ModelConfig:
    """Our ModelConfig from a saved `dataclasses.asdict(Config)` (or of a ModelConfig)."""
    model = dict(config.get("model", config))
    try:
        moe = model.pop("moe", None)
        if moe is not None:
            moe = MoEConfig(**{**moe, "layer_pattern": tuple(moe["layer_pattern"])})
        return ModelConfig(**model, moe=moe)
    except (TypeError, KeyError) as e:
        raise ValueError(f"checkpoint 'config' entry does not describe a model of this version: {e}") from None


def _checkpoint_dir(root: str) -> tuple[str, int]:
    """The iteration directory the tracker names (or `root` itself if it is one), and its iteration."""
    if not os.path.isdir(root):
        raise ValueError(f"--load-dir {root} is not a directory")
    if any(_RANK_DIR.match(name) for name in os.listdir(root)):
        match = re.search(r"iter_(\d+)$", os.path.normpath(root))
        return root, int(match.group(1)) if match else 0
    tracker = os.path.join(root, TRACKER)
    if not os.path.isfile(tracker):
        raise ValueError(f"--load-dir {root} has no {TRACKER} and no mp_rank_* directories; "
                         "is it a Megatron checkpoint?")
    text = open(tracker).read().strip()
    if text == "release":
        candidates = [os.path.join(root, "release"), iteration_dir(root, 0)]
        iteration = 0
    else:
        try:
            iteration = int(text)
        except ValueError:
            raise ValueError(f"{tracker} holds {text!r}, not an iteration number or 'release'") from None
        candidates = [iteration_dir(root, iteration)]
    for directory in candidates:
        if os.path.isdir(directory):
            return directory, iteration
    raise ValueError(f"{tracker} names {text!r} but {candidates[-1]} is missing")


def _rank_files(directory: str) -> list[str]:
    """model_optim_rng.pt of each expert-parallel rank, in rank order (TP = PP = 1 only)."""
    if os.path.isfile(os.path.join(directory, ".metadata")):
        raise ValueError(f"{directory} is a torch_dist checkpoint; only --ckpt-format torch (legacy) "
                         "checkpoints convert for now")
    ranks = []
    for name in os.listdir(directory):
        match = _RANK_DIR.match(name)
        if match is None:
            continue
        if match.group(1) != "00":
            raise ValueError(f"{directory}/{name}: tensor/pipeline-parallel checkpoints are not supported")
        ranks.append((int(match.group(2) or 0), name))
    if not ranks:
        raise ValueError(f"{directory} has no mp_rank_00* directories")
    ranks.sort()
    if [r for r, _ in ranks] != list(range(len(ranks))):
        raise ValueError(f"{directory}: expert-parallel rank directories are not 0..{len(ranks) - 1}")
    files = [os.path.join(directory, name, MODEL_FILE) for _, name in ranks]
    for path in files:
        if not os.path.isfile(path):
            raise ValueError(f"{path} is missing")
    return files


def merge_expert_shards(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One EP = 1 state dict from each expert-parallel rank's: expert tensors concatenated along
    the expert dim in rank order; every other tensor must be identical on all ranks."""
    first = shards[0]
    for rank, shard in enumerate(shards[1:], start=1):
        if set(shard) != set(first):
            raise ValueError(f"expert-parallel rank {rank} holds different tensors than rank 0")
    merged = {}
    for name, tensor in first.items():
        if _EXPERT_KEY in name:
            merged[name] = torch.cat([s[name] for s in shards], dim=0)
        else:
            for rank, shard in enumerate(shards[1:], start=1):
                if not torch.equal(shard[name], tensor):
                    raise ValueError(f"{name} differs between expert-parallel ranks 0 and {rank}")
            merged[name] = tensor
    return merged


def _load_payload(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)  # holds an argparse.Namespace
    except Exception as e:  # noqa: BLE001 - any unpickling failure means an unreadable file
        raise ValueError(f"cannot read {path}: {e}") from None


def load_model_checkpoint(root: str) -> ModelCheckpoint:
    """Weights and config of the checkpoint `root`'s tracker names (or of an iteration dir)."""
    directory, iteration = _checkpoint_dir(root)
    payloads = [_load_payload(path) for path in _rank_files(directory)]
    head = payloads[0]
    if "model" not in head:
        raise ValueError(f"{directory}: checkpoint has no 'model' entry")
    if "config" not in head:
        raise ValueError(f"{directory}: checkpoint has no 'config' entry, so the model cannot be rebuilt")
    state_dict = merge_expert_shards([p["model"] for p in payloads]) if len(payloads) > 1 else head["model"]
    extra = {k: head[k] for k in ("hf_config",) if k in head}
    return ModelCheckpoint(model_config_from_dict(head["config"]), dict(state_dict), head["config"],
                           head.get("args"), int(head.get("iteration", iteration)), extra)


def save_model_checkpoint(root: str, checkpoint: ModelCheckpoint) -> str:
    """Write `checkpoint` as a release (iteration 0) legacy checkpoint into `root`, atomically.

    `root` must be absent or empty. Returns the path of the model file written.
    """
    payload = {
        "model": checkpoint.state_dict,
        "args": checkpoint.args,
        "config": checkpoint.config,
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": 0,
        **checkpoint.extra,
    }
    with atomic_directory(root) as tmp:
        rank_dir = os.path.join(iteration_dir(tmp, 0), "mp_rank_00")
        os.makedirs(rank_dir)
        torch.save(payload, os.path.join(rank_dir, MODEL_FILE))
        with open(os.path.join(tmp, TRACKER), "w") as f:
            f.write("release")
    return os.path.join(iteration_dir(root, 0), "mp_rank_00", MODEL_FILE)

