"""Tensor and sequence parallelism on gloo CPU ranks: measured communication and activation
memory per rank against tools/estimate.py.

    python benchmarks/tensor_parallel.py            # 2 ranks, T = 2; about 20 s on 2 cores

A small model (hidden 256, 4 heads (G = 4), seq 256, micro-batch 2, 2 layers, SwiGLU F = 512,
RoPE, RMSNorm, no biases, dropout 0, fp32; the MoE variant has 4 experts of F = 512, top-2, aux
loss, `--expert-tensor-parallel-size 1`) is built on 2 gloo ranks with T = 2, without and with
`--sequence-parallel`, and once in one process (T = 1) for reference. Printed:

* communication: the collectives each rank issues in one forward + backward of one layer (and,
  separately, of the embedding + output layer + loss: the whole model's minus its layers'),
  counted by shims around the torch.distributed functions the library calls (all_reduce,
  all_gather_single / reduce_scatter_single (torch 2.13; all_gather_into_tensor /
  reduce_scatter_tensor where they are missing), all_gather, all_to_all_single; the shims live
  here, not in library code). "payload" is the size of the tensors handed to them (the
  all-reduced tensor, the gathered output, the reduce-scattered input); "sent" applies the
  ring formula (all-reduce 2 (n-1)/n, all-gather / reduce-scatter (n-1)/n of the payload)
  to them, which is what `tools/estimate.py` charges per rank (gloo's own algorithms differ
  and are not what is compared). For all_to_all_single "sent" is the rows sent to other ranks.
  The estimate is `layer_tp_collectives` / `ends_tp_collectives` (+ the all-to-all model for
  the EP = 2 scenario) for the same shapes.
* activation memory: the bytes one layer's forward saves for backward on rank 0 (each saved
  storage counted once, parameters excluded, `torch.autograd.graph.saved_tensors_hooks`),
  attributed to the innermost module running when a storage is first saved: outside (the
  norms, residual adds; sequence-sharded under SP), region inputs (what linear_qkv and
  linear_fc1 keep: their input, all-gathered under SP), inside (the rest of attention and
  the dense FFN) and moe (router, dispatcher, experts). Compared with
  `layer_activation_parts` (with `norm_keeps_output=True`: on CPU torch composes RMSNorm from
  elementwise ops that keep the normalised input too).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.parallel_state import ProcessGroups, groups_from_mesh  # noqa: E402
from tests.distributed.harness import run_distributed  # noqa: E402
from tests.helpers import load_tool, make_config  # noqa: E402

MODEL = (
    "--num-layers 2 --hidden-size 256 --ffn-hidden-size 512 --num-attention-heads 4 --seq-length 256 "
    "--max-position-embeddings 256 --position-embedding-type rope --normalization RMSNorm --swiglu "
    "--disable-bias-linear --hidden-dropout 0 --attention-dropout 0 --vocab-size 512 "
    "--make-vocab-size-divisible-by 1 --mock-data --micro-batch-size 2 --global-batch-size 2 --train-iters 1 "
    "--lr 1e-4 --eval-iters 0 --num-workers 0"
)
MOE = " --num-experts 4 --moe-router-topk 2 --moe-aux-loss-coeff 1e-2 --expert-tensor-parallel-size 1"
SP = " --sequence-parallel"
T2 = " --tensor-model-parallel-size 2"

# (name, flags); world 2 unless the flags say T = 1
SCENARIOS = [
    ("dense T=1", MODEL),
    ("dense T=2", MODEL + T2),
    ("dense T=2+SP", MODEL + T2 + SP),
    ("moe T=1", MODEL + MOE),
    ("moe T=2", MODEL + MOE + T2),
    ("moe T=2+SP", MODEL + MOE + T2 + SP),
    ("moe T=2+SP EP=2", MODEL + MOE + T2 + SP + " --expert-model-parallel-size 2 --moe-token-dispatcher-type alltoall"),
]
OPS = {"all_reduce": "AR", "all_gather_single": "AG", "all_gather_into_tensor": "AG", "all_gather": "AG",
       "reduce_scatter_single": "RS", "reduce_scatter_tensor": "RS", "all_to_all_single": "A2A"}
PARTS = ("outside", "region_inputs", "inside", "moe")


# ---------------------------------------------------------------- counting shims

class CollectiveCounter:
    """Wraps torch.distributed's collectives while `active`; records (phase, op, group, payload, sent)."""

    def __init__(self, names: dict):
        self.names = names  # process group -> "tp" / "ep" / ...
        self.records: list[tuple[str, str, str, int, float]] = []
        self.phase, self.active = "fwd", False
        self.originals = {}
        for name in OPS:
            if hasattr(dist, name):
                self.originals[name] = getattr(dist, name)
                setattr(dist, name, self._wrap(name, self.originals[name]))

    def restore(self) -> None:
        for name, fn in self.originals.items():
            setattr(dist, name, fn)

    def _wrap(self, name: str, fn):
        def shim(*args, **kwargs):
            if self.active:
                self._record(name, args, kwargs)
            return fn(*args, **kwargs)
        return shim

    def _record(self, name: str, args, kwargs) -> None:
        group = kwargs.get("group")
        n = dist.get_world_size(group)
        nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
        if name == "all_reduce":
            payload = nbytes(args[0])
            sent = 2 * (n - 1) / n * payload
        elif name in ("all_gather_single", "all_gather_into_tensor"):
            payload = nbytes(args[0])
            sent = (n - 1) / n * payload
        elif name == "all_gather":
            payload = nbytes(args[1]) * len(args[0])
            sent = (n - 1) / n * payload
        elif name in ("reduce_scatter_single", "reduce_scatter_tensor"):
            payload = nbytes(args[1])
            sent = (n - 1) / n * payload
        else:  # all_to_all_single(out, in, output_splits, input_splits): rows sent to the other ranks
            x = args[1]
            splits = args[3] if len(args) > 3 and args[3] is not None else [x.shape[0] // n] * n
            row = nbytes(x) // max(x.shape[0], 1)
            payload = nbytes(x)
            sent = (x.shape[0] - splits[dist.get_rank(group)]) * row
        self.records.append((self.phase, OPS[name], self.names.get(group, "other"), payload, sent))

    def window(self):
        counter = self

        class _Window:
            def __enter__(self):
                counter.records, counter.phase, counter.active = [], "fwd", True
                return counter

            def __exit__(self, *exc):
                counter.active = False
                return False
        return _Window()


# ---------------------------------------------------------------- saved-tensor attribution

def layer_part(path: str, is_moe: bool) -> str:
    """Which estimator part a saved tensor belongs to, from the module that first saved it."""
    leaf = path.rsplit(".", 1)[-1]
    if "layernorm" in leaf or path == "":
        return "outside"
    if leaf in ("linear_qkv", "linear_fc1"):  # attention, dense FFN, shared expert (routed experts have none)
        return "region_inputs"
    if is_moe and path.startswith("mlp") and not path.startswith("mlp.shared_experts"):
        return "moe"
    return "inside"


def saved_by_part(layer, x, rope, is_moe: bool) -> dict:
    """Bytes saved for backward by one forward of `layer`, by part (unique storages, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    stack, hooks, seen = [""], [], {}

    def leave(module, args, output):
        stack.pop()  # returns None: a forward hook's result would replace the output

    for name, module in layer.named_modules():
        hooks.append(module.register_forward_pre_hook(lambda m, a, name=name: stack.append(name)))
        hooks.append(module.register_forward_hook(leave))

    def pack(t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in params and key not in seen and storage.nbytes():
            seen[key] = (layer_part(stack[-1], is_moe), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = layer(x, rope)
    for h in hooks:
        h.remove()
    parts = dict.fromkeys(PARTS, 0)
    for part, n in seen.values():
        parts[part] += n
    return parts


# ---------------------------------------------------------------- one scenario on one rank

def run_scenario(flags: str, world: int, rank: int, seed: int = 0) -> dict:
    cfg = make_config("", world, base=flags)
    p = cfg.parallel
    if p.tensor_model_parallel_size > 1:
        groups = groups_from_mesh(p.expert_model_parallel_size, torch.device("cpu"), "gloo",
                                  pp_size=1, tp_size=p.tensor_model_parallel_size,
                                  etp_size=p.expert_tensor_parallel_size)
    else:
        groups = ProcessGroups()
    m = cfg.model
    sp = p.sequence_parallel and p.tensor_model_parallel_size > 1
    model = GPTModel(m, groups, sequence_parallel=sp, init_seed=1234)
    B, S, D = cfg.training.micro_batch_size, m.seq_length, m.hidden_size
    gen = torch.Generator().manual_seed(seed)
    x_full = torch.randn(B, S, D, generator=gen)
    g_full = torch.randn(B, S, D, generator=gen)
    tokens = torch.randint(0, m.vocab_size, (B, S), generator=gen)
    labels = torch.randint(0, m.vocab_size, (B, S), generator=gen)
    t = groups.tp_size
    shard = (lambda y: y.chunk(t, 1)[groups.tp_rank].contiguous()) if sp else (lambda y: y)
    layer = model.decoder.layers[0]
    # EP folded over the TP ranks can be the very same group object: all_to_all_single is told
    # apart by the op, every other collective on it counts as tensor-parallel
    names = {groups.ep: "ep", groups.tp: "tp"} if groups.tp is not None else {}
    counter = CollectiveCounter(names)
    try:
        x = shard(x_full).requires_grad_()
        rope = model.rope(x)
        memory = saved_by_part(layer, x, rope, layer.is_moe)
        with counter.window() as c:
            out, _ = layer(x, rope)
            c.phase = "bwd"
            out.backward(shard(g_full))
            layer_colls = list(c.records)
        with counter.window() as c:
            loss = model(tokens, labels_BS=labels).lm_loss
            c.phase = "bwd"
            loss.backward()
            model_colls = list(c.records)
    finally:
        counter.restore()
    return {"memory": memory, "layer": layer_colls, "model": model_colls, "num_layers": m.num_layers}


def worker(rank: int, world: int, scenarios: list) -> list:
    torch.set_num_threads(1)
    out = []
    for _, flags in scenarios:
        start = time.perf_counter()
        if "--tensor-model-parallel-size" in flags:
            res = run_scenario(flags, world, rank)
        elif rank == 0:  # the one-process reference
            res = run_scenario(flags, 1, rank)
        else:
            res = None
        dist.barrier()
        if res is not None:
            res["seconds"] = time.perf_counter() - start
        out.append(res)
    return out


# ---------------------------------------------------------------- estimator side

def estimated(flags: str, world: int) -> dict:
    est = load_tool("estimate")
    cfg = make_config("", world, base=flags)
    m, p = cfg.model, cfg.parallel
    tl = est.TensorLayout.of(p)
    T, b = cfg.training.micro_batch_size * m.seq_length, 4
    layer = est.layer_tp_collectives(m, 0, T, b, tl)
    ends = est.ends_tp_collectives(m, T, b, tl, True, True)
    ep = p.expert_model_parallel_size
    a2a = 0.0
    if m.moe is not None and ep > 1:  # 4 exchanges: dispatch + combine, forward and backward
        a2a = 4 * T / tl.tp * m.moe.router_topk * m.hidden_size * b * (ep - 1) / ep
    return {
        "layer": layer, "ends": ends, "a2a": a2a,
        "layer_sent": est.collective_bytes(layer, tl), "ends_sent": est.collective_bytes(ends, tl),
        "memory": est.layer_activation_parts(m, 0, T, b, tl, norm_keeps_output=True),
    }


# ---------------------------------------------------------------- report

def ops_text(records) -> str:
    """'fwd AR AR | bwd AR AR' (collectives over 1 KiB; smaller ones summarised as '+n small')."""
    parts = []
    for phase in ("fwd", "bwd"):
        big = [op for ph, op, _, payload, _ in records if ph == phase and payload > 1024]
        small = sum(1 for ph, _, _, payload, _ in records if ph == phase and payload <= 1024)
        text = " ".join(big) if big else "-"
        parts.append(f"{phase} {text}{f' +{small} small' if small else ''}")
    return " | ".join(parts)


def kib(n: float) -> str:
    return f"{n / 1024:.1f}"


def mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    start = time.perf_counter()
    results = run_distributed(worker, 2, SCENARIOS)[0]  # rank 0's view
    elapsed = time.perf_counter() - start
    print(f"tensor parallelism on 2 gloo ranks (T = 2), torch {torch.__version__}, 1 thread per rank; "
          f"B=2 S=256 D=256 H=G=4 F=512, fp32, {elapsed:.0f} s")
    print()
    print("communication per rank, one micro-batch forward + backward (KiB sent, ring formula on measured payloads)")
    print(f"{'scenario':<17} {'part':<13} {'collectives measured (payload > 1 KiB)':<44} "
          f"{'measured':>9} {'estimate':>9} {'ratio':>6}")
    for (name, flags), res in zip(SCENARIOS, results):
        if "--tensor-model-parallel-size" not in flags:
            continue
        e = estimated(flags, 2)
        tp_layer = [r for r in res["layer"] if r[2] == "tp" and r[1] != "A2A"]
        layer_sent = sum(r[4] for r in tp_layer)
        rows = [("layer 0", tp_layer, layer_sent, e["layer_sent"])]
        per_layer = [r for r in res["model"] if r[2] == "tp" and r[1] != "A2A"]
        ends_sent = sum(r[4] for r in per_layer) - res["num_layers"] * layer_sent
        rows.append(("emb+out+loss", None, ends_sent, e["ends_sent"]))
        a2a = [r for r in res["layer"] if r[1] == "A2A" and r[3] > 1024]
        if a2a:
            rows.append(("layer 0 a2a", a2a, sum(r[4] for r in a2a), e["a2a"]))
        for part, recs, measured, estimate in rows:
            ops = "(whole model - 2 x layer 0)" if recs is None else ops_text(recs)
            ratio = f"{measured / estimate:.3f}" if estimate else "-"
            print(f"{name:<17} {part:<13} {ops:<44} {kib(measured):>9} {kib(estimate):>9} {ratio:>6}")
    print()
    print("activation memory of one layer's forward on rank 0 (MiB saved for backward; measured / estimate)")
    print(f"{'scenario':<17} " + " ".join(f"{p:>15}" for p in PARTS) + f" {'total':>15} {'vs T=1':>7} {'est':>5}")
    reference = {}
    for (name, flags), res in zip(SCENARIOS, results):
        if "EP=2" in name:
            continue
        e = estimated(flags, 2 if "--tensor-model-parallel-size" in flags else 1)["memory"]
        meas = res["memory"]
        kind = name.split()[0]
        total, total_e = sum(meas.values()), sum(e.values())
        reference.setdefault(kind, (total, total_e, meas))
        ref, ref_e, _ = reference[kind]
        cells = " ".join(f"{mib(meas[p]):>7}/{mib(e[p]):<7}" for p in PARTS)
        print(f"{name:<17} {cells} {mib(total):>7}/{mib(total_e):<7} {total / ref:>7.3f} {total_e / ref_e:>5.3f}")
    print()
    for kind in ("dense", "moe"):
        by = {name.split()[1]: res["memory"] for (name, _), res in zip(SCENARIOS, results)
              if name.split()[0] == kind and "EP=2" not in name}
        sharded = by["T=2+SP"]["outside"] / by["T=2"]["outside"]
        one, sp = sum(by["T=1"].values()), by["T=2+SP"]
        print(f"{kind}: sequence-sharded part (outside) with SP / without SP = {sharded:.3f} (target 1/T = 0.5); "
              f"column-parallel inputs kept with SP / without = "
              f"{sp['region_inputs'] / by['T=2']['region_inputs']:.3f}; whole layer T=2+SP / T=2 = "
              f"{sum(sp.values()) / sum(by['T=2'].values()):.3f}, T=2+SP / T=1 = {sum(sp.values()) / one:.3f}")


if __name__ == "__main__":
    main()
