"""Site configs: Polaris and Slurm job scripts rendered through Parsl's providers, site checks, retry policy."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import make_corpus, tiny_spec, write_spec

from llmcore.config import TrainConfig
from site_configs import SiteSpec, build_site, site_problems
from site_configs.render import render_jobs
from site_configs.retry import NEVER, retry_cost


def jobs_for(tmp_path, trains, **site):
    s = build_site(SiteSpec(**site), tmp_path / "parsl", trains, resolve_address=False)
    return s, {j.executor: j for j in render_jobs(s.config, tmp_path / "scripts")}


def test_polaris_job_script_directives(tmp_path):
    site, jobs = jobs_for(
        tmp_path,
        [TrainConfig()],
        name="polaris",
        account="LLMlab",
        queue="prod",
        walltime="02:30:00",
        nodes_per_job=2,
        filesystems="home:eagle:grand",
        worker_init="module load conda; conda activate base",
    )
    assert list(jobs) == ["polaris-htex"] and site.mpi_executor is None  # no multi-rank training: no MPI executor
    job = jobs["polaris-htex"]
    assert job.submit_command.split()[:5] == ["qsub", "-q", "prod", "-A", "LLMlab"]
    for line in (
        "#PBS -l walltime=02:30:00",
        "#PBS -l select=2:ncpus=64:ngpus=4",
        "#PBS -l filesystems=home:eagle:grand",
        "module load conda; conda activate base",
        "export TMPDIR=/tmp",
    ):
        assert line in job.script.splitlines(), line
    assert "mpiexec --cpu-bind none --depth=64 --ppn 1 -n $WORKERCOUNT" in job.script
    assert "process_worker_pool.py" in job.script and "--available-accelerators 0 1 2 3" in job.script
    assert "--cpu-affinity list:24-31,56-63:16-23,48-55:8-15,40-47:0-7,32-39" in job.script
    assert job.node_hours == pytest.approx(5.0)
    htex = site.config.executors[0]
    assert htex.encrypted and htex.available_accelerators == ["0", "1", "2", "3"]


def test_polaris_multi_node_training_gets_an_mpi_executor(tmp_path):
    site, jobs = jobs_for(
        tmp_path, [TrainConfig(nodes=2, ranks_per_node=4, device="cuda")], name="polaris", account="LLMlab"
    )
    assert site.mpi_executor == "polaris-mpi" and set(jobs) == {"polaris-htex", "polaris-mpi"}
    mpi = jobs["polaris-mpi"]
    assert "#PBS -l select=2:ncpus=64:ngpus=4" in mpi.script and "--enable_mpi_mode" in mpi.script
    assert "-q debug" in mpi.submit_command  # Polaris' default queue
    executor = site.config.executors[1]
    assert type(executor).__name__ == "MPIExecutor" and executor.mpi_launcher == "mpiexec"


def test_slurm_job_script_directives(tmp_path):
    site, jobs = jobs_for(
        tmp_path,
        [TrainConfig(nodes=2, ranks_per_node=2)],
        name="slurm",
        account="proj",
        queue="gpu",
        walltime="00:45:00",
        gpus_per_node=4,
        cores_per_node=32,
    )
    htex = jobs["slurm-htex"]
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj",
        "#SBATCH --time=45",
        "#SBATCH --nodes=1",
        "#SBATCH --gpus-per-node=4",
    ):
        assert line in htex.script, line
    assert "srun --ntasks" in htex.script and htex.submit_command.startswith("sbatch")
    assert site.config.executors[1].mpi_launcher == "srun" and "#SBATCH --nodes=2" in jobs["slurm-mpi"].script


@pytest.mark.parametrize("account", [None, "YOUR_ACCOUNT", "<project>", "changeme"])
def test_polaris_needs_a_real_account(account, monkeypatch):
    monkeypatch.delenv("GPTLAB_ACCOUNT", raising=False)
    problems = site_problems(SiteSpec(name="polaris", account=account), [TrainConfig()])
    assert len(problems) == 1 and problems[0].startswith("site.account:")


def test_site_fields_come_from_the_environment():
    env = {"GPTLAB_ACCOUNT": "LLMlab", "GPTLAB_QUEUE": "debug-scaling"}
    assert site_problems(SiteSpec(name="polaris"), [TrainConfig()], env) == []
    from site_configs import resolve

    s = resolve(SiteSpec(name="polaris"), env)
    assert (s.account, s.queue, s.cores_per_node, s.gpus_per_node) == ("LLMlab", "debug-scaling", 64, 4)


def test_training_shape_must_fit_the_site():
    assert site_problems(SiteSpec(name="local"), [TrainConfig(nodes=2)])[0].startswith("train.nodes:")
    p = site_problems(SiteSpec(name="polaris", account="x1"), [TrainConfig(ranks_per_node=8, device="cuda")])
    assert p == ["train.ranks_per_node: 8 ranks per node but site 'polaris' has 4 GPUs per node (one rank per GPU)"]
    p = site_problems(SiteSpec(name="polaris", account="x1", interface="bond0"), [TrainConfig()], submitting=True)
    assert p and p[0].startswith("site.interface: this machine has no network interface 'bond0'")


def test_retry_policy():
    from parsl.app.errors import BashExitFailure
    from parsl.executors.high_throughput.errors import WorkerLost

    from llmcore.shards import ShardError

    assert retry_cost(BashExitFailure("train", 2), None) == NEVER  # bad config or data: same failure every time
    assert retry_cost(ShardError("x.bin: truncated"), None) == NEVER
    assert retry_cost(BashExitFailure("train", 75), None) == 1.0  # stopped at its time budget: resume
    assert retry_cost(BashExitFailure("train", -9), None) == 1.0  # killed: resume from checkpoint
    assert retry_cost(WorkerLost(0, "node1"), None) == 0.5


def test_cli_plan_shows_polaris_job_scripts_without_submitting(tmp_path, monkeypatch):
    corpus = make_corpus(tmp_path / "corpus", n_docs=3)
    spec = write_spec(tmp_path / "s.yaml", tiny_spec(corpus, tmp_path / "runs"))
    env = {"GPTLAB_ACCOUNT": "LLMlab", "PATH": "/usr/bin:/bin"}
    import os

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    r = subprocess.run(
        [sys.executable, "-m", "workflows.cli", "plan", str(spec), "--site", "polaris"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env, "TMPDIR": str(scratch)},
    )
    assert r.returncode == 0, r.stderr
    assert "#PBS -l select=1:ncpus=64:ngpus=4" in r.stdout and "qsub -q debug -A LLMlab" in r.stdout
    assert "1 node-hours" in r.stdout and "tokenizer, shards, eval -> polaris-htex" in r.stdout
    assert not (tmp_path / "runs" / "mlflow.db").exists()  # planning submits and records nothing
    # The job's output paths are where Parsl will write them on submit, and planning leaves no files behind.
    assert f"#PBS -o {tmp_path / 'runs' / 'parsl' / '<NNN>' / 'submit_scripts'}/" in r.stdout
    assert "gptlab-plan-" not in r.stdout
    assert not [p for p in scratch.iterdir() if p.name.startswith("gptlab-plan-")]
