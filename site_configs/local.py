"""Local site: Parsl's ThreadPoolExecutor on this machine (laptops, tests).

CPU stages run as threads of the driver; training still runs as its own process (a bash app), so a crash
in training never takes the driver down.
"""

from __future__ import annotations

from parsl.config import Config
from parsl.executors.threads import ThreadPoolExecutor


def local_threads(max_threads: int, run_dir: str, retries: int = 0) -> Config:
    """A thread pool of ``max_threads`` workers; Parsl's logs and run info go under ``run_dir``."""
    return Config(
        executors=[ThreadPoolExecutor(label="local", max_threads=max_threads)],
        run_dir=run_dir,
        retries=retries,
        strategy="none",
        usage_tracking=0,
    )
