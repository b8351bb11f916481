"""Check `--ckpt-format torch` checkpoints against Megatron-Core itself, in both directions.

    python tools/megatron_parity/check_checkpoint_in_megatron.py \
        --mcore-python /work/mcore-venv/bin/python --work-dir /tmp/ckpt_parity

Run it with this project's Python; `--mcore-python` is a separate venv with megatron-core 0.16.1
and torch (no Transformer Engine or apex needed). The two never share a process (both packages
are `megatron`): the script calls itself under each interpreter and they exchange files in
`--work-dir`. For each expert implementation Megatron-Core can build without Transformer
Engine, SequentialMLP and the legacy GroupedMLP (local layer spec):

  ours -> Megatron   we train 2 iterations and save (`--transformer-impl local`, with or without
                     `--moe-grouped-gemm`); Megatron-Core's GPTModel loads `model_optim_rng.pt`
                     as Megatron-LM does (`torch.load` with its weights-only defaults) with
                     `load_state_dict(strict=True)`; every tensor is compared with ours as the
                     Megatron module uses it, and the LM loss on a fixed batch with ours.
  Megatron -> ours   Megatron-Core's GPTModel (its own initialisation) is saved as Megatron-LM's
                     legacy checkpoint (`state_dict_for_save_checkpoint()`, Megatron-LM-style
                     `args` with Megatron-Core enums, RNG list); we load it through `--load` and
                     compare every tensor and the loss.

Megatron-Core runs on the CPU in one gloo process; shims make that possible without changing
what is computed: `torch.cuda.current_device` answers "cpu", the CUDA RNG tracker's fork is a
no-op (dropout is 0), the Transformer Engine GEMM its router probes for is marked absent, the
causal mask is passed explicitly, and GroupedMLP's `grouped_gemm.ops.gmm` is a per-expert
matmul loop (its bf16-only assertion is satisfied on the experts' config copy; parameters stay
fp32). Exit status 0 when every check passes (tensors equal, |loss difference| <= 1e-5).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

# The model both sides build: layer 0 dense, layer 1 MoE (4 experts, top-2) with a shared expert.
SHAPE = dict(num_layers=2, hidden=64, heads=4, groups=2, ffn=128, moe_ffn=32, experts=4, topk=2, shared=64,
             vocab=128, seq=32, batch=2)
OURS_FLAGS = (
    f"--num-layers {SHAPE['num_layers']} --hidden-size {SHAPE['hidden']} --num-attention-heads {SHAPE['heads']} "
    f"--group-query-attention --num-query-groups {SHAPE['groups']} --ffn-hidden-size {SHAPE['ffn']} "
    f"--moe-ffn-hidden-size {SHAPE['moe_ffn']} --num-experts {SHAPE['experts']} --moe-router-topk {SHAPE['topk']} "
    f"--moe-layer-freq [0,1] --moe-shared-expert-intermediate-size {SHAPE['shared']} --qk-layernorm "
    f"--seq-length {SHAPE['seq']} --max-position-embeddings {SHAPE['seq']} --position-embedding-type rope "
    "--normalization RMSNorm --swiglu --disable-bias-linear --untie-embeddings-and-output-weights "
    f"--hidden-dropout 0 --attention-dropout 0 --vocab-size {SHAPE['vocab']} --make-vocab-size-divisible-by 128 "
    f"--mock-data --micro-batch-size {SHAPE['batch']} --global-batch-size {SHAPE['batch']} --lr 1e-2 "
    "--moe-aux-loss-coeff 0.01 --eval-iters 0 --num-workers 0 --log-interval 1 --ckpt-format torch"
).split()
MEGATRON_ITERATION = 5
LOSS_TOLERANCE = 1e-5
# +biases: linear biases everywhere and a router bias; no shared expert (Megatron-Core refuses biases there).
EXPERTS = ("sequential", "grouped", "sequential+biases")


def _shared(experts: str):
    return None if experts.endswith("+biases") else SHAPE["shared"]


def _ours_flags(experts: str) -> list[str]:
    flags = list(OURS_FLAGS) + (["--moe-grouped-gemm"] if experts == "grouped" else [])
    if experts.endswith("+biases"):
        flags.remove("--disable-bias-linear")
        at = flags.index("--moe-shared-expert-intermediate-size")
        del flags[at:at + 2]
    return flags


def _path(work: str, *parts: str) -> str:
    return os.path.join(work, *parts)


# ============================================================================ our side (this project's venv)


def fixed_batch(work: str) -> dict:
    path = _path(work, "batch.pt")
    if not os.path.exists(path):
        gen = torch.Generator().manual_seed(7)
        shape = (SHAPE["batch"], SHAPE["seq"])
        torch.save({"tokens": torch.randint(0, SHAPE["vocab"], shape, generator=gen),
                    "labels": torch.randint(0, SHAPE["vocab"], shape, generator=gen)}, path)
    return torch.load(path)


def _ours_cfg(experts: str, extra: list[str]):
    from megatron.training.arguments import config_from_args, parse_args

    return config_from_args(parse_args(_ours_flags(experts) + extra), world_size=1)


def _ours_loaded(load_dir: str, experts: str):
    """Our Trainer restored from `load_dir` through --load, and its loss on the fixed batch."""
    from megatron.core.parallel_state import ProcessGroups
    from megatron.training import checkpointing
    from megatron.training.train import Trainer

    cfg = _ours_cfg(experts, ["--load", load_dir, "--train-iters", "10", "--no-load-optim"])
    trainer = Trainer(cfg, ProcessGroups())
    checkpointing.load_checkpoint(trainer, cfg, trainer.groups)
    batch = fixed_batch(os.path.dirname(load_dir))
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.model(batch["tokens"], None, batch["labels"]).lm_loss
    return trainer, float(loss)


def ours_save(work: str, experts: str) -> None:
    from megatron.training.train import pretrain

    save = _path(work, f"ours_{experts}")
    pretrain(_ours_cfg(experts, ["--save", save, "--train-iters", "2"]))
    trainer, loss = _ours_loaded(save, experts)
    torch.save(trainer.model.state_dict(), _path(work, f"ours_{experts}_state.pt"))
    with open(_path(work, f"ours_{experts}_loss.json"), "w") as f:
        json.dump({"loss": loss}, f)


def ours_load(work: str, experts: str) -> dict:
    trainer, loss = _ours_loaded(_path(work, f"mcore_{experts}"), experts)
    from megatron.training.safe_load import load_file

    megatron = load_file(_path(work, f"mcore_{experts}", f"iter_{MEGATRON_ITERATION:07d}", "mp_rank_00",
                               "model_optim_rng.pt"))
    diffs = compare(megatron["model"], trainer.model.state_dict())
    with open(_path(work, f"mcore_{experts}_loss.json")) as f:
        expected = json.load(f)["loss"]
    return {"direction": "Megatron -> ours", "experts": experts, "tensors": diffs, "loss_ours": loss,
            "loss_megatron": expected, "iteration": trainer.state.iteration,
            "consumed_train_samples": trainer.state.consumed_train_samples,
            "consumed_expected": megatron["args"].consumed_train_samples}


# ============================================================================ Megatron-Core's side (its venv)


def _megatron_cpu_shims() -> None:
    import contextlib
    import types

    torch.cuda.current_device = lambda: "cpu"
    from megatron.core import tensor_parallel
    from megatron.core.transformer.moe import grouped_gemm_util, moe_utils

    tensor_parallel.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
    moe_utils.te_general_gemm = None

    def gmm(x, w, batch_sizes, trans_b=False):  # grouped_gemm's contract: rows grouped by expert
        outs, start = [], 0
        for e, n in enumerate(batch_sizes.tolist()):
            outs.append(x[start:start + n] @ (w[e].t() if trans_b else w[e]))
            start += n
        return torch.cat(outs)

    grouped_gemm_util.assert_grouped_gemm_is_available = lambda: None
    grouped_gemm_util.ops = types.SimpleNamespace(gmm=gmm)


def _megatron_init(port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=1)
    _megatron_cpu_shims()


def megatron_config(experts: str, **overrides):
    """Megatron-Core's TransformerConfig of SHAPE; `overrides` replace or add fields."""
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    s = SHAPE
    fields = dict(
        num_layers=s["num_layers"], hidden_size=s["hidden"], num_attention_heads=s["heads"],
        num_query_groups=s["groups"], ffn_hidden_size=s["ffn"], moe_ffn_hidden_size=s["moe_ffn"],
        num_moe_experts=s["experts"], moe_router_topk=s["topk"], moe_layer_freq=[0, 1],
        moe_shared_expert_intermediate_size=_shared(experts), qk_layernorm=True, gated_linear_unit=True,
        activation_func=F.silu, normalization="RMSNorm", layernorm_epsilon=1e-5,
        add_bias_linear=experts.endswith("+biases"),
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True, init_method_std=0.02,
        moe_token_dispatcher_type="allgather", moe_router_load_balancing_type="none",
        moe_grouped_gemm=experts == "grouped", bias_activation_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, masked_softmax_fusion=False, gradient_accumulation_fusion=False,
        persist_layer_norm=False)
    return TransformerConfig(**{**fields, **overrides})


def megatron_model(experts: str, cfg=None, tied: bool = False, pre_process: bool = True, post_process: bool = True,
                   vp_stage=None, vocab_size=None):
    """Megatron-Core's GPTModel of SHAPE (or of `cfg`) with the local layer spec (SequentialMLP or
    GroupedMLP); with pipeline stages, the part `pre_process`/`post_process`/`vp_stage` name;
    `vocab_size`: Megatron-LM's padded vocabulary when it is not SHAPE's (T > 1 pads to 128 * T)."""
    import copy

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.moe.experts import GroupedMLP

    s = SHAPE
    cfg = megatron_config(experts) if cfg is None else cfg
    spec = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False, normalization="RMSNorm", vp_stage=vp_stage)
    model = GPTModel(cfg, spec, vocab_size=vocab_size or s["vocab"], max_sequence_length=s["seq"], position_embedding_type="rope",
                     rotary_base=10000, share_embeddings_and_output_weights=tied, pre_process=pre_process,
                     post_process=post_process, vp_stage=vp_stage)
    for module in model.modules():
        if isinstance(module, GroupedMLP):  # its forward asserts bf16; the computation here stays fp32
            module.config = copy.copy(module.config)
            module.config.bf16 = True
    return model.eval()


def megatron_loss(model, batch: dict) -> float:
    S = batch["tokens"].shape[1]
    position_ids = torch.arange(S).expand_as(batch["tokens"])
    causal = torch.triu(torch.ones(1, 1, S, S), diagonal=1).bool()
    with torch.no_grad():
        return float(model(batch["tokens"], position_ids, causal, labels=batch["labels"]).mean())


def mcore_load(work: str, experts: str) -> None:
    _megatron_init(29541)
    model = megatron_model(experts)
    path = _path(work, f"ours_{experts}", "iter_0000002", "mp_rank_00", "model_optim_rng.pt")
    state_dict = torch.load(path, map_location="cpu")  # as Megatron-LM's _load_base_checkpoint
    result = model.load_state_dict(state_dict["model"], strict=True)
    ours = torch.load(_path(work, f"ours_{experts}_state.pt"))
    diffs = compare(model.state_dict(), ours)
    with open(_path(work, f"ours_{experts}_loss.json")) as f:
        expected = json.load(f)["loss"]
    report = {"direction": "ours -> Megatron", "experts": experts, "tensors": diffs,
              "strict_load": {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys)},
              "loss_megatron": megatron_loss(model, torch.load(_path(work, "batch.pt"))), "loss_ours": expected,
              "args_checked": _megatron_lm_check_args(state_dict["args"])}
    with open(_path(work, f"report_ours_to_mcore_{experts}.json"), "w") as f:
        json.dump(report, f)


def _megatron_lm_check_args(args) -> dict:
    """The attributes Megatron-LM's check_checkpoint_args and resume read from `args`."""
    names = ("num_layers", "hidden_size", "num_attention_heads", "add_position_embedding", "max_position_embeddings",
             "make_vocab_size_divisible_by", "padded_vocab_size", "tokenizer_type", "tensor_model_parallel_size",
             "pipeline_model_parallel_size", "consumed_train_samples", "consumed_valid_samples", "iteration")
    return {n: getattr(args, n, "MISSING") for n in names}


def mcore_save(work: str, experts: str) -> None:
    _megatron_init(29542)
    torch.manual_seed(1234)
    model = megatron_model(experts)
    save_megatron_checkpoint(model, _path(work, f"mcore_{experts}"), experts, MEGATRON_ITERATION,
                             MEGATRON_ITERATION * SHAPE["batch"] + 6)
    with open(_path(work, f"mcore_{experts}_loss.json"), "w") as f:
        json.dump({"loss": megatron_loss(model, torch.load(_path(work, "batch.pt")))}, f)


def megatron_args(experts: str, consumed_train_samples: int, **overrides) -> argparse.Namespace:
    """What Megatron-LM's `args` hold for this model (its attribute names); `overrides` replace or add."""
    from megatron.core.enums import ModelType
    from megatron.core.transformer.enums import AttnBackend

    s = SHAPE
    fields = dict(
        num_layers=s["num_layers"], hidden_size=s["hidden"], num_attention_heads=s["heads"], group_query_attention=True,
        num_query_groups=s["groups"], kv_channels=s["hidden"] // s["heads"], ffn_hidden_size=s["ffn"],
        seq_length=s["seq"], max_position_embeddings=s["seq"], position_embedding_type="rope", rotary_base=10000,
        normalization="RMSNorm", swiglu=True, add_bias_linear=experts.endswith("+biases"), qk_layernorm=True,
        untie_embeddings_and_output_weights=True, padded_vocab_size=s["vocab"], num_experts=s["experts"],
        moe_ffn_hidden_size=s["moe_ffn"], moe_router_topk=s["topk"], moe_layer_freq=[0, 1],
        moe_shared_expert_intermediate_size=_shared(experts), moe_grouped_gemm=experts == "grouped",
        transformer_impl="local", tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        expert_model_parallel_size=1, consumed_train_samples=consumed_train_samples,
        consumed_valid_samples=0, attention_backend=AttnBackend.auto, model_type=ModelType.encoder_or_decoder,
        params_dtype=torch.float32, ckpt_format="torch")
    return argparse.Namespace(**{**fields, **overrides})


def megatron_checkpoint_payload(args: argparse.Namespace, iteration: int, models: dict) -> dict:
    """One rank's file as Megatron-LM writes it; `models` is {"model": ...} or {"model0": ..., ...}."""
    import random

    import numpy as np

    rng = {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
           "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": torch.get_rng_state(), "rng_tracker_states": {}}
    return {"args": args, "checkpoint_version": 3.0, "iteration": iteration, **models, "rng_state": [rng],
            "num_floating_point_operations_so_far": 0}


def save_megatron_checkpoint(model, root: str, experts: str, iteration: int, consumed_train_samples: int,
                             **args_overrides) -> None:
    """`model` saved as Megatron-LM saves a legacy checkpoint of iteration `iteration` into `root`."""
    args = megatron_args(experts, consumed_train_samples, **args_overrides)
    payload = megatron_checkpoint_payload(args, iteration, {"model": model.state_dict_for_save_checkpoint()})
    directory = _path(root, f"iter_{iteration:07d}", "mp_rank_00")
    os.makedirs(directory, exist_ok=True)
    torch.save(payload, _path(directory, "model_optim_rng.pt"))
    with open(_path(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(iteration))


# ============================================================================ both sides


def compare(megatron_state: dict, ours: dict) -> dict:
    """Max |difference| per Megatron-Core tensor between it (as its module uses it) and our tensor.

    Written from Megatron-Core's forward, independently of megatron_layout: SequentialMLP's
    expert e computes x @ linear_fc1.weight^T (ours x @ weight1[e]); GroupedMLP views weight1
    as [E, D, 2F] and weight2 as [E, F, D] (ours as stored); everything else has our names.
    """
    diffs, E, D = {}, SHAPE["experts"], SHAPE["hidden"]
    for name, value in megatron_state.items():
        if name.endswith("_extra_state"):
            continue
        head, sep, tail = name.partition(".mlp.experts.")
        if not sep:
            mine, theirs = ours[name], value
        elif tail.startswith("local_experts."):
            _, e, fc, kind = tail.split(".")
            ours_name = ("weight" if kind == "weight" else "bias") + ("1" if fc == "linear_fc1" else "2")
            mine = ours[f"{head}.mlp.experts.{ours_name}"][int(e)]
            theirs = value.t() if kind == "weight" else value
        elif tail == "weight1":
            mine, theirs = ours[name], value.view(E, D, -1)
        elif tail == "weight2":
            mine, theirs = ours[name], value.view(E, -1, D)
        else:
            raise KeyError(f"unexpected Megatron tensor {name}")
        diffs[name] = float((mine.float() - theirs.float()).abs().max()) if mine.shape == theirs.shape else "shape"
    return diffs


def _run(python: str, work: str, step: str, experts: str) -> None:
    script = os.path.abspath(__file__)
    subprocess.run([python, script, "--step", step, "--experts", experts, "--work-dir", work], check=True,
                   cwd=work)  # outside the checkout: Megatron-Core's `megatron` must not meet ours


def _summarise(report: dict) -> bool:
    tensors = report["tensors"]
    worst = max((v for v in tensors.values() if v != "shape"), default=0.0)
    shape_errors = [k for k, v in tensors.items() if v == "shape"]
    loss_diff = abs(report["loss_ours"] - report["loss_megatron"])
    ok = worst == 0.0 and not shape_errors and loss_diff <= LOSS_TOLERANCE
    line = (f"{report['direction']:17s} {report['experts']:10s} tensors: {len(tensors)} compared, max |diff| {worst:.3g}"
            f"{' (wrong shapes: ' + ', '.join(shape_errors) + ')' if shape_errors else ''}; loss ours "
            f"{report['loss_ours']:.7f} Megatron {report['loss_megatron']:.7f} |diff| {loss_diff:.2e}")
    if "strict_load" in report:
        strict = report["strict_load"]
        ok = ok and not strict["missing"] and not strict["unexpected"]
        line += f"; strict load: missing {len(strict['missing'])}, unexpected {len(strict['unexpected'])}"
        args = report["args_checked"]
        ok = ok and "MISSING" not in args.values()
        line += f"; args: {', '.join(f'{k}={v}' for k, v in args.items())}"
    else:
        resumed = (report["iteration"], report["consumed_train_samples"])
        ok = ok and resumed == (MEGATRON_ITERATION, report["consumed_expected"])
        line += f"; resumed at iteration {resumed[0]}, consumed samples {resumed[1]} (Megatron: {report['consumed_expected']})"
    print(("PASS " if ok else "FAIL ") + line)
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mcore-python", help="python of a venv with megatron-core 0.16.1 (not this project)")
    p.add_argument("--work-dir", required=True)
    p.add_argument("--step", choices=["ours-save", "mcore-load", "mcore-save"], help=argparse.SUPPRESS)
    p.add_argument("--experts", choices=EXPERTS, help=argparse.SUPPRESS)
    a = p.parse_args()
    work = os.path.abspath(a.work_dir)
    if a.step is not None:
        {"ours-save": ours_save, "mcore-load": mcore_load, "mcore-save": mcore_save}[a.step](work, a.experts)
        return 0
    if a.mcore_python is None:
        p.error("--mcore-python is required")
    os.makedirs(work, exist_ok=True)
    fixed_batch(work)
    ok = True
    for experts in EXPERTS:
        _run(sys.executable, work, "ours-save", experts)
        _run(a.mcore_python, work, "mcore-load", experts)
        with open(_path(work, f"report_ours_to_mcore_{experts}.json")) as f:
            ok &= _summarise(json.load(f))
        _run(a.mcore_python, work, "mcore-save", experts)
        ok &= _summarise(ours_load(work, experts))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
