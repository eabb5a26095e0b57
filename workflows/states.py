"""The states of a stage, one vocabulary for the live table, ``gptlab status``, submit results and MLflow tags.

As Parsl's ``dataflow/states.py``: one typed enum, a line of docstring per state.
"""

from __future__ import annotations

from enum import Enum


class StageState(str, Enum):
    """Where one stage of one run stands. The value is what a user reads."""

    TO_RUN = "to run"
    """Not committed; the next submit runs it."""
    RESUMING = "resuming"
    """A training with a committed checkpoint from an earlier submit: the next submit continues it."""
    INTERRUPTED = "interrupted"
    """A training stopped before its end (Ctrl-C, SIGTERM, a time budget) after a committed checkpoint."""
    PRUNED = "pruned"
    """A training an early-stopping rule stopped, with a resumable checkpoint."""
    WAITING = "waiting"
    """Launched, waiting for the stages it reads."""
    QUEUED = "queued"
    """Ready, waiting for a worker (a training without a process yet)."""
    RUNNING = "running"
    """Running on a worker."""
    RETRYING = "retrying"
    """Failed in a way worth another try (a lost worker or node); Parsl runs it again."""
    DONE = "done"
    """Committed by this submit."""
    CACHED = "cached"
    """Committed by an earlier submit (or another sweep point's stage with the same key): not run again."""
    FAILED = "failed"
    """Failed; the run's error says why."""
    NOT_RUN = "not run"
    """Never ran: a stage it reads failed, or the submit was stopped first."""

    def __str__(self) -> str:
        return self.value

    @property
    def finished(self) -> bool:
        """Committed: its outputs are usable."""
        return self in (StageState.DONE, StageState.CACHED)

    @classmethod
    def from_parsl(cls, parsl_state: str) -> StageState:
        """A Parsl task state (``States.name``) as a stage state."""
        return _PARSL.get(parsl_state, cls.WAITING)


_PARSL = {
    "unsched": StageState.WAITING,
    "pending": StageState.WAITING,
    "launched": StageState.RUNNING,
    "running": StageState.RUNNING,
    "running_ended": StageState.RUNNING,
    "joining": StageState.RUNNING,
    "fail_retryable": StageState.RETRYING,
    "exec_done": StageState.DONE,
    "memo_done": StageState.DONE,
    "failed": StageState.FAILED,
    "dep_fail": StageState.NOT_RUN,
}
