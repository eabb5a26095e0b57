"""A generic Slurm cluster: the same two executors as Polaris, with srun.

- ``slurm-htex``: a HighThroughputExecutor on SlurmProvider, one manager per node via ``srun``, for
  tokenizer, shards, evaluation and single-rank training (one worker per GPU when the nodes have GPUs,
  else one per core);
- ``slurm-mpi``: an MPIExecutor (SimpleLauncher) for training that spans GPUs and nodes, launched with
  ``$PARSL_MPI_PREFIX`` (``srun``).
"""

from __future__ import annotations

from typing import Any

from parsl.config import Config
from parsl.launchers import SrunLauncher
from parsl.providers import SlurmProvider

from site_configs.batch import batch_config


def _provider(site: Any, nodes: int, launcher: Any, tasks_per_node: int = 1) -> SlurmProvider:
    """Parsl writes ``--ntasks-per-node=1`` (one worker pool per node); an MPI job whose ``srun`` starts several
    ranks per node needs that many tasks (a later ``#SBATCH`` line of the same option wins)."""
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
        init_blocks=0,
        min_blocks=0,
        max_blocks=site.max_jobs,
        exclusive=False,
    )


def slurm(site: Any, run_dir: str, **options: Any) -> Config:
    """Config for a Slurm cluster from a resolved site section (``options``: see ``batch_config``)."""
    gpus = site.gpus_per_node or 0
    return batch_config(
        "slurm",
        site,
        _provider,
        htex_launcher=SrunLauncher(),
        htex_options={
            "available_accelerators": gpus if gpus else (),
            "max_workers_per_node": gpus or site.cores_per_node or None,
        },
        mpi_launcher="srun",
        run_dir=run_dir,
        **options,
    )
