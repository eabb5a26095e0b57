"""Sites for real: Parsl worker processes with a training killed mid-run, and two ranks through mpiexec."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
from helpers import make_corpus, records, tiny_spec, wait_for, write_spec

from workflows import submit

pytestmark = pytest.mark.slow


def submit_and_kill_training(spec: Path, runs_root: Path, at_step: int, wait_s: float) -> tuple:
    """Submit in a thread; once the training has committed its checkpoint at ``at_step``, SIGKILL its processes
    (every rank, not mpiexec). Returns (its stage directory, its metric records by step before the kill, how many
    processes were killed, the submit's result)."""
    out: dict = {}
    driver = threading.Thread(target=lambda: out.update(result=submit(spec, quiet=True, poll_interval=0.5)))
    driver.start()
    stages = runs_root / "stages"
    stage = wait_for(lambda: next(stages.glob("train-*"), None) if stages.exists() else None, 120, "the train stage")
    wait_for(lambda: (stage / "checkpoints" / f"step_{at_step:08d}" / "DONE.json").exists(), wait_s, "a checkpoint")
    before = {r["step"]: r for r in records(stage)}
    victims = [p for p in psutil.process_iter(["cmdline", "name"])
               if not p.info["name"].startswith("mpiexec") and "llmcore.train" in (p.info["cmdline"] or [])
               and str(stage) in " ".join(p.info["cmdline"])]  # fmt: skip
    for p in victims:
        p.send_signal(signal.SIGKILL)
    driver.join(timeout=400)
    return stage, before, len(victims), out["result"]


def test_killed_training_on_local_processes_is_retried_and_resumes(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    tree = tiny_spec(
        corpus,
        tmp_path / "runs",
        site={"name": "local-processes", "max_workers": 2},
        train={"max_steps": 400, "checkpoint_interval": 40, "eval_interval": 100},
    )
    spec = write_spec(tmp_path / "s.yaml", tree)
    stage, before, killed, result = submit_and_kill_training(spec, tmp_path / "runs", at_step=80, wait_s=180)
    assert killed, "the training process is running"
    assert result.ok, result.runs[0].error
    after = records(stage)
    assert [r["step"] for r in after] == list(range(1, 401))  # every step once
    # Steps up to the checkpoint were not redone: their lines are the ones written before the kill.
    assert all(after[s - 1] == before[s] for s in range(1, 81))
    assert result.runs[0].metrics["final/val_loss"] < after[0]["loss"]
    # The same training uninterrupted (same command, same thread count) ends at the same loss.
    command = next(x for x in (stage / "train.log").read_text().splitlines() if "-m llmcore.train" in x).split()
    shards = command[command.index("--shards") + 1]
    threads = next(x.split("=")[1] for x in command if x.startswith("OMP_NUM_THREADS="))
    ref = tmp_path / "uninterrupted"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "llmcore.train",
            "--config",
            str(stage / "train.json"),
            "--shards",
            shards,
            "--out",
            str(ref),
        ],
        check=True,
        capture_output=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": threads, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    resumed, uninterrupted = (json.loads((d / "summary.json").read_text()) for d in (stage, ref))
    assert resumed["final_train_loss"] == pytest.approx(uninterrupted["final_train_loss"], abs=1e-3)
    assert resumed["final_val_loss"] == pytest.approx(uninterrupted["final_val_loss"], abs=1e-3)


@pytest.mark.mpi
def test_two_ranks_through_mpiexec_equal_one_rank_with_twice_the_micro_batches(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    curves = []
    for name, train in (("two-ranks", {"ranks_per_node": 2}), ("one-rank", {"grad_accum": 2})):
        tree = tiny_spec(corpus, tmp_path / "runs", name=name, train={**train, "max_steps": 12, "eval_interval": 6})
        result = submit(write_spec(tmp_path / f"{name}.yaml", tree), quiet=True, poll_interval=0.5)
        assert result.ok, result.runs[0].error
        stage = next(
            d
            for d in (tmp_path / "runs" / "stages").glob("train-*")
            if json.loads((d / "train.json").read_text())["train"]["ranks_per_node"]
            == (2 if name == "two-ranks" else 1)
        )
        curves.append([r["loss"] for r in records(stage)])
    assert len(curves[0]) == 12
    assert curves[0] == pytest.approx(curves[1], rel=1e-5)


@pytest.mark.mpi
def test_killed_fsdp_training_on_local_processes_is_retried_from_its_sharded_checkpoint(tmp_path):
    """Both ranks of a 2-rank FSDP training SIGKILLed after a sharded checkpoint: Parsl's retry resumes from that
    checkpoint (no step redone before it, every step once) and the run ends at the uninterrupted run's loss."""
    corpus = make_corpus(tmp_path / "corpus")
    train = {"max_steps": 150, "checkpoint_interval": 30, "eval_interval": 50, "parallelism": "fsdp",
             "ranks_per_node": 2}  # fmt: skip
    site = {"name": "local-processes", "max_workers": 2}
    spec = write_spec(tmp_path / "s.yaml", tiny_spec(corpus, tmp_path / "runs", site=site, train=train))
    stage, before, killed, result = submit_and_kill_training(spec, tmp_path / "runs", at_step=60, wait_s=240)
    assert killed == 2, "both ranks are running"
    assert result.ok, result.runs[0].error
    assert "resuming from checkpoint" in (stage / "train.log").read_text()
    after = records(stage)
    assert [r["step"] for r in after] == list(range(1, 151))
    assert all(after[s - 1] == before[s] for s in range(1, 61))
    assert json.loads((stage / "checkpoints" / "step_00000150" / "meta.json").read_text())["layout"] == "sharded"

    again = write_spec(tmp_path / "u.yaml", tiny_spec(corpus, tmp_path / "uninterrupted", site=site, train=train))
    reference = submit(again, quiet=True, poll_interval=0.5)
    assert reference.ok, reference.runs[0].error
    ref_stage = next((tmp_path / "uninterrupted" / "stages").glob("train-*"))
    resumed, uninterrupted = (json.loads((d / "summary.json").read_text()) for d in (stage, ref_stage))
    assert resumed["final_train_loss"] == pytest.approx(uninterrupted["final_train_loss"], abs=1e-4)
    assert resumed["final_val_loss"] == pytest.approx(uninterrupted["final_val_loss"], abs=1e-4)
    assert result.runs[0].metrics["final/val_loss"] == pytest.approx(reference.runs[0].metrics["final/val_loss"],
                                                                     abs=1e-4)  # fmt: skip
