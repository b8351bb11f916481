"""Token dispatch cost vs expert compute, and weak scaling over expert-parallel ranks.

    python benchmarks/dispatch.py                      # gloo CPU ranks, EP = 1, 2, 4
    python benchmarks/dispatch.py --backend nccl --device cuda --ep 1   # one GPU (NCCL path)
    torchrun --nproc-per-node 8 benchmarks/dispatch.py --backend nccl --device cuda --torchrun

For each EP size, every rank holds the same number of tokens (weak scaling) and runs one MoE
layer. Printed per EP size: the forward time of dispatch+combine and of the expert GEMMs (per
layer, rank 0, medians), fwd+bwd time of the whole layer, and tokens/s over all ranks. On CPU
the ranks share the machine's cores, so scaling there measures overhead, not speed-up.
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import describe_device, median_time  # noqa: E402
from megatron.core.parallel_state import groups_from_mesh  # noqa: E402
from megatron.core.transformer.moe.moe_layer import MoELayer  # noqa: E402
from megatron.training.arguments import config_from_args, parse_args  # noqa: E402


def layer_config(a, ep: int, world: int):
    flags = (f"--num-layers 1 --hidden-size {a.hidden} --ffn-hidden-size {a.ffn} --num-attention-heads 8 "
             f"--seq-length {a.tokens} --vocab-size 128 --mock-data --micro-batch-size 1 --train-iters 1 --lr 1e-4 "
             f"--swiglu --disable-bias-linear --num-experts {a.experts} --moe-router-topk {a.topk} "
             f"--moe-token-dispatcher-type {a.dispatcher} --expert-model-parallel-size {ep}")
    return config_from_args(parse_args(flags.split()), world_size=world).model


def measure(rank: int, world: int, a, out_path: str) -> None:
    device = torch.device(a.device, rank % max(torch.cuda.device_count(), 1)) if a.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    groups = groups_from_mesh(world, device, a.backend) if world > 1 else None
    cfg = layer_config(a, world, world)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        layer = MoELayer(cfg, ep_group=groups.ep if groups else None).to(dtype)
    torch.manual_seed(rank)
    x = torch.randn(1, a.tokens, a.hidden, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    x_TD = x.detach().view(-1, a.hidden)
    routing = layer.router(x_TD, seq_length=a.tokens)
    x_ND, counts, state = layer.dispatcher.dispatch(x_TD, routing)

    def exchange():
        xs, _, st = layer.dispatcher.dispatch(x_TD, routing)
        layer.dispatcher.combine(xs, st)

    def experts():
        layer.experts(x_ND, counts)

    def full():
        out, r = layer(x)
        out.backward(grad)

    # The two raw exchanges of the same volume (even splits), to separate transport from bookkeeping.
    rows = a.tokens * a.topk
    send = torch.randn(rows, a.hidden, device=device, dtype=dtype)
    recv = torch.empty_like(send)

    def raw_exchanges():
        if world > 1:
            dist.all_to_all_single(recv, send, group=groups.ep)
            dist.all_to_all_single(send, recv, group=groups.ep)

    with torch.no_grad():
        t_raw = median_time(raw_exchanges, device, repeats=a.repeats)
        t_exchange = median_time(exchange, device, repeats=a.repeats)
        t_experts = median_time(experts, device, repeats=a.repeats)
    t_full = median_time(full, device, repeats=a.repeats)
    if world > 1:
        dist.barrier()
    if rank == 0:
        torch.save({"exchange": t_exchange, "raw": t_raw, "experts": t_experts, "full": t_full,
                    "device": describe_device(device)},
                   out_path)


def _spawned(rank: int, world: int, port: int, a, out_path: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world) if a.device == "cpu" else 1)
    dist.init_process_group(a.backend, rank=rank, world_size=world)
    try:
        measure(rank, world, a, out_path)
    finally:
        gc.collect()  # see parallel_state.destroy
        dist.destroy_process_group()


def run_size(world: int, a) -> dict:
    out_path = tempfile.mktemp(suffix=".pt")
    if world == 1:
        measure(0, 1, a, out_path)
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.start_processes(_spawned, args=(world, port, a, out_path), nprocs=world, start_method="spawn")
    result = torch.load(out_path)
    os.remove(out_path)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ep", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--dispatcher", default="alltoall", choices=["alltoall", "allgather"])
    p.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--torchrun", action="store_true", help="already launched by torchrun: measure WORLD_SIZE only")
    a = p.parse_args()
    if a.torchrun:
        dist.init_process_group(a.backend)
        world, rank = dist.get_world_size(), dist.get_rank()
        out = os.path.join(tempfile.gettempdir(), "dispatch_bench.pt")
        measure(rank, world, a, out)
        if rank == 0:
            results = {world: torch.load(out)}
        gc.collect()
        dist.destroy_process_group()
        if rank != 0:
            return
    else:
        results = {ep: run_size(ep, a) for ep in a.ep}
    first = next(iter(results.values()))
    print(f"device: {first['device']}  backend: {a.backend}  dispatcher: {a.dispatcher}  dtype: {a.dtype}")
    print(f"per rank: T={a.tokens} D={a.hidden} F={a.ffn} E={a.experts} K={a.topk}")
    print(f"{'EP':>3}{'dispatch+combine ms':>21}{'raw a2a x2 ms':>15}{'experts ms':>12}{'exchange/experts':>18}"
          f"{'layer fwd+bwd ms':>18}{'tokens/s (all ranks)':>22}{'vs EP=1':>9}")
    base = None
    for ep, r in results.items():
        tps = ep * a.tokens / r["full"]
        base = base or tps
        print(f"{ep:>3}{r['exchange'] * 1e3:>21.2f}{r['raw'] * 1e3:>15.2f}{r['experts'] * 1e3:>12.2f}"
              f"{r['exchange'] / r['experts']:>18.2f}{r['full'] * 1e3:>18.2f}{tps:>22.0f}{tps / base:>9.2f}")
    bytes_per = a.tokens * a.topk * a.hidden * (2 if a.dtype == "bf16" else 4)
    print(f"bytes per exchange per rank at EP=e: {bytes_per} x (e-1)/e (see tools/estimate.py, benchmarks/SCALING.md)")


if __name__ == "__main__":
    main()
