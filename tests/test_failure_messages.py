"""What a user reads when a sweep point's training fails: one line per failed run naming the stage, the exit code
and the decisive cause (the final exception of the training's log) with the log's path, in `gptlab submit`'s
summary and in `gptlab status`; in submit only, followed by the end of the log under a header naming it.

A real submit through a real Parsl executor into a real MLflow store. Two sweep points fail in two ways, on any
hardware: one has a `checkpoints` file where its training must make a directory (an unhandled exception when it
saves its first checkpoint: exit code 1, retried), the other a `train.freeze` pattern that matches no parameter (an
error training handles: exit code 2, bad input, not retried).
"""

from __future__ import annotations

import re

import pytest
from helpers import gptlab, make_corpus, tiny_spec, write_spec
from mlflow.tracking import MlflowClient

from workflows.trainlog import exit_meaning, failure_cause, last_try, lines_before

slow = pytest.mark.slow  # the tests on the `failed` fixture: a real submit of two failing sweep points

BROKEN, NO_MATCH = "freeze=[]", "freeze=['nomatch.*']"


@pytest.fixture(scope="module")
def failed(tmp_path_factory):
    from workflows.planning import plan
    from workflows.spec import load_spec

    tmp = tmp_path_factory.mktemp("failing")
    tree = tiny_spec(
        make_corpus(tmp / "corpus"),
        tmp / "runs",
        site={"retries": 1},
        train={"max_steps": 4, "warmup_steps": 1, "eval_interval": 4, "checkpoint_interval": 4},
        sweep={"train.freeze": [[], ["nomatch.*"]]},
    )
    spec = write_spec(tmp / "s.yaml", tree)
    train_dir = next(r for r in plan(load_spec(spec)).runs if r.name == BROKEN).stages["train"].dir
    train_dir.mkdir(parents=True)
    (train_dir / "checkpoints").write_text("a file where training makes its checkpoint directories\n")
    submit = gptlab("submit", spec, "--lines")
    return {
        "spec": spec,
        "submit": submit,
        "status": gptlab("status", spec),
        "train_dir": train_dir,
        "runs_root": tmp / "runs",
    }


def exception_line(train_dir) -> str:
    from llmcore.checkpoint import step_dir

    return f"NotADirectoryError: [Errno 20] Not a directory: '{step_dir(train_dir, 4)}'"


@slow
def test_submit_names_the_cause_once_with_the_log_path_then_the_log_tail(failed):
    r, train_dir = failed["submit"], failed["train_dir"]
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    log = train_dir / "train.log"
    cause = exception_line(train_dir)
    assert out.count(cause) == 1, out  # the decisive line once, not once per try nor again in the tail
    line = next(x for x in r.stderr.splitlines() if x.startswith(f"[{BROKEN}] "))
    assert line == f"[{BROKEN}] stage train failed (exit code 1; tried 2 times): {cause} (full log: {log})", line
    # the tail comes after its header, which names the log; it is the traceback leading to the cause, whole
    lines = r.stderr.splitlines()
    at = lines.index(line)
    assert re.fullmatch(rf"--- {re.escape(str(log))}: the last \d+ lines before that error ---", lines[at + 1]), lines
    assert lines[at + 2] == "Traceback (most recent call last):"
    tail = lines[at + 2 : lines.index(next(x for x in lines[at + 2 :] if x.startswith(f"[{NO_MATCH}]")))]
    assert 5 < len(tail) <= 30 and any("save_checkpoint" in x for x in tail), tail
    assert out.count("Traceback (most recent call last):") == 1, out  # one try's traceback, once
    assert "--- end of" not in out and "BashExitFailure" not in out and "executable follows" not in out
    assert "Traceback" not in r.stdout


@slow
def test_an_error_training_handles_is_one_line_with_the_meaning_of_its_exit_code(failed):
    r = failed["submit"]
    line = next(x for x in r.stderr.splitlines() if x.startswith(f"[{NO_MATCH}] "))
    assert line.startswith(f"[{NO_MATCH}] stage train failed (exit code 2: bad input, not retried): "), line
    assert "train.freeze: 'nomatch.*' matches no parameter" in line and line.endswith("/train.log)")
    assert ": error:" not in line and "; tried" not in line
    assert (r.stdout + r.stderr).count("matches no parameter") == 1
    after = r.stderr.splitlines()[r.stderr.splitlines().index(line) + 1 :]
    assert not after or not after[0].startswith("---"), "no empty tail under a header"


@slow
def test_mlflow_records_the_one_line_cause_and_status_shows_it(failed):
    client = MlflowClient(f"sqlite:///{failed['runs_root'] / 'mlflow.db'}")
    runs = {x.info.run_name: x for x in client.search_runs([client.get_experiment_by_name("tiny").experiment_id])}
    log = failed["train_dir"] / "train.log"
    recorded = runs[BROKEN].data.tags["gptlab.error"]
    assert (
        recorded == f"stage train failed (exit code 1; tried 2 times): {exception_line(failed['train_dir'])} "
        f"(full log: {log})"
    )
    assert runs[NO_MATCH].data.tags["gptlab.error"].count("\n") == 0
    parent = runs["tiny"].data.tags["gptlab.error"]
    assert "\n" not in parent and exception_line(failed["train_dir"]) in parent and "matches no parameter" in parent
    s = failed["status"]
    assert s.returncode == 0, s.stderr
    assert f"[{BROKEN}] {recorded}\n" in s.stdout, s.stdout
    assert f"[{NO_MATCH}] stage train failed (exit code 2: bad input, not retried): " in s.stdout
    assert "BashExitFailure" not in s.stdout and "Traceback" not in s.stdout
    row = next(x for x in s.stdout.splitlines() if BROKEN in x and "│" in x)
    assert "failed" in row and "not run" in row


# ---------------------------------------------------------------------------- reading a training's log


PARSL = "--> executable follows <--\nenv python -m llmcore.train ...\n--> end executable <--\n"


def test_the_last_try_and_its_final_exception_are_found_after_a_chained_traceback():
    first = PARSL + "Traceback (most recent call last):\n  File \"a.py\", line 1\nKeyError: 'first try'\n"
    last = (
        PARSL + 'warming up\nTraceback (most recent call last):\n  File "a.py", line 1, in f\n    g()\n'
        "KeyError: 'x'\n\nDuring handling of the above exception, another exception occurred:\n\n"
        "Traceback (most recent call last):\n  File \"a.py\", line 3, in h\n    raise RuntimeError('y')\n"
        "RuntimeError: y\n\n"
    )
    lines = last_try(first + last)
    assert "KeyError: 'first try'" not in lines and lines[0] == "warming up"
    cause, at = failure_cause(lines)
    assert cause == "RuntimeError: y" and lines[at] == cause
    tail = lines_before(lines, at, 18)
    assert tail[0] == "warming up" and tail[-1] == "    raise RuntimeError('y')"
    assert lines_before(lines, at, 2)[0] == "Traceback (most recent call last):"  # a short one is shown whole
    deep = last_try(
        PARSL
        + "Traceback (most recent call last):\n"
        + "".join(f'  File "a.py", line {i}, in f{i}\n    f{i + 1}()\n' for i in range(20))
        + "RecursionError: deep\n"
    )
    cause, at = failure_cause(deep)
    assert cause == "RecursionError: deep"
    for n in (5, 6):  # a long one is cut at a frame, never inside one
        cut = lines_before(deep, at, n)
        assert cut[0].startswith("  File ") and len(cut) in (n, n - 1) and cut[-1] == "    f20()", cut


def test_handled_errors_join_their_lines_and_exit_codes_say_what_they_mean():
    lines = last_try(PARSL + "invalid training config:\n  train.json: model.n_head: bad\n  train.json: x: y\n")
    assert failure_cause(lines) == ("invalid training config: train.json: model.n_head: bad; train.json: x: y", 0)
    lines = last_try(PARSL + "error: shard s.bin: sha256 differs\nthe shards directory is damaged: delete d\n")
    assert failure_cause(lines)[0] == "shard s.bin: sha256 differs; the shards directory is damaged: delete d"
    assert failure_cause(last_try(PARSL)) == (None, 0)
    assert failure_cause(last_try(PARSL + '{"steps": 3, "stopped_early": true}\n'))[0] is None
    assert exit_meaning(2) == "bad input, not retried" and "submit again" in exit_meaning(75)
    assert exit_meaning(-9).startswith("killed by SIGKILL") and exit_meaning(137).startswith("killed by SIGKILL")
    assert exit_meaning(1) is None
