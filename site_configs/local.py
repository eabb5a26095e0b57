"""Local sites: this machine, as a thread pool (laptops, tests) or as Parsl worker processes.

Training always runs as its own process (a bash app), so a crash in training never takes the driver down.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from parsl.config import Config
from parsl.executors import HighThroughputExecutor
from parsl.executors.threads import ThreadPoolExecutor
from parsl.providers import LocalProvider

#: The interchange dies with the driver and ignores the terminal's Ctrl-C (see site_configs.guard).
GUARDED_INTERCHANGE = [sys.executable, "-m", "site_configs.guard", "interchange.py"]


def local_threads(
    max_threads: int, run_dir: str, retries: int = 0, retry_handler: Callable[..., float] | None = None
) -> Config:
    """A thread pool of ``max_threads`` workers; Parsl's logs and run info go under ``run_dir``."""
    return Config(
        executors=[ThreadPoolExecutor(label="local", max_threads=max_threads)],
        run_dir=run_dir,
        retries=retries,
        retry_handler=retry_handler,
        strategy="none",
        usage_tracking=0,
    )


def local_processes(
    max_workers: int,
    run_dir: str,
    retries: int = 0,
    retry_handler: Callable[..., float] | None = None,
    heartbeat_threshold: int = 60,
) -> Config:
    """Parsl's HighThroughputExecutor with ``max_workers`` worker processes on this machine (one per core).

    Stages run in worker processes, so CPU stages of different sweep points run in parallel, and a worker
    that dies is reported as lost and its task retried. The pool exits ``heartbeat_threshold`` seconds after
    the driver is gone.
    """
    executor = HighThroughputExecutor(
        label="local-htex",
        max_workers_per_node=max_workers,
        cores_per_worker=1,
        address="127.0.0.1",
        encrypted=False,  # loopback only
        heartbeat_period=max(1, heartbeat_threshold // 4),
        heartbeat_threshold=heartbeat_threshold,
        interchange_launch_cmd=GUARDED_INTERCHANGE,
        provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1),
    )
    return Config(
        executors=[executor],
        run_dir=run_dir,
        retries=retries,
        retry_handler=retry_handler,
        strategy="none",
        usage_tracking=0,
    )
