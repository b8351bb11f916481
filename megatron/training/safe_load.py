"""Reading checkpoint files without running code from them.

A checkpoint is a pickle, and unpickling can call any function the file names. Every file this
framework reads back (`model_optim_rng.pt`, `common.pt`, `rng_rank_*.pt`, a torch_dist
`.metadata`) is therefore unpickled against an allowlist of exactly what checkpoints hold:

    torch.load files     tensors and plain values (torch's weights-only unpickler), plus
                         argparse.Namespace (the saved flags), numpy's RNG state, signal.Signals,
                         io.BytesIO (Transformer Engine < 2.0 extra state) and stand-ins for the
                         Megatron-Core enums that Megatron-LM 0.16 puts in its `args`
    .metadata            torch.distributed.checkpoint's metadata classes, torch.Size, dtypes,
                         layouts and pathlib paths

Anything else is refused with one line naming the global the file asked for. A file that is
not a readable pickle at all (truncated, overwritten) is reported as corrupt. `save_file`
writes a file back with any stand-ins under their Megatron-Core names (the offline tools carry
a Megatron-LM checkpoint's `args` into the files they write).

The stand-ins are small enums with Megatron-Core's member names and values, unpickled under the
real dotted names (`megatron.core.transformer.enums.AttnBackend`, ...), so Megatron-LM
checkpoints load without Megatron-Core installed.
"""

from __future__ import annotations

import argparse
import enum
import io
import os
import pickle
import re
import signal
import types
from typing import Any

import numpy as np
import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into this run; the message says what differs."""


# ---------------------------------------------------------------------------- Megatron-Core stand-ins


class _MegatronEnum(enum.Enum):
    """A Megatron-Core enum seen from outside Megatron-Core: known members by value; a value
    from another Megatron version becomes an extra member instead of failing the load."""

    @classmethod
    def _missing_(cls, value):
        member = object.__new__(cls)
        member._name_ = f"unknown_{value}"
        member._value_ = value
        return member


def _stand_in(name: str, members: dict[str, int]) -> type:
    return _MegatronEnum(name.rsplit(".", 1)[1], members, module=__name__)


# Megatron-Core 0.16.1 enums that Megatron-LM stores in `args` (values from its source).
MEGATRON_STAND_INS: dict[str, type] = {
    name: _stand_in(name, members) for name, members in {
        "megatron.core.transformer.enums.AttnBackend":
            {"flash": 1, "fused": 2, "unfused": 3, "local": 4, "auto": 5},
        "megatron.core.transformer.enums.CudaGraphScope":
            {"full_iteration": 1, "attn": 2, "mlp": 3, "moe": 4, "moe_router": 5, "moe_preprocess": 6, "mamba": 7},
        "megatron.core.enums.ModelType": {"encoder_or_decoder": 1},
    }.items()
}


def _numpy_globals() -> list:
    """What pickling numpy's RNG state (`np.random.get_state()`) refers to, under numpy 1 and 2 names."""
    core = getattr(np, "_core", None) or np.core  # numpy >= 2 moved numpy.core to numpy._core
    reconstruct = core.multiarray._reconstruct
    dtype_classes = [np.dtypes.UInt32DType] if hasattr(np, "dtypes") else []
    return [np.ndarray, np.dtype, *dtype_classes, (reconstruct, "numpy._core.multiarray._reconstruct"),
            (reconstruct, "numpy.core.multiarray._reconstruct")]


def allowed_globals() -> list:
    """The allowlist for `torch.load(weights_only=True)`: classes, or (stand-in, dotted name) pairs."""
    return [argparse.Namespace, signal.Signals, io.BytesIO, *_numpy_globals(),
            *((cls, name) for name, cls in MEGATRON_STAND_INS.items())]


# ---------------------------------------------------------------------------- writing


class _RealNamesPickler(pickle._Pickler):
    """torch.save's pickler for files that may hold stand-ins: each is written under the
    Megatron-Core name it was read from, so Megatron-LM reads the file back as its own."""

    _real_names = {cls: name for name, cls in MEGATRON_STAND_INS.items()}

    def save_global(self, obj, name=None):
        real = self._real_names.get(obj)
        if real is None:
            return super().save_global(obj, name)
        module, qualname = real.rsplit(".", 1)
        self.write(pickle.GLOBAL + f"{module}\n{qualname}\n".encode())
        self.memoize(obj)


def save_file(obj: Any, path) -> None:
    """`torch.save(obj, path)`, with stand-ins (from `load_file`) written as Megatron-Core's classes."""
    module = types.ModuleType("checkpoint_pickle")
    module.Pickler = _RealNamesPickler
    torch.save(obj, path, pickle_module=module)


# ---------------------------------------------------------------------------- torch.load files

_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
_WEIGHTS_ONLY_REASON = re.compile(r"WeightsUnpickler error: ([^\n]*)")


def refused_message(flag: str, path: str, name: str) -> str:
    return (f"{flag}: refusing to unpickle {name} from {path}: checkpoints hold only tensors and plain values; "
            "if you trust this file, re-save its tensors and plain values without that object")


def corrupt_message(flag: str, path: str, error: BaseException) -> str:
    first = str(error).splitlines()[0] if str(error) else ""
    return (f"{flag}: cannot read {path} ({type(error).__name__}: {first}); the file is corrupt or truncated: "
            "load an earlier iteration")


def load_file(path: str, flag: str = "--load") -> Any:
    """`torch.load(path)` through the weights-only unpickler with `allowed_globals()`.

    Raises CheckpointError naming `path` (and `flag`): the global it refused, or that the file
    is corrupt. Never runs code from the file.
    """
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = _UNSUPPORTED_GLOBAL.search(str(e))
        if refused:
            raise CheckpointError(refused_message(flag, path, refused.group(1))) from None
        reason = _WEIGHTS_ONLY_REASON.search(str(e))
        if reason:
            raise CheckpointError(f"{flag}: refusing to load {path}: {reason.group(1).strip()}; checkpoints "
                                  "hold only tensors and plain values") from None
        raise CheckpointError(corrupt_message(flag, path, e)) from None
    except Exception as e:  # noqa: BLE001 - any other failure to read means an unreadable file
        raise CheckpointError(corrupt_message(flag, path, e)) from None


# ---------------------------------------------------------------------------- torch_dist .metadata


def _metadata_globals() -> dict[tuple[str, str], Any]:
    """(module, name) -> object for everything a torch.distributed.checkpoint `.metadata` names."""
    import pathlib

    from torch.distributed.checkpoint import filesystem, metadata

    allowed: dict[tuple[str, str], Any] = {
        (metadata.__name__, name): getattr(metadata, name)
        for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                     "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
    }
    allowed[(filesystem.__name__, "_StorageInfo")] = filesystem._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    for cls in (pathlib.PosixPath, pathlib.PurePosixPath):  # StorageMeta.checkpoint_id
        allowed[("pathlib", cls.__name__)] = cls
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    return allowed


class _Refused(Exception):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles only the classes a `.metadata` file is made of."""

    def __init__(self, file):
        super().__init__(file)
        self.allowed = _metadata_globals()

    def find_class(self, module: str, name: str):
        if (module, name) not in self.allowed:
            raise _Refused(f"{module}.{name}")
        return self.allowed[(module, name)]


def read_dcp_metadata(directory: str, flag: str = "--load"):
    """The torch.distributed.checkpoint `Metadata` of `directory`, read without running code.

    Raises CheckpointError naming `directory/.metadata`: corrupt or truncated, or refused.
    """
    path = os.path.join(directory, ".metadata")
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except _Refused as e:
        raise CheckpointError(refused_message(flag, path, e.name)) from None
    except Exception as e:  # noqa: BLE001 - EOFError, UnpicklingError, ...: an unreadable file
        raise CheckpointError(f"{flag}: cannot read {path} ({type(e).__name__}); the checkpoint is corrupt "
                              "or incomplete") from None


def safe_reader(directory: str, flag: str = "--load"):
    """A `FileSystemReader` for `dcp.load(storage_reader=...)` whose metadata comes from
    `read_dcp_metadata` (torch's own reader unpickles `.metadata` unrestricted). Tensor data is
    already read by torch with `weights_only=True`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata = read_dcp_metadata(directory, flag)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader(directory)
