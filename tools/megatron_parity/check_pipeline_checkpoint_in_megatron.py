"""Check `--ckpt-format torch` checkpoints at pipeline size P = 2 against Megatron-Core, both ways.

    python tools/megatron_parity/check_pipeline_checkpoint_in_megatron.py \
        --mcore-python /work/mcore-venv/bin/python --work-dir /tmp/ckpt_parity_pp

The P = 2 sibling of `check_checkpoint_in_megatron.py` (whose helpers, shims and model it
shares): run with this project's Python, it runs Megatron-Core's half under `--mcore-python`
in the work directory, never in one process with this project. The model is that script's
(SequentialMLP, local layer spec) with 4 layers (`--moe-layer-freq [0,1,1,1]`: stage 0 holds a
dense and an MoE layer), in four variants: untied or tied embeddings, without and with virtual
stages (V = 2, one layer a chunk; rank 0 holds layers 0 and 2).

  ours -> Megatron   2 gloo ranks here train 2 iterations at P = 2 and save (`mp_rank_00_00P`);
                     2 gloo ranks of Megatron-Core (`initialize_model_parallel` with P = 2 and V)
                     build each rank's GPTModel chunks as Megatron-LM's model provider does
                     (pre_process on the first stage, post_process on the last, `vp_stage`,
                     `share_embeddings_and_output_weights` when tied) and load the rank's file
                     (`model`, or `model0`/`model1`) with `load_state_dict(strict=True)`. Every
                     tensor is compared with ours under its global layer number, computed with
                     Megatron-Core's own `get_transformer_layer_offset`.
  Megatron -> ours   each Megatron-Core rank saves its chunks' `state_dict_for_save_checkpoint()`
                     with Megatron-LM-style `args` (pipeline sizes included); we load them with
                     `--load --no-load-optim` on 2 gloo ranks at P = 2, and at P = 1 after
                     `tools/checkpoint/reshard.py --target-pipeline-parallel-size 1`, and compare
                     every tensor. The P = 1 reshard is then loaded by a single-process
                     Megatron-Core GPTModel (P = 1, strict) and both compute the LM loss on a
                     fixed batch.

No forward pass runs across stages (no schedule is needed to load and compare). On top of the
P = 1 shims, `Tensor.cuda` returns the tensor: Megatron-Core's tied last stage moves its copy
of the word embedding to the GPU before the all-reduce that fills it from the first stage.
Exit status 0 when every check passes (tensors equal, |loss difference| <= 1e-5).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys

import torch

import check_checkpoint_in_megatron as p1

P = 2
NUM_LAYERS = 4
LAYER_FREQ = [0, 1, 1, 1]
GLOBAL_BATCH = 4  # two micro-batches of SHAPE["batch"]: a P = 2 step needs at least P
EXPERTS = "sequential"
VARIANTS = {"untied": (None, False), "tied": (None, True), "virtual": (2, False), "virtual+tied": (2, True)}
MEGATRON_ITERATION = 5
LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.*)")
WORD_EMBEDDING = "embedding.word_embeddings.weight"


def _path(work: str, *parts: str) -> str:
    return os.path.join(work, *parts)


def _json(path: str, value=None):
    if value is None:
        with open(path) as f:
            return json.load(f)
    with open(path, "w") as f:
        json.dump(value, f)


def _iter_dir(root: str, iteration: int) -> str:
    return _path(root, f"iter_{iteration:07d}")


def _rank_file(root: str, iteration: int, pp_rank: int) -> str:
    return _path(_iter_dir(root, iteration), f"mp_rank_00_{pp_rank:03d}", "model_optim_rng.pt")


# ============================================================================ processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, *args)
    finally:
        torch.distributed.destroy_process_group()


def _spawn(fn, *args) -> None:
    """fn(rank, *args) on P gloo ranks (spawned, so each imports only this script's modules)."""
    import torch.multiprocessing as mp

    mp.start_processes(_worker, args=(P, _free_port(), fn, args), nprocs=P, join=True, start_method="spawn")


# ============================================================================ our side (this project's venv)


def _ours_flags(variant: str, pipeline: bool) -> list[str]:
    virtual, tied = VARIANTS[variant]
    flags = p1._ours_flags(EXPERTS)
    for flag, value in (("--num-layers", NUM_LAYERS), ("--moe-layer-freq", str(LAYER_FREQ).replace(" ", "")),
                        ("--global-batch-size", GLOBAL_BATCH)):
        flags[flags.index(flag) + 1] = str(value)
    if tied:
        flags.remove("--untie-embeddings-and-output-weights")
    if pipeline:
        flags += ["--pipeline-model-parallel-size", str(P)]
        if virtual:
            flags += ["--virtual-pipeline-model-parallel-size", str(virtual)]
    return flags


def _ours_cfg(variant: str, pipeline: bool, extra: list[str]):
    from megatron.training.arguments import config_from_args, parse_args

    return config_from_args(parse_args(_ours_flags(variant, pipeline) + extra), world_size=P if pipeline else 1)


def _pp_groups():
    from megatron.core.parallel_state import groups_from_mesh

    return groups_from_mesh(1, torch.device("cpu"), "gloo", pp_size=P)


def _ours_loaded(cfg, groups):
    from megatron.training import checkpointing
    from megatron.training.train import Trainer

    trainer = Trainer(cfg, groups)
    checkpointing.load_checkpoint(trainer, cfg, groups)
    return trainer


def _ours_save_rank(rank: int, work: str, variant: str) -> None:
    from megatron.training.train import pretrain

    save = _path(work, f"ours_{variant}")
    pretrain(_ours_cfg(variant, True, ["--save", save, "--train-iters", "2"]), groups=_pp_groups())
    # What each stage holds, under our global names, read back by our own reader.
    cfg = _ours_cfg(variant, True, ["--load", save, "--train-iters", "10", "--no-load-optim"])
    trainer = _ours_loaded(cfg, _pp_groups())
    torch.save(trainer.model.state_dict(), _path(work, f"ours_{variant}_state_rank{rank}.pt"))


def ours_save(work: str, variant: str) -> None:
    _spawn(_ours_save_rank, work, variant)


def _ours_load_rank(rank: int, work: str, variant: str) -> None:
    root = _path(work, f"mcore_{variant}")
    cfg = _ours_cfg(variant, True, ["--load", root, "--train-iters", "10", "--no-load-optim"])
    trainer = _ours_loaded(cfg, _pp_groups())
    megatron = torch.load(_path(work, f"mcore_{variant}_global_rank{rank}.pt"))
    report = compare_stage(megatron, trainer.model.state_dict())
    report.update(iteration=trainer.state.iteration, consumed_train_samples=trainer.state.consumed_train_samples)
    _json(_path(work, f"report_mcore_to_ours_{variant}_rank{rank}.json"), report)


def ours_load(work: str, variant: str) -> None:
    """Megatron-Core's P = 2 files at P = 2 (2 ranks), then at P = 1 after reshard.py."""
    _spawn(_ours_load_rank, work, variant)
    root, one = _path(work, f"mcore_{variant}"), _path(work, f"mcore_{variant}_p1")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, _path(repo, "tools", "checkpoint", "reshard.py"), "--load-dir", root,
                    "--save-dir", one, "--ckpt-format", "torch", "--target-pipeline-parallel-size", "1"], check=True)
    from megatron.core.parallel_state import ProcessGroups

    cfg = _ours_cfg(variant, False, ["--load", one, "--train-iters", "10", "--no-load-optim"])
    trainer = _ours_loaded(cfg, ProcessGroups())
    ours = trainer.model.state_dict()
    torch.save(ours, _path(work, f"ours_{variant}_p1_state.pt"))
    report = {"tensors": {}, "ours_not_compared": set(ours), "missing_in_ours": []}
    for rank in range(P):  # every stage's tensors (both copies of a tied embedding) against the one model
        part = compare_stage(torch.load(_path(work, f"mcore_{variant}_global_rank{rank}.pt")), ours)
        report["tensors"].update({f"rank{rank}:{k}": v for k, v in part["tensors"].items()})
        report["missing_in_ours"] += part["missing_in_ours"]
        report["ours_not_compared"] &= set(part["ours_not_compared"])
    report["ours_not_compared"] = sorted(report["ours_not_compared"])
    batch = p1.fixed_batch(work)
    trainer.model.eval()
    with torch.no_grad():
        report["loss_ours"] = float(trainer.model(batch["tokens"], None, batch["labels"]).lm_loss)
    report.update(iteration=trainer.state.iteration, consumed_train_samples=trainer.state.consumed_train_samples)
    _json(_path(work, f"report_mcore_to_ours_{variant}_p1.json"), report)


# ============================================================================ Megatron-Core's side (its venv)


def _megatron_init(virtual) -> None:
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(1, P, virtual_pipeline_model_parallel_size=virtual,
                                             expert_model_parallel_size=1)
    p1._megatron_cpu_shims()
    torch.Tensor.cuda = lambda self, *a, **k: self  # the tied last stage's copy, before its all-reduce


def megatron_chunks(variant: str) -> list:
    """This rank's GPTModel chunks, built as Megatron-LM's model provider builds them."""
    from megatron.core import parallel_state

    virtual, tied = VARIANTS[variant]
    cfg = p1.megatron_config(EXPERTS, num_layers=NUM_LAYERS, moe_layer_freq=LAYER_FREQ, pipeline_model_parallel_size=P,
                             virtual_pipeline_model_parallel_size=virtual, pipeline_dtype=torch.float32)
    chunks = []
    for vp_stage in range(virtual or 1):
        v = vp_stage if virtual else None
        chunks.append(p1.megatron_model(
            EXPERTS, cfg, tied=tied, vp_stage=v,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=v),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=v)))
    return chunks


def global_names(chunks: list, tied: bool) -> dict:
    """Every chunk's tensors under global layer numbers (Megatron-Core's own layer offset); a tied
    last stage's output layer, the stage's copy of the word embedding, under that name."""
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    out = {}
    for chunk in chunks:
        offset = get_transformer_layer_offset(chunk.config, vp_stage=chunk.vp_stage,
                                              pp_rank=parallel_state.get_pipeline_model_parallel_rank())
        for name, t in chunk.state_dict().items():
            if name.endswith("_extra_state"):
                continue
            match = LAYER.fullmatch(name)
            if match is not None:
                name = f"decoder.layers.{int(match.group(1)) + offset}.{match.group(2)}"
            elif name == "output_layer.weight" and tied and not chunk.pre_process:
                name = WORD_EMBEDDING
            assert name not in out, name
            out[name] = t.detach().clone()
    return out


def _entries(n: int) -> list[str]:
    return ["model"] if n == 1 else [f"model{v}" for v in range(n)]


def _mcore_load_rank(rank: int, work: str, variant: str) -> None:
    virtual, tied = VARIANTS[variant]
    _megatron_init(virtual)
    chunks = megatron_chunks(variant)
    state_dict = torch.load(_rank_file(_path(work, f"ours_{variant}"), 2, rank), map_location="cpu")
    strict = {"missing": [], "unexpected": []}
    entries = _entries(len(chunks))
    strict["entries"] = sorted(k for k in state_dict if k.startswith("model"))
    for chunk, entry in zip(chunks, entries):
        result = chunk.load_state_dict(state_dict[entry], strict=True)
        strict["missing"] += [f"{entry}:{k}" for k in result.missing_keys]
        strict["unexpected"] += [f"{entry}:{k}" for k in result.unexpected_keys]
    report = compare_stage(global_names(chunks, tied), torch.load(_path(work, f"ours_{variant}_state_rank{rank}.pt")))
    args = state_dict["args"]
    report.update(strict_load=strict, args_checked={
        **p1._megatron_lm_check_args(args),
        "virtual_pipeline_model_parallel_size": getattr(args, "virtual_pipeline_model_parallel_size", "MISSING")})
    _json(_path(work, f"report_ours_to_mcore_{variant}_rank{rank}.json"), report)


def mcore_load(work: str, variant: str) -> None:
    _spawn(_mcore_load_rank, work, variant)


def _mcore_save_rank(rank: int, work: str, variant: str) -> None:
    virtual, tied = VARIANTS[variant]
    _megatron_init(virtual)
    torch.manual_seed(1234 + rank)
    chunks = megatron_chunks(variant)
    args = p1.megatron_args(
        EXPERTS, MEGATRON_ITERATION * GLOBAL_BATCH + 6, num_layers=NUM_LAYERS, moe_layer_freq=LAYER_FREQ,
        untie_embeddings_and_output_weights=not tied, pipeline_model_parallel_size=P,
        virtual_pipeline_model_parallel_size=virtual, num_layers_per_virtual_pipeline_stage=None,
        decoder_first_pipeline_num_layers=None, decoder_last_pipeline_num_layers=None,
        account_for_embedding_in_pipeline_split=False, account_for_loss_in_pipeline_split=False,
        pipeline_model_parallel_layout=None, global_batch_size=GLOBAL_BATCH, micro_batch_size=p1.SHAPE["batch"])
    models = {entry: chunk.state_dict_for_save_checkpoint() for entry, chunk in zip(_entries(len(chunks)), chunks)}
    root = _path(work, f"mcore_{variant}")
    path = _rank_file(root, MEGATRON_ITERATION, rank)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(p1.megatron_checkpoint_payload(args, MEGATRON_ITERATION, models), path)
    if rank == 0:
        with open(_path(root, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(MEGATRON_ITERATION))
    torch.save(global_names(chunks, tied), _path(work, f"mcore_{variant}_global_rank{rank}.pt"))
    _json(_path(work, f"mcore_{variant}_consumed.json"), {"consumed": args.consumed_train_samples})


def mcore_save(work: str, variant: str) -> None:
    _spawn(_mcore_save_rank, work, variant)


def mcore_loss(work: str, variant: str) -> None:
    """Megatron-Core at P = 1 (one process) loads the P = 1 reshard of its own P = 2 files."""
    p1._megatron_init(_free_port())
    _, tied = VARIANTS[variant]
    model = p1.megatron_model(EXPERTS, p1.megatron_config(EXPERTS, num_layers=NUM_LAYERS, moe_layer_freq=LAYER_FREQ),
                              tied=tied)
    path = _path(_iter_dir(_path(work, f"mcore_{variant}_p1"), MEGATRON_ITERATION), "mp_rank_00", "model_optim_rng.pt")
    result = model.load_state_dict(torch.load(path, map_location="cpu")["model"], strict=True)
    report = compare_stage(model.state_dict(), torch.load(_path(work, f"ours_{variant}_p1_state.pt")))
    report.update(strict_load={"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys)},
                  loss_megatron=p1.megatron_loss(model, torch.load(_path(work, "batch.pt"))))
    _json(_path(work, f"report_mcore_p1_{variant}.json"), report)


# ============================================================================ both sides


def _ours_name(name: str) -> str:
    """Our tensor that Megatron-Core's tensor `name` is compared with (see p1.compare)."""
    head, sep, tail = name.partition(".mlp.experts.local_experts.")
    if not sep:
        return name
    _, fc, kind = tail.split(".")
    return f"{head}.mlp.experts.{'weight' if kind == 'weight' else 'bias'}{'1' if fc == 'linear_fc1' else '2'}"


def compare_stage(megatron: dict, ours: dict) -> dict:
    """p1.compare on Megatron-Core's tensors (global names) that `ours` has; which it lacks; which
    of ours no Megatron tensor was compared with."""
    megatron = {k: v for k, v in megatron.items() if not k.endswith("_extra_state")}
    present = {k: v for k, v in megatron.items() if _ours_name(k) in ours}
    return {"tensors": p1.compare(present, ours), "missing_in_ours": sorted(set(megatron) - set(present)),
            "ours_not_compared": sorted(set(ours) - {_ours_name(k) for k in present})}


def _tensor_line(reports: list[dict]) -> tuple[bool, str]:
    tensors = {f"{i}:{k}": v for i, r in enumerate(reports) for k, v in r["tensors"].items()}
    worst = max((v for v in tensors.values() if v != "shape"), default=0.0)
    shapes = [k for k, v in tensors.items() if v == "shape"]
    missing = [k for r in reports for k in r["missing_in_ours"]]
    uncovered = [k for r in reports for k in r["ours_not_compared"]]
    ok = bool(tensors) and worst == 0.0 and not shapes and not missing and not uncovered
    line = f"tensors: {len(tensors)} compared, max |diff| {worst:.3g}"
    for label, names in (("wrong shapes", shapes), ("not in ours", missing), ("ours not compared", uncovered)):
        if names:
            line += f" ({label}: {', '.join(names)})"
    return ok, line


def _strict(reports: list[dict]) -> tuple[bool, str]:
    missing = [k for r in reports for k in r["strict_load"]["missing"]]
    unexpected = [k for r in reports for k in r["strict_load"]["unexpected"]]
    line = f"strict load: missing {len(missing)}, unexpected {len(unexpected)}"
    if missing or unexpected:
        line += f" (missing: {missing}; unexpected: {unexpected})"
    return not missing and not unexpected, line


def summarise(work: str, variant: str) -> bool:
    virtual, tied = VARIANTS[variant]
    label = f"P=2 {variant:12s}"
    ok_all = True

    ranks = [_json(_path(work, f"report_ours_to_mcore_{variant}_rank{r}.json")) for r in range(P)]
    ok, line = _tensor_line(ranks)
    ok2, strict = _strict(ranks)
    entries = [r["strict_load"]["entries"] for r in ranks]
    ok3 = entries == [_entries(virtual or 1)] * P
    args = [r["args_checked"] for r in ranks]
    ok4 = all(a["pipeline_model_parallel_size"] == P and a["virtual_pipeline_model_parallel_size"] == virtual
              and "MISSING" not in a.values() for a in args)
    ok = ok and ok2 and ok3 and ok4
    print(f"{'PASS' if ok else 'FAIL'} ours -> Megatron  {label} {line}; {strict}; entries {entries[0]} per rank; "
          f"args: pipeline_model_parallel_size={args[0]['pipeline_model_parallel_size']}, "
          f"virtual_pipeline_model_parallel_size={args[0]['virtual_pipeline_model_parallel_size']}, "
          f"num_layers={args[0]['num_layers']}, iteration={args[0]['iteration']}")
    ok_all &= ok

    consumed = _json(_path(work, f"mcore_{variant}_consumed.json"))["consumed"]
    ranks = [_json(_path(work, f"report_mcore_to_ours_{variant}_rank{r}.json")) for r in range(P)]
    ok, line = _tensor_line(ranks)
    resumed = {(r["iteration"], r["consumed_train_samples"]) for r in ranks}
    ok = ok and resumed == {(MEGATRON_ITERATION, consumed)}
    print(f"{'PASS' if ok else 'FAIL'} Megatron -> ours  {label} at P=2: {line}; resumed at (iteration, consumed "
          f"samples) {sorted(resumed)} (Megatron: {(MEGATRON_ITERATION, consumed)})")
    ok_all &= ok

    one = _json(_path(work, f"report_mcore_to_ours_{variant}_p1.json"))
    megatron_p1 = _json(_path(work, f"report_mcore_p1_{variant}.json"))
    ok, line = _tensor_line([one])
    ok2, line2 = _tensor_line([megatron_p1])
    ok3, strict = _strict([megatron_p1])
    loss_diff = abs(one["loss_ours"] - megatron_p1["loss_megatron"])
    ok = ok and ok2 and ok3 and loss_diff <= p1.LOSS_TOLERANCE and one["iteration"] == MEGATRON_ITERATION
    print(f"{'PASS' if ok else 'FAIL'} Megatron -> ours  {label} at P=1 (reshard.py): {line}; Megatron-Core P=1 "
          f"loads the reshard: {strict}, {line2}; loss ours {one['loss_ours']:.7f} Megatron "
          f"{megatron_p1['loss_megatron']:.7f} |diff| {loss_diff:.2e}")
    return ok_all and ok


def run_checks(script: str, doc: str, variants, steps: dict, summarise) -> int:
    """The command line both checkpoint checks share. `steps`: {name: (side, fn(work, variant))} in
    the order they run, side "ours" (this interpreter) or "mcore" (--mcore-python); each runs in
    its own process in the work directory, then `summarise(work, variant)` prints and judges."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--mcore-python", help="python of a venv with megatron-core 0.16.1 (not this project)")
    p.add_argument("--work-dir", required=True)
    p.add_argument("--variants", nargs="+", choices=list(variants), default=list(variants))
    p.add_argument("--step", choices=list(steps), help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=list(variants), help=argparse.SUPPRESS)
    a = p.parse_args()
    work = os.path.abspath(a.work_dir)
    if a.step is not None:
        steps[a.step][1](work, a.variant)
        return 0
    if a.mcore_python is None:
        p.error("--mcore-python is required")
    os.makedirs(work, exist_ok=True)
    p1.fixed_batch(work)
    ok = True
    for variant in a.variants:
        for name, (side, _) in steps.items():
            python = sys.executable if side == "ours" else a.mcore_python
            subprocess.run([python, os.path.abspath(script), "--step", name, "--variant", variant, "--work-dir", work],
                           check=True, cwd=work)  # outside the checkout: Megatron-Core's `megatron` must not meet ours
        ok &= summarise(work, variant)
    return 0 if ok else 1


def main() -> int:
    return run_checks(__file__, __doc__, VARIANTS, {
        "ours-save": ("ours", ours_save), "mcore-load": ("mcore", mcore_load), "mcore-save": ("mcore", mcore_save),
        "ours-load": ("ours", ours_load), "mcore-loss": ("mcore", mcore_loss)}, summarise)


if __name__ == "__main__":
    sys.exit(main())
