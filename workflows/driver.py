"""Submit: plan a spec, run its stage graph through Parsl, and record every run in MLflow.

The :class:`Driver` is the only MLflow writer. Its loop delegates: Parsl launching to ``workflows.launch``,
signals, halting and stopping trainings to ``workflows.processes``, early stopping to ``workflows.search``, the
live table to ``workflows.progress``, metric forwarding to ``workflows.tail``, and every stage state and run
status to the one state machine in ``workflows.states``. A failing sweep point never stops the others.

Stopping: the first SIGINT (Ctrl-C) or SIGTERM (a scheduler's walltime) halts the submit at once: its halt file
means no queued stage or training starts any work, anywhere. Running trainings are asked to save a checkpoint
and stop; the driver waits for them (killing those that do not stop within ``STOP_GRACE_S``), closes each
unfinished run as KILLED (a run whose stages all committed stays FINISHED), says that submitting the same spec
resumes them and leaves; a second signal forces out at once. A Parsl executor that can no longer deliver results
fails its tasks instead of leaving the driver waiting on them forever.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from site_configs import build_site
from workflows.compare import log_sweep_summary
from workflows.launch import Launcher, check_executors, shutdown
from workflows.lifecycle import RunLifecycle, run_summary_line, tracker_for
from workflows.planning import Plan, RunPlan
from workflows.processes import (
    Halt,
    StopRequest,
    exit_code,
    forget_pruned,
    kill_children,
    kill_training,
    record_pruned,
    request_stop,
    training_alive,
)
from workflows.progress import Board, LineDisplay, LiveDisplay, RunRow, stage_line
from workflows.rungs import Halving, Hyperband, Journal, Layout, brackets, rung_steps
from workflows.search import Pruning, Study, default_parallel
from workflows.server import TrackingStoreError
from workflows.states import OnDisk, RunStatus, StageState, pruned_step, run_stage_states, run_status
from workflows.store import is_unreachable
from workflows.tail import MetricsForwarder, poll_all

FORWARD_EVERY = 5.0  # seconds between sends of a running training's metrics to MLflow (one transaction each)
STOP_GRACE_S = 90.0  # how long a stopping training may take to save its checkpoint before it is killed


@dataclass
class RunResult:
    """One sweep point after a submit."""

    name: str
    run_id: str
    status: str  # a RunStatus: FINISHED, FAILED, KILLED (an interrupted submit) or PRUNED
    point: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)
    stages: dict[str, StageState] = field(default_factory=dict)  # stage label -> state
    # Why it failed. Its first line is the cause recorded in MLflow (which stage, the exit code, the final
    # exception, the full log's path); for a failed training the lines after it are the end of its log,
    # under a header naming the log file.
    error: str | None = None
    rung: int | None = None  # successive halving: the rung it reached (pruned there, or the last)

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


# ---------------------------------------------------------------------------------------------- driver


class Driver:
    """Runs one plan on its site and keeps MLflow in step with it."""

    def __init__(self, p: Plan, display: LineDisplay | LiveDisplay, poll_interval: float, fail_fast: bool = False):
        self.plan, self.display, self.poll_interval, self.fail_fast = p, display, poll_interval, fail_fast
        self.say = display.say
        self.lifecycle = RunLifecycle(tracker_for(p), p)
        self.halt = Halt(p.runs_root)
        self.stop = StopRequest(self._force, first=lambda sig: self.halt.set(sig))
        self.launcher: Launcher | None = None
        self.forwarders: dict[str, MetricsForwarder] = {}  # run hash -> its training's forwarder
        self.store_away_since: float | None = None  # since when ended runs wait for an unreachable server
        # a grid's synchronous successive halving (prune.method sha), or a search's brackets of it (hyperband)
        self.halving: Halving | Hyperband | None = None
        self.paused: list[RunPlan] = []  # runs whose training waits at a rung for its decision
        self.board = Board([RunRow(r.name, r.spec.train.max_steps, self._states(r, launching=True)) for r in p.runs])
        self.results: dict[str, RunResult] = {}  # run hash -> result, as runs end
        self.study: Any = None  # the Optuna study of a search or an ASHA-pruned grid (workflows.search.Study)
        self.pruning: Any = None  # its pruner's side in the driver (workflows.search.Pruning)

    # ---- the whole submit

    def run(self, started: float) -> SubmitResult:
        lifecycle, p = self.lifecycle, self.plan
        for run_id in lifecycle.mark_dead_runs_killed():
            self.say(f"run {run_id} was left RUNNING by a driver that is gone: marked KILLED")
        lifecycle.start()
        prune = p.spec.sweep.prune
        if prune is not None and prune.method == "sha":
            self.halving = self._halving(prune)
        elif p.spec.search is not None or prune is not None:
            self.study = Study(p, default_parallel(p.spec))
            self.pruning = Pruning(self.study, self.say)
            if p.spec.search is not None:
                if p.spec.search.prune is not None and p.spec.search.prune.method == "hyperband":
                    self.halving = self._hyperband(p.spec.search.prune)
                for r in self.study.resumable():
                    self._add_row(r)
                    lifecycle.start_child(r)
                    self._join_bracket(r)
                self.say(f"search: study {self.study.path} holds {len(p.runs)} of {p.spec.search.trials} trials")
            else:
                self.study.grid_trials()
        todo = []
        for r in p.runs:
            earlier = self._ended_earlier(r)
            if earlier is not None:
                self._close(r, earlier)
                continue
            if r.training.dir.exists() and not lifecycle.pruning:
                forget_pruned(r.training.dir)  # pruning switched off: the training resumes
            todo.append(r)
            self.board.rows[r.name].stages = states = self._states(r, launching=True)
            self.say(f"[{r.name}] " + ", ".join(stage_line(label, st, r.stages[label].dir)
                                                 for label, st in states.items()))  # fmt: skip
        self.display.update(self.board)
        if todo or (self.study is not None and self.study.search is not None):
            with self.stop:
                self._execute(todo)
        return self._end(started)

    def _halving(self, prune: Any) -> Halving:
        """The grid's successive halving, continued from its journal (a decision journaled but not yet acted on
        by a driver that was killed is acted on now)."""
        p = self.plan
        rungs = rung_steps(prune.min_steps, prune.reduction_factor, p.runs[0].spec.train.max_steps)
        journal = Journal(p.runs_root / "studies" / f"{p.spec_hash}.rungs.jsonl")
        halving = Halving([r.run_hash for r in p.runs], rungs, prune.reduction_factor, journal)
        for r in p.runs:
            self._record_journaled_prune(r, halving)
        self.say(f"successive halving: rungs at {', '.join(map(str, rungs))} steps, journal {journal.path}")
        return halving

    def _hyperband(self, prune: Any) -> Hyperband:
        """A search's HyperBand brackets (laid out for its trial budget once, kept beside its study), continued from
        their journal. The study asks for as many trials as the brackets hold."""
        p, studies = self.plan, self.plan.runs_root / "studies"
        rounds = Layout(studies / f"{p.spec_hash}.brackets.json").grow(p.spec.search.trials)
        layout = brackets(rounds, prune.min_steps, prune.reduction_factor, p.spec.train.max_steps)
        hyperband = Hyperband(layout, prune.reduction_factor, Journal(studies / f"{p.spec_hash}.rungs.jsonl"))
        self.study.budget = hyperband.budget
        if hyperband.budget != p.spec.search.trials:
            self.say(f"hyperband: the brackets laid out by earlier submits hold {hyperband.budget} trials "
                     f"(search.trials {p.spec.search.trials}): they are run to their end")  # fmt: skip
        for i, b in enumerate(layout):
            self.say(f"hyperband: bracket {i} (s={b.s}): trials {b.first}-{b.first + b.trials - 1}, rungs at "
                     f"{', '.join(map(str, b.rungs))} steps")  # fmt: skip
        return hyperband

    def _join_bracket(self, run: RunPlan) -> None:
        """A search's trial joins its HyperBand bracket (by its number); its run records which."""
        if not isinstance(self.halving, Hyperband):
            return
        i = self.halving.add(run.run_hash, self.study.number(run))
        if i is not None:
            self.lifecycle.tracker.set_tags(self.lifecycle.child(run), {"bracket": str(i)})
            self._record_journaled_prune(run, self.halving.of(run.run_hash))

    def _record_journaled_prune(self, run: RunPlan, halving: Halving) -> None:
        """A prune the journal holds but a killed driver did not act on yet: recorded in its training now."""
        h = run.run_hash
        if h in halving.pruned and pruned_step(run.training.dir) is None and not run.training.done:
            k = halving.pruned[h]
            record_pruned(run.training.dir, halving.rungs[k], f"not among the best at rung {k} of successive halving")

    def _pause_at(self, run: RunPlan) -> int | None:
        return self.halving.target(run.run_hash) if self.halving is not None else None

    def _at_rung(self, run: RunPlan) -> bool:
        """Whether a run's training waits at its rung (paused there, its rung not decided yet)."""
        target = self._pause_at(run)
        return target is not None and OnDisk.read(run.training.dir, run.training.definition).checkpoint == target

    def _states(self, run: RunPlan, launching: bool = False, live: bool = False) -> dict[str, StageState]:
        """A run's stage states (``workflows.states``), from disk and, with ``live``, from its Parsl tasks."""
        launcher = self.launcher
        disks = {label: OnDisk.read(s.dir, s.definition, launcher.launched_log.get(s.key) if launcher else None)
                 for label, s in run.stages.items()}  # fmt: skip
        paused = run in self.paused
        tasks = (
            {label: launcher.task(s) for label, s in run.stages.items()} if live and launcher and not paused else None
        )
        cached = {label for label, s in run.stages.items() if launcher is None or s.key in launcher.cached}
        return run_stage_states(disks, tasks, cached=cached, launching=launching, paused=paused)

    def _ended_earlier(self, run: RunPlan) -> RunResult | None:
        """A run an earlier submit ended (finished, pruned, or failed as a trial), from disk and the study: what
        MLflow holds; None when it has work to do."""
        trial = self.study.state(run) if self.study is not None else "NONE"
        states = self._states(run)
        status = run_status(states)
        if self.lifecycle.pruning and status is RunStatus.PRUNED:  # pruned (maybe interrupted before it was closed)
            if self.study is not None and trial != "PRUNED":
                self.study.tell(run, "PRUNED", {})
            self._end_pruned(run, states)
            return self.results[run.run_hash]
        if trial in ("COMPLETE", "PRUNED", "FAIL"):
            status = {"PRUNED": RunStatus.PRUNED, "FAIL": RunStatus.FAILED}.get(trial, RunStatus.FINISHED)
        elif not (self.lifecycle.children[run.run_hash].previous == "FINISHED" and status is RunStatus.FINISHED):
            return None
        return RunResult(run.name, self.lifecycle.child(run), status.value, run.point,
                         self.lifecycle.metrics_of(run), states)  # fmt: skip

    def _add_row(self, run: RunPlan) -> None:
        self.board.rows[run.name] = RunRow(run.name, run.spec.train.max_steps, self._states(run, launching=True))

    def _end(self, started: float) -> SubmitResult:

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
            self.halt.clean()  # nothing of this submit can still be queued anywhere
        else:
            lifecycle.end(lifecycle.parent_id, "FAILED", "; ".join(f"{r.name}: {r.cause}" for r in runs if r.error))
        experiment = p.spec.tracking.experiment or p.spec.name
        return SubmitResult(experiment, tracker.experiment_id, lifecycle.parent_id, tracker.uri, runs,
                            time.time() - started, self.stop.signal)  # fmt: skip

    # ---- running the stages

    def _execute(self, todo: list[RunPlan]) -> None:
        import parsl

        from llmcore.io import file_lock

        p = self.plan
        trainings = sum(1 for s in p.stages.values() if s.definition.process and not s.done)
        if self.study is not None and self.study.search is not None:
            trainings = max(trainings, self.study.max_parallel)
        trains = [r.spec.train for r in todo] or [p.loaded.base.train]
        site = build_site(p.spec.site, p.runs_root / "parsl", trains, trainings)
        self.halt.prepare()
        with file_lock(p.runs_root / "parsl" / ".lock", "the Parsl run directory"):  # Parsl numbers run dirs racily
            dfk = parsl.load(site.config)
        pending = list(todo)
        try:
            for r in todo:
                self.lifecycle.tracker.set_tags(self.lifecycle.child(r), {"parsl_run_id": dfk.run_id})
            self.launcher = Launcher(p, site, self.halt)
            for r in todo:
                if self._at_rung(r):  # paused at its rung by an earlier submit: it waits for the rung's decision
                    pending.remove(r)
                    self.paused.append(r)
                    self._forward(r, now=True)  # its estimate at the rung, for the decision
                else:
                    self.launcher.launch_run(r, self._pause_at(r))
            self._loop(pending, dfk)
        finally:
            shutdown(dfk, self.say)
            for r in pending:  # a training launched as Parsl shut down stops at its first step: make sure
                kill_training(r.training.dir, signal.SIGKILL)

    def _loop(self, pending: list[RunPlan], dfk: Any) -> None:
        launcher = self.launcher
        assert launcher is not None
        while True:
            looked = time.monotonic()
            if self.stop.signal:
                self._interrupt(pending + self.paused)
                return
            check_executors(dfk)
            poll_all([self._forwarder(r) for r in pending], FORWARD_EVERY, self.poll_interval)
            if self.pruning is not None:
                for r in pending:
                    self.pruning.observe(r, self.forwarders[r.run_hash].tail.evals,
                                         launcher.process_running(r.training))  # fmt: skip
            self._refresh(pending)
            for r in [r for r in pending if launcher.done(r) and not self._store_away(r, pending)]:
                pending.remove(r)
                if self._at_rung(r):
                    self.paused.append(r)
                    self.say(f"[{r.name}] paused at rung {self.halving.rung[r.run_hash]} "
                             f"(step {self._pause_at(r)}): waits for the other points")  # fmt: skip
                    continue
                try:
                    done = self._finalize(r)
                except Exception as exc:  # the server went away while the run was being closed: again later
                    if not is_unreachable(exc):
                        raise
                    pending.append(r)
                    self._wait_for_store(pending)
                    continue
                self.store_away_since = None
                self.say(f"[{r.name}] {done.status} {run_summary_line(done.metrics)}".rstrip())
            if self.halving is not None:
                self._decide_rung(pending)
            if self.fail_fast and pending and any(x.status == "FAILED" for x in self.results.values()):
                self._cancel(pending)
                return
            if self.study is not None:
                self._more_trials(pending)
            self.display.update(self.board)
            if not pending and not self.paused:
                return
            if not pending:  # every live point waits at a rung that cannot decide: a bug, never a hang
                raise RuntimeError(f"successive halving: {len(self.paused)} point(s) wait at a rung nothing decides")
            launcher.wait(pending, max(0.0, self.poll_interval - (time.monotonic() - looked)))  # a poll's sends count

    def _decide_rung(self, pending: list[RunPlan]) -> None:
        """Successive halving: once every live point reached the open rung (or failed), promote the best (they
        resume from their checkpoints) and prune the rest. The decisions are journaled before they are acted on."""
        halving, by_hash = self.halving, {r.run_hash: r for r in self.plan.runs}
        if isinstance(halving, Hyperband):
            halving.asked(self.study.asked())  # a bracket decides once all its trials were asked for
        scores: dict[str, float | None] = {}
        for r in self.paused:
            fw = self._forwarder(r)
            if self._pause_at(r) not in fw.tail.evals:
                fw.poll(FORWARD_EVERY)
            if self._pause_at(r) in fw.tail.evals:  # (a paused training always wrote its estimate at the rung)
                scores[r.run_hash] = fw.tail.evals[self._pause_at(r)]
        rung = halving.rung
        for h, result in self.results.items():
            if result.status == "FAILED" and h in rung:
                scores[h] = None
        for d in halving.decide(scores):
            run = by_hash[d.run]
            if run not in self.paused:
                continue  # failed: closed already
            self.paused.remove(run)
            self.lifecycle.tracker.set_tags(self.lifecycle.child(run), {"rung": str(halving.rung[d.run])})
            if d.promoted:
                self.say(f"[{run.name}] promoted past rung {d.rung} (val loss {d.score:.4f}): resumes to "
                         f"{self._pause_at(run) or run.spec.train.max_steps} steps")  # fmt: skip
                self.launcher.relaunch(run, self._pause_at(run))
                pending.append(run)
            else:
                record_pruned(run.training.dir, halving.step(d.run, d.rung), f"not among the best at rung {d.rung}")
                self._end_pruned(run, self._states(run))
                if self.study is not None:
                    self.study.tell(run, "PRUNED", {})

    def _more_trials(self, pending: list[RunPlan]) -> None:
        """A search: start new trials while the budget and free slots allow."""
        for r in self.study.more(len(pending)):
            self._add_row(r)
            self.lifecycle.start_child(r)
            self._join_bracket(r)
            self.launcher.launch_run(r, self._pause_at(r))
            pending.append(r)
            where = f" (bracket {self.halving.bracket[r.run_hash]})" if isinstance(self.halving, Hyperband) else ""
            self.say(f"[{r.name}] new trial{where}: " + ", ".join(f"{k}={v}" for k, v in r.point.items()))
        for why in self.study.rejected:
            self.say(f"search: {why}: told FAIL")
        self.study.rejected.clear()

    def _store_away(self, run: RunPlan, pending: list[RunPlan]) -> bool:
        """Whether a run whose tasks have ended must wait for an unreachable tracking server before it is closed:
        its last metrics are not all sent yet."""
        fw = self._forwarder(run)
        fw.poll(0.0)
        if fw.waiting:
            self._wait_for_store(pending)
        return fw.waiting

    def _wait_for_store(self, pending: list[RunPlan]) -> None:
        """Ended runs wait for an unreachable tracking server. When every pending run only waits so, for longer
        than tracking.outage_wait_s, the submit stops: nothing is lost, the metrics stay in each metrics.jsonl and
        a re-submit sends them."""
        self.store_away_since = self.store_away_since or time.monotonic()
        waited, limit = time.monotonic() - self.store_away_since, self.plan.spec.tracking.outage_wait_s
        if waited > limit and all(self.launcher.done(r) for r in pending):
            raise TrackingStoreError(
                f"tracking.uri {self.lifecycle.tracker.uri}: the server has not answered for {waited:.0f} s after "
                f"the trainings ended (tracking.outage_wait_s {limit:g}); their metrics are kept in each "
                f"metrics.jsonl: `gptlab submit {self.plan.loaded.source}` sends them, once, and closes the runs"
            )

    def _forwarder(self, run: RunPlan) -> MetricsForwarder:
        """The forwarder of a run's training (made at its first look); the loop polls them all (``poll_all``):
        new metric lines read every poll, sent to MLflow every FORWARD_EVERY seconds."""
        fw = self.forwarders.get(run.run_hash)
        if fw is None:
            fw = MetricsForwarder(self.lifecycle.tracker, self.lifecycle.child(run), run.training.dir / "metrics.jsonl",
                                  say=lambda msg: self.say(f"[{run.name}] {msg}"))  # fmt: skip
            self.forwarders[run.run_hash] = fw
        return fw

    def _forward(self, run: RunPlan, now: bool = False) -> None:
        """Read a training's new metric lines; send them to MLflow every FORWARD_EVERY seconds, or ``now``."""
        self._forwarder(run).poll(0.0 if now else FORWARD_EVERY)

    def _refresh(self, runs: list[RunPlan]) -> None:
        """Bring the board up to date: each stage's state, each training's latest step."""
        for run in runs:
            row = self.board.rows[run.name]
            row.stages = self._states(run, live=True)
            fw = self.forwarders.get(run.run_hash)
            if fw is not None and fw.latest is not None:
                row.step, row.loss, row.tokens_per_sec = fw.latest.step, fw.latest.loss, fw.latest.tokens_per_sec

    # ---- ending runs

    def _finalize(self, run: RunPlan) -> RunResult:
        """Close one sweep point's MLflow run with everything it produced, or with the error that stopped it."""
        run_id = self.lifecycle.child(run)
        self._forward(run, now=True)
        states = self._states(run, live=True)
        cached = ",".join(k for k, v in states.items() if v == StageState.CACHED) or "none"
        self.lifecycle.tracker.set_tags(run_id, {"cached_stages": cached})
        failed = self.launcher.failure(run)
        status = run_status(states)
        if status is RunStatus.PRUNED:
            result = self._end_pruned(run, states)
        elif status is not RunStatus.FINISHED:
            label, error = failed or (next((k for k, v in states.items() if not v.finished), "?"),
                                      "a stage did not commit")  # fmt: skip
            states[label] = StageState.FAILED
            result = RunResult(run.name, run_id, "FAILED", run.point, {}, states, error)
            self.lifecycle.end_child(run, RunStatus.FAILED, result.cause)
        else:
            metrics = self.lifecycle.log_outputs(run)
            self.lifecycle.end_child(run, RunStatus.FINISHED)
            result = RunResult(run.name, run_id, "FINISHED", run.point, metrics, states)
        if self.study is not None:
            self.pruning.observe(run, self.forwarders[run.run_hash].tail.evals, running=False)
            self.study.tell(run, result.status, result.metrics)
        self._close(run, result)
        return result

    def _end_pruned(self, run: RunPlan, states: dict[str, StageState]) -> RunResult:
        """A run whose training the pruner stopped: KILLED in MLflow, tagged pruned, with its last metrics."""

        run_id, step = self.lifecycle.child(run), pruned_step(run.training.dir)
        prune = (self.plan.spec.search or self.plan.spec.sweep).prune
        method = prune.method if prune is not None else "asha"
        how = {"sha": "successive halving", "hyperband": "HyperBand's successive halving"}.get(method, "ASHA")
        why = f"pruned at step {step} by {how}: its checkpoint is kept (a submit without the pruner resumes it)"
        self.lifecycle.tracker.set_tags(run_id, {"pruned": "true", "pruned_at_step": str(step)})
        self.lifecycle.end_child(run, RunStatus.PRUNED, why)
        result = RunResult(run.name, run_id, "PRUNED", run.point, self.lifecycle.metrics_of(run), states, why)
        self._close(run, result)
        return result

    def _close(self, run: RunPlan, result: RunResult) -> None:
        rung, h = (self.halving.rung if self.halving is not None else {}), run.run_hash
        if h in rung:
            result.rung = self.halving.pruned.get(h, rung[h])
            self.lifecycle.tracker.set_tags(result.run_id, {"rung": str(result.rung)})
        self.results[run.run_hash] = result
        row = self.board.rows[run.name]
        row.status, row.val_bpb = result.status, result.metrics.get("val/bpb")
        row.stages.update(result.stages)

    def _stop_trainings(self, runs: list[RunPlan]) -> list[RunPlan]:
        """Ask the started trainings of these runs to checkpoint and stop; wait for them (killing those that do
        not stop within STOP_GRACE_S). A training not started yet never starts (the halt file). Returns the runs
        whose training was running."""
        launcher = self.launcher
        started = lambda r: training_alive(r.training.dir) or launcher.state(r.training) == StageState.RUNNING
        running = [r for r in runs if launcher.process_running(r.training) and started(r)]
        for r in running:
            request_stop(r.training.dir)
        deadline = time.time() + STOP_GRACE_S
        while time.time() < deadline and any(launcher.process_running(r.training) for r in running):
            launcher.wait(running, 1.0)
        for r in running:
            if launcher.process_running(r.training) and kill_training(r.training.dir, signal.SIGKILL):
                self.say(f"[{r.name}] training did not stop within {STOP_GRACE_S:.0f} s: killed")
        return running

    def _interrupt(self, pending: list[RunPlan]) -> None:
        """The first SIGINT / SIGTERM: nothing new starts (the halt file, written by the signal handler), the
        running trainings stop cleanly, and each unfinished run is KILLED (one whose stages all committed is
        closed as FINISHED, one whose pruning was decided as PRUNED)."""
        sig = self.stop.signal
        self.say(f"{sig}: stopping; queued stages will not start, running trainings save a checkpoint and stop "
                 "(press Ctrl-C again to force)")  # fmt: skip
        self._stop_trainings(pending)
        killed = 0
        for r in pending:
            self._forward(r, now=True)
            states = self._states(r)
            status = run_status(states, interrupted=True)
            if status is not RunStatus.KILLED:
                self._finalize(r)
                continue
            if self.lifecycle.children[r.run_hash].status is RunStatus.FINISHED:  # a stage added later: not run yet
                self._close(r, RunResult(r.name, self.lifecycle.child(r), "FINISHED", r.point,
                                         self.lifecycle.metrics_of(r), states))  # fmt: skip
                continue
            killed += 1
            step = OnDisk.read(r.training.dir, r.training.definition).checkpoint
            where = f"training checkpointed at step {step}" if step is not None else "no training checkpoint yet"
            error = f"interrupted by {sig} ({where}): `gptlab submit {self.plan.loaded.source}` resumes it"
            self.lifecycle.end_child(r, RunStatus.KILLED, error)
            self._close(r, RunResult(r.name, self.lifecycle.child(r), "KILLED", r.point, {}, states, error))
        self.display.update(self.board)
        self.say(f"interrupted: {killed} run(s) KILLED in MLflow; committed stages and checkpoints are kept, "
                 f"and `gptlab submit {self.plan.loaded.source}` resumes them")  # fmt: skip

    def _cancel(self, pending: list[RunPlan]) -> None:
        """--fail-fast: close the unfinished points as FAILED (cancelled) and stop their trainings. Committed
        stages stay committed; a later submit resumes the rest from their checkpoints."""
        error = "cancelled: another sweep point failed and --fail-fast was given"
        self.halt.set("--fail-fast")
        for r in pending:
            self.lifecycle.end_child(r, RunStatus.FAILED, error)
            self.say(f"[{r.name}] FAILED ({error})")
            self._close(r, RunResult(r.name, self.lifecycle.child(r), "FAILED", r.point, {}, {}, error))
        self._stop_trainings(pending)
        self.display.update(self.board)

    def _force(self, sig: str) -> None:
        """The second SIGINT / SIGTERM: kill the trainings and Parsl's processes, and leave at once. The runs
        stay RUNNING in MLflow until the next submit (or status) finds this driver gone and marks them KILLED."""
        for stage in self.plan.stages.values():
            if stage.definition.process:
                kill_training(stage.dir, signal.SIGKILL)
        kill_children()
        print(
            f"{sig} again: forced out; trainings killed (their last committed checkpoints are kept: "
            f"`gptlab submit {self.plan.loaded.source}` resumes them)",
            file=sys.stderr,
            flush=True,
        )
        os._exit(exit_code(sig))
