"""Process-group setup for one process per rank, whoever launched it.

torchrun sets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT. mpiexec sets PMI_RANK / PMI_SIZE /
PMI_LOCAL_RANK (Cray MPICH + PALS on Polaris, which also sets PALS_LOCAL_RANKID), PMI_RANK / PMI_SIZE /
MPI_LOCALRANKID (MPICH's Hydra mpiexec, e.g. Debian's mpich: no PMI_LOCAL_RANK) or OMPI_COMM_WORLD_* (Open MPI),
but no rendezvous address, so the master is the first host of $PARSL_MPI_NODELIST (the task's nodes under
Parsl's MPIExecutor), else of $PBS_NODEFILE, else 127.0.0.1; the port is MASTER_PORT (else 29500). srun without
PMI sets only SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID.

gptlab's driver says how many ranks it launched in GPTLAB_RANKS. With 1, the launcher variables are ignored: a
training started by a Parsl worker inherits the worker pool's PMI_* / SLURM_* variables (the pool itself is
started by mpiexec or srun, one process per node), which describe the pool, not the training. With more, the
world size the variables give must match, and the SLURM_* variables are read (outside a gptlab launch they may
describe the whole batch job, e.g. inside `salloc`).
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from llmcore.hardware import resolve_device

DEFAULT_PORT = 29500

# (rank, world size, local rank) variable names, in order of preference
LAUNCHER_VARS = [
    ("RANK", "WORLD_SIZE", "LOCAL_RANK"),  # torchrun
    ("PMI_RANK", "PMI_SIZE", "PMI_LOCAL_RANK"),  # MPICH / Cray PALS (Polaris)
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),  # Open MPI
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),  # srun (without PMI); only under GPTLAB_RANKS
]
EXPECTED_RANKS = "GPTLAB_RANKS"  # set by gptlab's driver: the number of ranks it launched
# local rank when the launcher's own local-rank variable is absent (then: the global rank, right on one node)
LOCAL_RANK_FALLBACKS = (
    "PALS_LOCAL_RANKID",  # Cray PALS (Polaris)
    "MPI_LOCALRANKID",  # MPICH Hydra (Debian's mpich): sets PMI_RANK / PMI_SIZE but no PMI_LOCAL_RANK
)


class LaunchError(ValueError):
    """The launcher's variables do not describe the launch gptlab made (a site problem: the same on a retry)."""


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    is_main: bool


def read_launch_env(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """Rank, local rank, world size and rendezvous address from the launcher's variables (pure; no side effects)."""
    env = os.environ if env is None else env
    expected = int(env[EXPECTED_RANKS]) if env.get(EXPECTED_RANKS) else None
    rank, world, local, source = 0, 1, 0, None
    for rank_var, size_var, local_var in LAUNCHER_VARS if expected != 1 else ():
        if rank_var.startswith("SLURM_") and expected is None:
            continue
        if rank_var in env and size_var in env:
            rank, world = int(env[rank_var]), int(env[size_var])
            local = int(next((env[v] for v in (local_var, *LOCAL_RANK_FALLBACKS) if v in env), rank))
            source = f"{rank_var}={env[rank_var]} {size_var}={env[size_var]}"
            break
    if expected is not None and world != expected:
        raise LaunchError(
            f"this training was launched as {expected} ranks but its process sees a world of {world} "
            f"({source or 'no RANK, PMI_RANK, OMPI_COMM_WORLD_RANK or SLURM_PROCID variable'}): the launcher "
            "did not start one process per rank with its rank variables (check the site's MPI launcher)"
        )
    if not 0 <= rank < world:
        raise LaunchError(f"rank {rank} is outside world size {world}")
    # Under Parsl's MPIExecutor a task gets a subset of the job's nodes (PARSL_MPI_NODELIST, rank 0 on the first);
    # the job's first node ($PBS_NODEFILE) may belong to another task.
    nodelist = env.get("PARSL_MPI_NODELIST", "").split(",")[0].strip()
    addr = env.get("MASTER_ADDR") or nodelist or _first_host(env.get("PBS_NODEFILE")) or "127.0.0.1"
    port = int(env.get("MASTER_PORT") or DEFAULT_PORT)
    return LaunchEnv(rank, local, world, addr, port)


def mpiexec_prefix(ranks: int, ranks_per_node: int, extra: str = "") -> str:
    """The launcher command line put in front of `python -m llmcore.train ...` for an MPI launch.

    ``mpiexec -n RANKS --ppn RANKS_PER_NODE [EXTRA]``: the Polaris form (Cray PALS), which MPICH's Hydra mpiexec
    accepts too. `extra` is shell text appended as is (e.g. ``"--depth 8 --cpu-bind depth"``).
    """
    if ranks < 1 or ranks_per_node < 1:
        raise ValueError(f"ranks ({ranks}) and ranks_per_node ({ranks_per_node}) must be at least 1")
    cmd = shlex.join(["mpiexec", "-n", str(ranks), "--ppn", str(ranks_per_node)])
    return f"{cmd} {extra.strip()}" if extra.strip() else cmd


def _first_host(nodefile: str | None) -> str | None:
    if not nodefile:
        return None
    try:
        with open(nodefile, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    return line.strip()
    except OSError:
        return None
    return None


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when launched with more than one rank; pin each rank to its local GPU.

    `device` is TrainConfig.device (`auto`, `cpu`, `cuda`). Backend: nccl on CUDA, gloo on CPU. With one rank
    no process group is created.
    """
    launch = read_launch_env()
    dev = resolve_device(device)
    if dev.type == "cuda":
        if launch.world_size > 1 or dev.index is None:
            dev = torch.device("cuda", launch.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    if launch.world_size > 1 and not dist.is_initialized():
        # env:// rendezvous; under torchrun these are already set (and the agent's store is reused)
        os.environ.setdefault("MASTER_ADDR", launch.master_addr)
        os.environ.setdefault("MASTER_PORT", str(launch.master_port))
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo",
            init_method="env://",
            rank=launch.rank,
            world_size=launch.world_size,
            device_id=dev if dev.type == "cuda" else None,
        )
    return DistInfo(launch.rank, launch.local_rank, launch.world_size, dev, launch.rank == 0)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of `t` over ranks (in place); unchanged with one rank."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (small, picklable objects only: RNG and loader states)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on at least one (so all ranks stop together)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
