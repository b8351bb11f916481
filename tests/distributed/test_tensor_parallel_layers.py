"""Tensor-parallel collectives and layers on 2 gloo ranks equal the single-device computation.

One spawn runs every check (each rank rebuilds the unsharded reference from the same seed) and
returns {check name: max relative difference}; the tests only read that table.
"""

from __future__ import annotations

import pytest
import torch

from megatron.core.tensor_parallel import mappings
from tests.distributed.harness import run_distributed

WORLD = 2
TOL = 1e-5


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(max |b|, tiny): one number per compared pair."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _seeded(seed: int, *shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def check_mappings(group, rank: int, world: int) -> dict:
    out = {}
    ws = [_seeded(100 + r, 2, 4, 3) for r in range(world)]  # per-rank upstream weights
    w_sum = sum(ws)
    # copy: identity forward, gradient summed over ranks.
    x = _seeded(1, 2, 4, 3).requires_grad_()
    y = mappings.copy_to_tensor_parallel_region(x, group)
    (y * ws[rank]).sum().backward()
    out["copy/fwd"], out["copy/grad"] = rel_diff(y, x), rel_diff(x.grad, w_sum)
    # reduce: sum forward, gradient passed through.
    xs = [_seeded(10 + r, 2, 4, 3) for r in range(world)]
    x = xs[rank].clone().requires_grad_()
    y = mappings.reduce_from_tensor_parallel_region(x, group)
    (y * ws[rank]).sum().backward()
    out["reduce/fwd"], out["reduce/grad"] = rel_diff(y, sum(xs)), rel_diff(x.grad, ws[rank])
    for dim in (0, 1):
        full = _seeded(2, 4, 6, 3)
        x = full.chunk(world, dim)[rank].clone().requires_grad_()
        y = mappings.gather_from_sequence_parallel_region(x, group, dim)
        (y * _seeded(200 + rank, 4, 6, 3)).sum().backward()
        w_sum6 = sum(_seeded(200 + r, 4, 6, 3) for r in range(world))
        out[f"gather{dim}/fwd"] = rel_diff(y, full)
        out[f"gather{dim}/grad"] = rel_diff(x.grad, w_sum6.chunk(world, dim)[rank])
        parts = [_seeded(20 + r, 4, 6, 3) for r in range(world)]
        x = parts[rank].clone().requires_grad_()
        y = mappings.reduce_scatter_to_sequence_parallel_region(x, group, dim)
        wl = [_seeded(300 + r, 4, 6, 3).chunk(world, dim)[r] for r in range(world)]
        (y * wl[rank]).sum().backward()
        out[f"reduce_scatter{dim}/fwd"] = rel_diff(y, sum(parts).chunk(world, dim)[rank])
        out[f"reduce_scatter{dim}/grad"] = rel_diff(x.grad, torch.cat(wl, dim))
        x = full.clone().requires_grad_()
        y = mappings.scatter_to_sequence_parallel_region(x, group, dim)
        (y * wl[rank]).sum().backward()
        out[f"scatter{dim}/fwd"] = rel_diff(y, full.chunk(world, dim)[rank])
        out[f"scatter{dim}/grad"] = rel_diff(x.grad, torch.cat(wl, dim))
    return out


CHECKS = [check_mappings]


def _worker(rank: int, world: int) -> dict:
    import torch.distributed as dist

    torch.manual_seed(0)
    group = dist.new_group(list(range(world)))
    results = {}
    for check in CHECKS:
        results.update({f"{check.__name__}:{k}": v for k, v in check(group, rank, world).items()})
    return results


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_distributed(_worker, WORLD)


def _assert_close(results: list[dict], prefix: str) -> None:
    names = [k for k in results[0] if k.startswith(prefix)]
    assert names, prefix
    bad = {f"rank{r}:{k}": res[k] for r, res in enumerate(results) for k in names if not res[k] < TOL}
    assert not bad, bad


def test_mappings(results):
    _assert_close(results, "check_mappings:")


def test_identity_without_group():
    x = torch.randn(2, 4, 3, requires_grad=True)
    for fn in (mappings.copy_to_tensor_parallel_region, mappings.reduce_from_tensor_parallel_region,
               mappings.gather_from_sequence_parallel_region, mappings.reduce_scatter_to_sequence_parallel_region,
               mappings.scatter_to_sequence_parallel_region):
        assert fn(x, None) is x
