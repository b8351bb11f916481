"""Which parameters tensor parallelism splits, and how, by parameter name.

One table serves the model (tests compare a rank's slices against the single-process model),
checkpoints (gathering slices into whole tensors and splitting them for another T) and
conversion. Names are this package's (Megatron-Core's) parameter names.

    kind "rows":    contiguous chunk r of T along `dim`
    kind "swiglu":  the tensor is [gate; up] along `dim`; rank r holds [gate chunk r; up chunk r]

Dense weights split over the tensor-parallel group (T), expert weights over the
expert-tensor-parallel group (ETP): `TensorSplit.expert` says which.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass(frozen=True)
class TensorSplit:
    dim: int
    kind: str = "rows"
    expert: bool = False

    def shard(self, whole: torch.Tensor, rank: int, size: int) -> torch.Tensor:
        """Rank `rank`'s slice of the whole tensor (a contiguous copy)."""
        if size == 1:
            return whole
        if self.kind == "swiglu":
            gate, up = whole.chunk(2, dim=self.dim)
            return torch.cat([gate.chunk(size, self.dim)[rank], up.chunk(size, self.dim)[rank]], dim=self.dim)
        return whole.chunk(size, dim=self.dim)[rank].contiguous()

    def unshard(self, slices: Sequence[torch.Tensor]) -> torch.Tensor:
        """The whole tensor from every rank's slice, in rank order."""
        if len(slices) == 1:
            return slices[0]
        if self.kind == "swiglu":
            halves = [s.chunk(2, dim=self.dim) for s in slices]
            return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=self.dim)
        return torch.cat(list(slices), dim=self.dim)


_DENSE = [
    (r"(^|\.)linear_qkv\.(weight|bias)$", "rows0"),
    (r"(^|\.)linear_proj\.weight$", "rows1"),
    (r"(^|\.)linear_fc1\.(weight|bias)$", "fc1"),
    (r"(^|\.)linear_fc2\.weight$", "rows1"),
    (r"^embedding\.word_embeddings\.weight$", "rows0"),
    (r"^output_layer\.weight$", "rows0"),
]
_EXPERT = [
    (r"\.experts\.weight1$", "fc1", 2),   # [E, D, 2F]
    (r"\.experts\.bias1$", "fc1", 1),     # [E, 2F]
    (r"\.experts\.weight2$", "rows", 1),  # [E, F, D]
]


def tensor_split(name: str, swiglu: bool) -> Optional[TensorSplit]:
    """How parameter `name` is split under tensor parallelism, or None when it is replicated."""
    for pattern, kind, dim in _EXPERT:
        if re.search(pattern, name):
            return TensorSplit(dim, "swiglu" if kind == "fc1" and swiglu else "rows", expert=True)
    for pattern, kind in _DENSE:
        if re.search(pattern, name):
            if kind == "fc1":
                return TensorSplit(0, "swiglu" if swiglu else "rows")
            return TensorSplit(int(kind[-1]))
    return None


def shard_state(whole: dict[str, torch.Tensor], swiglu: bool, tp_rank: int, tp_size: int,
                etp_rank: int = 0, etp_size: int = 1, param_name=lambda key: key) -> dict[str, torch.Tensor]:
    """A rank's slices of a whole state dict (experts: whole along the expert dimension).
    `param_name(key)` is the parameter name of a key, for state dicts keyed otherwise."""
    out = {}
    for name, t in whole.items():
        split = tensor_split(param_name(name), swiglu)
        if split is None:
            out[name] = t
        elif split.expert:
            out[name] = split.shard(t, etp_rank, etp_size)
        else:
            out[name] = split.shard(t, tp_rank, tp_size)
    return out
