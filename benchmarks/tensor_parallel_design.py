"""Design check for tensor parallelism: explicit TP layers vs a DTensor `parallelize_module` plan.

    python benchmarks/tensor_parallel_design.py                  # 2 gloo CPU ranks
    python benchmarks/tensor_parallel_design.py --hidden 1024 --ffn 2816 --seq 1024

The same SwiGLU MLP block (fc1 D -> 2F column-parallel, swiglu, fc2 F -> D row-parallel) is
split over T ranks two ways:

- explicit: `tensor_parallel.ColumnParallelLinear` / `RowParallelLinear` (autograd functions
  around plain collectives; fc1 split as [gate slice; up slice]);
- dtensor: `torch.distributed.tensor.parallel.parallelize_module` with ColwiseParallel on fc1
  and RowwiseParallel on fc2 (its rows permuted first to [g0; u0; g1; u1; ...], since a plain
  colwise split of [gate; up] would give rank 0 all of gate and rank 1 all of up).

Both run with and without sequence parallelism (input x_BsD sharded along dim 1; DTensor:
`input_layouts=Shard(1)` / `output_layouts=Shard(1)`). Printed per mode: the median
forward+backward step time of each (rank 0) and their ratio, after checking the two give the
same output. On CPU the ranks share the machine's cores: this measures the per-step overhead
of each mechanism, not a TP speed-up.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import describe_device, median_time  # noqa: E402
from megatron.core.fusions.swiglu import swiglu  # noqa: E402
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, split_swiglu_fc1  # noqa: E402
from tests.distributed.harness import run_distributed  # noqa: E402


class MLP(torch.nn.Module):
    """x_BSD -> fc2(swiglu(fc1(x))): the block both plans parallelise (no bias, as the tiny configs)."""

    def __init__(self, fc1, fc2):
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2

    def forward(self, x):
        return self.fc2(swiglu(self.fc1(x)))


def interleave_gate_up(w_2FD: torch.Tensor, tp: int) -> torch.Tensor:
    """[gate; up] -> [g_0; u_0; g_1; u_1; ...] so that a contiguous row split gives [g_r; u_r]."""
    gate, up = w_2FD.chunk(2, dim=0)
    return torch.cat([t for pair in zip(gate.chunk(tp), up.chunk(tp)) for t in pair], dim=0)


def explicit_mlp(w1, w2, group, sp: bool) -> MLP:
    return MLP(ColumnParallelLinear.from_full(w1, None, group, sp, split=split_swiglu_fc1),
               RowParallelLinear.from_full(w2, None, group, sp))


def dtensor_mlp(w1, w2, mesh, sp: bool) -> MLP:
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp = mesh.size()
    fc1 = torch.nn.Linear(w1.shape[1], w1.shape[0], bias=False)
    fc2 = torch.nn.Linear(w2.shape[1], w2.shape[0], bias=False)
    with torch.no_grad():
        fc1.weight.copy_(interleave_gate_up(w1, tp))
        fc2.weight.copy_(w2)
    colwise = ColwiseParallel(input_layouts=Shard(1)) if sp else ColwiseParallel()
    rowwise = RowwiseParallel(output_layouts=Shard(1)) if sp else RowwiseParallel()
    return parallelize_module(MLP(fc1, fc2), mesh, {"fc1": colwise, "fc2": rowwise})


def step(mlp: MLP, x: torch.Tensor, g: torch.Tensor):
    def run():
        for p in mlp.parameters():
            p.grad = None
        x.grad = None
        y = mlp(x)
        (y * g).sum().backward()
        return y
    return run


def measure(rank: int, world: int, a) -> list:
    from torch.distributed.device_mesh import DeviceMesh

    torch.set_num_threads(a.threads)
    group = dist.new_group(list(range(world)))
    mesh = DeviceMesh("cpu", list(range(world)))
    gen = torch.Generator().manual_seed(0)
    w1 = torch.randn(2 * a.ffn, a.hidden, generator=gen) * 0.02
    w2 = torch.randn(a.hidden, a.ffn, generator=gen) * 0.02
    x_full = torch.randn(a.batch, a.seq, a.hidden, generator=gen)
    g_full = torch.randn(a.batch, a.seq, a.hidden, generator=gen)
    rows = []
    for sp in (False, True):
        x = x_full.chunk(world, 1)[rank].contiguous() if sp else x_full.clone()
        g = g_full.chunk(world, 1)[rank].contiguous() if sp else g_full
        x.requires_grad_()
        runs = {"explicit": step(explicit_mlp(w1, w2, group, sp), x, g),
                "dtensor": step(dtensor_mlp(w1, w2, mesh, sp), x, g)}
        outs = {k: fn().detach() for k, fn in runs.items()}
        diff = ((outs["explicit"] - outs["dtensor"]).abs().max() / outs["explicit"].abs().max()).item()
        times = {k: median_time(fn, torch.device("cpu"), a.warmup, a.repeats) for k, fn in runs.items()}
        rows.append({"sp": sp, "diff": diff, **times})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1408)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=15)
    a = p.parse_args()
    rows = run_distributed(measure, a.tp, a)[0]
    torch.set_num_threads(a.threads)
    print(f"SwiGLU MLP B={a.batch} S={a.seq} D={a.hidden} F={a.ffn}, TP={a.tp} gloo ranks, fp32, "
          f"{describe_device(torch.device('cpu'))} per rank; fwd+bwd step, median of {a.repeats} (rank 0)")
    print(f"{'mode':<8} {'explicit ms':>12} {'dtensor ms':>11} {'dtensor/explicit':>17} {'max rel diff':>13}")
    for r in rows:
        mode = "SP" if r["sp"] else "no SP"
        print(f"{mode:<8} {1e3 * r['explicit']:>12.2f} {1e3 * r['dtensor']:>11.2f} "
              f"{r['dtensor'] / r['explicit']:>17.3f} {r['diff']:>13.1e}")


if __name__ == "__main__":
    main()
