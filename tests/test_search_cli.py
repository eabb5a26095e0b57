"""A search seen by every command (`validate` its space and budget, `plan` its trials so far and the memory of the
largest model its space allows, `status SPEC` and `compare SPEC` every trial), and a re-submit that prints no
third-party warning: real submits on `site: local-processes` (Parsl worker processes), through the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import warnings

import pytest
from helpers import child_env, gptlab, kill_everything_under, make_corpus, tiny_spec, wait_for, write_spec
from typer.testing import CliRunner

from workflows.cli import app
from workflows.logfile import warnings_to

SPACE = {"train.lr": {"log_uniform": [1e-3, 1e-2]}, "model.n_layer": {"choice": [1, 2]},
         "model.n_embd": {"choice": [16, 32]}}  # fmt: skip


def search_tree(tmp_path, trials):
    tree = tiny_spec(make_corpus(tmp_path / "corpus", n_docs=10), tmp_path / "runs",
                     site={"name": "local-processes", "max_workers": 1},
                     train={"max_steps": 20, "eval_interval": 10, "checkpoint_interval": 20})  # fmt: skip
    tree["search"] = {"method": "random", "trials": trials, "max_parallel": 1, "space": SPACE}
    return tree


def cli(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    return r.output


def test_validate_and_plan_show_a_search_before_its_first_trial(tmp_path):
    from workflows.planning import param_count
    from workflows.spec import load_spec_tree

    tree = search_tree(tmp_path, 4)
    spec = write_spec(tmp_path / "s.yaml", tree)
    out = cli("validate", spec)
    assert f"{spec}: valid, a search of 4 trials" in out and "0 runs" not in out, out
    assert "Search: random, 4 trials, val/bpb (minimize)" in out and "model.n_embd: choice [16, 32]" in out, out
    out = cli("plan", spec)
    assert "Trials so far: 0 of 4; study " in out and "┃ run" not in out, out  # no empty tables
    largest = load_spec_tree({**tree, "search": None, "model": {**tree["model"], "n_layer": 2, "n_embd": 32}}, "t")
    params = param_count(largest.runs[0][2], tree["tokenizer"]["vocab_size"])
    assert "Largest model the space allows (" in out and "model.n_layer=2, model.n_embd=32)" in out, out
    assert f": {params / 1e6:.2f}M params, ddp x1: " in out, out


def test_warnings_go_to_the_log_file_not_the_terminal(tmp_path, capfd):
    log = tmp_path / "logs" / "warnings.log"
    with warnings_to(log):
        warnings.warn("a library's note", UserWarning, stacklevel=1)
    assert capfd.readouterr().err == ""
    assert "UserWarning: a library's note" in log.read_text()


@pytest.mark.slow
def test_a_search_is_listed_by_plan_status_and_compare(tmp_path):
    spec = write_spec(tmp_path / "s.yaml", search_tree(tmp_path, 2))
    r = gptlab("submit", spec, "--lines", cwd=tmp_path, env=child_env(), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    (journal,) = (tmp_path / "runs" / "studies").glob("*.journal")
    before = journal.read_bytes()
    out = cli("plan", spec)
    assert "Trials so far: 2 of 2 (2 complete)" in out, out
    for name in ("trial=0", "trial=1"):
        assert "done" in next(x for x in out.splitlines() if f"│ {name} " in x and "M " in x), out
    status = cli("status", spec)
    compare = cli("compare", spec)
    for name in ("trial=0", "trial=1"):
        assert "FINISHED" in next(x for x in status.splitlines() if f"│ {name} " in x), status
        assert "FINISHED" in next(x for x in compare.splitlines() if f"│ {name} " in x), compare
    assert journal.read_bytes() == before  # read, never written, by the commands that only look


@pytest.mark.slow
def test_a_resubmitted_pruned_grid_prints_no_warning(tmp_path):
    """A pruned grid's driver killed while a training has reported estimates to its trial: the next submit reads
    that training's metrics.jsonl from the start again, and reports only the estimates the trial lacks (Optuna
    printed a UserWarning for each one it already had)."""
    from workflows.planning import plan
    from workflows.search import recorded_trials
    from workflows.spec import load_spec

    tree = tiny_spec(make_corpus(tmp_path / "corpus", n_docs=10), tmp_path / "runs",
                     site={"name": "local-processes", "max_workers": 1},
                     train={"max_steps": 600, "eval_interval": 20, "eval_batches": 2, "checkpoint_interval": 40,
                            "min_lr": 1e-5},
                     sweep={"train.lr": [3e-3, 1e-5], "prune": {"min_steps": 40, "reduction_factor": 2}})  # fmt: skip
    spec = write_spec(tmp_path / "s.yaml", tree)
    p = plan(load_spec(spec))
    first = subprocess.Popen([sys.executable, "-m", "workflows.cli", "submit", str(spec), "--lines"], cwd=tmp_path,
                             env=child_env(), stdout=open(tmp_path / "first.log", "w"), stderr=subprocess.STDOUT,
                             start_new_session=True)  # fmt: skip
    try:
        wait_for(lambda: any(len(t.intermediate_values) >= 2 for t in recorded_trials(p)), 300,
                 "two validation estimates reported to a trial", every=0.2)  # fmt: skip
        wait_for(lambda: list((tmp_path / "runs" / "stages").glob("train-*/checkpoints/step_*/DONE.json")), 300,
                 "a checkpoint to resume from")  # fmt: skip
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
        kill_everything_under(tmp_path / "runs", [])  # its training, orphaned
        again = gptlab("submit", spec, "--lines", cwd=tmp_path, env=child_env(), timeout=600)
    finally:
        kill_everything_under(tmp_path, [first])
    out = again.stdout + again.stderr
    assert again.returncode == 0, out
    assert "resuming from step" in out, out  # the killed trial was run again
    assert not [line for line in out.splitlines() if "Warning" in line], out
    log = tmp_path / "runs" / "logs" / "warnings.log"
    assert not log.exists() or "already reported" not in log.read_text()  # the cause fixed, not only hidden
