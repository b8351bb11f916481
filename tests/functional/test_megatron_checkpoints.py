"""Megatron-LM `--ckpt-format torch` checkpoints: loading theirs (every expert implementation and
norm naming), writing theirs (per --transformer-impl / --moe-grouped-gemm), and resuming."""

from __future__ import annotations

import argparse
import os
import signal

import numpy as np
import pytest
import torch

import pretrain_gpt
from megatron.core.parallel_state import ProcessGroups
from megatron.training import checkpointing
from megatron.training.data import build_datasets, build_loader, micro_batches
from megatron.training.model_checkpoint import load_training_checkpoint
from megatron.training.safe_load import load_file, save_file
from megatron.training.train import Trainer, pretrain
from tests.functional.test_training import losses_from
from tests.helpers import TINY_FLAGS, make_config
from tests.megatron_fixtures import IMPLS, megatron_lm_args, megatron_model_state, write_megatron_checkpoint

# Layer 0 dense, layer 1 MoE: both norm fusions of the Transformer Engine spec occur.
FLAGS = "--moe-layer-freq [0,1] --train-iters 3"
SAVED_ITERATION, GBS = 2, 4


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """A checkpoint of ours at iteration 2 (torch_dist), and its EP = 1 model state."""
    root = tmp_path_factory.mktemp("native")
    pretrain(make_config(f"{FLAGS} --train-iters {SAVED_ITERATION} --save {root}"))
    return str(root), load_training_checkpoint(str(root)).model


def loaded(flags: str):
    """A Trainer restored through `--load` (cfg from `flags`), and its LM loss on the next global
    batch (the mean over micro-batches, as the training log reports it)."""
    cfg = make_config(f"{FLAGS} {flags}")
    groups = ProcessGroups()
    trainer = Trainer(cfg, groups)
    checkpointing.load_checkpoint(trainer, cfg, groups)
    train_ds, _, _ = build_datasets(cfg)
    batches = micro_batches(build_loader(train_ds, cfg, groups, trainer.state.consumed_train_samples), groups.device)
    with torch.no_grad():
        losses = [trainer.schedule.evaluate([next(batches)]) for _ in range(cfg.num_microbatches)]
    return trainer, float(sum(losses) / len(losses))


@pytest.mark.parametrize("te", [False, True], ids=["local", "te"])
@pytest.mark.parametrize("impl", IMPLS)
def test_megatron_lm_checkpoint_loads_with_the_same_loss(tmp_path, native, impl, te):
    root, ours = native
    args = megatron_lm_args(make_config(FLAGS), SAVED_ITERATION, SAVED_ITERATION * GBS)
    write_megatron_checkpoint(str(tmp_path), SAVED_ITERATION, [megatron_model_state(ours, impl, te)], args)
    reference, expected = loaded(f"--load {root} --no-load-optim --no-load-rng")
    trainer, loss = loaded(f"--load {tmp_path} --no-load-optim")
    assert loss == expected
    assert trainer.state.iteration == SAVED_ITERATION and trainer.state.consumed_train_samples == SAVED_ITERATION * GBS
    assert trainer.state.floating_point_operations_so_far == 1.0e9  # Megatron-LM's counter
    state = trainer.model.state_dict()
    assert all(torch.equal(state[k], reference.model.state_dict()[k]) for k in state)
    assert not os.path.exists("MARKER_FROM_EXTRA_STATE")  # extra state is dropped unread


def test_megatron_lm_checkpoint_resumes_at_its_consumed_samples(tmp_path, native, capsys):
    """Megatron's `args.consumed_train_samples` (not the iteration) sets the data position."""
    _, ours = native
    consumed = 3 * GBS  # as if an earlier phase ran with another batch size
    args = megatron_lm_args(make_config(FLAGS), SAVED_ITERATION, consumed)
    write_megatron_checkpoint(str(tmp_path), SAVED_ITERATION, [megatron_model_state(ours, "te_grouped", True)], args)
    run = ["--load", str(tmp_path), "--no-load-optim", "--train-iters", "5"]
    capsys.readouterr()
    code = pretrain_gpt.main(TINY_FLAGS.split() + FLAGS.split() + run + ["--exit-interval", "3"])
    out = capsys.readouterr().out
    assert code == 0 and sorted(losses_from(out)) == [3]
    assert f"consumed samples: {consumed + GBS:12d}" in out
    _, expected = loaded(" ".join(run))
    assert float(losses_from(out)[3]) == pytest.approx(expected, rel=1e-6)
    _, at_iteration = loaded(f"--load {native[0]} --no-load-optim --no-load-rng --train-iters 5")
    assert at_iteration != pytest.approx(expected, rel=1e-6)  # the data position is not iteration x batch


def test_megatron_optimizer_state_needs_no_load_optim(tmp_path, native, capsys):
    _, ours = native
    args = megatron_lm_args(make_config(FLAGS), SAVED_ITERATION, SAVED_ITERATION * GBS)
    write_megatron_checkpoint(str(tmp_path), SAVED_ITERATION, [megatron_model_state(ours, "sequential", False)], args)
    capsys.readouterr()
    code = pretrain_gpt.main(TINY_FLAGS.split() + FLAGS.split() + ["--load", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Megatron-LM's optimizer state" in err and "--no-load-optim" in err


@pytest.mark.parametrize("impl,missing", [
    ("sequential", "decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.weight"),
    ("te_grouped", "decoder.layers.1.mlp.experts.linear_fc1.weight2"),
    ("grouped", "decoder.layers.1.mlp.experts.weight2"),
])
def test_missing_expert_tensor_is_an_error_naming_it(tmp_path, native, capsys, impl, missing):
    _, ours = native
    model = megatron_model_state(ours, impl, False)
    del model[missing]
    args = megatron_lm_args(make_config(FLAGS), SAVED_ITERATION, SAVED_ITERATION * GBS)
    write_megatron_checkpoint(str(tmp_path), SAVED_ITERATION, [model], args)
    capsys.readouterr()
    code = pretrain_gpt.main(TINY_FLAGS.split() + FLAGS.split() + ["--load", str(tmp_path), "--no-load-optim"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and missing in err and "model_optim_rng.pt" in err, err


# Per --transformer-impl x --moe-grouped-gemm: one documented name each layout must hold.
WRITTEN = {
    ("local", False): ["decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight",
                       "decoder.layers.1.input_layernorm.weight", "output_layer._extra_state"],
    ("local", True): ["decoder.layers.1.mlp.experts.weight1", "decoder.layers.0.mlp.linear_fc1._extra_state"],
    ("transformer_engine", False): ["decoder.layers.1.mlp.experts.local_experts.0.linear_fc2._extra_state",
                                    "decoder.layers.0.mlp.linear_fc1.layer_norm_weight"],
    ("transformer_engine", True): ["decoder.layers.1.mlp.experts.linear_fc2.weight3",
                                   "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight",
                                   "decoder.layers.1.pre_mlp_layernorm.weight", "decoder.final_layernorm._extra_state"],
}


@pytest.mark.parametrize("impl,grouped", list(WRITTEN))
def test_save_writes_megatron_layout_and_round_trips(tmp_path, impl, grouped):
    flags = f"--ckpt-format torch --save {tmp_path} --transformer-impl {impl}" + (" --moe-grouped-gemm" * grouped)
    cfg = make_config(f"{FLAGS} {flags}")
    groups = ProcessGroups()
    trainer = Trainer(cfg, groups)
    train_ds, _, _ = build_datasets(cfg)
    batches = micro_batches(build_loader(train_ds, cfg, groups), groups.device)
    trainer.train_step([next(batches) for _ in range(cfg.num_microbatches)])
    trainer.state.iteration, trainer.state.consumed_train_samples = 1, GBS
    checkpointing.save_checkpoint(trainer, cfg, groups)

    payload = megatron_torch_load(str(tmp_path / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"))
    assert all(name in payload["model"] for name in WRITTEN[(impl, grouped)])
    assert "decoder.layers.1.mlp.experts.weight1" not in payload["model"] or grouped and impl == "local"
    args = payload["args"]
    assert (args.padded_vocab_size, args.num_experts, args.data_parallel_size, args.consumed_train_samples) == (
        cfg.model.vocab_size, 4, 1, GBS)
    assert payload["checkpoint_version"] == 3.0 and isinstance(payload["rng_state"], list)

    load_cfg = make_config(f"{FLAGS} {flags} --load {tmp_path}")
    restored = Trainer(load_cfg, groups)
    checkpointing.load_checkpoint(restored, load_cfg, groups)
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(restored.model.state_dict()[name], tensor), name
    for before, after in zip(trainer.optimizer.inner.state.values(), restored.optimizer.inner.state.values()):
        assert all(torch.equal(before[k], after[k]) for k in ("exp_avg", "exp_avg_sq"))
    assert (restored.state.iteration, restored.state.consumed_train_samples) == (1, GBS)


def megatron_torch_load(path: str):
    """What Megatron-LM 0.16 does: torch.load with weights_only (torch >= 2.6) and the safe globals
    Megatron-Core registers (argparse.Namespace, numpy's array pieces, its enums), nothing of ours."""
    from tests.megatron_fixtures import AttnBackend, CudaGraphScope, ModelType

    reconstruct = (getattr(np, "_core", None) or np.core).multiarray._reconstruct
    enums = [(AttnBackend, "megatron.core.transformer.enums.AttnBackend"), (ModelType, "megatron.core.enums.ModelType"),
             (CudaGraphScope, "megatron.core.transformer.enums.CudaGraphScope")]
    with torch.serialization.safe_globals([argparse.Namespace, signal.Signals, np.ndarray, np.dtype,
                                           np.dtypes.UInt32DType, *enums,
                                           (reconstruct, "numpy._core.multiarray._reconstruct"),
                                           (reconstruct, "numpy.core.multiarray._reconstruct")]):
        return torch.load(path, map_location="cpu", weights_only=True)


def run_tool(name: str, *argv: str) -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, f"tools/checkpoint/{name}", *argv], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_reshard_reads_megatron_lm_expert_parallel_checkpoints_and_keeps_their_layout(tmp_path, native):
    _, ours = native
    shards = [{k: v[2 * r:2 * r + 2] if ".mlp.experts." in k else v for k, v in ours.items()} for r in range(2)]
    args = megatron_lm_args(make_config(FLAGS), SAVED_ITERATION, SAVED_ITERATION * GBS, expert_model_parallel_size=2)
    src, out = tmp_path / "megatron_ep2", tmp_path / "ep1"
    write_megatron_checkpoint(str(src), SAVED_ITERATION, [megatron_model_state(s, "te_grouped", True) for s in shards],
                              args)
    run_tool("reshard.py", "--load-dir", str(src), "--save-dir", str(out), "--ckpt-format", "torch")
    payload = megatron_torch_load(str(out / "iter_0000002" / "mp_rank_00" / "model_optim_rng.pt"))
    assert "decoder.layers.1.mlp.experts.linear_fc2.weight3" in payload["model"]  # TEGroupedMLP, 4 local experts
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in payload["model"]
    assert payload["args"].attention_backend.name == "auto"  # written back under Megatron-Core's class name
    _, expected = loaded(f"--load {native[0]} --no-load-optim --no-load-rng")
    _, loss = loaded(f"--load {out} --no-load-optim")
    assert loss == expected


def test_convert_reads_megatron_lm_checkpoints(tmp_path):
    """A Megatron-LM checkpoint (no `config` entry: the model comes from its args) converts to
    Hugging Face with the same tensors as our own checkpoint of the same weights."""
    from safetensors.torch import load_file as read_safetensors

    ours_root = tmp_path / "ours"
    pretrain(make_config(f"--train-iters 1 --save {ours_root}"))
    state = load_training_checkpoint(str(ours_root)).model
    args = megatron_lm_args(make_config(""), 1, GBS)
    write_megatron_checkpoint(str(tmp_path / "megatron"), 1, [megatron_model_state(state, "grouped", False)], args)
    for name in ("ours", "megatron"):
        run_tool("convert.py", "--loader", "megatron", "--saver", "hf", "--load-dir", str(tmp_path / name),
                 "--save-dir", str(tmp_path / f"{name}_hf"))
    expected = read_safetensors(tmp_path / "ours_hf" / "model-00001-of-00001.safetensors")
    written = read_safetensors(tmp_path / "megatron_hf" / "model-00001-of-00001.safetensors")
    assert sorted(written) == sorted(expected) and all(torch.equal(written[k], expected[k]) for k in expected)


def test_megatron_release_checkpoint_without_iteration_loads_at_zero(tmp_path, native):
    """Megatron-LM's `release/` layout; a payload without `iteration` starts at 0, as Megatron-LM does."""
    _, ours = native
    args = megatron_lm_args(make_config(FLAGS), 0, 0)
    write_megatron_checkpoint(str(tmp_path), 0, [megatron_model_state(ours, "sequential", False)], args,
                              with_optimizer=False)
    os.rename(tmp_path / "iter_0000000", tmp_path / "release")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("release")
    path = tmp_path / "release" / "mp_rank_00" / "model_optim_rng.pt"
    payload = load_file(str(path))
    del payload["iteration"]
    save_file(payload, str(path))
    trainer, _ = loaded(f"--load {tmp_path} --no-load-optim")
    assert trainer.state.iteration == 0
    assert all(torch.equal(v, ours[k]) for k, v in trainer.model.state_dict().items())


def test_reshard_reads_megatron_lm_interleaved_pipeline_checkpoints(tmp_path):
    """Megatron-LM's files at P = 2 with virtual stages (V = 2): `model0`/`model1` per rank (no
    `model` entry), chunk-local layer numbers, the tied copy of the word embedding as the last
    chunk's `output_layer.weight`, no `config`. The offline reader merges them into the whole
    model and reshard.py writes them for P = 1 (found by tools/megatron_parity's P = 2 check)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.training.megatron_layout import split_pipeline_chunks
    from tests.megatron_fixtures import megatron_core_names, megatron_rng_state

    split = "--pipeline-model-parallel-size 2 --virtual-pipeline-model-parallel-size 2"
    cfg = make_config(f"--num-layers 4 --moe-layer-freq [0,1,1,1] {split} --global-batch-size 8", world_size=2)
    torch.manual_seed(0)
    whole = GPTModel(cfg.model).state_dict()
    args = megatron_lm_args(cfg, SAVED_ITERATION, 8, virtual_pipeline_model_parallel_size=2)
    args.pipeline_model_parallel_size = 2
    src, out = tmp_path / "megatron_pp2_vp2", tmp_path / "pp1"
    pipeline = cfg.parallel.pipeline_layout(4)
    for r in range(2):
        chunks = split_pipeline_chunks(whole, pipeline, r, tied=True)
        payload = {"args": args, "checkpoint_version": 3.0, "iteration": SAVED_ITERATION,
                   "rng_state": megatron_rng_state(), "num_floating_point_operations_so_far": 0,
                   **{f"model{v}": megatron_model_state(c, "sequential", False) for v, c in enumerate(chunks)}}
        directory = src / f"iter_{SAVED_ITERATION:07d}" / f"mp_rank_00_{r:03d}"
        os.makedirs(directory)
        with megatron_core_names():
            torch.save(payload, directory / "model_optim_rng.pt")
    (src / "latest_checkpointed_iteration.txt").write_text(str(SAVED_ITERATION))

    read = load_training_checkpoint(str(src)).model
    assert set(read) == set(whole) and all(torch.equal(read[k], whole[k]) for k in whole)
    run_tool("reshard.py", "--load-dir", str(src), "--save-dir", str(out), "--ckpt-format", "torch",
             "--target-pipeline-parallel-size", "1")
    resharded = load_training_checkpoint(str(out)).model
    assert set(resharded) == set(whole) and all(torch.equal(resharded[k], whole[k]) for k in whole)
