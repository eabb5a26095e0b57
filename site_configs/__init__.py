"""Site configs: one typed factory per site, each returning a ``parsl.Config``.

``build_site`` turns a spec's ``site`` section (:class:`SiteSpec`) into a :class:`Site`: the Parsl config plus
which executor runs CPU stages (tokenizer, shards, evaluation, tasks), which runs single-rank training, and how
multi-rank training is launched (an MPIExecutor's ``$PARSL_MPI_PREFIX`` on batch sites, ``mpiexec`` on local
ones). Importing this package imports pydantic only; Parsl is imported when a site is built.

Modules: ``spec`` (the site section and its checks), ``local``, ``polaris``, ``slurm`` (one factory each),
``retry`` (which failures Parsl retries), ``guard`` (how interchanges are started), ``render`` (job scripts for
``gptlab plan``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from llmcore.config import TrainConfig
from site_configs.retry import retry_cost
from site_configs.spec import BATCH_SITES, SITES, SiteSpec, resolve, site_problems

if TYPE_CHECKING:
    from parsl.config import Config

__all__ = ["BATCH_SITES", "LOCAL_EXECUTORS", "SITES", "Site", "SiteSpec", "build_site", "resolve", "site_problems"]


@dataclass
class Site:
    name: str
    config: Config
    cpu_executor: str
    train_executor: str
    mpi_executor: str | None = None  # multi-rank training on batch sites; None: local mpiexec
    train_env: dict[str, str] = field(default_factory=dict)
    nodes: dict[str, int] = field(default_factory=dict)  # executor label -> nodes per job (for node-hours)


#: The executors of the local sites: (CPU stages, single-rank training). Local sites need no Parsl to name them.
LOCAL_EXECUTORS = {"local": ("local", "local"), "local-processes": ("local-htex", "local-htex")}


def build_site(
    site: SiteSpec,
    run_dir: Path,
    trains: list[TrainConfig],
    concurrent_trainings: int = 1,
    resolve_address: bool = True,
) -> Site:
    """Build the Parsl config for a spec's site section; ``trains`` are the training configs to run.
    ``resolve_address=False`` builds it on any machine (to render job scripts), not only on the cluster."""

    s = resolve(site)
    common = {"run_dir": str(run_dir), "retries": s.retries, "retry_handler": retry_cost}
    workers = s.max_workers or (os.cpu_count() or 1)
    if s.name == "local":
        from site_configs.local import local_threads

        cfg = local_threads(max_threads=workers, **common)
        return Site("local", cfg, *LOCAL_EXECUTORS["local"], None, _thread_env(concurrent_trainings, workers))
    if s.name == "local-processes":
        from site_configs.local import local_processes

        cfg = local_processes(max_workers=workers, heartbeat_threshold=s.heartbeat_threshold_s, **common)
        return Site(s.name, cfg, *LOCAL_EXECUTORS[s.name], None, _thread_env(concurrent_trainings, workers))
    from site_configs.polaris import polaris
    from site_configs.slurm import slurm

    factory = polaris if s.name == "polaris" else slurm
    multi = [t for t in trains if t.nodes * t.ranks_per_node > 1]
    mpi_nodes = max([t.nodes for t in multi], default=0)
    per_node = max([t.ranks_per_node for t in multi], default=1)
    cfg = factory(s, mpi_nodes=mpi_nodes, mpi_ranks_per_node=per_node, resolve_address=resolve_address, **common)
    labels = [e.label for e in cfg.executors]
    nodes = {e.label: e.provider.nodes_per_block for e in cfg.executors}
    return Site(s.name, cfg, labels[0], labels[0], labels[1] if len(labels) > 1 else None, {}, nodes)


def _thread_env(concurrent_trainings: int, workers: int) -> dict[str, str]:
    """Share the cores between trainings that run at once, instead of oversubscribing them."""
    threads = max(1, (os.cpu_count() or 1) // max(1, min(concurrent_trainings, workers)))
    return {"OMP_NUM_THREADS": str(threads)}
