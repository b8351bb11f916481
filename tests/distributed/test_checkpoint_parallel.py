"""Checkpoints across parallel layouts: exact resume on 2 ranks, and resharding EP=2 -> 1 and -> 4."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

from megatron.core.parallel_state import groups_from_mesh
from megatron.training.train import pretrain
from tests.distributed.harness import run_distributed
from tests.functional.test_training import losses_from
from tests.helpers import make_config

COMMON = "--global-batch-size 8 --micro-batch-size 2 --num-experts 4 --train-iters 5 --lr-warmup-iters 1 " \
         "--moe-token-dispatcher-type alltoall --moe-z-loss-coeff 1e-3"


def _train(rank: int, world: int, ep: int, extra: str) -> dict:
    cfg = make_config(f"{COMMON} --expert-model-parallel-size {ep} {extra}", world_size=world)
    groups = groups_from_mesh(ep, torch.device("cpu"), "gloo")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        pretrain(cfg, groups=groups)
    return losses_from(out.getvalue())


def _run(world: int, ep: int, extra: str) -> dict:
    if world == 1:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            pretrain(make_config(f"{COMMON} {extra}"))
        return losses_from(out.getvalue())
    return run_distributed(_train, world, ep, extra)[0]


def _assert_continues(resumed: dict, full: dict) -> None:
    """A run resumed at iteration 3 logs iterations 4 and 5 with the uninterrupted run's losses."""
    assert sorted(resumed) == [4, 5]
    for it in (4, 5):
        assert abs(float(resumed[it]) - float(full[it])) / float(full[it]) < 1e-5, (resumed, full)


@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
def test_exact_resume_on_two_ranks(tmp_path, fmt):
    extra = f"--ckpt-format {fmt} --use-distributed-optimizer"
    full = _run(2, 2, extra)
    first = _run(2, 2, f"{extra} --save {tmp_path} --exit-interval 3")
    resumed = _run(2, 2, f"{extra} --load {tmp_path}")
    assert sorted(first) == [1, 2, 3] and sorted(resumed) == [4, 5]
    assert {**first, **resumed} == full


def test_reshard_ep2_to_ep1_and_ep4(tmp_path):
    saved = tmp_path / "ep2"
    full = _run(2, 2, "--use-distributed-optimizer")
    _run(2, 2, f"--use-distributed-optimizer --save {saved} --exit-interval 3")
    on_one = _run(1, 1, f"--load {saved}")
    on_four = _run(4, 4, f"--load {saved} --use-distributed-optimizer")
    for resumed in (on_one, on_four):
        _assert_continues(resumed, full)


def test_offline_reshard_legacy_ep2_to_ep4_and_to_torch_dist(tmp_path):
    import subprocess
    import sys

    saved = tmp_path / "ep2"
    full = _run(2, 2, "--ckpt-format torch")
    _run(2, 2, f"--ckpt-format torch --save {saved} --exit-interval 3")
    assert (saved / "iter_0000003" / "mp_rank_00_001").is_dir()
    ep4, dist_ckpt = tmp_path / "ep4", tmp_path / "dist"
    for out, extra in ((ep4, ["--ckpt-format", "torch", "--target-expert-parallel-size", "4"]),
                       (dist_ckpt, ["--ckpt-format", "torch_dist"])):
        proc = subprocess.run([sys.executable, "tools/checkpoint/reshard.py", "--load-dir", str(saved),
                               "--save-dir", str(out), *extra], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
    assert (ep4 / "iter_0000003" / "mp_rank_00_003").is_dir()
    resumed_ep4 = _run(4, 4, f"--ckpt-format torch --load {ep4} --no-load-rng")
    resumed_one = _run(1, 1, f"--load {dist_ckpt}")
    for resumed in (resumed_ep4, resumed_one):
        _assert_continues(resumed, full)
    proc = subprocess.run([sys.executable, "tools/checkpoint/reshard.py", "--load-dir", str(tmp_path / "nope"),
                           "--save-dir", str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("reshard.py: error:")


# --transformer-impl/--moe-grouped-gemm -> the Megatron name of local expert {e}'s fc1 (None: GroupedMLP's one tensor).
LAYOUTS = {
    "": "local_experts.{e}.linear_fc1.weight",  # SequentialMLP
    "--transformer-impl transformer_engine --moe-grouped-gemm": "linear_fc1.weight{e}",  # TEGroupedMLP
    "--moe-grouped-gemm": None,  # GroupedMLP: one [D, E_local*2F] tensor
}


def _save_initial(rank: int, world: int, ep: int, root: str) -> None:
    from megatron.training import checkpointing
    from megatron.training.train import Trainer

    groups = groups_from_mesh(ep, torch.device("cpu"), "gloo")
    for i, extra in enumerate(LAYOUTS):
        cfg = make_config(f"{COMMON} --expert-model-parallel-size {ep} --ckpt-format torch --save {root}/{i} {extra}",
                          world_size=world)
        checkpointing.save_checkpoint(Trainer(cfg, groups), cfg, groups)


def test_legacy_rank_files_hold_their_local_experts(tmp_path):
    """EP = 2 on two ranks: mp_rank_00_00r holds experts 2r and 2r+1 under local indices 0 and 1,
    equal to the same experts of a one-process model (initialisation does not depend on EP), for
    each expert implementation."""
    from megatron.core.parallel_state import ProcessGroups
    from megatron.training.safe_load import load_file
    from megatron.training.train import build_model

    run_distributed(_save_initial, 2, 2, str(tmp_path))
    reference = build_model(make_config(COMMON), ProcessGroups()).state_dict()
    for i, fc1 in enumerate(LAYOUTS.values()):
        for rank in range(2):
            path = tmp_path / str(i) / "iter_0000000" / f"mp_rank_00_{rank:03d}" / "model_optim_rng.pt"
            payload = load_file(str(path))
            model, args = payload["model"], payload["args"]
            assert (args.expert_model_parallel_size, args.data_parallel_size, args.world_size) == (2, 2, 2)
            for layer in range(2):
                p = f"decoder.layers.{layer}.mlp.experts"
                ours = reference[f"{p}.weight1"][2 * rank:2 * rank + 2]  # [2, D, 2F]
                if fc1 is None:
                    assert torch.equal(model[f"{p}.weight1"], ours.reshape(ours.shape[1], -1))
                    continue
                for e in range(2):
                    assert torch.equal(model[f"{p}.{fc1.format(e=e)}"], ours[e].T)
                assert f"{p}.{fc1.format(e=2)}" not in model
