"""Hugging Face <-> Megatron conversion: tiny random transformers models, built locally.

Checks exact tensor round trips, logits parity with transformers in fp32, strict key checking,
the on-disk formats on both sides, and the `tools/checkpoint/convert.py` command line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.training import hf_conversion as hfc  # noqa: E402
from megatron.training.arguments import config_from_args, parse_args  # noqa: E402
from megatron.training.checkpointing import iteration_dir, load_model_state, read_tracker  # noqa: E402
from megatron.training.hf_checkpoint import read_hf_checkpoint, save_hf_checkpoint  # noqa: E402
from megatron.training.megatron_layout import from_megatron  # noqa: E402
from megatron.training.model_checkpoint import (  # noqa: E402
    MODEL_FILE,
    load_model_checkpoint,
    model_config_from_dict,
)
from megatron.training.safe_load import load_file  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONVERT = os.path.join(ROOT, "tools", "checkpoint", "convert.py")
sys.path.insert(0, os.path.dirname(CONVERT))
import convert as convert_cli  # noqa: E402

SHAPE = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=256, attn_implementation="eager")
MOE = dict(num_experts_per_tok=2, experts_implementation="eager")


def _mixtral():
    return transformers.MixtralConfig(**SHAPE, **MOE, num_local_experts=4, intermediate_size=128, rope_theta=10000.0)


def _qwen3_moe(norm_topk_prob: bool):
    # Layer 1 is dense (mlp_only_layers) with its own FFN size; head_dim != hidden / heads.
    return transformers.Qwen3MoeConfig(**SHAPE, **MOE, num_experts=4, moe_intermediate_size=48,
                                       intermediate_size=96, mlp_only_layers=[1], head_dim=32,
                                       norm_topk_prob=norm_topk_prob)


def _llama_tied():
    return transformers.LlamaConfig(**SHAPE, intermediate_size=128, tie_word_embeddings=True)


def _qwen3():
    return transformers.Qwen3Config(**SHAPE, intermediate_size=128, head_dim=32)


CONFIGS = {
    "mixtral": _mixtral,
    "qwen3_moe": lambda: _qwen3_moe(norm_topk_prob=False),
    "qwen3_moe_renorm": lambda: _qwen3_moe(norm_topk_prob=True),
    "llama_tied": _llama_tied,
    "qwen3": _qwen3,
}


def hf_model(name: str, seed: int = 0):
    """A tiny transformers model with every weight random (norms around 1, decisive routers)."""
    config = CONFIGS[name]()
    model = transformers.AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() == 1:
                p.copy_(1.0 + 0.2 * noise)
            elif pname.endswith("mlp.gate.weight"):
                p.copy_(0.5 * noise)
            else:
                p.copy_(0.08 * noise)
    return model.eval()


def ours_from_hf(model):
    args, cfg = hfc.config_from_hf_config(model.config)
    state_dict = hfc.hf_to_megatron_state_dict(model.state_dict(), cfg.model)
    ours = GPTModel(cfg.model)
    ours.load_state_dict(state_dict, strict=True)
    return ours.eval(), cfg, state_dict


def tokens(batch: int = 2, seq: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, SHAPE["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seed))


def max_logit_diff(hf, ours, toks) -> float:
    with torch.no_grad():
        return (hf(toks).logits - ours(toks).logits_BSV).abs().max().item()


# --------------------------------------------------------------------------- library


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(name):
    hf = hf_model(name)
    ours, _, _ = ours_from_hf(hf)
    toks = tokens()
    with torch.no_grad():
        scale = hf(toks).logits.abs().max().item()
    assert scale > 1.0  # the comparison below is not between two near-zero tensors
    assert max_logit_diff(hf, ours, toks) < 1e-4


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_round_trip_is_exact(name):
    hf = hf_model(name)
    _, cfg, state_dict = ours_from_hf(hf)
    back = hfc.megatron_to_hf_state_dict(state_dict, cfg.model, expert_layout="fused")
    ref = {k: v for k, v in hf.state_dict().items()}
    if not cfg.model.untie_embeddings_and_output_weights:
        assert torch.equal(ref.pop("lm_head.weight"), ref["model.embed_tokens.weight"])
    assert sorted(back) == sorted(ref)
    for k in ref:
        assert torch.equal(back[k], ref[k]), k


def test_grouped_qkv_layout_matters():
    """Negative control: a plain [q; k; v] concatenation instead of the grouped layout is caught."""
    hf = hf_model("mixtral")
    ours, _, state_dict = ours_from_hf(hf)
    sd = hf.state_dict()
    bad = dict(state_dict)
    for i in range(2):
        p = f"model.layers.{i}.self_attn."
        bad[f"decoder.layers.{i}.self_attention.linear_qkv.weight"] = torch.cat(
            [sd[p + "q_proj.weight"], sd[p + "k_proj.weight"], sd[p + "v_proj.weight"]])
    ours.load_state_dict(bad)
    assert max_logit_diff(hf, ours, tokens()) > 1e-2


def test_router_semantics_matter():
    """Negative control: Qwen3-MoE norm_topk_prob=false needs --moe-router-pre-softmax."""
    hf = hf_model("qwen3_moe")
    ours, cfg, state_dict = ours_from_hf(hf)
    assert cfg.model.moe.pre_softmax
    for layer in ours.decoder.layers:
        if layer.is_moe:
            layer.mlp.router.moe.pre_softmax = False
    assert max_logit_diff(hf, ours, tokens()) > 1e-3


def test_flags_rebuild_the_same_config():
    hf = hf_model("qwen3_moe")
    args, cfg = hfc.config_from_hf_config(hf.config)
    assert config_from_args(args, world_size=1) == cfg
    m = cfg.model
    assert (m.vocab_size, m.kv_channels, m.ffn_hidden_size, m.moe.ffn_hidden_size) == (256, 32, 96, 48)
    assert m.moe.layer_pattern == (1, 0) and m.qk_layernorm and m.moe.pre_softmax


def test_flags_keep_the_exact_vocabulary_with_null_tokenizer():
    """NullTokenizer adds an end-of-document id: the flags ask for V-1 ids so the model has V rows."""
    flags = hfc.hf_config_to_flags(hf_model("mixtral").config)
    assert flags[flags.index("--vocab-size") + 1] == str(SHAPE["vocab_size"] - 1)
    for extra in ([], ["--tokenizer-type", "NullTokenizer"]):
        cfg = config_from_args(parse_args([*flags, *hfc.RUN_FLAGS, *extra]), world_size=1)
        assert cfg.model.vocab_size == SHAPE["vocab_size"]


def test_model_config_to_hf_config_round_trip():
    for name in sorted(CONFIGS):
        hf = hf_model(name)
        _, cfg = hfc.config_from_hf_config(hf.config)
        out = hfc.model_config_to_hf_config(cfg.model)
        rebuilt = type(hf.config)(**out)
        _, cfg2 = hfc.config_from_hf_config(rebuilt)
        assert cfg2.model == cfg.model, name
        assert out["model_type"] == hf.config.model_type


def _megatron_config(*flags: str):
    base = ["--config", os.path.join(ROOT, "configs", "tiny_moe.yaml"), "--num-layers", "3"]
    return config_from_args(parse_args([*base, *flags]), world_size=1)


@pytest.mark.parametrize("flags", [
    (),
    ("--qk-layernorm", "--moe-layer-freq", "[1,0,1]", "--moe-router-enable-expert-bias",
     "--moe-router-score-function", "sigmoid",
     "--moe-shared-expert-intermediate-size", "32"),
    ("--normalization", "LayerNorm", "--position-embedding-type", "learned_absolute", "--add-qkv-bias",
     "--num-experts", "4"),
])
def test_param_shapes_match_the_model(flags):
    cfg = _megatron_config(*flags)
    model = GPTModel(cfg.model)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert hfc.megatron_param_shapes(cfg.model) == shapes


def test_param_shapes_with_biases_and_gelu():
    args = parse_args(["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
                       "--seq-length", "16", "--vocab-size", "100", "--num-experts", "2", "--moe-layer-freq", "2",
                       "--micro-batch-size", "1", "--train-iters", "1", "--lr", "0.1", "--mock-data"])
    cfg = config_from_args(args, world_size=1)
    model = GPTModel(cfg.model)
    assert hfc.megatron_param_shapes(cfg.model) == {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("flags, named", [
    (("--moe-shared-expert-intermediate-size", "32"), "--moe-shared-expert-intermediate-size"),
    (("--moe-router-pre-softmax",), "--moe-router-pre-softmax"),
    (("--moe-router-enable-expert-bias", "--moe-router-score-function", "sigmoid"),
     "--moe-router-enable-expert-bias"),
    (("--moe-layer-freq", "[1,0,1]"), "--moe-layer-freq"),
    (("--normalization", "LayerNorm"), "--normalization"),
    (("--moe-router-type", "noisy_topk"), "--moe-router-type"),
    (("--moe-router-num-groups", "2", "--moe-router-group-topk", "1"), "--moe-router-num-groups"),
])
def test_unrepresentable_configs_name_the_flag(flags, named):
    cfg = _megatron_config(*flags)
    with pytest.raises(ValueError, match=named):
        hfc.model_config_to_hf_config(cfg.model)
    with pytest.raises(ValueError, match=named):
        hfc.megatron_to_hf_state_dict(GPTModel(cfg.model).state_dict(), cfg.model)


def test_unsupported_hf_architectures_say_why():
    olmoe = transformers.OlmoeConfig(**{k: v for k, v in SHAPE.items() if k != "attn_implementation"})
    with pytest.raises(ValueError, match="olmoe.*whole projected"):
        hfc.hf_config_to_flags(olmoe)
    with pytest.raises(ValueError, match="qwen2_moe.*shared_expert_gate"):
        hfc.hf_config_to_flags({"model_type": "qwen2_moe"})
    with pytest.raises(ValueError, match="'gpt2' is not supported"):
        hfc.hf_config_to_flags({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="rope_type 'llama3'"):
        hfc.hf_config_to_flags({**_llama_tied().to_dict(), "rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}})
    with pytest.raises(ValueError, match="sliding_window"):
        hfc.hf_config_to_flags({**_mixtral().to_dict(), "sliding_window": 16})


def test_missing_tensor_is_an_error_naming_it():
    hf = hf_model("mixtral")
    _, cfg = hfc.config_from_hf_config(hf.config)
    sd = hf.state_dict()
    del sd["model.layers.1.mlp.experts.down_proj"]
    with pytest.raises(ValueError, match=r"missing tensors: model\.layers\.1\.mlp\.experts\.down_proj"):
        hfc.hf_to_megatron_state_dict(sd, cfg.model)


def test_unexpected_tensor_is_an_error_naming_it():
    hf = hf_model("mixtral")
    _, cfg = hfc.config_from_hf_config(hf.config)
    sd = dict(hf.state_dict())
    sd["model.layers.0.mlp.shared_expert_gate.weight"] = torch.zeros(1, 64)
    with pytest.raises(ValueError, match=r"unexpected tensors: model\.layers\.0\.mlp\.shared_expert_gate\.weight"):
        hfc.hf_to_megatron_state_dict(sd, cfg.model)


def test_wrong_shape_is_an_error_naming_it():
    hf = hf_model("mixtral")
    _, cfg = hfc.config_from_hf_config(hf.config)
    sd = dict(hf.state_dict())
    sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(48, 64)
    with pytest.raises(ValueError, match=r"k_proj\.weight \(48, 64\)"):
        hfc.hf_to_megatron_state_dict(sd, cfg.model)
    sd = dict(hf.state_dict())
    sd["model.layers.0.mlp.gate.weight"] = torch.zeros(4, 32)
    with pytest.raises(ValueError, match=r"wrong shapes: decoder\.layers\.0\.mlp\.router\.weight"):
        hfc.hf_to_megatron_state_dict(sd, cfg.model)


def test_our_side_is_checked_too():
    hf = hf_model("mixtral")
    _, cfg, sd = ours_from_hf(hf)
    extra = {**sd, "decoder.layers.0.mlp.router.expert_bias": torch.zeros(4)}
    with pytest.raises(ValueError, match=r"unexpected tensors: decoder\.layers\.0\.mlp\.router\.expert_bias"):
        hfc.megatron_to_hf_state_dict(extra, cfg.model)
    missing = {k: v for k, v in sd.items() if k != "decoder.final_layernorm.weight"}
    with pytest.raises(ValueError, match=r"missing tensors: decoder\.final_layernorm\.weight"):
        hfc.megatron_to_hf_state_dict(missing, cfg.model)


def test_tied_lm_head_copy_must_equal_the_embedding():
    hf = hf_model("llama_tied")
    _, cfg = hfc.config_from_hf_config(hf.config)
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    hfc.hf_to_megatron_state_dict(sd, cfg.model)  # equal copy: accepted
    sd["lm_head.weight"] += 1.0
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        hfc.hf_to_megatron_state_dict(sd, cfg.model)


def test_true_vocab_size_slices_padded_rows():
    hf = hf_model("mixtral")
    _, cfg, sd = ours_from_hf(hf)
    out = hfc.megatron_to_hf_state_dict(sd, cfg.model, vocab_size=200)
    assert out["model.embed_tokens.weight"].shape == (200, 64) and out["lm_head.weight"].shape == (200, 64)
    with pytest.raises(ValueError, match="--true-vocab-size 300"):
        hfc.megatron_to_hf_state_dict(sd, cfg.model, vocab_size=300)


# --------------------------------------------------------------------------- files


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_save_pretrained_per_expert_layout_reads(tmp_path, name):
    """transformers writes one tensor per expert on disk; that layout reads and writes back exactly."""
    hf = hf_model(name)
    hf.save_pretrained(tmp_path / "hf")
    config, lazy = read_hf_checkpoint(str(tmp_path / "hf"))
    assert any(".experts.0." in k for k in lazy)
    _, cfg = hfc.config_from_hf_config(config)
    sd = hfc.hf_to_megatron_state_dict(lazy, cfg.model)
    _, _, from_memory = ours_from_hf(hf)
    assert all(torch.equal(sd[k], from_memory[k]) for k in from_memory)
    back = hfc.megatron_to_hf_state_dict(sd, cfg.model, expert_layout="per_expert")
    assert sorted(back) == sorted(lazy)
    assert all(torch.equal(back[k], lazy[k]) for k in back)


def test_hf_output_is_sharded_with_an_index_and_loads(tmp_path):
    hf = hf_model("mixtral")
    _, cfg, sd = ours_from_hf(hf)
    out = hfc.megatron_to_hf_state_dict(sd, cfg.model, expert_layout="fused")
    save_hf_checkpoint(str(tmp_path / "out"), hfc.model_config_to_hf_config(cfg.model, dtype=torch.float32),
                       out, max_shard_bytes=200_000)
    files = sorted(os.listdir(tmp_path / "out"))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in files and "config.json" in files
    loaded = transformers.MixtralForCausalLM.from_pretrained(
        tmp_path / "out", attn_implementation="eager", experts_implementation="eager").eval()
    toks = tokens()
    with torch.no_grad():
        assert (loaded(toks).logits - hf(toks).logits).abs().max().item() < 1e-5


def test_failed_save_publishes_nothing(tmp_path, monkeypatch):
    import megatron.training.hf_checkpoint as hf_checkpoint

    calls = []

    def failing_save_file(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(tensors, path, metadata=metadata)

    real = hf_checkpoint.save_file
    monkeypatch.setattr(hf_checkpoint, "save_file", failing_save_file)
    hf = hf_model("mixtral")
    with pytest.raises(OSError, match="disk full"):
        save_hf_checkpoint(str(tmp_path / "out"), {}, hf.state_dict(), max_shard_bytes=200_000)
    assert os.listdir(tmp_path) == []


def test_expert_parallel_shards_merge(tmp_path):
    hf = hf_model("mixtral")
    _, cfg, sd = ours_from_hf(hf)
    directory = iteration_dir(str(tmp_path), 7)
    for rank in range(2):
        shard = {k: (v[2 * rank:2 * rank + 2] if ".mlp.experts." in k else v) for k, v in sd.items()}
        os.makedirs(os.path.join(directory, f"mp_rank_00_{rank:03d}"))
        torch.save({"model": shard, "config": {"model": vars(cfg.model) | {"moe": vars(cfg.model.moe)}},
                    "iteration": 7}, os.path.join(directory, f"mp_rank_00_{rank:03d}", MODEL_FILE))
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("7")
    ckpt = load_model_checkpoint(str(tmp_path))
    assert ckpt.iteration == 7 and ckpt.model_config == cfg.model
    assert sorted(ckpt.state_dict) == sorted(sd)
    assert all(torch.equal(ckpt.state_dict[k], sd[k]) for k in sd)


# --------------------------------------------------------------------------- command line


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, CONVERT, *argv], capture_output=True, text=True, timeout=120)


def test_cli_end_to_end(tmp_path):
    """HF dir -> Megatron checkpoint -> HF dir, in separate processes; logits survive the trip."""
    hf = hf_model("mixtral")
    hf.save_pretrained(tmp_path / "hf")
    meg, out = tmp_path / "meg", tmp_path / "hf_out"
    r = run_cli("--loader", "hf", "--saver", "megatron", "--load-dir", str(tmp_path / "hf"), "--save-dir", str(meg))
    assert r.returncode == 0, r.stderr

    # Our legacy layout: tracker 'release', loadable by the training loader's helpers.
    assert (meg / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert read_tracker(str(meg)) == 0
    payload = load_file(os.path.join(iteration_dir(str(meg), 0), "mp_rank_00", MODEL_FILE))
    assert payload["iteration"] == 0 and payload["hf_config"]["model_type"] == "mixtral"
    cfg = config_from_args(payload["args"], world_size=1)
    assert model_config_from_dict(payload["config"]) == cfg.model
    ours = GPTModel(cfg.model)
    assert "decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight" in payload["model"]  # SequentialMLP
    state, _ = from_megatron(payload["model"], cfg.model.moe.num_experts, "converted")
    load_model_state(ours, state, "converted")
    assert max_logit_diff(hf, ours.eval(), tokens()) < 1e-4

    r = run_cli("--loader", "megatron", "--saver", "hf", "--load-dir", str(meg), "--save-dir", str(out))
    assert r.returncode == 0, r.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["bos_token_id"] == hf.config.bos_token_id  # tokenizer ids carried through
    loaded = transformers.MixtralForCausalLM.from_pretrained(
        out, attn_implementation="eager", experts_implementation="eager").eval()
    toks = tokens()
    with torch.no_grad():
        assert (loaded(toks).logits - hf(toks).logits).abs().max().item() < 1e-5
    _, original = read_hf_checkpoint(str(tmp_path / "hf"))
    _, written = read_hf_checkpoint(str(out))
    assert sorted(original) == sorted(written)
    assert all(torch.equal(original[k], written[k]) for k in original)


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    r = run_cli("--loader", "hf", "--saver", "megatron", "--load-dir", str(tmp_path / "nope"),
                "--save-dir", str(tmp_path / "out"))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("convert.py: error: --load-dir")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["unsupported", "missing_tensor", "not_empty", "bad_flag", "no_config"])
def test_cli_errors(tmp_path, capsys, case):
    hf_dir, save = tmp_path / "hf", tmp_path / "out"
    hf_model("mixtral").save_pretrained(hf_dir)
    argv = ["--loader", "hf", "--saver", "megatron", "--load-dir", str(hf_dir), "--save-dir", str(save)]
    expected = {
        "unsupported": "model_type 'olmoe' is not supported",
        "missing_tensor": "missing tensors: model.layers.1.block_sparse_moe.experts.3.w2.weight",
        "not_empty": "--save-dir",
        "bad_flag": "argument --loader: invalid choice",
        "no_config": "has no config.json",
    }[case]
    if case == "unsupported":
        config = json.loads((hf_dir / "config.json").read_text())
        (hf_dir / "config.json").write_text(json.dumps({**config, "model_type": "olmoe"}))
    elif case == "missing_tensor":
        from safetensors.torch import load_file, save_file

        tensors = load_file(hf_dir / "model.safetensors")
        del tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
        save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})
    elif case == "not_empty":
        save.mkdir()
        (save / "keep.txt").write_text("mine")
    elif case == "bad_flag":
        argv[1] = "gguf"
    elif case == "no_config":
        os.remove(hf_dir / "config.json")
    capsys.readouterr()  # drop save_pretrained's progress bar
    assert convert_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("convert.py: error: ") and err.count("\n") == 1 and expected in err, err
    if case == "not_empty":
        assert os.listdir(save) == ["keep.txt"]
    else:
        assert not save.exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


def test_cli_megatron_to_megatron_and_hf_layouts(tmp_path, capsys):
    """hf -> megatron -> megatron (re-saved) -> hf fused layout, all in process."""
    hf = hf_model("qwen3_moe")
    hf.save_pretrained(tmp_path / "hf")
    steps = [("hf", "megatron", "hf", "m1", []), ("megatron", "megatron", "m1", "m2", []),
             ("megatron", "hf", "m2", "out", ["--hf-expert-layout", "fused", "--dtype", "bf16"])]
    for loader, saver, src, dst, extra in steps:
        argv = ["--loader", loader, "--saver", saver, "--load-dir", str(tmp_path / src),
                "--save-dir", str(tmp_path / dst), *extra]
        assert convert_cli.main(argv) == 0, capsys.readouterr().err
    _, written = read_hf_checkpoint(str(tmp_path / "out"))
    assert "model.layers.0.mlp.experts.gate_up_proj" in written
    assert written["model.layers.0.mlp.experts.gate_up_proj"].dtype == torch.bfloat16
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["mlp_only_layers"] == [1] and config["norm_topk_prob"] is False
    loaded = transformers.Qwen3MoeForCausalLM.from_pretrained(
        tmp_path / "out", attn_implementation="eager", experts_implementation="eager", dtype=torch.float32).eval()
    toks = tokens()
    with torch.no_grad():
        assert (loaded(toks).logits - hf(toks).logits).abs().max().item() < 0.1 * hf(toks).logits.abs().max().item()

