"""Site configs: one typed factory per site, each returning a ``parsl.Config``.

``build_site`` turns a spec's ``site`` section into a :class:`Site`: the Parsl config plus which executor
runs CPU stages (tokenizer, shards, evaluation), which runs single-rank training, and how multi-rank
training is launched (an MPIExecutor's ``$PARSL_MPI_PREFIX`` on batch sites, ``mpiexec`` on local ones).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parsl.config import Config

SITES = ("local", "local-processes", "polaris", "slurm")
BATCH_SITES = ("polaris", "slurm")
# Values users copy from examples and forget to change.
PLACEHOLDER = re.compile(r"^\s*$|^(your[_\- ]|<.*>$|change[_\- ]?me|todo\b|xxx|placeholder|my[_\-]?account$)", re.I)
# Site fields that may come from the environment when the spec leaves them null.
FROM_ENV = {"account": "GPTLAB_ACCOUNT", "queue": "GPTLAB_QUEUE", "worker_init": "GPTLAB_WORKER_INIT"}
DEFAULTS: dict[str, dict[str, Any]] = {
    "polaris": {"queue": "debug", "cores_per_node": 64, "gpus_per_node": 4, "interface": "bond0"},
    "slurm": {"gpus_per_node": 0},
}


@dataclass
class Site:
    name: str
    config: Config
    cpu_executor: str
    train_executor: str
    mpi_executor: str | None = None  # multi-rank training on batch sites; None: local mpiexec
    train_env: dict[str, str] = field(default_factory=dict)
    nodes: dict[str, int] = field(default_factory=dict)  # executor label -> nodes per job (for node-hours)


def resolve(site: Any, environ: Mapping[str, str] | None = None) -> Any:
    """The site section with null fields filled from the environment, then from the site's defaults."""
    env = os.environ if environ is None else environ
    updates = {k: env[v] for k, v in FROM_ENV.items() if getattr(site, k) is None and env.get(v)}
    updates.update(
        {k: v for k, v in DEFAULTS.get(site.name, {}).items() if getattr(site, k) is None and k not in updates}
    )
    return site.model_copy(update=updates)


def site_problems(
    site: Any, trains: list[Any], environ: Mapping[str, str] | None = None, submitting: bool = False
) -> list[str]:
    """Every problem with running these training configs on this site, as `field: message`.
    ``submitting`` adds the checks that only hold where the driver runs (the network interface)."""
    s = resolve(site, environ)
    p: list[str] = []
    if submitting and s.interface and s.interface not in {name for _, name in socket.if_nameindex()}:
        p.append(
            f"site.interface: this machine has no network interface {s.interface!r} (submit from the "
            "cluster's login node, or set site.interface to one of this machine's interfaces)"
        )
    if s.name == "polaris":
        if s.account is None:
            p.append("site.account: Polaris needs an allocation (set site.account or GPTLAB_ACCOUNT)")
    for name in ("account", "queue", "worker_init"):
        value = getattr(s, name)
        if value is not None and s.name in BATCH_SITES and PLACEHOLDER.search(value):
            p.append(f"site.{name}: {value!r} looks like a placeholder; give the real value")
    for t in trains:
        ranks = t.nodes * t.ranks_per_node
        if s.name not in BATCH_SITES and t.nodes > 1:
            p.append(f"train.nodes: site '{s.name}' is one machine; multi-node training needs polaris or slurm")
        elif s.name not in BATCH_SITES and ranks > 1 and shutil.which("mpiexec") is None:
            p.append(
                "train.ranks_per_node: several ranks on a local site are launched with mpiexec, which is not "
                "on PATH (install MPICH, e.g. apt-get install mpich)"
            )
        if s.gpus_per_node and t.ranks_per_node > s.gpus_per_node and t.device != "cpu":
            p.append(
                f"train.ranks_per_node: {t.ranks_per_node} ranks per node but site '{s.name}' has "
                f"{s.gpus_per_node} GPUs per node (one rank per GPU)"
            )
    return sorted(set(p), key=p.index)


def build_site(
    site: Any, run_dir: Path, trains: list[Any], concurrent_trainings: int = 1, resolve_address: bool = True
) -> Site:
    """Build the Parsl config for a spec's site section; ``trains`` are the training configs to run.
    ``resolve_address=False`` builds it on any machine (to render job scripts), not only on the cluster."""
    from workflows.retry import retry_cost

    s = resolve(site)
    common = {"run_dir": str(run_dir), "retries": s.retries, "retry_handler": retry_cost}
    if s.name == "local":
        from site_configs.local import local_threads

        workers = s.max_workers or (os.cpu_count() or 1)
        cfg = local_threads(max_threads=workers, **common)
        return Site("local", cfg, "local", "local", None, _thread_env(concurrent_trainings, workers))
    if s.name == "local-processes":
        from site_configs.local import local_processes

        workers = s.max_workers or (os.cpu_count() or 1)
        cfg = local_processes(max_workers=workers, **common)
        return Site(s.name, cfg, "local-htex", "local-htex", None, _thread_env(concurrent_trainings, workers))
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
