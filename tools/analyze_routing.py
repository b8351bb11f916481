"""How a trained MoE model routes: per-layer expert usage, balance and entropy, and how often two
checkpoints send the same token to the same experts.

    python tools/analyze_routing.py --load CKPT                        # the run's own data (validation split)
    python tools/analyze_routing.py --load CKPT --data-path 1.0 corpus_text_document --split 969,30,1
    python tools/analyze_routing.py --load CKPT_A --compare CKPT_B --mock-data --num-batches 16
    python tools/analyze_routing.py --load CKPT --json report.json

Each checkpoint (any format `load_training_checkpoint` reads: ours or Megatron-LM's, any
parallel layout) is rebuilt whole on the CPU in fp32 in one process and run in eval mode on the
same `--num-batches` micro-batches of `--micro-batch-size` sequences from `--split-name` of the
data. Without data flags the data are the checkpoint's own run's (its saved `config`), read
from the first sample of the split. Reported per MoE layer: each expert's share of the
assignments (before capacity dropping), max/mean load, Gini coefficient, normalised load and
per-token routing entropy (`megatron.core.transformer.moe.health`), the dropped fraction, and
the model's lm loss on the batches. With `--compare`, per layer: the fraction of tokens whose
top-k expert sets are identical in both checkpoints (each model routing its own hidden states)
and the mean Jaccard index |A n B| / |A u B| of the two sets.

Problems are reported as one `analyze_routing.py: error: ...` line, exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Optional

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

import torch  # noqa: E402

from megatron.core.config import (  # noqa: E402
    CheckpointConfig,
    Config,
    DataConfig,
    OptimizerConfig,
    ParallelConfig,
    TrainingConfig,
)
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.transformer.moe import health  # noqa: E402
from megatron.training.model_checkpoint import ModelCheckpoint, load_model_checkpoint  # noqa: E402

_DATA_FLAGS = ("mock_data", "data_path", "split", "train_data_path", "valid_data_path", "test_data_path",
               "data_cache_path", "tokenizer_type", "tokenizer_model", "vocab_size")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        raise ValueError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="analyze_routing.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="checkpoint root (its tracker's iteration) or iteration directory")
    p.add_argument("--compare", default=None, help="a second checkpoint of the same architecture to compare with")
    p.add_argument("--num-batches", type=int, default=8, help="micro-batches to route (default 8)")
    p.add_argument("--micro-batch-size", type=int, default=4, help="sequences per micro-batch (default 4)")
    p.add_argument("--split-name", choices=("train", "valid", "test"), default="valid",
                   help="which split the batches come from (default valid)")
    p.add_argument("--seed", type=int, default=None, help="data seed (default: the checkpoint's run's)")
    p.add_argument("--json", default=None, help="also write the report as JSON to this file")
    g = p.add_argument_group("data (default: the checkpoint's run's)")
    g.add_argument("--mock-data", action="store_true", default=None)
    g.add_argument("--data-path", nargs="+", default=None)
    g.add_argument("--split", default=None)
    g.add_argument("--train-data-path", nargs="+", default=None)
    g.add_argument("--valid-data-path", nargs="+", default=None)
    g.add_argument("--test-data-path", nargs="+", default=None)
    g.add_argument("--data-cache-path", default=None)
    g.add_argument("--tokenizer-type", default=None)
    g.add_argument("--tokenizer-model", default=None)
    g.add_argument("--vocab-size", type=int, default=None)
    return p


def load_model(root: str) -> tuple[ModelCheckpoint, GPTModel, list[int]]:
    """The checkpoint, its whole model on the CPU in fp32 (eval mode), and its MoE layer indices."""
    from megatron.training.checkpointing import load_model_state

    ckpt = load_model_checkpoint(root)
    with torch.device("cpu"):
        model = GPTModel(ckpt.model_config)
    load_model_state(model, ckpt.state_dict, root)
    model.eval()
    moe_layers = [layer.layer_number for layer in model.decoder.layers if layer.is_moe]
    if not moe_layers:
        raise ValueError(f"{root}: the model has no MoE layers")
    return ckpt, model, moe_layers


def data_config(args: argparse.Namespace, ckpt: ModelCheckpoint) -> tuple[DataConfig, int]:
    """The data to route (the flags given, else the checkpoint's run's) and the data seed."""
    saved = dict(ckpt.config.get("data") or {})
    given = {name: getattr(args, name) for name in _DATA_FLAGS if getattr(args, name) is not None}
    if any(k in given for k in ("mock_data", "data_path", "train_data_path", "valid_data_path", "test_data_path")):
        saved = {k: v for k, v in saved.items() if k not in ("mock_data", "data_path", "train_data_path",
                                                             "valid_data_path", "test_data_path")}
    elif not saved:
        raise ValueError(f"{args.load} does not record its run's data (a Megatron-LM checkpoint?): "
                         "give --data-path or --mock-data")
    fields = {f.name for f in dataclasses.fields(DataConfig)}
    data = DataConfig(**{**{k: v for k, v in saved.items() if k in fields}, **given, "num_workers": 0})
    seed = args.seed if args.seed is not None else int((ckpt.config.get("training") or {}).get("seed", 1234))
    return data, seed


def batches(args: argparse.Namespace, ckpt: ModelCheckpoint) -> list[dict]:
    """`--num-batches` micro-batches from the start of the chosen split."""
    from megatron.training.data import build_datasets

    data, seed = data_config(args, ckpt)
    n, b = args.num_batches, args.micro_batch_size
    training = TrainingConfig(micro_batch_size=b, global_batch_size=b, train_iters=n, eval_iters=n,
                              eval_interval=n + 1, seed=seed)  # every split: n * b samples
    cfg = Config(ckpt.model_config, ParallelConfig(), OptimizerConfig(), data, training, CheckpointConfig())
    split = ("train", "valid", "test").index(args.split_name)
    dataset = build_datasets(cfg)[split]
    if dataset is None:
        raise ValueError(f"the data have no {args.split_name} split (see --split / --{args.split_name}-data-path)")
    out = []
    for i in range(n):
        samples = [dataset[j] for j in range(i * b, (i + 1) * b)]
        out.append({k: torch.stack([s[k] for s in samples]) for k in samples[0]})
    return out


@torch.no_grad()
def route(model: GPTModel, data: list[dict]) -> dict:
    """Per MoE layer (in order): expert_idx_TK over all batches, the summed token-entropy
    statistic and dropped/assignment counts; and the mean lm loss."""
    experts, entropy, dropped, assigned = None, None, None, None
    loss = 0.0
    for batch in data:
        out = model(batch["tokens"], batch["position_ids"], batch["labels"], batch["loss_mask"])
        loss += float(out.lm_loss)
        if experts is None:
            experts = [[] for _ in out.routings]
            entropy = [torch.zeros(2) for _ in out.routings]
            dropped = [0.0 for _ in out.routings]
            assigned = [0.0 for _ in out.routings]
        for i, r in enumerate(out.routings):
            experts[i].append(r.expert_idx_TK)
            if r.stats.token_entropy is not None:
                entropy[i] += r.stats.token_entropy.float().cpu()
            dropped[i] += float(r.stats.dropped)
            assigned[i] += float(r.stats.assignments)
    return {"experts": [torch.cat(e) for e in experts], "entropy": entropy, "dropped": dropped,
            "assigned": assigned, "lm_loss": loss / len(data)}


def layer_report(layer: int, expert_idx_TK: torch.Tensor, num_experts: int, entropy_stat: torch.Tensor,
                 dropped: float, assigned: float) -> dict:
    counts = torch.bincount(expert_idx_TK.reshape(-1), minlength=num_experts).double()
    h = health.layer_health(counts, dropped / max(assigned, 1.0), health.mean_token_entropy(entropy_stat))
    return {"layer": layer, "tokens": int(expert_idx_TK.shape[0]), "usage": (counts / counts.sum()).tolist(), **h}


def agreement(a_TK: torch.Tensor, b_TK: torch.Tensor, num_experts: int) -> dict:
    """Fraction of tokens whose top-k sets are identical, and the mean Jaccard index of the sets."""
    one_hot = lambda idx: torch.zeros(idx.shape[0], num_experts, dtype=torch.bool).scatter_(1, idx, True)  # noqa: E731
    a, b = one_hot(a_TK), one_hot(b_TK)
    inter, union = (a & b).sum(1).double(), (a | b).sum(1).double()
    return {"same_set": float((a == b).all(1).double().mean()), "mean_jaccard": float((inter / union).mean())}


def analyze(args: argparse.Namespace) -> dict:
    if args.num_batches < 1 or args.micro_batch_size < 1:
        raise ValueError("--num-batches and --micro-batch-size must be at least 1")
    ckpt, model, layers = load_model(args.load)
    data = batches(args, ckpt)
    moe = ckpt.model_config.moe
    routed = route(model, data)
    report = {"load": args.load, "iteration": ckpt.iteration, "split": args.split_name,
              "tokens": int(sum(b["tokens"].numel() for b in data)), "num_experts": moe.num_experts,
              "topk": moe.router_topk, "lm_loss": routed["lm_loss"],
              "layers": [layer_report(layer, e, moe.num_experts, h, d, n) for layer, e, h, d, n in
                         zip(layers, routed["experts"], routed["entropy"], routed["dropped"], routed["assigned"])]}
    if args.compare:
        ckpt_b, model_b, layers_b = load_model(args.compare)
        moe_b = ckpt_b.model_config.moe
        if (layers_b, moe_b.num_experts, moe_b.router_topk) != (layers, moe.num_experts, moe.router_topk):
            raise ValueError(f"--compare {args.compare}: MoE layers {layers_b}, {moe_b.num_experts} experts, "
                             f"top-{moe_b.router_topk}; --load has {layers}, {moe.num_experts}, top-{moe.router_topk}")
        routed_b = route(model_b, data)
        report["compare"] = {
            "load": args.compare, "iteration": ckpt_b.iteration, "lm_loss": routed_b["lm_loss"],
            "layers": [{"layer": layer, **agreement(a, b, moe.num_experts)}
                       for layer, a, b in zip(layers, routed["experts"], routed_b["experts"])]}
    return report


def format_report(r: dict) -> str:
    lines = [f"{r['load']} (iteration {r['iteration']}): {r['tokens']} tokens of the {r['split']} split, "
             f"{r['num_experts']} experts, top-{r['topk']}, lm loss {r['lm_loss']:.4f}",
             " layer | max/mean load |  gini | load entropy | token entropy | dropped | expert usage (% of assignments)"]
    for x in r["layers"]:
        te = f"{x['token_entropy']:13.3f}" if "token_entropy" in x else f"{'-':>13}"
        usage = " ".join(f"{100 * u:.1f}" for u in x["usage"])
        lines.append(f" {x['layer']:5d} | {x['max_over_mean_load']:13.3f} | {x['gini']:5.3f} | {x['entropy']:12.3f} | "
                     f"{te} | {100 * x['dropped_fraction']:6.2f}% | {usage}")
    if "compare" in r:
        c = r["compare"]
        lines += [f"routing agreement with {c['load']} (iteration {c['iteration']}, lm loss {c['lm_loss']:.4f}):",
                  " layer | same top-k set | mean Jaccard"]
        lines += [f" {x['layer']:5d} | {100 * x['same_set']:13.2f}% | {x['mean_jaccard']:12.4f}" for x in c["layers"]]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        report = analyze(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
    except (ValueError, OSError) as e:
        print(f"analyze_routing.py: error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
