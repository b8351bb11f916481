"""Convert checkpoints between Hugging Face and this framework's (Megatron legacy) format.

    python tools/checkpoint/convert.py --loader hf --saver megatron --load-dir HF_DIR --save-dir CKPT
    python tools/checkpoint/convert.py --loader megatron --saver hf --load-dir CKPT --save-dir HF_DIR

Hugging Face side: config.json + safetensors (Mixtral, Qwen3-MoE, Llama, Qwen3; see
megatron/training/hf_conversion.py). Megatron side: `--ckpt-format torch` checkpoints, ours or
Megatron-LM's in any Megatron-Core layout (expert-parallel shards are merged), or torch_dist;
written in the layout Megatron-LM uses for `--transformer-impl` and `--moe-grouped-gemm`
(megatron/training/megatron_layout.py). The output directory must be new or empty and appears
only when complete. Bad input is reported as one `convert.py: error: ...` line, exit status 2.
transformers is not needed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time
from typing import Callable, Optional

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)))

import torch  # noqa: E402

from megatron.training import hf_conversion as hfc  # noqa: E402
from megatron.training.atomic_dir import check_output_dir  # noqa: E402
from megatron.training.hf_checkpoint import (  # noqa: E402
    DEFAULT_MAX_SHARD_BYTES,
    read_hf_checkpoint,
    save_hf_checkpoint,
)
from megatron.training.megatron_layout import layout_for  # noqa: E402
from megatron.training.model_checkpoint import (  # noqa: E402
    ModelCheckpoint,
    load_model_checkpoint,
    save_model_checkpoint,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        raise ValueError(message)


def parse_size(text: str) -> int:
    """'5GB', '500MiB', '1000000' -> bytes."""
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"--max-shard-size: cannot parse {text!r}; give bytes or e.g. 5GB, 500MiB")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").lower()])


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="convert.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--loader", required=True, choices=sorted(LOADERS), help="format of --load-dir")
    p.add_argument("--saver", required=True, choices=sorted(SAVERS), help="format to write to --save-dir")
    p.add_argument("--load-dir", required=True, help="Hugging Face model dir, or Megatron checkpoint root/iteration dir")
    p.add_argument("--save-dir", required=True, help="output directory (must not exist, or be empty)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="cast floating-point tensors (default: keep the input's dtypes)")
    g = p.add_argument_group("Megatron output (--saver megatron)")
    g.add_argument("--transformer-impl", choices=["local", "transformer_engine"], default="local",
                   help="write the tensor names of Megatron-Core's local or Transformer Engine layer spec")
    g.add_argument("--moe-grouped-gemm", action="store_true",
                   help="write experts as TEGroupedMLP (transformer_engine) or GroupedMLP (local) instead of "
                        "SequentialMLP")
    g = p.add_argument_group("Hugging Face output (--saver hf)")
    g.add_argument("--hf-architecture", choices=sorted(hfc.ARCHITECTURES), default=None,
                   help="target model_type (default: inferred: mixtral, qwen3_moe, llama or qwen3)")
    g.add_argument("--hf-expert-layout", choices=hfc.EXPERT_LAYOUTS, default="per_expert",
                   help="per_expert: one tensor per expert, as save_pretrained and the Hub (default); "
                        "fused: transformers-5 gate_up_proj/down_proj [E, ...]")
    g.add_argument("--true-vocab-size", type=int, default=None,
                   help="write only this many vocabulary rows (default: the padded rows of the checkpoint)")
    g.add_argument("--max-shard-size", type=parse_size, default=DEFAULT_MAX_SHARD_BYTES,
                   help="largest safetensors shard (default 5GiB)")
    return p


# --------------------------------------------------------------------------- loaders


def load_hf(args: argparse.Namespace) -> ModelCheckpoint:
    """Our weights, config and flags from a Hugging Face model directory."""
    hf_config, hf_state_dict = read_hf_checkpoint(args.load_dir)
    flag_args, cfg = hfc.config_from_hf_config(hf_config)
    state_dict = hfc.hf_to_megatron_state_dict(hf_state_dict, cfg.model)
    return ModelCheckpoint(cfg.model, state_dict, dataclasses.asdict(cfg), flag_args, 0, {"hf_config": hf_config})


def load_megatron(args: argparse.Namespace) -> ModelCheckpoint:
    return load_model_checkpoint(args.load_dir)


LOADERS: dict[str, Callable[[argparse.Namespace], ModelCheckpoint]] = {"hf": load_hf, "megatron": load_megatron}


# --------------------------------------------------------------------------- savers


def save_megatron(args: argparse.Namespace, checkpoint: ModelCheckpoint) -> None:
    save_model_checkpoint(args.save_dir, checkpoint, layout_for(args.transformer_impl, args.moe_grouped_gemm))


def save_hf(args: argparse.Namespace, checkpoint: ModelCheckpoint) -> None:
    mc = checkpoint.model_config
    state_dict = hfc.megatron_to_hf_state_dict(checkpoint.state_dict, mc, args.hf_architecture,
                                               args.hf_expert_layout, args.true_vocab_size)
    embedding = state_dict[hfc.GLOBAL_RENAMES[0][1]]
    hf_config = hfc.model_config_to_hf_config(mc, args.hf_architecture, vocab_size=embedding.shape[0],
                                              dtype=embedding.dtype, passthrough=checkpoint.extra.get("hf_config"))
    if mc.moe is not None and mc.moe.capacity_factor is not None:
        print(f"convert.py: note: --moe-expert-capacity-factor {mc.moe.capacity_factor} is not carried over; "
              "Hugging Face models route without dropping tokens", file=sys.stderr)
    save_hf_checkpoint(args.save_dir, hf_config, state_dict, args.max_shard_size)


SAVERS: dict[str, Callable[[argparse.Namespace, ModelCheckpoint], None]] = {"hf": save_hf, "megatron": save_megatron}


# --------------------------------------------------------------------------- main


def cast(checkpoint: ModelCheckpoint, dtype: Optional[torch.dtype]) -> None:
    """Cast the floating-point tensors of `checkpoint` to `dtype` in place (None: leave them)."""
    if dtype is None:
        return
    checkpoint.state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in checkpoint.state_dict.items()}


def convert(args: argparse.Namespace) -> None:
    if not os.path.isdir(args.load_dir):
        raise ValueError(f"--load-dir {args.load_dir} is not a directory")
    check_output_dir(args.save_dir)
    start = time.time()
    checkpoint = LOADERS[args.loader](args)
    cast(checkpoint, DTYPES.get(args.dtype))
    SAVERS[args.saver](args, checkpoint)
    print(f"convert.py: converted {len(checkpoint.state_dict)} model tensors ({args.loader} -> {args.saver}) "
          f"to {args.save_dir} in {time.time() - start:.1f}s")


def main(argv: Optional[list[str]] = None) -> int:
    try:
        convert(build_parser().parse_args(argv))
    except (ValueError, OSError) as e:
        print(f"convert.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
