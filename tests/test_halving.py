"""Successive halving that waits (`prune: {method: sha}`, workflows/rungs.py): the rung arithmetic, decisions that
do not depend on the order points come in, a journal that survives a killed driver, and real submits on
`local-processes` where every point pauses at each rung and only the promoted ones resume."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys

import pytest
from helpers import child_env, gptlab, kill_everything_under, make_corpus, records, tiny_spec, wait_for, write_spec
from mlflow.tracking import MlflowClient

from workflows.query import stage_dirs, training_dir
from workflows.rungs import Halving, Journal, halving_cost, rung_steps, survivors


def test_rungs_and_survivors():
    assert rung_steps(25, 3, 250) == [25, 75, 225, 250]
    assert rung_steps(10, 2, 40) == [10, 20, 40]
    assert rung_steps(50, 3, 40) == [40]  # a first rung past the end: train to the end
    assert [survivors(n, 3) for n in (16, 5, 1)] == [5, 1, 1]
    assert halving_cost(16, [25, 75, 225, 250], 3) == (16 * 25 + 5 * 50 + 1 * 150 + 1 * 25, 16 * 250)


def test_a_rung_waits_for_every_point_and_its_decision_does_not_depend_on_the_order(tmp_path):
    scores = {f"p{i}": s for i, s in enumerate([3.0, 1.0, 2.0, 5.0, 4.0, 0.5, 2.5, 6.0])}
    decided = []
    for seed in range(5):
        order = list(scores)
        random.Random(seed).shuffle(order)
        h = Halving(order, [10, 20, 40], 2, Journal(tmp_path / f"j{seed}.jsonl"))
        assert h.target("p0") == 10
        assert h.decide({k: scores[k] for k in order[:-1]}) == []  # a straggler: nothing decided yet
        first = h.decide({k: scores[k] for k in order})
        assert sorted(d.run for d in first if d.promoted) == ["p1", "p2", "p5", "p6"]
        assert h.target("p5") == 20 and "p7" in h.pruned
        second = h.decide({k: scores[k] for k in ("p1", "p2", "p5", "p6")})
        assert sorted(d.run for d in second if d.promoted) == ["p1", "p5"] and h.target("p5") is None
        assert h.decide({"p1": 0.1, "p5": 0.2}) == []  # the last rung is the end of training: nothing to decide
        decided.append(sorted((d.run, d.rung, d.promoted) for d in first + second))
    assert all(d == decided[0] for d in decided)


def test_a_failed_point_is_not_promoted_and_the_journal_replays_every_decision(tmp_path):
    path = tmp_path / "rungs.jsonl"
    h = Halving(["a", "b", "c", "d"], [10, 20, 40], 2, Journal(path))
    h.decide({"a": 1.0, "b": None, "c": 0.5, "d": 2.0})
    with open(path, "a") as f:
        f.write('{"run": "a", "ru')  # a driver killed while writing: a torn line is no decision
    again = Halving(["a", "b", "c", "d"], [10, 20, 40], 2, Journal(path))
    assert again.rung == {"a": 1, "b": 0, "c": 1, "d": 0} and set(again.pruned) == {"b", "d"}
    assert again.decide({"a": 1.0}) == []  # c has not reported at rung 1 yet


def test_sha_is_refused_on_a_search(tmp_path):
    from workflows.spec import SpecError, load_spec

    tree = tiny_spec(make_corpus(tmp_path / "c"), tmp_path / "runs")
    tree["search"] = {"trials": 4, "space": {"train.lr": {"log_uniform": [1e-3, 1e-2]}},
                      "prune": {"method": "sha", "min_steps": 10}}  # fmt: skip
    with pytest.raises(SpecError, match="search.prune: .*sha waits for every point"):
        load_spec(write_spec(tmp_path / "s.yaml", tree))


# --------------------------------------------------------------------------------------------- real submits

LRS = [0.0005, 0.002, 0.004, 0.008]


def sha_spec(tmp_path, max_workers: int = 2):
    site = {"name": "local-processes", "max_workers": max_workers, "heartbeat_threshold_s": 10}
    train = {"max_steps": 40, "eval_interval": 40, "checkpoint_interval": 40, "warmup_steps": 2}
    tree = tiny_spec(make_corpus(tmp_path / "corpus"), tmp_path / "runs", site=site, train=train)
    tree["sweep"] = {"train.lr": LRS, "prune": {"method": "sha", "min_steps": 10, "reduction_factor": 2}}
    return write_spec(tmp_path / "sha.yaml", tree)


def outcome(tmp_path):
    """run name -> (status, pruned tag, rung tag, the steps its training reached)."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")
    out = {}
    for r in client.search_runs([exp.experiment_id], "tags.`gptlab.role` = 'sweep_point'"):
        steps = max(x["step"] for x in records(training_dir(stage_dirs(r, tmp_path / "runs"))))
        out[r.info.run_name] = (r.info.status, r.data.tags.get("gptlab.pruned"), r.data.tags.get("gptlab.rung"), steps)
    return out


def journal_of(tmp_path) -> list[dict]:
    (path,) = (tmp_path / "runs" / "studies").glob("*.rungs.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_sha_pauses_every_point_at_each_rung_and_resumes_only_the_best(tmp_path):
    r = gptlab("submit", sha_spec(tmp_path), "--lines", cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    got = outcome(tmp_path)
    finished = [n for n, o in got.items() if o[0] == "FINISHED"]
    assert len(finished) == 1 and got[finished[0]][3] == 40
    assert sorted(o[3] for o in got.values()) == [10, 10, 20, 40]  # each stopped at the rung that pruned it
    assert all(o[1] == "true" for n, o in got.items() if n not in finished)
    decisions = journal_of(tmp_path)
    assert [(d["rung"], d["promoted"]) for d in decisions].count((0, True)) == 2 and len(decisions) == 6
    assert "paused at rung 0" in r.stdout and "promoted past rung 0" in r.stdout
    assert sorted(o[2] for o in got.values()) == ["0", "0", "1", "2"]  # each run says the rung it reached
    import csv

    (table,) = (tmp_path / "runs" / "reports").glob("sweep-*/sweep.csv")  # the parent run's summary/sweep.csv
    rows = list(csv.DictReader(table.open()))
    assert sorted(int(row["rung"]) for row in rows) == [0, 0, 1, 2]
    assert (table.parent / "loss_curves.png").is_file()


@pytest.mark.slow
def test_a_driver_killed_mid_bracket_is_continued_and_no_point_trains_past_a_rung_twice(tmp_path):
    spec = sha_spec(tmp_path, max_workers=1)
    driver = subprocess.Popen([sys.executable, "-m", "workflows.cli", "submit", str(spec), "--lines"], cwd=tmp_path,
                              env=child_env(), stdout=open(tmp_path / "first.log", "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)  # fmt: skip
    try:
        studies = tmp_path / "runs" / "studies"
        wait_for(
            lambda: any(studies.glob("*.rungs.jsonl")) and len(journal_of(tmp_path)) >= 4, 600, "rung 0's decisions"
        )
        os.killpg(driver.pid, signal.SIGKILL)  # mid-bracket: rung 0 decided, its promoted points resuming
        driver.wait(timeout=30)
        kill_everything_under(tmp_path / "runs", [])
        before = journal_of(tmp_path)
        r = gptlab("submit", spec, "--lines", cwd=tmp_path, timeout=900)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        kill_everything_under(tmp_path, [driver])
    decisions = journal_of(tmp_path)
    assert decisions[: len(before)] == before  # the re-submit continued the journal, deciding nothing again
    assert len({(d["run"], d["rung"]) for d in decisions}) == len(decisions) == 6
    got = outcome(tmp_path)
    assert sorted(o[3] for o in got.values()) == [10, 10, 20, 40]
    assert [o[0] for o in got.values()].count("FINISHED") == 1
