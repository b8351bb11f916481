"""End-to-end training runs on mock data: the loss falls, runs repeat bit for bit, resume is exact."""

import re

import pytest

from megatron.training.train import Trainer, pretrain
from megatron.core.parallel_state import ProcessGroups
from megatron.training.data import build_datasets, build_loader, micro_batches
from tests.helpers import make_config

LOSS = re.compile(r"iteration\s+(\d+)/.*?\| lm loss: ([0-9.E+-]+) \|")


def losses_from(output: str) -> dict[int, str]:
    return {int(i): v for i, v in LOSS.findall(output)}


def run_steps(cfg, steps):
    groups = ProcessGroups()
    trainer = Trainer(cfg, groups)
    train_ds, _, _ = build_datasets(cfg)
    batches = micro_batches(build_loader(train_ds, cfg, groups), groups.device)
    out = []
    for _ in range(steps):
        result = trainer.train_step([next(batches) for _ in range(cfg.num_microbatches)])
        out.append(result)
    return trainer, out


def test_loss_falls_on_mock_data():
    cfg = make_config("--train-iters 30 --lr 1e-2 --vocab-size 32 --seq-length 32 --max-position-embeddings 32 "
                      "--global-batch-size 8")
    _, results = run_steps(cfg, 30)
    first, last = results[0].lm_loss, sum(r.lm_loss for r in results[-5:]) / 5
    assert first > 3.0 and last < first - 1.0, (first, last)
    # Logged as Megatron-LM logs it: without the coefficient, so about 1 near balance.
    assert all(abs(r.aux_losses["load_balancing_loss"] - 1.0) < 0.5 for r in results)


def test_runs_are_bitwise_reproducible():
    cfg = make_config("--hidden-dropout 0.1 --attention-dropout 0.1 --moe-input-jitter-eps 0.01")
    _, a = run_steps(cfg, 3)
    _, b = run_steps(cfg, 3)
    assert [r.lm_loss for r in a] == [r.lm_loss for r in b]
    assert [r.grad_norm for r in a] == [r.grad_norm for r in b]


def test_gradient_accumulation_matches_one_big_micro_batch():
    """4 micro-batches of 1 equal 1 micro-batch of 4 (dense model: per-token losses, no routing effects)."""
    dense = "--num-experts 1 --moe-router-topk 1 --moe-router-pre-softmax --moe-aux-loss-coeff 0 --global-batch-size 4"
    _, acc = run_steps(make_config(dense + " --micro-batch-size 1"), 2)
    _, big = run_steps(make_config(dense + " --micro-batch-size 4"), 2)
    for a, b in zip(acc, big):
        assert a.lm_loss == pytest.approx(b.lm_loss, rel=1e-5)
        assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-4)


@pytest.mark.parametrize("extra", ["--ckpt-format torch", "--ckpt-format torch_dist --bf16",
                                   "--ckpt-format torch --bf16 --use-distributed-optimizer --overlap-grad-reduce",
                                   "--ckpt-format torch_dist --async-save --fp16"])
def test_exact_resume(tmp_path, capsys, extra):
    common = (f"--train-iters 6 --hidden-dropout 0.1 --moe-router-enable-expert-bias "
              f"--moe-router-score-function sigmoid --lr-warmup-iters 2 --lr-decay-style cosine {extra}")
    pretrain(make_config(common))
    full = losses_from(capsys.readouterr().out)
    save = tmp_path / "ckpt"
    pretrain(make_config(common + f" --save {save} --exit-interval 3"))
    first = losses_from(capsys.readouterr().out)
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "3"
    if "torch_dist" in extra:
        assert (save / "iter_0000003" / ".metadata").is_file()
    else:
        assert (save / "iter_0000003" / "mp_rank_00" / "model_optim_rng.pt").is_file()
    pretrain(make_config(common + f" --load {save}"))
    resumed = losses_from(capsys.readouterr().out)
    assert sorted(first) == [1, 2, 3] and sorted(resumed) == [4, 5, 6]
    assert {**first, **resumed} == full  # identical printed losses (bf16/fp16: from the fp32 main params)


def test_missing_load_directory_starts_fresh_with_warning(tmp_path, capsys):
    with pytest.warns(UserWarning, match="starting from random"):
        state = pretrain(make_config(f"--train-iters 1 --load {tmp_path / 'none'} --ckpt-format torch"))
    assert state.iteration == 1


def test_finetune_loads_weights_only(tmp_path, capsys):
    save = tmp_path / "ckpt"
    pretrain(make_config(f"--train-iters 2 --save {save} --ckpt-format torch"))
    state = pretrain(make_config(f"--train-iters 1 --load {save} --finetune --ckpt-format torch"))
    assert state.iteration == 1  # started again from 0


def test_tensorboard_scalars_include_per_layer_expert_load(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = tmp_path / "tb"
    pretrain(make_config(f"--train-iters 2 --tensorboard-dir {tb} --moe-expert-capacity-factor 1.0 "
                         f"--eval-iters 1 --eval-interval 2 --moe-per-layer-logging --moe-z-loss-coeff 1e-3"))
    out = capsys.readouterr().out
    per_layer = [line for line in out.splitlines() if line.startswith("   moe layer")]
    assert len(per_layer) == 2 * 2 and "load_balancing_loss" in per_layer[0] and "z_loss" in per_layer[0]
    events = EventAccumulator(str(tb))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("lm loss", "learning-rate", "grad-norm", "load_balancing_loss", "lm loss validation",
                "moe/layer_00/max_over_mean_load", "moe/layer_01/dropped_fraction",
                "moe/layer_00/tokens_per_expert/expert_003", "z_loss",
                "moe/load_balancing_loss_layer_0", "moe/z_loss_layer_1"):
        assert tag in tags, tag
    counts = [events.Scalars(f"moe/layer_00/tokens_per_expert/expert_{e:03d}")[-1].value for e in range(4)]
    assert sum(counts) == pytest.approx(4 * 16 * 2)  # tokens per micro-batch x micro-batches x top-k


def test_exact_resume_noisy_topk(tmp_path, capsys):
    """Noisy top-k draws its noise from the training loop's iteration: a resumed run draws what
    the uninterrupted run drew."""
    common = "--train-iters 6 --moe-router-type noisy_topk --moe-aux-loss-coeff 1e-2 --lr-warmup-iters 2"
    pretrain(make_config(common))
    full = losses_from(capsys.readouterr().out)
    save = tmp_path / "ckpt"
    pretrain(make_config(common + f" --save {save} --exit-interval 3"))
    first = losses_from(capsys.readouterr().out)
    pretrain(make_config(common + f" --load {save}"))
    resumed = losses_from(capsys.readouterr().out)
    assert {**first, **resumed} == full
