"""Process groups of one run, all cut from one DeviceMesh, held in an object passed around.

Mesh layout (TP = 1 for now): shape (P, world / (P * EP), EP) with dims ("pp",
"expert_dp", "ep"), Megatron's rank order with pipeline stages outermost. Expert-parallel
groups are runs of consecutive ranks, so that EP stays inside a node where it can; the
expert-data-parallel group joins the ranks of one stage holding the same experts; the
data-parallel group of the dense parameters is one stage's ranks (the inner two dims,
flattened); the pipeline group joins the ranks at the same place in every stage.

No module-level state: `initialize` returns a `ProcessGroups`, and code that needs a group
receives it as an argument.
"""

from __future__ import annotations

import datetime
import gc
import os
import re
from dataclasses import dataclass, field
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
    """This rank's stage of the mesh, dims ("expert_dp", "ep"): experts are sharded over it."""
    dp: Optional[dist.ProcessGroup] = None
    """Data-parallel group of the dense (non-expert) parameters: one stage's ranks (TP = 1)."""
    ep: Optional[dist.ProcessGroup] = None
    """Expert-parallel group: ranks that split one MoE layer's experts between them."""
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
    if not dist.is_initialized():
        _export_slurm_rendezvous(env)
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=parallel.distributed_timeout_minutes))
    return groups_from_mesh(parallel.expert_model_parallel_size, device, backend,
                            parallel.pipeline_model_parallel_size)


def groups_from_mesh(ep_size: int, device: torch.device, backend: Optional[str] = None,
                     pp_size: int = 1) -> ProcessGroups:
    """ProcessGroups for an initialised default group, from a ("pp", "expert_dp", "ep") DeviceMesh."""
    from torch.distributed.device_mesh import init_device_mesh

    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh(device.type, (pp_size, world // (pp_size * ep_size), ep_size),
                            mesh_dim_names=("pp", "expert_dp", "ep"))
    stage_mesh = mesh["expert_dp", "ep"]  # this rank's stage: where experts are sharded
    dp_mesh = stage_mesh._flatten("dp")
    return ProcessGroups(
        rank=rank,
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        device=device,
        backend=backend,
        mesh=stage_mesh,
        dp=dp_mesh.get_group(),
        ep=mesh["ep"].get_group(),
        expert_dp=mesh["expert_dp"].get_group(),
        pp=mesh["pp"].get_group() if pp_size > 1 else None,
        embedding=_embedding_group(mesh.mesh) if pp_size > 1 else None,
    )


def _embedding_group(ranks_PXE: torch.Tensor) -> dist.ProcessGroup:
    """This rank's {first stage, last stage} group; every rank creates every such group, in order."""
    mine = None
    for column in ranks_PXE.flatten(1).t().tolist():
        group = dist.new_group(sorted({column[0], column[-1]}))
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
    """Context manager: a collective timeout becomes one clear error naming this rank."""

    def __init__(self, groups: ProcessGroups, timeout_minutes: float):
        self.groups = groups
        self.timeout_minutes = timeout_minutes

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is not None and not isinstance(exc, CollectiveTimeout) and is_timeout(exc):
            raise CollectiveTimeout(
                f"rank {self.groups.rank} of {self.groups.world_size}: a collective did not finish within "
                f"{self.timeout_minutes:g} min (--distributed-timeout-minutes); another rank has probably "
                f"crashed, hung or run different collectives; check its log. Cause: {str(exc).splitlines()[0]}"
            ) from exc
        return False
