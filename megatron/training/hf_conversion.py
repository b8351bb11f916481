"""Hugging Face <-> Megatron conversion of configs and state dicts (no file I/O, no transformers).

Supported Hugging Face architectures (`model_type` in config.json):

    llama      LlamaForCausalLM        dense, GQA, RoPE, RMSNorm, SwiGLU
    qwen3      Qwen3ForCausalLM        llama + per-head q/k RMSNorm  (ours: --qk-layernorm)
    mixtral    MixtralForCausalLM      every layer MoE, softmax over the chosen top-k
    qwen3_moe  Qwen3MoeForCausalLM     MoE (+ dense `mlp_only_layers`), per-head q/k norm;
                                       norm_topk_prob=false is ours --moe-router-pre-softmax

Not supported (`UNSUPPORTED` says why): qwen2_moe (sigmoid-gated shared expert), olmoe (q/k
norm over the whole projection, not per head).

Tensor layouts (ours <- HF):
    linear_qkv [(H+2G)d, D]   per KV group g: its H/G query heads, then key head g, then value
                              head g, from q_proj [Hd, D], k_proj [Gd, D], v_proj [Gd, D].
                              Query head h uses KV head h // (H/G) on both sides.
    linear_fc1 [2F, D]        cat(gate_proj, up_proj) along the output dim.
    experts.weight1 [E, D, 2F] x @ weight1[e] = [gate | up]: HF fused gate_up_proj [E, 2F, D]
                              transposed, or per expert cat(w1|gate_proj, w3|up_proj).T.
    experts.weight2 [E, F, D] HF fused down_proj [E, D, F] transposed, or per expert w2.T.
    RoPE                      both sides rotate halves (dim i pairs with i + d/2): no permutation.

A tensor missing from, or left over in, the input is an error naming it: nothing is silently
skipped or left uninitialised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from megatron.core.config import ModelConfig
from megatron.core.dist_checkpointing import tensor_mismatches

Tensor = torch.Tensor

# --------------------------------------------------------------------------- architecture table


@dataclass(frozen=True)
class FusedExperts:
    """transformers-5 in-memory layout: one [E, 2F, D] and one [E, D, F] tensor per layer."""

    router: str
    gate_up: str
    down: str


@dataclass(frozen=True)
class PerExpertExperts:
    """Hub (and transformers save_pretrained) layout: three 2-D tensors per expert ({e})."""

    router: str
    gate: str
    up: str
    down: str


ExpertKeys = FusedExperts | PerExpertExperts

EXPERT_LAYOUTS = ("per_expert", "fused")


@dataclass(frozen=True)
class HFArchitecture:
    """What differs between the supported Hugging Face architectures."""

    model_type: str
    class_name: str
    qk_layernorm: bool
    """Per-head RMSNorm of q and k (`q_norm`/`k_norm` [head_dim])."""
    experts: Mapping[str, ExpertKeys] = field(default_factory=dict)
    """Expert key templates by layout name; empty for a dense architecture."""
    expert_ffn_key: str = "intermediate_size"
    """config.json key of each expert's FFN size."""
    dense_ffn_key: Optional[str] = "intermediate_size"
    """config.json key of the dense FFN size; None when the architecture has no dense layers."""
    renormalize_key: Optional[str] = None
    """config.json switch saying whether top-k probabilities are renormalised; None: always are."""
    sparse_layer_keys: bool = False
    """Whether `mlp_only_layers` / `decoder_sparse_step` choose which layers are MoE."""
    must_be_off: tuple[str, ...] = ()
    """config.json switches with no equivalent here: converting needs them false/absent."""
    jitter_key: Optional[str] = None
    """config.json key of the router's multiplicative input noise (ours --moe-input-jitter-eps)."""
    fixed: Mapping[str, Any] = field(default_factory=dict)
    """config.json entries always written with these values (features we never use)."""

    @property
    def is_moe(self) -> bool:
        return bool(self.experts)


_FUSED = FusedExperts(
    router="model.layers.{i}.mlp.gate.weight",
    gate_up="model.layers.{i}.mlp.experts.gate_up_proj",
    down="model.layers.{i}.mlp.experts.down_proj",
)

ARCHITECTURES: dict[str, HFArchitecture] = {
    "llama": HFArchitecture("llama", "LlamaForCausalLM", qk_layernorm=False,
                            must_be_off=("attention_bias", "mlp_bias")),
    "qwen3": HFArchitecture("qwen3", "Qwen3ForCausalLM", qk_layernorm=True,
                            must_be_off=("attention_bias", "use_sliding_window")),
    "mixtral": HFArchitecture(
        "mixtral", "MixtralForCausalLM", qk_layernorm=False, dense_ffn_key=None,
        jitter_key="router_jitter_noise", fixed={"sliding_window": None},
        experts={
            "fused": _FUSED,
            "per_expert": PerExpertExperts(
                router="model.layers.{i}.block_sparse_moe.gate.weight",
                gate="model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight",
                up="model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight",
                down="model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight",
            ),
        },
    ),
    "qwen3_moe": HFArchitecture(
        "qwen3_moe", "Qwen3MoeForCausalLM", qk_layernorm=True,
        experts={
            "fused": _FUSED,
            "per_expert": PerExpertExperts(
                router="model.layers.{i}.mlp.gate.weight",
                gate="model.layers.{i}.mlp.experts.{e}.gate_proj.weight",
                up="model.layers.{i}.mlp.experts.{e}.up_proj.weight",
                down="model.layers.{i}.mlp.experts.{e}.down_proj.weight",
            ),
        },
        expert_ffn_key="moe_intermediate_size", renormalize_key="norm_topk_prob", sparse_layer_keys=True,
        must_be_off=("attention_bias", "use_sliding_window"),
    ),
}

UNSUPPORTED: dict[str, str] = {
    "qwen2_moe": "its shared expert is scaled by a learned sigmoid gate (shared_expert_gate), which this "
                 "framework's shared experts do not have",
    "olmoe": "its q_norm/k_norm normalise the whole projected q/k (hidden_size wide), while --qk-layernorm "
             "normalises each head",
}

# Our (is MoE, --qk-layernorm) -> the Hugging Face architecture that writes it.
_ARCH_OF_OURS: dict[tuple[bool, bool], str] = {
    (False, False): "llama",
    (False, True): "qwen3",
    (True, False): "mixtral",
    (True, True): "qwen3_moe",
}

# Placeholder run flags: a converted checkpoint carries no training setup, but `config_from_args`
# needs one. Training runs that load the checkpoint pass their own.
RUN_FLAGS = ("--micro-batch-size", "1", "--train-iters", "1", "--lr", "0.0", "--mock-data")

# config.json fields that describe the tokenizer, not the weights: carried through a round trip.
PASSTHROUGH_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def architecture_of(hf_config: Mapping[str, Any]) -> HFArchitecture:
    """The table entry for config.json's `model_type`; ValueError naming it if unsupported."""
    model_type = hf_config.get("model_type")
    if model_type in UNSUPPORTED:
        raise ValueError(f"config.json: model_type {model_type!r} is not supported: {UNSUPPORTED[model_type]}")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"config.json: model_type {model_type!r} is not supported "
                         f"(supported: {', '.join(sorted(ARCHITECTURES))})")
    return ARCHITECTURES[model_type]


def infer_architecture(model_config: ModelConfig) -> str:
    """The Hugging Face `model_type` that holds a model of this config (before feature checks)."""
    return _ARCH_OF_OURS[(model_config.moe is not None, model_config.qk_layernorm)]


def _arch(model_config: ModelConfig, architecture: Optional[str]) -> HFArchitecture:
    name = architecture or infer_architecture(model_config)
    if name not in ARCHITECTURES:
        raise ValueError(f"--hf-architecture {name!r} is not supported (supported: {', '.join(sorted(ARCHITECTURES))})")
    return ARCHITECTURES[name]


# --------------------------------------------------------------------------- HF config -> ours


def as_dict(hf_config: Any) -> dict:
    """config.json contents from a dict or a transformers `PretrainedConfig`."""
    return dict(hf_config.to_dict() if hasattr(hf_config, "to_dict") else hf_config)


def _required(hf: Mapping[str, Any], key: str):
    if hf.get(key) is None:
        raise ValueError(f"config.json: {key!r} is missing")
    return hf[key]


def _first(hf: Mapping[str, Any], *keys: str):
    for key in keys:
        if hf.get(key) is not None:
            return hf[key]
    raise ValueError(f"config.json: {' or '.join(repr(k) for k in keys)} is missing")


def _rope_theta(hf: Mapping[str, Any]) -> float:
    """RoPE base from `rope_parameters` (transformers 5) or `rope_theta` (older); default RoPE only."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or params.get("type") or scaling.get("rope_type") or scaling.get("type")
    if rope_type not in (None, "default"):
        raise ValueError(f"config.json: rope_type {rope_type!r} is not supported; only default RoPE converts")
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"config.json: partial_rotary_factor {partial} is not supported; only 1.0 converts")
    theta = params.get("rope_theta", hf.get("rope_theta"))
    if theta is None:
        raise ValueError("config.json: 'rope_parameters.rope_theta' (or 'rope_theta') is missing")
    return float(theta)


def _check_hf_switches(hf: Mapping[str, Any], arch: HFArchitecture) -> None:
    """Reject config.json settings that change the function computed and that we cannot express."""
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act {hf.get('hidden_act')!r} is not supported; only silu (SwiGLU)")
    for key in arch.must_be_off:
        if hf.get(key):
            raise ValueError(f"config.json: {key}={hf[key]!r} is not supported; it must be false")
    window = hf.get("sliding_window")
    if "use_sliding_window" not in arch.must_be_off and window is not None \
            and window < _required(hf, "max_position_embeddings"):
        raise ValueError(f"config.json: sliding_window={window} is not supported (no sliding-window attention)")
    layer_types = hf.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        raise ValueError("config.json: layer_types other than full_attention are not supported")


def _moe_layer_pattern(hf: Mapping[str, Any], arch: HFArchitecture, num_layers: int) -> list[int]:
    """Per layer 1 for MoE, 0 for dense (Qwen's mlp_only_layers / decoder_sparse_step)."""
    if not arch.sparse_layer_keys:
        return [1] * num_layers
    dense = set(hf.get("mlp_only_layers") or [])
    step = hf.get("decoder_sparse_step") or 1
    return [int(i not in dense and (i + 1) % step == 0) for i in range(num_layers)]


def _fmt(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def hf_config_to_flags(hf_config: Any) -> list[str]:
    """Our model flags (Megatron-LM names) for a Hugging Face config.json.

    The vocabulary is kept exact: `--make-vocab-size-divisible-by 1`, and `--tokenizer-type
    NullTokenizer --vocab-size V-1` for config.json's `vocab_size` V, since NullTokenizer adds an
    end-of-document id after its `--vocab-size` ids (a later `--tokenizer-type` overrides it; the
    vocabulary then comes from that tokenizer and must have V entries). Dropout is off and
    `--seq-length` is the model's `max_position_embeddings`. Raises ValueError naming the
    config.json field that cannot be converted.
    """
    hf = as_dict(hf_config)
    arch = architecture_of(hf)
    _check_hf_switches(hf, arch)
    num_layers = _required(hf, "num_hidden_layers")
    hidden = _required(hf, "hidden_size")
    heads = _required(hf, "num_attention_heads")
    groups = hf.get("num_key_value_heads") or heads
    head_dim = hf.get("head_dim") or hidden // heads
    theta = _rope_theta(hf)
    if theta != int(theta):
        raise ValueError(f"config.json: rope_theta {theta} is not an integer, which --rotary-base requires")
    max_pos = _required(hf, "max_position_embeddings")
    flags = [
        "--num-layers", num_layers, "--hidden-size", hidden, "--num-attention-heads", heads,
        "--kv-channels", head_dim, "--group-query-attention", "--num-query-groups", groups,
        "--seq-length", max_pos, "--max-position-embeddings", max_pos,
        "--position-embedding-type", "rope", "--rotary-base", int(theta),
        "--normalization", "RMSNorm", "--norm-epsilon", float(_first(hf, "rms_norm_eps")),
        "--swiglu", "--disable-bias-linear",
        "--hidden-dropout", 0.0, "--attention-dropout", float(hf.get("attention_dropout") or 0.0),
        "--init-method-std", float(hf.get("initializer_range") or 0.02),
        "--tokenizer-type", "NullTokenizer", "--vocab-size", _required(hf, "vocab_size") - 1,
        "--make-vocab-size-divisible-by", 1,
    ]
    if not hf.get("tie_word_embeddings", False):
        flags.append("--untie-embeddings-and-output-weights")
    if arch.qk_layernorm:
        flags.append("--qk-layernorm")
    expert_ffn = _required(hf, arch.expert_ffn_key) if arch.is_moe else None
    dense_ffn = _required(hf, arch.dense_ffn_key) if arch.dense_ffn_key else expert_ffn
    flags += ["--ffn-hidden-size", dense_ffn]
    if arch.is_moe:
        flags += _moe_flags(hf, arch, num_layers, expert_ffn)
    return [_fmt(f) for f in flags]


def _moe_flags(hf: Mapping[str, Any], arch: HFArchitecture, num_layers: int, expert_ffn: int) -> list:
    pattern = _moe_layer_pattern(hf, arch, num_layers)
    flags = [
        "--num-experts", _first(hf, "num_local_experts", "num_experts"),
        "--moe-ffn-hidden-size", expert_ffn,
        "--moe-router-topk", _required(hf, "num_experts_per_tok"),
        "--moe-layer-freq", 1 if all(pattern) else "[" + ",".join(map(str, pattern)) + "]",
        "--moe-aux-loss-coeff", float(hf.get("router_aux_loss_coef") or 0.0),
    ]
    if arch.renormalize_key is not None and not hf.get(arch.renormalize_key, False):
        flags.append("--moe-router-pre-softmax")  # softmax over all E, top-k kept as is
    if arch.jitter_key is not None and hf.get(arch.jitter_key):
        flags += ["--moe-input-jitter-eps", float(hf[arch.jitter_key])]
    return flags


def config_from_hf_config(hf_config: Any, extra_flags: Sequence[str] = ()):
    """(args namespace, validated Config) for a Hugging Face config, with placeholder run flags.

    `extra_flags` come last and override. The namespace rebuilds the same Config through
    `config_from_args(args, world_size=1)`.
    """
    from megatron.training.arguments import config_from_args, parse_args

    args = parse_args([*hf_config_to_flags(hf_config), *RUN_FLAGS, *extra_flags])
    return args, config_from_args(args, world_size=1)


# --------------------------------------------------------------------------- ours -> HF config


def _representability_problems(mc: ModelConfig, arch: HFArchitecture) -> list[str]:
    """Every setting of `mc` that `arch` cannot express, each naming our flag."""
    checks = [
        (mc.position_embedding_type != "rope", f"--position-embedding-type {mc.position_embedding_type} (need rope)"),
        (mc.normalization != "RMSNorm", f"--normalization {mc.normalization} (need RMSNorm)"),
        (not mc.swiglu, "no --swiglu (need SwiGLU)"),
        (mc.add_bias_linear, "linear biases (need --disable-bias-linear)"),
        (mc.add_qkv_bias, "--add-qkv-bias"),
        (mc.rotary_percent != 1.0, f"--rotary-percent {mc.rotary_percent} (need 1.0)"),
        (mc.qk_layernorm != arch.qk_layernorm,
         f"--qk-layernorm is {'off' if arch.qk_layernorm else 'on'} but {arch.model_type} "
         f"{'has' if arch.qk_layernorm else 'has no'} q/k norms"),
        ((mc.moe is not None) != arch.is_moe,
         f"{arch.model_type} is {'an MoE' if arch.is_moe else 'a dense'} architecture "
         f"but --num-experts is {'unset' if mc.moe is None else 'set'}"),
    ]
    moe = mc.moe
    if moe is not None and arch.is_moe:
        checks += [
            (moe.score_function != "softmax", f"--moe-router-score-function {moe.score_function} (need softmax)"),
            (moe.topk_scaling_factor is not None, "--moe-router-topk-scaling-factor"),
            (moe.shared_expert_ffn_hidden_size is not None, "--moe-shared-expert-intermediate-size (shared experts)"),
            (moe.enable_expert_bias, "--moe-router-enable-expert-bias (expert bias changes routing)"),
            (moe.router_type != "topk", f"--moe-router-type {moe.router_type} (need topk)"),
            (moe.group_topk is not None, "--moe-router-num-groups/--moe-router-group-topk (group-limited routing)"),
            (moe.load_balancing_type == "sinkhorn", "--moe-router-load-balancing-type sinkhorn (its evaluation routing "
             "is not checked against the HF routers)"),
            (moe.pre_softmax and arch.renormalize_key is None,
             f"--moe-router-pre-softmax ({arch.model_type} renormalises the top-k probabilities)"),
            (not all(moe.layer_pattern) and not arch.sparse_layer_keys,
             f"--moe-layer-freq with dense layers ({arch.model_type} has only MoE layers)"),
        ]
    return [message for bad, message in checks if bad]


def check_representable(model_config: ModelConfig, architecture: Optional[str] = None) -> HFArchitecture:
    """The target architecture; ValueError naming every flag it cannot express."""
    arch = _arch(model_config, architecture)
    problems = _representability_problems(model_config, arch)
    if problems:
        raise ValueError(f"cannot convert to Hugging Face {arch.class_name}: " + "; ".join(problems))
    return arch


def model_config_to_hf_config(model_config: ModelConfig, architecture: Optional[str] = None,
                              vocab_size: Optional[int] = None, dtype: Optional[torch.dtype] = None,
                              passthrough: Optional[Mapping[str, Any]] = None) -> dict:
    """config.json contents for `model_config` (plain JSON types; transformers not needed).

    vocab_size: rows written (default: our padded `model_config.vocab_size`). dtype: recorded as
    `dtype` / `torch_dtype`. passthrough: a previous config.json whose tokenizer ids
    (PASSTHROUGH_KEYS) are copied. Raises ValueError naming what cannot be expressed.
    """
    mc = model_config
    arch = check_representable(mc, architecture)
    hf: dict[str, Any] = {
        "architectures": [arch.class_name],
        "model_type": arch.model_type,
        "vocab_size": vocab_size or mc.vocab_size,
        "hidden_size": mc.hidden_size,
        "num_hidden_layers": mc.num_layers,
        "num_attention_heads": mc.num_attention_heads,
        "num_key_value_heads": mc.num_query_groups,
        "head_dim": mc.kv_channels,
        "hidden_act": "silu",
        "max_position_embeddings": mc.max_position_embeddings,
        "rms_norm_eps": mc.norm_epsilon,
        "rope_parameters": {"rope_type": "default", "rope_theta": mc.rotary_base},
        "rope_theta": mc.rotary_base,  # for transformers < 5
        "tie_word_embeddings": not mc.untie_embeddings_and_output_weights,
        "attention_dropout": mc.attention_dropout,
        "initializer_range": mc.init_method_std,
        "use_cache": True,
    }
    hf.update({key: False for key in arch.must_be_off}, **arch.fixed)
    if arch.is_moe:
        hf.update(_moe_hf_config(mc, arch))
    else:
        hf["intermediate_size"] = mc.ffn_hidden_size
    if dtype is not None:
        hf["dtype"] = hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    for key in PASSTHROUGH_KEYS:
        if passthrough and key in passthrough:
            hf[key] = passthrough[key]
    return hf


def _moe_hf_config(mc: ModelConfig, arch: HFArchitecture) -> dict:
    moe = mc.moe
    hf = {
        "num_local_experts": moe.num_experts,
        "num_experts": moe.num_experts,
        "num_experts_per_tok": moe.router_topk,
        "router_aux_loss_coef": moe.aux_loss_coeff,
        "output_router_logits": False,
        arch.expert_ffn_key: moe.ffn_hidden_size,
    }
    if arch.jitter_key is not None:
        hf[arch.jitter_key] = moe.input_jitter_eps or 0.0
    if arch.dense_ffn_key and arch.dense_ffn_key != arch.expert_ffn_key:
        hf[arch.dense_ffn_key] = mc.ffn_hidden_size
    if arch.renormalize_key is not None:
        hf[arch.renormalize_key] = not moe.pre_softmax
    if arch.sparse_layer_keys:
        hf["decoder_sparse_step"] = 1
        hf["mlp_only_layers"] = [i for i, is_moe in enumerate(moe.layer_pattern) if not is_moe]
    return hf


# --------------------------------------------------------------------------- our tensor shapes


def megatron_param_shapes(model_config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in `GPTModel(model_config).state_dict()` (EP = 1).

    Computed without building the model, so that checkpoints too big for memory can be checked.
    """
    mc = model_config
    V, D, H, G, d = mc.vocab_size, mc.hidden_size, mc.num_attention_heads, mc.num_query_groups, mc.kv_channels
    shapes: dict[str, tuple[int, ...]] = {"embedding.word_embeddings.weight": (V, D)}
    if mc.position_embedding_type == "learned_absolute":
        shapes["embedding.position_embeddings.weight"] = (mc.max_position_embeddings, D)

    def norm(prefix: str, dim: int) -> None:
        shapes[f"{prefix}.weight"] = (dim,)
        if mc.normalization == "LayerNorm":
            shapes[f"{prefix}.bias"] = (dim,)

    def linear(prefix: str, out: int, inp: int, bias: bool) -> None:
        shapes[f"{prefix}.weight"] = (out, inp)
        if bias:
            shapes[f"{prefix}.bias"] = (out,)

    def mlp(prefix: str, ffn: int) -> None:
        linear(f"{prefix}.linear_fc1", 2 * ffn if mc.swiglu else ffn, D, mc.add_bias_linear)
        linear(f"{prefix}.linear_fc2", D, ffn, mc.add_bias_linear)

    for i in range(mc.num_layers):
        p = f"decoder.layers.{i}"
        norm(f"{p}.input_layernorm", D)
        linear(f"{p}.self_attention.linear_qkv", (H + 2 * G) * d, D, mc.qkv_bias)
        linear(f"{p}.self_attention.linear_proj", D, H * d, mc.add_bias_linear)
        if mc.qk_layernorm:
            norm(f"{p}.self_attention.q_layernorm", d)
            norm(f"{p}.self_attention.k_layernorm", d)
        norm(f"{p}.pre_mlp_layernorm", D)
        if mc.moe is None or not mc.moe.is_moe_layer(i):
            mlp(f"{p}.mlp", mc.ffn_hidden_size)
            continue
        moe = mc.moe
        E, F_ = moe.num_experts, moe.ffn_hidden_size
        shapes[f"{p}.mlp.router.weight"] = (E, D)
        if mc.add_bias_linear:
            shapes[f"{p}.mlp.router.bias"] = (E,)
        if moe.enable_expert_bias:
            shapes[f"{p}.mlp.router.expert_bias"] = (E,)
        fc1 = 2 * F_ if mc.swiglu else F_
        shapes[f"{p}.mlp.experts.weight1"] = (E, D, fc1)
        shapes[f"{p}.mlp.experts.weight2"] = (E, F_, D)
        if mc.add_bias_linear:
            shapes[f"{p}.mlp.experts.bias1"] = (E, fc1)
            shapes[f"{p}.mlp.experts.bias2"] = (E, D)
        if moe.shared_expert_ffn_hidden_size:
            mlp(f"{p}.mlp.shared_experts", moe.shared_expert_ffn_hidden_size)
    norm("decoder.final_layernorm", D)
    if mc.untie_embeddings_and_output_weights:
        shapes["output_layer.weight"] = (V, D)
    return shapes


def check_state_dict(state_dict: Mapping[str, Tensor], model_config: ModelConfig, what: str) -> None:
    """ValueError naming every missing, unexpected or mis-shaped tensor of our state dict."""
    problems = tensor_mismatches(megatron_param_shapes(model_config), {k: tuple(v.shape) for k, v in state_dict.items()})
    if problems:
        raise ValueError(f"{what} does not match the model config: " + "; ".join(problems))


# --------------------------------------------------------------------------- tensor maps


@dataclass(frozen=True)
class TensorMap:
    """Our tensors `ours` <-> Hugging Face tensors `hf`; `to_ours` and `to_hf` are inverses."""

    ours: tuple[str, ...]
    hf: tuple[str, ...]
    to_ours: Callable[[list[Tensor]], list[Tensor]]
    to_hf: Callable[[list[Tensor]], list[Tensor]]


def _same(ts: list[Tensor]) -> list[Tensor]:
    return ts


def rename(ours: str, hf: str) -> TensorMap:
    return TensorMap((ours,), (hf,), _same, _same)


def qkv_map(ours: str, q: str, k: str, v: str, heads: int, groups: int, head_dim: int) -> TensorMap:
    """linear_qkv [(H+2G)d, X] <-> q [Hd, X], k [Gd, X], v [Gd, X] (X = D, or absent for a bias)."""
    per_group = heads // groups

    def to_ours(ts: list[Tensor]) -> list[Tensor]:
        tq, tk, tv = ts
        rest = tq.shape[1:]
        parts = [tq.reshape(groups, per_group * head_dim, *rest),
                 tk.reshape(groups, head_dim, *rest), tv.reshape(groups, head_dim, *rest)]
        return [torch.cat(parts, dim=1).reshape((heads + 2 * groups) * head_dim, *rest)]

    def to_hf(ts: list[Tensor]) -> list[Tensor]:
        (qkv,) = ts
        rest = qkv.shape[1:]
        grouped = qkv.reshape(groups, (per_group + 2) * head_dim, *rest)
        tq, tk, tv = grouped.split([per_group * head_dim, head_dim, head_dim], dim=1)
        return [tq.reshape(heads * head_dim, *rest).contiguous(), tk.reshape(groups * head_dim, *rest).contiguous(),
                tv.reshape(groups * head_dim, *rest).contiguous()]

    return TensorMap((ours,), (q, k, v), to_ours, to_hf)


def gate_up_map(ours: str, gate: str, up: str) -> TensorMap:
    """linear_fc1 [2F, D] <-> gate_proj [F, D], up_proj [F, D]."""
    return TensorMap((ours,), (gate, up),
                     lambda ts: [torch.cat(ts, dim=0)],
                     lambda ts: [t.contiguous() for t in ts[0].chunk(2, dim=0)])


def transposed_map(ours: str, hf: str) -> TensorMap:
    """ours [E, A, B] <-> hf [E, B, A] (fused expert weights)."""
    flip = lambda ts: [ts[0].transpose(1, 2).contiguous()]  # noqa: E731 - its own inverse
    return TensorMap((ours,), (hf,), flip, flip)


def per_expert_fc1_map(ours: str, gates: list[str], ups: list[str]) -> TensorMap:
    """weight1 [E, D, 2F] <-> E gate [F, D] then E up [F, D] tensors."""
    E = len(gates)

    def to_ours(ts: list[Tensor]) -> list[Tensor]:
        return [torch.stack([torch.cat([g, u], dim=0).t() for g, u in zip(ts[:E], ts[E:])])]

    def to_hf(ts: list[Tensor]) -> list[Tensor]:
        halves = [w.t().chunk(2, dim=0) for w in ts[0]]
        return [h[0].contiguous() for h in halves] + [h[1].contiguous() for h in halves]

    return TensorMap((ours,), (*gates, *ups), to_ours, to_hf)


def per_expert_fc2_map(ours: str, downs: list[str]) -> TensorMap:
    """weight2 [E, F, D] <-> E down [D, F] tensors."""
    return TensorMap((ours,), tuple(downs),
                     lambda ts: [torch.stack([t.t() for t in ts])],
                     lambda ts: [w.t().contiguous() for w in ts[0]])


def _expert_maps(i: int, keys: ExpertKeys, num_experts: int) -> list[TensorMap]:
    p = f"decoder.layers.{i}.mlp"
    maps = [rename(f"{p}.router.weight", keys.router.format(i=i))]
    if isinstance(keys, FusedExperts):
        return maps + [transposed_map(f"{p}.experts.weight1", keys.gate_up.format(i=i)),
                       transposed_map(f"{p}.experts.weight2", keys.down.format(i=i))]
    experts = range(num_experts)
    return maps + [
        per_expert_fc1_map(f"{p}.experts.weight1", [keys.gate.format(i=i, e=e) for e in experts],
                           [keys.up.format(i=i, e=e) for e in experts]),
        per_expert_fc2_map(f"{p}.experts.weight2", [keys.down.format(i=i, e=e) for e in experts]),
    ]


# Keys that are a plain rename on every supported architecture ({i}: layer).
GLOBAL_RENAMES = (
    ("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
    ("decoder.final_layernorm.weight", "model.norm.weight"),
)
OUTPUT_RENAME = ("output_layer.weight", "lm_head.weight")
LAYER_RENAMES = (
    ("decoder.layers.{i}.input_layernorm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("decoder.layers.{i}.self_attention.linear_proj.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("decoder.layers.{i}.pre_mlp_layernorm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
)
QK_NORM_RENAMES = (
    ("decoder.layers.{i}.self_attention.q_layernorm.weight", "model.layers.{i}.self_attn.q_norm.weight"),
    ("decoder.layers.{i}.self_attention.k_layernorm.weight", "model.layers.{i}.self_attn.k_norm.weight"),
)
QKV_KEYS = ("decoder.layers.{i}.self_attention.linear_qkv.weight",
            "model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
            "model.layers.{i}.self_attn.v_proj.weight")
DENSE_FC1_KEYS = ("decoder.layers.{i}.mlp.linear_fc1.weight",
                  "model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight")
DENSE_FC2_RENAME = ("decoder.layers.{i}.mlp.linear_fc2.weight", "model.layers.{i}.mlp.down_proj.weight")


def tensor_maps(model_config: ModelConfig, arch: HFArchitecture, expert_layout: str = "per_expert") -> list[TensorMap]:
    """Every tensor of the model, as maps between our names and the architecture's names."""
    mc = model_config
    if arch.is_moe and expert_layout not in arch.experts:
        raise ValueError(f"--hf-expert-layout must be one of {', '.join(arch.experts)}, got {expert_layout!r}")
    maps = [rename(ours, hf) for ours, hf in GLOBAL_RENAMES]
    if mc.untie_embeddings_and_output_weights:
        maps.append(rename(*OUTPUT_RENAME))
    for i in range(mc.num_layers):
        renames = LAYER_RENAMES + (QK_NORM_RENAMES if arch.qk_layernorm else ())
        maps += [rename(ours.format(i=i), hf.format(i=i)) for ours, hf in renames]
        maps.append(qkv_map(*(k.format(i=i) for k in QKV_KEYS), mc.num_attention_heads,
                            mc.num_query_groups, mc.kv_channels))
        if mc.moe is not None and mc.moe.is_moe_layer(i):
            maps += _expert_maps(i, arch.experts[expert_layout], mc.moe.num_experts)
        else:
            maps.append(gate_up_map(*(k.format(i=i) for k in DENSE_FC1_KEYS)))
            maps.append(rename(*(k.format(i=i) for k in DENSE_FC2_RENAME)))
    return maps


def detect_expert_layout(hf_keys: Sequence[str], model_config: ModelConfig, arch: HFArchitecture) -> str:
    """`fused` or `per_expert`: whichever layout's first-expert down projection the keys hold."""
    if not arch.is_moe:
        return "per_expert"
    first = next(i for i, is_moe in enumerate(model_config.moe.layer_pattern) if is_moe)
    keys = set(hf_keys)
    for name, layout in arch.experts.items():
        if layout.down.format(i=first, e=0) in keys:
            return name
    return "fused"


def _apply(fn: Callable[[list[Tensor]], list[Tensor]], tensors: list[Tensor], names: Sequence[str]) -> list[Tensor]:
    try:
        return fn(tensors)
    except RuntimeError as e:  # a reshape/cat that does not fit: the tensor has the wrong shape
        shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(names[:4], tensors))
        raise ValueError(f"cannot convert {shapes}: {str(e).splitlines()[0]}") from None


def hf_to_megatron_state_dict(hf_state_dict: Mapping[str, Tensor], model_config: ModelConfig,
                              architecture: Optional[str] = None) -> dict[str, Tensor]:
    """Our state dict (GPTModel names and layouts) from a Hugging Face one.

    `hf_state_dict` may be lazy (tensors read on access). Both expert layouts are accepted
    (detected from the keys). A tied model may carry `lm_head.weight` only if it equals the
    embedding. Raises ValueError naming every missing or unexpected tensor, and any tensor of
    the wrong shape.
    """
    arch = _arch(model_config, architecture)
    maps = tensor_maps(model_config, arch, detect_expert_layout(list(hf_state_dict.keys()), model_config, arch))
    expected = {k: None for m in maps for k in m.hf}
    present = {k: None for k in hf_state_dict.keys()}
    tied_copy = OUTPUT_RENAME[1]
    if tied_copy in present and tied_copy not in expected and not model_config.untie_embeddings_and_output_weights:
        del present[tied_copy]  # a tied lm_head stored anyway: accepted only if it is the embedding
        embedding = GLOBAL_RENAMES[0][1]
        if embedding in hf_state_dict and not torch.equal(hf_state_dict[tied_copy], hf_state_dict[embedding]):
            raise ValueError(f"tie_word_embeddings is true but {tied_copy} differs from model.embed_tokens.weight")
    problems = tensor_mismatches(expected, present)
    if problems:
        raise ValueError("Hugging Face checkpoint does not match its config.json: " + "; ".join(problems))
    out: dict[str, Tensor] = {}
    for m in maps:
        out.update(zip(m.ours, _apply(m.to_ours, [hf_state_dict[k] for k in m.hf], m.hf)))
    check_state_dict(out, model_config, "converted Hugging Face checkpoint")
    return out


def megatron_to_hf_state_dict(state_dict: Mapping[str, Tensor], model_config: ModelConfig,
                              architecture: Optional[str] = None, expert_layout: str = "per_expert",
                              vocab_size: Optional[int] = None) -> dict[str, Tensor]:
    """A Hugging Face state dict from ours.

    expert_layout: `per_expert` (what `save_pretrained` writes and the Hub holds) or `fused`
    (transformers-5 in-memory names). vocab_size: keep only the first rows of the embedding and
    output layer (the true vocabulary); default keeps our padded rows. Raises ValueError naming
    every missing, unexpected or mis-shaped tensor, or the flag the architecture cannot express.
    """
    arch = check_representable(model_config, architecture)
    check_state_dict(state_dict, model_config, "Megatron checkpoint")
    out: dict[str, Tensor] = {}
    for m in tensor_maps(model_config, arch, expert_layout):
        out.update(zip(m.hf, _apply(m.to_hf, [state_dict[k] for k in m.ours], m.ours)))
    if vocab_size is not None:
        if not 0 < vocab_size <= model_config.vocab_size:
            raise ValueError(f"--true-vocab-size {vocab_size} must be between 1 and the checkpoint's "
                             f"padded vocabulary ({model_config.vocab_size})")
        for key in (GLOBAL_RENAMES[0][1], OUTPUT_RENAME[1]):
            if key in out:
                out[key] = out[key][:vocab_size].contiguous()
    return out

