"""Legacy (`--ckpt-format torch`) checkpoints under pipeline parallelism: Megatron's per-(pipeline,
expert) rank files with chunk-local layer numbers, exact resume at P = 2 (and interleaved V = 2),
offline resharding to P = 1, P = 4 and torch_dist continuing with the uninterrupted run's losses,
and conversion to Hugging Face from P = 2 files (legacy and torch_dist)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from megatron.core.parallel_state import ProcessGroups, groups_from_mesh
from megatron.training.checkpointing import CheckpointError, _load_legacy
from megatron.training.safe_load import load_file
from tests.distributed.harness import run_distributed
from tests.distributed.test_pipeline_checkpoint import COMMON, _run
from tests.helpers import make_config

PP2 = "--pipeline-model-parallel-size 2 --use-distributed-optimizer --ckpt-format torch"


def _file(root, name: str) -> dict:
    return load_file(str(root / "iter_0000003" / name / "model_optim_rng.pt"))


def _close(resumed: dict, full: dict) -> None:
    assert sorted(resumed) == [4, 5]
    for it in (4, 5):
        assert abs(float(resumed[it]) - float(full[it])) / float(full[it]) < 1e-5, (resumed, full)


def _reshard(src, dst, *extra: str) -> None:
    proc = subprocess.run([sys.executable, "tools/checkpoint/reshard.py", "--load-dir", str(src),
                           "--save-dir", str(dst), *extra], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_legacy_pp2_files_resume_and_reshard(tmp_path):
    saved = tmp_path / "pp2"
    full = _run(2, PP2)
    first = _run(2, f"{PP2} --save {saved} --exit-interval 3")
    resumed = _run(2, f"{PP2} --load {saved}")
    assert sorted(first) == [1, 2, 3] and sorted(resumed) == [4, 5]
    assert {**first, **resumed} == full

    # Megatron's files: mp_rank_00_PPP, each stage's layers numbered from 0, the tied copy of the
    # word embedding on the last stage as output_layer.weight; optimizer state under global names.
    it3 = saved / "iter_0000003"
    assert sorted(p.name for p in it3.iterdir()) == ["mp_rank_00_000", "mp_rank_00_001"]
    first_stage, last_stage = _file(saved, "mp_rank_00_000"), _file(saved, "mp_rank_00_001")
    for payload in (first_stage, last_stage):
        layers = {k.split(".")[2] for k in payload["model"] if k.startswith("decoder.layers.")}
        assert layers == {"0", "1"}
        assert payload["args"].pipeline_model_parallel_size == 2
        assert payload["args"].virtual_pipeline_model_parallel_size is None
    assert "embedding.word_embeddings.weight" in first_stage["model"]
    assert "output_layer.weight" not in first_stage["model"] and "decoder.final_layernorm.weight" not in first_stage["model"]
    assert "embedding.word_embeddings.weight" not in last_stage["model"]
    assert "decoder.final_layernorm.weight" in last_stage["model"] and "output_layer._extra_state" in last_stage["model"]
    assert torch.equal(last_stage["model"]["output_layer.weight"], first_stage["model"]["embedding.word_embeddings.weight"])
    assert "decoder.layers.3.mlp.router.weight" in last_stage["optimizer"]["state"]
    assert "embedding.word_embeddings.weight" in last_stage["optimizer"]["state"]
    assert "decoder.layers.0.mlp.router.weight" not in last_stage["optimizer"]["state"]

    # Offline: to P = 1 and P = 4 legacy files, and to torch_dist; each continues the run.
    p1, p4, dist_ckpt = tmp_path / "p1", tmp_path / "p4", tmp_path / "dist"
    _reshard(saved, p1, "--ckpt-format", "torch", "--target-pipeline-parallel-size", "1")
    _reshard(saved, p4, "--ckpt-format", "torch", "--target-pipeline-parallel-size", "4")
    _reshard(saved, dist_ckpt, "--ckpt-format", "torch_dist")
    assert sorted(p.name for p in (p1 / "iter_0000003").iterdir()) == ["mp_rank_00"]
    assert sorted(p.name for p in (p4 / "iter_0000003").iterdir()) == [f"mp_rank_00_{r:03d}" for r in range(4)]
    assert {k.split(".")[2] for k in _file(p4, "mp_rank_00_002")["model"] if k.startswith("decoder.layers.")} == {"0"}
    _close(_run(1, f"--ckpt-format torch --load {p1} --no-load-rng"), full)
    _close(_run(4, f"--ckpt-format torch --load {p4} --no-load-rng --pipeline-model-parallel-size 4 "
                   "--use-distributed-optimizer"), full)
    _close(_run(1, f"--load {dist_ckpt}"), full)

    # A pipeline size that does not match the files is one line naming the tool.
    proc = subprocess.run([sys.executable, "tools/checkpoint/reshard.py", "--load-dir", str(saved), "--save-dir",
                           str(tmp_path / "p3"), "--ckpt-format", "torch", "--target-pipeline-parallel-size", "3"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("reshard.py: error: --target-pipeline-parallel-size 3")
    assert proc.stderr.count("\n") == 1


def test_legacy_interleaved_resume(tmp_path):
    vp2 = f"{PP2} --virtual-pipeline-model-parallel-size 2 --untie-embeddings-and-output-weights"
    full = _run(2, vp2)
    first = _run(2, f"{vp2} --save {tmp_path} --exit-interval 3")
    resumed = _run(2, f"{vp2} --load {tmp_path}")
    assert {**first, **resumed} == full
    # V = 2: model0 / model1, one layer each, numbered 0; rank 0 holds layers 0 and 2.
    rank0, rank1 = _file(tmp_path, "mp_rank_00_000"), _file(tmp_path, "mp_rank_00_001")
    assert "model" not in rank0 and sorted(k for k in rank0 if k.startswith("model")) == ["model0", "model1"]
    for payload in (rank0, rank1):
        for v in (0, 1):
            assert {k.split(".")[2] for k in payload[f"model{v}"] if k.startswith("decoder.layers.")} == {"0"}
    assert "embedding.word_embeddings.weight" in rank0["model0"]
    assert not any(k.startswith("embedding.") for k in rank0["model1"])
    assert "output_layer.weight" in rank1["model1"] and "output_layer.weight" not in rank1["model0"]
    assert "decoder.final_layernorm.weight" in rank1["model1"]
    # model1 of rank 0 is layer 2 (virtual stage 2 = chunk 1 of rank 0).
    assert rank0["args"].virtual_pipeline_model_parallel_size == 2
    assert "decoder.layers.2.self_attention.linear_qkv.weight" in rank0["optimizer"]["state"]
    # A run with another split refuses the files in one line naming the tool.
    cfg = make_config(f"{COMMON} {PP2} --untie-embeddings-and-output-weights --load {tmp_path}", world_size=2)
    with pytest.raises(CheckpointError, match="saved with pipeline size 2, 2 chunk.*reshard.py"):
        _load_legacy(cfg, ProcessGroups(), str(tmp_path / "iter_0000003"), torch.nn.Linear(1, 1))


def _save_initial(rank: int, world: int, extra: str, root: str) -> None:
    from megatron.training import checkpointing
    from megatron.training.train import Trainer

    cfg = make_config(f"{COMMON} --pipeline-model-parallel-size 2 --save {root} {extra}", world_size=world)
    groups = groups_from_mesh(1, torch.device("cpu"), "gloo", pp_size=2)
    checkpointing.save_checkpoint(Trainer(cfg, groups), cfg, groups)


def test_convert_pipeline_checkpoints_to_hf(tmp_path):
    """Initial weights do not depend on the layout, so P = 2 (legacy and torch_dist) and P = 1
    checkpoints of the same seed convert to the same Hugging Face tensors."""
    from megatron.training import checkpointing
    from megatron.training.hf_checkpoint import read_hf_checkpoint
    from megatron.training.model_checkpoint import load_model_checkpoint
    from megatron.training.train import Trainer

    run_distributed(_save_initial, 2, "--ckpt-format torch", str(tmp_path / "legacy2"))
    run_distributed(_save_initial, 2, "--ckpt-format torch_dist", str(tmp_path / "dist2"))
    cfg = make_config(f"{COMMON} --ckpt-format torch --save {tmp_path / 'one'}")
    trainer = Trainer(cfg, ProcessGroups())
    checkpointing.save_checkpoint(trainer, cfg, ProcessGroups())
    reference = trainer.model.state_dict()
    assert set(load_model_checkpoint(str(tmp_path / "legacy2")).state_dict) == set(reference)
    for name, t in load_model_checkpoint(str(tmp_path / "legacy2")).state_dict.items():
        assert torch.equal(t, reference[name]), name
    # As Megatron-LM writes them: no `config` (the model comes from `args`), no optimizer of ours.
    import shutil

    from megatron.training.safe_load import save_file

    shutil.copytree(tmp_path / "legacy2", tmp_path / "megatron2")
    for path in (tmp_path / "megatron2" / "iter_0000000").glob("mp_rank_*/model_optim_rng.pt"):
        payload = load_file(str(path))
        save_file({k: v for k, v in payload.items() if k not in ("config", "train_state", "optimizer")}, str(path))
    megatron = load_model_checkpoint(str(tmp_path / "megatron2"))
    assert megatron.config == {"model": dataclasses.asdict(megatron.model_config)}  # rebuilt from args
    assert set(megatron.state_dict) == set(reference)
    assert all(torch.equal(t, reference[name]) for name, t in megatron.state_dict.items())
    converted = {}
    for src in ("legacy2", "dist2", "one"):
        proc = subprocess.run([sys.executable, "tools/checkpoint/convert.py", "--loader", "megatron", "--saver", "hf",
                               "--load-dir", str(tmp_path / src), "--save-dir", str(tmp_path / f"hf_{src}")],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        converted[src] = read_hf_checkpoint(str(tmp_path / f"hf_{src}"))[1]
    for src in ("legacy2", "dist2"):
        assert set(converted[src]) == set(converted["one"])
        for name, t in converted["one"].items():
            assert torch.equal(converted[src][name], t), (src, name)


def test_legacy_pp2_ep2_files_resume_and_merge(tmp_path):
    """P = 2 x EP = 2 on 4 ranks: mp_rank_00_PPP_EEE files, exact resume, and the offline merge
    (to P = 1, EP = 1) continuing in one process."""
    extra = f"{PP2} --expert-model-parallel-size 2 --moe-token-dispatcher-type alltoall"
    saved = tmp_path / "pp2ep2"
    full = _run(4, extra)
    first = _run(4, f"{extra} --save {saved} --exit-interval 3")
    resumed = _run(4, f"{extra} --load {saved}")
    assert {**first, **resumed} == full
    assert sorted(p.name for p in (saved / "iter_0000003").iterdir()) == [
        f"mp_rank_00_{p:03d}_{e:03d}" for p in range(2) for e in range(2)]
    last = _file(saved, "mp_rank_00_001_001")["model"]
    assert "decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight" in last
    assert "decoder.layers.0.mlp.experts.local_experts.2.linear_fc1.weight" not in last
    one = tmp_path / "one"
    _reshard(saved, one, "--ckpt-format", "torch", "--target-pipeline-parallel-size", "1")
    _close(_run(1, f"--ckpt-format torch --load {one}"), full)
