"""A Slurm cluster: the same two executors as Polaris, with ``srun``.

- ``slurm-htex``: tokenizer, shards, evaluation, benchmark tasks and single-rank training; one manager per node
  via ``srun``, one worker per GPU when the nodes have GPUs, else one per core;
- ``slurm-mpi`` (only when some training spans several ranks): whole nodes per task, training started as
  ``$PARSL_MPI_PREFIX python -m llmcore.train ...`` (``srun``); ranks read ``SLURM_PROCID``/``SLURM_NTASKS``, so
  no PMI plugin is needed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from parsl.addresses import address_by_interface
from parsl.config import Config
from parsl.executors import HighThroughputExecutor, MPIExecutor
from parsl.launchers import SimpleLauncher, SrunLauncher
from parsl.providers import SlurmProvider

from site_configs.spec import SITE_DEFAULTS, SiteSpec

#: What a spec's null site fields become on a Slurm cluster.
DEFAULTS = SITE_DEFAULTS["slurm"]  # CPU nodes unless the spec says otherwise
#: The interchange dies with the driver and ignores the terminal's Ctrl-C (see site_configs.guard).
GUARDED_INTERCHANGE = [sys.executable, "-m", "site_configs.guard", "interchange.py"]


def _sbatch(site: SiteSpec, nodes: int, launcher: object, tasks_per_node: int = 1) -> SlurmProvider:
    """A Slurm job of ``nodes`` nodes. Parsl writes ``--ntasks-per-node=1`` (one worker pool per node); an MPI job
    whose ``srun`` starts several ranks per node needs that many tasks (a later ``#SBATCH`` line wins)."""
    tasks = f"#SBATCH --ntasks-per-node={tasks_per_node}" if tasks_per_node > 1 else None
    return SlurmProvider(
        partition=site.queue,
        account=site.account,
        walltime=site.walltime,
        nodes_per_block=nodes,
        cores_per_node=site.cores_per_node,
        gpus_per_node=site.gpus_per_node or None,
        scheduler_options="\n".join(x for x in (tasks, site.scheduler_options) if x),
        worker_init="\n".join(x for x in (site.worker_init or "", "export TMPDIR=${TMPDIR:-/tmp}") if x),
        launcher=launcher,
        init_blocks=0,  # no job until a stage needs one
        min_blocks=0,
        max_blocks=site.max_jobs,
        exclusive=False,  # share nodes with other jobs unless the spec's scheduler_options ask otherwise
    )


def slurm(
    site: SiteSpec,
    run_dir: str,
    mpi_nodes: int = 0,
    mpi_ranks_per_node: int = 1,
    retries: int = 2,
    retry_handler: Callable[..., float] | None = None,
    resolve_address: bool = True,
) -> Config:
    """The Parsl config for a Slurm cluster from a resolved site section (see ``polaris`` for the arguments)."""
    address = address_by_interface(site.interface) if site.interface and resolve_address else None
    gpus = site.gpus_per_node or 0
    htex = HighThroughputExecutor(
        label="slurm-htex",
        address=address,
        encrypted=True,  # worker traffic crosses the cluster's network
        prefetch_capacity=0,  # a training holds its worker for hours: never queue a second task behind it
        available_accelerators=gpus if gpus else (),
        max_workers_per_node=gpus or site.cores_per_node or None,  # None: one worker per core Parsl sees
        heartbeat_period=max(1, site.heartbeat_threshold_s // 4),
        heartbeat_threshold=site.heartbeat_threshold_s,
        interchange_launch_cmd=GUARDED_INTERCHANGE,
        provider=_sbatch(site, site.nodes_per_job, SrunLauncher()),
    )
    executors: list[object] = [htex]
    if mpi_nodes:
        mpi = MPIExecutor(
            label="slurm-mpi",
            address=address,
            encrypted=True,
            mpi_launcher="srun",
            max_workers_per_block=1,
            heartbeat_period=max(1, site.heartbeat_threshold_s // 4),
            heartbeat_threshold=site.heartbeat_threshold_s,
            provider=_sbatch(site, mpi_nodes, SimpleLauncher(), mpi_ranks_per_node),
        )
        mpi.interchange_launch_cmd = GUARDED_INTERCHANGE  # (its signature is typed str; Popen needs the list)
        executors.append(mpi)
    return Config(
        executors=executors,
        run_dir=run_dir,
        retries=retries,
        retry_handler=retry_handler,
        usage_tracking=0,
        max_idletime=site.idle_timeout_s,
    )
