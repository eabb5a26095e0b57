"""A real executor's failures and interrupts: Parsl worker processes (`site.name: local-processes`, the same
HighThroughputExecutor Polaris and Slurm use) under a real `gptlab submit` process.

- an error raised in a worker process reaches the driver and fails its run at once (it used to kill Parsl's result
  thread: the driver then waited forever);
- an executor whose interchange dies fails its tasks instead of leaving the driver waiting on them;
- SIGINT to the whole process group (Ctrl-C in a terminal) and SIGTERM (a scheduler) stop the submit within
  seconds: trainings save a checkpoint and stop, runs are KILLED, one line says how to resume, no training
  outlives the driver, and the next submit says it resumes the training;
- a second Ctrl-C forces out at once; a driver killed with SIGKILL takes its interchange and worker pool with it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from helpers import (
    child_env,
    gptlab,
    kill_everything_under,
    make_corpus,
    records,
    tiny_spec,
    trainings,
    wait_for,
    write_spec,
)
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow


def spec_for(tmp_path, max_steps: int = 1500, **sections):
    tree = tiny_spec(
        make_corpus(tmp_path / "corpus"),
        tmp_path / "runs",
        site={"name": "local-processes", "max_workers": 2, "heartbeat_threshold_s": 10, "retries": 1},
        train={"max_steps": max_steps, "checkpoint_interval": 20, "eval_interval": 500, "eval_batches": 1},
    )
    for key, value in sections.items():
        tree.setdefault(key, {}).update(value)
    return write_spec(tmp_path / "s.yaml", tree)


def start_submit(spec, tmp_path) -> subprocess.Popen:
    """`gptlab submit` in a process group of its own, as a terminal's foreground job is."""
    return subprocess.Popen(
        [sys.executable, "-m", "workflows.cli", "submit", str(spec), "--lines"], cwd=tmp_path, env=child_env(),
        stdout=open(tmp_path / "submit.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def train_dir(tmp_path):
    stages = tmp_path / "runs" / "stages"
    return wait_for(lambda: next(stages.glob("train-*"), None) if stages.exists() else None, 180, "the train stage")


def first_checkpoint(stage) -> None:
    """Wait for a committed checkpoint (any: a fast training has rotated step 20's away by the time we look)."""
    wait_for(lambda: any((stage / "checkpoints").glob("step_*/DONE.json")), 240, "a first checkpoint")


def checkpointed_training(tmp_path):
    """The training stage directory (of several: the points of a grid) that first commits a checkpoint."""
    stages = tmp_path / "runs" / "stages"
    found = lambda: next((d for d in stages.glob("train-*") if any(d.glob("checkpoints/step_*/DONE.json"))), None)
    return wait_for(found, 240, "a first checkpoint")


def runs_by_name(tmp_path) -> dict:
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")
    return {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}


def worker_pools(tmp_path) -> list[psutil.Process]:
    """Parsl's worker pool processes of the submits under tmp_path."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "process_worker_pool.py" in cmd and str(tmp_path) in cmd and p.info["status"] != "zombie":
            found.append(p)
    return found


def interchanges(driver: subprocess.Popen) -> list[psutil.Process]:
    """The driver's Parsl interchange (it names itself `parsl: HTEX interchange`)."""
    return [p for p in psutil.Process(driver.pid).children(recursive=True) if "interchange" in " ".join(p.cmdline())]


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM"])
def test_a_signal_stops_cleanly_kills_the_runs_says_how_to_resume_and_the_next_submit_resumes(tmp_path, how):
    spec = spec_for(tmp_path, max_steps=100000)
    proc = start_submit(spec, tmp_path)
    procs = [proc]
    try:
        stage = train_dir(tmp_path)
        first_checkpoint(stage)
        sent = time.time()
        os.killpg(proc.pid, getattr(signal, how))  # the whole foreground group, as a terminal or scheduler does
        code = proc.wait(timeout=120)
        took = time.time() - sent
        log = (tmp_path / "submit.log").read_text()
        assert code == (130 if how == "SIGINT" else 143), log
        assert took < 60, f"stopping took {took:.0f} s"
        assert f"{how}: stopping" in log and f"`gptlab submit {spec}` resumes" in log, log
        assert "Traceback" not in log, log
        assert trainings(stage) == [], "no training outlives the driver"
        runs = runs_by_name(tmp_path)
        assert runs["tiny"].info.status == "KILLED" and "interrupted by" in runs["tiny"].data.tags["gptlab.error"]
        steps = [
            int(p.name.split("_")[1]) for p in (stage / "checkpoints").glob("step_*") if (p / "DONE.json").exists()
        ]
        step = max(steps)
        assert step >= 20 and (stage / "summary.json").exists()  # the training saved its checkpoint and said so
        status = gptlab("status", spec, cwd=tmp_path)
        row = next(x for x in status.stdout.splitlines() if x.startswith("│ tiny"))
        assert "KILLED" in row and "interrupted" in row and f"{step}/100000" in row, status.stdout
        again = start_submit(spec, tmp_path)  # the next submit says it resumes, and does
        procs.append(again)
        wait_for(lambda: f"train resuming from step {step}" in (tmp_path / "submit.log").read_text(), 120,
                 "the resume line")  # fmt: skip
        wait_for(lambda: "resuming from checkpoint" in (stage / "train.log").read_text().split(f"step {step}")[-1]
                 or f"(step {step})" in (stage / "train.log").read_text(), 180, "the training to resume")  # fmt: skip
        os.killpg(again.pid, signal.SIGINT)
        assert again.wait(timeout=120) == 130
    finally:
        kill_everything_under(tmp_path, procs)


def test_a_second_ctrl_c_forces_out_at_once(tmp_path):
    spec = spec_for(tmp_path, max_steps=100000)
    proc = start_submit(spec, tmp_path)
    try:
        stage = train_dir(tmp_path)
        first_checkpoint(stage)
        for p in trainings(stage):
            p.suspend()  # a training that would not stop in time: only the forced exit ends it
        os.killpg(proc.pid, signal.SIGINT)
        wait_for(lambda: "SIGINT: stopping" in (tmp_path / "submit.log").read_text(), 30, "the first stop")
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=30) == 130
        log = (tmp_path / "submit.log").read_text()
        assert "SIGINT again: forced out; trainings killed" in log, log
        wait_for(lambda: trainings(stage) == [], 10, "the training to be killed")
    finally:
        kill_everything_under(tmp_path, [proc])


def test_a_killed_driver_takes_its_interchange_and_worker_pool_with_it(tmp_path):
    spec = spec_for(tmp_path, max_steps=100000)
    proc = start_submit(spec, tmp_path)
    try:
        first_checkpoint(train_dir(tmp_path))
        interchange = interchanges(proc)
        assert interchange and worker_pools(tmp_path)
        proc.kill()
        proc.wait(timeout=30)
        wait_for(lambda: not any(p.is_running() and p.status() != "zombie" for p in interchange), 15, "the interchange")
        # the pool misses the interchange's heartbeats for site.heartbeat_threshold_s (10 s here) and exits
        wait_for(lambda: worker_pools(tmp_path) == [], 90, "the worker pool to exit")
    finally:
        kill_everything_under(tmp_path, [proc])


def test_a_stage_error_in_a_worker_process_fails_its_run_at_once(tmp_path):
    """A TokenizerError (two constructor arguments) raised in a worker process used to be unpicklable on the
    driver's side: Parsl's result thread died and the submit waited forever."""
    spec = spec_for(tmp_path, tokenizer={"model_type": "bpe", "vocab_size": 5000})
    t0 = time.time()
    r = gptlab("submit", spec, "--lines", cwd=tmp_path, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert time.time() - t0 < 120
    assert "stage tokenizer failed: TokenizerError: tokenizer.vocab_size: 5000 is too large" in r.stderr, r.stderr
    assert "HTEX-Result-Queue-Thread" not in r.stdout + r.stderr


def test_an_executor_whose_interchange_dies_fails_its_tasks_instead_of_hanging(tmp_path):
    spec = spec_for(tmp_path, max_steps=100000)
    proc = start_submit(spec, tmp_path)
    try:
        first_checkpoint(train_dir(tmp_path))
        for p in interchanges(proc):
            p.kill()
        assert proc.wait(timeout=120) == 1
        log = (tmp_path / "submit.log").read_text()
        assert "Parsl executor local-htex: its interchange process exited" in log, log
        assert runs_by_name(tmp_path)["tiny"].info.status == "FAILED"
    finally:
        kill_everything_under(tmp_path, [proc])


def test_ctrl_c_with_queued_work_starts_nothing_new_and_kills_only_unfinished_runs(tmp_path):
    """Issue 21: a 3-point grid on one worker, Ctrl-C while the first point trains. Nothing queued starts after
    the signal (no other training writes a step), the driver is out within seconds of the first training's
    checkpoint, no training outlives it, and every run is KILLED (none had finished)."""
    spec = spec_for(tmp_path, max_steps=100000, site={"max_workers": 1},
                    sweep={"train.lr": [0.001, 0.002, 0.003]})  # fmt: skip
    proc = start_submit(spec, tmp_path)
    try:
        stage = checkpointed_training(tmp_path)
        sent = time.time()
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) == 130
        took = time.time() - sent
        print(f"Ctrl-C with 2 queued trainings returned in {took:.1f} s")
        log = (tmp_path / "submit.log").read_text()
        assert took < 45, f"stopping took {took:.0f} s: {log}"
        time.sleep(3)  # anything the interrupt failed to stop would now be running
        stages = sorted((tmp_path / "runs" / "stages").glob("train-*"))
        assert len(stages) == 3 and all(trainings(d) == [] for d in stages), "no training outlives the driver"
        started = [d for d in stages if records(d)]
        assert started == [stage], f"only the first point trained: {started}"
        assert not list((tmp_path / "runs" / "stages").glob("eval-*/DONE.json"))
        points = [r for r in runs_by_name(tmp_path).values() if r.data.tags["gptlab.role"] == "sweep_point"]
        assert [r.info.status for r in points] == ["KILLED"] * 3
        assert "queued stages will not start" in log and "3 run(s) KILLED" in log, log
    finally:
        kill_everything_under(tmp_path, [proc])


def test_a_pruning_decision_survives_an_interrupt_and_a_resubmit_keeps_it(tmp_path):
    """A training whose pruning was decided (recorded in its directory) and then interrupted is not resumed by
    the next submit of the pruned spec: its run is closed pruned, never RUNNING again; with pruning switched off
    a submit resumes it."""
    from workflows.processes import record_pruned

    prune = {"prune": {"method": "asha", "min_steps": 20, "reduction_factor": 2}}
    spec = spec_for(tmp_path, max_steps=300, sweep={"train.lr": [0.001, 0.002], **prune},
                    site={"max_workers": 1})  # fmt: skip
    proc = start_submit(spec, tmp_path)
    try:
        stage = checkpointed_training(tmp_path)
        record_pruned(stage, 20, "decided by the test, as Pruning.observe records it")
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) == 130
        steps = len(records(stage))
        again = gptlab("submit", spec, "--lines", cwd=tmp_path, timeout=600)
        pruned = {n: r for n, r in runs_by_name(tmp_path).items() if r.data.tags.get("gptlab.pruned") == "true"}
        assert len(pruned) == 1, again.stdout + again.stderr
        (run,) = pruned.values()
        assert run.info.status == "KILLED" and "pruned at step 20" in run.data.tags["gptlab.error"]
        assert len(records(stage)) == steps, "the pruned training was not resumed"
        status = gptlab("status", spec, cwd=tmp_path)
        assert "PRUNED" in status.stdout and "RUNNING" not in status.stdout, status.stdout
        third = gptlab("submit", spec, "--lines", cwd=tmp_path, timeout=600)  # a finished study stays as it is
        assert "RUNNING" not in gptlab("status", spec, cwd=tmp_path).stdout
        assert len(records(stage)) == steps and "PRUNED" in third.stdout + third.stderr
    finally:
        kill_everything_under(tmp_path, [proc])
