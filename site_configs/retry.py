"""Which failures Parsl retries, and at what cost against ``site.retries``.

Lost workers and managers (walltime, node failure, a killed process) are cheap to retry: training resumes
from its last committed checkpoint. Bad input (exit code 2 from ``python -m llmcore.train``, spec, corpus,
shard and checkpoint errors) fails the same way every time, so it is never retried; nor is a full, over-quota
or read-only file system (exit code 74 from training, ENOSPC/EDQUOT/EROFS/EFBIG from a stage): retrying
cannot help until someone frees space, and then a re-submit resumes from the last committed state.
"""

from __future__ import annotations

from typing import Any

NEVER = 1_000_000.0  # a cost above any retry budget


def retry_cost(exc: BaseException, task_record: Any) -> float:
    """Parsl's ``retry_handler``: what one more try of this failure costs against ``site.retries``."""
    from parsl.app.errors import BashExitFailure
    from parsl.executors.high_throughput.errors import ManagerLost, WorkerLost

    from llmcore.config import ConfigError
    from llmcore.exitcodes import NOT_RETRIED
    from llmcore.io import is_no_space

    if isinstance(exc, BashExitFailure):
        return NEVER if exc.exitcode in NOT_RETRIED else 1.0
    if is_no_space(exc):
        return NEVER
    if isinstance(exc, (ConfigError, ValueError)):  # spec, corpus, tokenizer, shard and checkpoint errors
        return NEVER
    if isinstance(exc, (WorkerLost, ManagerLost)):
        return 0.5
    return 1.0
