"""--bf16 / --fp16 in Megatron's layout: low-precision model parameters, fp32 gradient buffers,
fp32 main parameters in the optimizer (and in its checkpoint state)."""

from __future__ import annotations

import pytest
import torch

from megatron.core.parallel_state import ProcessGroups
from megatron.training import checkpointing
from megatron.training.data import build_datasets, build_loader, micro_batches
from megatron.training.train import Trainer
from tests.helpers import make_config, rel_diff

CURVE = "--lr 1e-2 --vocab-size 32 --seq-length 32 --max-position-embeddings 32 --global-batch-size 8"


def _trainer(extra: str = "") -> Trainer:
    return Trainer(make_config(extra), ProcessGroups())


def _batches(trainer: Trainer):
    train_ds, _, _ = build_datasets(trainer.cfg)
    return micro_batches(build_loader(train_ds, trainer.cfg, trainer.groups), trainer.groups.device)


def _step(trainer: Trainer, batches, steps: int = 1) -> list:
    return [trainer.train_step([next(batches) for _ in range(trainer.cfg.num_microbatches)]) for _ in range(steps)]


def _main_params(trainer: Trainer) -> dict[str, torch.Tensor]:
    """{name: flat fp32 main parameter} assembled from the optimizer's views (one process)."""
    names = {p: n for n, p in trainer.model.named_parameters()}
    out = {n: torch.full((p.numel(),), float("nan")) for p, n in names.items()}
    for _, view in trainer.optimizer.shard_views:
        out[names[view.param]][view.start:view.end] = view.shard.detach()
    return out


@pytest.mark.parametrize("extra", ["--bf16", "--bf16 --use-distributed-optimizer", "--fp16"])
def test_build_casts_model_and_keeps_fp32_main_params(extra):
    reference = _trainer()
    trainer = _trainer(extra)
    dtype = torch.float16 if "fp16" in extra else torch.bfloat16
    optimizer_params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    assert all(p.dtype == torch.float32 for p in optimizer_params)
    mains = _main_params(trainer)
    for (name, p), (_, p32) in zip(trainer.model.named_parameters(), reference.model.named_parameters()):
        assert p.dtype == dtype and p.grad is None and p.main_grad.dtype == torch.float32, name
        assert torch.equal(p, p32.to(dtype)), name  # the model is the rounded fp32 model
        assert torch.equal(mains[name], p32.reshape(-1)), name  # main params: the fp32 values, unrounded
    assert sum(p.numel() for p in optimizer_params) == sum(p.numel() for p in trainer.model.parameters())
    # Buffers (expert bias, rotary tables) are not parameters: they stay fp32.
    assert all(b.dtype != dtype for b in trainer.model.buffers())


def test_fp32_default_keeps_grad_as_buffer_view_without_hooks():
    trainer = _trainer()
    assert not trainer.optimizer.has_main_params and not trainer.optimizer.shard_views
    for p in trainer.model.parameters():
        assert p.dtype == torch.float32 and p.grad is p.main_grad
        assert not getattr(p, "_post_accumulate_grad_hooks", None)
    _step(trainer, _batches(trainer))
    assert all(p.grad is p.main_grad for p in trainer.model.parameters())


@pytest.mark.parametrize("extra", ["--bf16", "--bf16 --use-distributed-optimizer", "--fp16 --loss-scale 1024"])
def test_step_rounds_main_params_into_model(extra):
    trainer = _trainer(extra)
    before = _main_params(trainer)
    _step(trainer, _batches(trainer), 2)
    mains = _main_params(trainer)
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p.reshape(-1), mains[name].to(p.dtype)), name
        assert not torch.equal(mains[name], before[name]), name  # updated
    # The main parameters carry what rounding to 16 bits loses.
    assert any(not torch.equal(m, m.to(p.dtype).float()) for m, p in zip(mains.values(), trainer.model.parameters()))


def test_grads_reach_fp32_buffer_like_an_fp32_computation():
    """Two micro-batches accumulate into the fp32 main_grad; an fp32 model with the same
    (rounded) weights on the same micro-batches gives the same gradients within bf16 tolerance:
    the whole gradient within 5%, each parameter's direction within cosine 0.95 (measured: 0.97 at
    worst, the router; a small norm-weight gradient,
    a sum over tokens that mostly cancels, can differ by 10-15% in size)."""
    flags = "--global-batch-size 4 --micro-batch-size 2 --clip-grad 0 --lr 0"
    low, ref = _trainer(f"{flags} --bf16"), _trainer(flags)
    with torch.no_grad():
        for p_ref, p_low in zip(ref.model.parameters(), low.model.parameters()):
            p_ref.copy_(p_low.float())
    it = _batches(low)
    batches = [next(it) for _ in range(2)]
    low.train_step(batches)
    ref.train_step(batches)
    for (name, p_low), p_ref in zip(low.model.named_parameters(), ref.model.parameters()):
        assert p_low.grad is None and p_low.main_grad.dtype == torch.float32, name
        cosine = torch.nn.functional.cosine_similarity(p_low.main_grad.flatten(), p_ref.main_grad.flatten(), dim=0)
        assert cosine > 0.95, (name, float(cosine))
    whole = lambda model: torch.cat([p.main_grad.flatten() for p in model.parameters()])  # noqa: E731
    assert rel_diff(whole(low.model), whole(ref.model)) < 0.05


def test_bf16_follows_fp32_loss_curve():
    """50 steps on mock data: measured max |bf16 - fp32| / fp32 = 0.023 on CPU (torch 2.13)."""
    curves = {}
    for precision in ("", "--bf16"):
        trainer = _trainer(f"{CURVE} --train-iters 50 {precision}")
        curves[precision] = [r.lm_loss for r in _step(trainer, _batches(trainer), 50)]
    worst = max(abs(a - b) / b for a, b in zip(curves["--bf16"], curves[""]))
    assert worst < 0.05, worst
    assert curves["--bf16"][-1] < curves["--bf16"][0] - 1.5


def test_fp16_skips_overflowing_steps_without_touching_the_model():
    trainer = _trainer(f"{CURVE} --train-iters 30 --fp16")
    batches = _batches(trainer)
    initial, initial_mains = ({n: p.clone() for n, p in trainer.model.named_parameters()}, _main_params(trainer))
    first = _step(trainer, batches)[0]
    assert first.skipped  # the default initial scale, 2^32, overflows fp16 gradients
    assert all(torch.equal(p, initial[n]) for n, p in trainer.model.named_parameters())
    assert all(torch.equal(m, initial_mains[n]) for n, m in _main_params(trainer).items())
    results = _step(trainer, batches, 29)
    assert trainer.scaler.scale < 2.0**32 and not all(r.skipped for r in results)
    assert results[-1].lm_loss < first.lm_loss - 0.5


def _saved_trainer(tmp_path, extra: str, steps: int = 2) -> Trainer:
    cfg = make_config(f"--save {tmp_path} {extra}")
    trainer = Trainer(cfg, ProcessGroups())
    _step(trainer, _batches(trainer), steps)
    trainer.state.iteration = steps
    checkpointing.save_checkpoint(trainer, cfg, trainer.groups)
    return trainer


def _loaded_trainer(tmp_path, extra: str) -> Trainer:
    cfg = make_config(f"--load {tmp_path} {extra}")
    trainer = Trainer(cfg, ProcessGroups())
    checkpointing.load_checkpoint(trainer, cfg, trainer.groups)
    return trainer


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
@pytest.mark.parametrize("save_opt,load_opt", [("", ""), ("--use-distributed-optimizer", ""),
                                               ("", "--use-distributed-optimizer")])
def test_checkpoint_restores_main_params_exactly(tmp_path, fmt, save_opt, load_opt):
    saved = _saved_trainer(tmp_path, f"--bf16 --ckpt-format {fmt} {save_opt}")
    loaded = _loaded_trainer(tmp_path, f"--bf16 --ckpt-format {fmt} {load_opt}")
    before, after = _main_params(saved), _main_params(loaded)
    assert all(torch.equal(before[n], after[n]) for n in before)
    for (name, p), q in zip(saved.model.named_parameters(), loaded.model.parameters()):
        assert q.dtype == torch.bfloat16 and torch.equal(p, q), name
    saved_state, loaded_state = saved.optimizer.inner.state, loaded.optimizer.inner.state
    assert len(saved_state) == len(loaded_state) > 0


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_checkpoint_stores_bf16_model_and_fp32_main_params(tmp_path, fmt):
    trainer = _saved_trainer(tmp_path, f"--bf16 --ckpt-format {fmt}")
    tensors = checkpointing.tensor_state(trainer, trainer.cfg)
    assert all(t.dtype == torch.bfloat16 for n, t in tensors["model"].items()
               if n in dict(trainer.model.named_parameters()))
    entry = tensors["optimizer"]["state"]["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert set(entry) == {"exp_avg", "exp_avg_sq", "main_param"} and entry["main_param"].dtype == torch.float32


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_fp32_checkpoint_seeds_bf16_main_params_unrounded(tmp_path, fmt):
    saved = _saved_trainer(tmp_path, f"--ckpt-format {fmt}")
    loaded = _loaded_trainer(tmp_path, f"--bf16 --ckpt-format {fmt}")
    mains = _main_params(loaded)
    for (name, p32), p in zip(saved.model.named_parameters(), loaded.model.parameters()):
        assert torch.equal(mains[name], p32.reshape(-1)), name
        assert torch.equal(p, p32.to(torch.bfloat16)), name
    _step(loaded, _batches(loaded))  # and it trains on


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_bf16_checkpoint_loads_fp32_run_from_main_params(tmp_path, fmt):
    saved = _saved_trainer(tmp_path, f"--bf16 --ckpt-format {fmt}")
    loaded = _loaded_trainer(tmp_path, f"--ckpt-format {fmt} --use-distributed-optimizer")
    mains = _main_params(saved)
    for name, p in loaded.model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p.reshape(-1), mains[name]), name


def test_no_load_optim_takes_main_params_from_the_weights(tmp_path):
    saved = _saved_trainer(tmp_path, "--bf16")
    loaded = _loaded_trainer(tmp_path, "--bf16 --no-load-optim")
    mains = _main_params(loaded)
    for name, p in saved.model.named_parameters():
        assert torch.equal(mains[name], p.reshape(-1).float()), name
