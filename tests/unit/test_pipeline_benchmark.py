"""The pure helpers of benchmarks/pipeline.py: bubble theory and measurement, scenario flags, saved-bytes counter."""

from __future__ import annotations

import pytest
import torch

from benchmarks.pipeline import SavedBytes, flags_for, make_config, measured_bubble, theory_bubble


def test_theory_bubble():
    assert theory_bubble(2, 1, 2) == pytest.approx(1 / 3)
    assert theory_bubble(2, 1, 8) == pytest.approx(1 / 9)
    assert theory_bubble(2, 2, 8) == pytest.approx(1 / 17)
    assert theory_bubble(4, 1, 4) == pytest.approx(3 / 7)
    assert theory_bubble(1, 1, 4) == 0.0


def test_measured_bubble():
    assert measured_bubble(0.8, 1.0) == pytest.approx(0.2)
    assert measured_bubble(1.0, 1.0) == 0.0


class _Args:
    layers, hidden, ffn, seq, vocab, experts, mbs, pp = 8, 64, 128, 32, 128, 4, 2, 2


def test_flags_give_the_scenario():
    cfg = make_config(flags_for(_Args, 4, 2), world=2)
    assert cfg.num_microbatches == 4
    layout = cfg.parallel.pipeline_layout(cfg.model.num_layers)
    assert (layout.num_stages, layout.num_chunks) == (2, 2)
    plain = make_config(flags_for(_Args, 8, 1), world=2)
    assert plain.num_microbatches == 8
    assert plain.parallel.pipeline_layout(8).num_chunks == 1


def test_saved_bytes_counts_each_storage_once_and_releases():
    w = torch.randn(16, 16, requires_grad=True)
    counter = SavedBytes(exclude={w.untyped_storage().data_ptr()})
    x = torch.randn(8, 16, requires_grad=True)
    with counter.hooks():
        h = x * 2.0               # saves nothing that needs a graph tensor (scalar)
        y = (h @ w).relu()        # saves h (w excluded) and the relu output
        z = (h * h).sum()         # saves h twice more: counted once
    nbytes = 8 * 16 * 4
    assert counter.live == 2 * nbytes
    (y.sum() + z).backward()
    del y, z
    assert counter.live == 0
    assert counter.peak == 2 * nbytes
