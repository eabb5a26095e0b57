"""Tracking to an MLflow tracking server (`tracking.uri: http://...`) instead of the default SQLite file: a real
`mlflow server` on loopback, a real submit, and everything read back through the server's REST API."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from helpers import free_port, make_corpus, stop_group, tiny_spec, wait_for_json, write_spec
from workflows import submit

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    port = free_port()
    log = (tmp / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp / 'server.db'}", "--artifacts-destination", str(tmp / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, MLFLOW_WORKERS="1"), start_new_session=True)
    try:
        uri = f"http://127.0.0.1:{port}"
        wait_for_json(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1", proc, 120,
                      lambda: (tmp / "server.log").read_text())
        yield {"uri": uri, "dir": tmp}
    finally:
        stop_group(proc)


def test_submit_records_runs_metrics_and_artifacts_through_a_tracking_server(server, tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    tree = tiny_spec(corpus, tmp_path / "runs", tracking={"uri": server["uri"], "experiment": "via-server"})
    result = submit(write_spec(tmp_path / "s.yaml", tree), quiet=True, poll_interval=0.5)
    assert result.ok, [r.error for r in result.runs]
    assert not (tmp_path / "runs" / "mlflow.db").exists(), "nothing is written to a local store"
    client = MlflowClient(server["uri"])
    run = client.get_run(result.runs[0].run_id)
    assert run.info.status == "FINISHED"
    assert {"val/loss", "val/ppl", "val/bpb", "tokenizer/bytes_per_token"} <= set(run.data.metrics)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 31))
    # Artifacts go through the server (proxied), not to a path only this machine can see.
    assert client.get_experiment(result.experiment_id).artifact_location.startswith("mlflow-artifacts:")
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"spec.yaml", "eval", "plots", "model", "tokenizer"} <= files
    stored = list((server["dir"] / "artifacts").rglob("model.safetensors"))
    assert len(stored) == 1
