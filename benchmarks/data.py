"""Data pipeline benchmark: preprocessing throughput, index building, sample fetch, loader share.

    python benchmarks/data.py [--workdir DIR] [--documents 1000000] [--skip-training]

1. tools/preprocess_data.py on the stdlib corpus (8 MB, 4096-piece BPE): MB/s with 1 and 2 workers
2. GPT indices for 1M documents (mean 512 tokens, seq_length 2048, one epoch of samples):
   opening the .idx, building the indices, and reopening them from the cache
3. sample fetch latency of GPTDataset and of a two-way blend (seq_length 128 and 2048)
4. in a short training run of configs/quickstart_moe.yaml: time waiting for batches as a
   share of step time, with 0, 1 and 2 loader workers
Prints a Markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))

from megatron.core.datasets.blended_dataset import BlendedDataset, build_blending_indices  # noqa: E402
from megatron.core.datasets.gpt_dataset import GPTDataset  # noqa: E402
from megatron.core.datasets.indexed_dataset import IndexedDataset, encode_index  # noqa: E402

ROWS: list[tuple[str, str]] = []


def report(name: str, value: str) -> None:
    ROWS.append((name, value))
    print(f"{name}: {value}", flush=True)


def best_of(n: int, fn):
    """Smallest wall time of n calls (the machine may be shared), and the last result."""
    best, result = float("inf"), None
    for _ in range(n):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


# ---------------------------------------------------------------------- 1. preprocessing
def bench_preprocess(workdir: str) -> str:
    import make_stdlib_corpus
    import preprocess_data
    import train_tokenizer

    corpus = os.path.join(workdir, "stdlib.jsonl")
    make_stdlib_corpus.write_corpus(make_stdlib_corpus.sysconfig.get_paths()["stdlib"], corpus, 8_000_000)
    seconds, model = best_of(1, lambda: train_tokenizer.train(corpus, os.path.join(workdir, "tok"), 4096))
    report("tokenizer training (8 MB, BPE 4096)", f"{seconds:.1f} s")
    megabytes = os.path.getsize(corpus) / 1e6
    for workers in (1, 2):
        args = preprocess_data.build_parser().parse_args(
            ["--input", corpus, "--output-prefix", os.path.join(workdir, f"stdlib{workers}"),
             "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", model, "--append-eod",
             "--workers", str(workers), "--log-interval", "0"])
        seconds, _ = best_of(2, lambda: preprocess_data.preprocess(args))
        report(f"preprocess_data.py, {workers} worker{'s' if workers > 1 else ''}",
               f"{megabytes / seconds:.2f} MB/s ({megabytes:.1f} MB of JSONL in {seconds:.2f} s)")
    return os.path.join(workdir, "stdlib1_text_document"), model


# ---------------------------------------------------------------------- 2. index building
def synthetic_dataset(prefix: str, documents: int, seed: int = 0) -> None:
    """An .idx for `documents` documents of 1..1023 tokens and a sparse .bin of matching size."""
    lengths = np.random.default_rng(seed).integers(1, 1024, size=documents)
    with open(prefix + ".idx", "wb") as f:
        f.write(encode_index(np.uint16, lengths, np.arange(documents + 1)))
    with open(prefix + ".bin", "wb") as f:
        f.truncate(int(lengths.sum()) * 2)


def bench_index(workdir: str, documents: int) -> None:
    prefix = os.path.join(workdir, "synthetic")
    synthetic_dataset(prefix, documents)
    seconds, indexed = best_of(1, lambda: IndexedDataset(prefix))
    report(f"open + validate .idx, {documents:,} documents", f"{seconds * 1000:.0f} ms")
    seq_length = 2048
    num_samples = indexed.num_tokens // seq_length
    cache = os.path.join(workdir, "cache")
    make = lambda: GPTDataset(indexed, (0, documents), num_samples, seq_length, 1234, cache)  # noqa: E731
    seconds, _ = best_of(1, make)
    report(f"build GPT indices, {documents:,} documents, {num_samples:,} samples of {seq_length}",
           f"{seconds:.2f} s (incl. writing the .npy cache)")
    seconds, _ = best_of(3, make)
    report("reopen the same indices from the cache", f"{seconds * 1000:.0f} ms")
    seconds, _ = best_of(1, lambda: build_blending_indices([0.3, 0.7], 1_000_000))
    report("blend indices, 2 datasets, 1,000,000 samples", f"{seconds:.2f} s")


# ---------------------------------------------------------------------- 3. sample fetch
def latency(dataset, count: int = 2000) -> str:
    order = np.random.default_rng(0).integers(0, len(dataset), size=count)
    times = []
    for i in order:
        start = time.perf_counter()
        dataset[int(i)]
        times.append(time.perf_counter() - start)
    t = np.array(times) * 1e6
    return f"mean {t.mean():.0f} us, p50 {np.percentile(t, 50):.0f} us, p99 {np.percentile(t, 99):.0f} us"


def bench_fetch(workdir: str, prefix: str) -> None:
    indexed = IndexedDataset(prefix)
    cache = os.path.join(workdir, "cache")
    for seq_length in (128, 2048):
        ds = GPTDataset(indexed, (0, len(indexed)), 5000, seq_length, 1234, cache)
        report(f"GPTDataset[i], seq_length {seq_length}", latency(ds))
    half = len(indexed) // 2
    parts = [GPTDataset(indexed, (0, half), 4000, 128, 1, cache, "a"),
             GPTDataset(indexed, (half, len(indexed)), 4000, 128, 1, cache, "b")]
    arrays = build_blending_indices([0.3, 0.7], 5000)
    blend = BlendedDataset(parts, arrays["dataset_index"], arrays["dataset_sample_index"])
    report("BlendedDataset[i] (2 datasets), seq_length 128", latency(blend))


# ---------------------------------------------------------------------- 4. loader share of a step
def bench_training_share(workdir: str, prefix: str, model: str, steps: int = 20) -> None:
    """Wall time spent waiting for micro-batches vs the whole step, in the real loop's pieces,
    for `--num-workers` 0, 1 and 2."""
    import dataclasses

    from megatron.core import parallel_state
    from megatron.training.arguments import config_from_args, parse_args
    from megatron.training.data import build_datasets, build_loader, micro_batches
    from megatron.training.train import Trainer

    flags = (f"--config {REPO}/configs/quickstart_moe.yaml --data-path {prefix} --tokenizer-type "
             f"GPTSentencePieceTokenizer --tokenizer-model {model} --data-cache-path {workdir}/cache "
             f"--train-iters {3 * (steps + 5)}")
    cfg = config_from_args(parse_args(shlex.split(flags)), world_size=1)
    groups = parallel_state.initialize(cfg.parallel)
    trainer = Trainer(cfg, groups)
    train, _, _ = build_datasets(cfg, groups)
    for workers in (0, 1, 2):
        run_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=workers))
        batches = micro_batches(build_loader(train, run_cfg, groups), groups.device)
        waited = stepped = 0.0
        for step in range(steps + 5):
            start = time.perf_counter()
            chunk = [next(batches) for _ in range(cfg.num_microbatches)]
            got = time.perf_counter()
            trainer.train_step(chunk)
            end = time.perf_counter()
            if step >= 5:  # after warm-up and the loader's first prefetch
                waited += got - start
                stepped += end - start
        report(f"waiting for batches, quickstart MoE, --num-workers {workers}",
               f"{waited / steps * 1000:.2f} ms of {stepped / steps * 1000:.0f} ms a step "
               f"({100 * waited / stepped:.2f}%)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--documents", type=int, default=1_000_000)
    p.add_argument("--skip-training", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or tmp
        os.makedirs(workdir, exist_ok=True)
        prefix, model = bench_preprocess(workdir)
        bench_index(workdir, args.documents)
        bench_fetch(workdir, prefix)
        if not args.skip_training:
            bench_training_share(workdir, prefix, model)
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"{time.strftime('%Y-%m-%d')}\n")
    print("| measurement | result |\n| --- | --- |")
    for name, value in ROWS:
        print(f"| {name} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
