"""End to end through a real Parsl executor into a real MLflow store, with a tiny model."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import time

import pytest
from helpers import free_port, make_corpus, stop_group, tiny_spec, wait_for_json, write_spec
from mlflow.tracking import MlflowClient
from rich.console import Console
from typer.testing import CliRunner

from workflows import submit
from workflows.cli import app
from workflows.progress import LiveDisplay

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A two-point sweep submitted once, shared by the tests below (each asserts a different promise)."""
    tmp = tmp_path_factory.mktemp("e2e")
    corpus = make_corpus(tmp / "corpus")
    spec = write_spec(
        tmp / "tiny.yaml", tiny_spec(corpus, tmp / "runs", sweep={"model.pos_encoding": ["learned", "rope"]})
    )
    display = RecordingLive(Console(file=io.StringIO(), force_terminal=True, width=200))
    t0 = time.time()
    result = submit(spec, poll_interval=0.5, display=display)
    return {"spec": spec, "result": result, "seconds": time.time() - t0, "runs_root": tmp / "runs", "display": display}


class RecordingLive(LiveDisplay):
    """The live table a terminal shows, drawn into a string, plus a copy of the board at every redraw."""

    def __init__(self, console):
        super().__init__(console)
        self.snapshots = []

    def update(self, board):
        self.snapshots.append({n: (dict(r.stages), r.step, r.loss, r.tokens_per_sec) for n, r in board.rows.items()})
        super().update(board)

    def text(self):
        return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", self.console.file.getvalue())


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
        assert {"final/val_loss", "val/ppl", "val/bpb", "tokenizer/bytes_per_token", "train/loss"} <= set(m)
        assert m["val/ppl"] == pytest.approx(2.718281828 ** m["final/val_loss"], rel=1e-4)
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
    assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} == {
        "model/model.safetensors",
        "model/meta.json",
    }
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


def test_live_display_shows_each_runs_stage_step_tokens_per_second_and_loss(sweep):
    display = sweep["display"]
    training = [
        (name, row) for snap in display.snapshots for name, row in snap.items() if row[0].get("train") == "running"
    ]
    assert training, "some redraw shows a training running"
    assert any(step is not None and 0 < step <= 30 and loss > 0 and tps > 0 for _, (_, step, loss, tps) in training)
    final = display.snapshots[-1]
    assert all(set(stages.values()) == {"done"} and step == 30 for stages, step, _, _ in final.values())
    text = display.text()
    for name in ("pos_encoding=learned", "pos_encoding=rope"):
        assert name in text
    assert "30/30" in text and "FINISHED" in text and "tok/s" in text


def cli(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def test_status_shows_stages_run_ids_steps_and_metrics(sweep):
    r = cli("status", sweep["spec"])
    assert r.exit_code == 0, r.output
    for run in sweep["result"].runs:
        line = next(x for x in r.output.splitlines() if run.name in x)
        assert run.run_id in line and "FINISHED" in line and "30/30" in line
        assert line.count("done") + line.count("cached") == 4 and f"{run.metrics['val/bpb']:.4f}" in line
    by_root = cli("status", "--runs-root", sweep["runs_root"])
    assert by_root.exit_code == 0 and all(run.run_id in by_root.output for run in sweep["result"].runs)


def test_status_runs_root_and_uri_override_the_specs(sweep, tmp_path):
    """With a spec, --runs-root and --uri are not ignored: they point the spec at another store."""
    elsewhere = cli("status", sweep["spec"], "--runs-root", tmp_path)
    assert elsewhere.exit_code == 2 and f"no MLflow store at {tmp_path / 'mlflow.db'}" in elsewhere.output
    same = cli("status", sweep["spec"], "--uri", sweep["result"].tracking_uri, "--runs-root", sweep["runs_root"])
    assert same.exit_code == 0 and all(run.run_id in same.output for run in sweep["result"].runs)


def test_status_marks_runs_of_a_dead_driver_killed(sweep):
    client, children = client_and_children(sweep)
    run_id = children["pos_encoding=rope"].info.run_id
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    client.set_tag(run_id, "gptlab.driver_pid", str(dead.pid))
    client.update_run(run_id, status="RUNNING")
    try:
        r = cli("status", sweep["spec"])
        assert r.exit_code == 0, r.output
        assert f"run {run_id} was left RUNNING by a driver that is gone: marked KILLED" in r.output
        assert client.get_run(run_id).info.status == "KILLED"
        assert "KILLED" in next(x for x in r.output.splitlines() if "pos_encoding=rope" in x)
    finally:
        client.set_terminated(run_id, "FINISHED")


def test_compare_tables_and_plots_val_bpb_against_the_swept_parameter(sweep, tmp_path):
    r = cli("compare", sweep["spec"], "--out", tmp_path)
    assert r.exit_code == 0, r.output
    runs = {x.name: x for x in sweep["result"].runs}
    best = min(runs.values(), key=lambda x: x.metrics["val/bpb"])
    assert f"Best val/bpb: {best.name} ({best.metrics['val/bpb']:.4f}, run {best.run_id})" in r.output
    rows = (tmp_path / "sweep.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert header[:3] == ["run", "model.pos_encoding", "status"]
    table = {line.split(",")[0]: dict(zip(header, line.split(","))) for line in rows[1:]}
    assert set(table) == set(runs)
    for name, row in table.items():
        assert row["model.pos_encoding"] == name.split("=")[1] and row["status"] == "FINISHED"
        assert float(row["val/bpb"]) == pytest.approx(runs[name].metrics["val/bpb"])
    assert (tmp_path / "val_bpb.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    typo = cli("compare", sweep["spec"], "--metric", "val/bbp", "--out", tmp_path / "typo")
    assert typo.exit_code == 2 and "--metric: no run of tiny has a metric 'val/bbp'" in typo.output
    assert "val/bpb" in typo.output and not (tmp_path / "typo").exists()
    (tmp_path / "a-file").write_text("mine")
    on_file = cli("compare", sweep["spec"], "--out", tmp_path / "a-file")
    assert on_file.exit_code == 2 and f"--out: {tmp_path / 'a-file'} is a file, not a directory" in on_file.output
    assert (tmp_path / "a-file").read_text() == "mine"


def test_compare_writes_one_consistent_report_with_loss_curves_readable_by_the_group(sweep, tmp_path):
    """A second compare with another metric replaces the first's plot instead of leaving it beside the new
    table; the loss curves of every run are overlaid in a second figure; files follow the umask (not 0600)."""
    import stat

    out = tmp_path / "report"
    (out / "notes.txt").parent.mkdir()
    (out / "notes.txt").write_text("a file of the user's")
    assert cli("compare", sweep["spec"], "--out", out).exit_code == 0
    assert {f.name for f in out.iterdir()} >= {"sweep.csv", "val_bpb.png", "loss_curves.png", "notes.txt"}
    r = cli("compare", sweep["spec"], "--out", out, "--metric", "final/val_loss")
    assert r.exit_code == 0, r.output
    names = {f.name for f in out.iterdir() if not f.name.startswith(".")}
    assert names == {"sweep.csv", "final_val_loss.png", "loss_curves.png", "notes.txt"}
    for f in ("sweep.csv", "final_val_loss.png", "loss_curves.png"):
        assert stat.S_IMODE((out / f).stat().st_mode) == 0o666 & ~current_umask(), f
    from PIL import Image

    assert Image.open(out / "final_val_loss.png").size[0] >= 1000  # large enough to read


def current_umask() -> int:
    from llmcore.io import current_umask as read

    return read()


def test_table_numbers_are_formatted_for_reading():
    from workflows.compare import fmt

    assert [fmt(3.57281), fmt(53.42, "stage/train_seconds"), fmt(10773.2), fmt(None), fmt(float("nan"))] == [
        "3.5728",
        "53.4",
        "10,773",
        "-",
        "-",
    ]


def test_the_parent_run_holds_a_sweep_summary(sweep):
    result = sweep["result"]
    client = MlflowClient(result.tracking_uri)
    parent = client.get_run(result.parent_run_id)
    assert {a.path for a in client.list_artifacts(result.parent_run_id, "summary")} == {
        "summary/sweep.csv",
        "summary/val_bpb.png",
        "summary/loss_curves.png",
    }
    best = min(result.runs, key=lambda x: x.metrics["val/bpb"])
    assert parent.data.tags["gptlab.best_run"] == best.name
    assert parent.data.metrics["best/bpb"] == pytest.approx(best.metrics["val/bpb"])


def test_sample_generates_from_a_runs_weights(sweep):
    rope = next(r for r in sweep["result"].runs if r.name == "pos_encoding=rope")
    args = [
        "sample",
        "pos_encoding=rope",
        "--runs-root",
        sweep["runs_root"],
        "--prompt",
        "The ",
        "--max-new-tokens",
        "25",
    ]
    first, again = cli(*args), cli(*args)
    assert first.exit_code == 0, first.output
    assert first.stdout.startswith("The ") and len(first.stdout) > len("The \n")
    assert again.stdout == first.stdout, "same seed, same text"
    other = cli(*args, "--seed", "2")
    assert other.stdout != first.stdout
    by_id = cli("sample", rope.run_id[:10], "--spec", sweep["spec"], "--prompt", "The ", "--max-new-tokens", "25")
    assert by_id.stdout == first.stdout
    unknown = cli("sample", "no-such-run", "--runs-root", sweep["runs_root"])
    assert unknown.exit_code == 2 and "RUN: no sweep-point run named or with id 'no-such-run'" in unknown.output
    bad = cli(*args, "--temperature", "-1")
    assert bad.exit_code == 2 and "--temperature" in bad.output
    greedy = [cli(*args, "--temperature", "0", "--seed", str(seed)).stdout for seed in (1, 2)]
    assert greedy[0] == greedy[1] and greedy[0].startswith("The ")  # 0 is greedy: no seed changes it
    no_device = cli(*args, "--device", "tpu9")
    assert no_device.exit_code == 2 and "Bad input (gptlab sample): --device:" in no_device.output
    short = cli("sample", rope.run_id[:4], "--runs-root", sweep["runs_root"])
    assert short.exit_code == 2 and "a run id prefix needs 6 characters or more" in short.output


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
    assert again.runs[0].metrics["final/val_loss"] == sweep["result"].runs[0].metrics["final/val_loss"]
    client, children = client_and_children(sweep)
    assert len(children) == 2
    assert seconds < sweep["seconds"] / 2


def test_a_failing_point_is_failed_and_the_others_finish(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    # A freeze pattern that matches no parameter: that point's training fails (bad input, exit 2).
    spec = write_spec(tmp_path / "s.yaml", tiny_spec(corpus, tmp_path / "runs", sweep={"train.freeze": [[], ["x.*"]]}))
    r = subprocess.run(
        [sys.executable, "-m", "workflows.cli", "submit", str(spec), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stdout
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")
    runs = {x.info.run_name: x for x in client.search_runs([exp.experiment_id])}
    assert runs["freeze=[]"].info.status == "FINISHED"
    failed = runs["freeze=['x.*']"]
    assert failed.info.status == "FAILED"
    assert "stage train failed" in failed.data.tags["gptlab.error"]
    assert runs["tiny"].info.status == "FAILED"  # the parent tells the truth too
    status = subprocess.run(
        [sys.executable, "-m", "workflows.cli", "status", str(spec)], capture_output=True, text=True, timeout=120
    )
    assert status.returncode == 0, status.stderr
    line = next(x for x in status.stdout.splitlines() if "freeze=['x.*']" in x)
    assert re.search(r"FAILED\s*│\s*done\s*│\s*done\s*│\s*failed\s*│\s*not run", line), line
    assert "[freeze=['x.*']] stage train failed" in status.stdout


def test_ui_serves_the_store_on_loopback(sweep):
    import urllib.request

    port = free_port()
    log = sweep["runs_root"].parent / "ui-insecure.log"
    argv = [sys.executable, "-m", "workflows.cli", "ui", "--runs-root", str(sweep["runs_root"]), "--port", str(port)]
    # --insecure: the open UI of earlier versions (the private one is tests/test_ui_private.py's); its own session,
    # so that stopping it stops the server's workers too
    proc = subprocess.Popen([*argv, "--insecure"], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=tiny"
        body = wait_for_json(url, proc, 90, log.read_text)
        assert body["experiment"]["experiment_id"] == sweep["result"].experiment_id
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as resp:
            assert resp.status == 200 and b"<html" in resp.read().lower()
        assert "--insecure" in log.read_text()  # it says what it opens
    finally:
        stop_group(proc)


def test_ui_without_a_store_is_a_clear_error(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "workflows.cli", "ui", "--runs-root", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "no MLflow store" in r.stderr and "Traceback" not in r.stderr


def test_fail_fast_cancels_the_other_points(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    # The point with a bad freeze pattern fails at once; the other would train for minutes without --fail-fast.
    tree = tiny_spec(
        corpus,
        tmp_path / "runs",
        train={"max_steps": 100000, "checkpoint_interval": 100000},
        sweep={"train.freeze": [["x.*"], []]},
    )
    t0 = time.time()
    result = submit(write_spec(tmp_path / "s.yaml", tree), quiet=True, poll_interval=0.5, fail_fast=True)
    assert time.time() - t0 < 120
    status = {r.name: (r.status, r.error) for r in result.runs}
    assert status["freeze=['x.*']"][0] == "FAILED" and "stage train failed" in status["freeze=['x.*']"][1]
    assert status["freeze=[]"] == ("FAILED", "cancelled: another sweep point failed and --fail-fast was given")
    client = MlflowClient(result.tracking_uri)
    assert {client.get_run(r.run_id).info.status for r in result.runs} == {"FAILED"}


def test_line_mode_prints_a_training_step_only_when_it_has_moved():
    from workflows.progress import Board, LineDisplay, RunRow
    from workflows.states import StageState

    said: list[str] = []
    display = LineDisplay(said.append, every=0)
    row = RunRow("r", 100, {"train": StageState.RUNNING}, step=5, loss=1.0, tokens_per_sec=10)
    board = Board([row])
    display.update(board)
    display.update(board)  # nothing new: no line
    row.step, row.loss = 6, 0.9
    display.update(board)
    row.stages["train"] = StageState.DONE
    display.update(board)
    assert said == [
        "  [r] step 5/100 loss 1.0000 10 tok/s",
        "  [r] step 6/100 loss 0.9000 10 tok/s",
        "  [r] train done",
    ]
