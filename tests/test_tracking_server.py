"""Tracking to an MLflow tracking server (`tracking.uri: http://...`) instead of the default SQLite file: a real
`mlflow server` on loopback, a real submit, and everything read back through the server's REST API.

A tracking URI where no MLflow server answers (nothing listening, or some other HTTP server) is bad input:
`gptlab submit` and `gptlab status` fail at once with one paragraph naming tracking.uri and exit code 2, before
anything is trained or written, instead of MLflow's client retrying for minutes in silence."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading

import pytest
from helpers import free_port, gptlab, make_corpus, stop_group, tiny_spec, wait_for_json, write_spec
from mlflow.tracking import MlflowClient

from workflows import submit


def assert_one_paragraph_naming(r: subprocess.CompletedProcess, uri: str, *words: str) -> None:
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert "Traceback" not in out, out
    message = r.stderr.strip()
    assert message.startswith(f"Cannot use the MLflow store: tracking.uri {uri}: "), out
    assert "\n\n" not in message and message.endswith("."), out
    for word in words:
        assert word in message, out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    port = free_port()
    log = (tmp / "server.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp / 'server.db'}",
            "--artifacts-destination",
            str(tmp / "artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, MLFLOW_WORKERS="1"),
        start_new_session=True,
    )
    try:
        uri = f"http://127.0.0.1:{port}"
        wait_for_json(
            f"{uri}/api/2.0/mlflow/experiments/search?max_results=1",
            proc,
            120,
            lambda: (tmp / "server.log").read_text(),
        )
        yield {"uri": uri, "dir": tmp}
    finally:
        stop_group(proc)


@pytest.mark.slow
def test_submit_records_runs_metrics_and_artifacts_through_a_tracking_server(server, tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    tree = tiny_spec(corpus, tmp_path / "runs", tracking={"uri": server["uri"], "experiment": "via-server"})
    result = submit(write_spec(tmp_path / "s.yaml", tree), quiet=True, poll_interval=0.5)
    assert result.ok, [r.error for r in result.runs]
    assert not (tmp_path / "runs" / "mlflow.db").exists(), "nothing is written to a local store"
    client = MlflowClient(server["uri"])
    run = client.get_run(result.runs[0].run_id)
    assert run.info.status == "FINISHED"
    assert {"final/val_loss", "val/ppl", "val/bpb", "tokenizer/bytes_per_token"} <= set(run.data.metrics)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 31))
    # Artifacts go through the server (proxied), not to a path only this machine can see.
    assert client.get_experiment(result.experiment_id).artifact_location.startswith("mlflow-artifacts:")
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"spec.yaml", "eval", "plots", "model", "tokenizer"} <= files
    stored = list((server["dir"] / "artifacts").rglob("model.safetensors"))
    assert len(stored) == 1


@pytest.mark.slow
def test_status_reads_the_runs_through_a_tracking_server(server):
    """The check before a client of a server URI is made lets a server that answers through."""
    r = gptlab("status", "--uri", server["uri"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"(store {server['uri']})" in r.stdout, r.stdout


def test_submit_to_a_tracking_uri_where_nothing_listens_fails_at_once_and_trains_nothing(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # free: nothing listens there
    runs = tmp_path / "runs"
    spec = write_spec(tmp_path / "s.yaml", tiny_spec(make_corpus(tmp_path / "corpus"), runs))
    r = gptlab("submit", spec, "--lines", "--set", f"tracking.uri={uri}")
    assert_one_paragraph_naming(r, uri, "no MLflow server answers", "connection refused", "mlflow server")
    assert not (runs / "stages").exists() or not any((runs / "stages").iterdir()), "no stage was started"
    assert not (runs / "mlflow.db").exists() and not (runs / ".mlflow-tracking.lock").exists()


def test_status_of_a_tracking_uri_where_nothing_listens_fails_at_once(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    r = gptlab("status", "--uri", uri, "--runs-root", tmp_path / "runs")
    assert_one_paragraph_naming(r, uri, "no MLflow server answers", "connection refused")


@pytest.fixture
def not_mlflow(tmp_path):
    """A plain HTTP file server on loopback (of an empty folder): it answers, with HTML 404s, but it is no MLflow
    server."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path / "www"), **kwargs)

        def log_message(self, *args):
            pass

    (tmp_path / "www").mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_tracking_uri_of_some_other_http_server_is_named_as_not_mlflow(not_mlflow, tmp_path):
    r = gptlab("status", "--uri", not_mlflow, "--runs-root", tmp_path / "runs")
    assert_one_paragraph_naming(r, not_mlflow, "not an MLflow tracking server", "HTTP 404")
