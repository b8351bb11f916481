"""Expert-load health metrics against numpy, and the collapse warning."""

import math

import numpy as np
import pytest
import torch

from megatron.core.transformer.moe import health
from megatron.training.logger import MoELayerLoad, StepResult, TrainingLogger


def np_gini(x):
    """Mean absolute difference over twice the mean (the textbook definition)."""
    x = np.asarray(x, dtype=np.float64)
    return np.abs(x[:, None] - x[None, :]).sum() / (2 * len(x) ** 2 * x.mean())


def np_entropy(p):
    p = np.asarray(p, dtype=np.float64)
    p = p / p.sum()
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum() / np.log(len(p)))


def test_uniform_load():
    x = torch.full((8,), 100.0)
    assert health.gini(x) == 0.0
    assert health.load_entropy(x) == pytest.approx(1.0)
    assert health.max_over_mean(x) == pytest.approx(1.0)


@pytest.mark.parametrize("E", [2, 4, 64])
def test_one_expert_takes_all(E):
    x = torch.zeros(E)
    x[E // 2] = 1000
    assert health.gini(x) == pytest.approx((E - 1) / E)
    assert health.load_entropy(x) == 0.0
    assert health.max_over_mean(x) == pytest.approx(E)


@pytest.mark.parametrize("seed", range(5))
def test_random_loads_match_numpy(seed):
    rng = np.random.default_rng(seed)
    E = int(rng.integers(2, 40))
    x = rng.zipf(1.5, size=E).astype(np.float64) * rng.integers(0, 2, size=E)  # skewed, some zeros
    x[0] += 1
    assert health.gini(torch.tensor(x)) == pytest.approx(np_gini(x), abs=1e-12)
    assert health.load_entropy(x) == pytest.approx(np_entropy(x), abs=1e-12)
    assert health.max_over_mean(x) == pytest.approx(x.max() / x.mean())
    h = health.layer_health(torch.tensor(x), 0.25, 0.5)
    assert set(h) == {"max_over_mean_load", "gini", "entropy", "dropped_fraction", "token_entropy"}


def test_edge_cases():
    assert math.isnan(health.gini(torch.zeros(4))) and math.isnan(health.load_entropy(torch.zeros(4)))
    assert health.load_entropy(torch.tensor([5.0])) == 1.0 and health.gini(torch.tensor([5.0])) == 0.0


def test_token_entropy_stat():
    E = 8
    uniform = torch.full((5, E), 1 / E)
    one_hot = torch.nn.functional.one_hot(torch.arange(3) % E, E).float()
    probs = torch.softmax(torch.randn(7, E), dim=-1)
    expected = np.mean([np_entropy(p) for p in probs.numpy()])
    assert health.mean_token_entropy(health.token_entropy_stat(uniform)) == pytest.approx(1.0)
    assert health.mean_token_entropy(health.token_entropy_stat(one_hot)) == 0.0
    assert health.mean_token_entropy(health.token_entropy_stat(probs)) == pytest.approx(expected, rel=1e-5)
    summed = health.token_entropy_stat(uniform) + health.token_entropy_stat(one_hot)  # sums like the counts
    assert health.mean_token_entropy(summed) == pytest.approx(5 / 8)
    assert health.mean_token_entropy(None) is None


def test_router_reports_token_entropy():
    from megatron.core.transformer.moe.router import TopKRouter
    from tests.helpers import make_config

    cfg = make_config()
    router = TopKRouter(cfg.model).train()
    x = torch.randn(32, cfg.model.hidden_size)
    out = router(x, seq_length=16)
    probs = torch.softmax(torch.nn.functional.linear(x, router.weight), dim=-1)
    expected = np.mean([np_entropy(p) for p in probs.detach().numpy()])
    assert health.mean_token_entropy(out.stats.token_entropy) == pytest.approx(expected, rel=1e-5)
    assert health.mean_token_entropy((out.stats + out.stats).token_entropy) == pytest.approx(expected, rel=1e-5)


def balanced(E=8, n=1000):
    return torch.full((E,), float(n))


def imbalanced(E=8, hot=3, n=1000):
    x = torch.full((E,), float(n))
    x[hot] = 6 * n  # 6 / (13 / 8) = 3.7x the mean
    return x


def test_collapse_warning_fires_once_per_episode():
    m = health.CollapseMonitor()
    warned = [m.update(2, imbalanced(), iteration=10 * i) for i in range(1, 9)]
    assert [len(w) for w in warned] == [0, 0, 0, 1, 0, 0, 0, 0]
    (line,) = warned[3]
    assert "\n" not in line and line.startswith("expert 3 of layer 2 has had > 3x the mean load for 4 log intervals")
    m.update(2, balanced())  # recovered: the next episode warns again
    assert [len(m.update(2, imbalanced())) for _ in range(4)] == [0, 0, 0, 1]


def test_collapse_warning_silent_when_balanced_or_brief():
    m = health.CollapseMonitor()
    rng = np.random.default_rng(0)
    for i in range(50):
        assert m.update(0, torch.tensor(rng.poisson(1000, size=8), dtype=torch.float)) == []
        assert m.update(1, imbalanced() if i % 4 == 0 else balanced()) == []  # never 4 in a row


def test_dead_expert_warning():
    m = health.CollapseMonitor(intervals=2)
    x = balanced()
    x[5] = 0
    assert m.update(1, x) == []
    (line,) = m.update(1, x)
    assert line.startswith("expert 5 of layer 1 received no tokens for 2 log intervals")


def _step(loads):
    return StepResult(1.0, {}, loads, 1.0, 1e-3, None, False, False)


def test_logger_warns_on_forced_imbalance_and_not_on_balanced(capsys):
    logger = TrainingLogger(True, 100, 1, 4, 16, 1.0, 1, torch.device("cpu"))
    for it in range(1, 7):
        logger.record(_step([MoELayerLoad(balanced(), 0.0, 0), MoELayerLoad(imbalanced(hot=6), 0.0, 3)]))
        logger.maybe_log(it, it * 4, _step([]), 1.0, it)
    out = capsys.readouterr()
    warnings = [line for line in out.err.splitlines() if line.startswith("WARNING")]
    assert warnings == [line for line in warnings if "expert 6 of layer 3 has had > 3x the mean load" in line]
    assert len(warnings) == 1
    assert f"expert load max/mean: 3.692 (layer 3) | expert load gini: {np_gini(imbalanced(hot=6)):.3f} |" in out.out


def test_logger_writes_health_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TrainingLogger(True, 2, 2, 4, 16, 1.0, 1, torch.device("cpu"), str(tmp_path))
    for it, x in ((1, balanced()), (2, imbalanced())):  # averaged over the interval's steps
        logger.record(_step([MoELayerLoad(x, 0.1 * it, 1, token_entropy=0.5)]))
        logger.maybe_log(it, it * 4, _step([]), 1.0, it)
    logger.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    value = lambda tag: events.Scalars(f"moe/layer_01/{tag}")[-1].value  # noqa: E731
    assert value("gini") == pytest.approx((0 + health.gini(imbalanced())) / 2, rel=1e-6)
    assert value("entropy") == pytest.approx((1 + health.load_entropy(imbalanced())) / 2, rel=1e-6)
    assert value("max_over_mean_load") == pytest.approx((1 + health.max_over_mean(imbalanced())) / 2, rel=1e-6)
    assert value("dropped_fraction") == pytest.approx(0.15, rel=1e-6)
    assert value("token_entropy") == pytest.approx(0.5)
    assert value("tokens_per_expert/expert_003") == pytest.approx(3500)
