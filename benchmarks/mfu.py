"""Model FLOPs utilisation of a Mixtral-shaped proxy on one GPU (bf16).

    python benchmarks/mfu.py                          # hidden 4096, 8 experts top-2, FFN 14336, seq 4096
    python benchmarks/mfu.py --layers 4 --recompute-granularity selective --moe-layer-recompute

Builds the model with this framework's Trainer (grouped GEMM experts, fused AdamW, SDPA flash
attention), runs warm-up steps, then times `--steps` optimizer steps and reports tokens/s,
TFLOP/s per GPU (the FLOPs of docs/architecture.md) and MFU against the bf16 dense peak (989 TFLOP/s for
H100/H200 SXM), plus peak memory. Add layers until memory runs out to find "as many as fit".
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.core.parallel_state import ProcessGroups  # noqa: E402
from megatron.training.arguments import config_from_args, parse_args  # noqa: E402
from megatron.training.flops import training_flops_per_iteration  # noqa: E402
from megatron.training.train import Trainer  # noqa: E402

PEAK_TFLOPS = 989.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    a, extra = p.parse_known_args()
    if not torch.cuda.is_available():
        sys.exit("mfu.py: error: needs a CUDA GPU")
    flags = (f"--num-layers {a.layers} --hidden-size 4096 --ffn-hidden-size 14336 --num-attention-heads 32 "
             f"--group-query-attention --num-query-groups 8 --seq-length {a.seq_length} "
             f"--max-position-embeddings {a.seq_length} --position-embedding-type rope --normalization RMSNorm "
             f"--swiglu --disable-bias-linear --untie-embeddings-and-output-weights --hidden-dropout 0 "
             f"--attention-dropout 0 --vocab-size 32000 --num-experts 8 --moe-router-topk 2 "
             f"--moe-aux-loss-coeff 1e-2 --mock-data --micro-batch-size {a.micro_batch_size} "
             f"--global-batch-size {a.micro_batch_size} --train-iters 100 --lr 1e-4 --bf16")
    cfg = config_from_args(parse_args(flags.split() + extra), world_size=1)
    groups = ProcessGroups(device=torch.device("cuda"))
    trainer = Trainer(cfg, groups)
    B, S, V = a.micro_batch_size, a.seq_length, cfg.model.vocab_size
    tokens = torch.randint(0, V, (B, S + 1), device="cuda")
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(B, S, device="cuda"),
             "position_ids": torch.arange(S, device="cuda").expand(B, S)}
    for _ in range(a.warmup):
        trainer.train_step([batch])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(a.steps):
        start = time.perf_counter()
        trainer.train_step([batch])
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    t = statistics.median(times)
    tflops = training_flops_per_iteration(cfg.model, B) / t / 1e12
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"layers {a.layers}, micro-batch {B}, seq {S}, extra flags: {' '.join(extra) or '-'}")
    print(f"step {t * 1e3:.1f} ms, {B * S / t:.0f} tokens/s, {tflops:.1f} TFLOP/s, MFU {100 * tflops / PEAK_TFLOPS:.1f}%, "
          f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
