"""tools/estimate.py's memory model against the measured peak of a training step (benchmarks/memory_model.py).

The tracker is checked on known allocations first; then two layouts on 2 gloo ranks (EP = 2 with
the all-to-all dispatcher, and T = 2 with sequence parallelism) train a tiny MoE with the real
Trainer, and every rank's peak of live tensor bytes must be within 15% of `stage_memory`'s total.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.memory_model import EP2, LiveBytes, run

SIZE = dict(layers=2, hidden=128, ffn=256, experts=4, seq=128, mbs=2, vocab=2048)


def test_tracker_counts_each_storage_once_until_freed():
    tracker = LiveBytes()
    with tracker:
        a = torch.empty(1000)                      # 4000 B
        view = a[10:20]
        del a
        assert tracker.live == 4000                # the view keeps the storage
        del view
        assert tracker.live == 0
        b = torch.ones(64, 64)                     # 16 KiB
        c = b @ b                                  # 16 KiB more
        assert tracker.live == 2 * 16384
        del b, c
        assert tracker.live == 0 and tracker.peak == 2 * 16384
        x = torch.ones(100, requires_grad=True)   # 400 B, labelled "other"
        with tracker.saved_hooks():
            y = x.exp().sum()                      # exp's output is saved for backward
        assert tracker.by_label["saved"] == 400
        y.backward()
        assert tracker.by_label["saved"] == 0     # released with the graph
        tracker.reset_peak()
        assert tracker.peak == tracker.live


@pytest.mark.timeout(120)
def test_measured_peak_is_within_15_percent_of_the_estimate():
    layouts = [("ep2", 2, EP2),
               ("tp2-sp", 2, "--tensor-model-parallel-size 2 --sequence-parallel --expert-tensor-parallel-size 1")]
    rows = run(layouts, SIZE, microbatches=2, warmup=1)
    assert len(rows) == 4
    for name, rank, r in rows:
        assert r["state"] == pytest.approx(r["e_state"], rel=0.01), (name, rank)  # parameters, grads, AdamW
        assert r["act"] > 0.2 * r["total"], (name, rank)   # activations are a real share of the peak
        assert abs(r["ratio"] - 1) < 0.15, (name, rank, r["ratio"])
