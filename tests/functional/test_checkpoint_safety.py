"""Crafted checkpoints are refused with one line (their code never runs), through --load and the
offline tools; a truncated torch_dist .metadata is one line, exit 2, in convert.py and reshard.py."""

from __future__ import annotations

import pickle
import shutil
import subprocess
import sys

import pytest
import torch

import pretrain_gpt
from megatron.training.safe_load import load_file, read_dcp_metadata
from megatron.training.train import pretrain
from tests.helpers import TINY_FLAGS, make_config
from tests.unit.test_safe_load import Marker


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One checkpoint per format, saved at iteration 1."""
    roots = {}
    for fmt in ("torch", "torch_dist"):
        roots[fmt] = tmp_path_factory.mktemp(fmt)
        pretrain(make_config(f"--train-iters 1 --save {roots[fmt]} --ckpt-format {fmt}"))
    return roots


def craft(root, target: str, marker) -> None:
    """Add an object whose unpickling creates `marker` to `target` of the checkpoint at `root`."""
    directory = root / "iter_0000001"
    if target == ".metadata":
        metadata = read_dcp_metadata(str(directory))
        metadata.planner_data = Marker(marker)
        (directory / ".metadata").write_bytes(pickle.dumps(metadata))
        return
    path = directory / target
    payload = load_file(str(path))
    payload["evil"] = Marker(marker)
    torch.save(payload, path)


CASES = [("torch", "mp_rank_00/model_optim_rng.pt"), ("torch_dist", "common.pt"), ("torch_dist", ".metadata")]


@pytest.mark.parametrize("fmt,target", CASES)
def test_crafted_checkpoint_is_refused_through_load(tmp_path, capsys, saved, fmt, target):
    root, marker = tmp_path / "ckpt", tmp_path / "code_ran"
    shutil.copytree(saved[fmt], root)
    craft(root, target, marker)
    capsys.readouterr()
    code = pretrain_gpt.main(TINY_FLAGS.split() + ["--load", str(root), "--ckpt-format", fmt])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "refusing to unpickle io.open" in err and target.split("/")[-1] in err
    assert not marker.exists()


@pytest.mark.parametrize("fmt,target", CASES)
def test_crafted_checkpoint_is_refused_by_reshard(tmp_path, saved, fmt, target):
    root, marker = tmp_path / "ckpt", tmp_path / "code_ran"
    shutil.copytree(saved[fmt], root)
    craft(root, target, marker)
    proc = run_tool("reshard.py", "--load-dir", str(root), "--save-dir", str(tmp_path / "out"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("reshard.py: error: --load-dir: refusing to unpickle io.open")
    assert not marker.exists() and not (tmp_path / "out").exists()


def run_tool(name: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"tools/checkpoint/{name}", *argv], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("tool,argv", [
    ("convert.py", ["--loader", "megatron", "--saver", "hf"]),
    ("reshard.py", ["--ckpt-format", "torch"]),
])
def test_truncated_metadata_is_one_line_exit_2(tmp_path, saved, tool, argv):
    root = tmp_path / "ckpt"
    shutil.copytree(saved["torch_dist"], root)
    metadata = root / "iter_0000001" / ".metadata"
    metadata.write_bytes(metadata.read_bytes()[:100])
    proc = run_tool(tool, *argv, "--load-dir", str(root), "--save-dir", str(tmp_path / "out"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"{tool}: error: ") and str(metadata) in proc.stderr and "corrupt" in proc.stderr
    assert "Traceback" not in proc.stderr
