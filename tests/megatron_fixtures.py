"""Megatron-LM legacy checkpoints built in tests, from Megatron-Core's documented names and shapes.

Written independently of `megatron/training/megatron_layout.py` (which these fixtures test):
the expert tables below restate Megatron-Core 0.16.1's module layouts, and `args` is pickled
with stand-in enums registered under Megatron-Core's real dotted names, as Megatron-LM would
pickle them.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import io
import os
import random
import re
import signal
import sys
import types

import numpy as np
import torch

IMPLS = ("sequential", "te_grouped", "grouped")


def megatron_model_state(ours: dict, impl: str, te: bool) -> dict:
    """Megatron-LM's `model` entry for our (EP-local) state dict.

    SequentialMLP:  experts.local_experts.{e}.linear_fc1.weight [2F, D], .linear_fc2.weight [D, F]
    TEGroupedMLP:   experts.linear_fc1.weight{e} [2F, D], experts.linear_fc2.weight{e} [D, F]
    GroupedMLP:     experts.weight1 [D, E*2F], experts.weight2 [E*F, D] (viewed by Megatron as [E, D, 2F], [E, F, D])
    TE layer spec:  input_layernorm -> self_attention.linear_qkv.layer_norm_*, dense pre_mlp_layernorm ->
                    mlp.linear_fc1.layer_norm_*, plus `_extra_state` entries (uint8 tensors; one holds bytes
                    that must never be unpickled, one an io.BytesIO as Transformer Engine < 2 wrote).
    Local spec:     `_extra_state` None for Megatron-Core's parallel linears.
    """
    out = {}
    for key, value in ours.items():
        match = re.match(r"(decoder\.layers\.\d+)\.(.*)", key)
        if match is None:
            out[key] = value
            continue
        layer, rest = match.groups()
        if rest.startswith("mlp.experts."):
            continue
        dense = f"{layer}.mlp.linear_fc1.weight" in ours
        if te and rest.startswith("input_layernorm."):
            rest = "self_attention.linear_qkv.layer_norm_" + rest.split(".", 1)[1]
        elif te and dense and rest.startswith("pre_mlp_layernorm."):
            rest = "mlp.linear_fc1.layer_norm_" + rest.split(".", 1)[1]
        out[f"{layer}.{rest}"] = value
    for key in [k for k in ours if k.endswith(".mlp.experts.weight1")]:
        p = key[: -len(".weight1")]
        w1, w2 = ours[f"{p}.weight1"], ours[f"{p}.weight2"]
        E, D = w1.shape[0], w1.shape[1]
        for e in range(E):
            if impl == "sequential":
                out[f"{p}.local_experts.{e}.linear_fc1.weight"] = w1[e].T.clone()
                out[f"{p}.local_experts.{e}.linear_fc2.weight"] = w2[e].T.clone()
                out[f"{p}.local_experts.{e}.linear_fc1._extra_state"] = torch.empty(0, dtype=torch.uint8) if te else None
            elif impl == "te_grouped":
                out[f"{p}.linear_fc1.weight{e}"] = w1[e].T.clone()
                out[f"{p}.linear_fc2.weight{e}"] = w2[e].T.clone()
        if impl == "grouped":
            out[f"{p}.weight1"] = w1.reshape(D, -1).clone()
            out[f"{p}.weight2"] = w2.reshape(-1, D).clone()
        elif impl == "te_grouped":
            out[f"{p}.linear_fc1._extra_state"] = torch.frombuffer(bytearray(_NEVER_UNPICKLE), dtype=torch.uint8)
    if te:
        out["decoder.layers.0.self_attention.core_attention._extra_state"] = io.BytesIO(b"TE < 2.0 extra state")
        out["decoder.final_layernorm._extra_state"] = torch.empty(0, dtype=torch.uint8)
    else:
        out["decoder.layers.0.self_attention.linear_qkv._extra_state"] = None
    out["output_layer._extra_state"] = None
    return out


class _Marker:
    def __reduce__(self):
        return (open, ("MARKER_FROM_EXTRA_STATE", "w"))


_NEVER_UNPICKLE = __import__("pickle").dumps(_Marker(), protocol=2)


# ---------------------------------------------------------------------------- args with Megatron-Core enums


class AttnBackend(enum.Enum):
    flash = 1
    fused = 2
    unfused = 3
    local = 4
    auto = 5


class CudaGraphScope(enum.Enum):
    full_iteration = 1
    attn = 2


class ModelType(enum.Enum):
    encoder_or_decoder = 1


_REAL_NAMES = {"megatron.core.transformer.enums": (AttnBackend, CudaGraphScope), "megatron.core.enums": (ModelType,)}


@contextlib.contextmanager
def megatron_core_names():
    """Register the stand-in enums under Megatron-Core's module names while pickling."""
    saved = {}
    for module_name, classes in _REAL_NAMES.items():
        module = types.ModuleType(module_name)
        for cls in classes:
            cls.__module__ = module_name
            setattr(module, cls.__name__, cls)
        saved[module_name] = sys.modules.get(module_name)
        sys.modules[module_name] = module
    try:
        yield
    finally:
        for module_name, previous in saved.items():
            if previous is None:
                sys.modules.pop(module_name, None)
            else:
                sys.modules[module_name] = previous
        for classes in _REAL_NAMES.values():
            for cls in classes:
                cls.__module__ = __name__


def megatron_lm_args(cfg, iteration: int, consumed_train_samples: int, **extra) -> argparse.Namespace:
    """A Megatron-LM 0.16-style `args` for the run `cfg` (attributes it sets, including Megatron-Core objects)."""
    m = cfg.model
    return argparse.Namespace(
        num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups, group_query_attention=True,
        kv_channels=m.kv_channels, seq_length=m.seq_length, max_position_embeddings=m.max_position_embeddings,
        position_embedding_type="rope", add_position_embedding=True, normalization=m.normalization, swiglu=True,
        add_bias_linear=False, untie_embeddings_and_output_weights=m.untie_embeddings_and_output_weights,
        padded_vocab_size=m.vocab_size, num_experts=m.moe.num_experts, moe_ffn_hidden_size=m.moe.ffn_hidden_size,
        moe_router_topk=m.moe.router_topk, moe_router_load_balancing_type=["aux_loss"], moe_aux_loss_coeff=[1e-2],
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1, iteration=iteration,
        consumed_train_samples=consumed_train_samples, consumed_valid_samples=0,
        attention_backend=AttnBackend.auto, model_type=ModelType.encoder_or_decoder,
        cuda_graph_scope=[CudaGraphScope.attn], exit_signal=signal.Signals.SIGTERM, params_dtype=torch.bfloat16,
        main_grads_dtype=torch.float32, **extra)


def megatron_rng_state() -> list:
    return [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
             "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": torch.zeros(16, dtype=torch.uint8),
             "rng_tracker_states": {"model-parallel-rng": torch.zeros(16, dtype=torch.uint8)}}]


def megatron_optimizer_state() -> dict:
    """The shape of Megatron-LM's (non-distributed) mixed-precision optimizer state_dict."""
    return {"optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0],
                                                         "wd_mult": 1.0, "default_config": True}]},
            "fp32_from_fp16_params": [[torch.zeros(2)]], "grad_scaler": {"scale": 1.0}}


def write_megatron_checkpoint(root: str, iteration: int, shards: list[dict], args: argparse.Namespace,
                              with_optimizer: bool = True) -> None:
    """`root/iter_N/mp_rank_00[_EEE]/model_optim_rng.pt` for each expert-parallel shard, and the tracker."""
    for rank, model in enumerate(shards):
        name = "mp_rank_00" if len(shards) == 1 else f"mp_rank_00_{rank:03d}"
        directory = os.path.join(root, f"iter_{iteration:07d}", name)
        os.makedirs(directory)
        payload = {"args": args, "checkpoint_version": 3.0, "iteration": iteration, "model": model,
                   "rng_state": megatron_rng_state(), "num_floating_point_operations_so_far": 1.0e9}
        if with_optimizer:
            payload["optimizer"] = megatron_optimizer_state()
            payload["opt_param_scheduler"] = {"max_lr": 1e-3, "num_steps": iteration * 4, "lr_warmup_steps": 0}
        with megatron_core_names():
            torch.save(payload, os.path.join(directory, "model_optim_rng.pt"))
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(iteration))
