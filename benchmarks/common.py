"""Helpers shared by the benchmarks: timing (warm up, then the median of repeated runs) and the
small MoE model the CPU memory and pipeline benchmarks build."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], device: torch.device, warmup: int = 3, repeats: int = 10) -> float:
    """Median wall time of fn() in seconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os
    return f"CPU, {torch.get_num_threads()} threads ({os.cpu_count()} cores)"


SMALL_MOE_FLAGS = (
    "--num-layers {layers} --hidden-size {hidden} --ffn-hidden-size {ffn} --num-attention-heads 8 "
    "--group-query-attention --num-query-groups 4 --seq-length {seq} --max-position-embeddings {seq} "
    "--position-embedding-type rope --normalization RMSNorm --swiglu --disable-bias-linear "
    "--hidden-dropout 0 --attention-dropout 0 --vocab-size {vocab} --make-vocab-size-divisible-by 1 "
    "--num-experts {experts} --moe-router-topk 2 --moe-aux-loss-coeff 1e-2 "
    "--mock-data --micro-batch-size {mbs} --global-batch-size {gbs} --train-iters 100 --lr 1e-4 "
    "--eval-iters 0 --num-workers 0 --log-interval 1"
)
"""A Mixtral-like MoE of any size (str.format the fields): GQA 8/4 heads, SwiGLU, RoPE, RMSNorm, top-2."""
