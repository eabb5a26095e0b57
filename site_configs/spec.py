"""The ``site`` section of an experiment spec, and the checks that decide whether its trainings can run there.

Light on purpose (pydantic only): ``gptlab validate`` reads it without importing Parsl.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from collections.abc import Mapping
from typing import Literal

from pydantic import Field

from llmcore.config import StrictModel, TrainConfig

SITES = ("local", "local-processes", "polaris", "slurm")
BATCH_SITES = ("polaris", "slurm")
WALLTIME = r"^\d{1,3}:\d{2}:\d{2}$"
#: Site fields that may come from the environment when the spec leaves them null.
FROM_ENV = {"account": "GPTLAB_ACCOUNT", "queue": "GPTLAB_QUEUE", "worker_init": "GPTLAB_WORKER_INIT"}
#: Values users copy from examples and forget to change.
PLACEHOLDER = re.compile(r"^\s*$|^(your[_\- ]|<.*>$|change[_\- ]?me|todo\b|xxx|placeholder|my[_\-]?account$)", re.I)


class SiteSpec(StrictModel):
    """Where the Parsl task graph runs. Batch fields left null are read from the environment
    (`GPTLAB_ACCOUNT`, `GPTLAB_QUEUE`, `GPTLAB_WORKER_INIT`), then from the site's defaults (its module's
    ``DEFAULTS``), when the site is built."""

    name: Literal["local", "local-processes", "polaris", "slurm"] = Field(
        "local",
        description="`local`: a thread pool here (default, tests). `local-processes`: Parsl worker processes "
        "here. `polaris`: ALCF Polaris through PBS Pro. `slurm`: a Slurm cluster.",
    )
    max_workers: int = Field(0, ge=0, description="Local sites: stages that may run at once; 0 means one per CPU core.")
    account: str | None = Field(None, description="Batch sites: allocation to charge (PBS -A, Slurm --account).")
    queue: str | None = Field(None, description="Batch sites: PBS queue or Slurm partition (Polaris default `debug`).")
    walltime: str = Field("01:00:00", pattern=WALLTIME, description="Batch sites: walltime of each job (HH:MM:SS).")
    nodes_per_job: int = Field(1, ge=1, description="Batch sites: nodes in each job of the CPU/single-GPU executor.")
    max_jobs: int = Field(1, ge=1, description="Batch sites: jobs each executor may have queued or running at once.")
    cores_per_node: int | None = Field(
        None, ge=1, description="Batch sites: cores per node (Polaris: 64; Slurm: ask for this many)."
    )
    gpus_per_node: int | None = Field(
        None, ge=0, description="Batch sites: GPUs per node (Polaris: 4; Slurm: 0 unless set)."
    )
    gpu_memory_gib: float | None = Field(
        None,
        gt=0,
        description="Memory of one GPU in GiB (Polaris: 40); `gptlab plan` checks each training's estimated memory "
        "per rank against it.",
    )
    filesystems: str = Field("home:eagle", description="Polaris: `#PBS -l filesystems=` value.")
    worker_init: str | None = Field(
        None,
        description="Shell lines run in each job before workers start, e.g. `module load conda; conda activate "
        "base; source ~/venvs/gptlab/bin/activate`.",
    )
    scheduler_options: str = Field("", description="Batch sites: extra `#PBS` / `#SBATCH` lines for every job.")
    interface: str | None = Field(
        None, description="Network interface workers use to reach the driver (Polaris: `bond0`); null: auto."
    )
    retries: int = Field(
        2, ge=0, description="Retries of a failed stage; lost workers and nodes are retried, bad input is not."
    )
    idle_timeout_s: float = Field(
        120.0,
        ge=0,
        description="Batch sites: a job with no stage to run for this long is ended, giving its nodes back "
        "(Parsl's max_idletime); a stage that comes later starts a new job.",
    )
    heartbeat_threshold_s: int = Field(
        60,
        ge=5,
        description="Worker pools that hear nothing from the driver's interchange for this long exit (Parsl's "
        "heartbeat_threshold): a driver that dies (killed, a dropped login session) frees its nodes this soon.",
    )


#: What a spec's null site fields become on each batch site (its module, ``site_configs.polaris`` or ``.slurm``,
#: builds the Parsl config from the resolved values); local sites have none.
SITE_DEFAULTS: dict[str, dict[str, object]] = {
    "polaris": {
        "queue": "debug",  # up to 2 nodes, 1 hour: right for first runs; prod, preemptable, debug-scaling for more
        "cores_per_node": 64,  # one AMD EPYC Milan per node
        "gpus_per_node": 4,  # A100-SXM4-40GB
        "gpu_memory_gib": 40,
        "interface": "bond0",  # the high-speed network compute nodes reach the login nodes on
    },
    "slurm": {"gpus_per_node": 0},  # CPU nodes unless the spec says otherwise
}


def site_defaults(name: str) -> dict[str, object]:
    """The defaults of a site (:data:`SITE_DEFAULTS`); local sites have none."""
    return SITE_DEFAULTS.get(name, {})


def resolve(site: SiteSpec, environ: Mapping[str, str] | None = None) -> SiteSpec:
    """The site section with null fields filled from the environment, then from the site's defaults."""
    env = os.environ if environ is None else environ
    updates: dict[str, object] = {k: env[v] for k, v in FROM_ENV.items() if getattr(site, k) is None and env.get(v)}
    defaults = site_defaults(site.name)
    updates.update({k: v for k, v in defaults.items() if getattr(site, k) is None and k not in updates})
    return site.model_copy(update=updates)


def site_problems(
    site: SiteSpec, trains: list[TrainConfig], environ: Mapping[str, str] | None = None, submitting: bool = False
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
    if s.name == "polaris" and s.account is None:
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
