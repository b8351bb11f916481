"""tools/plot_moe.py and tools/analyze_routing.py on a tiny run's TensorBoard files and checkpoints;
the collapse warning in a real (forcibly collapsed) training run."""

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron.training.train import pretrain
from tests.helpers import load_tool, make_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 3-step run with TensorBoard and a checkpoint, resumed for 3 more steps into a second one."""
    root = tmp_path_factory.mktemp("moe_run")
    common = "--lr 1e-2 --ckpt-format torch --eval-iters 1 --eval-interval 2"
    pretrain(make_config(f"{common} --train-iters 3 --save {root / 'a'} --tensorboard-dir {root / 'tb'}"))
    pretrain(make_config(f"{common} --train-iters 6 --load {root / 'a'} --save {root / 'b'} "
                         f"--tensorboard-dir {root / 'tb'}"))
    return root


def test_plot_moe_writes_pngs(run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    plot = load_tool("plot_moe")
    assert plot.main([str(run), "--out", str(tmp_path / "plots")]) == 0
    for name in ("loss.png", "expert_load_heatmap.png", "moe_health.png"):
        data = (tmp_path / "plots" / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000, name
    steps, rows, load = plot.expert_load_matrix(plot.read_scalars(str(run)))
    assert steps == [1, 2, 3, 4, 5, 6] and rows == [(layer, e) for layer in (0, 1) for e in range(4)]
    assert load[:4].mean(axis=0) == pytest.approx([1.0] * 6)  # each layer's loads over its mean
    assert plot.main([str(run)]) == 0 and (run / "plots" / "expert_load_heatmap.png").stat().st_size > 0
    capsys.readouterr()
    assert plot.main([str(tmp_path / "plots")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("plot_moe.py: error: no TensorBoard event files") and err.count("\n") == 1


def test_analyze_routing_against_itself_and_a_later_checkpoint(run, tmp_path):
    analyze = load_tool("analyze_routing")
    args = lambda *extra: analyze.build_parser().parse_args(["--num-batches", "2", *extra])  # noqa: E731
    same = analyze.analyze(args("--load", str(run / "a"), "--compare", str(run / "a")))
    assert same["iteration"] == 3 and same["tokens"] == 2 * 4 * 16
    assert [x["same_set"] for x in same["compare"]["layers"]] == [1.0, 1.0]
    assert [x["mean_jaccard"] for x in same["compare"]["layers"]] == [1.0, 1.0]
    for x in same["layers"]:
        assert sum(x["usage"]) == pytest.approx(1.0) and 0.0 <= x["gini"] < 0.75
        assert 0.0 < x["entropy"] <= 1.0 and 0.0 < x["token_entropy"] <= 1.0
    later = analyze.analyze(args("--load", str(run / "a"), "--compare", str(run / "b"), "--mock-data"))
    assert later["compare"]["iteration"] == 6 and later["layers"] == same["layers"]
    for x in later["compare"]["layers"]:
        assert 0.0 <= x["same_set"] < 1.0 and x["same_set"] <= x["mean_jaccard"] < 1.0


def test_analyze_routing_cli(run, tmp_path):
    out = tmp_path / "report.json"
    cmd = [sys.executable, os.path.join(REPO, "tools", "analyze_routing.py"), "--load", str(run / "b"),
           "--num-batches", "1", "--split-name", "test", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "max/mean load" in proc.stdout and json.loads(out.read_text())["iteration"] == 6
    proc = subprocess.run(cmd[:2] + ["--load", str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("analyze_routing.py: error:")
    assert proc.stderr.count("\n") == 1, proc.stderr


@pytest.mark.parametrize("collapsed", [True, False])
def test_collapse_warning_in_training(collapsed, capsys):
    """A router biased onto expert 0 (the others never chosen) is warned about once per expert
    after 4 log intervals; the same run unbiased is not."""
    from megatron.core.parallel_state import ProcessGroups
    from megatron.training.data import build_datasets, build_loader, micro_batches
    from megatron.training.logger import TrainingLogger
    from megatron.training.train import Trainer

    cfg = make_config("--moe-router-topk 1 --moe-router-score-function sigmoid --moe-router-enable-expert-bias "
                      "--moe-router-bias-update-rate 0 --train-iters 5")
    groups = ProcessGroups()
    trainer = Trainer(cfg, groups)
    if collapsed:
        for router in trainer.routers:
            router.expert_bias.copy_(torch.tensor([0.0, -1e4, -1e4, -1e4]))
    batches = micro_batches(build_loader(build_datasets(cfg)[0], cfg, groups), groups.device)
    logger = TrainingLogger(True, 5, 1, 4, 16, 1.0, 1, groups.device)
    for it in range(1, 6):
        result = trainer.train_step([next(batches) for _ in range(cfg.num_microbatches)])
        logger.record(result)
        logger.maybe_log(it, 4 * it, result, 1.0, it)
    out = capsys.readouterr()
    warnings = [line for line in out.err.splitlines() if line.startswith("WARNING: expert")]
    if not collapsed:
        assert warnings == []
        return
    assert sorted(warnings) == sorted(
        [f"WARNING: expert 0 of layer {layer} has had > 3x the mean load for 4 log intervals (4.00x at iteration 4; "
         f"layer gini 0.750): routing may be collapsing onto it" for layer in (0, 1)]
        + [f"WARNING: expert {e} of layer {layer} received no tokens for 4 log intervals (up to iteration 4; "
           f"layer max/mean load 4.00): it is dead" for layer in (0, 1) for e in (1, 2, 3)])
    assert "expert load max/mean: 4.000 (layer 0) | expert load gini: 0.750 |" in out.out
