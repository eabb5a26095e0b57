"""Submit: plan a spec, run its stage graph through Parsl, and record every run in MLflow.

The :class:`Driver` is the only MLflow writer. It launches one Parsl app per stage that is not yet committed
(stages shared by several sweep points are launched once), follows the trainings' metrics while stages run, and
closes each sweep point's MLflow run as FINISHED or FAILED with the error; a failing point never stops the others.

Stopping: the first SIGINT (Ctrl-C) or SIGTERM (a scheduler's walltime) asks every running training to save a
checkpoint and stop (a STOP file in its directory, and SIGTERM to its process where it runs on this machine),
waits for them, marks the unfinished runs KILLED and says that submitting the same spec resumes them; a second
signal forces out at once. A Parsl executor that can no longer deliver results (its result thread or its
interchange died) fails its tasks instead of leaving the driver waiting on them forever.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as wait_any
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workflows.lifecycle import RunLifecycle, run_summary_line, tracker_for
from workflows.planning import Plan, RunPlan, Stage
from workflows.progress import Board, LineDisplay, LiveDisplay, RunRow
from workflows.stages import TRAIN_LOG, prepare_stage, write_train_config
from workflows.states import StageState
from workflows.tail import MetricsForwarder
from workflows.trainlog import describe_failure, lock_holder, log_size

FORWARD_EVERY = 5.0  # seconds between sends of a running training's metrics to MLflow (one transaction each)
STOP_GRACE_S = 90.0  # how long a stopping training may take to save its checkpoint before it is killed
SHUTDOWN_S = 60.0  # how long Parsl may take to shut down before its processes are killed


@dataclass
class RunResult:
    """One sweep point after a submit."""

    name: str
    run_id: str
    status: str  # FINISHED, FAILED or KILLED (an interrupted submit)
    point: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)
    stages: dict[str, StageState] = field(default_factory=dict)  # stage label -> state
    # Why it failed. Its first line is the cause recorded in MLflow (which stage, the exit code, the final
    # exception, the full log's path); for a failed training the lines after it are the end of its log,
    # under a header naming the log file.
    error: str | None = None

    @property
    def cause(self) -> str | None:
        """The error's first line: what MLflow records and ``gptlab status`` shows."""
        return self.error.splitlines()[0] if self.error else None


@dataclass
class SubmitResult:
    experiment: str
    experiment_id: str
    parent_run_id: str
    tracking_uri: str
    runs: list[RunResult]
    seconds: float
    interrupted: str | None = None  # the signal that stopped the submit (SIGINT, SIGTERM), if one did

    @property
    def ok(self) -> bool:
        """Every run finished (or was pruned: an early stop the spec asked for)."""
        return all(r.status in ("FINISHED", "PRUNED") for r in self.runs)


# --------------------------------------------------------------------------------------------- signals


class StopRequest:
    """SIGINT / SIGTERM during a submit. The first sets ``signal`` (the driver stops cleanly at its next look);
    a second calls ``force`` (which does not return). Installed only in the main thread."""

    def __init__(self, force: Callable[[str], None]):
        self.signal: str | None = None
        self.force = force
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signal is None:
            self.signal = name
        else:
            self.force(name)


# ---------------------------------------------------------------------------------------------- driver


class Driver:
    """Runs one plan on its site and keeps MLflow in step with it."""

    def __init__(self, p: Plan, display: LineDisplay | LiveDisplay, poll_interval: float, fail_fast: bool = False):
        self.plan, self.display, self.poll_interval, self.fail_fast = p, display, poll_interval, fail_fast
        self.say = display.say
        self.lifecycle = RunLifecycle(tracker_for(p), p)
        self.futures: dict[str, Future | None] = {}  # stage key -> its future (None: committed before this submit)
        self.processes: dict[str, Future] = {}  # training stage key -> the future of its process (the bash app)
        self.launched_log: dict[str, int] = {}  # training stage key -> train.log's size when it was launched
        self.forwarders: dict[str, MetricsForwarder] = {}  # run hash -> its training's forwarder
        self.cached = {s.key for s in p.stages.values() if s.done}
        self.board = Board([RunRow(r.name, r.spec.train.max_steps, self._initial_states(r)) for r in p.runs])
        self.results: dict[str, RunResult] = {}  # run hash -> result, as runs end
        self.stop = StopRequest(self._force)
        self.study: Any = None  # the Optuna study of a search or a pruned grid (workflows.search.Study)
        self.pruned: dict[str, int] = {}  # run hash -> the step its training was asked to stop at
        self.reported: dict[str, int] = {}  # run hash -> the last validation step reported to its trial

    # ---- the whole submit

    def run(self, started: float) -> SubmitResult:
        lifecycle, p = self.lifecycle, self.plan
        for run_id in lifecycle.mark_dead_runs_killed():
            self.say(f"run {run_id} was left RUNNING by a driver that is gone: marked KILLED")
        lifecycle.start()
        if p.spec.search is not None or p.spec.sweep.prune is not None:
            from workflows.search import Study, default_parallel

            self.study = Study(p, default_parallel(p.spec))
            if p.spec.search is not None:
                for r in self.study.resumable():
                    self._add_row(r)
                    lifecycle.start_child(r)
                self.say(f"search: study {self.study.path} holds {len(p.runs)} of {p.spec.search.trials} trials")
            else:
                self.study.grid_trials()
        todo = []
        for r in p.runs:
            ended = self.study.state(r) if self.study is not None else "NONE"
            if ended in ("COMPLETE", "PRUNED", "FAIL") or (
                lifecycle.children[r.run_hash].previous == "FINISHED" and all(s.done for s in r.stages.values())
            ):
                self._close(r, self._earlier_result(r, ended))
            else:
                todo.append(r)
                states = self.board.rows[r.name].stages
                self.say(f"[{r.name}] " + ", ".join(self._describe(r, label, st) for label, st in states.items()))
        self.display.update(self.board)
        if todo or (self.study is not None and self.study.search is not None):
            with self.stop:
                self._execute(todo)
        return self._end(started)

    def _earlier_result(self, run: RunPlan, trial_state: str) -> RunResult:
        """A run an earlier submit ended (finished, or pruned or failed as a trial): what MLflow holds."""
        status = {"PRUNED": "PRUNED", "FAIL": "FAILED"}.get(trial_state, "FINISHED")
        states = {label: StageState.CACHED if s.done else StageState.PRUNED if s.kind == "train" and status == "PRUNED"
                  else StageState.NOT_RUN for label, s in run.stages.items()}  # fmt: skip
        return RunResult(run.name, self.lifecycle.child(run), status, run.point, self.lifecycle.metrics_of(run), states)

    def _add_row(self, run: RunPlan) -> None:
        self.board.rows[run.name] = RunRow(run.name, run.spec.train.max_steps, self._initial_states(run))

    def _end(self, started: float) -> SubmitResult:
        from workflows.compare import log_sweep_summary

        p, lifecycle = self.plan, self.lifecycle
        runs = [self.results[r.run_hash] for r in p.runs]
        tracker = lifecycle.tracker
        counts = {f"runs_{s.lower()}": str(sum(r.status == s for r in runs)) for s in ("FINISHED", "PRUNED")}
        tracker.set_tags(lifecycle.parent_id, counts)
        if p.spec.sweep or p.spec.search is not None:
            log_sweep_summary(tracker, lifecycle.parent_id, p, runs)
        if self.stop.signal:
            lifecycle.end(lifecycle.parent_id, "KILLED", f"interrupted by {self.stop.signal}")
        elif all(r.status in ("FINISHED", "PRUNED") for r in runs):
            lifecycle.end(lifecycle.parent_id, "FINISHED")
        else:
            lifecycle.end(lifecycle.parent_id, "FAILED", "; ".join(f"{r.name}: {r.cause}" for r in runs if r.error))
        experiment = p.spec.tracking.experiment or p.spec.name
        return SubmitResult(experiment, tracker.experiment_id, lifecycle.parent_id, tracker.uri, runs,
                            time.time() - started, self.stop.signal)  # fmt: skip

    def _initial_states(self, run: RunPlan) -> dict[str, StageState]:
        states = {}
        for label, s in run.stages.items():
            if s.done:
                states[label] = StageState.CACHED
            elif s.kind == "train" and resume_step(s.dir) is not None:
                states[label] = StageState.RESUMING
            else:
                states[label] = StageState.TO_RUN
        return states

    @staticmethod
    def _describe(run: RunPlan, label: str, state: StageState) -> str:
        if state == StageState.RESUMING:
            return f"{label} resuming from step {resume_step(run.stages[label].dir)}"
        return f"{label} {state}"

    # ---- running the stages

    def _execute(self, todo: list[RunPlan]) -> None:
        import parsl

        from llmcore.io import file_lock
        from site_configs import build_site

        p = self.plan
        trainings = sum(1 for s in p.stages.values() if s.kind == "train" and not s.done)
        if self.study is not None and self.study.search is not None:
            trainings = max(trainings, self.study.max_parallel)
        trains = [r.spec.train for r in todo] or [p.loaded.base.train]
        site = build_site(p.spec.site, p.runs_root / "parsl", trains, trainings)
        with file_lock(p.runs_root / "parsl" / ".lock", "the Parsl run directory"):  # Parsl numbers run dirs racily
            dfk = parsl.load(site.config)
        try:
            for r in todo:
                self.lifecycle.tracker.set_tags(self.lifecycle.child(r), {"parsl_run_id": dfk.run_id})
            self.apps, self.train_env = make_apps(site), site.train_env
            for r in todo:
                self._launch_run(r)
            self._loop(list(todo), dfk)
        finally:
            shutdown(dfk, self.say)

    def _loop(self, pending: list[RunPlan], dfk: Any) -> None:
        while True:
            if self.stop.signal:
                self._interrupt(pending)
                return
            check_executors(dfk)
            for r in pending:
                self._forward(r)
            if self.study is not None:
                self._prune(pending)
            self._refresh(pending)
            for r in [r for r in pending if self._run_done(r)]:
                pending.remove(r)
                done = self._finalize(r)
                self.say(f"[{r.name}] {done.status} {run_summary_line(done.metrics)}".rstrip())
            if self.fail_fast and pending and any(x.status == "FAILED" for x in self.results.values()):
                self._cancel(pending)
                return
            if self.study is not None:
                for r in self.study.more(len(pending)):
                    self._add_row(r)
                    self.lifecycle.start_child(r)
                    self._launch_run(r)
                    pending.append(r)
                    self.say(f"[{r.name}] new trial: " + ", ".join(f"{k}={v}" for k, v in r.point.items()))
                for why in self.study.rejected:
                    self.say(f"search: {why}: told FAIL")
                self.study.rejected.clear()
            self.display.update(self.board)
            if not pending:
                return
            self._wait(pending)

    def _launch_run(self, run: RunPlan) -> None:
        """Launch every stage of a run not launched (or committed) yet."""
        for stage in run.stages.values():
            if stage.key not in self.futures:
                if stage.done:
                    self.cached.add(stage.key)
                self.futures[stage.key] = None if stage.done else self._launch(stage, self.apps, self.train_env)

    def _prune(self, pending: list[RunPlan], stop: bool = True) -> None:
        """Report new validation estimates to each trial (those of runs that ended too: the pruner judges later
        trials against them); ask the running trials the pruner stops to stop."""
        for r in pending:
            fw = self.forwarders.get(r.run_hash)
            if fw is None or r.run_hash in self.pruned:
                continue
            new = {s: v for s, v in fw.tail.evals.items() if s > self.reported.get(r.run_hash, -1)}
            if not new:
                continue
            self.reported[r.run_hash] = max(new)
            proc = self.processes.get(r.training.key)
            if self.study.report(r, new) and stop and proc is not None and not proc.done():
                self.pruned[r.run_hash] = max(new)
                request_stop(r.training.dir)
                self.say(f"[{r.name}] pruned at step {max(new)} (its validation loss is not among the best at this "
                         "rung): its training saves a checkpoint and stops")  # fmt: skip

    def _launch(self, stage: Stage, apps: dict[str, Any], train_env: dict[str, str]) -> Future:
        prepare_stage(stage.dir, stage.config)
        deps = [f for k in stage.deps if (f := self.futures[k]) is not None]
        dirs = {k: str(d) for k, d in stage.inputs.items()}
        if stage.definition.body is not None:
            return apps["stage"](stage.kind, str(stage.dir), stage.config, dirs, stage.runtime, inputs=deps)
        write_train_config(stage.dir, stage.config, stage.runtime)
        run = next(r for r in self.plan.runs if r.training.key == stage.key)
        app, launcher, extra, env = train_launch(run, stage, apps, train_env)
        self.launched_log[stage.key] = log_size(stage.dir)
        log = str(stage.dir / TRAIN_LOG)
        # Keyword arguments only past the first three: Parsl merges the function's defaults into the call.
        proc = app(str(stage.dir), dirs["shards"], env, launcher=launcher, init_dir=dirs.get("init"), inputs=deps,
                   stdout=log, stderr=log, **extra)  # fmt: skip
        self.processes[stage.key] = proc
        return apps["commit_train"](str(stage.dir), inputs=[proc])

    def _forward(self, run: RunPlan, now: bool = False) -> None:
        """Read a training's new metric lines; send them to MLflow every FORWARD_EVERY seconds, or ``now``."""
        fw = self.forwarders.get(run.run_hash)
        if fw is None:
            fw = MetricsForwarder(self.lifecycle.tracker, self.lifecycle.child(run), run.training.dir / "metrics.jsonl")
            self.forwarders[run.run_hash] = fw
        fw.poll(0.0 if now else FORWARD_EVERY)

    def _wait(self, runs: list[RunPlan]) -> None:
        """Sleep until one of these runs' tasks ends, or the poll interval passes."""
        keys = {s.key for r in runs for s in r.stages.values()}
        running = [
            f for k in keys for f in (self.futures.get(k), self.processes.get(k)) if f is not None and not f.done()
        ]
        if running:
            wait_any(running, timeout=self.poll_interval, return_when=FIRST_COMPLETED)
        else:
            time.sleep(self.poll_interval)

    def _state(self, stage: Stage) -> StageState:
        """A launched stage's state from its Parsl task (a training: from its process's)."""
        f, proc = self.futures.get(stage.key), self.processes.get(stage.key)
        if f is None:
            return StageState.CACHED
        if proc is not None and not proc.done():
            state = StageState.from_parsl(proc.task_status())
            started = log_size(stage.dir) > self.launched_log.get(stage.key, 0)  # the process writes from its start
            return StageState.QUEUED if state == StageState.RUNNING and not started else state
        return StageState.from_parsl(f.task_status())

    def _refresh(self, runs: list[RunPlan]) -> None:
        """Bring the board up to date: each stage's state, each training's latest step."""
        for run in runs:
            row = self.board.rows[run.name]
            for label, stage in run.stages.items():
                row.stages[label] = self._state(stage)
            fw = self.forwarders.get(run.run_hash)
            if fw is not None and fw.latest is not None:
                row.step, row.loss, row.tokens_per_sec = fw.latest.step, fw.latest.loss, fw.latest.tokens_per_sec

    def _run_done(self, run: RunPlan) -> bool:
        return all((f := self.futures[s.key]) is None or f.done() for s in run.stages.values())

    # ---- ending runs

    def _failure(self, run: RunPlan) -> tuple[str, str] | None:
        """(stage label, error) of the first stage of this run that failed itself, if any. The error's first
        line is the cause; a failed training's log tail may follow it (see RunResult.error)."""
        from parsl.dataflow.errors import DependencyError

        for label, stage in run.stages.items():
            for f in (self.processes.get(stage.key), self.futures[stage.key]):
                if f is None or not f.done() or f.exception() is None:
                    continue
                exc = f.exception()
                if isinstance(exc, DependencyError):
                    continue
                tries = getattr(f, "task_record", {}).get("fail_count", 1)
                return label, describe_failure(label, stage.dir, exc, tries)
        return None

    def _finalize(self, run: RunPlan) -> RunResult:
        """Close one sweep point's MLflow run with everything it produced, or with the error that stopped it."""
        run_id = self.lifecycle.child(run)
        self._forward(run, now=True)
        states = {label: (StageState.CACHED if s.key in self.cached else StageState.DONE if s.done
                          else StageState.NOT_RUN) for label, s in run.stages.items()}  # fmt: skip
        cached = ",".join(k for k, v in states.items() if v == StageState.CACHED) or "none"
        self.lifecycle.tracker.set_tags(run_id, {"cached_stages": cached})
        failed = self._failure(run)
        if run.run_hash in self.pruned and not run.training.done:
            result = self._pruned(run, states)
        elif failed or not all(s.done for s in run.stages.values()):
            label, error = failed or (next(k for k, v in states.items() if v == StageState.NOT_RUN),
                                      "a stage did not commit")  # fmt: skip
            states[label] = StageState.FAILED
            result = RunResult(run.name, run_id, "FAILED", run.point, {}, states, error)
            self.lifecycle.end(run_id, "FAILED", result.cause)
        else:
            metrics = self.lifecycle.log_outputs(run)
            self.lifecycle.end(run_id, "FINISHED")
            result = RunResult(run.name, run_id, "FINISHED", run.point, metrics, states)
        if self.study is not None:
            self._prune([run], stop=False)
            self.study.tell(run, result.status, result.metrics)
        self._close(run, result)
        return result

    def _pruned(self, run: RunPlan, states: dict[str, StageState]) -> RunResult:
        """A run whose training the pruner stopped: KILLED in MLflow, tagged pruned, with its last metrics."""
        run_id, step = self.lifecycle.child(run), self.pruned[run.run_hash]
        states = {label: StageState.PRUNED if s.kind == "train" else st for (label, st), s in
                  zip(states.items(), run.stages.values())}  # fmt: skip
        why = f"pruned at step {step} by ASHA: its checkpoint is kept (a submit without the pruner resumes it)"
        self.lifecycle.tracker.set_tags(run_id, {"pruned": "true", "pruned_at_step": str(step)})
        self.lifecycle.end(run_id, "KILLED", why)
        return RunResult(run.name, run_id, "PRUNED", run.point, self.lifecycle.metrics_of(run), states, why)

    def _close(self, run: RunPlan, result: RunResult) -> None:
        self.results[run.run_hash] = result
        row = self.board.rows[run.name]
        row.status, row.val_bpb = result.status, result.metrics.get("val/bpb")
        for label, state in result.stages.items():
            if (
                state in (StageState.FAILED, StageState.NOT_RUN)
                or not row.stages.get(label, StageState.TO_RUN).finished
            ):
                row.stages[label] = state

    def _stop_trainings(self, runs: list[RunPlan]) -> list[RunPlan]:
        """Ask the running trainings of these runs to checkpoint and stop; wait for them (killing those that do
        not stop within STOP_GRACE_S). Returns the runs whose training was running."""
        running = [r for r in runs if (proc := self.processes.get(r.training.key)) is not None and not proc.done()]
        for r in running:
            request_stop(r.training.dir)
        deadline = time.time() + STOP_GRACE_S
        procs = [self.processes[r.training.key] for r in running]
        while not all(f.done() for f in procs) and time.time() < deadline:
            wait_any([f for f in procs if not f.done()], timeout=1.0, return_when=FIRST_COMPLETED)
        for r in running:
            if not self.processes[r.training.key].done() and kill_training(r.training.dir, signal.SIGKILL):
                self.say(f"[{r.name}] training did not stop within {STOP_GRACE_S:.0f} s: killed")
        return running

    def _interrupt(self, pending: list[RunPlan]) -> None:
        """The first SIGINT / SIGTERM: stop the trainings cleanly, mark the unfinished runs KILLED."""
        sig = self.stop.signal
        running = [r for r in pending if (proc := self.processes.get(r.training.key)) and not proc.done()]
        self.say(f"{sig}: stopping; {len(running)} running training(s) save a checkpoint and stop "
                 "(press Ctrl-C again to force)")  # fmt: skip
        self._stop_trainings(pending)
        for r in pending:
            self._forward(r, now=True)
            step = resume_step(r.training.dir)
            where = f"training checkpointed at step {step}" if step is not None else "no training checkpoint yet"
            error = f"interrupted by {sig} ({where}): `gptlab submit {self.plan.loaded.source}` resumes it"
            self.lifecycle.end(self.lifecycle.child(r), "KILLED", error)
            states = {label: (StageState.CACHED if s.key in self.cached else StageState.DONE if s.done
                              else StageState.INTERRUPTED if s.kind == "train" and step is not None
                              else StageState.NOT_RUN) for label, s in r.stages.items()}  # fmt: skip
            self._close(r, RunResult(r.name, self.lifecycle.child(r), "KILLED", r.point, {}, states, error))
        self.display.update(self.board)
        self.say(f"interrupted: {len(pending)} run(s) KILLED in MLflow; committed stages and checkpoints are kept, "
                 f"and `gptlab submit {self.plan.loaded.source}` resumes them")  # fmt: skip

    def _cancel(self, pending: list[RunPlan]) -> None:
        """--fail-fast: close the unfinished points as FAILED (cancelled) and stop their trainings. Committed
        stages stay committed; a later submit resumes the rest from their checkpoints."""
        error = "cancelled: another sweep point failed and --fail-fast was given"
        for r in pending:
            self.lifecycle.end(self.lifecycle.child(r), "FAILED", error)
            self.say(f"[{r.name}] FAILED ({error})")
            self._close(r, RunResult(r.name, self.lifecycle.child(r), "FAILED", r.point, {}, {}, error))
        self._stop_trainings(pending)
        self.display.update(self.board)

    def _force(self, sig: str) -> None:
        """The second SIGINT / SIGTERM: kill the trainings and Parsl's processes, and leave at once. The runs
        stay RUNNING in MLflow until the next submit (or status) finds this driver gone and marks them KILLED."""
        for key in self.processes:
            stage = self.plan.stages[key]
            kill_training(stage.dir, signal.SIGKILL)
        kill_children()
        print(
            f"{sig} again: forced out; trainings killed (their last committed checkpoints are kept: "
            f"`gptlab submit {self.plan.loaded.source}` resumes them)",
            file=sys.stderr,
            flush=True,
        )
        os._exit(128 + signal.Signals[sig].value)


# --------------------------------------------------------------------------------------- Parsl helpers


def make_apps(site: Any) -> dict[str, Any]:
    """The Parsl apps of a site: every Python stage through one app, training as a bash app (and its commit)."""
    from parsl.app.app import bash_app, python_app

    from workflows import stages

    cpu, train = [site.cpu_executor], [site.train_executor]
    apps = {
        "stage": python_app(stages.run_stage, executors=cpu),
        "train": bash_app(stages.train_app, executors=train),
        "commit_train": python_app(stages.commit_train, executors=cpu),
    }
    if site.mpi_executor:
        apps["train_mpi"] = bash_app(stages.train_app, executors=[site.mpi_executor])
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


# --------------------------------------------------------------------------------- trainings as processes


def resume_step(train_dir: Path) -> int | None:
    """The step of a training's newest committed checkpoint (what a resume continues from), or None."""
    from llmcore.checkpoint import latest_checkpoint

    found = latest_checkpoint(train_dir)
    return int(found.name.split("_")[-1]) if found is not None else None


def request_stop(train_dir: Path) -> None:
    """Ask a running training to save a checkpoint and stop: a STOP file (read wherever it runs, through the
    shared file system) and SIGTERM to its rank 0 where it runs on this machine."""
    from llmcore.io import atomic_write_bytes
    from llmcore.train import STOP_FILE

    atomic_write_bytes(train_dir / STOP_FILE, f"stop requested at {time.time():.0f}\n".encode())
    kill_training(train_dir, signal.SIGTERM)


def kill_training(train_dir: Path, sig: int) -> bool:
    """Send ``sig`` to the training holding this stage's lock, if it runs on this machine; whether one did."""
    import socket

    import psutil

    holder = lock_holder(train_dir)
    if holder is None or holder[1] != socket.gethostname():
        return False
    try:
        proc = psutil.Process(holder[0])
        if "llmcore.train" not in " ".join(proc.cmdline()):
            return False  # the lock's last holder is gone, and its pid was reused
        proc.send_signal(sig)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return True


def kill_children() -> None:
    """SIGKILL every process this driver started (Parsl's interchange, local trainings under a thread pool)."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
