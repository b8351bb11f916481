"""Checkpoints under tensor parallelism (gloo, CPU, fp32).

torch_dist holds whole tensors whatever T: a T = 2 save (EP = 1) continues at T = 1 x EP = 2 and
a T = 1 x EP = 2 save continues at T = 2, each with the uninterrupted one-process run's losses,
and every whole tensor of the T = 2 save (model, Adam moments) is the one-process run's; a T = 2
run resumes exactly (each rank's RNG state restored). Legacy `--ckpt-format torch` at T = 2 writes
Megatron's mp_rank_TT files with each rank's slices (also folded: T = 2 x EP = 2 on two ranks
writes mp_rank_00_000 and mp_rank_01_001), reshards to T = 1 (and back) equal to the files the
other T writes, converts to Hugging Face as the T = 1 files do, and a T = 1 run refuses the T = 2
files in one line. torch_dist also moves between EP = 2 and T = ETP = 2 (experts' FFN split);
the legacy files are tested at --expert-tensor-parallel-size 1.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys

import pytest
import torch

from megatron.core.parallel_state import ProcessGroups, groups_from_mesh
from megatron.core.tensor_parallel.sharding import shard_state
from megatron.training import megatron_layout
from megatron.training.checkpointing import CheckpointError, _load_legacy
from megatron.training.model_checkpoint import load_training_checkpoint
from megatron.training.safe_load import load_file
from megatron.training.train import pretrain
from tests.distributed.harness import run_distributed
from tests.functional.test_training import losses_from
from tests.helpers import make_config, rel_diff

COMMON = ("--global-batch-size 8 --micro-batch-size 2 --train-iters 5 --lr-warmup-iters 1 "
          "--moe-z-loss-coeff 1e-3 --moe-token-dispatcher-type alltoall --use-distributed-optimizer")
TP2 = "--tensor-model-parallel-size 2 --sequence-parallel --expert-tensor-parallel-size 1"
EP2 = "--expert-model-parallel-size 2"
ETP2 = "--tensor-model-parallel-size 2 --sequence-parallel"  # --expert-tensor-parallel-size defaults to T
SIZES = {"--tensor-model-parallel-size": 1, "--expert-model-parallel-size": 1, "--expert-tensor-parallel-size": None}


def _sizes(extra: str) -> dict:
    words, sizes = extra.split(), dict(SIZES)
    for flag in sizes:
        if flag in words:
            sizes[flag] = int(words[words.index(flag) + 1])
    return sizes


def _pretrain(extra: str, world: int = 1) -> dict:
    cfg = make_config(f"{COMMON} {extra}", world_size=world)
    groups = None
    if world > 1:
        s = _sizes(extra)
        groups = groups_from_mesh(s["--expert-model-parallel-size"], torch.device("cpu"), "gloo",
                                  tp_size=s["--tensor-model-parallel-size"], etp_size=s["--expert-tensor-parallel-size"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        pretrain(cfg, groups=groups)
    return losses_from(out.getvalue())


def _resume_runs(rank: int, world: int, root: str) -> dict:
    """T = 2 -> T = 1 x EP = 2 and back through torch_dist, and T = 2 exact resume (both formats)."""
    runs = {}
    runs["tp2_first"] = _pretrain(f"{TP2} --save {root}/tp2 --exit-interval 3", world)
    runs["tp2_to_ep2"] = _pretrain(f"{EP2} --load {root}/tp2", world)
    _pretrain(f"{EP2} --save {root}/ep2 --exit-interval 3", world)
    runs["ep2_to_tp2"] = _pretrain(f"{TP2} --load {root}/ep2", world)
    runs["ep2_to_etp2"] = _pretrain(f"{ETP2} --load {root}/ep2", world)  # experts' FFN split over ETP = T = 2
    _pretrain(f"{ETP2} --save {root}/etp2 --exit-interval 3", world)
    runs["etp2_to_ep2"] = _pretrain(f"{EP2} --load {root}/etp2", world)
    dropout = f"{TP2} --hidden-dropout 0.1"
    runs["tp2_full"] = _pretrain(dropout, world)
    for fmt in ("torch_dist", "torch"):
        first = _pretrain(f"{dropout} --ckpt-format {fmt} --save {root}/{fmt} --exit-interval 3", world)
        runs[f"tp2_resumed_{fmt}"] = {**first, **_pretrain(f"{dropout} --ckpt-format {fmt} --load {root}/{fmt}", world)}
    return runs


def _close(resumed: dict, full: dict) -> None:
    assert sorted(resumed) == [4, 5], resumed
    for it in (4, 5):
        assert abs(float(resumed[it]) - float(full[it])) / float(full[it]) < 1e-5, (resumed, full)


def test_torch_dist_across_tensor_and_expert_parallel(tmp_path):
    runs = run_distributed(_resume_runs, 2, str(tmp_path))[0]
    full = _pretrain(f"--save {tmp_path}/one --save-interval 3")  # one process, uninterrupted
    _close(runs["tp2_to_ep2"], full)
    _close(runs["ep2_to_tp2"], full)
    _close(runs["ep2_to_etp2"], full)
    _close(runs["etp2_to_ep2"], full)
    assert runs["tp2_resumed_torch_dist"] == runs["tp2_full"]
    assert runs["tp2_resumed_torch"] == runs["tp2_full"]
    # Every whole tensor saved at T = 2 is the one-process run's (up to rounding; a misplaced
    # slice would differ by O(1)).
    tp2, one = load_training_checkpoint(str(tmp_path / "tp2")), load_training_checkpoint(str(tmp_path / "one" / "iter_0000003"))
    assert set(tp2.model) == set(one.model) and set(tp2.optimizer["state"]) == set(one.optimizer["state"])
    for name, t in one.model.items():
        assert t.shape == tp2.model[name].shape and rel_diff(tp2.model[name], t) < 1e-5, name
    for name, moments in one.optimizer["state"].items():
        for key, t in moments.items():
            assert rel_diff(tp2.optimizer["state"][name][key], t) < 1e-5, (name, key)
    assert tp2.common["args"].tensor_model_parallel_size == 2 and tp2.common["args"].sequence_parallel


# ---------------------------------------------------------------------------- legacy files

LAYOUTS = {"sequential": "", "te_grouped": "--transformer-impl transformer_engine --moe-grouped-gemm"}


def _save_initial(rank: int, world: int, root: str) -> None:
    from megatron.training import checkpointing
    from megatron.training.train import Trainer

    for name, flags in LAYOUTS.items():
        for extra, ep in ((TP2, 1), (f"{TP2} {EP2}", 2)):
            out = f"{root}/{name}_tp2" + ("_ep2" if ep > 1 else "")
            cfg = make_config(f"{COMMON} {extra} --ckpt-format torch {flags} --save {out}", world_size=world)
            groups = groups_from_mesh(ep, torch.device("cpu"), "gloo", tp_size=2, etp_size=1)
            checkpointing.save_checkpoint(Trainer(cfg, groups), cfg, groups)


def _tool(*argv: str) -> None:
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def _files(root) -> dict[str, dict]:
    it = root / "iter_0000000"
    return {p.name: load_file(str(p / "model_optim_rng.pt")) for p in sorted(it.iterdir())}


def test_legacy_tensor_parallel_files_reshard_and_convert(tmp_path):
    from megatron.training import checkpointing
    from megatron.training.hf_checkpoint import read_hf_checkpoint
    from megatron.training.train import Trainer

    run_distributed(_save_initial, 2, str(tmp_path))
    cfg = make_config(f"{COMMON} --ckpt-format torch --save {tmp_path / 'sequential_tp1'}")
    trainer = Trainer(cfg, ProcessGroups())  # initial weights do not depend on the layout
    checkpointing.save_checkpoint(trainer, cfg, ProcessGroups())
    whole = trainer.model.state_dict()

    for name in LAYOUTS:
        layout = megatron_layout.layout_for(*(("transformer_engine", True) if name == "te_grouped" else ("local", False)))
        tp2 = _files(tmp_path / f"{name}_tp2")
        assert sorted(tp2) == ["mp_rank_00", "mp_rank_01"]
        folded = _files(tmp_path / f"{name}_tp2_ep2")  # EP spans the two TP ranks: two files, not four
        assert sorted(folded) == ["mp_rank_00_000", "mp_rank_01_001"]
        for t in range(2):
            expected = megatron_layout.to_megatron(shard_state(whole, True, t, 2), layout)
            payload = tp2[f"mp_rank_{t:02d}"]
            args = payload["args"]
            assert (args.tensor_model_parallel_size, args.expert_tensor_parallel_size, args.sequence_parallel,
                    args.padded_vocab_size) == (2, 1, True, whole["embedding.word_embeddings.weight"].shape[0])
            assert set(payload["model"]) == set(expected)
            for key, value in expected.items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(payload["model"][key], value), (name, t, key)
            qkv = payload["model"]["decoder.layers.0.self_attention.linear_qkv.weight"]
            assert qkv.shape[0] == whole["decoder.layers.0.self_attention.linear_qkv.weight"].shape[0] // 2
            optimizer = payload["optimizer"]["state"]["decoder.layers.0.self_attention.linear_qkv.weight"]
            assert optimizer["exp_avg"].shape == qkv.shape
            # Folded file t holds TP rank t's slices and expert-parallel rank t's two experts.
            f = folded[f"mp_rank_{t:02d}_{t:03d}"]["model"]
            assert torch.equal(f["decoder.layers.0.self_attention.linear_qkv.weight"], qkv)
            w1 = f"decoder.layers.0.mlp.experts.{'local_experts.1.linear_fc1.weight' if name == 'sequential' else 'linear_fc1.weight1'}"
            assert torch.equal(f[w1], whole["decoder.layers.0.mlp.experts.weight1"][2 * t + 1].T)

    # Offline: the merge of the T = 2 files (and of the folded ones) is the whole model.
    for src in ("sequential_tp2", "te_grouped_tp2_ep2"):
        merged = load_training_checkpoint(str(tmp_path / src))
        assert set(merged.model) == set(whole)
        assert all(torch.equal(merged.model[k], v) for k, v in whole.items()), src
    # reshard.py: T = 2 -> T = 1 equals the T = 1 files, T = 1 -> T = 2 equals the T = 2 files.
    to1, to2 = tmp_path / "to_tp1", tmp_path / "to_tp2"
    _tool("tools/checkpoint/reshard.py", "--load-dir", str(tmp_path / "sequential_tp2"), "--save-dir", str(to1),
          "--ckpt-format", "torch", "--target-tensor-parallel-size", "1")
    _tool("tools/checkpoint/reshard.py", "--load-dir", str(tmp_path / "sequential_tp1"), "--save-dir", str(to2),
          "--ckpt-format", "torch", "--target-tensor-parallel-size", "2")
    for made, reference in ((to1, tmp_path / "sequential_tp1"), (to2, tmp_path / "sequential_tp2")):
        ours, theirs = _files(made), _files(reference)
        assert sorted(ours) == sorted(theirs)
        for rank, payload in ours.items():
            for entry in ("model",):
                assert set(payload[entry]) == set(theirs[rank][entry])
                for key, value in theirs[rank][entry].items():
                    if isinstance(value, torch.Tensor):
                        assert torch.equal(payload[entry][key], value), (made, rank, key)
            assert payload["args"].tensor_model_parallel_size == theirs[rank]["args"].tensor_model_parallel_size

    # Hugging Face conversion from the T = 2 files equals conversion from T = 1.
    converted = {}
    for src in ("sequential_tp2", "sequential_tp1"):
        _tool("tools/checkpoint/convert.py", "--loader", "megatron", "--saver", "hf", "--load-dir",
              str(tmp_path / src), "--save-dir", str(tmp_path / f"hf_{src}"))
        converted[src] = read_hf_checkpoint(str(tmp_path / f"hf_{src}"))[1]
    assert set(converted["sequential_tp2"]) == set(converted["sequential_tp1"])
    assert all(torch.equal(converted["sequential_tp2"][k], v) for k, v in converted["sequential_tp1"].items())

    # A T = 1 run refuses the T = 2 files in one line naming the flag and the tool.
    cfg1 = make_config(f"{COMMON} --ckpt-format torch --load {tmp_path / 'sequential_tp2'}")
    with pytest.raises(CheckpointError, match=r"--tensor-model-parallel-size 2, this run has 1.*reshard.py") as e:
        _load_legacy(cfg1, ProcessGroups(), str(tmp_path / "sequential_tp2" / "iter_0000000"), trainer.model)
    assert "\n" not in str(e.value)
