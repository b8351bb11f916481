"""Training-step throughput and memory: this framework vs Hugging Face MixtralForCausalLM, on CPU.

    python benchmarks/vs_hf_mixtral.py            # needs transformers (a benchmark-only dependency)

Same model shape (4 layers, hidden 256, FFN 512, 8 heads / 4 KV heads, 8 experts top-2, vocab
8192), same batch (8 x 256 tokens, fp32, 2 threads), same work per step: forward, backward
with the load-balancing loss (coefficient 0.02), gradient clipping at 1.0, and a fused AdamW
step. Every variant runs alone in its own process (so peak memories do not mix), in
interleaved rounds (so drift in the machine's speed hits all alike). transformers runs with each of
its expert implementations and the fastest is the reference. Our Trainer sets the C library's
malloc to keep freed memory on CPU (`megatron/training/host_memory.py`); the `+malloc` variants
give transformers the same setting, so the second ratio printed compares the frameworks alone.
Printed last: tokens/s and peak memory of every variant and the ratios ours / best transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = dict(layers=4, hidden=256, ffn=512, heads=8, kv_heads=4, experts=8, topk=2, seq=256, batch=8, vocab=8192)
HF_IMPLEMENTATIONS = ["eager", "grouped_mm", "batched_mm"]
VARIANTS = ["ours"] + [f"hf:{impl}" for impl in HF_IMPLEMENTATIONS] + ["hf:eager+malloc", "hf:grouped_mm+malloc"]


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tokens(seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, SHAPE["vocab"], (SHAPE["batch"], SHAPE["seq"] + 1), generator=g)


def ours_step_fn():
    import torch

    sys.path.insert(0, ROOT)
    from megatron.core.parallel_state import ProcessGroups
    from megatron.training.arguments import config_from_args, parse_args
    from megatron.training.train import Trainer

    s = SHAPE
    flags = (f"--num-layers {s['layers']} --hidden-size {s['hidden']} --ffn-hidden-size {s['ffn']} "
             f"--num-attention-heads {s['heads']} --group-query-attention --num-query-groups {s['kv_heads']} "
             f"--seq-length {s['seq']} --max-position-embeddings {s['seq']} --position-embedding-type rope "
             f"--normalization RMSNorm --swiglu --disable-bias-linear --untie-embeddings-and-output-weights "
             f"--hidden-dropout 0 --attention-dropout 0 --vocab-size {s['vocab']} --make-vocab-size-divisible-by 1 "
             f"--num-experts {s['experts']} --moe-router-topk {s['topk']} --moe-aux-loss-coeff 0.02 "
             f"--mock-data --micro-batch-size {s['batch']} --global-batch-size {s['batch']} --train-iters 10 "
             f"--lr 1e-4 --clip-grad 1.0 --weight-decay 0.0")
    trainer = Trainer(config_from_args(parse_args(flags.split()), world_size=1), ProcessGroups())
    data = tokens()
    batch = {"tokens": data[:, :-1], "labels": data[:, 1:], "loss_mask": torch.ones(s["batch"], s["seq"]),
             "position_ids": torch.arange(s["seq"]).expand(s["batch"], -1)}
    return lambda: trainer.train_step([batch])


def hf_step_fn(implementation: str):
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    s = SHAPE
    config = MixtralConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["ffn"],
                           num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                           num_key_value_heads=s["kv_heads"], num_local_experts=s["experts"],
                           num_experts_per_tok=s["topk"], max_position_embeddings=s["seq"],
                           output_router_logits=True, router_aux_loss_coef=0.02, tie_word_embeddings=False,
                           attn_implementation="sdpa", experts_implementation=implementation)
    model = MixtralForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=True)
    data = tokens()

    def step():
        out = model(input_ids=data[:, :-1], labels=data[:, :-1])  # HF shifts labels inside
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def worker(variant: str, steps: int, warmup: int) -> dict:
    """One variant alone in this process: median step time and peak memory."""
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(0)
    baseline = rss_mib()
    if variant.endswith("+malloc"):
        sys.path.insert(0, ROOT)
        from megatron.training.host_memory import keep_freed_host_memory

        keep_freed_host_memory()
    step = ours_step_fn() if variant == "ours" else hf_step_fn(variant.split(":", 1)[1].removesuffix("+malloc"))
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"variant": variant, "step_s": statistics.median(times), "peak_rss_mib": rss_mib(),
            "peak_above_imports_mib": rss_mib() - baseline}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.steps, a.warmup)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    runs: dict[str, list[dict]] = {}
    failed: dict[str, str] = {}
    for _ in range(a.rounds):  # interleaved rounds: drift in the machine's speed hits every variant alike
        for variant in VARIANTS:
            if variant in failed:
                continue
            proc = subprocess.run([sys.executable, __file__, "--worker", variant, "--steps", str(a.steps),
                                   "--warmup", str(a.warmup)], capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                failed[variant] = "killed (out of memory)" if proc.returncode in (-9, 137) else \
                    (proc.stderr.strip().splitlines() or ["?"])[-1]
                continue
            runs.setdefault(variant, []).append(json.loads(proc.stdout.strip().splitlines()[-1]))

    import torch
    import transformers

    print(f"CPU, 2 threads; torch {torch.__version__}, transformers {transformers.__version__}; shape {SHAPE}")
    print(f"{a.rounds} interleaved rounds of one process per variant; step time = best round's median")
    for variant, why in failed.items():
        print(f"{variant}: failed: {why}")
    tokens_per_step = SHAPE["batch"] * SHAPE["seq"]
    step_s = {v: min(r["step_s"] for r in rs) for v, rs in runs.items()}
    memory = {v: min(r["peak_above_imports_mib"] for r in rs) for v, rs in runs.items()}
    rss = {v: min(r["peak_rss_mib"] for r in rs) for v, rs in runs.items()}
    print(f"{'variant':<22}{'step ms':>10}{'tokens/s':>11}{'all rounds ms':>22}{'peak RSS MiB':>14}{'peak - imports':>16}")
    for v, t in step_s.items():
        rounds = "/".join(f"{r['step_s'] * 1e3:.0f}" for r in runs[v])
        print(f"{v:<22}{t * 1e3:>10.1f}{tokens_per_step / t:>11.0f}{rounds:>22}{rss[v]:>14.0f}{memory[v]:>16.0f}")
    shipped = [v for v in step_s if v.startswith("hf:") and not v.endswith("+malloc")]
    if shipped:
        best = min(shipped, key=step_s.get)
        print(f"throughput ours / best transformers as shipped ({best}): {step_s[best] / step_s['ours']:.2f}x")
        print(f"peak memory above imports, ours / {best}: {memory['ours'] / memory[best]:.2f}")
    tuned = [v for v in step_s if v.endswith("+malloc")]
    if tuned:
        best = min(tuned, key=step_s.get)
        print(f"throughput ours / best transformers with our malloc setting ({best}): "
              f"{step_s[best] / step_s['ours']:.2f}x")


if __name__ == "__main__":
    main()
