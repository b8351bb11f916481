"""List the globals a Megatron-LM `args` pickle refers to (run ONLY in a separate venv).

    python3 -m venv /tmp/mcore && /tmp/mcore/bin/pip install torch==2.13.0 megatron-core==0.16.1 six regex pyyaml
    mkdir -p /tmp/mlm && git -C MEGATRON_LM_REPO archive core_v0.16.1 megatron/training megatron/legacy | tar -x -C /tmp/mlm
    cd /tmp && MLM_SOURCE=/tmp/mlm PYTHONPATH=/tmp/mlm /tmp/mcore/bin/python \
        /path/to/moetron/tools/megatron_parity/megatron_args_globals.py > megatron_lm_0.16.1_args_globals.txt

Megatron-LM's own `parse_args` and `validate_args` (from its `megatron/training/arguments.py`)
turn realistic MoE GPT command lines (local and Transformer Engine specs, with and without CUDA
graph scopes) into the `args` namespace its checkpoints pickle; the training loop then adds
`model_type`, as Megatron-LM's `pretrain` does. Each namespace is pickled with torch.save's
protocol and every GLOBAL / STACK_GLOBAL opcode is listed, one dotted name per line, sorted.
`tests/data/megatron_lm_0.16.1_args_globals.txt` holds the output; the CI test
`tests/unit/test_safe_load.py` checks that this framework's checkpoint reader admits exactly
those names (through stand-ins for Megatron-Core's classes).

CPU-only shims, none affecting the namespace: `megatron.training`'s package `__init__` (which
imports the whole training loop) is bypassed, the triton-only batch-invariant kernels module
is stood in for, and `torch.cuda.get_device_capability` answers (9, 0) for --moe-grouped-gemm.
"""

import os
import pickle
import pickletools
import sys
import types

ARGV = (
    "--num-layers 4 --hidden-size 256 --num-attention-heads 8 --group-query-attention --num-query-groups 4 "
    "--ffn-hidden-size 512 --seq-length 128 --max-position-embeddings 128 --position-embedding-type rope "
    "--normalization RMSNorm --swiglu --disable-bias-linear --untie-embeddings-and-output-weights "
    "--num-experts 8 --moe-router-topk 2 --moe-grouped-gemm --moe-aux-loss-coeff 1e-2 "
    "--moe-token-dispatcher-type alltoall --expert-model-parallel-size 2 --moe-layer-freq ([0]+[1]*3) "
    "--micro-batch-size 2 --global-batch-size 16 --train-iters 100 --lr 1e-4 --lr-decay-style cosine "
    "--lr-warmup-iters 10 --bf16 --tokenizer-type NullTokenizer --vocab-size 1000 --mock-data "
    "--save /tmp/x --load /tmp/x --save-interval 50 --ckpt-format torch --use-distributed-optimizer "
    "--attention-backend auto --use-mcore-models --seed 1234"
).split()
VARIANTS = {
    "local": ["--transformer-impl", "local"],
    "transformer_engine": ["--transformer-impl", "transformer_engine"],
    "cuda_graphs": ["--transformer-impl", "transformer_engine", "--cuda-graph-impl", "transformer_engine",
                    "--cuda-graph-scope", "attn", "moe_router"],
}


def _import_megatron_arguments():
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "2")
    os.environ.setdefault("LOCAL_RANK", "0")
    kernels = types.ModuleType("megatron.core.transformer.custom_layers.batch_invariant_kernels")
    for name in ("set_batch_invariant_mode", "is_batch_invariant_mode_enabled", "disable_batch_invariant_mode",
                 "enable_batch_invariant_mode"):
        setattr(kernels, name, lambda *a, **k: None)
    sys.modules[kernels.__name__] = kernels
    import megatron  # noqa: F401 - Megatron-Core's package; megatron.training comes from MLM_SOURCE
    training = types.ModuleType("megatron.training")
    training.__path__ = [os.path.join(os.environ["MLM_SOURCE"], "megatron", "training")]
    sys.modules["megatron.training"] = training
    from megatron.training import global_vars

    for name in dir(global_vars):
        if name.startswith("get_"):
            setattr(training, name, getattr(global_vars, name))
    import torch

    torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
    from megatron.training.arguments import parse_args, validate_args

    return parse_args, validate_args


def pickled_globals(obj) -> set[str]:
    data = pickle.dumps(obj, protocol=2)  # torch.save's default protocol
    names, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            names.add(arg.replace(" ", "."))
        elif isinstance(arg, str):
            strings.append(arg)
        if op.name == "STACK_GLOBAL":
            names.add(f"{strings[-2]}.{strings[-1]}")
    return names


def main() -> None:
    import contextlib
    import io

    parse_args, validate_args = _import_megatron_arguments()
    from megatron.core.enums import ModelType

    names: set[str] = set()
    for extra in VARIANTS.values():
        sys.argv = ["pretrain_gpt.py", *ARGV, *extra]
        with contextlib.redirect_stdout(io.StringIO()):  # validate_args prints every argument
            args = parse_args()
            validate_args(args, {})
        args.model_type = ModelType.encoder_or_decoder  # set by Megatron-LM's pretrain() before any save
        names |= pickled_globals(args)
    sys.stdout.write("".join(f"{n}\n" for n in sorted(names)))


if __name__ == "__main__":
    main()
