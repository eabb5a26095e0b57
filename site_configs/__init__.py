"""Site configs: one typed factory per site, each returning a ``parsl.Config``.

``build_site`` maps a spec's ``site`` section to a :class:`Site`: the Parsl config plus which executor
runs CPU stages (tokenizer, shards, evaluation) and which runs training.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parsl.config import Config


@dataclass
class Site:
    name: str
    config: Config
    cpu_executor: str
    train_executor: str
    # Environment for training processes (e.g. threads per process when several share a node's cores).
    train_env: dict[str, str] = field(default_factory=dict)


def build_site(site: Any, run_dir: Path, concurrent_trainings: int = 1) -> Site:
    """Build the site named by a spec's ``site`` section (a ``workflows.spec.SiteSpec``)."""
    if site.name == "local":
        from site_configs.local import local_threads

        workers = site.max_workers or (os.cpu_count() or 1)
        threads = max(1, (os.cpu_count() or 1) // max(1, min(concurrent_trainings, workers)))
        config = local_threads(max_threads=workers, run_dir=str(run_dir))
        return Site("local", config, "local", "local", {"OMP_NUM_THREADS": str(threads)})
    raise ValueError(f"unknown site {site.name!r}")
