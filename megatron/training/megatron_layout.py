"""Megatron-LM's `--ckpt-format torch` model layout <-> this framework's, at the checkpoint boundary.

In memory the experts of an MoE layer are two stacked tensors for the grouped GEMM, `weight1`
[E, D, 2F] (gate half first) and `weight2` [E, F, D] (E = this rank's experts). Megatron-Core
stores them per module implementation, chosen by `--transformer-impl` and `--moe-grouped-gemm`;
under {p} = `decoder.layers.N.mlp.experts`, for local expert e (0-based on each
expert-parallel rank, as Megatron-LM writes its `mp_rank_00_EEE` files):

    implementation    flags                               tensor names                     transform of ours
    SequentialMLP     either impl, no --moe-grouped-gemm  {p}.local_experts.{e}.linear_fc1.weight [2F, D]   weight1[e]^T
                                                          {p}.local_experts.{e}.linear_fc2.weight [D, F]    weight2[e]^T
    TEGroupedMLP      transformer_engine + grouped        {p}.linear_fc1.weight{e} [2F, D]                  weight1[e]^T
                                                          {p}.linear_fc2.weight{e} [D, F]                   weight2[e]^T
    GroupedMLP        local + grouped (legacy)            {p}.weight1 [D, E*2F]   the same memory as weight1 (Megatron
                                                          {p}.weight2 [E*F, D]    views it as [E, D, 2F]; likewise weight2)

Biases (`--add-bias-linear`) follow the weights' names with `bias` (SequentialMLP `.bias`,
TEGroupedMLP `bias{e}`); GroupedMLP has none. Everything else keeps our names, except that
Transformer Engine layer specs fuse a norm into the linear after it:

    ours                                           Transformer Engine spec
    decoder.layers.N.input_layernorm.{weight,bias} decoder.layers.N.self_attention.linear_qkv.layer_norm_{weight,bias}
    decoder.layers.N.pre_mlp_layernorm.{...}       decoder.layers.N.mlp.linear_fc1.layer_norm_{...}   (dense layers;
                                                   MoE layers keep pre_mlp_layernorm)

Modules that define PyTorch "extra state" need a `<module>._extra_state` entry for a strict
`load_state_dict`: Megatron-Core's own parallel linears (value None: `linear_qkv`,
`linear_proj`, dense and per-expert `linear_fc1/2`, shared experts, `output_layer`) and every
Transformer Engine module (value: an empty uint8 tensor, what Transformer Engine writes without
FP8: its linears, `core_attention`, its norms). `to_megatron` writes exactly those; `from_megatron`
drops every `_extra_state` entry without reading it. Optimizer state is not mapped (ours stays
keyed by our parameter names). `megatron_args` gives the saved `args` Megatron-LM's attribute
names and values.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional

import torch

from megatron.core.dist_checkpointing import tensor_mismatches

if TYPE_CHECKING:
    from megatron.core.config import ModelConfig
    from megatron.core.pipeline_parallel.layout import PipelineLayout

Tensor = torch.Tensor

# Expert implementations: our key -> Megatron-Core's module class name.
EXPERT_CLASSES = {"sequential": "SequentialMLP", "te_grouped": "TEGroupedMLP", "grouped": "GroupedMLP"}

# Per-expert names under decoder.layers.N.mlp.experts ({e}: local expert), for weight1, weight2, bias1, bias2.
PER_EXPERT_NAMES = {
    "sequential": ("local_experts.{e}.linear_fc1.weight", "local_experts.{e}.linear_fc2.weight",
                   "local_experts.{e}.linear_fc1.bias", "local_experts.{e}.linear_fc2.bias"),
    "te_grouped": ("linear_fc1.weight{e}", "linear_fc2.weight{e}", "linear_fc1.bias{e}", "linear_fc2.bias{e}"),
}
GROUPED_NAMES = ("weight1", "weight2")  # GroupedMLP: one tensor each, [D, E*2F] and [E*F, D]

# Transformer Engine specs: (our norm, the fused linear's prefix); the second in dense layers only.
TE_INPUT_NORM = ("input_layernorm.", "self_attention.linear_qkv.layer_norm_")
TE_PRE_MLP_NORM = ("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_")

_LAYER = re.compile(r"^(decoder\.layers\.\d+)\.(.*)$")
_EXTRA_STATE = re.compile(r"(^|\.)_extra_state\d*$")


@dataclass(frozen=True)
class Layout:
    """How a legacy checkpoint names the model: `experts` is `native` (this framework's stacked
    tensors) or a key of EXPERT_CLASSES; `te_norms` says Transformer Engine's fused norm names."""

    experts: str
    te_norms: bool = False

    def describe(self) -> str:
        if self.experts == "native":
            return "this framework's stacked experts"
        spec = "Transformer Engine" if self.te_norms else "local"
        return f"Megatron-Core {EXPERT_CLASSES[self.experts]}, {spec} layer spec"


def layout_for(transformer_impl: str, moe_grouped_gemm: bool) -> Layout:
    """What Megatron-LM writes for `--transformer-impl` and `--moe-grouped-gemm`."""
    te = transformer_impl == "transformer_engine"
    experts = ("te_grouped" if te else "grouped") if moe_grouped_gemm else "sequential"
    return Layout(experts, te)


def is_extra_state(key: str) -> bool:
    return bool(_EXTRA_STATE.search(key))


def num_local_experts(state: Mapping[str, Any]) -> int:
    """Experts per MoE layer in one of our (native) state dicts; 0 for a dense model."""
    for key, t in state.items():
        if key.endswith(".mlp.experts.weight1"):
            return int(t.shape[0])
    return 0


# ---------------------------------------------------------------------------- ours -> Megatron


def to_megatron(state: Mapping[str, Tensor], layout: Layout) -> dict[str, Any]:
    """Megatron-LM's state dict for `layout` from one rank's native state dict (same tensors,
    renamed and reshaped; expert indices local). Includes the `_extra_state` entries a strict
    Megatron-Core load needs."""
    if layout.experts == "native":
        return dict(state)
    moe_layers = {k.rsplit(".mlp.router.weight", 1)[0] for k in state if k.endswith(".mlp.router.weight")}
    out: dict[str, Any] = {}
    for key, t in state.items():
        layer, rest = _split(key)
        if layer is not None and rest.startswith("mlp.experts."):
            continue
        if layout.te_norms and layer is not None:
            rest = _fuse_norm_name(rest, layer in moe_layers)
        out[key if layer is None else f"{layer}.{rest}"] = t
    for layer in sorted(moe_layers):
        out.update(_experts_to_megatron(state, f"{layer}.mlp.experts", layout.experts))
    out.update(_extra_states(state, moe_layers, layout))
    return out


def _split(key: str) -> tuple[Optional[str], str]:
    match = _LAYER.match(key)
    return (match.group(1), match.group(2)) if match else (None, key)


def _fuse_norm_name(rest: str, is_moe_layer: bool) -> str:
    for ours, fused in (TE_INPUT_NORM,) if is_moe_layer else (TE_INPUT_NORM, TE_PRE_MLP_NORM):
        if rest.startswith(ours):
            return fused + rest[len(ours):]
    return rest


def _experts_to_megatron(state: Mapping[str, Tensor], p: str, experts: str) -> dict[str, Tensor]:
    w1, w2 = state[f"{p}.weight1"], state[f"{p}.weight2"]  # [E, D, 2F], [E, F, D]
    b1, b2 = state.get(f"{p}.bias1"), state.get(f"{p}.bias2")
    if experts == "grouped":
        if b1 is not None:
            raise ValueError(f"{p}: Megatron-Core's GroupedMLP (--transformer-impl local --moe-grouped-gemm) has "
                             "no expert biases; save with --transformer-impl transformer_engine or without "
                             "--moe-grouped-gemm")
        D = w1.shape[1]
        return {f"{p}.weight1": w1.contiguous().view(D, -1), f"{p}.weight2": w2.contiguous().view(-1, D)}
    names = PER_EXPERT_NAMES[experts]
    out = {}
    for e in range(w1.shape[0]):  # views: torch.save writes the stacked storage once, no copy on the device
        out[f"{p}.{names[0].format(e=e)}"] = w1[e].t()
        out[f"{p}.{names[1].format(e=e)}"] = w2[e].t()
        if b1 is not None:
            out[f"{p}.{names[2].format(e=e)}"] = b1[e]
            out[f"{p}.{names[3].format(e=e)}"] = b2[e]
    return out


def _extra_states(state: Mapping[str, Tensor], moe_layers: set[str], layout: Layout) -> dict[str, Any]:
    """`<module>._extra_state` for every module of the Megatron-Core model that defines one."""
    megatron_own, te = [], []  # Megatron-Core parallel linears (None) / Transformer Engine modules (empty)
    linears = te if layout.te_norms else megatron_own
    layers = sorted({layer for layer, _ in map(_split, state) if layer is not None})
    for layer in layers:
        linears += [f"{layer}.self_attention.linear_qkv", f"{layer}.self_attention.linear_proj"]
        if layout.te_norms:
            te.append(f"{layer}.self_attention.core_attention")
            te += [f"{layer}.self_attention.{n}" for n in ("q_layernorm", "k_layernorm")
                   if f"{layer}.self_attention.{n}.weight" in state]
        if layer not in moe_layers:
            linears += [f"{layer}.mlp.linear_fc1", f"{layer}.mlp.linear_fc2"]
            continue
        if layout.te_norms:
            te.append(f"{layer}.pre_mlp_layernorm")
        if f"{layer}.mlp.shared_experts.linear_fc1.weight" in state:
            linears += [f"{layer}.mlp.shared_experts.linear_fc1", f"{layer}.mlp.shared_experts.linear_fc2"]
        p = f"{layer}.mlp.experts"
        if layout.experts == "sequential":
            linears += [f"{p}.local_experts.{e}.{fc}" for e in range(state[f"{p}.weight1"].shape[0])
                        for fc in ("linear_fc1", "linear_fc2")]
        elif layout.experts == "te_grouped":
            te += [f"{p}.linear_fc1", f"{p}.linear_fc2"]
    if any(k.startswith("decoder.final_layernorm.") for k in state):  # the last pipeline stage
        if layout.te_norms:
            te.append("decoder.final_layernorm")
        megatron_own.append("output_layer")  # exists in Megatron-Core's GPTModel even with tied embeddings
    out: dict[str, Any] = {f"{m}._extra_state": None for m in megatron_own}
    out.update({f"{m}._extra_state": torch.empty(0, dtype=torch.uint8) for m in te})
    return out


# ---------------------------------------------------------------------------- pipeline stages

# Megatron-LM's `args` describing the layer split, at P = 1 (`megatron_args` overrides with the run's).
PIPELINE_ARGS_P1 = dict(
    pipeline_model_parallel_size=1, virtual_pipeline_model_parallel_size=None,
    num_layers_per_virtual_pipeline_stage=None, decoder_first_pipeline_num_layers=None,
    decoder_last_pipeline_num_layers=None, account_for_embedding_in_pipeline_split=False,
    account_for_loss_in_pipeline_split=False)
WORD_EMBEDDING = "embedding.word_embeddings.weight"
TIED_OUTPUT = "output_layer.weight"  # Megatron's name for the last stage's copy of a tied word embedding
_LAYER_INDEX = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


def pipeline_args(pipeline: "PipelineLayout", per_virtual_stage: Optional[int] = None,
                  first: Optional[int] = None, last: Optional[int] = None, account_for_embedding: bool = False,
                  account_for_loss: bool = False) -> dict[str, Any]:
    """The `args` attributes Megatron-LM keeps for a layer split (the flags that built `pipeline`)."""
    if pipeline.num_stages == 1:
        return dict(PIPELINE_ARGS_P1)
    return dict(pipeline_model_parallel_size=pipeline.num_stages,
                virtual_pipeline_model_parallel_size=pipeline.num_chunks if pipeline.num_chunks > 1 else None,
                num_layers_per_virtual_pipeline_stage=per_virtual_stage,
                decoder_first_pipeline_num_layers=first, decoder_last_pipeline_num_layers=last,
                account_for_embedding_in_pipeline_split=account_for_embedding,
                account_for_loss_in_pipeline_split=account_for_loss)


def pipeline_from_args(args: Optional[argparse.Namespace], num_layers: int) -> "PipelineLayout":
    """The layer split a checkpoint's `args` (ours or Megatron-LM's) describe; P = 1 without them.
    ValueError naming the setting when it does not describe one this framework builds."""
    from megatron.core.pipeline_parallel.layout import PipelineLayout

    def get(name, default=None):
        value = getattr(args, name, default) if args is not None else default
        return default if value is None else value

    P = int(get("pipeline_model_parallel_size", 1))
    if P == 1:
        return PipelineLayout(1, 1, (num_layers,))
    if get("pipeline_model_parallel_layout") is not None:
        raise ValueError("the checkpoint was saved with --pipeline-model-parallel-layout, which this framework "
                         "does not read")
    V = getattr(args, "virtual_pipeline_model_parallel_size", None)
    per_virtual = None if V is not None else getattr(args, "num_layers_per_virtual_pipeline_stage", None)
    return PipelineLayout.build(num_layers, P, V, per_virtual, getattr(args, "decoder_first_pipeline_num_layers", None),
                                getattr(args, "decoder_last_pipeline_num_layers", None),
                                bool(get("account_for_embedding_in_pipeline_split", False)),
                                bool(get("account_for_loss_in_pipeline_split", False)))


def describe_pipeline(pipeline: "PipelineLayout") -> str:
    return (f"pipeline size {pipeline.num_stages}, {pipeline.num_chunks} chunk(s) a rank, "
            f"layers per virtual stage {list(pipeline.layer_counts)}")


def chunk_of(name: str, pipeline: "PipelineLayout", pp_rank: int, tied: bool) -> Optional[int]:
    """Which model chunk of pipeline rank `pp_rank` holds tensor `name` (our global name), or None:
    a layer its stage; the embedding the first stage (the word embedding also the last stage when
    tied); the final norm and output layer the last stage. Other names: the first stage."""
    P, V = pipeline.num_stages, pipeline.num_chunks
    match = _LAYER_INDEX.match(name)
    if match is not None:
        k = pipeline.stage_of_layer(int(match.group(1)))
        return k // P if k % P == pp_rank else None
    if name.startswith("embedding."):
        if pp_rank == 0:
            return 0
        return V - 1 if tied and name == WORD_EMBEDDING and pp_rank == P - 1 else None
    if name.startswith(("decoder.final_layernorm.", "output_layer.")):
        return V - 1 if pp_rank == P - 1 else None
    return 0 if pp_rank == 0 else None


def split_pipeline_chunks(state: Mapping[str, Any], pipeline: "PipelineLayout", pp_rank: int,
                          tied: bool) -> list[dict[str, Any]]:
    """Megatron's per-chunk state dicts of pipeline rank `pp_rank`, from our state dict (this rank's
    or the whole model's; global layer numbers): each chunk's layers numbered from 0, the tied
    copy of the word embedding on the last stage (not also the first) named `output_layer.weight`."""
    P = pipeline.num_stages
    chunks: list[dict[str, Any]] = [{} for _ in range(pipeline.num_chunks)]
    for name, t in state.items():
        v = chunk_of(name, pipeline, pp_rank, tied)
        if v is None:
            continue
        match = _LAYER_INDEX.match(name)
        if match is not None:
            local = int(match.group(1)) - pipeline.layers(v * P + pp_rank).start
            name = f"decoder.layers.{local}.{match.group(2)}"
        elif name == WORD_EMBEDDING and pp_rank != 0:
            name = TIED_OUTPUT
        chunks[v][name] = t
    return chunks


def merge_pipeline_chunks(chunks: list[Mapping[str, Any]], pipeline: "PipelineLayout", pp_rank: int,
                          tied: bool, source: str) -> dict[str, Any]:
    """Inverse of `split_pipeline_chunks`: one state dict with global layer numbers (and the tied
    `output_layer.weight` as `embedding.word_embeddings.weight`). ValueError naming `source` when
    a chunk holds more layers than its stage has."""
    P = pipeline.num_stages
    out: dict[str, Any] = {}
    for v, chunk in enumerate(chunks):
        k = v * P + pp_rank
        layers = pipeline.layers(k)
        for name, t in chunk.items():
            match = _LAYER_INDEX.match(name)
            if match is not None:
                local = int(match.group(1))
                if local >= len(layers):
                    entry = "model" if len(chunks) == 1 else f"model{v}"
                    raise ValueError(f"{source}: '{entry}' holds decoder.layers.{local}, but virtual pipeline stage "
                                     f"{k} has {len(layers)} layers ({describe_pipeline(pipeline)})")
                name = f"decoder.layers.{layers[local]}.{match.group(2)}"
            elif name == TIED_OUTPUT and tied and pipeline.is_last(k) and not pipeline.is_first(k):
                name = WORD_EMBEDDING
            out[name] = t
    return out


# ---------------------------------------------------------------------------- args


def megatron_args(args: Optional[argparse.Namespace], model: "ModelConfig", **run: Any) -> argparse.Namespace:
    """The `args` entry of a checkpoint: a copy of the flag namespace `args` (or an empty one) with
    what Megatron-LM reads from a checkpoint set to the values in effect, under Megatron's names:
    the model shape (its `check_checkpoint_args` and `--use-checkpoint-args`), T = ETP = 1, P = 1
    unless the run values given as keywords say otherwise (`pipeline_args`; parallel sizes,
    `sequence_parallel`, iteration, `consumed_train_samples`, ...). `padded_vocab_size` is the
    whole vocabulary (already padded for the run's T)."""
    moe = model.moe
    saved = argparse.Namespace(**vars(args)) if args is not None else argparse.Namespace()
    vars(saved).update(
        num_layers=model.num_layers, hidden_size=model.hidden_size, ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads, num_query_groups=model.num_query_groups,
        group_query_attention=model.num_query_groups != model.num_attention_heads, kv_channels=model.kv_channels,
        seq_length=model.seq_length, max_position_embeddings=model.max_position_embeddings,
        position_embedding_type=model.position_embedding_type,
        add_position_embedding=getattr(saved, "add_position_embedding", True),
        rotary_base=int(model.rotary_base), rotary_percent=model.rotary_percent, rotary_interleaved=False,
        normalization=model.normalization, norm_epsilon=model.norm_epsilon, apply_layernorm_1p=False,
        swiglu=model.swiglu, squared_relu=False,
        untie_embeddings_and_output_weights=model.untie_embeddings_and_output_weights,
        add_bias_linear=model.add_bias_linear, add_qkv_bias=model.add_qkv_bias, qk_layernorm=model.qk_layernorm,
        padded_vocab_size=model.vocab_size,
        num_experts=moe and moe.num_experts, moe_ffn_hidden_size=moe and moe.ffn_hidden_size,
        moe_layer_freq=list(moe.layer_pattern) if moe else 1,
        moe_router_topk=moe.router_topk if moe else getattr(saved, "moe_router_topk", 2),
        tensor_model_parallel_size=1, context_parallel_size=1, expert_tensor_parallel_size=1, sequence_parallel=False,
        **PIPELINE_ARGS_P1,
    )
    vars(saved).update(run)
    return saved


# ---------------------------------------------------------------------------- Megatron -> ours


def detect_layout(keys_and_shapes: Mapping[str, Any]) -> Layout:
    """The layout of a legacy checkpoint's model state dict, from its names and shapes.

    ValueError when it mixes expert implementations or norm namings."""
    te_norms = any(k.endswith(".self_attention.linear_qkv.layer_norm_weight") for k in keys_and_shapes)
    local_norms = any(k.endswith(".input_layernorm.weight") for k in keys_and_shapes)
    found = set()
    for key, value in keys_and_shapes.items():
        if ".mlp.experts.local_experts." in key:
            found.add("sequential")
        elif re.search(r"\.mlp\.experts\.linear_fc1\.weight\d+$", key):
            found.add("te_grouped")
        elif key.endswith(".mlp.experts.weight1"):
            found.add("native" if len(_shape(value)) == 3 else "grouped")
    if len(found) > 1 or (te_norms and local_norms):
        parts = sorted(found) + (["local and Transformer Engine norm names"] if te_norms and local_norms else [])
        raise ValueError(f"the model state mixes layouts ({', '.join(parts)})")
    experts = found.pop() if found else "sequential"  # a dense model: any Megatron layout
    return Layout(experts, te_norms)


def _shape(value) -> tuple:
    return tuple(getattr(value, "shape", value))


def from_megatron(state: Mapping[str, Any], num_local_experts: int, source: str) -> tuple[dict[str, Tensor], Layout]:
    """Our native state dict from a legacy checkpoint's (any layout, detected), and that layout.

    `num_local_experts`: experts per MoE layer in this rank's file. `_extra_state` entries are
    dropped unread. ValueError naming `source` and every Megatron tensor an MoE layer lacks;
    tensors left over (e.g. experts beyond `num_local_experts`) stay, under their own names.
    """
    state = {k: v for k, v in state.items() if not is_extra_state(k)}
    try:
        layout = detect_layout(state)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    if layout.experts == "native":
        return state, layout
    if layout.te_norms:
        state = {_unfuse_norm_name(k): v for k, v in state.items()}
    moe_layers = sorted(k.rsplit(".mlp.router.weight", 1)[0] for k in state if k.endswith(".mlp.router.weight"))
    missing: list[str] = []
    for layer in moe_layers:
        p = f"{layer}.mlp.experts"
        take = _take_grouped if layout.experts == "grouped" else _take_per_expert
        state.update(take(state, p, layout.experts, num_local_experts, missing, source))
    if missing:
        problems = tensor_mismatches(dict.fromkeys(missing), {})
        raise ValueError(f"{source} ({layout.describe()}) does not hold all experts: {'; '.join(problems)}")
    return state, layout


def _unfuse_norm_name(key: str) -> str:
    layer, rest = _split(key)
    for ours, fused in (TE_INPUT_NORM, TE_PRE_MLP_NORM):
        if layer is not None and rest.startswith(fused):
            return f"{layer}.{ours}{rest[len(fused):]}"
    return key


def _take_per_expert(state: dict, p: str, experts: str, E: int, missing: list[str], source: str) -> dict[str, Tensor]:
    """Pop expert 0..E-1's tensors from `state`; stack them as ours (names of absent ones go to `missing`)."""
    names = [[f"{p}.{n.format(e=e)}" for e in range(E)] for n in PER_EXPERT_NAMES[experts]]
    has_bias = any(k in state for k in names[2] + names[3])
    wanted = names if has_bias else names[:2]
    absent = [k for group in wanted for k in group if k not in state]
    if absent:
        missing += absent
        return {}
    ours = {"weight1": [state.pop(k).t() for k in names[0]], "weight2": [state.pop(k).t() for k in names[1]]}
    if has_bias:
        ours.update(bias1=[state.pop(k) for k in names[2]], bias2=[state.pop(k) for k in names[3]])
    return {f"{p}.{name}": _stack(ts, f"{p}.{name}", source) for name, ts in ours.items()}


def _take_grouped(state: dict, p: str, experts: str, E: int, missing: list[str], source: str) -> dict[str, Tensor]:
    """GroupedMLP's [D, E*2F] / [E*F, D] tensors seen as ours [E, D, 2F] / [E, F, D]."""
    keys = [f"{p}.{n}" for n in GROUPED_NAMES]
    absent = [k for k in keys if k not in state]
    if absent:
        missing += absent
        return {}
    w1, w2 = state.pop(keys[0]), state.pop(keys[1])
    D = w1.shape[0]
    if w1.dim() != 2 or w2.dim() != 2 or w1.shape[1] % E or w2.shape[0] % E or w2.shape[1] != D:
        raise ValueError(f"{source}: {keys[0]} {tuple(w1.shape)} and {keys[1]} {tuple(w2.shape)} are not "
                         f"GroupedMLP weights of {E} experts of width {D}")
    return {keys[0]: w1.contiguous().view(E, D, -1), keys[1]: w2.contiguous().view(E, -1, D)}


def _stack(tensors: list[Tensor], name: str, source: str) -> Tensor:
    try:
        return torch.stack(tensors).contiguous()
    except RuntimeError:
        shapes = sorted({tuple(t.shape) for t in tensors})
        raise ValueError(f"{source}: the experts of {name} have different shapes {shapes}") from None
