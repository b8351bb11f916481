"""MoE layer forward+backward vs a dense SwiGLU FFN of equal active FLOPs, vs a per-expert loop.

    python benchmarks/moe_layer.py                       # CPU defaults
    python benchmarks/moe_layer.py --device cuda --dtype bf16 --tokens 8192 --hidden 4096 --ffn 14336

All three run in the same process on the same inputs; the ratios printed at the end are what
RESULTS.md records. The dense FFN has hidden size K*F, so its FLOPs equal the MoE layer's
expert FLOPs at perfect balance; the MoE layer additionally pays for routing, permutation and
the (im)balance of its experts.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import describe_device, median_time  # noqa: E402
from megatron.core.transformer.mlp import MLP  # noqa: E402
from megatron.core.transformer.moe.experts import per_expert_loop  # noqa: E402
from megatron.core.transformer.moe.moe_layer import MoELayer  # noqa: E402
from megatron.training.arguments import config_from_args, parse_args  # noqa: E402


def model_config(a: argparse.Namespace, num_experts: int, topk: int):
    flags = (f"--num-layers 1 --hidden-size {a.hidden} --ffn-hidden-size {a.ffn} --num-attention-heads 8 "
             f"--seq-length {a.tokens} --vocab-size 128 --mock-data --micro-batch-size 1 --train-iters 1 "
             f"--lr 1e-4 --swiglu --disable-bias-linear --num-experts {num_experts} --moe-router-topk {topk} "
             f"--moe-aux-loss-coeff 1e-2")
    return config_from_args(parse_args(flags.split()), world_size=1).model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1024, help="per-expert FFN hidden size F")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--skip-loop", action="store_true", help="skip the per-expert loop reference")
    a = p.parse_args()
    device = torch.device(a.device)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    torch.manual_seed(0)

    cfg = model_config(a, a.experts, a.topk)
    with torch.device(device):
        moe = MoELayer(cfg).to(dtype)
        dense = MLP(cfg, a.topk * a.ffn).to(dtype)
    x = torch.randn(1, a.tokens, a.hidden, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)

    def run_moe():
        out, routing = moe(x)
        (out + 0 * routing.aux_loss).backward(grad)

    def run_dense():
        dense(x).backward(grad)

    def run_loop():
        original = moe.experts.forward
        moe.experts.forward = lambda x_ND, counts: per_expert_loop(moe.experts, x_ND, counts)
        try:
            run_moe()
        finally:
            moe.experts.forward = original

    t_dense = median_time(run_dense, device, repeats=a.repeats)
    t_moe = median_time(run_moe, device, repeats=a.repeats)
    t_loop = None if a.skip_loop else median_time(run_loop, device, repeats=a.repeats)
    flops = 3 * 2 * a.tokens * a.topk * a.hidden * a.ffn * 3  # fwd + bwd, SwiGLU's three matmuls
    print(f"device: {describe_device(device)}  dtype: {a.dtype}  torch {torch.__version__}")
    print(f"shape: T={a.tokens} D={a.hidden} F={a.ffn} E={a.experts} K={a.topk} (dense FFN F={a.topk * a.ffn})")
    print(f"{'variant':<28}{'fwd+bwd ms':>12}{'TFLOP/s':>10}")
    rows = [("dense SwiGLU (equal FLOPs)", t_dense), ("MoE layer (grouped GEMM)", t_moe)]
    if t_loop is not None:
        rows.append(("MoE layer (per-expert loop)", t_loop))
    for name, t in rows:
        print(f"{name:<28}{t * 1e3:>12.2f}{flops / t / 1e12:>10.3f}")
    print(f"ratio MoE/dense: {t_moe / t_dense:.3f}")
    if t_loop is not None:
        print(f"ratio loop/grouped: {t_loop / t_moe:.3f}")


if __name__ == "__main__":
    main()
