"""Hugging Face checkpoint directories: `config.json` plus safetensors files.

    <dir>/config.json
    <dir>/model.safetensors.index.json          {"metadata": {"total_size": N}, "weight_map": {name: file}}
    <dir>/model-00001-of-00003.safetensors ...

Reading is lazy (a tensor is read from its file when accessed) so that a model bigger than
memory converts one tensor at a time. Writing publishes the directory atomically. transformers
is not needed for either.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Iterator, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron.training.atomic_dir import atomic_directory

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


class SafetensorsCheckpoint(Mapping[str, torch.Tensor]):
    """name -> tensor over a set of safetensors files; each access reads one tensor from disk."""

    def __init__(self, file_of: Mapping[str, str]):
        self._file_of = dict(file_of)

    def __getitem__(self, name: str) -> torch.Tensor:
        with safe_open(self._file_of[name], framework="pt") as f:
            return f.get_tensor(name)

    def __contains__(self, name: object) -> bool:  # without reading the tensor
        return name in self._file_of

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)


def read_hf_config(directory: str) -> dict:
    """config.json of a Hugging Face model directory. ValueError naming the path if unreadable."""
    if not os.path.isdir(directory):
        raise ValueError(f"--load-dir {directory} is not a directory")
    path = os.path.join(directory, CONFIG_FILE)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"--load-dir {directory} has no {CONFIG_FILE}; is it a Hugging Face model directory?") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def _file_of_tensors(directory: str) -> dict[str, str]:
    """name -> safetensors file, from the index when there is one, else from every file's header."""
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map = json.load(f).get("weight_map") or {}
        files = {name: os.path.join(directory, file) for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not os.path.isfile(file):
                raise ValueError(f"{index_path} names {os.path.basename(file)}, which is missing")
        return files
    paths = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not paths:
        raise ValueError(f"--load-dir {directory} has no *.safetensors files (only safetensors checkpoints convert)")
    files: dict[str, str] = {}
    for path in paths:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                if name in files:
                    raise ValueError(f"tensor {name} is in both {files[name]} and {path}")
                files[name] = path
    return files


def read_hf_checkpoint(directory: str) -> tuple[dict, SafetensorsCheckpoint]:
    """(config.json contents, lazy state dict) of a Hugging Face model directory."""
    config = read_hf_config(directory)
    return config, SafetensorsCheckpoint(_file_of_tensors(directory))


def plan_shards(sizes: Mapping[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Split names into consecutive shards of at most `max_shard_bytes` (a bigger tensor alone)."""
    if max_shard_bytes <= 0:
        raise ValueError(f"--max-shard-size must be positive, got {max_shard_bytes}")
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def _own_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors that each own their whole storage (safetensors rejects shared memory)."""
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():
        t = t.detach().contiguous()
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def save_hf_checkpoint(directory: str, config: dict, state_dict: Mapping[str, torch.Tensor],
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Write config.json, safetensors shards and the index into `directory`, atomically.

    `directory` must be absent or empty. The index is written even for a single shard.
    """
    sizes = {name: t.numel() * t.element_size() for name, t in state_dict.items()}
    shards = plan_shards(sizes, max_shard_bytes)
    with atomic_directory(directory) as tmp:
        weight_map = {}
        for n, names in enumerate(shards, start=1):
            file = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            save_file(_own_storage({name: state_dict[name] for name in names}), os.path.join(tmp, file),
                      metadata={"format": "pt"})
            weight_map.update({name: file for name in names})
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        with open(os.path.join(tmp, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
