"""A training that *ends* while its tracking server is away (issue 22): the driver does not fail the submit; it
keeps the run open until the server answers again, then sends the last metrics and closes the run, every metric
of every metrics.jsonl line in MLflow exactly once. A server away for longer than `tracking.outage_wait_s` after
the trainings ended stops the submit (exit 2, naming tracking.uri and the setting) instead of waiting forever, and
submitting again records the rest, exactly once.

The server is a real `mlflow server` (SQLite behind it) on loopback, stopped and started again on the same port;
tests/test_tracking_restart.py restarts a PostgreSQL-backed team server (and PostgreSQL) mid-training."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from helpers import free_port, make_corpus, stop_group, tiny_spec, wait_for, wait_for_json, write_spec
from mlflow.tracking import MlflowClient

from llmcore.metrics import read_metrics

pytestmark = pytest.mark.slow


class Server:
    """`mlflow server` on a SQLite store under ``dir``, on one loopback port across restarts."""

    def __init__(self, dir: Path):
        self.dir, self.port, self.proc, self.starts = dir, free_port(), None, 0
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.starts += 1
        log = (self.dir / f"server.{self.starts}.log").open("w")
        # fmt: off
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.dir / 'server.db'}",
             "--artifacts-destination", str(self.dir / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, MLFLOW_WORKERS="1"), start_new_session=True,
        )
        # fmt: on
        log.close()
        url = f"{self.uri}/api/2.0/mlflow/experiments/search?max_results=1"
        wait_for_json(url, self.proc, 120, lambda: (self.dir / f"server.{self.starts}.log").read_text())

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)
            self.proc = None


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path)
    s.start()
    try:
        yield s
    finally:
        s.stop()


def submit(server: Server, tmp: Path, wait_s: float) -> tuple[subprocess.Popen, Path]:
    """`gptlab submit` of a tiny training of 300 steps (seconds) to the server, in the background."""
    corpus = tmp / "corpus" if (tmp / "corpus").exists() else make_corpus(tmp / "corpus")  # the same data again
    tree = tiny_spec(corpus, tmp / "runs", tracking={"uri": server.uri, "outage_report_s": 2, "outage_wait_s": wait_s},
                     train={"max_steps": 300, "eval_interval": 50, "checkpoint_interval": 100})  # fmt: skip
    spec = write_spec(tmp / "s.yaml", tree)
    log = tmp / f"submit.{len(list(tmp.glob('submit.*.log')))}.log"
    proc = subprocess.Popen([sys.executable, "-m", "workflows.cli", "submit", str(spec), "--lines"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT)  # fmt: skip
    return proc, log


def lines_of(tmp: Path) -> list:
    return [r for f in (tmp / "runs").rglob("metrics.jsonl") for r in read_metrics(f)]


def trained(tmp: Path) -> bool:
    return any((tmp / "runs").glob("stages/train-*/DONE.json"))


def stop_server_mid_training(server: Server, proc: subprocess.Popen, log: Path, tmp: Path) -> None:
    wait_for(lambda: proc.poll() is not None or len(lines_of(tmp)) >= 10, 300, "the training's first lines")
    assert proc.poll() is None and not trained(tmp), log.read_text()
    server.stop()


def assert_each_metric_once(server: Server, tmp: Path) -> dict:
    records = lines_of(tmp)
    expected = Counter((name, r.step) for r in records for name in r.metrics())
    client = MlflowClient(server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id], "tags.`gptlab.role` != 'parent'")
    assert run.info.status == "FINISHED", run.data.tags
    logged: Counter = Counter()
    for key in {k for k, _ in expected}:
        logged.update((key, m.step) for m in client.get_metric_history(run.info.run_id, key))
    assert [k for k in expected if logged[k] != 1] == []  # none missing, none twice
    counts = {"lines": len(records), "points": sum(expected.values()), "in_mlflow": sum(logged[k] for k in expected)}
    print(f"{tmp.name}: {counts}")
    return counts


def test_a_training_that_ends_while_the_server_is_away_is_closed_when_it_is_back(server, tmp_path):
    proc, log = submit(server, tmp_path, wait_s=600)
    try:
        stop_server_mid_training(server, proc, log, tmp_path)
        wait_for(lambda: trained(tmp_path) or proc.poll() is not None, 300, "the training to end, server away")
        time.sleep(5)  # the driver has looked at the ended training a few times
        assert proc.poll() is None, "the submit ended while the server was away:\n" + log.read_text()
        server.start()
        assert proc.wait(timeout=300) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "has not answered since" in log.read_text(), log.read_text()
    assert_each_metric_once(server, tmp_path)


def test_a_server_away_past_outage_wait_s_stops_the_submit_and_a_resubmit_records_the_rest(server, tmp_path):
    proc, log = submit(server, tmp_path, wait_s=3)
    try:
        stop_server_mid_training(server, proc, log, tmp_path)
        assert proc.wait(timeout=400) == 2, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log.read_text()
    assert f"tracking.uri {server.uri}" in out and "tracking.outage_wait_s" in out and "Traceback" not in out, out
    assert trained(tmp_path), out
    server.start()
    again, log = submit(server, tmp_path, wait_s=3)
    assert again.wait(timeout=300) == 0, log.read_text()
    assert "train cached" in log.read_text(), log.read_text()  # nothing trained again: only recorded
    assert_each_metric_once(server, tmp_path)
