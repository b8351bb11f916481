"""Crash safety, corrupt and incompatible checkpoints, SIGTERM and time-limit exits."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

import pretrain_gpt
from megatron.training import checkpointing
from megatron.training.train import pretrain
from tests.helpers import TINY_FLAGS, make_config

FMT = ["torch_dist", "torch"]


@pytest.mark.parametrize("fmt", FMT)
def test_crash_during_save_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch, capsys, fmt):
    save = tmp_path / "ckpt"
    pretrain(make_config(f"--train-iters 2 --save {save} --ckpt-format {fmt}"))

    def die(*args, **kwargs):
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(checkpointing, "publish", die)
    with pytest.raises(KeyboardInterrupt):
        pretrain(make_config(f"--train-iters 4 --load {save} --save {save} --ckpt-format {fmt}"))
    monkeypatch.undo()
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert (save / "iter_0000004.tmp").is_dir() and not (save / "iter_0000004").exists()
    capsys.readouterr()
    state = pretrain(make_config(f"--train-iters 3 --load {save} --ckpt-format {fmt}"))
    assert state.iteration == 3 and "loaded checkpoint" in capsys.readouterr().out


def test_killed_process_leaves_a_loadable_checkpoint(tmp_path):
    """SIGKILL a run that saves every iteration, at an arbitrary moment; the latest checkpoint loads."""
    save = tmp_path / "ckpt"
    flags = TINY_FLAGS.split() + ["--train-iters", "1000", "--save", str(save), "--save-interval", "1",
                                  "--hidden-size", "64", "--ffn-hidden-size", "128"]
    proc = subprocess.Popen([sys.executable, "pretrain_gpt.py", *flags], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (save / "latest_checkpointed_iteration.txt").exists():
        time.sleep(0.05)
    time.sleep(0.7)
    proc.kill()
    proc.wait()
    latest = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert latest >= 1
    state = pretrain(make_config(f"--train-iters {latest + 1} --load {save} --hidden-size 64 --ffn-hidden-size 128"))
    assert state.iteration == latest + 1


@pytest.mark.parametrize("fmt", FMT)
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, capsys, fmt):
    save = tmp_path / "ckpt"
    pretrain(make_config(f"--train-iters 1 --save {save} --ckpt-format {fmt}"))
    victims = [p for p in (save / "iter_0000001").rglob("*") if p.suffix in (".distcp", ".pt") and "common" not in p.name
               and "rng_rank" not in p.name]
    for v in victims:
        data = v.read_bytes()
        v.write_bytes(data[: len(data) // 3])
    capsys.readouterr()
    code = pretrain_gpt.main(TINY_FLAGS.split() + ["--load", str(save), "--ckpt-format", fmt])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "corrupt" in err and str(save) in err


@pytest.mark.parametrize("fmt", FMT)
def test_incompatible_checkpoint_names_what_differs(tmp_path, capsys, fmt):
    save = tmp_path / "ckpt"
    pretrain(make_config(f"--train-iters 1 --save {save} --ckpt-format {fmt}"))
    capsys.readouterr()
    code = pretrain_gpt.main(TINY_FLAGS.split() + ["--load", str(save), "--num-experts", "8", "--ckpt-format", fmt])
    err = capsys.readouterr().err
    assert code == 2 and "num_experts: checkpoint 4 vs run 8" in err
    code = pretrain_gpt.main(TINY_FLAGS.split() + ["--load", str(save), "--hidden-size", "48", "--ckpt-format", fmt])
    assert code == 2 and "hidden_size: checkpoint 32 vs run 48" in capsys.readouterr().err


def test_no_save_optim_needs_no_load_optim(tmp_path, capsys):
    save = tmp_path / "ckpt"
    pretrain(make_config(f"--train-iters 1 --save {save} --no-save-optim"))
    capsys.readouterr()
    assert pretrain_gpt.main(TINY_FLAGS.split() + ["--load", str(save)]) == 2
    assert "--no-load-optim" in capsys.readouterr().err
    state = pretrain(make_config(f"--train-iters 2 --load {save} --no-load-optim"))
    assert state.iteration == 2


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    save = tmp_path / "ckpt"
    flags = TINY_FLAGS.split() + ["--train-iters", "100000", "--save", str(save), "--log-interval", "1"]
    proc = subprocess.Popen([sys.executable, "-u", "pretrain_gpt.py", *flags], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "iteration        3/" in line:
            proc.send_signal(signal.SIGTERM)
            break
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    assert "exiting program at iteration" in out
    latest = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert latest >= 3 and (save / f"iter_{latest:07d}" / ".metadata").is_file()


SIGTERM_WHILE_LOADING = """
import os, signal, sys
import pretrain_gpt
from megatron.training import checkpointing
load = checkpointing.load_checkpoint
def load_after_sigterm(*args, **kwargs):  # the signal lands while the run is still setting up
    os.kill(os.getpid(), signal.SIGTERM)
    return load(*args, **kwargs)
checkpointing.load_checkpoint = load_after_sigterm
sys.exit(pretrain_gpt.main(sys.argv[1:]))
"""


def test_sigterm_during_setup_saves_after_the_first_step(tmp_path):
    """A SIGTERM before the training loop (slurm's preemption can come at any time) does not kill
    the rank: the run takes one step, saves it and exits cleanly."""
    save = tmp_path / "ckpt"
    flags = TINY_FLAGS.split() + ["--train-iters", "100000", "--save", str(save)]
    proc = subprocess.run([sys.executable, "-c", SIGTERM_WHILE_LOADING, *flags], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "exiting program at iteration 1" in proc.stdout
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "1"


def test_exit_duration_saves_and_exits(tmp_path, capsys):
    save = tmp_path / "ckpt"
    state = pretrain(make_config(f"--train-iters 1000 --save {save} --exit-duration-in-mins 0.00001"))
    assert state.iteration == 1
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "1"
    assert "exiting program at iteration 1" in capsys.readouterr().out


def test_checkpoint_holds_megatron_keys(tmp_path):
    from megatron.training.safe_load import load_file

    save = tmp_path / "ckpt"
    pretrain(make_config(f"--train-iters 1 --save {save} --ckpt-format torch"))
    payload = load_file(str(save / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"))
    for key in ("args", "checkpoint_version", "iteration", "model", "optimizer", "opt_param_scheduler", "rng_state"):
        assert key in payload
    assert payload["iteration"] == 1 and payload["checkpoint_version"] == 3.0 and payload["args"].num_layers == 2
    assert "decoder.layers.0.mlp.experts.local_experts.3.linear_fc2.weight" in payload["model"]
