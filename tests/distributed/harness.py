"""Run a function on N CPU ranks (gloo) in spawned processes and collect each rank's result."""

from __future__ import annotations

import gc
import os
import socket
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str, fn, args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:  # noqa: BLE001 - report any failure to the parent
        torch.save({"ok": False, "error": traceback.format_exc()}, os.path.join(out_dir, f"rank{rank}.pt"))
        raise
    finally:
        gc.collect()  # free what still holds the groups first (see parallel_state.destroy)
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 300.0) -> list:
    """fn(rank, world_size, *args) on every rank; returns the list of results by rank.

    A rendezvous port taken between choosing and binding it is retried once with another port.
    """
    try:
        return _run_once(fn, world_size, args, timeout)
    except AssertionError as e:
        if "address already in use" not in str(e).lower():
            raise
        return _run_once(fn, world_size, args, timeout)


def _run_once(fn, world_size: int, args: tuple, timeout: float) -> list:
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_worker, args=(world_size, free_port(), out_dir, fn, args), nprocs=world_size,
                                 join=False, start_method="spawn")
        try:
            while not ctx.join(timeout=timeout):
                pass
        except Exception:
            errors = []
            for r in range(world_size):
                path = os.path.join(out_dir, f"rank{r}.pt")
                if os.path.exists(path):
                    payload = torch.load(path, weights_only=False)
                    if not payload["ok"]:
                        errors.append(f"rank {r}:\n{payload['error']}")
            raise AssertionError("\n".join(errors) or f"a rank failed: {sys.exc_info()[1]}") from None
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)["result"]
                for r in range(world_size)]


def run_scenarios(fn, scenarios: list) -> dict:
    """Scenarios are tuples (name, world size, ...): run `fn(rank, world, scenarios_of_that_size)`
    once per world size and return {name: [each rank's result for that scenario]}."""
    results = {}
    for world in sorted({s[1] for s in scenarios}):
        chosen = [s for s in scenarios if s[1] == world]
        per_rank = run_distributed(fn, world, chosen)
        for i, scenario in enumerate(chosen):
            results[scenario[0]] = [per_rank[r][i] for r in range(world)]
    return results
