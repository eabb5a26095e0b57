"""HyperBand on a search (`search.prune: {method: hyperband}`, workflows/rungs.py): the bracket arithmetic (Li et
al.'s brackets, the trial budget shared between them), brackets that decide only once all their trials were asked
for, the spec's checks, and real submits on `local-processes`: each bracket's trials pause at its rungs, the
promoted ones resume from their checkpoints, the others end PRUNED, and a driver SIGKILLed mid-bracket is
continued by a re-submit without any trial training past a rung twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from helpers import child_env, gptlab, kill_everything_under, make_corpus, records, tiny_spec, wait_for, write_spec
from mlflow.tracking import MlflowClient

from workflows.query import stage_dirs, training_dir
from workflows.rungs import (
    Hyperband,
    Journal,
    Layout,
    bracket_count,
    brackets,
    hyperband_rungs,
    li_trials,
    split_trials,
)

# ------------------------------------------------------------------------------------------ arithmetic


def test_brackets_are_li_et_al_s():
    assert bracket_count(25, 3, 250) == 3  # s_max = floor(log3(250 / 25)) = 2
    assert bracket_count(1, 3, 81) == 5 and bracket_count(10, 2, 40) == 3 and bracket_count(50, 3, 40) == 1
    assert li_trials(4, 3) == [81, 34, 15, 8, 5]  # the paper's Table 1 (R = 81, eta = 3)
    assert li_trials(2, 3) == [9, 5, 3]
    assert [hyperband_rungs(s, 3, 81) for s in (4, 1, 0)] == [[1, 3, 9, 27, 81], [27, 81], [81]]
    assert hyperband_rungs(2, 3, 250) == [27, 83, 250]  # r_s = max_steps * eta**-s, rounded down
    layout = brackets([17], 25, 3, 250)  # exactly one pass of the paper's brackets
    assert [(b.s, b.first, b.trials, b.rungs) for b in layout] == [
        (2, 0, 9, (27, 83, 250)),
        (1, 9, 5, (83, 250)),
        (0, 14, 3, (250,)),
    ]


def test_the_trial_budget_is_shared_between_the_brackets_as_li_et_al_s_trials_are():
    for trials in range(3, 60):
        n = split_trials(trials, [9, 5, 3])
        assert sum(n) == trials and min(n) >= 1
        assert n[0] >= n[1] >= n[2]  # the bracket with the most rungs gets the most trials
    assert split_trials(16, [9, 5, 3]) == [8, 5, 3] and split_trials(34, [9, 5, 3]) == [18, 10, 6]
    layout = brackets([16, 5], 10, 2, 40)  # a second submit raised search.trials from 16 to 21: a second round
    assert [b.first for b in layout] == [0, 6, 11, 16, 18, 20] and sum(b.trials for b in layout) == 21
    assert [b.s for b in layout] == [2, 1, 0, 2, 1, 0]


def test_a_bracket_decides_once_all_its_trials_were_asked_for_and_the_journal_continues_it(tmp_path):
    layout = brackets([5], 10, 2, 40)  # brackets of 2, 2 and 1 trials
    path = tmp_path / "rungs.jsonl"
    hb = Hyperband(layout, 2, Journal(path))
    assert [hb.add(f"t{i}", i) for i in range(3)] == [0, 0, 1]
    assert hb.target("t0") == 10 and hb.target("t2") == 20  # bracket 1 starts at max_steps / 2
    hb.asked(3)
    assert [d.run for d in hb.decide({"t0": 2.0, "t1": 1.0, "t2": 0.5})] == ["t0", "t1"]  # bracket 1 is open
    assert hb.pruned == {"t0": 0} and hb.target("t1") == 20
    hb.asked(4)
    hb.add("t3", 3)
    # bracket 0's rung 1 (step 20) promotes its one trial to the end; bracket 1 waits for t3
    assert [(d.run, d.rung, d.promoted) for d in hb.decide({"t1": 0.9, "t2": 0.5})] == [("t1", 1, True)]
    assert hb.target("t1") is None and hb.decide({"t1": 0.8, "t2": 0.5}) == []
    assert [(d.run, d.promoted) for d in hb.decide({"t2": 0.5, "t3": 0.7})] == [("t2", True), ("t3", False)]
    again = Hyperband(layout, 2, Journal(path))  # a re-submit: every decision replayed, none taken twice
    for i in range(5):
        again.add(f"t{i}", i)
    again.asked(5)
    assert again.pruned == {"t0": 0, "t3": 0} and again.rung["t1"] == 2 and again.target("t2") is None
    assert again.decide({"t1": 0.9, "t2": 0.4}) == [] and again.target("t4") is None


def test_the_layout_is_kept_and_grows_only(tmp_path):
    layout = Layout(tmp_path / "b.json")
    assert layout.rounds() == [] and layout.grow(6) == [6] and layout.grow(4) == [6] and layout.grow(9) == [6, 3]
    assert json.loads((tmp_path / "b.json").read_text()) == {"rounds": [6, 3]}


# ------------------------------------------------------------------------------------------ the spec


def hb_tree(tmp_path, trials=5, max_parallel=2, **prune):
    site = {"name": "local-processes", "max_workers": 2, "heartbeat_threshold_s": 10}
    train = {"max_steps": 40, "eval_interval": 40, "checkpoint_interval": 40, "warmup_steps": 2}
    tree = tiny_spec(make_corpus(tmp_path / "corpus"), tmp_path / "runs", site=site, train=train)
    tree["search"] = {"method": "random", "trials": trials, "max_parallel": max_parallel,
                      "space": {"train.lr": {"log_uniform": [5e-4, 1e-2]}},
                      "prune": {"method": "hyperband", "min_steps": 10, "reduction_factor": 2, **prune}}  # fmt: skip
    return tree


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ("grid", "sweep.prune: method hyperband shares a search's trials between brackets: use it under "
         "search"),
        ("sha", "search.prune: method sha waits for every point at each rung"),
        ("few", "search.trials: hyperband with min_steps 10, reduction_factor 2 and train.max_steps 40 has 3 brackets"),
        ("steps", "search.space.train.max_steps: hyperband's rungs are steps of train.max_steps"),
    ],
)  # fmt: skip
def test_hyperband_only_on_a_search_and_sha_only_on_a_grid_exit_2_naming_the_field(tmp_path, change, field):
    tree = hb_tree(tmp_path)
    if change == "grid":
        tree["sweep"] = {"train.lr": [1e-3, 2e-3], "prune": tree.pop("search")["prune"]}
    elif change == "sha":
        tree["search"]["prune"]["method"] = "sha"
    elif change == "few":
        tree["search"]["trials"] = 2
    else:
        tree["search"]["space"]["train.max_steps"] = {"int_uniform": [20, 40]}
    spec = write_spec(tmp_path / "hb.yaml", tree)
    r = gptlab("validate", spec, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert field in r.stderr.replace("\n", " ") and str(spec) in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_plan_shows_the_brackets(tmp_path):
    r = gptlab("plan", write_spec(tmp_path / "hb.yaml", hb_tree(tmp_path, trials=12)), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "HyperBand (reduction factor 2, min_steps 10): 3 bracket(s) of successive halving over 12 trials; at " \
           "most 40 steps for any trial" in r.stdout  # fmt: skip
    assert "bracket 0 (s=2): trials 0-4 (5), rungs at steps (trials reaching them): 10 (5), 20 (2), 40 (1)" in r.stdout
    assert "bracket 2 (s=0): trials 9-11 (3), rungs at steps (trials reaching them): 40 (3)" in r.stdout


# ------------------------------------------------------------------------------------------ real submits


def outcome(tmp_path):
    """run name -> (status, pruned tag, bracket tag, rung tag, train steps logged, the steps its training reached)."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")
    out = {}
    for r in client.search_runs([exp.experiment_id], "tags.`gptlab.role` = 'sweep_point'"):
        lines = records(training_dir(stage_dirs(r, tmp_path / "runs")))
        trained = [x["step"] for x in lines]
        tags = r.data.tags
        out[r.info.run_name] = (r.info.status, tags.get("gptlab.pruned"), tags.get("gptlab.bracket"),
                                tags.get("gptlab.rung"), trained, max(x["step"] for x in lines))  # fmt: skip
    return out


def journal_of(tmp_path) -> list[dict]:
    (path,) = (tmp_path / "runs" / "studies").glob("*.rungs.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def study_states(tmp_path) -> list[str]:
    import optuna

    (journal,) = (tmp_path / "runs" / "studies").glob("*.journal")
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    (summary,) = optuna.get_all_study_summaries(storage)
    return sorted(t.state.name for t in optuna.load_study(study_name=summary.study_name, storage=storage).trials)


def check_brackets(tmp_path, resumed_once: bool = True):
    """5 trials in brackets of 2 (rungs 10, 20, 40), 2 (20, 40) and 1 (40): one pruned at step 10, one at 20.
    ``resumed_once``: no training was killed, so every step was trained once."""
    got = outcome(tmp_path)
    assert len(got) == 5
    assert sorted(o[5] for o in got.values()) == [10, 20, 40, 40, 40]  # each stopped at the rung that pruned it
    assert sorted((o[2], o[0], o[1], o[3]) for o in got.values()) == [
        ("0", "FINISHED", None, "2"), ("0", "KILLED", "true", "0"),  # bracket 0: rungs 0 (10), 1 (20), 2 (40)
        ("1", "FINISHED", None, "1"), ("1", "KILLED", "true", "0"),  # bracket 1: rungs 0 (20), 1 (40)
        ("2", "FINISHED", None, "0"),
    ]  # fmt: skip
    for name, o in got.items():  # promoted trials resumed from their checkpoints (a restart would log step 1 again)
        assert o[4][-1] == o[5] and (o[4] == sorted(set(o[4])) or not resumed_once), (name, o[4])
    decisions = journal_of(tmp_path)
    assert len({(d["run"], d["rung"]) for d in decisions}) == len(decisions) == 5
    assert study_states(tmp_path) == ["COMPLETE", "COMPLETE", "COMPLETE", "PRUNED", "PRUNED"]
    return got


@pytest.mark.slow
def test_a_hyperband_search_runs_its_brackets_and_resumes_the_promoted_trials(tmp_path):
    spec = write_spec(tmp_path / "hb.yaml", hb_tree(tmp_path))
    r = gptlab("submit", spec, "--lines", cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    check_brackets(tmp_path)
    assert "paused at rung 0" in r.stdout and "promoted past rung 0" in r.stdout
    assert "new trial (bracket 2)" in r.stdout
    again = gptlab("submit", spec, "--lines", cwd=tmp_path, timeout=300)  # finished work is not redone
    assert again.returncode == 0, again.stdout + again.stderr
    assert len(journal_of(tmp_path)) == 5 and "new trial" not in again.stdout


@pytest.mark.slow
def test_a_driver_killed_mid_bracket_is_continued_and_no_trial_trains_past_a_rung_twice(tmp_path):
    spec = write_spec(tmp_path / "hb.yaml", hb_tree(tmp_path, max_parallel=1))
    driver = subprocess.Popen([sys.executable, "-m", "workflows.cli", "submit", str(spec), "--lines"], cwd=tmp_path,
                              env=child_env(), stdout=open(tmp_path / "first.log", "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)  # fmt: skip
    try:
        studies = tmp_path / "runs" / "studies"
        wait_for(lambda: any(studies.glob("*.rungs.jsonl")) and len(journal_of(tmp_path)) >= 2, 600,
                 "bracket 0's first rung decided")  # fmt: skip
        os.killpg(driver.pid, signal.SIGKILL)  # mid-bracket: its promoted trial resuming, bracket 1 not started
        driver.wait(timeout=30)
        kill_everything_under(tmp_path / "runs", [])
        before = journal_of(tmp_path)
        assert len(before) < 5
        r = gptlab("submit", spec, "--lines", cwd=tmp_path, timeout=900)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        kill_everything_under(tmp_path, [driver])
    assert journal_of(tmp_path)[: len(before)] == before  # continued, nothing decided again
    check_brackets(tmp_path, resumed_once=False)
