"""Render the batch job scripts a site would submit, through Parsl's own providers, without a scheduler.

Each provider's ``submit`` writes its job script and then runs ``qsub``/``sbatch``; here that last call
is intercepted (as Parsl's provider tests do), so the script and the submit command are shown exactly as
they would be submitted. Worker addresses and ports are only known once Parsl starts: they appear as
``<addresses>``-style placeholders.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# What each scheduler prints when it accepts a job, so the provider's parser is satisfied.
FAKE_SUBMIT_OUTPUT = {"PBSProProvider": "1234.polaris-pbs-01", "SlurmProvider": "Submitted batch job 1234"}


@dataclass
class JobScript:
    executor: str
    submit_command: str
    script: str
    nodes: int
    walltime: str
    max_jobs: int

    @property
    def node_hours(self) -> float:
        h, m, s = (int(x) for x in self.walltime.split(":"))
        return self.nodes * self.max_jobs * (h + m / 60 + s / 3600)


class _Placeholders(dict):
    def __missing__(self, key: str) -> str:
        return f"<{key}>"


def worker_command(executor: Any) -> str:
    """The executor's worker-pool command as Parsl formats it, with start-time values as placeholders."""
    fields = _Placeholders(
        debug="",
        block_id="0",
        prefetch_capacity=executor.prefetch_capacity,
        address_probe_timeout_string="",
        cores_per_worker=executor.cores_per_worker,
        mem_per_worker=executor.mem_per_worker,
        nodes_per_block=executor.provider.nodes_per_block,
        heartbeat_period=executor.heartbeat_period,
        heartbeat_threshold=executor.heartbeat_threshold,
        drain_period=executor.drain_period,
        poll_period=executor.poll_period,
        cpu_affinity=executor.cpu_affinity,
        max_workers_per_node=(
            ""
            if executor.max_workers_per_node == float("inf")
            else f"--max_workers_per_node={executor.max_workers_per_node}"
        ),
        enable_mpi_mode="--enable_mpi_mode " if executor.enable_mpi_mode else "",
        mpi_launcher=executor.mpi_launcher,
        accelerators=" ".join(executor.available_accelerators),
    )
    command = executor.launch_cmd.format_map(fields).replace("{block_id}", "0")  # Parsl fills it per block
    return re.sub(r"\s+", " ", command).strip()


def render_jobs(config: Any, script_dir: Path) -> list[JobScript]:
    """One rendered job per batch executor of a ``parsl.Config`` (local executors have none)."""
    script_dir.mkdir(parents=True, exist_ok=True)
    jobs = []
    for executor in config.executors:
        provider = getattr(executor, "provider", None)
        kind = type(provider).__name__
        if kind not in FAKE_SUBMIT_OUTPUT:
            continue
        submitted: list[str] = []

        def fake_execute_wait(
            cmd: str, timeout: int | None = None, _out=FAKE_SUBMIT_OUTPUT[kind]
        ) -> tuple[int, str, str]:
            submitted.append(cmd)
            return 0, _out, ""

        provider.script_dir = str(script_dir)
        provider.execute_wait = fake_execute_wait
        provider.submit(worker_command(executor), 1, f"parsl.{executor.label}.block-0")
        script_path = submitted[0].split()[-1]
        jobs.append(
            JobScript(
                executor.label,
                submitted[0],
                Path(script_path).read_text(),
                provider.nodes_per_block,
                provider.walltime,
                provider.max_blocks,
            )
        )
    return jobs
