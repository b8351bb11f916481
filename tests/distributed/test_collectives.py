"""Differentiable exchanges, the global aux loss and hang reporting on CPU gloo ranks."""

from __future__ import annotations

import datetime
import time

import torch
import torch.distributed as dist

from megatron.core.parallel_state import CollectiveTimeout, ProcessGroups, report_hangs
from megatron.core.tensor_parallel.mappings import gather_rows_uneven, reduce_scatter_rows_uneven
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.token_dispatcher import all_to_all
from tests.distributed.harness import run_distributed
from tests.helpers import make_config


def _all_to_all_worker(rank: int, world: int) -> dict:
    # Rank r sends (r + j) % 3 rows to rank j: uneven, with some empty sends.
    send = [(rank + j) % 3 for j in range(world)]
    recv = [(j + rank) % 3 for j in range(world)]
    x = torch.arange(sum(send) * 2, dtype=torch.float32).view(-1, 2).add(100 * rank).requires_grad_()
    y = all_to_all(x, recv, send, None)
    weight = torch.arange(y.numel(), dtype=torch.float32).view_as(y) + rank
    (y * weight).sum().backward()
    return {"x": x.detach(), "y": y.detach(), "grad": x.grad, "weight": weight, "send": send, "recv": recv}


def test_all_to_all_uneven_splits_forward_and_backward():
    res = run_distributed(_all_to_all_worker, 3)
    for r in range(3):
        # Forward: rank r receives block r of every source's send buffer, in source order.
        expected = []
        for src in range(3):
            splits = res[src]["send"]
            start = sum(splits[:r])
            expected.append(res[src]["x"][start:start + splits[r]])
        torch.testing.assert_close(res[r]["y"], torch.cat(expected))
        # Backward: d(sum y*w)/dx is the weight that met each row on its destination.
        grads = []
        for dst in range(3):
            start = sum(res[dst]["recv"][:r])
            grads.append(res[dst]["weight"][start:start + res[dst]["recv"][r]])
        torch.testing.assert_close(res[r]["grad"], torch.cat(grads))


def _uneven_rows_worker(rank: int, world: int) -> dict:
    out = {}
    for case, sizes in {"uneven": [2, 0, 3], "all-empty": [0, 0, 0]}.items():
        x = torch.arange(sizes[rank] * 2, dtype=torch.float32).view(-1, 2).add(100 * rank).requires_grad_()
        gathered = gather_rows_uneven(x, dist.group.WORLD, sizes)
        weight = torch.arange(gathered.numel(), dtype=torch.float32).view_as(gathered) * (rank + 1)
        (gathered * weight).sum().backward()
        partial = (torch.arange(sum(sizes) * 2, dtype=torch.float32).view(-1, 2) * (rank + 1)).requires_grad_()
        mine = reduce_scatter_rows_uneven(partial, dist.group.WORLD, sizes)
        mine_weight = torch.full_like(mine, float(rank + 1))
        (mine * mine_weight).sum().backward()
        out[case] = dict(x=x.detach(), gathered=gathered.detach(), x_grad=x.grad, weight=weight, mine=mine.detach(),
                         partial_grad=partial.grad, mine_weight=mine_weight, sizes=sizes)
    return out


def test_uneven_gather_and_reduce_scatter_forward_and_backward():
    """gather_rows_uneven concatenates blocks of different sizes (empty ones too) in rank order and
    its backward sums the gradient over ranks; reduce_scatter_rows_uneven is its mirror."""
    res = run_distributed(_uneven_rows_worker, 3)
    for case in ("uneven", "all-empty"):
        sizes = res[0][case]["sizes"]
        starts = [sum(sizes[:r]) for r in range(3)]
        every = torch.cat([res[r][case]["x"] for r in range(3)])
        weight_sum = sum(res[r][case]["weight"] for r in range(3))
        grad_sum = torch.cat([res[r][case]["mine_weight"] for r in range(3)])
        for r in range(3):
            got = res[r][case]
            torch.testing.assert_close(got["gathered"], every)
            torch.testing.assert_close(got["x_grad"], weight_sum[starts[r]:starts[r] + sizes[r]])
            whole = torch.arange(sum(sizes) * 2, dtype=torch.float32).view(-1, 2) * 6  # (1 + 2 + 3)
            torch.testing.assert_close(got["mine"], whole[starts[r]:starts[r] + sizes[r]])
            torch.testing.assert_close(got["partial_grad"], grad_sum)


def _global_aux_worker(rank: int, world: int) -> dict:
    cfg = make_config("--num-experts 4 --moe-router-topk 2 --moe-aux-loss-coeff 0.1 "
                      "--moe-router-load-balancing-type global_aux_loss", world_size=world)
    torch.manual_seed(0)
    router = TopKRouter(cfg.model, dp_group=dist.group.WORLD).train()
    torch.manual_seed(100 + rank)
    x = torch.randn(12, 32)
    out = router(x, seq_length=12)
    return {"x": x, "weight": router.weight.detach(), "loss": out.stats.load_balancing_loss,
            "idx": out.expert_idx_TK}


def test_global_aux_loss_uses_counts_summed_over_data_parallel_ranks():
    """Megatron-Core's global aux loss: counts summed over ranks, and each rank's loss its share of
    E * sum_e f_e * P_e over all 24 tokens, so the shares add up to the loss of the whole batch."""
    res = run_distributed(_global_aux_worker, 2)
    counts = sum(torch.bincount(r["idx"].flatten(), minlength=4) for r in res).float()
    f = counts / (24 * 2)
    for r in res:
        probs = torch.softmax(r["x"] @ r["weight"].t(), -1)
        torch.testing.assert_close(r["loss"], 4 * (f * probs.sum(0) / 24).sum())
    probs_all = torch.cat([torch.softmax(r["x"] @ r["weight"].t(), -1) for r in res])
    torch.testing.assert_close(res[0]["loss"] + res[1]["loss"], 4 * (f * probs_all.mean(0)).sum())
    assert not torch.allclose(res[0]["loss"], res[1]["loss"])  # each rank's own probabilities


def _hang_worker(rank: int, world: int) -> str:
    group = dist.new_group(timeout=datetime.timedelta(seconds=2))
    if rank == 1:
        time.sleep(5)  # never joins the all-reduce
        return "slept"
    try:
        with report_hangs(ProcessGroups(rank=rank, world_size=world), 2 / 60):
            dist.all_reduce(torch.ones(1), group=group)
    except CollectiveTimeout as e:
        return str(e)
    return "no error"


def test_collective_timeout_names_the_rank():
    res = run_distributed(_hang_worker, 2)
    assert res[0].startswith("rank 0 of 2: a collective did not finish"), res[0]
    assert "--distributed-timeout-minutes" in res[0]
    assert "timed out: rank 0; did not time out, so probably hung or crashed: rank 1" in res[0], res[0]
