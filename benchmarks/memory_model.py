"""Peak memory of a whole training step per rank, measured, against tools/estimate.py's memory model.

    python benchmarks/memory_model.py                  # every layout below, 1 and 2 gloo ranks
    python benchmarks/memory_model.py --only ep2 tp2-sp-etp1

Each layout trains a small Mixtral-like MoE with the real Trainer on gloo CPU ranks (one thread
each). Every tensor a rank allocates, from building the Trainer on, is tracked by `LiveBytes`,
a `TorchDispatchMode` that sees the output of every aten op (forward, autograd's backward,
collectives, the optimizer) and counts each untyped storage once, from the op that creates it
until the storage is freed (a weak reference's callback). After `--warmup` steps the high-water
mark is reset to what is live, and one more step is measured: its peak is every byte live at
the worst moment, split at that moment into

* weights, grads, optimizer: the model parameters, the flat fp32 gradient buffers, AdamW's
  state and the fp32 main parameters (exact storages, labelled at the start of the step);
* saved: activations some autograd graph holds for backward (`saved_tensors_hooks` relabel
  a storage when a graph saves it);
* other: everything else live at the peak: gradients in flight, the fused loss's logits chunk,
  recomputed activations, dispatcher buffers, pipelining I/O, the batch, RoPE tables.

RSS is not used (the Trainer keeps freed heap memory, `megatron.training.host_memory`), and what
C++ kernels allocate without returning it (gloo's scratch, a fused kernel's workspace) is not
seen. The estimate is `stage_memory` for the same flags and world, with the CPU constants
(`NORM_KEEPS_OUTPUT`: CPU RMSNorm keeps its output; the fused loss's CPU chunk of 2^22 logits).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
import weakref
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import SMALL_MOE_FLAGS  # noqa: E402
from megatron.training.arguments import config_from_args, parse_args  # noqa: E402
from tests.distributed.harness import run_distributed  # noqa: E402
from tests.helpers import load_tool  # noqa: E402

RECOMPUTE_FULL = "--recompute-granularity full --recompute-method uniform --recompute-num-layers 1"
EP2 = "--expert-model-parallel-size 2 --moe-token-dispatcher-type alltoall"

# (name, world size, extra flags); the global batch is micro-batches x micro-batch size x DP
LAYOUTS = [
    ("single", 1, ""),
    ("single-bf16", 1, "--bf16"),
    ("single-recompute-full", 1, RECOMPUTE_FULL),
    ("single-moe-recompute", 1, "--moe-layer-recompute"),
    ("single-shared-expert", 1, "--moe-shared-expert-intermediate-size 512"),
    ("single-dense-ffn", 1, "--moe-layer-freq 2"),  # every other layer a dense SwiGLU FFN
    ("ep2", 2, EP2),
    ("ep2-bf16", 2, EP2 + " --bf16"),
    ("ep2-recompute-full", 2, EP2 + " " + RECOMPUTE_FULL),
    ("dp2-distopt", 2, "--use-distributed-optimizer"),
    ("dp2-distopt-bf16", 2, "--use-distributed-optimizer --bf16"),
    ("tp2-sp-etp1", 2, "--tensor-model-parallel-size 2 --sequence-parallel --expert-tensor-parallel-size 1"),
    ("tp2-sp-etp2", 2, "--tensor-model-parallel-size 2 --sequence-parallel --expert-tensor-parallel-size 2"),
    ("pp2-1f1b", 2, "--pipeline-model-parallel-size 2"),
    ("pp2-vp2", 2, "--pipeline-model-parallel-size 2 --virtual-pipeline-model-parallel-size 2"),
    ("tp2-sp-dense-ffn", 2, "--tensor-model-parallel-size 2 --sequence-parallel --moe-layer-freq 2"),
    ("tp2-sp-ep2-etp1", 4, "--tensor-model-parallel-size 2 --sequence-parallel --expert-tensor-parallel-size 1 "
     + EP2),
    ("pp2-ep2-distopt-bf16", 4, "--pipeline-model-parallel-size 2 --use-distributed-optimizer --bf16 " + EP2),
]

STATE_PARTS = ("weights", "grads", "optimizer")
PARTS = STATE_PARTS + ("saved", "other")


# ---------------------------------------------------------------- the tracker

class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages alive now, by label, and their high-water mark.

    Every aten op's output storage is counted once, under the label current when it was first
    seen (`label`), from then until the storage is freed. `relabel` moves a storage to another
    label (e.g. "saved" once autograd keeps it). `reset_peak` starts a new high-water mark from
    what is live; `peak_parts` is the split by label at the peak."""

    def __init__(self):
        super().__init__()
        self._storages: dict[int, list] = {}  # StorageImpl address -> [bytes, label, weak ref, (op, shape, dtype)]
        self.by_label: dict[str, int] = defaultdict(int)
        self.live = 0
        self.peak = 0
        self.peak_parts: dict[str, int] = {}
        self.label = "other"
        self.detail = False
        """Also keep, at the peak, the largest storages of each label with the op that made them."""
        self.peak_detail: list = []
        self._op = ""
        self.in_schedule = False
        """Set while the forward/backward schedule runs; `peak_phase` is "backward" (inside an
        autograd backward node), "forward" (elsewhere in the schedule: forward and the loss) or
        "step" (outside it: gradient reduction and the optimizer)."""
        self.peak_phase = ""

    # ---- counting
    def _track(self, t: torch.Tensor) -> None:
        if t.device.type == "meta":
            return
        storage = t.untyped_storage()
        key, nbytes = storage._cdata, storage.nbytes()
        entry = self._storages.get(key)
        if entry is not None:
            if entry[0] != nbytes:  # resized in place (an out= op)
                self._add(entry[1], nbytes - entry[0])
                entry[0] = nbytes
            return
        if nbytes == 0:
            return
        ref = weakref.ref(storage, lambda _, key=key: self._free(key))
        self._storages[key] = [nbytes, self.label, ref, (self._op, tuple(t.shape), t.dtype) if self.detail else None]
        self._add(self.label, nbytes)

    def _add(self, label: str, nbytes: int) -> None:
        self.by_label[label] += nbytes
        self.live += nbytes
        if self.live > self.peak:
            self.peak = self.live
            self.peak_parts = dict(self.by_label)
            self.peak_phase = ("backward" if torch._C._current_autograd_node() is not None
                               else "forward" if self.in_schedule else "step")
            if self.detail:
                self.peak_detail = sorted(((e[0], e[1], e[3]) for e in self._storages.values()),
                                          key=lambda e: -e[0])[:120]

    def _free(self, key: int) -> None:
        nbytes, label = self._storages.pop(key)[:2]
        self.by_label[label] -= nbytes
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.detail:
            self._op = str(func)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    # ---- labels
    def relabel(self, t: torch.Tensor, label: str) -> None:
        """Count t's storage under `label` from now on (if it is tracked)."""
        entry = self._storages.get(t.untyped_storage()._cdata)
        if entry is not None and entry[1] != label:
            self.by_label[entry[1]] -= entry[0]
            self.by_label[label] += entry[0]
            entry[1] = label

    def reset_peak(self) -> None:
        self.peak = self.live
        self.peak_parts = dict(self.by_label)
        self.peak_phase = "start"

    def saved_hooks(self):
        """Saved-tensor hooks that relabel what autograd keeps for backward as "saved" (a storage
        stays "saved" until freed; state tensors, e.g. weights, keep their label)."""
        def pack(t):
            entry = self._storages.get(t.untyped_storage()._cdata)
            if entry is not None and entry[1] not in STATE_PARTS:
                self.relabel(t, "saved")
            return t
        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    def parts_at_peak(self) -> dict[str, int]:
        return {p: self.peak_parts.get(p, 0) for p in PARTS}


def label_state(tracker: LiveBytes, trainer) -> None:
    """Label the Trainer's parameters, fp32 gradient buffers and optimizer state (AdamW moments
    and fp32 main parameters); everything else live now stays "other"."""
    for p in trainer.model.parameters():
        tracker.relabel(p, "weights")
    for section in trainer.dp.sections:
        tracker.relabel(section.grad_buffer, "grads")
        if section.main_buffer is not None:
            tracker.relabel(section.main_buffer, "optimizer")
    for group in trainer.optimizer.inner.param_groups:
        for p in group["params"]:
            if tracker._storages.get(p.untyped_storage()._cdata, [0, ""])[1] not in ("weights", "grads"):
                tracker.relabel(p, "optimizer")
    for state in trainer.optimizer.inner.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                tracker.relabel(v, "optimizer")


# ---------------------------------------------------------------- one layout on one rank

def make_config(flags: str, world: int):
    return config_from_args(parse_args(shlex.split(flags)), world_size=world)


def layout_flags(size: dict, world: int, extra: str, microbatches: int) -> str:
    """The model flags plus `extra`, with the global batch set for `microbatches` per DP rank."""
    probe = make_config(SMALL_MOE_FLAGS.format(**size, gbs=size["mbs"] * world * microbatches) + " " + extra, world)
    dp = probe.parallel.data_parallel_size
    return SMALL_MOE_FLAGS.format(**size, gbs=size["mbs"] * dp * microbatches) + " " + extra


def measure(flags: str, world: int, warmup: int, detail: bool = False) -> dict:
    """On this rank: build the Trainer under the tracker, train `warmup` steps, measure one more
    (with `detail`, also the largest storages live at the peak)."""
    from megatron.core.parallel_state import groups_from_mesh
    from megatron.training.data import build_datasets, build_loader, micro_batches
    from megatron.training.train import Trainer

    cfg = make_config(flags, world)
    p = cfg.parallel
    tracker = LiveBytes()
    tracker.detail = detail
    with tracker:
        groups = groups_from_mesh(p.expert_model_parallel_size, torch.device("cpu"), "gloo",
                                  pp_size=p.pipeline_model_parallel_size, tp_size=p.tensor_model_parallel_size,
                                  etp_size=p.expert_tensor_parallel_size)
        trainer = Trainer(cfg, groups)
        schedule_train = trainer.schedule.train

        def train(*args, **kwargs):
            tracker.in_schedule = True
            try:
                return schedule_train(*args, **kwargs)
            finally:
                tracker.in_schedule = False
        trainer.schedule.train = train
        train_ds, _, _ = build_datasets(cfg)
        batches = micro_batches(build_loader(train_ds, cfg, groups), groups.device)
        with tracker.saved_hooks():
            for _ in range(warmup):
                trainer.train_step([next(batches) for _ in range(cfg.num_microbatches)])
            step = [next(batches) for _ in range(cfg.num_microbatches)]
            label_state(tracker, trainer)
            tracker.reset_peak()
            before = tracker.live
            trainer.train_step(step)
    return {"pp_rank": groups.pp_rank, "peak": tracker.peak, "before": before, "detail": tracker.peak_detail, "phase": tracker.peak_phase,
            **tracker.parts_at_peak()}


def _worker(rank: int, world: int, layouts: list, warmup: int, detail: bool = False) -> list:
    return [measure(flags, world, warmup, detail) for _, _, flags in layouts]


# ---------------------------------------------------------------- the estimate and the report

def estimator():
    """tools/estimate.py with the CPU constants of this code (module docstring)."""
    est = load_tool("estimate")
    est.NORM_KEEPS_OUTPUT = True
    est.LOGITS_CHUNK = 2**22
    return est


def estimated(est, flags: str, world: int, pp_rank: int) -> dict:
    """`stage_memory` of stage `pp_rank` for the same flags and world."""
    cfg = make_config(flags, world)
    layout = cfg.parallel.pipeline_layout(cfg.model.num_layers)
    return est.stage_memory(cfg, layout, pp_rank)


def compare(est, flags: str, world: int, got: dict) -> dict:
    """One row: measured and estimated bytes per part and in total."""
    e = estimated(est, flags, world, got["pp_rank"])
    e_total = sum(e[k] for k in est.MEMORY_PARTS)
    act = got["saved"] + got["other"]
    parts = e["activation_parts"]
    e_phase = "forward" if parts["loss_forward"] > parts["backward"] else "backward"
    return {"phase": got["phase"], "e_phase": e_phase, "e_kept": parts["kept"],
            "e_transient": max(parts["loss_forward"], parts["backward"]),
            "state": sum(got[k] for k in STATE_PARTS), "e_state": sum(e[k] for k in STATE_PARTS),
            "act": act, "e_act": e["activations"], "total": got["peak"], "e_total": e_total,
            "ratio": got["peak"] / e_total, **{f"m_{k}": got[k] for k in PARTS}}


def mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def print_detail(name: str, rank: int, detail: list) -> None:
    print(f"{name}, rank {rank}: largest storages live at the peak besides the model state (MiB, label, op, shape)")
    for nbytes, label, (op, shape, dtype) in detail:
        if label not in STATE_PARTS and nbytes >= 2**16:
            print(f"  {mib(nbytes):>8} {label:<6} {op} {list(shape)} {str(dtype).replace('torch.', '')}")


def print_table(rows: list) -> None:
    print("peak of one training step per rank, MiB (measured: live tensor storages; est: tools/estimate.py "
          "stage_memory)")
    print("(saved/other: activations held for backward / everything else above the model state at the peak; "
          "est kept/trans.: stage_activation_parts' kept and max(loss_forward, backward); peak in: measured / est)")
    head = (f"{'layout':<22}{'rank':>5}{'weights':>9}{'grads':>8}{'optim':>8}{'saved':>8}{'other':>8}"
            f"{'kept':>8}{'trans.':>8}{'act.':>8}{'est':>8}{'ratio':>7}{'total':>9}{'est':>9}{'ratio':>7}"
            f"  {'peak in'}")
    print(head)
    for name, rank, r in rows:
        print(f"{name:<22}{rank:>5}{mib(r['m_weights']):>9}{mib(r['m_grads']):>8}{mib(r['m_optimizer']):>8}"
              f"{mib(r['m_saved']):>8}{mib(r['m_other']):>8}{mib(r['e_kept']):>8}{mib(r['e_transient']):>8}"
              f"{mib(r['act']):>8}{mib(r['e_act']):>8}{r['act'] / r['e_act']:>7.3f}"
              f"{mib(r['total']):>9}{mib(r['e_total']):>9}{r['ratio']:>7.3f}  {r['phase']} / {r['e_phase']}")


def run(layouts: list, size: dict, microbatches: int, warmup: int, detail: bool = False) -> list:
    """Measure every layout (grouped by world size, one spawned world each); returns table rows."""
    est = estimator()
    rows = []
    for world in sorted({w for _, w, _ in layouts}):
        chosen = [(name, w, layout_flags(size, w, extra, microbatches)) for name, w, extra in layouts if w == world]
        per_rank = run_distributed(_worker, world, chosen, warmup, detail, timeout=1800.0)
        for i, (name, _, flags) in enumerate(chosen):
            for r in range(world):
                got = per_rank[r][i]
                rows.append((name, r, compare(est, flags, world, got)))
                if detail:
                    print_detail(name, r, got["detail"])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", help="layout names (default: all)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--mbs", type=int, default=2, help="micro-batch size")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--microbatches", type=int, default=2, help="per data-parallel rank and step")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--detail", action="store_true", help="list the largest storages live at each peak")
    a = p.parse_args()
    layouts = [l for l in LAYOUTS if not a.only or l[0] in a.only]
    size = dict(layers=a.layers, hidden=a.hidden, ffn=a.ffn, experts=a.experts, seq=a.seq, mbs=a.mbs, vocab=a.vocab)
    start = time.perf_counter()
    rows = run(layouts, size, a.microbatches, a.warmup, a.detail)
    print(f"torch {torch.__version__}, gloo, 1 thread per rank; model: {a.layers} layers, D={a.hidden}, "
          f"F={a.ffn}, {a.experts} experts top-2, SwiGLU, GQA 8/4, seq {a.seq}, micro-batch {a.mbs} "
          f"(T={a.mbs * a.seq} tokens), vocab {a.vocab}, {a.microbatches} micro-batches per DP rank; "
          f"step {a.warmup + 1} measured")
    print_table(rows)
    worst = max(rows, key=lambda row: abs(row[2]["ratio"] - 1))
    print(f"\nworst total ratio {worst[2]['ratio']:.3f} ({worst[0]}, rank {worst[1]}); "
          f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
