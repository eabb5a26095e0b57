"""The one state machine (workflows.states): every transition of a run's status, allowed and refused, where a
re-submit takes a run, and how a stage's state is decided from its directory and its live task."""

from __future__ import annotations

import itertools

import pytest

from workflows.states import (
    TRANSITIONS,
    OnDisk,
    RunStatus,
    StageState,
    TransitionError,
    check_transition,
    resubmitted,
    run_stage_states,
    run_status,
    stage_state,
)

R = RunStatus
ALLOWED = sorted(TRANSITIONS, key=str)
REFUSED = [(a, b) for a, b in itertools.product(RunStatus, RunStatus) if a != b and (a, b) not in TRANSITIONS]


def test_the_docstring_table_is_the_transition_table():
    import workflows.states as states

    rows = {tuple(line.split()[:2]) for line in states.__doc__.splitlines() if line[:1].isupper() and "  " in line}
    assert rows == {(a.value, b.value) for a, b in TRANSITIONS}


@pytest.mark.parametrize(("current", "new"), ALLOWED)
def test_allowed_transitions(current, new):
    assert check_transition(current, new) is new


@pytest.mark.parametrize(("current", "new"), REFUSED)
def test_refused_transitions(current, new):
    with pytest.raises(TransitionError, match=f"from {current.value} to {new.value}"):
        check_transition(current, new)


def test_refused_includes_the_downgrades_a_resubmit_used_to_make():
    assert (R.FINISHED, R.RUNNING) in REFUSED and (R.FINISHED, R.KILLED) in REFUSED and (R.NEW, R.KILLED) in REFUSED


@pytest.mark.parametrize(
    ("previous", "pruning", "now"),
    [(R.FINISHED, True, R.FINISHED), (R.FINISHED, False, R.FINISHED), (R.PRUNED, True, R.PRUNED),
     (R.PRUNED, False, R.RUNNING), (R.KILLED, True, R.RUNNING), (R.FAILED, False, R.RUNNING)],
)  # fmt: skip
def test_a_resubmit_never_downgrades_an_ended_run(previous, pruning, now):
    assert resubmitted(previous, pruning) is now


def test_a_transition_error_survives_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(TransitionError("FINISHED", "RUNNING")))
    assert (err.current, err.new) == ("FINISHED", "RUNNING")


TRAIN = dict(process=True)


@pytest.mark.parametrize(
    ("disk", "kwargs", "state"),
    [
        (OnDisk(True), {}, StageState.DONE),
        (OnDisk(True), {"cached": True, "task": "failed"}, StageState.CACHED),  # the marker decides
        (OnDisk(False, **TRAIN, checkpoint=40, pruned=40), {}, StageState.PRUNED),
        (OnDisk(False, **TRAIN, checkpoint=40, pruned=40), {"launching": True}, StageState.RESUMING),
        (OnDisk(False, **TRAIN, checkpoint=40), {}, StageState.INTERRUPTED),
        (OnDisk(False, **TRAIN, checkpoint=40), {"run": R.PRUNED}, StageState.PRUNED),
        (OnDisk(False, **TRAIN), {"task": "running"}, StageState.QUEUED),  # its process has not written yet
        (OnDisk(False, **TRAIN, started=True), {"task": "running"}, StageState.RUNNING),
        (OnDisk(False), {"task": "pending"}, StageState.WAITING),
        (OnDisk(False), {"task": "exec_done"}, StageState.TO_RUN),  # returned without committing: halted
        (OnDisk(False), {"task": "dep_fail"}, StageState.NOT_RUN),
        (OnDisk(False), {"run": R.RUNNING}, StageState.RUNNING),
        (OnDisk(False, **TRAIN), {"run": R.RUNNING}, StageState.QUEUED),
        (OnDisk(False), {"failed": True}, StageState.FAILED),
        (OnDisk(False), {}, StageState.TO_RUN),
    ],
)
def test_stage_state(disk, kwargs, state):
    assert stage_state(disk, **kwargs) is state


def test_stages_behind_one_not_done_follow_it():
    disks = {"tokenizer": OnDisk(True), "train": OnDisk(False, True, checkpoint=20), "eval": OnDisk(False)}
    assert list(run_stage_states(disks).values()) == [StageState.DONE, StageState.INTERRUPTED, StageState.TO_RUN]
    failed = run_stage_states({"a": OnDisk(True), "b": OnDisk(False), "c": OnDisk(False)}, failed="b")
    assert list(failed.values()) == [StageState.DONE, StageState.FAILED, StageState.NOT_RUN]


@pytest.mark.parametrize(
    ("states", "interrupted", "status"),
    [
        ([StageState.DONE, StageState.CACHED], True, R.FINISHED),  # finished work is never KILLED
        ([StageState.DONE, StageState.PRUNED, StageState.NOT_RUN], True, R.PRUNED),
        ([StageState.DONE, StageState.FAILED], False, R.FAILED),
        ([StageState.DONE, StageState.INTERRUPTED], True, R.KILLED),
        ([StageState.DONE, StageState.TO_RUN], True, R.KILLED),
        ([StageState.DONE, StageState.RUNNING], False, R.RUNNING),
    ],
)
def test_run_status(states, interrupted, status):
    assert run_status(dict(zip("abcd", states)), interrupted) is status
