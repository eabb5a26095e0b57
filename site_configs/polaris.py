"""ALCF Polaris: PBS Pro, 4x A100 and 64 cores per node, Cray MPICH's mpiexec (PALS).

Follows Parsl's ``parsl/configs/polaris.py`` and ALCF's Parsl guide. Two executors:

- ``polaris-htex``: tokenizer, shards, evaluation, benchmark tasks and single-GPU training, one worker per GPU;
- ``polaris-mpi`` (only when some training spans several GPUs): whole nodes per task, training started as
  ``$PARSL_MPI_PREFIX python -m llmcore.train ...`` (``mpiexec -n RANKS --ppn RANKS_PER_NODE ...``), one rank
  per GPU.

Every setting is here, each with the reason for it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from parsl.addresses import address_by_interface
from parsl.config import Config
from parsl.executors import HighThroughputExecutor, MPIExecutor
from parsl.launchers import MpiExecLauncher, SimpleLauncher
from parsl.providers import PBSProProvider

from site_configs.spec import SITE_DEFAULTS, SiteSpec

DEFAULTS = SITE_DEFAULTS["polaris"]  # what a spec's null site fields become on Polaris
#: Cores closest to GPUs 3, 2, 1, 0 of a Polaris node (hardware threads included), as ALCF documents.
GPU_AFFINITY = "list:24-31,56-63:16-23,48-55:8-15,40-47:0-7,32-39"
#: The interchange dies with the driver and ignores the terminal's Ctrl-C (see site_configs.guard).
GUARDED_INTERCHANGE = [sys.executable, "-m", "site_configs.guard", "interchange.py"]


def _pbs(site: SiteSpec, nodes: int, launcher: object) -> PBSProProvider:
    """A PBS job of ``nodes`` whole nodes (``select=N:ncpus=64:ngpus=4``: any number of ranks may start on each)."""
    return PBSProProvider(
        account=site.account,  # -A: required on Polaris
        queue=site.queue,
        walltime=site.walltime,
        nodes_per_block=nodes,
        cpus_per_node=site.cores_per_node,
        select_options=f"ngpus={site.gpus_per_node}",
        # the file systems the job reads and writes must be named, or PBS may start it while they are down
        scheduler_options="\n".join(
            x for x in (f"#PBS -l filesystems={site.filesystems}", site.scheduler_options) if x
        ),
        # TMPDIR=/tmp: Parsl's AF_UNIX sockets under the default TMPDIR exceed the kernel's path length on Polaris
        worker_init="\n".join(x for x in (site.worker_init or "", "export TMPDIR=/tmp") if x),
        launcher=launcher,
        init_blocks=0,  # no job until a stage needs one
        min_blocks=0,
        max_blocks=site.max_jobs,
    )


def polaris(
    site: SiteSpec,
    run_dir: str,
    mpi_nodes: int = 0,
    mpi_ranks_per_node: int = 1,
    retries: int = 2,
    retry_handler: Callable[..., float] | None = None,
    resolve_address: bool = True,
) -> Config:
    """The Parsl config for Polaris from a resolved site section (``site_configs.spec.resolve``).

    ``mpi_nodes``: nodes of the largest multi-GPU training (0: no MPI executor). ``resolve_address=False`` builds
    it away from Polaris (``gptlab plan`` renders the job scripts anywhere; bond0 exists only there).
    """
    address = address_by_interface(site.interface) if site.interface and resolve_address else None
    htex = HighThroughputExecutor(
        label="polaris-htex",
        address=address,  # workers on compute nodes reach the driver on the login node over bond0
        encrypted=True,  # worker traffic crosses the machine's network: CurveZMQ
        prefetch_capacity=0,  # a training holds its worker for hours: never queue a second task behind it
        available_accelerators=site.gpus_per_node,  # one worker per GPU, CUDA_VISIBLE_DEVICES set for each
        max_workers_per_node=site.gpus_per_node,
        cpu_affinity=GPU_AFFINITY,  # each worker gets the cores nearest its GPU
        heartbeat_period=max(1, site.heartbeat_threshold_s // 4),
        heartbeat_threshold=site.heartbeat_threshold_s,  # a pool whose driver is gone ends its job this soon
        interchange_launch_cmd=GUARDED_INTERCHANGE,
        # one manager per node, started by mpiexec and given all 64 cores (it pins its workers itself)
        provider=_pbs(site, site.nodes_per_job, MpiExecLauncher(bind_cmd="--cpu-bind", overrides="--depth=64 --ppn 1")),
    )
    executors: list[object] = [htex]
    if mpi_nodes:
        mpi = MPIExecutor(
            label="polaris-mpi",
            address=address,
            encrypted=True,
            mpi_launcher="mpiexec",  # Cray PALS: $PARSL_MPI_PREFIX is `mpiexec -n R --ppn P --hostfile ...`
            max_workers_per_block=1,  # one multi-node training per job
            heartbeat_period=max(1, site.heartbeat_threshold_s // 4),
            heartbeat_threshold=site.heartbeat_threshold_s,
            provider=_pbs(site, mpi_nodes, SimpleLauncher()),  # the task itself calls mpiexec
        )
        mpi.interchange_launch_cmd = GUARDED_INTERCHANGE  # (its signature is typed str; Popen needs the list)
        executors.append(mpi)
    return Config(
        executors=executors,
        run_dir=run_dir,
        retries=retries,
        retry_handler=retry_handler,
        usage_tracking=0,
        max_idletime=site.idle_timeout_s,  # an idle job gives its nodes back after this long
    )
