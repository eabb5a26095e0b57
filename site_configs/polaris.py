"""ALCF Polaris: PBS Pro, 4x A100 and 64 cores per node, mpiexec (Cray MPICH / PALS).

Follows Parsl's and ALCF's documented Polaris configuration:
- ``polaris-htex``: a HighThroughputExecutor on PBSProProvider, one manager per node started with
  ``mpiexec --cpu-bind none --depth=64 --ppn 1`` (Parsl's MpiExecLauncher with ``bind_cmd="--cpu-bind"``; the
  workers are pinned by the pool's ``cpu_affinity`` instead), one worker per GPU (``available_accelerators=4``) with the
  cores nearest that GPU (Polaris' NUMA layout), for tokenizer, shards, evaluation and single-GPU training;
- ``polaris-mpi``: an MPIExecutor (SimpleLauncher) whose jobs hold whole nodes; training that spans GPUs and
  nodes runs as ``$PARSL_MPI_PREFIX python -m llmcore.train ...``, one rank per GPU.
"""

from __future__ import annotations

from typing import Any

from parsl.config import Config
from parsl.launchers import MpiExecLauncher
from parsl.providers import PBSProProvider

from site_configs.batch import batch_config

# Cores closest to GPUs 3, 2, 1, 0 on a Polaris node (hardware threads included), as ALCF documents.
GPU_AFFINITY = "list:24-31,56-63:16-23,48-55:8-15,40-47:0-7,32-39"


def _provider(site: Any, nodes: int, launcher: Any, tasks_per_node: int = 1) -> PBSProProvider:
    """(A PBS job holds whole nodes, select=N:ncpus=..:ngpus=..: any number of ranks per node may start.)"""
    return PBSProProvider(
        account=site.account,
        queue=site.queue,
        walltime=site.walltime,
        nodes_per_block=nodes,
        cpus_per_node=site.cores_per_node,
        select_options=f"ngpus={site.gpus_per_node}",
        scheduler_options="\n".join(
            x for x in (f"#PBS -l filesystems={site.filesystems}", site.scheduler_options) if x
        ),
        worker_init="\n".join(x for x in (site.worker_init or "", "export TMPDIR=/tmp") if x),
        launcher=launcher,
        init_blocks=0,
        min_blocks=0,
        max_blocks=site.max_jobs,
    )


def polaris(site: Any, run_dir: str, **options: Any) -> Config:
    """Config for Polaris from a resolved site section (``options``: see ``batch_config``).

    ``export TMPDIR=/tmp`` in every job avoids Parsl's known failure on Polaris where the default TMPDIR
    makes AF_UNIX socket paths longer than the kernel allows.
    """
    return batch_config(
        "polaris",
        site,
        _provider,
        htex_launcher=MpiExecLauncher(bind_cmd="--cpu-bind", overrides="--depth=64 --ppn 1"),
        htex_options={
            "available_accelerators": site.gpus_per_node,
            "max_workers_per_node": site.gpus_per_node,
            "cpu_affinity": GPU_AFFINITY,
        },
        mpi_launcher="mpiexec",
        run_dir=run_dir,
        **options,
    )
