"""One pre-norm transformer layer and the stack of them (Megatron-Core module names).

    x = x + dropout(self_attention(input_layernorm(x)))
    x = x + dropout(mlp(pre_mlp_layernorm(x)))          # mlp: dense MLP or MoELayer

Activation recompute follows a `RecomputePlan`: whole runs of layers (Megatron's
`--recompute-granularity full` with `--recompute-method uniform|block`), or per layer only the
attention core (`selective`) or only the MoE FFN (`--moe-layer-recompute`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron.core.config import ModelConfig
from megatron.core.parallel_state import ProcessGroups
from megatron.core.tensor_parallel.context import TensorParallel
from megatron.core.tensor_parallel.random import RecomputeRNG, TensorParallelRNG
from megatron.core.transformer import init
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.router import Router, RouterOutput
from megatron.core.transformer.norm import build_norm


@dataclass(frozen=True)
class RecomputePlan:
    """What a layer stack recomputes in backward instead of keeping.

    full_segments: [start, end) layer ranges of which only the input is kept; each range is
        re-run whole in backward. Layers outside them follow `per_layer`.
    per_layer: one entry a layer: None, "selective" (the attention core) or "moe" (the MoE FFN).
    """

    full_segments: tuple[tuple[int, int], ...] = ()
    per_layer: tuple[Optional[str], ...] = ()

    @staticmethod
    def build(num_layers: int, granularity: Optional[str] = None, method: Optional[str] = None,
              num_recompute_layers: Optional[int] = None, moe_layers: bool = False) -> "RecomputePlan":
        """Megatron's flags as a plan. `full` + `uniform` N: every run of N layers is one segment;
        `full` + `block` N: the first N layers, each its own segment; `full` alone: every layer."""
        if granularity == "full":
            n = num_recompute_layers or 1
            if method == "block":
                return RecomputePlan(tuple((i, i + 1) for i in range(min(n, num_layers))), (None,) * num_layers)
            return RecomputePlan(tuple((i, min(i + n, num_layers)) for i in range(0, num_layers, n)),
                                 (None,) * num_layers)
        mode = "selective" if granularity == "selective" else "moe" if moe_layers else None
        return RecomputePlan((), (mode,) * num_layers)


class _RoutersRecomputing:
    """Context: the routers inside `modules` are re-running a forward (they must not count it
    again). A class, not a generator, because torch may enter a checkpoint's recompute context
    more than once (seen with torch 2.11 on CUDA)."""

    def __init__(self, modules: list[nn.Module]):
        self.routers = [m for module in modules for m in module.modules() if isinstance(m, Router)]
        self.states = [router.replay_state() for router in self.routers]  # made at the forward

    def __enter__(self):
        for router, state in zip(self.routers, self.states):
            router.recomputing = True
            router.replayed_state = state
        return self

    def __exit__(self, *exc):
        for router in self.routers:
            router.recomputing = False
        return False


def _recompute(fn, modules: list[nn.Module], rng: Optional[TensorParallelRNG], *args):
    """fn(*args), keeping only its inputs; re-run in backward with the routers of `modules` told
    so, and the tensor-parallel dropout stream replayed from where the forward found it."""
    def contexts():
        replay = RecomputeRNG(rng)
        return replay.forward_context(), _Recomputing(replay, modules)

    return checkpoint(fn, *args, use_reentrant=False, context_fn=contexts)


class _Recomputing:
    """The recompute context: replays the dropout stream and tells the routers (both re-entrant)."""

    def __init__(self, replay: RecomputeRNG, modules: list[nn.Module]):
        self.replay = replay.recompute_context()
        self.routers = _RoutersRecomputing(modules)

    def __enter__(self):
        self.replay.__enter__()
        self.routers.__enter__()
        return self

    def __exit__(self, *exc):
        self.routers.__exit__(*exc)
        self.replay.__exit__(*exc)
        return False


class TransformerLayer(nn.Module):
    """x_BSD -> (x_BSD, RouterOutput or None); x_BsD -> x_BsD under sequence parallelism.

    groups: the run's process groups (the MoE layer's dispatcher and router take theirs);
    tp: how attention and the FFNs split over the tensor-parallel group.
    recompute: None, "selective" (recompute only the attention core in backward) or "moe"
    (only the MoE FFN). Whole-layer recompute is the block's (`RecomputePlan.full_segments`).
    """

    def __init__(self, config: ModelConfig, layer_number: int, groups: Optional[ProcessGroups] = None,
                 tp: TensorParallel = TensorParallel(), recompute: Optional[str] = None):
        super().__init__()
        groups = groups or ProcessGroups()
        self.layer_number = layer_number
        self.is_moe = config.moe is not None and config.moe.is_moe_layer(layer_number)
        self.recompute = recompute
        self.hidden_dropout = config.hidden_dropout
        self.tp = tp
        self.input_layernorm = build_norm(config)
        self.self_attention = SelfAttention(config, tp)
        self.pre_mlp_layernorm = build_norm(config)
        self.mlp = MoELayer(config, groups, tp) if self.is_moe else MLP(config, config.ffn_hidden_size, tp)
        tp.tag_replicated([*self.input_layernorm.parameters(), *self.pre_mlp_layernorm.parameters()])

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        if not self.hidden_dropout:
            return x
        with self.tp.dropout_rng(sharded=self.tp.shards_sequence):
            return F.dropout(x, self.hidden_dropout, self.training)

    def _attention(self, x_BSD, rope):
        return self._dropout(self.self_attention(self.input_layernorm(x_BSD), rope))

    def _ffn(self, x_BSD):
        out = self.mlp(self.pre_mlp_layernorm(x_BSD))
        out, routing = out if self.is_moe else (out, None)
        return self._dropout(out), routing

    def forward(self, x_BSD: torch.Tensor, rope=None) -> tuple[torch.Tensor, Optional[RouterOutput]]:
        if self.recompute == "selective":
            x_BSD = x_BSD + _recompute(self._attention, [], self.tp.rng, x_BSD, rope)
        else:
            x_BSD = x_BSD + self._attention(x_BSD, rope)
        if self.recompute == "moe" and self.is_moe:
            out, routing = _recompute(self._ffn, [self.mlp], self.tp.rng, x_BSD)
        else:
            out, routing = self._ffn(x_BSD)
        return x_BSD + out, routing


class LayersByIndex(nn.ModuleDict):
    """Transformer layers keyed by their global index (`layers.7`), so that parameter names do
    not depend on which layers a pipeline stage holds. Iterates over the layers in order, and
    `layers[i]` is global layer i (torchtitan keeps its layers the same way)."""

    def __iter__(self):
        return iter(self.values())

    def __getitem__(self, index) -> nn.Module:
        return super().__getitem__(str(index))


class TransformerBlock(nn.Module):
    """The layer stack and the final norm, possibly only some of both (a pipeline rank's share).

    groups, tp: process groups and tensor-parallel split (see TransformerLayer).
    chunks: the global indices of the layers held, one list per model chunk (one chunk without
        interleaved pipelining; default: every layer). Layers are registered under their global
        index (`layers.7`), so parameter names do not depend on the pipeline layout.
    recompute: one RecomputePlan per chunk, built for that chunk's layer count.
    init_seed: draw each layer's weights from its own seed (`init.seeded`).
    final_norm: whether this block holds the final norm (the last pipeline stage does).

    `forward(x_BSD, rope)` runs every layer and the final norm (the whole model in one process);
    `run_chunk(c, x_BSD, rope)` runs chunk c's layers only. Both return (x_BSD, [RouterOutput per
    MoE layer run]).
    """

    def __init__(self, config: ModelConfig, groups: Optional[ProcessGroups] = None,
                 tp: TensorParallel = TensorParallel(),
                 recompute: Optional[RecomputePlan | list[RecomputePlan]] = None,
                 chunks: Optional[list[list[int]]] = None, final_norm: bool = True, init_seed: Optional[int] = None):
        super().__init__()
        chunks = [list(c) for c in chunks] if chunks is not None else [list(range(config.num_layers))]
        plans = recompute if isinstance(recompute, list) else [recompute] * len(chunks)
        plans = [plan or RecomputePlan.build(len(chunk)) for plan, chunk in zip(plans, chunks)]
        self.layers = LayersByIndex()
        for chunk, plan in zip(chunks, plans):
            for j, i in enumerate(chunk):
                with init.seeded(init_seed, i):
                    self.layers[str(i)] = TransformerLayer(config, i, groups, tp, plan.per_layer[j])
        self.final_layernorm = build_norm(config) if final_norm else None
        if final_norm:
            tp.tag_replicated(self.final_layernorm.parameters())
        self.chunks = chunks
        self.tp = tp
        self.chunk_segments = [_segments(len(chunk), plan.full_segments) for chunk, plan in zip(chunks, plans)]

    def _run(self, layers: list[nn.Module], x_BSD: torch.Tensor, rope) -> tuple[torch.Tensor, list[RouterOutput]]:
        routings = []
        for layer in layers:
            x_BSD, routing = layer(x_BSD, rope)
            if routing is not None:
                routings.append(routing)
        return x_BSD, routings

    def run_chunk(self, chunk: int, x_BSD: torch.Tensor, rope=None) -> tuple[torch.Tensor, list[RouterOutput]]:
        """Chunk `chunk`'s layers, with its activation recompute."""
        layers = [self.layers[i] for i in self.chunks[chunk]]
        routings = []
        for start, end, full in self.chunk_segments[chunk]:
            if full and self.training:
                x_BSD, more = _recompute(self._run, layers[start:end], self.tp.rng, layers[start:end], x_BSD, rope)
            else:
                x_BSD, more = self._run(layers[start:end], x_BSD, rope)
            routings += more
        return x_BSD, routings

    def forward(self, x_BSD: torch.Tensor, rope=None) -> tuple[torch.Tensor, list[RouterOutput]]:
        routings = []
        for c in range(len(self.chunks)):
            x_BSD, more = self.run_chunk(c, x_BSD, rope)
            routings += more
        return self.final_layernorm(x_BSD), routings


def _segments(num_layers: int, full_segments: tuple[tuple[int, int], ...]) -> list[tuple[int, int, bool]]:
    """[start, end, recomputed] runs covering layers 0..L-1 in order."""
    out, at = [], 0
    for start, end in sorted(full_segments):
        if at < start:
            out.append((at, start, False))
        out.append((start, end, True))
        at = end
    if at < num_layers:
        out.append((at, num_layers, False))
    return out
