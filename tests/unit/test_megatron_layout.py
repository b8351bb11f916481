"""megatron_layout: our state dict <-> Megatron-Core's names per expert implementation and layer spec."""

from __future__ import annotations

import argparse

import pytest
import torch

from megatron.core.models.gpt import GPTModel
from megatron.training.megatron_layout import (
    Layout,
    detect_layout,
    from_megatron,
    layout_for,
    num_local_experts,
    to_megatron,
)
from tests.helpers import TINY_FLAGS, make_config
from tests.megatron_fixtures import megatron_model_state

LAYOUTS = [layout_for(impl, grouped) for impl in ("local", "transformer_engine") for grouped in (False, True)]
# LayerNorm (norm biases), q/k norms, a shared expert, a dense layer 0 and an MoE layer 1.
RICH = "--moe-layer-freq [0,1] --normalization LayerNorm --qk-layernorm --moe-shared-expert-intermediate-size 16"


def state(flags: str = RICH, base: str = TINY_FLAGS) -> dict:
    torch.manual_seed(0)
    return GPTModel(make_config(flags, base=base).model).state_dict()


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.describe())
def test_round_trip_is_exact_and_the_layout_is_detected(layout):
    ours = state()
    meg = to_megatron(ours, layout)
    back, detected = from_megatron(meg, num_local_experts(ours), "ckpt")
    assert detected == layout
    assert sorted(back) == sorted(ours) and all(torch.equal(back[k], ours[k]) for k in ours)


@pytest.mark.parametrize("impl", ["sequential", "te_grouped", "grouped"])
@pytest.mark.parametrize("te", [False, True])
def test_written_names_match_the_documented_tables(impl, te):
    """Tensors (not extra state) equal the fixtures built from Megatron-Core's documented names."""
    ours = state()
    layout = Layout(impl, te)
    written = {k: v for k, v in to_megatron(ours, layout).items() if not k.endswith("_extra_state")}
    documented = {k: v for k, v in megatron_model_state(ours, impl, te).items() if not k.endswith("_extra_state")}
    assert sorted(written) == sorted(documented)
    assert all(torch.equal(written[k], documented[k]) for k in documented)


def test_extra_state_entries_are_those_a_strict_megatron_core_load_needs():
    ours = state()
    local = {k: v for k, v in to_megatron(ours, Layout("sequential")).items() if k.endswith("_extra_state")}
    assert all(v is None for v in local.values())  # Megatron-Core's parallel linears return None
    assert sorted(local) == sorted(
        [f"decoder.layers.{i}.self_attention.{m}._extra_state" for i in (0, 1) for m in ("linear_qkv", "linear_proj")]
        + [f"decoder.layers.0.mlp.{m}._extra_state" for m in ("linear_fc1", "linear_fc2")]
        + [f"decoder.layers.1.mlp.shared_experts.{m}._extra_state" for m in ("linear_fc1", "linear_fc2")]
        + [f"decoder.layers.1.mlp.experts.local_experts.{e}.{m}._extra_state" for e in range(4)
           for m in ("linear_fc1", "linear_fc2")]
        + ["output_layer._extra_state"])
    te = to_megatron(ours, Layout("te_grouped", True))
    empty = [k for k, v in te.items() if k.endswith("_extra_state") and v is not None]
    assert all(te[k].dtype == torch.uint8 and te[k].numel() == 0 for k in empty)  # TE's "no FP8 state"
    for module in ("self_attention.core_attention", "self_attention.q_layernorm", "pre_mlp_layernorm",
                   "mlp.experts.linear_fc1", "mlp.experts.linear_fc2"):
        assert f"decoder.layers.1.{module}._extra_state" in empty
    assert "decoder.final_layernorm._extra_state" in empty and te["output_layer._extra_state"] is None
    assert "decoder.layers.0.pre_mlp_layernorm._extra_state" not in te  # fused into linear_fc1 in dense layers


def test_expert_biases_follow_the_weights():
    base = TINY_FLAGS.replace("--disable-bias-linear", "")
    ours = state("--moe-layer-freq [0,1]", base)
    assert "decoder.layers.1.mlp.experts.bias1" in ours
    meg = to_megatron(ours, Layout("te_grouped", True))
    assert torch.equal(meg["decoder.layers.1.mlp.experts.linear_fc1.bias2"], ours["decoder.layers.1.mlp.experts.bias1"][2])
    seq = to_megatron(ours, Layout("sequential"))
    assert torch.equal(seq["decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.bias"],
                       ours["decoder.layers.1.mlp.experts.bias2"][3])
    with pytest.raises(ValueError, match="GroupedMLP.*no expert biases"):
        to_megatron(ours, Layout("grouped"))


def test_native_state_is_recognised_and_mixed_layouts_are_errors():
    ours = state()
    assert from_megatron(ours, 4, "ckpt") == (ours, Layout("native"))
    mixed = {**to_megatron(ours, Layout("sequential")), "decoder.layers.1.mlp.experts.linear_fc1.weight0": torch.ones(1)}
    with pytest.raises(ValueError, match="ckpt: the model state mixes layouts"):
        from_megatron(mixed, 4, "ckpt")
    assert detect_layout({"decoder.layers.0.self_attention.linear_qkv.layer_norm_weight": (4,)}).te_norms


def test_experts_beyond_the_local_count_are_left_for_the_strict_check():
    ours = state()
    meg = to_megatron(ours, Layout("sequential"))
    back, _ = from_megatron(meg, 2, "ckpt")
    assert back["decoder.layers.1.mlp.experts.weight1"].shape[0] == 2
    assert "decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight" in back


@pytest.mark.parametrize("split,tied", [
    ("--pipeline-model-parallel-size 2 --virtual-pipeline-model-parallel-size 2", True),
    ("--pipeline-model-parallel-size 3 --decoder-first-pipeline-num-layers 1 --decoder-last-pipeline-num-layers 3", False),
    ("--pipeline-model-parallel-size 3 --account-for-embedding-in-pipeline-split --account-for-loss-in-pipeline-split",
     True),
])
def test_pipeline_chunks_are_numbered_locally_and_merge_back(split, tied):
    """Each rank's chunks (Megatron's files) number their layers from 0; merging every rank's
    chunks back gives the whole model with global names, the tied copy included once."""
    from megatron.core.pipeline_parallel.layout import PipelineLayout
    from megatron.training.megatron_layout import (
        merge_pipeline_chunks,
        pipeline_args,
        pipeline_from_args,
        split_pipeline_chunks,
    )

    flags = "--num-layers 7" if "first" in split else "--num-layers 4" if "account" in split else "--num-layers 8"
    untie = "" if tied else " --untie-embeddings-and-output-weights"
    pp = int(split.split()[1])
    cfg = make_config(f"{flags}{untie} {split} --global-batch-size 12", world_size=pp)
    whole = GPTModel(cfg.model).state_dict()
    p = cfg.parallel
    pipeline = p.pipeline_layout(cfg.model.num_layers)
    args = pipeline_args(pipeline, p.num_layers_per_virtual_pipeline_stage, p.decoder_first_pipeline_num_layers,
                         p.decoder_last_pipeline_num_layers, p.account_for_embedding_in_pipeline_split,
                         p.account_for_loss_in_pipeline_split)
    assert pipeline_from_args(argparse.Namespace(**args), cfg.model.num_layers) == pipeline
    merged = {}
    for r in range(pipeline.num_stages):
        chunks = split_pipeline_chunks(whole, pipeline, r, tied)
        assert len(chunks) == pipeline.num_chunks
        for v, chunk in enumerate(chunks):
            layers = {int(k.split(".")[2]) for k in chunk if k.startswith("decoder.layers.")}
            assert layers == set(range(len(pipeline.layers(v * pipeline.num_stages + r))))
        last = chunks[-1]
        if r == pipeline.num_stages - 1:
            assert "decoder.final_layernorm.weight" in last and "output_layer.weight" in last
            assert torch.equal(last["output_layer.weight"], whole["embedding.word_embeddings.weight"]) == tied
        else:
            assert not any(k.startswith(("decoder.final_layernorm", "output_layer")) for c in chunks for k in c)
        assert any(k.startswith("embedding.") for c in chunks for k in c) == (r == 0)
        stage = merge_pipeline_chunks(chunks, pipeline, r, tied, "test")
        merged.update(stage)
    assert set(merged) == set(whole) and all(torch.equal(merged[k], whole[k]) for k in whole)
    assert PipelineLayout.build(cfg.model.num_layers, 1) == pipeline_from_args(None, cfg.model.num_layers)
