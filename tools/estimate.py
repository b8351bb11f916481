"""Back-of-the-envelope model of an MoE run: parameters, memory, FLOPs, all-to-all volume, step time.

    python tools/estimate.py --config configs/mixtral_8x7b.yaml --nodes 8 --gpus-per-node 8
    python tools/estimate.py --config configs/tiny_moe.yaml --gpus-per-node 4 --expert-model-parallel-size 4 \
        --tflops 0.05 --intra-node-gbps 8 --alpha-us 200          # a CPU/gloo-sized "device"

Any training flag can follow (they override the config). The model:

* compute: training FLOPs per token (docs/architecture.md) x tokens per GPU / achieved TFLOP/s;
* all-to-all (alltoall dispatcher): per MoE layer and micro-batch, each rank sends and receives
  T*K*D*b*(EP-1)/EP bytes for dispatch and again for combine, and the backward pass repeats
  both: 4 exchanges. Time = bytes / bandwidth + alpha * (EP - 1) per exchange, with the
  inter-node bandwidth once the EP group spans nodes;
* gradient reduction: ring all-reduce (or reduce-scatter + all-gather) of 2 * (n-1)/n of the
  gradient bytes over the data-parallel groups, assumed overlapped unless --no-overlap;
* memory: weights, fp32 gradients, AdamW moments (sharded over DP with the distributed
  optimizer), and a rough activation estimate.
benchmarks/SCALING.md compares its prediction with the measured CPU weak scaling.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from megatron.training.arguments import config_from_args, parse_args  # noqa: E402
from megatron.training.flops import active_params_per_layer, training_flops_per_token  # noqa: E402


def total_params(model) -> tuple[int, int, int]:
    """(total, expert, non-expert) parameters of the whole model (EP = 1)."""
    D, V = model.hidden_size, model.vocab_size
    embed = D * V * (1 if not model.untie_embeddings_and_output_weights else 2)
    expert = dense = 0
    for layer in range(model.num_layers):
        active = active_params_per_layer(model, layer)
        moe = model.moe
        if moe is not None and moe.is_moe_layer(layer):
            per_expert = D * moe.ffn_hidden_size * (3 if model.swiglu else 2)
            expert += moe.num_experts * per_expert
            dense += active - moe.router_topk * per_expert
        else:
            dense += active
    return embed + dense + expert, expert, embed + dense


def exchange_seconds(nbytes: float, peers: int, gbps: float, alpha_us: float) -> float:
    return nbytes / (gbps * 1e9 / 8) + alpha_us * 1e-6 * peers


def estimate(cfg, gpus_per_node: int, nodes: int, tflops: float, intra_gbps: float, inter_gbps: float,
             alpha_us: float, overlap: bool, peak_tflops: float = 989.0) -> dict:
    m, t, p = cfg.model, cfg.training, cfg.parallel
    world = gpus_per_node * nodes
    ep, dp = p.expert_model_parallel_size, world
    b = 2 if (t.bf16 or t.fp16) else 4
    tokens_per_gpu = t.global_batch_size * m.seq_length / world
    flops_token = training_flops_per_token(m)
    compute_s = flops_token * tokens_per_gpu / (tflops * 1e12)

    moe_layers = sum(m.moe.layer_pattern) if m.moe else 0
    T = t.micro_batch_size * m.seq_length
    K = m.moe.router_topk if m.moe else 0
    per_exchange = T * K * m.hidden_size * b * (ep - 1) / ep
    a2a_bytes = 4 * moe_layers * cfg.num_microbatches * per_exchange
    spans_nodes = ep > gpus_per_node
    a2a_gbps = inter_gbps if spans_nodes else intra_gbps
    a2a_s = 4 * moe_layers * cfg.num_microbatches * exchange_seconds(per_exchange, ep - 1, a2a_gbps, alpha_us) \
        if ep > 1 else 0.0

    total, expert, dense = total_params(m)
    edp = world // ep
    grad_bytes = 4 * (dense * 2 * (dp - 1) / dp + expert / ep * 2 * (edp - 1) / edp)
    dp_gbps = inter_gbps if nodes > 1 else intra_gbps
    grad_s = grad_bytes / (dp_gbps * 1e9 / 8)
    step_s = compute_s + a2a_s + (0.0 if overlap else grad_s)

    local = dense + expert / ep
    shard = dp if p.use_distributed_optimizer else 1
    shard_e = edp if p.use_distributed_optimizer else 1
    optim_bytes = 8 * (dense / shard + expert / ep / shard_e)
    act_bytes = 34 * T * m.hidden_size * m.num_layers * (b / 2)  # Korthikanti et al.'s per-layer estimate
    return {
        "world": world, "ep": ep, "total_params": total, "active_params_per_token": flops_token / 6,
        "local_params": local, "tokens_per_gpu_per_step": tokens_per_gpu,
        "compute_s": compute_s, "a2a_bytes_per_gpu": a2a_bytes, "a2a_s": a2a_s, "a2a_inter_node": spans_nodes,
        "grad_reduce_bytes_per_gpu": grad_bytes, "grad_reduce_s": grad_s, "step_s": step_s,
        "tokens_per_s": t.global_batch_size * m.seq_length / step_s,
        "memory_gib": (4 * local + 4 * local + optim_bytes + act_bytes) / 2**30,
        "mfu": flops_token * tokens_per_gpu / step_s / (peak_tflops * 1e12),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], add_help=True)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--tflops", type=float, default=400.0, help="achieved dense TFLOP/s per GPU")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="spec peak for MFU (H100/H200 bf16 dense)")
    p.add_argument("--intra-node-gbps", type=float, default=3600.0, help="per-GPU intra-node bandwidth, Gbit/s")
    p.add_argument("--inter-node-gbps", type=float, default=400.0, help="per-GPU inter-node bandwidth, Gbit/s")
    p.add_argument("--alpha-us", type=float, default=10.0, help="latency per peer per exchange, microseconds")
    p.add_argument("--no-overlap", action="store_true", help="gradient reduction not hidden behind backward")
    a, rest = p.parse_known_args(argv)
    world = a.nodes * a.gpus_per_node
    extra = [] if "--mock-data" in rest or "--data-path" in rest else ["--mock-data"]
    if "--vocab-size" not in rest:
        extra += ["--vocab-size", "32000"]
    try:
        cfg = config_from_args(parse_args(rest + extra), world_size=world)
    except ValueError as e:
        print(f"estimate.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    r = estimate(cfg, a.gpus_per_node, a.nodes, a.tflops, a.intra_node_gbps, a.inter_node_gbps, a.alpha_us,
                 not a.no_overlap, a.peak_tflops)
    print(f"world {r['world']} ({a.nodes} x {a.gpus_per_node}), expert-parallel {r['ep']}")
    print(f"parameters: {r['total_params'] / 1e9:.2f} B total, {r['local_params'] / 1e9:.2f} B per GPU; "
          f"training FLOPs per token / 6 = {r['active_params_per_token'] / 1e9:.2f} B")
    print(f"per step and GPU: {r['tokens_per_gpu_per_step']:.0f} tokens, compute {r['compute_s'] * 1e3:.1f} ms")
    print(f"all-to-all: {r['a2a_bytes_per_gpu'] / 2**30:.2f} GiB sent per GPU per step "
          f"({'inter' if r['a2a_inter_node'] else 'intra'}-node), {r['a2a_s'] * 1e3:.1f} ms")
    print(f"gradient reduction: {r['grad_reduce_bytes_per_gpu'] / 2**30:.2f} GiB per GPU, {r['grad_reduce_s'] * 1e3:.1f} ms"
          f" ({'not ' if a.no_overlap else ''}overlapped)")
    print(f"step {r['step_s'] * 1e3:.1f} ms, {r['tokens_per_s']:.0f} tokens/s, MFU {100 * r['mfu']:.1f}%, "
          f"memory ~{r['memory_gib']:.1f} GiB per GPU")


if __name__ == "__main__":
    main()
