"""The layout every batch site shares: a HighThroughputExecutor for CPU stages and single-rank training,
and, when some training spans several ranks, an MPIExecutor whose jobs hold whole nodes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from parsl.addresses import address_by_interface
from parsl.config import Config
from parsl.executors import HighThroughputExecutor, MPIExecutor
from parsl.launchers import SimpleLauncher


def batch_config(
    name: str,
    site: Any,
    provider: Callable[[Any, int, Any, int], Any],
    htex_launcher: Any,
    htex_options: dict[str, Any],
    mpi_launcher: str,
    run_dir: str,
    mpi_nodes: int = 0,
    mpi_ranks_per_node: int = 1,
    retries: int = 2,
    resolve_address: bool = True,
    retry_handler: Callable[..., float] | None = None,
) -> Config:
    """``provider(site, nodes, launcher, tasks_per_node)`` builds the scheduler provider of one executor's jobs;
    the MPI executor's jobs must let ``mpi_ranks_per_node`` ranks start on each node.

    Worker traffic is encrypted. The network interface exists only on the cluster, so rendering job
    scripts elsewhere (``gptlab plan``) passes ``resolve_address=False``.
    """
    address = address_by_interface(site.interface) if site.interface and resolve_address else None
    executors: list[Any] = [
        HighThroughputExecutor(
            label=f"{name}-htex",
            address=address,
            prefetch_capacity=0,
            encrypted=True,
            provider=provider(site, site.nodes_per_job, htex_launcher),
            **htex_options,
        )
    ]
    if mpi_nodes:
        executors.append(
            MPIExecutor(
                label=f"{name}-mpi",
                address=address,
                mpi_launcher=mpi_launcher,
                max_workers_per_block=1,
                encrypted=True,
                provider=provider(site, mpi_nodes, SimpleLauncher(), mpi_ranks_per_node),
            )
        )
    return Config(
        executors=executors,
        run_dir=run_dir,
        retries=retries,
        retry_handler=retry_handler,
        usage_tracking=0,
        max_idletime=site.idle_timeout_s,
    )
