"""Nothing lost when the tracking server goes away: a real training submitted (`gptlab submit`) to a real team server
(tests/teamserver.py: basic-auth MLflow on PostgreSQL); mid-training the MLflow server is killed and started again
on the same port (and, in the second test, the PostgreSQL cluster under it is stopped and started). The driver
keeps training, says the outage once it passes `tracking.outage_report_s`, records it on the run, and in the end
every metric of every line of metrics.jsonl is in MLflow exactly once (per key and step)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter

import pytest
from helpers import make_corpus, tiny_spec, wait_for, write_spec
from mlflow.tracking import MlflowClient
from teamserver import CLUSTER, as_user, cluster, team_server  # noqa: F401 (a fixture)

from llmcore.metrics import read_metrics

pytestmark = pytest.mark.slow
OUTAGE_S = 12  # how long the server stays away; past outage_report_s below
REPORT_S = 4


def start_submit(server, tmp, experiment: str) -> tuple[subprocess.Popen, object]:
    corpus = make_corpus(tmp / "corpus")
    # A training of 2500 steps, each logged: it must outlive the outage (a quiet machine ran 1000 of them before a
    # PostgreSQL stop had finished).
    tree = tiny_spec(corpus, tmp / "runs", tracking={"uri": server.uri, "experiment": experiment,
                                                     "outage_report_s": REPORT_S},
                     model={"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64},
                     train={"max_steps": 2500, "eval_interval": 100, "checkpoint_interval": 1250,
                            "batch_size": 16})  # fmt: skip
    tree["name"] = experiment
    spec = write_spec(tmp / "s.yaml", tree)
    log = (tmp / "submit.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "workflows.cli", "submit", str(spec), "--lines"], stdout=log,
                            stderr=subprocess.STDOUT, env=server.env())  # fmt: skip
    return proc, log


def lines_of(tmp) -> list:
    files = list((tmp / "runs").rglob("metrics.jsonl"))
    return [r for f in files for r in read_metrics(f)]


def through_an_outage(server, tmp, experiment: str, go_away, come_back) -> dict:
    proc, log = start_submit(server, tmp, experiment)
    away = False
    try:
        wait_for(lambda: proc.poll() is not None or len(lines_of(tmp)) >= 30, 300, "the training's first lines")
        assert proc.poll() is None, (tmp / "submit.log").read_text()
        time.sleep(6)  # a forward or two has landed
        go_away()
        away = True
        before = len(lines_of(tmp))
        time.sleep(OUTAGE_S)
        during = len(lines_of(tmp)) - before
        # On a fast machine the training may end during the outage: its run waits for the server (outage_wait_s).
        assert proc.poll() is None, "the submit ended while the server was away:\n" + (tmp / "submit.log").read_text()
        come_back()
        away = False
        assert proc.wait(timeout=600) == 0, (tmp / "submit.log").read_text()
    finally:
        if away:
            come_back()  # never leave the module's server (or its database) down for the next test
        if proc.poll() is None:
            proc.kill()
        log.close()
    out = (tmp / "submit.log").read_text()
    assert during > 0, "the training went on while the server was away"
    assert "has not answered since" in out and "past tracking.outage_report_s" in out, out
    assert "answers again after" in out and "none lost" in out, out

    records = lines_of(tmp)
    expected = Counter((name, r.step) for r in records for name in r.metrics())
    with as_user(server.admin, server.admin_password):
        client = MlflowClient(server.uri)
        exp = client.get_experiment_by_name(experiment)
        (run,) = client.search_runs([exp.experiment_id], "tags.`gptlab.role` != 'parent'")
        assert "unreachable" in run.data.tags.get("gptlab.tracking_outage", ""), run.data.tags
        logged = Counter()
        for key in {k for k, _ in expected}:
            logged.update((key, m.step) for m in client.get_metric_history(run.info.run_id, key))
    missing = [k for k in expected if logged[k] == 0]
    twice = [k for k in expected if logged[k] > 1]
    assert not missing and not twice, (missing[:10], twice[:10])
    counts = {"lines": len(records), "points": sum(expected.values()), "in_mlflow": sum(logged[k] for k in expected),
              "lines_during_outage": during}  # fmt: skip
    print(f"{experiment}: {counts}")
    return counts


def test_a_tracking_server_restart_mid_training_loses_and_duplicates_nothing(team_server, tmp_path):  # noqa: F811
    through_an_outage(team_server, tmp_path, "restart-server", team_server.stop, team_server.start)


def test_a_postgresql_restart_mid_training_loses_and_duplicates_nothing(team_server, tmp_path):  # noqa: F811
    version, _ = cluster()
    pg = lambda action: subprocess.run(["pg_ctlcluster", version, CLUSTER, action], check=True, timeout=120)
    try:
        through_an_outage(team_server, tmp_path, "restart-postgres", lambda: pg("stop"), lambda: pg("start"))
    finally:
        listed = subprocess.run(["pg_lsclusters", "--no-header"], capture_output=True, text=True).stdout.splitlines()
        if not any(line.split()[1] == CLUSTER and "online" in line for line in listed):
            pg("start")  # never leave the cluster down for the next test
