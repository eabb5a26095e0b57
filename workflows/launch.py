"""Parsl launching: a plan's stages as Parsl apps on a site, and what their tasks say.

:class:`Launcher` owns the futures of one submit: one Parsl app per stage not yet committed (stages shared by
several sweep points are launched once; a training is a bash app running ``python -m llmcore.train`` followed by
a Python app that commits it). Every app is launched with the submit's halt file (``workflows.processes.Halt``),
so a task still queued when the driver is told to stop does no work when a worker takes it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as wait_any
from typing import Any

from workflows.planning import Plan, RunPlan, Stage
from workflows.processes import Halt, kill_children
from workflows.stages import commit_train, prepare_stage, run_stage, train_app, write_train_config
from workflows.states import OnDisk, StageState, file_size, stage_state
from workflows.trainlog import describe_failure

SHUTDOWN_S = 60.0  # how long Parsl may take to shut down before its processes are killed


class Launcher:
    """The Parsl tasks of one submit: launching a run's stages, their states, their failures."""

    def __init__(self, p: Plan, site: Any, halt: Halt):
        self.plan, self.halt = p, halt
        self.apps, self.train_env = make_apps(site), site.train_env
        self.futures: dict[str, Future | None] = {}  # stage key -> its future (None: committed before this submit)
        self.processes: dict[str, Future] = {}  # training stage key -> the future of its process (the bash app)
        self.launched_log: dict[str, int] = {}  # training stage key -> train.log's size when it was launched
        self.cached: set[str] = {s.key for s in p.stages.values() if s.done}

    def launch_run(self, run: RunPlan, pause_at: int | None = None) -> None:
        """Launch every stage of a run not launched (or committed) yet; its training stops at ``pause_at`` (a rung
        of successive halving) if given."""
        for stage in run.stages.values():
            if stage.key not in self.futures:
                if stage.done:
                    self.cached.add(stage.key)
                self.futures[stage.key] = None if stage.done else self._launch(stage, run, pause_at)

    def relaunch(self, run: RunPlan, pause_at: int | None) -> None:
        """Launch a run's uncommitted stages again (a training promoted past its rung resumes from its checkpoint)."""
        for stage in run.stages.values():
            if not stage.done:
                self.futures.pop(stage.key, None)
                self.processes.pop(stage.key, None)
        self.launch_run(run, pause_at)

    def _launch(self, stage: Stage, run: RunPlan, pause_at: int | None = None) -> Future:
        prepare_stage(stage.dir, stage.config)
        deps = [f for k in stage.deps if (f := self.futures[k]) is not None]
        dirs = {k: str(d) for k, d in stage.inputs.items()}
        halt = str(self.halt.path)
        if not stage.definition.process:
            return self.apps["stage"](stage.kind, str(stage.dir), stage.config, dirs, stage.runtime, inputs=deps,
                                      halt=halt)  # fmt: skip
        write_train_config(stage.dir, stage.config, {**stage.runtime, "pause_at": pause_at})
        owner = next(r for r in self.plan.runs if stage.key in {s.key for s in r.stages.values()})
        app, launcher, extra, env = train_launch(owner, stage, self.apps, self.train_env)
        log = stage.dir / stage.definition.log
        self.launched_log[stage.key] = file_size(log)
        # Keyword arguments only past the first three: Parsl merges the function's defaults into the call.
        proc = app(str(stage.dir), dirs, env, launcher=launcher, inputs=deps, stdout=str(log), stderr=str(log),
                   halt=halt, **extra)  # fmt: skip
        self.processes[stage.key] = proc
        return self.apps["commit_train"](str(stage.dir), inputs=[proc])

    # ---- what the tasks say

    def task(self, stage: Stage) -> str | None:
        """The Parsl state of a launched stage's live task (a training's: its process's while that runs)."""
        f, proc = self.futures.get(stage.key), self.processes.get(stage.key)
        if f is None:
            return None
        return (proc if proc is not None and not proc.done() else f).task_status()

    def state(self, stage: Stage, launching: bool = False) -> StageState:
        """A stage's state (``workflows.states.stage_state``) from its directory and its live task."""
        disk = OnDisk.read(stage.dir, stage.definition, self.launched_log.get(stage.key))
        return stage_state(disk, self.task(stage), cached=stage.key in self.cached, launching=launching)

    def done(self, run: RunPlan) -> bool:
        """Whether every task of a run has ended."""
        return all((f := self.futures.get(s.key)) is None or f.done() for s in run.stages.values())

    def process_running(self, stage: Stage) -> bool:
        """Whether a training's process task is launched and not ended."""
        proc = self.processes.get(stage.key)
        return proc is not None and not proc.done()

    def failure(self, run: RunPlan) -> tuple[str, str] | None:
        """(stage label, error) of the first stage of this run that failed itself, if any. The error's first
        line is the cause; a failed training's log tail may follow it (see RunResult.error)."""
        from parsl.dataflow.errors import DependencyError

        for label, stage in run.stages.items():
            for f in (self.processes.get(stage.key), self.futures.get(stage.key)):
                if f is None or not f.done() or f.exception() is None:
                    continue
                exc = f.exception()
                if isinstance(exc, DependencyError):
                    continue
                tries = getattr(f, "task_record", {}).get("fail_count", 1)
                return label, describe_failure(label, stage.dir, exc, tries)
        return None

    def wait(self, runs: list[RunPlan], timeout: float) -> None:
        """Sleep until one of these runs' tasks ends, or ``timeout`` passes."""
        keys = {s.key for r in runs for s in r.stages.values()}
        running = [
            f for k in keys for f in (self.futures.get(k), self.processes.get(k)) if f is not None and not f.done()
        ]
        if running:
            wait_any(running, timeout=timeout, return_when=FIRST_COMPLETED)
        else:
            time.sleep(timeout)


# --------------------------------------------------------------------------------------- Parsl helpers


def make_apps(site: Any) -> dict[str, Any]:
    """The Parsl apps of a site: every Python stage through one app, training as a bash app (and its commit)."""
    from parsl.app.app import bash_app, python_app

    cpu, train = [site.cpu_executor], [site.train_executor]
    apps = {
        "stage": python_app(run_stage, executors=cpu),
        "train": bash_app(train_app, executors=train),
        "commit_train": python_app(commit_train, executors=cpu),
    }
    if site.mpi_executor:
        apps["train_mpi"] = bash_app(train_app, executors=[site.mpi_executor])
    return apps


def train_launch(run: RunPlan, stage: Stage, apps: dict[str, Any], env: dict[str, str]):
    """(app, launcher prefix, app kwargs, env) for one training: one process, or one rank per GPU."""
    from llmcore.distributed import EXPECTED_RANKS, mpiexec_prefix

    t = run.spec.train
    ranks = t.nodes * t.ranks_per_node
    env = {**env, EXPECTED_RANKS: str(ranks)}  # with 1: not the worker pool's PMI_* / SLURM_* variables
    if ranks == 1:
        return apps["train"], "", {}, env
    if "train_mpi" in apps:
        spec = {"num_nodes": t.nodes, "ranks_per_node": t.ranks_per_node, "num_ranks": ranks}
        return apps["train_mpi"], "$PARSL_MPI_PREFIX", {"parsl_resource_specification": spec}, env
    port = 20000 + int(stage.key[:8], 16) % 20000  # a port per training, stable across retries
    env = {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    return apps["train"], mpiexec_prefix(ranks, t.ranks_per_node), {}, env


def check_executors(dfk: Any) -> None:
    """Fail the tasks of an executor that can no longer deliver results (its result thread or its interchange
    died: an exception that could not be unpickled, a killed process), instead of waiting on them forever."""
    for executor in dfk.executors.values():
        thread = getattr(executor, "_result_queue_thread", None)
        interchange = getattr(executor, "interchange_proc", None)
        if getattr(executor, "bad_state_is_set", False) or (thread is None and interchange is None):
            continue
        why = None
        if thread is not None and not thread.is_alive():
            why = "its result thread died (a task's result or error could not be read; see the Parsl log)"
        elif interchange is not None and interchange.poll() is not None:
            why = f"its interchange process exited (code {interchange.returncode})"
        if why is not None:
            executor.set_bad_state_and_fail_all(RuntimeError(f"Parsl executor {executor.label}: {why}"))


def shutdown(dfk: Any, say: Callable[[str], None]) -> None:
    """Shut Parsl down, giving up after SHUTDOWN_S (then its processes are killed)."""
    import parsl

    done = threading.Event()

    def clean() -> None:
        try:
            dfk.cleanup()
        finally:
            done.set()

    threading.Thread(target=clean, name="parsl-shutdown", daemon=True).start()
    if not done.wait(SHUTDOWN_S):
        say(f"Parsl did not shut down within {SHUTDOWN_S:.0f} s: killing its processes")
        kill_children()
    parsl.clear()
