"""Faults injected for real: a killed driver, two submits at once, eight writers on one SQLite store, a full
disk and an unwritable runs_root, damaged shards. What each test shows is listed in docs/reliability.md."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from helpers import child_env, kill_everything_under, make_corpus, tiny_spec, trainings, wait_for, write_spec

from llmcore.checkpoint import checkpoints, latest_checkpoint, load_checkpoint
from llmcore.io import LOCK_FILE, file_lock, write_commit_marker
from workflows.planning import plan
from workflows.spec import load_spec

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


# ------------------------------------------------------------------------------------------- helpers


def mlflow_runs(runs_root: Path, experiment: str = "tiny") -> dict[str, object]:
    """{run name: run} in the store (empty until the experiment exists); never writes."""
    from mlflow.tracking import MlflowClient

    from workflows.store import retry_locked

    if not (runs_root / "mlflow.db").exists():
        return {}
    client = MlflowClient(f"sqlite:///{runs_root / 'mlflow.db'}")
    exp = retry_locked(lambda: client.get_experiment_by_name(experiment))
    if exp is None:
        return {}
    runs = retry_locked(lambda: client.search_runs([exp.experiment_id]))
    names = [r.info.run_name for r in runs]
    assert len(names) == len(set(names)), f"duplicated MLflow runs: {sorted(names)}"
    return {r.info.run_name: r for r in runs}


def train_steps(stage_dir: Path) -> list[int]:
    rows = [json.loads(x) for x in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if r["kind"] == "train"]


def marker_identity(stage_dir: Path) -> tuple[int, int] | None:
    """(inode, mtime) of a stage's DONE.json: an atomic rewrite (a stage run again) changes the inode."""
    try:
        st = (stage_dir / "DONE.json").stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


# ------------------------------------------------------------------------------ 1. driver SIGKILLed


def test_driver_killed_mid_sweep_resubmit_reruns_nothing_resumes_and_duplicates_no_run(tmp_path):
    """A real `gptlab submit` is SIGKILLed while one sweep point has finished and the other trains. Its
    training outlives it (as on a login node whose session dropped), frozen with SIGSTOP so the timing is
    ours. The same submit again: the new training waits for the orphan's lock; once the orphan dies (SIGKILL),
    it resumes from the orphan's last checkpoint. Nothing finished is redone; every point ends FINISHED in
    MLflow with each step once; no run is duplicated or left RUNNING."""
    corpus = make_corpus(tmp_path / "corpus")
    runs_root = tmp_path / "runs"
    tree = tiny_spec(
        corpus, runs_root, train={"checkpoint_interval": 10, "eval_interval": 20}, sweep={"train.max_steps": [20, 200]}
    )
    spec = write_spec(tmp_path / "sweep.yaml", tree)
    p = plan(load_spec(spec))
    short, long = (r.stages for r in p.runs)
    submit_cmd = [sys.executable, "-m", "workflows.cli", "submit", str(spec)]
    procs: list[subprocess.Popen] = []
    try:
        first = subprocess.Popen(
            submit_cmd,
            cwd=tmp_path,
            env=child_env(),
            stdout=open(tmp_path / "first.log", "w"),
            stderr=subprocess.STDOUT,
        )
        procs.append(first)
        # Freeze the long training once it has a committed checkpoint, so it is mid-run whatever the speed.
        wait_for(lambda: latest_checkpoint(long["train"].dir) is not None, 240, "the long training's checkpoint")
        orphan = wait_for(lambda: trainings(long["train"].dir), 30, "the long training's process")
        assert len(orphan) == 1
        orphan[0].suspend()
        wait_for(
            lambda: (
                getattr(mlflow_runs(runs_root).get("max_steps=20"), "info", None) is not None
                and mlflow_runs(runs_root)["max_steps=20"].info.status == "FINISHED"
            ),
            240,
            "the short point to finish in MLflow",
        )
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        assert trainings(long["train"].dir) == orphan, "the killed driver's training outlives it"
        assert mlflow_runs(runs_root)["max_steps=200"].info.status == "RUNNING"
        finished = {
            s.label: marker_identity(s.dir)
            for s in (short["tokenizer"], short["shards"], short["train"], short["eval"])
        }
        assert all(finished.values()) and not long["train"].done
        short_log = (short["train"].dir / "train.log").read_text()
        resumed_at = int(json.loads((latest_checkpoint(long["train"].dir) / "meta.json").read_text())["step"])

        second = subprocess.Popen(
            submit_cmd,
            cwd=tmp_path,
            env=child_env(),
            stdout=open(tmp_path / "second.log", "w"),
            stderr=subprocess.STDOUT,
        )
        procs.append(second)
        log = long["train"].dir / "train.log"
        wait_for(lambda: "waiting for training in" in log.read_text(), 240, "the new training to wait for the lock")
        orphan[0].kill()  # the frozen orphan dies; the kernel releases its lock
        assert second.wait(timeout=300) == 0, (tmp_path / "second.log").read_text()
    finally:
        kill_everything_under(tmp_path, procs)

    # Nothing finished before the kill ran again.
    assert {
        s.label: marker_identity(s.dir) for s in (short["tokenizer"], short["shards"], short["train"], short["eval"])
    } == finished
    assert (short["train"].dir / "train.log").read_text() == short_log
    # The interrupted training resumed from the orphan's last checkpoint and every step is there once.
    text = log.read_text()
    assert f"resuming from checkpoint {long['train'].dir}/checkpoints/step_{resumed_at:08d} (step {resumed_at})" in text
    assert 10 <= resumed_at < 200
    assert train_steps(long["train"].dir) == list(range(1, 201))
    assert long["eval"].done
    # MLflow: one parent and one child per point, all FINISHED, no step forwarded twice.
    from mlflow.tracking import MlflowClient

    runs = mlflow_runs(runs_root)
    assert sorted(runs) == ["max_steps=20", "max_steps=200", "tiny"]
    assert {name: r.info.status for name, r in runs.items()} == dict.fromkeys(runs, "FINISHED")
    client = MlflowClient(f"sqlite:///{runs_root / 'mlflow.db'}")
    for name, steps in (("max_steps=20", 20), ("max_steps=200", 200)):
        history = client.get_metric_history(runs[name].info.run_id, "train/loss")
        assert sorted(h.step for h in history) == list(range(1, steps + 1)), name
        assert "val/bpb" in runs[name].data.metrics


# --------------------------------------------------------------------------- 6. two submits at once


SUBMIT = """
import json, sys
from workflows import submit
r = submit(sys.argv[1], quiet=True, poll_interval=0.3)
runs = [[x.name, x.run_id, x.status, x.metrics.get("final/val_loss")] for x in r.runs]
print("RESULT " + json.dumps({"parent": r.parent_run_id, "runs": runs}))
"""


def test_two_submits_of_one_spec_at_once_run_each_stage_once_and_agree(tmp_path):
    """Two drivers submit the same spec at the same moment (both are held at the tokenizer stage's lock
    until both wait there). Each stage runs once (its DONE.json is written once), one training writes the
    steps, both submits finish with the same runs and results, and MLflow holds one parent and one child."""
    corpus = make_corpus(tmp_path / "corpus")
    runs_root = tmp_path / "runs"
    spec = write_spec(tmp_path / "s.yaml", tiny_spec(corpus, runs_root, train={"max_steps": 30}))
    stages = plan(load_spec(spec)).runs[0].stages
    seen: dict[str, set] = {kind: set() for kind in stages}
    stop = threading.Event()

    def watch() -> None:  # every DONE.json identity ever seen, per stage
        while not stop.is_set():
            for kind, s in stages.items():
                if (ident := marker_identity(s.dir)) is not None:
                    seen[kind].add(ident[0])
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    procs: list[subprocess.Popen] = []
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    try:
        with file_lock(stages["tokenizer"].dir / LOCK_FILE):
            for log in logs:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-c", SUBMIT, str(spec)],
                        cwd=tmp_path,
                        env=child_env(),
                        stdout=open(log, "w"),
                        stderr=subprocess.STDOUT,
                    )
                )
            wait_for(
                lambda: all(f"waiting for stage {stages['tokenizer'].dir.name}" in log.read_text() for log in logs),
                240,
                "both submits to wait at the tokenizer stage",
            )
        codes = [proc.wait(timeout=400) for proc in procs]
    finally:
        stop.set()
        kill_everything_under(tmp_path, procs)
        watcher.join()
    outputs = [log.read_text() for log in logs]
    assert codes == [0, 0], outputs
    results = [json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[7:]) for out in outputs]
    assert results[0] == results[1]  # same parent, same child run, FINISHED, same final/val_loss
    assert results[0]["runs"][0][2] == "FINISHED"
    assert {kind: len(ids) for kind, ids in seen.items()} == dict.fromkeys(stages, 1)
    assert train_steps(stages["train"].dir) == list(range(1, 31))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{runs_root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")
    every = client.search_runs([exp.experiment_id])
    assert len(every) == 2 and {r.info.status for r in every} == {"FINISHED"}  # parent + one child
    child = results[0]["runs"][0][1]
    history = client.get_metric_history(child, "train/loss")
    assert sorted(h.step for h in history) == list(range(1, 31))  # forwarded once, by whichever driver
    assert len(client.get_metric_history(child, "val/bpb")) == 1


# ------------------------------------------------------------------- 4. eight writers on one store


WRITER = """
import json, sys, time
from pathlib import Path
from workflows.lifecycle import RunLifecycle
from workflows.store import Tracker
from workflows.tail import MetricsForwarder
uri, root, i, go = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
(root / f"ready{i}").touch()
while not go.exists():
    time.sleep(0.005)
t = Tracker(uri, "concurrent", root / "mlartifacts")  # the first one creates the store
runs = RunLifecycle(t, None)
parent, _, _ = runs.find_or_create("parent", {"role": "parent", "spec_hash": "s"})
run, _, _ = runs.find_or_create(f"point{i}", {"role": "sweep_point", "spec_hash": "s", "run_hash": f"h{i}"}, parent)
d = root / f"train{i}"
d.mkdir()
fw = MetricsForwarder(t, run, d / "metrics.jsonl")
with open(d / "metrics.jsonl", "a") as f:
    for step in range(1, STEPS + 1):
        f.write(json.dumps({"kind": "train", "step": step, "time": 1e9 + step, "loss": 1.0 / step, "lr": 1e-3,
                            "grad_norm": 1.0, "tokens_per_sec": 100.0, "tokens_seen": step * 10}) + "\\n")
        f.flush()
        if step % 3 == 0:
            fw.poll()  # a small batch per poll: many writes, as a driver forwarding live training
fw.poll()
t.log_values(run, {"val/loss": 0.5}, step=STEPS)
runs.end(run, "FINISHED")
runs.end(parent, "FINISHED")
"""


def test_eight_concurrent_writers_on_one_new_sqlite_store(tmp_path):
    """Eight processes start at once on a store that does not exist yet, find-or-create one parent run,
    create one run each and forward per-step metrics in small batches: none fails ("database is locked",
    a migration race), the store is created once, and every metric is there exactly once."""
    from mlflow.tracking import MlflowClient

    steps, n = 60, 8
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    script = WRITER.replace("STEPS", str(steps))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, uri, str(tmp_path), str(i), str(tmp_path / "go")],
            env=child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(n)
    ]
    try:
        wait_for(lambda: all((tmp_path / f"ready{i}").exists() for i in range(n)), 120, "the writers to start")
        (tmp_path / "go").touch()  # all of them race for the new store now
        outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    finally:
        kill_everything_under(tmp_path, procs)
    assert [proc.returncode for proc in procs] == [0] * n, "\n".join(outputs)
    assert not any("database is locked" in out for out in outputs)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("concurrent")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags["gptlab.role"] == "parent"]
    assert len(parents) == 1 and len(runs) == n + 1  # found, not duplicated, by the seven others
    for r in runs:
        assert r.info.status == "FINISHED"
        if r in parents:
            continue
        assert r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        for key in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "train/tokens_seen"):
            assert sorted(m.step for m in client.get_metric_history(r.info.run_id, key)) == list(range(1, steps + 1))
        assert [m.value for m in client.get_metric_history(r.info.run_id, "val/loss")] == [0.5]
    import sqlite3

    with sqlite3.connect(tmp_path / "mlflow.db") as db:  # one schema, migrated once
        assert db.execute("select count(*) from alembic_version").fetchone() == (1,)
        assert sorted(x for (x,) in db.execute("select name from experiments")) == ["Default", "concurrent"]


# -------------------------------------------------------------------- 5. full disk, unwritable root


@pytest.fixture
def tmpfs(tmp_path):
    """Mount small tmpfs file systems (a real disk that fills up); needs root, as `.ci/run` has."""
    mounted: list[Path] = []

    def mount(name: str, size: str, options: str = "") -> Path:
        if os.geteuid() != 0:
            pytest.fail("the disk-full tests mount a small tmpfs and need root (run them as .ci/run does)")
        path = tmp_path / name
        path.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}" + (f",{options}" if options else ""), "tmpfs", str(path)],
            check=True,
        )
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Write zeros into ``directory/filler`` until the file system is full; returns the filler."""
    filler = directory / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == 28, e  # ENOSPC
    return filler


def test_full_disk_never_leaves_a_commit_marker_or_temp_file(tmpfs, tmp_path):
    from site_configs.retry import NEVER, retry_cost
    from workflows.stages import run_stage

    disk = tmpfs("small", "256k")
    stage = disk / "stages" / "tokenizer-x"
    stage.mkdir(parents=True)
    fill(disk)
    with pytest.raises(OSError) as info:
        write_commit_marker(stage, {"step": 1})
    assert info.value.errno == 28
    corpus = make_corpus(tmp_path / "corpus", n_docs=4)  # on another disk: only the stage's own writes fail
    config = {"tokenizer": {"model_type": "char", "vocab_size": 64}, "seed": 0, "corpus": [],
              "sources": [{"type": "files", "path": str(corpus)}]}  # fmt: skip
    with pytest.raises(OSError) as info:
        run_stage("tokenizer", str(stage), config, {}, {"num_threads": 1})
    assert retry_cost(info.value, None) == NEVER  # retrying cannot free space
    from parsl.app.errors import BashExitFailure

    assert retry_cost(BashExitFailure("train", 74), None) == NEVER  # training's "disk full" exit code
    assert sorted(p.name for p in stage.iterdir()) == [LOCK_FILE]  # no DONE.json, no temp file


def test_disk_full_mid_training_exits_74_commits_nothing_torn_and_resumes_once_freed(llm_shards, tmpfs):
    """The output directory's disk fills while training runs: the process exits 74 (never retried), saying
    which file could not be written; every checkpoint it left is either committed and whole or ignored; once
    space is freed the same command resumes from the last committed checkpoint and finishes every step once."""
    disk = tmpfs("out", "4m")
    out = disk / "run"
    out.mkdir()
    cfg = {
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 16},
        "train": {
            "batch_size": 4,
            "max_steps": 60,
            "warmup_steps": 2,
            "eval_interval": 10,
            "eval_batches": 2,
            "checkpoint_interval": 10,
            "device": "cpu",
        },
        "seed": 1,
    }
    (disk.parent / "train.json").write_text(json.dumps(cfg))
    cmd = [
        sys.executable,
        "-m",
        "llmcore.train",
        "--config",
        str(disk.parent / "train.json"),
        "--shards",
        str(llm_shards),
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (out / "checkpoints" / "step_00000010" / "DONE.json").exists(), 120, "a checkpoint", 0.02)
        psutil.Process(proc.pid).suspend()
        filler = fill(disk)
        psutil.Process(proc.pid).resume()
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 74, err
    assert "No space left on device" in err and "Traceback" not in err and str(out) in err
    assert not (out / "summary.json").exists()
    committed = checkpoints(out)
    assert committed, "the checkpoint from before the disk filled is still there"
    for ckpt in (out / "checkpoints").iterdir():  # every marker belongs to a whole checkpoint
        if (ckpt / "DONE.json").exists():
            assert ckpt in committed
    from llmcore.config import ModelConfig
    from llmcore.model import GPT

    vocab = json.loads((committed[0] / "meta.json").read_text())["vocab_size"]
    load_checkpoint(committed[0], GPT(ModelConfig(**cfg["model"]), vocab))  # verifies every file's sha256
    last_good = int(committed[0].name.split("_")[1])

    filler.unlink()
    again = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"(step {last_good})" in again.stderr and "resuming from checkpoint" in again.stderr
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 61))


def test_unwritable_runs_root_is_a_clear_error_and_nothing_runs(tmp_path, tmpfs):
    from typer.testing import CliRunner

    from workflows.cli import app

    corpus = make_corpus(tmp_path / "corpus", n_docs=5)
    readonly = tmpfs("ro", "1m", "ro")
    a_file = tmp_path / "corpus" / "doc000.txt"
    for runs_root in (readonly / "runs", a_file / "runs", a_file):  # read-only fs; under a file; a file
        spec = write_spec(tmp_path / "s.yaml", tiny_spec(corpus, runs_root))
        for command in ("validate", "submit"):
            result = CliRunner().invoke(app, [command, str(spec)])
            assert result.exit_code == 2, result.output
            assert f"runs_root: cannot write to {runs_root}" in result.output
            if runs_root == a_file:
                assert "(it is a file, not a directory)" in result.output
            assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    assert not (readonly / "runs").exists()


def test_full_runs_root_at_submit_is_one_clear_paragraph_and_nothing_runs(tmp_path, tmpfs):
    """runs_root's disk is full when the submit starts (the MLflow store cannot even be created): exit 2 with
    one paragraph naming the problem, no traceback, no stage started. Needs workflows/cli.py to treat
    workflows.store.TrackingStoreError as bad input (see docs/reliability.md)."""
    from typer.testing import CliRunner

    from workflows.cli import app

    corpus = make_corpus(tmp_path / "corpus", n_docs=5)
    disk = tmpfs("full", "256k")
    spec = write_spec(tmp_path / "s.yaml", tiny_spec(corpus, disk / "runs"))
    (disk / "runs").mkdir()
    fill(disk)
    result = CliRunner().invoke(app, ["submit", str(spec)])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    assert ("runs_root" in result.output or str(disk / "runs" / "mlflow.db") in result.output) and (
        "full" in result.output or "No space left" in result.output
    ), result.output
    assert not (disk / "runs" / "stages").exists()


# ---------------------------------------------------------------------------------- 3. torn writes


def test_training_on_a_damaged_shard_exits_2_naming_it_and_how_to_rebuild(llm_shards, tmp_path):
    """A committed shards stage whose shard was altered afterwards (bit rot, a partial copy): training refuses
    it before the first step, names the file, says how to rebuild it, and is not retried (exit code 2)."""
    shards = tmp_path / "shards"
    shutil.copytree(llm_shards, shards)
    shard = shards / "train-00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 1
    shard.write_bytes(bytes(raw))
    (tmp_path / "train.json").write_text(
        json.dumps({"model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 16}, "train": {"device": "cpu"}})
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmcore.train",
            "--config",
            str(tmp_path / "train.json"),
            "--shards",
            str(shards),
            "--out",
            str(tmp_path / "out"),
        ],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert "train-00000.bin" in r.stderr and "sha256" in r.stderr and f"delete {shards}" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_metrics_rewritten_by_a_resume_are_forwarded_without_a_gap_or_duplicate(tmp_path):
    """A resumed training rewrites metrics.jsonl (atomically, new inode) and may grow it past the driver's read
    offset before the driver looks again: the forwarder starts over (never mid-line) and sends each step once."""
    from mlflow.tracking import MlflowClient

    from llmcore.io import atomic_write_bytes
    from workflows.store import Tracker
    from workflows.tail import MetricsForwarder

    def line(step: int, pad: str = "") -> str:
        return json.dumps({"kind": "train", "step": step, "time": 1e9 + step, "loss": 1.0 / step, "note": pad}) + "\n"

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "fw", tmp_path / "mlartifacts")
    run = tracker.create_run("r", {"role": "sweep_point", "spec_hash": "s", "run_hash": "h"})
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(line(s) for s in range(1, 31)))
    fw = MetricsForwarder(tracker, run, path)
    assert fw.poll() == 30
    # resumed from step 20: lines 21.. written again (other timings, other lengths) and on to step 40
    atomic_write_bytes(path, "".join(line(s, "x" * (s % 7)) for s in range(1, 41)).encode())
    assert fw.poll() == 10
    history = MlflowClient(tracker.uri).get_metric_history(run, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 41))
