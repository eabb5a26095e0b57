"""A generic Slurm cluster: the same two executors as Polaris, with srun.

- ``slurm-htex``: a HighThroughputExecutor on SlurmProvider, one manager per node via ``srun``, for
  tokenizer, shards, evaluation and single-rank training (one worker per GPU when the nodes have GPUs,
  else one per core);
- ``slurm-mpi``: an MPIExecutor (SimpleLauncher) for training that spans GPUs and nodes, launched with
  ``$PARSL_MPI_PREFIX`` (``srun``).
"""

from __future__ import annotations

from typing import Any, Callable

from parsl.addresses import address_by_interface
from parsl.config import Config
from parsl.executors import HighThroughputExecutor, MPIExecutor
from parsl.launchers import SimpleLauncher, SrunLauncher
from parsl.providers import SlurmProvider


def _provider(site: Any, nodes: int, launcher: Any) -> SlurmProvider:
    return SlurmProvider(
        partition=site.queue,
        account=site.account,
        walltime=site.walltime,
        nodes_per_block=nodes,
        cores_per_node=site.cores_per_node,
        gpus_per_node=site.gpus_per_node or None,
        scheduler_options=site.scheduler_options,
        worker_init="\n".join(x for x in (site.worker_init or "", "export TMPDIR=${TMPDIR:-/tmp}") if x),
        launcher=launcher,
        init_blocks=0,
        min_blocks=0,
        max_blocks=site.max_jobs,
        exclusive=False,
    )


def slurm(site: Any, run_dir: str, mpi_nodes: int = 0, retries: int = 2, resolve_address: bool = True,
          retry_handler: Callable[..., float] | None = None) -> Config:
    """Config for a Slurm cluster from a resolved site section; adds the MPI executor when ``mpi_nodes`` > 0."""
    # The interface exists only on the cluster: rendering job scripts elsewhere (gptlab plan) skips it.
    address = address_by_interface(site.interface) if site.interface and resolve_address else None
    gpus = site.gpus_per_node or 0
    executors: list[Any] = [
        HighThroughputExecutor(
            label="slurm-htex",
            address=address,
            available_accelerators=gpus if gpus else (),
            max_workers_per_node=gpus or site.cores_per_node or None,
            prefetch_capacity=0,
            encrypted=True,
            provider=_provider(site, site.nodes_per_job, SrunLauncher()),
        )
    ]
    if mpi_nodes:
        executors.append(MPIExecutor(
            label="slurm-mpi",
            address=address,
            mpi_launcher="srun",
            max_workers_per_block=1,
            encrypted=True,
            provider=_provider(site, mpi_nodes, SimpleLauncher()),
        ))
    return Config(executors=executors, run_dir=run_dir, retries=retries, retry_handler=retry_handler, usage_tracking=0)
