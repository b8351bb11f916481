"""Pipeline bubble and per-stage memory on gloo CPU ranks, against the theory and tools/estimate.py.

    python benchmarks/pipeline.py                       # P = 2, m = 2, 4, 8; 1F1B and interleaved (V = 2)
    python benchmarks/pipeline.py --microbatches 4 8 --repeats 7

One spawned world of P ranks (one thread each) trains the same MoE model with the real Trainer
under plain 1F1B and interleaved 1F1B for each micro-batch count m. Measured per rank:

* bubble: the step time T(m) of the pipeline schedule (from a barrier to the schedule's return,
  the slowest rank) and the rank's busy time, the wall time inside its stages' forward,
  backward and loss calls (wrapped with timers; waits for P2P are outside them). The measured
  bubble is 1 - busy / T(m) = 1 - m * t_stage / T(m); medians over `--repeats` steps after
  `--warmup` untimed ones. Theory: (P-1)/(m+P-1) for 1F1B, (P-1)/(V*m+P-1) interleaved, which
  assumes equal stages and free communication: a stage that is busier than the other, and P2P
  latency, both show up as extra bubble.
* memory: parameters, gradient buffers and optimizer state are summed exactly from their
  tensors after a step. Activations are the high-water mark, across one training step, of the
  bytes saved for backward (`torch.autograd.graph.saved_tensors_hooks`: each saved tensor's
  storage counted once while any graph holds it, parameters excluded). Not counted: transient
  working memory (the logits chunk of the fused loss, GEMM workspaces) and the stage
  inputs/outputs the pipelining library keeps outside the autograd graph (one T x D tensor per
  in-flight micro-batch). Both are compared with `tools/estimate.py`'s per-stage figures for
  the same flags and world (activations: its kept part, `stage_activation_parts`; the whole
  step's peak with transients is benchmarks/memory_model.py's).

With 2 cores, P = 2 gives each rank one core; larger P oversubscribes the cores (and says so).
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
import weakref

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import SMALL_MOE_FLAGS  # noqa: E402
from megatron.training.arguments import config_from_args, parse_args  # noqa: E402
from tests.distributed.harness import run_distributed  # noqa: E402
from tests.helpers import load_tool  # noqa: E402

MODEL_FLAGS = SMALL_MOE_FLAGS + " --pipeline-model-parallel-size {pp}"


# ---------------------------------------------------------------- pure helpers

def theory_bubble(P: int, V: int, m: int) -> float:
    """Idle fraction of a pipeline step with equal stages and free P2P: (P-1) / (V*m + P-1)."""
    return (P - 1) / (V * m + P - 1)


def measured_bubble(busy_s: float, step_s: float) -> float:
    """1 - busy / T: the share of the step a rank spends outside its stages' compute."""
    return 1.0 - busy_s / step_s


def flags_for(a, m: int, vp: int) -> str:
    """The training flags of one scenario: m micro-batches of one pipeline rank, V = vp chunks."""
    flags = MODEL_FLAGS.format(layers=a.layers, hidden=a.hidden, ffn=a.ffn, seq=a.seq, vocab=a.vocab,
                               experts=a.experts, mbs=a.mbs, gbs=a.mbs * m, pp=a.pp)
    return flags + (f" --virtual-pipeline-model-parallel-size {vp}" if vp > 1 else "")


def make_config(flags: str, world: int):
    return config_from_args(parse_args(shlex.split(flags)), world_size=world)


# ---------------------------------------------------------------- measurement on a rank

class SavedBytes:
    """Bytes saved for backward that are alive now, and their high-water mark.

    Use as `with counter.hooks(): ...`. Each saved tensor's storage counts once however many
    ops save it (or views of it); it stops counting when the last graph node holding it is
    freed. Storages in `exclude` (parameters) never count."""

    def __init__(self, exclude: set[int]):
        self.exclude = exclude
        self.refs: dict[int, list[int]] = {}  # storage pointer -> [references, bytes]
        self.live = 0
        self.peak = 0

    def _pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self.exclude or storage.nbytes() == 0:
            return t
        entry = self.refs.setdefault(key, [0, storage.nbytes()])
        if entry[0] == 0:
            self.live += entry[1]
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        holder = _Saved(t)
        weakref.finalize(holder, self._release, key)
        return holder

    def _release(self, key: int) -> None:
        entry = self.refs[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.refs[key]

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _Saved) else packed

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)


class _Saved:
    """A saved tensor, wrapped so that its release can be observed."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


def _timed(fn, totals: list):
    """fn, adding each call's wall time to totals[0]."""
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[0] += time.perf_counter() - start
    return wrapper


def instrument(trainer, totals: list, counter_slot: list) -> None:
    """Time every stage forward/backward and the loss of this rank's pipeline schedule into
    totals[0]; time the whole schedule (after a pipeline barrier) into totals[1]; run it under
    counter_slot[0]'s saved-tensor hooks when one is set."""
    sched = trainer.schedule.schedule
    stages = getattr(sched, "_stages", None) or [sched._stage]
    busy = [0.0]
    for stage in stages:
        for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
            setattr(stage, name, _timed(getattr(stage, name), busy))
    if sched._loss_fn is not None:
        sched._loss_fn = _timed(sched._loss_fn, busy)
    inner = trainer.schedule.train
    pp = trainer.groups.pp

    def train(batches, loss_scale=1.0):
        dist.barrier(group=pp)
        busy[0] = 0.0
        start = time.perf_counter()
        if counter_slot[0] is None:
            out = inner(batches, loss_scale)
        else:
            with counter_slot[0].hooks():
                out = inner(batches, loss_scale)
        totals[:] = [busy[0], time.perf_counter() - start]
        return out

    trainer.schedule.train = train


def model_state_bytes(trainer) -> dict:
    """Exact bytes of this rank's parameters, gradient buffers and optimizer state."""
    weights = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    grads = sum(s.grad_buffer.numel() * s.grad_buffer.element_size() for s in trainer.dp.sections)
    optimizer = sum(v.numel() * v.element_size() for state in trainer.optimizer.inner.state.values()
                    for v in state.values() if torch.is_tensor(v))
    return {"weights": weights, "grads": grads, "optimizer": optimizer}


def run_scenario(flags: str, world: int, pp: int, warmup: int, repeats: int) -> dict:
    """Train one scenario on this rank: timed steps, then one step under the saved-bytes counter."""
    from megatron.core.parallel_state import groups_from_mesh
    from megatron.training.data import build_datasets, build_loader, micro_batches
    from megatron.training.train import Trainer

    cfg = make_config(flags, world)
    groups = groups_from_mesh(1, torch.device("cpu"), "gloo", pp_size=pp)
    trainer = Trainer(cfg, groups)
    totals, counter_slot = [0.0, 0.0], [None]
    instrument(trainer, totals, counter_slot)
    train_ds, _, _ = build_datasets(cfg)
    batches = micro_batches(build_loader(train_ds, cfg, groups), groups.device)
    busy, step = [], []
    for i in range(warmup + repeats):
        trainer.train_step([next(batches) for _ in range(cfg.num_microbatches)])
        if i >= warmup:
            busy.append(totals[0])
            step.append(totals[1])
    exclude = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
    counter_slot[0] = SavedBytes(exclude)
    trainer.train_step([next(batches) for _ in range(cfg.num_microbatches)])
    return {"busy": busy, "step": step, "activations": counter_slot[0].peak, "left": counter_slot[0].live,
            **model_state_bytes(trainer)}


def _gemm_seconds(tokens: int, hidden: int, repeats: int = 100) -> float:
    """Median time of one [tokens, hidden] x [hidden, 4 hidden] product on this thread."""
    x, w = torch.randn(tokens, hidden), torch.randn(hidden, 4 * hidden)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(x, w)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def calibrate(rank: int, world: int, tokens: int, hidden: int) -> dict:
    """Two machine effects the bubble theory leaves out: how much slower a rank computes while
    the others compute too (shared cores, caches, memory bandwidth), and the one-way time of
    one stage-to-stage activation (tokens x hidden fp32) over gloo."""
    alone = 0.0
    for r in range(world):
        dist.barrier()
        if r == rank:
            alone = _gemm_seconds(tokens, hidden)
    dist.barrier()
    together = _gemm_seconds(tokens, hidden)
    buf = torch.randn(tokens, hidden)
    times = []
    for _ in range(20):
        dist.barrier()
        start = time.perf_counter()
        if rank == 0:
            dist.send(buf, 1)
            dist.recv(buf, 1)
        elif rank == 1:
            dist.recv(buf, 0)
            dist.send(buf, 0)
        times.append((time.perf_counter() - start) / 2)
    return {"alone": alone, "together": together, "p2p": statistics.median(times)}


def _worker(rank: int, world: int, scenarios: list, warmup: int, repeats: int, tokens: int, hidden: int) -> dict:
    machine = calibrate(rank, world, tokens, hidden)
    return {"machine": machine,
            "runs": [run_scenario(flags, world, world, warmup, repeats) for _, _, _, flags in scenarios]}


# ---------------------------------------------------------------- estimator and report

def estimated_stages(flags: str, world: int) -> list[dict]:
    """tools/estimate.py's per-stage memory for the same flags and world (one node of `world`),
    with the CPU constants (benchmarks/memory_model.py: RMSNorm keeps its fp32 input and output,
    the fused loss's logits chunk is 2^22 elements)."""
    estimate = load_tool("estimate")
    estimate.NORM_KEEPS_OUTPUT = True
    estimate.LOGITS_CHUNK = 2**22
    cfg = make_config(flags, world)
    return estimate.estimate(cfg, gpus_per_node=world, nodes=1, tflops=0.1, intra_gbps=10.0, inter_gbps=10.0,
                             alpha_us=100.0, overlap=True)["stages"]


def mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def print_machine(machine: list, tokens: int, hidden: int) -> None:
    slow = [m["together"] / m["alone"] for m in machine]
    print(f"machine: a [{tokens}, {hidden}] x [{hidden}, {4 * hidden}] product takes "
          + ", ".join(f"r{r} {m['alone'] * 1e3:.2f} ms alone / {m['together'] * 1e3:.2f} ms with every rank busy"
                      for r, m in enumerate(machine))
          + f" (x{min(slow):.2f}-{max(slow):.2f});\n         one activation P2P ({tokens * hidden * 4 / 2**20:.1f} MiB) "
          f"{machine[0]['p2p'] * 1e3:.2f} ms one way")


def print_bubbles(scenarios: list, results: list, P: int) -> None:
    print("\nbubble (median of the steps; busy = stage forward/backward/loss wall time, per rank)")
    print(f"{'schedule':<13}{'m':>3}{'T(m) ms':>10}" + "".join(f"{f'busy r{r} ms':>13}" for r in range(P))
          + f"{'measured':>10}{'theory':>8}{'meas/theory':>13}{'spread':>11}")
    for (name, m, V, _), per_rank in zip(scenarios, results):
        n = len(per_rank[0]["step"])
        steps = [max(per_rank[r]["step"][i] for r in range(P)) for i in range(n)]
        T = statistics.median(steps)
        busy = [statistics.median(per_rank[r]["busy"]) for r in range(P)]
        # per step: the bubble of the busiest stage (the one that sets the pace)
        per_step = [measured_bubble(max(per_rank[r]["busy"][i] for r in range(P)), steps[i]) for i in range(n)]
        b = statistics.median(per_step)
        th = theory_bubble(P, V, m)
        spread = f"{min(per_step):.2f}-{max(per_step):.2f}"
        print(f"{name:<13}{m:>3}{T * 1e3:>10.1f}" + "".join(f"{x * 1e3:>13.1f}" for x in busy)
              + f"{b:>10.3f}{th:>8.3f}{b / th:>13.2f}{spread:>11}")


def print_memory(scenarios: list, results: list, world: int, P: int) -> None:
    print("\nmemory per stage, MiB (measured: exact tensor bytes / saved-for-backward high-water mark; "
          "est: tools/estimate.py, its kept activations without the transient working sets)")
    print(f"{'schedule':<13}{'m':>3}{'stage':>6}{'state':>9}{'est':>9}{'ratio':>7}"
          f"{'activ.':>9}{'est':>9}{'ratio':>7}{'total ratio':>13}")
    for (name, m, _, flags), per_rank in zip(scenarios, results):
        est = estimated_stages(flags, world)
        for r in sorted({0, P - 1}):
            got = per_rank[r]
            state = got["weights"] + got["grads"] + got["optimizer"]
            e = dict(est[r], activations=est[r]["activation_parts"]["kept"])
            e_state = e["weights"] + e["grads"] + e["optimizer"]
            total = (state + got["activations"]) / (e_state + e["activations"])
            print(f"{name:<13}{m:>3}{r:>6}{mib(state):>9}{mib(e_state):>9}{state / e_state:>7.3f}"
                  f"{mib(got['activations']):>9}{mib(e['activations']):>9}"
                  f"{got['activations'] / e['activations']:>7.3f}{total:>13.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pp", type=int, default=2, help="pipeline stages (= ranks)")
    p.add_argument("--vp", type=int, default=2, help="model chunks per rank of the interleaved schedule")
    p.add_argument("--microbatches", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--mbs", type=int, default=2, help="micro-batch size")
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    P = world = a.pp
    scenarios = []
    for m in a.microbatches:
        scenarios.append(("1F1B", m, 1, flags_for(a, m, 1)))
    for m in a.microbatches:
        scenarios.append((f"interleaved{a.vp}", m, a.vp, flags_for(a, m, a.vp)))
    cores = os.cpu_count() or 1
    start = time.perf_counter()
    per_rank = run_distributed(_worker, world, scenarios, a.warmup, a.repeats, a.mbs * a.seq, a.hidden,
                               timeout=1800.0)
    results = [[per_rank[r]["runs"][i] for r in range(world)] for i in range(len(scenarios))]
    print(f"torch {torch.__version__}, gloo, {world} ranks x 1 thread on {cores} cores"
          + (" (cores oversubscribed)" if world > cores else ""))
    print(f"model: {a.layers} layers, D={a.hidden}, F={a.ffn}, {a.experts} experts top-2, SwiGLU, seq {a.seq}, "
          f"micro-batch {a.mbs} (T={a.mbs * a.seq} tokens), vocab {a.vocab}, fp32; P={P}, V={a.vp} interleaved")
    print_machine([per_rank[r]["machine"] for r in range(world)], a.mbs * a.seq, a.hidden)
    print_bubbles(scenarios, results, P)
    print_memory(scenarios, results, world, P)
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
