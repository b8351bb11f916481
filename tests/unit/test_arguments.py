"""Flags, YAML configs and the one-line errors for bad input."""

import subprocess
import sys
import warnings

import pytest

import pretrain_gpt
from megatron.training.arguments import ArgumentError, config_from_args, parse_args, parse_moe_layer_freq
from tests.helpers import TINY_FLAGS, make_config


def test_megatron_defaults_and_derived_sizes():
    cfg = make_config()
    args = parse_args(["--num-layers", "2"])
    assert args.hidden_dropout == 0.1 and args.init_method_std == 0.02 and args.seed == 1234
    assert args.normalization == "LayerNorm" and args.position_embedding_type == "learned_absolute"
    assert args.make_vocab_size_divisible_by == 128 and args.clip_grad == 1.0
    assert cfg.model.kv_channels == 8 and cfg.model.num_query_groups == 2


def test_swiglu_default_ffn_size_and_vocab_padding():
    base = TINY_FLAGS.replace("--ffn-hidden-size 64 ", "").replace("--make-vocab-size-divisible-by 1 ", "")
    cfg = make_config("--hidden-size 96 --num-attention-heads 4", base=base)
    assert cfg.model.ffn_hidden_size == int((4 * 96 * 2 / 3) / 64) * 64  # Megatron's SwiGLU default
    assert cfg.model.vocab_size == 128  # 64 padded to a multiple of 128


def test_gqa_needs_group_query_attention_flag_like_megatron():
    cfg = make_config(base=TINY_FLAGS.replace("--group-query-attention ", ""))
    assert cfg.model.num_query_groups == 4


def test_yaml_config_and_command_line_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("num_layers: 3\nhidden-size: 48\nswiglu: false\nmoe-layer-freq: '[0,1,1]'\nlr: 0.5\n")
    args = parse_args(["--config", str(path), "--lr", "0.25"] + TINY_FLAGS.replace("--num-layers 2 ", "")
                      .replace("--hidden-size 32 ", "").replace("--lr 1e-3 ", "").split())
    assert args.num_layers == 3 and args.hidden_size == 48 and args.lr == 0.25
    assert args.swiglu is True  # the command line's --swiglu beats the file's false
    assert args.moe_layer_freq == [0, 1, 1]


def test_yaml_unknown_key_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("num-layerz: 3\n")
    with pytest.raises(ArgumentError, match="unknown key 'num-layerz'"):
        parse_args(["--config", str(path)])


def test_no_op_flags_are_accepted_with_one_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_config("--use-mcore-models --no-masked-softmax-fusion --sequence-parallel --timing-log-level 2 "
                    "--moe-grouped-gemm")
    messages = [str(w.message) for w in caught]
    for flag in ("--use-mcore-models", "--no-masked-softmax-fusion", "--sequence-parallel", "--timing-log-level"):
        assert sum(flag in m for m in messages) == 1, flag
    assert not any("--moe-grouped-gemm" in m for m in messages)


def test_accumulate_allreduce_grads_in_fp32_is_always_on(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_config("--bf16 --accumulate-allreduce-grads-in-fp32")
    assert not any("accumulate-allreduce" in str(w.message) for w in caught)
    path = tmp_path / "c.yaml"
    path.write_text("accumulate-allreduce-grads-in-fp32: false\n")
    with pytest.raises(ArgumentError, match="--accumulate-allreduce-grads-in-fp32 cannot be turned off"):
        config_from_args(parse_args(TINY_FLAGS.split() + ["--config", str(path)]), world_size=1)


def test_moe_layer_freq_forms():
    assert parse_moe_layer_freq("2") == 2
    assert parse_moe_layer_freq("([0]*1+[1]*3)*2") == [0, 1, 1, 1, 0, 1, 1, 1]
    with pytest.raises(ArgumentError):
        parse_moe_layer_freq("__import__('os')")
    assert make_config("--num-layers 4 --moe-layer-freq 2").model.moe.layer_pattern == (1, 0, 1, 0)


BAD_INPUTS = [
    ("--pipeline-model-parallel-size 2", "--pipeline-model-parallel-size"),
    ("--virtual-pipeline-model-parallel-size 2", "--pipeline-model-parallel-size > 1"),
    ("--pipeline-schedule GPipe", "--pipeline-schedule"),
    ("--moe-router-topk 5", "--moe-router-topk"),
    ("--hidden-size 30", "--num-attention-heads"),
    ("--num-query-groups 3", "--num-query-groups"),
    ("--num-experts 6 --expert-model-parallel-size 4", "--num-experts"),
    ("--global-batch-size 5", "--global-batch-size"),
    ("--moe-layer-freq [1,1,1]", "--moe-layer-freq"),
    ("--num-layers 0", "--num-layers"),
    ("--hidden-size -8", "--hidden-size"),
    ("--micro-batch-size 0", "--micro-batch-size"),
    ("--num-experts 0", "--num-experts"),
    ("--lr-decay-style bogus", "--lr-decay-style"),
    ("--moe-pad-expert-input-to-capacity", "--moe-expert-capacity-factor"),
    ("--tensor-model-parallel-size 2", "--tensor-model-parallel-size"),
    ("--recompute-granularity selective --recompute-num-layers 1", "--recompute-num-layers"),
    ("--recompute-granularity full --recompute-num-layers 3", "--recompute-num-layers"),
    ("--recompute-method block", "--recompute-method"),
    # router combinations Megatron-Core refuses
    ("--moe-router-topk 1", "--moe-router-pre-softmax"),
    ("--moe-router-enable-expert-bias", "--moe-router-score-function sigmoid"),
    ("--moe-router-enable-expert-bias --moe-router-pre-softmax", "--moe-router-enable-expert-bias"),
]


@pytest.mark.parametrize("extra,flag", BAD_INPUTS)
def test_bad_input_is_one_line_naming_the_flag(extra, flag, capsys):
    code = pretrain_gpt.main(TINY_FLAGS.split() + extra.split())
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and flag in err, err


def test_world_size_not_divisible_by_expert_parallel(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    code = pretrain_gpt.main(TINY_FLAGS.split() + ["--expert-model-parallel-size", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "world size (3)" in err and "--expert-model-parallel-size" in err


def test_missing_data_path(tmp_path, capsys):
    flags = TINY_FLAGS.replace("--mock-data ", "").split() + ["--data-path", str(tmp_path / "nope")]
    code = pretrain_gpt.main(flags)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--data-path" in err and "nope.bin" in err
    code = pretrain_gpt.main(TINY_FLAGS.replace("--mock-data ", "").split())
    assert code == 2 and "--data-path" in capsys.readouterr().err


def test_cli_exits_2_without_traceback():
    proc = subprocess.run([sys.executable, "pretrain_gpt.py"] + TINY_FLAGS.split() + ["--moe-router-topk", "9"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "--moe-router-topk" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("flags, segments, per_layer", [
    ("--recompute-activations", (), ("selective", "selective")),
    ("--recompute-granularity full --recompute-method uniform --recompute-num-layers 2", ((0, 2),), (None, None)),
    ("--recompute-granularity full --recompute-method block --recompute-num-layers 1", ((0, 1),), (None, None)),
])
def test_recompute_flags_reach_the_plan(flags, segments, per_layer):
    from megatron.training.train import recompute_plan

    plan = recompute_plan(make_config(flags))
    assert plan.full_segments == segments and plan.per_layer == per_layer


def test_shared_expert_with_linear_biases_is_refused_as_in_megatron():
    with_biases = TINY_FLAGS.replace("--disable-bias-linear ", "")
    with pytest.raises(ValueError, match="--moe-shared-expert-intermediate-size needs --disable-bias-linear"):
        make_config("--moe-shared-expert-intermediate-size 16", base=with_biases)


TENSOR_PARALLEL_BAD_INPUTS = [  # (world size, flags, words the one-line error must contain)
    (3, "--tensor-model-parallel-size 3", ["--tensor-model-parallel-size (3)", "--num-attention-heads (4)"]),
    (4, "--tensor-model-parallel-size 4", ["--tensor-model-parallel-size (4)", "--num-query-groups (2)"]),
    (2, "--tensor-model-parallel-size 2 --ffn-hidden-size 63 --moe-layer-freq [0,1]",
     ["--tensor-model-parallel-size (2)", "--ffn-hidden-size (63)"]),
    (4, "--expert-tensor-parallel-size 4 --moe-ffn-hidden-size 30",
     ["--expert-tensor-parallel-size (4)", "--moe-ffn-hidden-size (30)"]),
    (4, "--tensor-model-parallel-size 2 --expert-model-parallel-size 4 --expert-tensor-parallel-size 2",
     ["world size (4)", "--expert-model-parallel-size (4)", "--expert-tensor-parallel-size (2)"]),
    (2, "--tensor-model-parallel-size 2 --sequence-parallel --seq-length 15",
     ["--sequence-parallel", "--seq-length (15)"]),
    (2, "--tensor-model-parallel-size 2 --moe-shared-expert-intermediate-size 33",
     ["--moe-shared-expert-intermediate-size (33)"]),
]


@pytest.mark.parametrize("world,extra,words", TENSOR_PARALLEL_BAD_INPUTS)
def test_tensor_parallel_bad_input(world, extra, words, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    code = pretrain_gpt.main(TINY_FLAGS.split() + extra.split())
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, err


def test_sequence_parallel_without_tensor_parallel_warns_and_is_off():
    with pytest.warns(UserWarning, match="--sequence-parallel has no effect"):
        cfg = make_config("--sequence-parallel")
    assert not cfg.parallel.sequence_parallel


def test_expert_tensor_parallel_defaults_to_tensor_parallel():
    cfg = make_config("--tensor-model-parallel-size 2", world_size=2)
    assert cfg.parallel.expert_tensor_parallel_size is None and cfg.parallel.expert_tensor_size == 2
    assert make_config("--tensor-model-parallel-size 2 --expert-tensor-parallel-size 1",
                       world_size=2).parallel.expert_tensor_size == 1
