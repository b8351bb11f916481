"""A Megatron-LM user's data and checkpoint continue training here on the same batch with the same loss.

    python tools/megatron_parity/check_continue_training.py \
        --mcore-python /work/mcore-venv/bin/python --work-dir /tmp/continue_parity

Run it with this project's Python; `--mcore-python` is a separate venv with megatron-core 0.16.1
(see README.md here). End to end, for a weighted blend of two `.bin/.idx` datasets
(`--data-path 0.3 A 0.7 B --split 90,5,5`, NullTokenizer) and the MoE model of
`check_checkpoint_in_megatron.py` (SequentialMLP, local layer spec):

  Megatron-Core   builds the train/valid/test datasets with its own BlendedMegatronDatasetBuilder
                  for Megatron-LM's requested sizes, initialises its GPTModel, saves it as a
                  Megatron-LM `--ckpt-format torch` checkpoint of iteration N with
                  consumed_train_samples = N x global batch, and computes its LM loss on the
                  global batch Megatron-LM trains on next (samples N*gbs .. (N+1)*gbs-1: one
                  data-parallel rank, so its sampler serves them in order).
  ours            `pretrain_gpt.py`'s loop with the same data flags and `--load` of that checkpoint
                  (`--no-load-optim`) runs iteration N+1; its logged `lm loss` (computed before the
                  update) must equal Megatron's, and the batch it trained on must be the same samples.

Exit status 0 when the samples are identical and |loss difference| <= 1e-5.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ITERATION, GBS, MBS = 3, 4, 2
DATA_FLAGS = {"data_path": ["0.3", "A", "0.7", "B"], "split": "90,5,5", "seq_length": 32, "seed": 1234,
              "train_iters": ITERATION + 1, "global_batch_size": GBS, "eval_interval": 1000, "eval_iters": 1,
              "eod_mask_loss": False}


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


samples_tool = _module("dump_megatron_samples")  # dataset recipe; imports numpy only
ckpt_tool = _module("check_checkpoint_in_megatron")
ckpt_tool.SHAPE.update(vocab=1024, seq=DATA_FLAGS["seq_length"], batch=GBS)  # NullTokenizer 1000 + EOD, padded


def write_data(work: str) -> dict:
    paths = {name: os.path.join(work, name) for name in ("A", "B")}
    for name, prefix in paths.items():
        samples_tool.write_dataset(prefix, samples_tool.documents({**samples_tool.DATASETS[name], "documents": 400}))
    return paths


# ============================================================================ Megatron-Core's side


def megatron_step(work: str) -> None:
    ckpt_tool._megatron_init(29551)
    paths = {name: os.path.join(work, name) for name in ("A", "B")}
    _, (train, _, _) = samples_tool.build_with_megatron_core(DATA_FLAGS, paths, os.path.join(work, "mcore_cache"))
    batch = [train[i] for i in range(ITERATION * GBS, (ITERATION + 1) * GBS)]
    tokens = torch.stack([s["tokens"] for s in batch])
    labels = torch.stack([s["labels"] for s in batch])
    mask = torch.stack([s["loss_mask"] for s in batch]).float()
    torch.manual_seed(1234)
    model = ckpt_tool.megatron_model("sequential")
    ckpt_tool.save_megatron_checkpoint(model, os.path.join(work, "megatron_ckpt"), "sequential", ITERATION,
                                       ITERATION * GBS, seed=DATA_FLAGS["seed"],
                                       tokenizer_type="NullTokenizer", vocab_size=samples_tool.VOCAB)
    S = tokens.shape[1]
    causal = torch.triu(torch.ones(1, 1, S, S), diagonal=1).bool()
    with torch.no_grad():
        per_token = model(tokens, torch.arange(S).expand_as(tokens), causal, labels=labels)
    loss = float((per_token * mask).sum() / mask.sum())
    np.save(os.path.join(work, "megatron_batch_tokens.npy"), tokens.numpy())
    with open(os.path.join(work, "megatron_loss.json"), "w") as f:
        json.dump({"loss": loss}, f)


# ============================================================================ our side


def our_flags(work: str) -> list[str]:
    flags = [f for f in ckpt_tool._ours_flags("sequential") if f != "--mock-data"]
    for name in ("--vocab-size", "--micro-batch-size", "--global-batch-size"):
        at = flags.index(name)
        del flags[at:at + 2]
    paths = [p if p[0].isdigit() else os.path.join(work, p) for p in DATA_FLAGS["data_path"]]
    return flags + ["--data-path", *paths, "--split", DATA_FLAGS["split"], "--tokenizer-type", "NullTokenizer",
                    "--vocab-size", str(samples_tool.VOCAB), "--seed", str(DATA_FLAGS["seed"]),
                    "--micro-batch-size", str(MBS), "--global-batch-size", str(GBS),
                    "--train-iters", str(ITERATION + 1), "--eval-interval", str(DATA_FLAGS["eval_interval"]),
                    "--eval-iters", str(DATA_FLAGS["eval_iters"]), "--data-cache-path", os.path.join(work, "our_cache"),
                    "--load", os.path.join(work, "megatron_ckpt"), "--no-load-optim", "--log-interval", "1"]


def our_step(work: str) -> dict:
    """Continue from Megatron's checkpoint for one iteration; our loss and the batch we trained on."""
    out = subprocess.run([sys.executable, os.path.join(HERE, os.pardir, os.pardir, "pretrain_gpt.py"), *our_flags(work)],
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"pretrain_gpt.py failed:\n{out.stderr[-3000:]}")
    line = next(l for l in out.stdout.splitlines() if re.search(rf"iteration\s+{ITERATION + 1}/", l))
    loss = float(re.search(r"lm loss: (\S+) \|", line).group(1))

    from megatron.training.arguments import config_from_args, parse_args
    from megatron.training.data import build_datasets

    cfg = config_from_args(parse_args(our_flags(work)), world_size=1)
    train, _, _ = build_datasets(cfg)
    tokens = np.stack([train[i]["tokens"].numpy() for i in range(ITERATION * GBS, (ITERATION + 1) * GBS)])
    return {"loss": loss, "tokens": tokens, "log_line": line}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mcore-python", help="python of a venv with megatron-core 0.16.1 (not this project)")
    p.add_argument("--work-dir", required=True)
    p.add_argument("--step", choices=["megatron"], help=argparse.SUPPRESS)
    a = p.parse_args()
    work = os.path.abspath(a.work_dir)
    if a.step == "megatron":
        megatron_step(work)
        return 0
    if a.mcore_python is None:
        p.error("--mcore-python is required")
    os.makedirs(work, exist_ok=True)
    write_data(work)
    subprocess.run([a.mcore_python, os.path.abspath(__file__), "--step", "megatron", "--work-dir", work],
                   check=True, cwd=work)  # outside the checkout: Megatron-Core's `megatron` must not meet ours
    ours = our_step(work)
    with open(os.path.join(work, "megatron_loss.json")) as f:
        theirs = json.load(f)["loss"]
    same_batch = np.array_equal(ours["tokens"], np.load(os.path.join(work, "megatron_batch_tokens.npy")))
    diff = abs(ours["loss"] - theirs)
    ok = same_batch and diff <= 1e-5
    print(f"{'PASS' if ok else 'FAIL'} continue training from Megatron-LM's iteration {ITERATION} checkpoint: "
          f"batch of samples {ITERATION * GBS}..{(ITERATION + 1) * GBS - 1} {'identical' if same_batch else 'DIFFERS'}; "
          f"lm loss ours {ours['loss']:.6E} Megatron {theirs:.6E} |diff| {diff:.1e}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
