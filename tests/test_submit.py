"""End to end through a real Parsl executor into a real MLflow store, with a tiny model."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from helpers import make_corpus, tiny_spec, wait_for_json, write_spec
from workflows import submit

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A two-point sweep submitted once, shared by the tests below (each asserts a different promise)."""
    tmp = tmp_path_factory.mktemp("e2e")
    corpus = make_corpus(tmp / "corpus")
    spec = write_spec(tmp / "tiny.yaml", tiny_spec(corpus, tmp / "runs", sweep={"model.pos_encoding": ["learned", "rope"]}))
    t0 = time.time()
    result = submit(spec, quiet=True, poll_interval=0.5)
    return {"spec": spec, "result": result, "seconds": time.time() - t0, "runs_root": tmp / "runs"}


def client_and_children(sweep):
    result = sweep["result"]
    client = MlflowClient(result.tracking_uri)
    children = client.search_runs([result.experiment_id], f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    return client, {c.info.run_name: c for c in children}


def test_every_sweep_point_finishes_with_eval_metrics_in_mlflow(sweep):
    result = sweep["result"]
    assert result.ok, [r.error for r in result.runs]
    client, children = client_and_children(sweep)
    assert set(children) == {"pos_encoding=learned", "pos_encoding=rope"}
    for run in children.values():
        assert run.info.status == "FINISHED"
        m = run.data.metrics
        assert {"val/loss", "val/ppl", "val/bpb", "tokenizer/bytes_per_token", "train/loss"} <= set(m)
        assert m["val/ppl"] == pytest.approx(2.718281828 ** m["val/loss"], rel=1e-4)
        assert 0 < m["val/bpb"] < 8
    assert client.get_run(result.parent_run_id).info.status == "FINISHED"


def test_training_metrics_are_forwarded_per_step(sweep):
    client, children = client_and_children(sweep)
    run = children["pos_encoding=rope"]
    history = client.get_metric_history(run.info.run_id, "train/loss")
    steps = sorted(h.step for h in history)
    assert steps == sorted(set(steps)), "no step is recorded twice"
    assert len(steps) >= 29 and steps[-1] == 30
    assert history[0].value > min(h.value for h in history), "loss falls during training"
    assert {h.step for h in client.get_metric_history(run.info.run_id, "val/loss")} >= {10, 20, 30}


def test_params_tags_and_artifacts(sweep):
    client, children = client_and_children(sweep)
    run = children["pos_encoding=learned"]
    params = run.data.params
    assert params["model.pos_encoding"] == "learned" and params["model.n_layer"] == "1"
    assert params["data.sources.0.type"] == "files" and params["train.lr"] == "0.003"
    assert run.data.tags["gptlab.role"] == "sweep_point" and run.data.tags["gptlab.run_hash"]
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"spec.yaml", "tokenizer", "eval"} <= files
    evals = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/eval.json", "eval/samples.txt"} <= evals
    assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} == {"model/model.safetensors", "model/meta.json"}
    plot = client.download_artifacts(run.info.run_id, "plots/loss_curve.png", str(sweep["runs_root"].parent))
    assert open(plot, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    tags = run.data.tags
    assert tags["gptlab.parsl_run_id"] and tags["gptlab.host"] and tags["gptlab.driver_pid"].isdigit()


def test_runs_left_running_by_a_dead_driver_become_killed_and_resubmit_resumes_them(sweep):
    import subprocess as sp

    client, children = client_and_children(sweep)
    run = children["pos_encoding=learned"]
    dead = sp.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer exists: the driver that "left" this run RUNNING
    client.set_tag(run.info.run_id, "gptlab.driver_pid", str(dead.pid))
    client.update_run(run.info.run_id, status="RUNNING")
    said: list[str] = []
    again = submit(sweep["spec"], poll_interval=0.5, report=said.append)
    assert again.ok
    assert f"run {run.info.run_id} was left RUNNING by a driver that is gone: marked KILLED" in said
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(history) == len({h.step for h in history})  # resumed: nothing forwarded twice
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


def test_sweep_points_share_tokenizer_and_shards_stages(sweep):
    stages = sorted(p.name.split("-")[0] for p in (sweep["runs_root"] / "stages").iterdir())
    assert stages == ["eval", "eval", "shards", "tokenizer", "train", "train"]
    assert all((d / "DONE.json").is_file() for d in (sweep["runs_root"] / "stages").iterdir())


def test_resubmit_reuses_everything_and_duplicates_nothing(sweep):
    t0 = time.time()
    again = submit(sweep["spec"], quiet=True, poll_interval=0.5)
    seconds = time.time() - t0
    assert again.ok and again.parent_run_id == sweep["result"].parent_run_id
    assert {r.run_id for r in again.runs} == {r.run_id for r in sweep["result"].runs}
    assert all(set(r.stages.values()) == {"cached"} for r in again.runs)
    assert again.runs[0].metrics["val/loss"] == sweep["result"].runs[0].metrics["val/loss"]
    client, children = client_and_children(sweep)
    assert len(children) == 2
    assert seconds < sweep["seconds"] / 2


def test_a_failing_point_is_failed_and_the_others_finish(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    # A context longer than the validation split cannot be sampled: that point's training fails.
    spec = write_spec(tmp_path / "s.yaml", tiny_spec(corpus, tmp_path / "runs", sweep={"model.block_size": [16, 100000]}))
    r = subprocess.run([sys.executable, "-m", "workflows.cli", "submit", str(spec), "--quiet"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stdout
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")
    runs = {x.info.run_name: x for x in client.search_runs([exp.experiment_id])}
    assert runs["block_size=16"].info.status == "FINISHED"
    failed = runs["block_size=100000"]
    assert failed.info.status == "FAILED"
    assert "stage train failed" in failed.data.tags["gptlab.error"]
    assert runs["tiny"].info.status == "FAILED"  # the parent tells the truth too


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_serves_the_store_on_loopback(sweep):
    import urllib.request

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "workflows.cli", "ui", "--runs-root", str(sweep["runs_root"]),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=tiny"
        body = wait_for_json(url, proc, 90, lambda: proc.stdout.read())
        assert body["experiment"]["experiment_id"] == sweep["result"].experiment_id
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as resp:
            assert resp.status == 200 and b"<html" in resp.read().lower()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_ui_without_a_store_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "workflows.cli", "ui", "--runs-root", str(tmp_path / "none")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no MLflow store" in r.stderr and "Traceback" not in r.stderr


def test_fail_fast_cancels_the_other_points(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    # The long-context point fails at once; the other would train for minutes without --fail-fast.
    tree = tiny_spec(corpus, tmp_path / "runs", train={"max_steps": 100000, "checkpoint_interval": 100000},
                     sweep={"model.block_size": [100000, 16]})
    t0 = time.time()
    result = submit(write_spec(tmp_path / "s.yaml", tree), quiet=True, poll_interval=0.5, fail_fast=True)
    assert time.time() - t0 < 120
    status = {r.name: (r.status, r.error) for r in result.runs}
    assert status["block_size=100000"][0] == "FAILED" and "stage train failed" in status["block_size=100000"][1]
    assert status["block_size=16"] == ("FAILED", "cancelled: another sweep point failed and --fail-fast was given")
    client = MlflowClient(result.tracking_uri)
    assert {client.get_run(r.run_id).info.status for r in result.runs} == {"FAILED"}
