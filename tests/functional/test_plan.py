"""tools/estimate.py --plan end to end: the flags it prints launch pretrain_gpt.py under torchrun
and train with the losses of one process (same model, data and global batch)."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest

from megatron.training.arguments import config_from_args, parse_args
from tests.helpers import load_tool

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CPU_HARDWARE = ["--tflops", "0.05", "--intra-node-gbps", "8", "--inter-node-gbps", "2", "--alpha-us", "200"]
LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+ .*?\| lm loss: (\S+) \|")


def planned_flags(argv: list[str], capsys) -> list[str]:
    """The flags of the best layout `estimate.py --plan` prints."""
    load_tool("estimate").main(argv)
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("flags of the best: "))
    return line.removeprefix("flags of the best: ").split()


def train(flags: list[str], nproc: int = 1, timeout: float = 900) -> dict[int, float]:
    """Run pretrain_gpt.py (under torchrun when nproc > 1); the lm loss of each iteration."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
                if nproc > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*launcher, "pretrain_gpt.py", *flags], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {int(i): float(loss) for i, loss in LOSS.findall(proc.stdout)}


def value(flags: list[str], name: str) -> int:
    return int(flags[flags.index(name) + 1])


def data_parallel_memory_gib(flags: list[str], world: int) -> float:
    """The estimate for the leanest plain data-parallel layout (micro-batch 1, full recompute)."""
    est = load_tool("estimate")
    cfg = config_from_args(parse_args(flags), world_size=world)
    lean = est.with_layout(cfg, world, mbs=1, training=est.RECOMPUTE["full"])
    return est.estimate(lean, world, 1, tflops=1.0, intra_gbps=8.0, inter_gbps=2.0, alpha_us=0.0,
                        overlap=True)["memory_gib"]


def test_planned_layout_trains_like_one_process(capsys):
    """A budget below what plain data parallelism needs makes the planner split the tiny model
    over tensor, pipeline and/or expert ranks; those flags train with one process's losses."""
    base = ["--config", "configs/tiny_moe.yaml", "--train-iters", "3", "--lr-warmup-iters", "1",
            "--log-interval", "1", "--eval-iters", "0"]
    budget = 0.5 * data_parallel_memory_gib(base, world=4)   # today: P=2 V=2 x EP=2 x DP=2
    flags = planned_flags(["--plan", "--nodes", "1", "--gpus-per-node", "4", "--gpu-memory-gib", str(budget),
                           "--memory-margin", "0", *CPU_HARDWARE, *base], capsys)
    model_parallel = [value(flags, f) for f in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size",
                                                  "--expert-model-parallel-size")]
    assert max(model_parallel) > 1, flags
    planned = train(base + flags, nproc=4)
    # the same micro-batches (the load-balancing loss is per micro-batch), in one process
    single = train(base + ["--micro-batch-size", str(value(flags, "--micro-batch-size"))])
    assert sorted(planned) == sorted(single) == [1, 2, 3]
    for i in single:
        assert planned[i] == pytest.approx(single[i], rel=1e-4), (i, flags)


# A Mixtral-8x22B-shaped model at toy width: the config's 56 layers, 8 experts top-2, GQA, SwiGLU,
# RoPE, untied embeddings, bf16 with the distributed optimizer; hidden 64, 8 heads (8 groups).
TINY_8X22B = ["--config", "configs/mixtral_8x22b.yaml", "--hidden-size", "64", "--ffn-hidden-size", "128",
              "--num-attention-heads", "8", "--num-query-groups", "8", "--seq-length", "64",
              "--max-position-embeddings", "64", "--mock-data", "--vocab-size", "512", "--global-batch-size", "16",
              "--train-iters", "2", "--lr-warmup-iters", "1", "--lr-decay-iters", "2", "--eval-iters", "0",
              "--save-interval", "1000", "--num-workers", "0"]


@pytest.mark.slow
def test_mixtral_8x22b_plan_for_16_nodes_trains_its_tiny_equivalent(capsys):
    """The issue's check: the layout planned for Mixtral 8x22B on 16 nodes x 8 GPUs, at the
    smallest world that layout allows (its T, P, V, EP, ETP with DP reduced), trains the toy-width
    model with one process's losses. About 32 ranks: minutes on 2 cores, about 12 GiB."""
    flags = planned_flags(["--config", "configs/mixtral_8x22b.yaml", "--plan", "--nodes", "16",
                           "--gpus-per-node", "8"], capsys)
    tp, pp, ep = (value(flags, f) for f in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size",
                                             "--expert-model-parallel-size"))
    etp = value(flags, "--expert-tensor-parallel-size")
    stage = math.lcm(tp, ep * etp)                                    # the fewest ranks a stage can have
    world = pp * stage
    assert world <= 64, f"the planned layout needs {world} ranks, too many for a CPU test: {flags}"
    planned = train(TINY_8X22B + flags + ["--log-interval", "1"], nproc=world, timeout=1800)
    single = train(TINY_8X22B + ["--expert-model-parallel-size", "1", "--log-interval", "1",
                                 "--micro-batch-size", str(value(flags, "--micro-batch-size"))])
    print(f"\n{world} ranks, {' '.join(flags)}: lm loss {planned}; one process: {single}")
    assert sorted(planned) == sorted(single) == [1, 2]
    for i in single:
        assert planned[i] == pytest.approx(single[i], rel=1e-3), (i, flags)   # bf16; measured 2e-6
