"""Check `--ckpt-format torch` checkpoints at tensor-parallel size T = 2 against Megatron-Core, both ways.

    python tools/megatron_parity/check_tensor_parallel_checkpoint_in_megatron.py \
        --mcore-python /work/mcore-venv/bin/python --work-dir /tmp/ckpt_parity_tp

The T = 2 sibling of `check_checkpoint_in_megatron.py` (model, shims, Megatron-LM `args`) and
`check_pipeline_checkpoint_in_megatron.py` (2 gloo ranks on each side, per-rank comparison),
whose helpers it shares: run with this project's Python, it runs Megatron-Core's half under
`--mcore-python` in the work directory, never in one process with this project. The model is the
P = 1 check's (2 layers: a dense layer, an MoE layer with 4 experts, top-2, a shared expert,
GQA with 2 query groups, q/k norms, RoPE, untied output layer), always with
`--sequence-parallel`, in these variants (VARIANTS):

  sequential-etp1   SequentialMLP experts, --expert-tensor-parallel-size 1 (experts whole on each rank)
  sequential-etp2   SequentialMLP experts, ETP = T = 2 (the default: each expert's fc1/fc2 split)
  grouped-etp1/2    the legacy GroupedMLP (`--transformer-impl local --moe-grouped-gemm`), same two ETPs
  sequential-ep2    SequentialMLP, T = 2 x EP = 2 folded over the same 2 ranks (ETP = 1): files
                    mp_rank_00_000 and mp_rank_01_001, 2 of the 4 experts each

  ours -> Megatron   2 gloo ranks here train 2 iterations at T = 2 and save (`mp_rank_00`,
                     `mp_rank_01`; with EP `_000`, `_001`). 2 gloo ranks of Megatron-Core
                     (`initialize_model_parallel(tensor_model_parallel_size=2,
                     expert_tensor_parallel_size=ETP, expert_model_parallel_size=EP)`) build
                     GPTModel as Megatron-LM's model provider does (TransformerConfig with the
                     same sizes and sequence_parallel=True; local layer spec;
                     `use_cpu_initialization`) and load their rank's file's `model` with
                     `load_state_dict(strict=True)`. Every tensor of each rank (its slices) is
                     compared with what our rank holds; then Megatron-Core's own T = 2 forward
                     (sequence parallel, vocab-parallel cross entropy) computes the LM loss on a
                     fixed batch and is compared with ours at T = 2.
  Megatron -> ours   each Megatron-Core rank (same CPU seed on both, as Megatron-LM seeds TP
                     ranks; `use_cpu_initialization` splits one master weight) saves its
                     `state_dict_for_save_checkpoint()` with Megatron-LM-style `args`
                     (tensor_model_parallel_size=2, expert_tensor_parallel_size,
                     expert_model_parallel_size, sequence_parallel) under
                     iter_0000005/mp_rank_0T[_00E], and computes its T = 2 loss. We load the files
                     with `--load --no-load-optim` at T = 2 on 2 gloo ranks (every tensor, loss,
                     iteration, consumed samples) and at T = 1 after `tools/checkpoint/reshard.py
                     --target-tensor-parallel-size 1 --target-expert-parallel-size 1` (one process,
                     `--make-vocab-size-divisible-by 256`: the files' vocabulary is padded for
                     T = 2, 128 * T rows; loss). Megatron-Core at T = 1 (one process) then loads
                     that reshard with `strict=True`, every tensor is compared with ours at T = 1,
                     and its T = 1 loss must match its own T = 2 loss (a wrongly merged slice would
                     change it) and ours. With EP = 2, CPU initialisation would give both EP ranks
                     the same local experts; they are redrawn from a per-EP-rank seed (as
                     Megatron-LM's expert RNG differs per EP rank), so that a misplaced expert
                     changes the losses.

The per-rank tensor comparison is p1.compare (Megatron-Core's module view: SequentialMLP's
x @ linear_fc1.weight^T, GroupedMLP's [E, D, 2F/ETP] view) against our rank's parameters; the
losses are the independent check that both sides' slices mean the same thing (QKV split per
query group, fc1 as [gate slice; up slice]).

Megatron-Core builds its model with `vocab_size=args.padded_vocab_size` (256 at T = 2), as
Megatron-LM's model provider does. Shims: the P = 1 check's (cuda device "cpu", no-op CUDA RNG
fork, TE GEMM absent, grouped_gemm as a per-expert loop), and one for sequence parallelism: the
local spec's norm without apex is WrappedTorchNorm, which asserts `not sequence_parallel`
(Megatron-LM would use apex's FusedLayerNorm); it is built from a config copy with
sequence_parallel False, the same torch RMSNorm, which acts on each token alone (`_norm_shim`).
Gloo in torch 2.13 implements `all_gather_into_tensor` and `reduce_scatter_tensor`, which
Megatron-Core's sequence-parallel mappings call; in case the Megatron venv's torch lacks them,
`_collective_fallbacks` replaces them with all_gather / all_reduce equivalents only when a probe
fails. Exit status 0 when every check passes (tensors equal, |loss difference| <= 1e-5).
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

import check_checkpoint_in_megatron as p1
import check_pipeline_checkpoint_in_megatron as p2

T = 2
GLOBAL_BATCH = p1.SHAPE["batch"]  # T = 2 on 2 ranks: data-parallel size 1
# variant: (experts, ETP, EP); EP = 2 on the same 2 ranks is Megatron-Core's folding (T = 2 x EP = 2,
# ETP = 1): files mp_rank_00_000 and mp_rank_01_001, each with 2 of the 4 experts.
VARIANTS = {"sequential-etp1": ("sequential", 1, 1), "sequential-etp2": ("sequential", 2, 1),
            "grouped-etp1": ("grouped", 1, 1), "grouped-etp2": ("grouped", 2, 1),
            "sequential-ep2": ("sequential", 1, 2)}
MEGATRON_ITERATION = 5
# Megatron-LM pads the vocabulary to a multiple of make_vocab_size_divisible_by * T: 128 -> 256 at T = 2.
PADDED_VOCAB = -(-p1.SHAPE["vocab"] // (128 * T)) * 128 * T
_path, _json = p2._path, p2._json


def _rank_file(root: str, iteration: int, rank: int, ep: int = 1) -> str:
    """Megatron-LM's file of `rank` (tensor-parallel rank `rank`; with EP folded over the same two
    ranks, expert-parallel rank `rank` too: mp_rank_TT_EEE)."""
    name = f"mp_rank_{rank:02d}" + (f"_{rank:03d}" if ep > 1 else "")
    return _path(root, f"iter_{iteration:07d}", name, "model_optim_rng.pt")


def _spawn(fn, work: str, variant: str) -> None:
    """p2._spawn with a barrier after fn: no rank tears its gloo group down while the other still
    uses it (a full run once aborted a rank with "terminate called without an active exception")."""
    p2._spawn(_then_barrier, fn, work, variant)


def _then_barrier(rank: int, fn, work: str, variant: str) -> None:
    fn(rank, work, variant)
    torch.distributed.barrier()


# ============================================================================ our side (this project's venv)


def _ours_flags(variant: str, tp: int, vocab_multiple: int = 128) -> list[str]:
    experts, etp, ep = VARIANTS[variant]
    flags = p1._ours_flags(experts)
    flags[flags.index("--make-vocab-size-divisible-by") + 1] = str(vocab_multiple)
    if tp > 1:
        flags += ["--tensor-model-parallel-size", str(tp), "--sequence-parallel",
                  "--expert-tensor-parallel-size", str(etp), "--expert-model-parallel-size", str(ep)]
    return flags


def _ours_cfg(variant: str, tp: int, extra: list[str], vocab_multiple: int = 128):
    from megatron.training.arguments import config_from_args, parse_args

    return config_from_args(parse_args(_ours_flags(variant, tp, vocab_multiple) + extra), world_size=tp)


def _tp_groups(variant: str):
    from megatron.core.parallel_state import groups_from_mesh

    _, etp, ep = VARIANTS[variant]
    return groups_from_mesh(ep, torch.device("cpu"), "gloo", tp_size=T, etp_size=etp)


def _ours_loaded(cfg, groups):
    from megatron.training import checkpointing
    from megatron.training.train import Trainer

    trainer = Trainer(cfg, groups)
    checkpointing.load_checkpoint(trainer, cfg, groups)
    return trainer


def _ours_loss(trainer, work: str) -> float:
    batch = p1.fixed_batch(work)
    trainer.model.eval()
    with torch.no_grad():
        return float(trainer.model(batch["tokens"], None, batch["labels"]).lm_loss)


def _ours_save_rank(rank: int, work: str, variant: str) -> None:
    from megatron.training.train import pretrain

    save = _path(work, f"ours_{variant}")
    pretrain(_ours_cfg(variant, T, ["--save", save, "--train-iters", "2"]), groups=_tp_groups(variant))
    # What each rank holds (its slices, our names), read back by our own reader, and our T = 2 loss.
    trainer = _ours_loaded(_ours_cfg(variant, T, ["--load", save, "--train-iters", "10", "--no-load-optim"]),
                           _tp_groups(variant))
    torch.save(trainer.model.state_dict(), _path(work, f"ours_{variant}_state_rank{rank}.pt"))
    _json(_path(work, f"ours_{variant}_loss_rank{rank}.json"), {"loss": _ours_loss(trainer, work)})


def ours_save(work: str, variant: str) -> None:
    _spawn(_ours_save_rank, work, variant)


def _ours_load_rank(rank: int, work: str, variant: str) -> None:
    root = _path(work, f"mcore_{variant}")
    trainer = _ours_loaded(_ours_cfg(variant, T, ["--load", root, "--train-iters", "10", "--no-load-optim"]),
                           _tp_groups(variant))
    report = p2.compare_stage(torch.load(_path(work, f"mcore_{variant}_state_rank{rank}.pt")),
                              trainer.model.state_dict())
    report.update(iteration=trainer.state.iteration, consumed_train_samples=trainer.state.consumed_train_samples,
                  loss_ours=_ours_loss(trainer, work))
    _json(_path(work, f"report_mcore_to_ours_{variant}_rank{rank}.json"), report)


def ours_load(work: str, variant: str) -> None:
    """Megatron-Core's T = 2 files at T = 2 (2 ranks), then at T = 1 after reshard.py (one process)."""
    _spawn(_ours_load_rank, work, variant)
    root, one = _path(work, f"mcore_{variant}"), _path(work, f"mcore_{variant}_t1")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, _path(repo, "tools", "checkpoint", "reshard.py"), "--load-dir", root,
                    "--save-dir", one, "--ckpt-format", "torch", "--target-tensor-parallel-size", "1",
                    "--target-expert-parallel-size", "1"], check=True)
    from megatron.core.parallel_state import ProcessGroups

    # The T = 2 files hold the vocabulary padded for T = 2 (256 rows); a T = 1 run keeps it, as a
    # Megatron-LM one would, with --make-vocab-size-divisible-by 256.
    trainer = _ours_loaded(_ours_cfg(variant, 1, ["--load", one, "--train-iters", "10", "--no-load-optim"],
                                     vocab_multiple=PADDED_VOCAB), ProcessGroups())
    torch.save(trainer.model.state_dict(), _path(work, f"ours_{variant}_t1_state.pt"))
    _json(_path(work, f"report_mcore_to_ours_{variant}_t1.json"),
          {"loss_ours": _ours_loss(trainer, work), "iteration": trainer.state.iteration,
           "consumed_train_samples": trainer.state.consumed_train_samples})


# ============================================================================ Megatron-Core's side (its venv)


def _collective_fallbacks() -> list[str]:
    """all_gather_into_tensor / reduce_scatter_tensor through all_gather / all_reduce, only where
    this torch's gloo lacks them (probed once); returns what was replaced."""
    import torch.distributed as dist

    replaced = []
    x = torch.zeros(T)
    try:
        dist.all_gather_into_tensor(torch.empty(T * T), x)
    except (RuntimeError, NotImplementedError):
        def all_gather_into_tensor(output, input, group=None, async_op=False):
            parts = list(output.chunk(dist.get_world_size(group)))
            dist.all_gather(parts, input.contiguous(), group=group)
            output.copy_(torch.cat(parts))
            assert not async_op

        dist.all_gather_into_tensor = all_gather_into_tensor
        replaced.append("all_gather_into_tensor")
    try:
        dist.reduce_scatter_tensor(torch.empty(1), x)
    except (RuntimeError, NotImplementedError):
        def reduce_scatter_tensor(output, input, op=dist.ReduceOp.SUM, group=None, async_op=False):
            whole = input.clone()
            dist.all_reduce(whole, op=op, group=group)
            output.copy_(whole.chunk(dist.get_world_size(group))[dist.get_rank(group)])
            assert not async_op

        dist.reduce_scatter_tensor = reduce_scatter_tensor
        replaced.append("reduce_scatter_tensor")
    return replaced


def _megatron_init(variant: str) -> list[str]:
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=T, pipeline_model_parallel_size=1,
                                             expert_model_parallel_size=VARIANTS[variant][2],
                                             expert_tensor_parallel_size=VARIANTS[variant][1])
    p1._megatron_cpu_shims()
    _norm_shim()
    return _collective_fallbacks()


def _norm_shim() -> None:
    """The local spec's norm without apex is WrappedTorchNorm, which refuses sequence_parallel
    (Megatron-LM would use apex's FusedLayerNorm there: the same per-token normalisation, its
    weight marked for the sequence-parallel gradient all-reduce). Built from a config copy with
    sequence_parallel False, it is the same torch RMSNorm; a norm acts on each token alone, so on
    [s/T, b, h] it computes what it computes on [s, b, h]."""
    import copy

    from megatron.core.transformer import torch_norm

    original = torch_norm.WrappedTorchNorm.__new__

    def new(cls, config, *args, **kwargs):
        config = copy.copy(config)
        config.sequence_parallel = False
        return original(cls, config, *args, **kwargs)

    torch_norm.WrappedTorchNorm.__new__ = new


def megatron_model(variant: str, tp: int = T, vocab_size: int = PADDED_VOCAB):
    """GPTModel as Megatron-LM's model provider builds it for these flags (local layer spec), with
    `args.padded_vocab_size` rows of vocabulary."""
    experts, etp, ep = VARIANTS[variant]
    if tp == 1:
        return p1.megatron_model(experts, vocab_size=vocab_size)
    cfg = p1.megatron_config(experts, tensor_model_parallel_size=tp, sequence_parallel=True,
                             expert_tensor_parallel_size=etp, expert_model_parallel_size=ep)
    return p1.megatron_model(experts, cfg, vocab_size=vocab_size)


def _local_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def _mcore_load_rank(rank: int, work: str, variant: str) -> None:
    fallbacks = _megatron_init(variant)
    model = megatron_model(variant)
    state_dict = torch.load(_rank_file(_path(work, f"ours_{variant}"), 2, rank, VARIANTS[variant][2]),
                            map_location="cpu")
    result = model.load_state_dict(state_dict["model"], strict=True)
    report = p2.compare_stage(_local_state(model), torch.load(_path(work, f"ours_{variant}_state_rank{rank}.pt")))
    args = state_dict["args"]
    report.update(
        strict_load={"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys)},
        args_checked={**p1._megatron_lm_check_args(args),
                      **{n: getattr(args, n, "MISSING") for n in (
                          "expert_tensor_parallel_size", "expert_model_parallel_size", "sequence_parallel")}},
        loss_megatron=p1.megatron_loss(model, torch.load(_path(work, "batch.pt"))), collective_fallbacks=fallbacks)
    _json(_path(work, f"report_ours_to_mcore_{variant}_rank{rank}.json"), report)


def mcore_load(work: str, variant: str) -> None:
    _spawn(_mcore_load_rank, work, variant)


def _mcore_save_rank(rank: int, work: str, variant: str) -> None:
    experts, etp, ep = VARIANTS[variant]
    _megatron_init(variant)
    torch.manual_seed(1234)  # Megatron-LM seeds every tensor-parallel rank's CPU generator alike
    model = megatron_model(variant)
    if ep > 1:  # CPU initialisation draws the same local experts on every EP rank; Megatron-LM seeds
        # each EP rank's experts differently (its expert RNG): redraw them per EP rank, so that two
        # ranks' experts differ and a misplaced expert would show in the losses.
        from megatron.core import parallel_state

        gen = torch.Generator().manual_seed(1234 + 1024 + parallel_state.get_expert_model_parallel_rank())
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".mlp.experts." in name:
                    param.normal_(0.0, 0.02, generator=gen)
    args = p1.megatron_args(experts, MEGATRON_ITERATION * GLOBAL_BATCH + 6, tensor_model_parallel_size=T,
                            padded_vocab_size=PADDED_VOCAB, make_vocab_size_divisible_by=128,
                            expert_tensor_parallel_size=etp, expert_model_parallel_size=ep, sequence_parallel=True,
                            global_batch_size=GLOBAL_BATCH,
                            micro_batch_size=p1.SHAPE["batch"])
    root = _path(work, f"mcore_{variant}")
    path = _rank_file(root, MEGATRON_ITERATION, rank, ep)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(p1.megatron_checkpoint_payload(args, MEGATRON_ITERATION,
                                              {"model": model.state_dict_for_save_checkpoint()}), path)
    if rank == 0:
        with open(_path(root, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(MEGATRON_ITERATION))
    torch.save(_local_state(model), _path(work, f"mcore_{variant}_state_rank{rank}.pt"))
    _json(_path(work, f"mcore_{variant}_rank{rank}.json"),
          {"consumed": args.consumed_train_samples,
           "loss_megatron": p1.megatron_loss(model, torch.load(_path(work, "batch.pt")))})


def mcore_save(work: str, variant: str) -> None:
    _spawn(_mcore_save_rank, work, variant)


def mcore_t1(work: str, variant: str) -> None:
    """Megatron-Core at T = 1 (one process) loads the T = 1 reshard of its own T = 2 files."""
    p1._megatron_init(p2._free_port())
    path = _rank_file(_path(work, f"mcore_{variant}_t1"), MEGATRON_ITERATION, 0)
    payload = torch.load(path, map_location="cpu")
    model = megatron_model(variant, tp=1, vocab_size=payload["args"].padded_vocab_size)
    result = model.load_state_dict(payload["model"], strict=True)
    report = p2.compare_stage(_local_state(model), torch.load(_path(work, f"ours_{variant}_t1_state.pt")))
    report.update(strict_load={"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys)},
                  loss_megatron=p1.megatron_loss(model, torch.load(_path(work, "batch.pt"))))
    _json(_path(work, f"report_mcore_t1_{variant}.json"), report)


# ============================================================================ both sides


def _loss(ours: float, megatron: float) -> tuple[bool, str]:
    diff = abs(ours - megatron)
    return diff <= p1.LOSS_TOLERANCE, f"loss ours {ours:.7f} Megatron {megatron:.7f} |diff| {diff:.2e}"


def summarise(work: str, variant: str) -> bool:
    experts, etp, ep = VARIANTS[variant]
    label = f"T=2+SP {variant:15s}"
    ok_all = True

    ranks = [_json(_path(work, f"report_ours_to_mcore_{variant}_rank{r}.json")) for r in range(T)]
    ok, line = p2._tensor_line(ranks)
    ok2, strict = p2._strict(ranks)
    ours_losses = [_json(_path(work, f"ours_{variant}_loss_rank{r}.json"))["loss"] for r in range(T)]
    ok3 = all(_loss(o, r["loss_megatron"])[0] for o, r in zip(ours_losses, ranks))
    _, loss_line = _loss(ours_losses[0], ranks[0]["loss_megatron"])
    args = ranks[0]["args_checked"]
    ok4 = all(r["args_checked"]["tensor_model_parallel_size"] == T and r["args_checked"]["sequence_parallel"] is True
              and r["args_checked"]["expert_tensor_parallel_size"] == etp
              and r["args_checked"]["expert_model_parallel_size"] == ep and "MISSING" not in r["args_checked"].values()
              for r in ranks)
    ok = ok and ok2 and ok3 and ok4
    fallbacks = ranks[0]["collective_fallbacks"]
    print(f"{'PASS' if ok else 'FAIL'} ours -> Megatron  {label} {line}; {strict}; {loss_line} (Megatron-Core T=2 "
          f"forward; ranks: ours {[format(x, '.7f') for x in ours_losses]}, Megatron "
          f"{[format(r['loss_megatron'], '.7f') for r in ranks]}); args: tensor_model_parallel_size="
          f"{args['tensor_model_parallel_size']}, expert_tensor_parallel_size={args['expert_tensor_parallel_size']}, "
          f"expert_model_parallel_size={args['expert_model_parallel_size']}, "
          f"sequence_parallel={args['sequence_parallel']}, iteration={args['iteration']}"
          + (f"; gloo fallbacks: {fallbacks}" if fallbacks else ""))
    ok_all &= ok

    saved = [_json(_path(work, f"mcore_{variant}_rank{r}.json")) for r in range(T)]
    megatron_loss = saved[0]["loss_megatron"]
    ranks = [_json(_path(work, f"report_mcore_to_ours_{variant}_rank{r}.json")) for r in range(T)]
    ok, line = p2._tensor_line(ranks)
    resumed = {(r["iteration"], r["consumed_train_samples"]) for r in ranks}
    ok = ok and resumed == {(MEGATRON_ITERATION, saved[0]["consumed"])}
    ok = ok and all(_loss(r["loss_ours"], s["loss_megatron"])[0] for r, s in zip(ranks, saved))
    _, loss_line = _loss(ranks[0]["loss_ours"], megatron_loss)
    print(f"{'PASS' if ok else 'FAIL'} Megatron -> ours  {label} at T=2: {line}; {loss_line} (both T=2); resumed at "
          f"(iteration, consumed samples) {sorted(resumed)} (Megatron: {(MEGATRON_ITERATION, saved[0]['consumed'])})")
    ok_all &= ok

    one = _json(_path(work, f"report_mcore_to_ours_{variant}_t1.json"))
    megatron_t1 = _json(_path(work, f"report_mcore_t1_{variant}.json"))
    ok, line = p2._tensor_line([megatron_t1])
    ok2, strict = p2._strict([megatron_t1])
    ok3, loss_line = _loss(one["loss_ours"], megatron_loss)
    ok4, self_line = _loss(megatron_t1["loss_megatron"], megatron_loss)
    ok = ok and ok2 and ok3 and ok4 and one["iteration"] == MEGATRON_ITERATION
    print(f"{'PASS' if ok else 'FAIL'} Megatron -> ours  {label} at T=1 (reshard.py): {loss_line} (ours T=1, "
          f"Megatron T=2); Megatron-Core T=1 loads the reshard: {strict}, {line} against ours T=1, its T=1 loss "
          f"{megatron_t1['loss_megatron']:.7f} vs its T=2 loss |diff| "
          f"{abs(megatron_t1['loss_megatron'] - megatron_loss):.2e}")
    return ok_all and ok


def main() -> int:
    return p2.run_checks(__file__, __doc__, VARIANTS, {
        "ours-save": ("ours", ours_save), "mcore-load": ("mcore", mcore_load), "mcore-save": ("mcore", mcore_save),
        "ours-load": ("ours", ours_load), "mcore-t1": ("mcore", mcore_t1)}, summarise)


if __name__ == "__main__":
    sys.exit(main())
