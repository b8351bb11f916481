"""Megatron-LM command-line flags (and `--config FILE.yaml`) turned into a validated `Config`.

This is the one place where flags become config. Flag names and defaults follow Megatron-LM so
that existing launch scripts run unchanged; flags that mean nothing here (fusion switches and
the like) are accepted with one warning each. YAML keys are flag names (`num-layers: 4` or
`num_layers: 4`); the command line overrides the file.
"""

from __future__ import annotations

import argparse
import ast
import math
import os
import sys
import warnings
from typing import Optional, Sequence

import yaml

from megatron.core.datasets.data_paths import dataset_prefixes
from megatron.core.config import (
    CheckpointConfig,
    Config,
    DataConfig,
    ModelConfig,
    MoEConfig,
    OptimizerConfig,
    ParallelConfig,
    TrainingConfig,
    pad_vocab_size,
    validate,
)

# Flags Megatron-LM accepts that change nothing here: (flag, takes a value).
NO_OP_FLAGS: list[tuple[str, bool]] = [
    ("--use-mcore-models", False),
    ("--no-masked-softmax-fusion", False),
    ("--no-bias-gelu-fusion", False),
    ("--no-bias-dropout-fusion", False),
    ("--no-bias-swiglu-fusion", False),
    ("--no-rope-fusion", False),
    ("--no-gradient-accumulation-fusion", False),
    ("--no-async-tensor-model-parallel-allreduce", False),
    ("--use-flash-attn", False),
    ("--attention-softmax-in-fp32", False),
    ("--cross-entropy-loss-fusion", False),
    ("--moe-permute-fusion", False),
    ("--overlap-param-gather", False),
    ("--use-dist-ckpt", False),
    ("--auto-detect-ckpt-format", False),
    ("--ckpt-fully-parallel-save", False),
    ("--ckpt-fully-parallel-load", False),
    ("--log-throughput", False),
    ("--log-timers-to-tensorboard", False),
    ("--log-validation-ppl-to-tensorboard", False),
    ("--log-memory-to-tensorboard", False),
    ("--log-params-norm", False),
    ("--log-num-zeros-in-grad", False),
    ("--manual-gc", False),
    ("--no-create-attention-mask-in-dataloader", False),
    ("--distributed-timeout-minutes-for-init", True),
    ("--timing-log-level", True),
    ("--tensorboard-log-interval", True),
    ("--tensorboard-queue-size", True),
    ("--manual-gc-interval", True),
    ("--attention-backend", True),
    ("--dist-ckpt-strictness", True),
    ("--wandb-project", True),
    ("--wandb-exp-name", True),
    ("--wandb-save-dir", True),
]

class ArgumentError(ValueError):
    """A flag-level user error; the CLI prints it as one line and exits 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        raise ArgumentError(message)


class _NoOpAction(argparse.Action):
    """Accepts a Megatron flag that has no effect here and warns once."""

    def __call__(self, parser, namespace, values, option_string=None):
        _warn_no_op(option_string)


def _warn_no_op(flag: str) -> None:
    warnings.warn(f"{flag} has no effect in this framework and is ignored", stacklevel=3)


def parse_moe_layer_freq(text: str | int) -> int | list[int]:
    """`--moe-layer-freq`: an int N (every N-th layer is MoE) or a list expression of 0/1.

    List expressions may use list literals, `+` and `*`, e.g. `([0]*1+[1]*3)*2`.
    """
    if isinstance(text, int):
        return text
    if isinstance(text, list):
        return [int(v) for v in text]

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            return [ev(e) for e in node.elts]
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = ev(node.left), ev(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError("unsupported syntax")

    try:
        value = ev(ast.parse(str(text).strip(), mode="eval"))
    except (SyntaxError, ValueError, TypeError):
        raise ArgumentError(
            f"--moe-layer-freq: cannot parse {text!r}; give an int or a list such as '([0]*1+[1]*3)*2'"
        ) from None
    if isinstance(value, int):
        return value
    if not isinstance(value, list) or not all(isinstance(v, int) for v in value):
        raise ArgumentError(f"--moe-layer-freq: {text!r} must evaluate to an int or a list of ints")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pretrain_gpt.py", description="Pretrain a (Mixture-of-Experts) GPT model.")
    p.add_argument("--config", type=str, default=None, help="YAML file of flag: value pairs")

    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=None)
    g.add_argument("--hidden-size", type=int, default=None)
    g.add_argument("--ffn-hidden-size", type=int, default=None)
    g.add_argument("--num-attention-heads", type=int, default=None)
    g.add_argument("--kv-channels", type=int, default=None)
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--num-query-groups", type=int, default=1)
    g.add_argument("--seq-length", type=int, default=None)
    g.add_argument("--max-position-embeddings", type=int, default=None)
    g.add_argument("--position-embedding-type", default="learned_absolute",
                   choices=["learned_absolute", "rope", "none"])
    g.add_argument("--use-rotary-position-embeddings", action="store_true",
                   help="deprecated spelling of --position-embedding-type rope")
    g.add_argument("--no-position-embedding", action="store_false", dest="add_position_embedding")
    g.add_argument("--rotary-base", type=int, default=10000)
    g.add_argument("--rotary-percent", type=float, default=1.0)
    g.add_argument("--normalization", default="LayerNorm", choices=["LayerNorm", "RMSNorm"])
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--disable-bias-linear", action="store_false", dest="add_bias_linear")
    g.add_argument("--add-qkv-bias", action="store_true")
    g.add_argument("--qk-layernorm", action="store_true")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--vocab-size", type=int, default=None)
    g.add_argument("--transformer-impl", default="local", choices=["local", "transformer_engine"],
                   help="computation is the same; chooses the Megatron-Core layer spec whose tensor names "
                        "--ckpt-format torch writes")

    g = p.add_argument_group("mixture of experts")
    g.add_argument("--num-experts", type=int, default=None)
    g.add_argument("--moe-ffn-hidden-size", type=int, default=None)
    g.add_argument("--moe-layer-freq", type=parse_moe_layer_freq, default=1)
    g.add_argument("--moe-router-topk", type=int, default=2)
    g.add_argument("--moe-router-score-function", default="softmax", choices=["softmax", "sigmoid"])
    g.add_argument("--moe-router-pre-softmax", action="store_true")
    g.add_argument("--moe-router-topk-scaling-factor", type=float, default=None)
    g.add_argument("--moe-router-load-balancing-type", default="aux_loss",
                   choices=["aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none"])
    g.add_argument("--moe-aux-loss-coeff", type=float, default=0.0)
    g.add_argument("--moe-z-loss-coeff", type=float, default=None)
    g.add_argument("--moe-input-jitter-eps", type=float, default=None)
    g.add_argument("--moe-expert-capacity-factor", type=float, default=None)
    g.add_argument("--moe-token-drop-policy", default="probs", choices=["probs", "position"])
    g.add_argument("--moe-pad-expert-input-to-capacity", action="store_true")
    g.add_argument("--moe-shared-expert-intermediate-size", type=int, default=None)
    g.add_argument("--moe-grouped-gemm", action="store_true",
                   help="experts always run as one grouped GEMM; this chooses the expert names --ckpt-format torch "
                        "writes (Megatron-Core's TEGroupedMLP or GroupedMLP instead of SequentialMLP)")
    g.add_argument("--moe-token-dispatcher-type", default="allgather", choices=["allgather", "alltoall"])
    g.add_argument("--moe-router-enable-expert-bias", action="store_true")
    g.add_argument("--moe-router-bias-update-rate", type=float, default=1e-3)
    g.add_argument("--moe-router-type", default="topk", choices=["topk", "noisy_topk", "expert_choice"])
    g.add_argument("--moe-router-num-groups", type=int, default=None)
    g.add_argument("--moe-router-group-topk", type=int, default=None)
    g.add_argument("--moe-router-dtype", default=None, choices=["fp32", "fp64"])
    g.add_argument("--moe-router-force-load-balancing", action="store_true")
    g.add_argument("--moe-per-layer-logging", action="store_true")
    g.add_argument("--moe-layer-recompute", action="store_true")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=None)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    g.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None)
    g.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None)
    g.add_argument("--pipeline-schedule", default=None)
    g.add_argument("--account-for-embedding-in-pipeline-split", action="store_true")
    g.add_argument("--account-for-loss-in-pipeline-split", action="store_true")
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--expert-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-tensor-parallel-size", type=int, default=None)
    g.add_argument("--distributed-backend", default=None, choices=["nccl", "gloo"])
    g.add_argument("--distributed-timeout-minutes", type=float, default=10.0)
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--overlap-grad-reduce", action="store_true")
    g.add_argument("--ddp-bucket-size", type=int, default=None)

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=None)
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--train-samples", type=int, default=None)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--bf16", action="store_true", help="bf16 parameters with fp32 gradients and main parameters")
    g.add_argument("--fp16", action="store_true", help="fp16 parameters, as --bf16, with dynamic loss scaling")
    g.add_argument("--accumulate-allreduce-grads-in-fp32", action="store_true", default=True,
                   help="always on: gradients accumulate and are reduced in fp32 buffers, whatever the precision")
    g.add_argument("--loss-scale", type=float, default=None)
    g.add_argument("--initial-loss-scale", type=float, default=2.0**32)
    g.add_argument("--min-loss-scale", type=float, default=1.0)
    g.add_argument("--loss-scale-window", type=int, default=1000)
    g.add_argument("--hysteresis", type=int, default=2)
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=100)
    g.add_argument("--exit-interval", type=int, default=None)
    g.add_argument("--exit-duration-in-mins", type=float, default=None)
    g.add_argument("--recompute-granularity", default=None, choices=["full", "selective"])
    g.add_argument("--recompute-activations", action="store_true",
                   help="Megatron-LM's shorthand for --recompute-granularity selective")
    g.add_argument("--recompute-method", default=None, choices=["uniform", "block"])
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument("--no-check-for-nan-in-loss-and-grad", action="store_false",
                   dest="check_for_nan_in_loss_and_grad")

    g = p.add_argument_group("optimizer and learning rate")
    g.add_argument("--optimizer", default="adam", choices=["adam"])
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", default="linear",
                   choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"])
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-fraction", type=float, default=None)
    g.add_argument("--lr-warmup-samples", type=int, default=0)
    g.add_argument("--lr-warmup-init", type=float, default=0.0)
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--lr-decay-samples", type=int, default=None)
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None)
    g.add_argument("--lr-wsd-decay-samples", type=int, default=None)
    g.add_argument("--lr-wsd-decay-style", default="exponential",
                   choices=["exponential", "linear", "cosine", "minus_sqrt"])
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)

    g = p.add_argument_group("data")
    g.add_argument("--mock-data", action="store_true")
    g.add_argument("--data-path", nargs="*", default=None)
    g.add_argument("--split", default="969,30,1")
    g.add_argument("--train-data-path", nargs="*", default=None)
    g.add_argument("--valid-data-path", nargs="*", default=None)
    g.add_argument("--test-data-path", nargs="*", default=None)
    g.add_argument("--data-cache-path", default=None)
    g.add_argument("--num-workers", type=int, default=2)
    g.add_argument("--tokenizer-type", default=None)
    g.add_argument("--tokenizer-model", default=None)
    g.add_argument("--eod-mask-loss", action="store_true")

    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--tensorboard-dir", default=None)

    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--no-save-optim", action="store_true")
    g.add_argument("--no-save-rng", action="store_true")
    g.add_argument("--finetune", action="store_true")
    g.add_argument("--ckpt-format", default="torch_dist", choices=["torch_dist", "torch"])
    g.add_argument("--async-save", action="store_true")

    g = p.add_argument_group("accepted for Megatron-LM compatibility, no effect here")
    for flag, takes_value in NO_OP_FLAGS:
        g.add_argument(flag, action=_NoOpAction, nargs=1 if takes_value else 0, default=argparse.SUPPRESS)
    return p


def _apply_yaml(parser: argparse.ArgumentParser, path: str) -> None:
    """Turn the YAML file's `flag: value` pairs into parser defaults (the command line wins)."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise ArgumentError(f"--config: cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ArgumentError(f"--config: {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ArgumentError(f"--config: {path} must hold a mapping of flag names to values")
    actions = parser._option_string_actions
    defaults = {}
    for key, value in data.items():
        flag = "--" + str(key).replace("_", "-")
        action = actions.get(flag)
        if action is None or flag == "--config":
            raise ArgumentError(f"--config: {path} has unknown key '{key}' (keys are flag names such as num-layers)")
        if isinstance(action, _NoOpAction):
            _warn_no_op(flag)
            continue
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):
                raise ArgumentError(f"--config: {path}: '{key}' is a switch and takes true or false")
            on = isinstance(action, argparse._StoreTrueAction)
            defaults[action.dest] = value if on else not value
            continue
        try:
            if action.nargs in ("*", "+"):
                items = value if isinstance(value, list) else str(value).split()
                defaults[action.dest] = [str(v) for v in items]
            elif value is None:
                defaults[action.dest] = None
            else:
                converted = action.type(value if action.type is parse_moe_layer_freq else str(value)) if action.type else value
                if action.choices and converted not in action.choices:
                    raise ArgumentError(f"--config: {path}: '{key}' must be one of {list(action.choices)}")
                defaults[action.dest] = converted
        except (TypeError, ValueError) as e:
            if isinstance(e, ArgumentError):
                raise
            raise ArgumentError(f"--config: {path}: bad value {value!r} for '{key}'") from None
    parser.set_defaults(**defaults)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse flags (and `--config`), returning Megatron-style namespace. Raises ArgumentError."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        _apply_yaml(parser, known.config)
    return parser.parse_args(argv)


def _require(value, flag: str):
    if value is None:
        raise ArgumentError(f"{flag} is required")
    return value


def _moe_layer_pattern(freq: int | list[int], num_layers: int) -> tuple[int, ...]:
    if isinstance(freq, int):
        if freq <= 0:
            raise ArgumentError(f"--moe-layer-freq must be positive, got {freq}")
        return tuple(1 if i % freq == 0 else 0 for i in range(num_layers))
    return tuple(freq)


def _vocab_size(args: argparse.Namespace) -> int:
    """Unpadded vocabulary size: from the tokenizer when one is given, else `--vocab-size`.

    Megatron's NullTokenizer adds one end-of-document id after the `--vocab-size` ids.
    """
    if args.tokenizer_type is not None:
        from megatron.core.tokenizer import build_tokenizer

        return build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size).vocab_size
    if args.vocab_size is None:
        raise ArgumentError(
            "--vocab-size is required with --mock-data or NullTokenizer (or give --tokenizer-type and --tokenizer-model)"
        )
    return args.vocab_size


def _capacity_factor(value: Optional[float]) -> Optional[float]:
    """Megatron treats a negative `--moe-expert-capacity-factor` as no capacity (dropless)."""
    return None if value is not None and value < 0 else value


def _iters_from_samples(samples: Optional[int], global_batch_size: int) -> Optional[int]:
    return None if samples is None else int(math.ceil(samples / global_batch_size))


def config_from_args(args: argparse.Namespace, world_size: Optional[int] = None) -> Config:
    """Build and validate the `Config`. Raises ValueError naming the flag on bad input."""
    if world_size is None:
        from megatron.core.parallel_state import launch_env

        world_size = launch_env().world_size
    if args.context_parallel_size not in (None, 1):
        raise ArgumentError("--context-parallel-size > 1 is not supported yet; use 1")
    sequence_parallel = args.sequence_parallel
    if sequence_parallel and args.tensor_model_parallel_size == 1:
        warnings.warn("--sequence-parallel has no effect with --tensor-model-parallel-size 1; disabling it")
        sequence_parallel = False
    if not args.accumulate_allreduce_grads_in_fp32:
        raise ArgumentError("--accumulate-allreduce-grads-in-fp32 cannot be turned off: gradients always "
                            "accumulate and are reduced in fp32")
    if args.transformer_impl == "transformer_engine":
        warnings.warn("--transformer-impl transformer_engine: no Transformer Engine backend yet; computing with the "
                      "local implementation (--ckpt-format torch writes Transformer Engine's tensor names)")

    num_layers = _require(args.num_layers, "--num-layers")
    hidden = _require(args.hidden_size, "--hidden-size")
    heads = _require(args.num_attention_heads, "--num-attention-heads")
    seq_length = _require(args.seq_length, "--seq-length")
    if args.kv_channels is None and heads > 0 and hidden % heads:
        raise ArgumentError(f"--num-attention-heads ({heads}) must divide --hidden-size ({hidden}); "
                            "pick a head count that divides it, or set --kv-channels")
    if args.ffn_hidden_size is None:
        ffn = int((4 * hidden * 2 / 3) / 64) * 64 if args.swiglu else 4 * hidden
    else:
        ffn = args.ffn_hidden_size
    pos_type = "rope" if args.use_rotary_position_embeddings else args.position_embedding_type
    if not args.add_position_embedding and pos_type == "learned_absolute":
        pos_type = "none"

    parallel = ParallelConfig(
        world_size=world_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        sequence_parallel=sequence_parallel,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        num_layers_per_virtual_pipeline_stage=args.num_layers_per_virtual_pipeline_stage,
        decoder_first_pipeline_num_layers=args.decoder_first_pipeline_num_layers,
        decoder_last_pipeline_num_layers=args.decoder_last_pipeline_num_layers,
        account_for_embedding_in_pipeline_split=args.account_for_embedding_in_pipeline_split,
        account_for_loss_in_pipeline_split=args.account_for_loss_in_pipeline_split,
        pipeline_schedule=args.pipeline_schedule,
        distributed_backend=args.distributed_backend,
        distributed_timeout_minutes=args.distributed_timeout_minutes,
        use_distributed_optimizer=args.use_distributed_optimizer,
        overlap_grad_reduce=args.overlap_grad_reduce,
        ddp_bucket_size=args.ddp_bucket_size,
    )

    moe = None
    if args.num_experts is not None:
        if args.moe_router_pre_softmax and args.moe_router_score_function == "sigmoid":
            warnings.warn("--moe-router-pre-softmax has no effect with --moe-router-score-function sigmoid")
        moe = MoEConfig(
            num_experts=args.num_experts,
            ffn_hidden_size=args.moe_ffn_hidden_size or ffn,
            layer_pattern=_moe_layer_pattern(args.moe_layer_freq, num_layers),
            router_topk=args.moe_router_topk,
            score_function=args.moe_router_score_function,
            pre_softmax=args.moe_router_pre_softmax,
            topk_scaling_factor=args.moe_router_topk_scaling_factor,
            load_balancing_type=args.moe_router_load_balancing_type,
            aux_loss_coeff=args.moe_aux_loss_coeff,
            z_loss_coeff=args.moe_z_loss_coeff,
            input_jitter_eps=args.moe_input_jitter_eps,
            capacity_factor=_capacity_factor(args.moe_expert_capacity_factor),
            token_drop_policy=args.moe_token_drop_policy,
            pad_to_capacity=args.moe_pad_expert_input_to_capacity,
            shared_expert_ffn_hidden_size=args.moe_shared_expert_intermediate_size,
            token_dispatcher_type=args.moe_token_dispatcher_type,
            enable_expert_bias=args.moe_router_enable_expert_bias,
            bias_update_rate=args.moe_router_bias_update_rate,
            router_type=args.moe_router_type,
            num_groups=args.moe_router_num_groups,
            group_topk=args.moe_router_group_topk,
            router_dtype=args.moe_router_dtype,
            force_load_balancing=args.moe_router_force_load_balancing,
        )

    data = DataConfig(
        mock_data=args.mock_data,
        data_path=args.data_path or [],
        split=args.split,
        train_data_path=args.train_data_path or [],
        valid_data_path=args.valid_data_path or [],
        test_data_path=args.test_data_path or [],
        data_cache_path=args.data_cache_path,
        num_workers=args.num_workers,
        tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model,
        vocab_size=args.vocab_size,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        eod_mask_loss=args.eod_mask_loss,
    )
    _check_data_source(data)
    _check_tokenizer(data)
    vocab = pad_vocab_size(_vocab_size(args), args.make_vocab_size_divisible_by, args.tensor_model_parallel_size)

    model = ModelConfig(
        num_layers=num_layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        ffn_hidden_size=ffn,
        seq_length=seq_length,
        vocab_size=vocab,
        num_query_groups=args.num_query_groups if args.group_query_attention else heads,
        kv_channels=args.kv_channels or max(hidden // heads, 1),
        max_position_embeddings=args.max_position_embeddings or seq_length,
        position_embedding_type=pos_type,
        rotary_base=float(args.rotary_base),
        rotary_percent=args.rotary_percent,
        normalization=args.normalization,
        norm_epsilon=args.norm_epsilon,
        swiglu=args.swiglu,
        untie_embeddings_and_output_weights=args.untie_embeddings_and_output_weights,
        init_method_std=args.init_method_std,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        add_bias_linear=args.add_bias_linear,
        add_qkv_bias=args.add_qkv_bias,
        qk_layernorm=args.qk_layernorm,
        moe=moe,
    )

    micro = _require(args.micro_batch_size, "--micro-batch-size")
    dp = parallel.data_parallel_size
    gbs = args.global_batch_size if args.global_batch_size is not None else micro * dp
    if args.train_iters is not None and args.train_samples is not None:
        raise ArgumentError("give only one of --train-iters and --train-samples")
    # Megatron-LM: --train-samples // global batch iterations (a partial last batch is not run)
    train_iters = args.train_iters if args.train_iters is not None else (
        None if args.train_samples is None else args.train_samples // gbs)
    train_iters = _require(train_iters, "--train-iters (or --train-samples)")

    decay_iters = args.lr_decay_iters or _iters_from_samples(args.lr_decay_samples, gbs) or train_iters
    if args.lr_warmup_fraction is not None:
        warmup = int(args.lr_warmup_fraction * decay_iters)
    elif args.lr_warmup_samples:
        warmup = _iters_from_samples(args.lr_warmup_samples, gbs)
    else:
        warmup = args.lr_warmup_iters
    optimizer = OptimizerConfig(
        lr=_require(args.lr, "--lr"),
        min_lr=args.min_lr,
        lr_decay_style=args.lr_decay_style,
        lr_warmup_iters=warmup,
        lr_warmup_init=args.lr_warmup_init,
        lr_decay_iters=decay_iters,
        lr_wsd_decay_iters=args.lr_wsd_decay_iters or _iters_from_samples(args.lr_wsd_decay_samples, gbs) or 0,
        lr_wsd_decay_style=args.lr_wsd_decay_style,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        clip_grad=args.clip_grad,
    )
    training = TrainingConfig(
        micro_batch_size=micro,
        global_batch_size=gbs,
        train_iters=train_iters,
        train_samples=args.train_samples,
        seed=args.seed,
        bf16=args.bf16,
        fp16=args.fp16,
        loss_scale=args.loss_scale,
        initial_loss_scale=args.initial_loss_scale,
        min_loss_scale=args.min_loss_scale,
        loss_scale_window=args.loss_scale_window,
        hysteresis=args.hysteresis,
        eval_interval=args.eval_interval,
        eval_iters=args.eval_iters,
        exit_interval=args.exit_interval,
        exit_duration_in_mins=args.exit_duration_in_mins,
        log_interval=args.log_interval,
        tensorboard_dir=args.tensorboard_dir,
        recompute_granularity="selective" if args.recompute_activations else args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        moe_layer_recompute=args.moe_layer_recompute,
        moe_per_layer_logging=args.moe_per_layer_logging,
        check_for_nan_in_loss_and_grad=args.check_for_nan_in_loss_and_grad,
    )
    checkpoint = CheckpointConfig(
        save=args.save,
        load=args.load,
        save_interval=args.save_interval,
        no_load_optim=args.no_load_optim,
        no_load_rng=args.no_load_rng,
        no_save_optim=args.no_save_optim,
        no_save_rng=args.no_save_rng,
        finetune=args.finetune,
        ckpt_format=args.ckpt_format,
        async_save=args.async_save,
        transformer_impl=args.transformer_impl,
        moe_grouped_gemm=args.moe_grouped_gemm,
    )
    cfg = Config(model=model, parallel=parallel, optimizer=optimizer, data=data,
                 training=training, checkpoint=checkpoint)
    validate(cfg)
    return cfg


def _check_data_source(data: DataConfig) -> None:
    """Exactly one data source, and every named dataset present on disk."""
    explicit = data.train_data_path or data.valid_data_path or data.test_data_path
    if not data.mock_data and not data.data_path and not explicit:
        raise ArgumentError("no training data: give --data-path PREFIX (or --train-data-path), or --mock-data")
    if data.mock_data and (data.data_path or explicit):
        raise ArgumentError("--mock-data cannot be combined with --data-path / --train-data-path")
    if data.data_path and explicit:
        raise ArgumentError("give either --data-path or --train/valid/test-data-path, not both")
    if data.data_path:
        from megatron.core.datasets.gpt_dataset import parse_split

        try:
            parse_split(data.split)
        except ValueError as e:
            raise ArgumentError(str(e)) from None
    for flag, paths in [("--data-path", data.data_path), ("--train-data-path", data.train_data_path),
                        ("--valid-data-path", data.valid_data_path), ("--test-data-path", data.test_data_path)]:
        for prefix in dataset_prefixes(paths, flag):
            for suffix in (".bin", ".idx"):
                if not os.path.isfile(prefix + suffix):
                    raise ArgumentError(
                        f"{flag}: {prefix + suffix} does not exist; give the prefix written by tools/preprocess_data.py"
                    )


def _check_tokenizer(data: DataConfig) -> None:
    """A known `--tokenizer-type` whose `--tokenizer-model` exists; one at all for real data."""
    from megatron.core.tokenizer import check_tokenizer_args

    if data.tokenizer_type is None:
        if data.eod_mask_loss and not data.mock_data:
            raise ArgumentError("--eod-mask-loss needs --tokenizer-type (and --tokenizer-model) for the end-of-document id")
        return
    try:
        check_tokenizer_args(data.tokenizer_type, data.tokenizer_model, data.vocab_size)
    except ValueError as e:
        raise ArgumentError(str(e)) from None
