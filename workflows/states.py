"""A run's life, decided in one place: the state of a stage and the status of a run.

As Parsl's ``dataflow/states.py`` and Ray Tune's trial states: one typed enum per thing, a line of docstring per
state, and one function that decides each, used by every reader (the driver, its live table, ``gptlab status``,
``compare``, the search code). Nothing else compares states to work one out.

**A stage's state** (:func:`stage_state`) comes from what is on disk (:class:`OnDisk`: the commit marker, the newest
committed checkpoint, a recorded pruning decision, whether its process has started) and, while a driver runs it,
from its live Parsl task; without a live task, from the status its run has in MLflow (another driver runs it).

**A run's status** (:func:`run_status`) comes from its stages' states. It moves only along these transitions
(:data:`TRANSITIONS`; :func:`check_transition` refuses any other, and :func:`resubmitted` says where a re-submit
takes a run):

=========  =========  ===========================================================================================
from       to         cause
=========  =========  ===========================================================================================
NEW        RUNNING    a submit creates the run and launches its stages
RUNNING    FINISHED   every stage committed (the driver logs what they report)
RUNNING    FAILED     a stage failed; the error names it
RUNNING    KILLED     Ctrl-C or SIGTERM while the run had unfinished work, or its driver was found dead
RUNNING    PRUNED     the pruner's decision, recorded in the training's directory before it is asked to stop
KILLED     RUNNING    a re-submit resumes it (from its committed stages and checkpoint)
FAILED     RUNNING    a re-submit runs its failed stage again
PRUNED     RUNNING    a re-submit with pruning switched off resumes the training from its checkpoint
FINISHED   FAILED     a stage added later (a new benchmark task) failed
=========  =========  ===========================================================================================

A re-submit never downgrades a run: FINISHED stays FINISHED (a stage added later runs on it without reopening it),
PRUNED stays PRUNED while the spec still prunes, and a run is KILLED only if it had unfinished work. In MLflow a
PRUNED run is status KILLED with the tag ``gptlab.pruned`` (MLflow has no such status).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from workflows.processes import PRUNED_FILE
from workflows.stages import StageKind


class StageState(str, Enum):
    """Where one stage of one run stands. The value is what a user reads."""

    TO_RUN = "to run"
    """Not committed; the next submit runs it."""
    RESUMING = "resuming"
    """A training with a committed checkpoint, about to be launched by this submit: it continues from there."""
    INTERRUPTED = "interrupted"
    """A training stopped before its end (Ctrl-C, SIGTERM, a time budget) after a committed checkpoint."""
    PRUNED = "pruned"
    """A training an early-stopping rule stopped (its decision recorded), with a resumable checkpoint."""
    PAUSED = "paused"
    """A training stopped at a rung of successive halving, waiting for the rung's decision (promoted or pruned)."""
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


class RunStatus(str, Enum):
    """Where one sweep point (an MLflow child run) stands."""

    NEW = "NEW"
    """Not in MLflow yet."""
    RUNNING = "RUNNING"
    """A driver is running its stages."""
    FINISHED = "FINISHED"
    """Every stage committed."""
    FAILED = "FAILED"
    """A stage failed; the run's error says which and why."""
    KILLED = "KILLED"
    """Stopped with unfinished work (Ctrl-C, SIGTERM, a dead driver): the next submit resumes it."""
    PRUNED = "PRUNED"
    """Its training was stopped by the pruner (MLflow status KILLED, tag ``gptlab.pruned``)."""

    def __str__(self) -> str:
        return self.value

    @property
    def mlflow(self) -> str:
        """The status MLflow records."""
        return "KILLED" if self is RunStatus.PRUNED else self.value

    @property
    def ended(self) -> bool:
        """Nothing is left to do for it unless something changes (a new stage, pruning switched off)."""
        return self in (RunStatus.FINISHED, RunStatus.PRUNED)


R = RunStatus
#: Every allowed change of a run's status, with what causes it (the table in the module docstring).
TRANSITIONS: dict[tuple[RunStatus, RunStatus], str] = {
    (R.NEW, R.RUNNING): "a submit creates the run and launches its stages",
    (R.RUNNING, R.FINISHED): "every stage committed",
    (R.RUNNING, R.FAILED): "a stage failed",
    (R.RUNNING, R.KILLED): "Ctrl-C or SIGTERM with unfinished work, or its driver was found dead",
    (R.RUNNING, R.PRUNED): "the pruner's recorded decision",
    (R.KILLED, R.RUNNING): "a re-submit resumes it",
    (R.FAILED, R.RUNNING): "a re-submit runs its failed stage again",
    (R.PRUNED, R.RUNNING): "a re-submit with pruning switched off resumes its training",
    (R.FINISHED, R.FAILED): "a stage added later failed",
}


class TransitionError(RuntimeError):
    """A change of status the table does not allow (a bug in gptlab, never a user's error)."""

    def __init__(self, current: str, new: str):
        super().__init__(f"a run cannot go from {current} to {new}")
        self.current, self.new = current, new

    def __reduce__(self):  # survives pickling with its fields
        return (type(self), (self.current, self.new))


def check_transition(current: RunStatus, new: RunStatus) -> RunStatus:
    """``new`` if a run may go there from ``current`` (staying put is always allowed), else TransitionError."""
    if current != new and (current, new) not in TRANSITIONS:
        raise TransitionError(current.value, new.value)
    return new


def resubmitted(previous: RunStatus, pruning: bool) -> RunStatus:
    """Where a re-submit takes a run that was ``previous``: an ended run stays ended (a FINISHED run's new stages
    run without reopening it; a pruned one stays pruned while the spec prunes); any other is RUNNING again."""
    if previous is RunStatus.FINISHED or (previous is RunStatus.PRUNED and pruning):
        return previous
    return check_transition(previous, RunStatus.RUNNING)


def mlflow_status(status: str, pruned_tag: str | None) -> RunStatus:
    """A run's status from what MLflow holds: its status and the ``gptlab.pruned`` tag."""
    if status == "KILLED" and pruned_tag == "true":
        return RunStatus.PRUNED
    return RunStatus(status) if status in RunStatus.__members__ else RunStatus.KILLED  # SCHEDULED: never ours


# ------------------------------------------------------------------------------------------- deciding


@dataclass(frozen=True)
class OnDisk:
    """What a stage directory says of the stage, read once."""

    committed: bool
    process: bool = False  # a stage that is a process of its own (training)
    checkpoint: int | None = None  # the step of its newest committed checkpoint
    pruned: int | None = None  # the step its recorded pruning decision stopped it at
    started: bool = False  # its process has written to its log since it was launched

    @classmethod
    def read(cls, stage_dir: Path, kind: StageKind, log_since: int | None = None) -> OnDisk:
        """The facts of one stage directory of a kind: what its kind says of a process (its log, its resume step);
        ``log_since``: the log's size when its process was launched."""
        from llmcore.io import is_committed

        if is_committed(stage_dir):
            return cls(True, kind.process)
        if not kind.process:
            return cls(False)
        size = file_size(stage_dir / kind.log) if kind.log else 0
        started = size > (log_since or 0)
        resume = kind.resume(stage_dir) if kind.resume else None
        return cls(False, True, resume, pruned_step(stage_dir), started)


def pruned_step(stage_dir: Path) -> int | None:
    """The step a recorded pruning decision stopped this training at, or None."""
    try:
        return int(json.loads((stage_dir / PRUNED_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def stage_state(disk: OnDisk, task: str | None = None, *, cached: bool = False, run: RunStatus | None = None,
                failed: bool = False, launching: bool = False, paused: bool = False) -> StageState:  # fmt: skip
    """The one decision of a stage's state.

    ``task``: the Parsl state of its live task in this driver (a training's: its process's while that runs);
    ``cached``: committed before this submit; ``run``: its run's status when no live task is known (another
    driver's RUNNING run); ``failed``: the run's recorded error names this stage; ``launching``: this driver is
    about to launch it (an interrupted training then shows as resuming); ``paused``: its run waits at a rung of
    successive halving."""
    if disk.committed:
        return StageState.CACHED if cached else StageState.DONE
    if (disk.pruned is not None or (run is RunStatus.PRUNED and disk.checkpoint is not None)) and not launching:
        return StageState.PRUNED  # (runs pruned before decisions were recorded on disk: by their MLflow tag)
    if paused and disk.checkpoint is not None:
        return StageState.PAUSED
    if task is not None:
        state = StageState.from_parsl(task)
        if state is StageState.DONE:  # its task returned without committing: its submit was halted first
            return StageState.TO_RUN
        return StageState.QUEUED if state is StageState.RUNNING and disk.process and not disk.started else state
    if run is RunStatus.RUNNING:
        return StageState.RUNNING if not disk.process or disk.started else StageState.QUEUED
    if failed:
        return StageState.FAILED
    if disk.checkpoint is not None:
        return StageState.RESUMING if launching else StageState.INTERRUPTED
    return StageState.TO_RUN


def after(state: StageState) -> StageState | None:
    """The state every later stage of a run takes when a stage is in ``state`` and no live task says otherwise
    (None: decide each on its own)."""
    return {
        StageState.RUNNING: StageState.WAITING,
        StageState.QUEUED: StageState.WAITING,
        StageState.FAILED: StageState.NOT_RUN,
        StageState.INTERRUPTED: StageState.TO_RUN,
        StageState.PRUNED: StageState.NOT_RUN,
        StageState.PAUSED: StageState.WAITING,
        StageState.TO_RUN: StageState.TO_RUN,
    }.get(state)


def run_stage_states(disks: dict[str, OnDisk], tasks: dict[str, str | None] | None = None, *,
                     cached: set[str] = frozenset(), run: RunStatus | None = None, failed: str | None = None,
                     launching: bool = False, paused: bool = False) -> dict[str, StageState]:  # fmt: skip
    """Every stage of a run (label -> state, in dependency order) by :func:`stage_state`; without a live task, a
    stage behind one that is not committed takes the state :func:`after` says (waiting behind a running one, not
    run behind a failed one, to run behind one to run)."""
    tasks = tasks or {}
    states: dict[str, StageState] = {}
    behind: StageState | None = None
    for label, disk in disks.items():
        task = tasks.get(label)
        if behind is not None and task is None and not disk.committed:
            states[label] = behind
            continue
        states[label] = stage_state(disk, task, cached=label in cached, run=run, failed=label == failed,
                                    launching=launching, paused=paused)  # fmt: skip
        if task is None and behind is None:
            behind = after(states[label])
    return states


def run_status(states: dict[str, StageState], interrupted: bool = False) -> RunStatus:
    """The one decision of a run's status from its stages' states: FINISHED when all committed, PRUNED when its
    training was pruned, FAILED when a stage failed, KILLED when interrupted with unfinished work, else RUNNING."""
    values = list(states.values())
    if all(s.finished for s in values):
        return RunStatus.FINISHED
    if StageState.PRUNED in values:
        return RunStatus.PRUNED
    if StageState.FAILED in values:
        return RunStatus.FAILED
    return RunStatus.KILLED if interrupted else RunStatus.RUNNING


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
