"""A tiny sweep on a real Slurm cluster: Parsl submits sbatch jobs, workers start inside them, MLflow records it.

Needs the one-node cluster that `.ci/slurm-up.sh` starts (CI runs it before the tests).
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
from helpers import make_corpus, tiny_spec, write_spec
from mlflow.tracking import MlflowClient

from workflows import submit

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_sweep_runs_in_sbatch_jobs(tmp_path):
    assert shutil.which("sbatch"), "no Slurm here: run .ci/slurm-up.sh (starts a one-node cluster) first"
    up = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    assert up.returncode == 0 and "idle" in up.stdout + "mix", (
        f"Slurm is not up ({up.stderr.strip()}): run .ci/slurm-up.sh"
    )
    corpus = make_corpus(tmp_path / "corpus")
    site = {"name": "slurm", "queue": "debug", "walltime": "00:20:00", "interface": "lo", "retries": 0}
    spec = write_spec(
        tmp_path / "s.yaml", tiny_spec(corpus, tmp_path / "runs", site=site, sweep={"model.n_layer": [1, 2]})
    )
    result = submit(spec, quiet=True, poll_interval=0.5)
    assert result.ok, [r.error for r in result.runs]
    client = MlflowClient(result.tracking_uri)
    for r in result.runs:
        run = client.get_run(r.run_id)
        assert run.info.status == "FINISHED" and "val/bpb" in run.data.metrics
        assert run.data.tags["gptlab.site"] == "slurm"
    # The jobs Parsl submitted: real sbatch scripts whose worker pools ran the stages, with encrypted traffic.
    submitted = tmp_path / "runs" / "parsl" / "000" / "submit_scripts"
    scripts = [p for p in submitted.glob("parsl.slurm-htex.block-*") if not p.suffix.lstrip(".").isalpha()]
    assert scripts and "#SBATCH --partition=debug" in scripts[0].read_text()
    assert "Found nodes : 1" in (submitted / f"{scripts[0].name}.stdout").read_text()  # the job ran on a node
    assert (tmp_path / "runs" / "parsl" / "000" / "slurm-htex" / "certificates" / "server.key").is_file()


def test_two_ranks_through_srun_equal_one_rank_with_twice_the_micro_batches(tmp_path):
    """A two-rank training in a Slurm job (Parsl's MPIExecutor, launched by srun with no PMI: the cluster's
    MpiDefault=none, so only SLURM_PROCID / SLURM_NTASKS are set) is one run of two ranks: the same loss curve as
    one rank with two micro-batches (here on the local site), not two one-rank runs."""
    import json

    corpus = make_corpus(tmp_path / "corpus")
    # The node has 2 CPUs: the MPI job's 2 ranks start once the worker-pool job (1 CPU) has ended, so idle jobs
    # are ended after 5 s instead of 2 minutes.
    site = {
        "name": "slurm",
        "queue": "debug",
        "walltime": "00:20:00",
        "interface": "lo",
        "retries": 0,
        "idle_timeout_s": 5,
    }
    curves = {}
    for name, train, where in (
        ("two-ranks", {"ranks_per_node": 2}, {"site": site}),
        ("one-rank", {"grad_accum": 2}, {}),
    ):
        tree = tiny_spec(
            corpus, tmp_path / "runs", name=name, train={**train, "max_steps": 12, "eval_interval": 6}, **where
        )
        result = submit(write_spec(tmp_path / f"{name}.yaml", tree), quiet=True, poll_interval=0.5)
        assert result.ok, result.runs[0].error
        stage = next(
            d
            for d in (tmp_path / "runs" / "stages").glob("train-*")
            if json.loads((d / "train.json").read_text())["train"]["grad_accum"] == (1 if name == "two-ranks" else 2)
        )
        rows = [json.loads(x) for x in (stage / "metrics.jsonl").read_text().splitlines()]
        curves[name] = [r for r in rows if r["kind"] == "train"]
    assert [r["tokens_seen"] for r in curves["two-ranks"]] == [r["tokens_seen"] for r in curves["one-rank"]]
    assert [r["loss"] for r in curves["two-ranks"]] == pytest.approx([r["loss"] for r in curves["one-rank"]], rel=1e-5)
