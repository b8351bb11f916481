"""Process groups of one run, all cut from one rank layout, held in an object passed around.

Megatron's rank order, tensor-parallel ranks innermost and pipeline stages outermost. The
world's ranks, arange(world), are viewed two ways ("MoE parallel folding"):

    dense layers:  (P, DP, T)              dims ("pp", "dp", "tp")
    experts:       (P, EDP, EP, ETP)       dims ("pp", "expert_dp", "ep", "etp")

so a stage's S = world / P ranks split as DP x T for attention and dense FFNs and, independently,
as EDP x EP x ETP for the experts: with ETP = 1 the expert-parallel group can span the
tensor-parallel ranks, and with ETP = T (Megatron-Core's default) it strides over them. Both
views are DeviceMeshes over the same ranks in the same order; every group below is one of their
dimensions or a flattening of adjacent ones. Tensor- and expert-parallel groups are runs of
consecutive ranks, so that they stay inside a node where they can; the pipeline group joins the
ranks at the same place in every stage.

No module-level state: `initialize` returns a `ProcessGroups`, and code that needs a group
receives it as an argument.
"""

from __future__ import annotations

import datetime
import gc
import os
import re
import time
from dataclasses import dataclass, field, fields
from typing import Optional

import torch
import torch.distributed as dist

from megatron.core.config import ParallelConfig


@dataclass
class LaunchEnv:
    """Rank layout from the launcher: torchrun's variables, else slurm's (srun without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def launch_env(environ: Optional[dict] = None) -> LaunchEnv:
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env:
        return LaunchEnv(int(env.get("RANK", 0)), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_NTASKS" in env and "SLURM_PROCID" in env:
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return LaunchEnv()


def _export_slurm_rendezvous(env: LaunchEnv) -> None:
    """Under plain srun, point torch's env:// rendezvous at the first node of the allocation."""
    os.environ.setdefault("RANK", str(env.rank))
    os.environ.setdefault("WORLD_SIZE", str(env.world_size))
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    if "MASTER_ADDR" not in os.environ:
        nodelist = os.environ.get("SLURM_JOB_NODELIST", os.environ.get("SLURM_NODELIST", "localhost"))
        os.environ["MASTER_ADDR"] = first_slurm_host(nodelist)
    os.environ.setdefault("MASTER_PORT", "29500")


def first_slurm_host(nodelist: str) -> str:
    """'gpu[012-015,020],cpu1' -> 'gpu012'."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        return nodelist
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


@dataclass
class ProcessGroups:
    """Who this rank is and the groups it talks over. Groups are None in a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: Optional[str] = None
    mesh: Optional[object] = None
    """This rank's stage of the expert mesh, dims ("expert_dp", "ep", "etp"): experts are
    sharded over "ep" (and their FFN width over "etp")."""
    dense_mesh: Optional[object] = None
    """This rank's stage of the dense mesh, dims ("dp", "tp")."""
    dp: Optional[dist.ProcessGroup] = None
    """Data-parallel group of the dense (non-expert) parameters: ranks of one stage with the
    same tensor-parallel rank."""
    tp: Optional[dist.ProcessGroup] = None
    """Tensor-parallel group: ranks splitting attention, dense FFNs and the vocabulary, and (with
    sequence parallelism) holding consecutive shards of the same sequences."""
    tp_dp: Optional[dist.ProcessGroup] = None
    """All ranks of this rank's pipeline stage (tensor x data parallel)."""
    ep: Optional[dist.ProcessGroup] = None
    """Expert-parallel group: ranks that split one MoE layer's experts between them."""
    etp: Optional[dist.ProcessGroup] = None
    """Expert-tensor-parallel group: ranks splitting each local expert's FFN width."""
    ep_etp: Optional[dist.ProcessGroup] = None
    """Expert-parallel x expert-tensor-parallel group: the ranks holding different expert weights."""
    expert_dp: Optional[dist.ProcessGroup] = None
    """Expert-data-parallel group: ranks holding replicas of the same experts."""
    pp: Optional[dist.ProcessGroup] = None
    """Pipeline group: one rank of every stage, in stage order (None without pipelining)."""
    embedding: Optional[dist.ProcessGroup] = None
    """First and last pipeline rank of this rank's pipeline group, which both hold the word
    embedding when input and output weights are tied (None without pipelining)."""

    @property
    def dp_size(self) -> int:
        return _size(self.dp)

    @property
    def dp_rank(self) -> int:
        return _rank(self.dp)

    @property
    def tp_size(self) -> int:
        return _size(self.tp)

    @property
    def tp_rank(self) -> int:
        return _rank(self.tp)

    @property
    def etp_size(self) -> int:
        return _size(self.etp)

    @property
    def ep_size(self) -> int:
        return _size(self.ep)

    @property
    def ep_rank(self) -> int:
        return _rank(self.ep)

    @property
    def expert_dp_size(self) -> int:
        return _size(self.expert_dp)

    @property
    def pp_size(self) -> int:
        return _size(self.pp)

    @property
    def pp_rank(self) -> int:
        return _rank(self.pp)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def default_device(backend: Optional[str], local_rank: int) -> torch.device:
    if backend == "gloo" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def initialize(parallel: ParallelConfig) -> ProcessGroups:
    """Start torch.distributed (when world size > 1) and cut the groups from one DeviceMesh."""
    env = launch_env()
    if env.world_size == 1 and not dist.is_initialized():
        backend = parallel.distributed_backend
        return ProcessGroups(device=default_device(backend, 0), backend=backend)
    backend = parallel.distributed_backend or ("nccl" if torch.cuda.is_available() else "gloo")
    device = default_device(backend, env.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(minutes=parallel.distributed_timeout_minutes)
    if not dist.is_initialized():
        _export_slurm_rendezvous(env)
        _init_process_group(backend, timeout)
    return groups_from_mesh(parallel.expert_model_parallel_size, device, backend,
                            parallel.pipeline_model_parallel_size, parallel.tensor_model_parallel_size,
                            parallel.expert_tensor_parallel_size, timeout)


def _init_process_group(backend: str, timeout: datetime.timedelta) -> None:
    """init_process_group over env://, its keys under a prefix of their own per worker-group
    restart when one torchrun agent restarts its workers: the agent keeps one TCPStore for all
    its restarts, and without the prefix a restarted rank can read a dead rank's address (or
    NCCL id) from the previous attempt and fail to connect ("Gloo connectFullMesh failed ...
    Connection refused") or hang. With several agents (nodes) their restart counts can differ
    (a membership change does not count), so there torch's own switch applies: export
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun for a fresh store per restart."""
    restart = restart_prefix()
    if restart is None:
        dist.init_process_group(backend, timeout=timeout)
        return
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    store.set_timeout(timeout)
    dist.init_process_group(backend, store=dist.PrefixStore(restart, store), rank=rank, world_size=world_size,
                            timeout=timeout)


def restart_prefix(environ: Optional[dict] = None) -> Optional[str]:
    """'restart_N' for the N-th restart of a single torchrun agent's workers sharing its store; else None."""
    env = os.environ if environ is None else environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or env.get("GROUP_WORLD_SIZE") != "1":
        return None
    return f"restart_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def groups_from_mesh(ep_size: int, device: torch.device, backend: Optional[str] = None,
                     pp_size: int = 1, tp_size: int = 1, etp_size: Optional[int] = None,
                     timeout: Optional[datetime.timedelta] = None) -> ProcessGroups:
    """ProcessGroups for an initialised default group: the dense ("pp", "dp", "tp") and expert
    ("pp", "expert_dp", "ep", "etp") views of the same ranks (module docstring). `etp_size`
    defaults to `tp_size`, as Megatron-Core's --expert-tensor-parallel-size does. `timeout`
    (--distributed-timeout-minutes) is given to every group; without it they keep torch's default."""
    from torch.distributed.device_mesh import DeviceMesh

    etp_size = tp_size if etp_size is None else etp_size
    world, rank = dist.get_world_size(), dist.get_rank()
    stage = world // pp_size
    ranks = torch.arange(world)
    dense = DeviceMesh(device.type, ranks.view(pp_size, stage // tp_size, tp_size), mesh_dim_names=("pp", "dp", "tp"))
    experts = DeviceMesh(device.type, ranks.view(pp_size, stage // (ep_size * etp_size), ep_size, etp_size),
                         mesh_dim_names=("pp", "expert_dp", "ep", "etp"))
    dense_stage = dense["dp", "tp"]
    expert_stage = experts["expert_dp", "ep", "etp"]
    groups = ProcessGroups(
        rank=rank,
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        device=device,
        backend=backend,
        mesh=expert_stage,
        dense_mesh=dense_stage,
        dp=dense["dp"].get_group(),
        tp=dense["tp"].get_group(),
        tp_dp=dense_stage._flatten("tp_dp").get_group(),
        ep=experts["ep"].get_group(),
        etp=experts["etp"].get_group(),
        ep_etp=experts["ep", "etp"]._flatten("ep_etp").get_group(),
        expert_dp=experts["expert_dp"].get_group(),
        pp=dense["pp"].get_group() if pp_size > 1 else None,
        embedding=_embedding_group(dense.mesh, timeout) if pp_size > 1 else None,
    )
    if timeout is not None:
        set_timeout(groups, timeout)
    return groups


def set_timeout(groups: ProcessGroups, timeout: datetime.timedelta) -> None:
    """Give every group of `groups` the collective timeout `timeout`. DeviceMesh creates its
    groups with torch's default (30 min for gloo, 10 for nccl), not the default group's timeout
    that init_process_group got, so without this --distributed-timeout-minutes would not apply
    to the expert all-to-all or the gradient reductions."""
    for f in fields(groups):
        group = getattr(groups, f.name)
        if isinstance(group, dist.ProcessGroup):
            dist.distributed_c10d._set_pg_timeout(timeout, group)


def _embedding_group(ranks_PXE: torch.Tensor, timeout: Optional[datetime.timedelta] = None) -> dist.ProcessGroup:
    """This rank's {first stage, last stage} group; every rank creates every such group, in order."""
    mine = None
    for column in ranks_PXE.flatten(1).t().tolist():
        group = dist.new_group(sorted({column[0], column[-1]}), timeout=timeout)
        if dist.get_rank() in column:
            mine = group
    return mine


def destroy(groups: ProcessGroups) -> None:
    """Destroy the process groups, after collecting the reference cycles (a trainer's gradient
    hooks) that still hold them: a gloo group freed only during interpreter shutdown can abort
    the process ("terminate called without an active exception", seen in about 1 of 7 CPU runs)."""
    if groups.world_size > 1 and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


class CollectiveTimeout(RuntimeError):
    """A collective did not complete in time: some rank crashed, hung or diverged."""


_TIMEOUT_MARKERS = ("timed out", "timeout", "watchdog caught collective operation")


def is_timeout(error: BaseException) -> bool:
    text = str(error).lower()
    return any(marker in text for marker in _TIMEOUT_MARKERS)


class report_hangs:
    """Context manager: a collective timeout becomes one clear error naming this rank, the ranks
    that timed out with it and those that did not (the suspects: hung or crashed)."""

    def __init__(self, groups: ProcessGroups, timeout_minutes: float):
        self.groups = groups
        self.timeout_minutes = timeout_minutes

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is not None and not isinstance(exc, CollectiveTimeout) and is_timeout(exc):
            wait_s = min(5.0, self.timeout_minutes * 30)
            raise CollectiveTimeout(
                f"rank {self.groups.rank} of {self.groups.world_size}: a collective did not finish within "
                f"{self.timeout_minutes:g} min (--distributed-timeout-minutes); "
                f"{_suspects(self.groups.world_size, timed_out_ranks(self.groups, wait_s))}. "
                f"Cause: {str(exc).splitlines()[0]}"
            ) from exc
        return False


_TIMED_OUT_KEY = "megatron/timed_out_ranks"


def timed_out_ranks(groups: ProcessGroups, wait_s: float) -> Optional[list[int]]:
    """The ranks that reported a timed-out collective in the default group's store, this one
    included, waiting up to `wait_s` seconds for all but one rank to report; None when the store
    cannot be reached (it may have gone with a dead rank 0)."""
    if groups.world_size == 1 or not dist.is_initialized():
        return None
    try:
        store = dist.distributed_c10d._get_default_store()
        store.append(_TIMED_OUT_KEY, f"{groups.rank},")
        deadline = time.monotonic() + wait_s
        while True:
            ranks = sorted({int(r) for r in store.get(_TIMED_OUT_KEY).decode().split(",") if r})
            if len(ranks) >= groups.world_size - 1 or time.monotonic() >= deadline:
                return ranks
            time.sleep(0.1)
    except Exception:  # noqa: BLE001 - any store failure: report without the other ranks
        return None


def _suspects(world_size: int, timed_out: Optional[list[int]]) -> str:
    if timed_out is None:
        return ("another rank has probably crashed, hung or run different collectives: the ranks that print "
                "this error waited for it, check the log of one that does not")
    others = [r for r in range(world_size) if r not in timed_out]
    if not others:
        return "every rank timed out: they probably ran different collectives"
    return (f"timed out: {_rank_list(timed_out)}; did not time out, so probably hung or crashed: "
            f"{_rank_list(others)} (check {'its log' if len(others) == 1 else 'their logs'})")


def _rank_list(ranks: list[int], most: int = 8) -> str:
    """'rank 2', 'ranks 0, 1, 3', or the first `most` and how many in all."""
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    shown = ", ".join(map(str, ranks[:most]))
    return f"ranks {shown}" if len(ranks) <= most else f"ranks {shown}, ... ({len(ranks)} in all)"
