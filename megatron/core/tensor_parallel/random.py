"""The RNG stream of tensor-parallel regions (Megatron's "model-parallel-rng" tracker state).

Dropout must draw different masks where tensor-parallel ranks hold different data (attention
heads, sequence shards under sequence parallelism) and the same masks where they hold the same
activations (the replicated residual stream without sequence parallelism). The default torch
generator serves the replicated places (it is seeded alike on every rank); `TensorParallelRNG`
keeps a second stream, seeded per tensor-parallel rank, and `fork()` swaps it in for a region:

    with tp.rng.fork():
        out = F.dropout(x_BsD, p, training=True)

Activation recompute must replay the same masks: `RecomputeRNG` gives torch.utils.checkpoint a
context pair that restores the stream's state at the segment's start during the recompute (the
default generator is restored by torch itself). The state is saved in checkpoints under
Megatron-LM's key `rng_tracker_states["model-parallel-rng"]`.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

MODEL_PARALLEL_RNG = "model-parallel-rng"
SEED_OFFSET = 2718
"""Megatron-LM seeds the tensor-parallel stream with seed + 2718 + tensor-parallel rank."""


def _get_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class TensorParallelRNG:
    """A generator state, seeded seed + 2718 + tp_rank, swapped in by `fork()`."""

    def __init__(self, seed: int, tp_rank: int, device: torch.device):
        self.device = device
        saved = _get_state(device)
        if device.type == "cuda":
            torch.cuda.manual_seed(seed + SEED_OFFSET + tp_rank)
        else:
            torch.manual_seed(seed + SEED_OFFSET + tp_rank)
        self.state = _get_state(device)
        _set_state(device, saved)

    @contextlib.contextmanager
    def fork(self):
        """Draw from this stream inside the block, then restore the default one."""
        saved = _get_state(self.device)
        _set_state(self.device, self.state)
        try:
            yield
        finally:
            self.state = _get_state(self.device)
            _set_state(self.device, saved)

    def state_dict(self) -> dict:
        return {MODEL_PARALLEL_RNG: self.state.clone()}

    def load_state_dict(self, states: dict) -> None:
        if MODEL_PARALLEL_RNG in states:
            self.state = states[MODEL_PARALLEL_RNG].clone()


class RecomputeRNG:
    """Context pair for `torch.utils.checkpoint(context_fn=...)`: the forward context notes the
    stream's state when a recomputed segment first runs; the recompute context runs the segment
    again from that state, then puts the stream back where it was."""

    def __init__(self, rng: Optional[TensorParallelRNG]):
        self.rng = rng
        self.start: Optional[torch.Tensor] = None

    def forward_context(self):
        return _Note(self)

    def recompute_context(self):
        return _Replay(self)


class _Note:
    def __init__(self, owner: RecomputeRNG):
        self.owner = owner

    def __enter__(self):
        if self.owner.rng is not None:
            self.owner.start = self.owner.rng.state.clone()
        return self

    def __exit__(self, *exc):
        return False


class _Replay:
    """Entered once per recompute (torch may nest its recompute contexts: only the outermost
    entry swaps the state)."""

    def __init__(self, owner: RecomputeRNG):
        self.owner = owner
        self.after: Optional[torch.Tensor] = None
        self.depth = 0

    def __enter__(self):
        rng = self.owner.rng
        self.depth += 1
        if self.depth == 1 and rng is not None and self.owner.start is not None:
            self.after = rng.state
            rng.state = self.owner.start.clone()
        return self

    def __exit__(self, *exc):
        self.depth -= 1
        if self.depth == 0 and self.after is not None:
            self.owner.rng.state, self.after = self.after, None
        return False
