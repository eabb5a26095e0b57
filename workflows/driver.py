"""Submit: plan a spec, run its stage graph through Parsl, and record every run in MLflow.

The driver is the only MLflow writer. It launches one Parsl app per stage that is not yet committed
(stages shared by several sweep points are launched once), forwards training metrics while stages run,
and closes each sweep point's MLflow run as FINISHED or FAILED with the error; a failing point never
stops the others.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from workflows.compare import log_sweep_summary
from workflows.plan import Plan, RunPlan, Stage, plan
from workflows.progress import PARSL_STATES, Board, LineDisplay, LiveDisplay, RunRow
from workflows.report import loss_curve_png
from workflows.spec import LoadedSpec, SpecError, load_spec
from workflows.stages import prepare_stage
from workflows.tracking import MetricsForwarder, Tracker, default_tracking_uri, flatten

LOG_TAIL_LINES = 18  # lines of a failed training's log that submit shows under its error
FORWARD_EVERY = 5.0  # seconds between sends of a running training's metrics to MLflow (one transaction each)


@dataclass
class RunResult:
    """One sweep point after a submit."""

    name: str
    run_id: str
    status: str
    point: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)
    stages: dict[str, str] = field(default_factory=dict)  # kind -> "cached" | "ran" | "failed" | "not run"
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

    @property
    def ok(self) -> bool:
        return all(r.status == "FINISHED" for r in self.runs)


# --------------------------------------------------------------------------------------------- checks


def preflight(loaded: LoadedSpec, submitting: bool = False) -> None:
    """Problems that need the file system or the site (missing corpus files, unwritable runs_root, a missing
    account), all at once. ``submitting`` adds checks that hold only where the driver will run."""
    from llmcore.corpus import check_corpus

    problems: list[str] = []
    seen: set[str] = set()
    for _name, _, spec in loaded.runs:
        key = spec.data.model_dump_json()
        if key in seen:
            continue
        seen.add(key)
        problems += [str(e) for e in check_corpus(spec.data)]
    from site_configs import site_problems

    problems += site_problems(loaded.spec.site, [spec.train for _, _, spec in loaded.runs], submitting=submitting)
    root = Path(loaded.spec.runs_root).expanduser()
    if root.exists() and not root.is_dir():
        problems.append(f"runs_root: cannot write to {root} (it is a file, not a directory)")
    else:
        try:
            root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=root, prefix=".write-test-"):
                pass
        except OSError as exc:
            problems.append(f"runs_root: cannot write to {root} ({exc.strerror or exc})")
    if problems:
        raise SpecError(loaded.source, problems)


def load_and_check(
    spec: str | Path | LoadedSpec, overrides: list[str] | None = None, site: str | None = None, submitting: bool = False
) -> LoadedSpec:
    if isinstance(spec, LoadedSpec):
        loaded = spec
    else:
        extra = [f"site.name={site}"] if site else []
        loaded = load_spec(spec, [*(overrides or []), *extra])
    preflight(loaded, submitting)
    return loaded


# ---------------------------------------------------------------------------------------------- driver


class Driver:
    """Runs one plan on one Parsl site and keeps MLflow in step with it."""

    def __init__(self, p: Plan, tracker: Tracker, report: Callable[[str], None], poll_interval: float):
        self.plan, self.tracker, self.report, self.poll_interval = p, tracker, report, poll_interval
        self.futures: dict[str, Future | None] = {}  # stage key -> future (None: was already committed)
        self.train_proc: dict[str, Future] = {}  # train stage key -> the bash app future of its process
        self.forwarders: dict[tuple[str, str], MetricsForwarder] = {}

    # ---- launching

    def launch_all(self, apps: dict[str, Any], train_env: dict[str, str]) -> None:
        for stage in self.plan.stages.values():
            run = next(r for r in self.plan.runs if r.stages[stage.kind].key == stage.key)
            self.futures[stage.key] = None if stage.done else self._launch(stage, run, apps, train_env)

    def _launch(self, stage: Stage, run: RunPlan, apps: dict[str, Any], train_env: dict[str, str]) -> Future:
        prepare_stage(stage.dir, stage.config)
        deps = [f for k in stage.deps if (f := self.futures[k]) is not None]
        spec = run.spec.model_dump(mode="json")
        d = {kind: str(s.dir) for kind, s in run.stages.items()}
        if stage.kind == "tokenizer":
            return apps["tokenizer"](d["tokenizer"], spec)
        if stage.kind == "shards":
            return apps["shards"](d["shards"], spec, d["tokenizer"], inputs=deps)
        if stage.kind == "train":
            self._write_train_config(stage, run)
            app, launcher, extra, env = self._train_launch(run, stage, apps, train_env)
            # Keyword arguments only past the first three: Parsl merges the function's defaults into the call.
            proc = app(
                d["train"],
                d["shards"],
                env,
                launcher=launcher,
                inputs=deps,
                stdout=str(stage.dir / "train.log"),
                stderr=str(stage.dir / "train.log"),
                **extra,
            )
            self.train_proc[stage.key] = proc
            return apps["commit_train"](d["train"], inputs=[proc])
        return apps["eval"](d["eval"], spec, d["train"], d["shards"], d["tokenizer"], inputs=deps)

    def _train_launch(self, run: RunPlan, stage: Stage, apps: dict[str, Any], env: dict[str, str]):
        """(app, launcher prefix, app kwargs, env) for one training: one process, or one rank per GPU."""
        from llmcore.distributed import EXPECTED_RANKS

        t = run.spec.train
        ranks = t.nodes * t.ranks_per_node
        env = {**env, EXPECTED_RANKS: str(ranks)}  # with 1: not the worker pool's PMI_* / SLURM_* variables
        if ranks == 1:
            return apps["train"], "", {}, env
        if "train_mpi" in apps:
            spec = {"num_nodes": t.nodes, "ranks_per_node": t.ranks_per_node, "num_ranks": ranks}
            return apps["train_mpi"], "$PARSL_MPI_PREFIX", {"parsl_resource_specification": spec}, env
        from llmcore.distributed import mpiexec_prefix

        port = 20000 + int(stage.key[:8], 16) % 20000  # a port per training, stable across retries
        env = {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        return apps["train"], mpiexec_prefix(ranks, t.ranks_per_node), {}, env

    @staticmethod
    def _write_train_config(stage: Stage, run: RunPlan) -> None:
        from llmcore.io import atomic_write_json

        s = run.spec
        atomic_write_json(
            stage.dir / "train.json",
            {"model": s.model.model_dump(mode="json"), "train": s.train.model_dump(mode="json"), "seed": s.seed},
        )

    # ---- monitoring

    def forward(self, run: RunPlan, run_id: str, now: bool = False) -> None:
        """Read a training's new metric lines; send them to MLflow every FORWARD_EVERY seconds, or ``now``."""
        stage = run.stages["train"]
        key = (run_id, stage.key)
        if key not in self.forwarders:
            self.forwarders[key] = MetricsForwarder(self.tracker, run_id, stage.dir / "metrics.jsonl")
        self.forwarders[key].poll(0.0 if now else FORWARD_EVERY)

    def wait(self, runs: list[RunPlan], seconds: float) -> None:
        """Sleep until one of these runs' tasks ends, or ``seconds`` pass."""
        from concurrent.futures import FIRST_COMPLETED
        from concurrent.futures import wait as wait_any

        keys = {s.key for r in runs for s in r.stages.values()}
        running = [
            f for k in keys for f in (self.futures.get(k), self.train_proc.get(k)) if f is not None and not f.done()
        ]
        if running:
            wait_any(running, timeout=seconds, return_when=FIRST_COMPLETED)
        else:
            time.sleep(seconds)

    def refresh(self, board: Board) -> None:
        """Bring the board up to date: each stage's state from its Parsl task, each training's latest step."""
        for run in self.plan.runs:
            row = board.rows[run.name]
            if row.status != "RUNNING":
                continue
            for kind, stage in run.stages.items():
                f = self.futures.get(stage.key)
                proc = self.train_proc.get(stage.key)
                if f is None:
                    row.stages[kind] = "cached"
                elif proc is not None and not proc.done():
                    state = PARSL_STATES.get(proc.task_status(), "waiting")
                    # launched to an executor is not yet running: the process writes train.log from its start
                    row.stages[kind] = (
                        "queued" if state == "running" and not (stage.dir / "train.log").is_file() else state
                    )
                else:
                    row.stages[kind] = PARSL_STATES.get(f.task_status(), "waiting")
            fw = next((fw for (_, key), fw in self.forwarders.items() if key == run.stages["train"].key), None)
            if fw is not None and fw.latest is not None:
                rec = fw.latest
                row.step, row.loss, row.tokens_per_sec = rec.step, rec.loss, rec.tokens_per_sec

    def run_done(self, run: RunPlan) -> bool:
        f = self.futures[run.stages["eval"].key]
        return f is None or f.done()

    def failure(self, run: RunPlan) -> tuple[str, str] | None:
        """(stage kind, error) of the first stage of this run that failed itself, if any. The error's first
        line is the cause; a failed training's log tail may follow it (see RunResult.error)."""
        from parsl.dataflow.errors import DependencyError

        for kind, stage in run.stages.items():
            for f in (self.train_proc.get(stage.key), self.futures[stage.key]):
                if f is None or not f.done() or f.exception() is None:
                    continue
                exc = f.exception()
                if isinstance(exc, DependencyError):
                    continue
                tries = getattr(f, "task_record", {}).get("fail_count", 1)
                return kind, describe_failure(stage, exc, tries)
        return None


def describe_failure(stage: Stage, exc: BaseException, tries: int = 1) -> str:
    """Why a stage failed. A training process that exited non-zero: one line with its exit code (and what it
    means), the final exception or error message of its last try and the path of its train.log, then the last
    LOG_TAIL_LINES lines of that try before the quoted error, under a header naming the log. Anything else:
    ``stage KIND failed: ExceptionType: message``."""
    from parsl.app.errors import BashExitFailure

    from workflows.trainlog import failure_cause, last_try, lines_before, read_log, training_error

    log = stage.dir / "train.log"
    if stage.kind != "train" or not isinstance(exc, BashExitFailure):
        text = " ".join(x.strip() for x in str(exc).splitlines() if x.strip()) or "(no message)"
        msg = f"stage {stage.kind} failed: {type(exc).__name__}: {text}"
        return msg + (f" (training log: {log})" if stage.kind == "train" and log.is_file() else "")
    lines = last_try(read_log(log))
    cause, at = failure_cause(lines)
    error = training_error(exc.exitcode, cause, log, tries)
    tail = lines_before(lines, at, LOG_TAIL_LINES)
    if tail:
        error += f"\n--- {log}: the last {len(tail)} lines before that error ---\n" + "\n".join(tail)
    return error


# ---------------------------------------------------------------------------------------------- submit


def _make_apps(site: Any) -> dict[str, Any]:
    from parsl.app.app import bash_app, python_app

    from workflows import stages

    cpu, gpu = [site.cpu_executor], [site.train_executor]
    apps = {
        "tokenizer": python_app(stages.tokenizer_stage, executors=cpu),
        "shards": python_app(stages.shards_stage, executors=cpu),
        "train": bash_app(stages.train_app, executors=gpu),
        "commit_train": python_app(stages.commit_train, executors=cpu),
        "eval": python_app(stages.eval_stage, executors=cpu),
    }
    if site.mpi_executor:
        apps["train_mpi"] = bash_app(stages.train_app, executors=[site.mpi_executor])
    return apps


def _tracker_for(p: Plan) -> Tracker:
    t = p.spec.tracking
    uri = t.uri or default_tracking_uri(p.runs_root)
    return Tracker(uri, t.experiment or p.spec.name, p.runs_root / "mlartifacts")


def submit(
    spec: str | Path | LoadedSpec,
    overrides: list[str] | None = None,
    site: str | None = None,
    quiet: bool = False,
    poll_interval: float = 2.0,
    report: Callable[[str], None] | None = None,
    fail_fast: bool = False,
    display: LineDisplay | LiveDisplay | None = None,
) -> SubmitResult:
    """Run an experiment spec end to end; returns every sweep point's status and metrics.

    A failing sweep point never stops the others, unless ``fail_fast``: then the first failure closes every
    unfinished point as FAILED (cancelled) and stops the stages still running.

    Progress goes to ``display`` (a live table, see workflows.progress); by default to plain lines through
    ``report`` (print unless ``quiet``).

    Raises SpecError (before any stage runs) when the spec, an override or the corpus is invalid.
    """
    started = time.time()
    loaded = load_and_check(spec, overrides, site, submitting=True)
    p = plan(loaded)
    if display is None:
        display = LineDisplay(report or (None if quiet else lambda msg: print(msg, flush=True)))
    try:
        return _submit(p, display, poll_interval, fail_fast, started)
    finally:
        display.close()


def _submit(
    p: Plan, display: LineDisplay | LiveDisplay, poll_interval: float, fail_fast: bool, started: float
) -> SubmitResult:
    say = display.say
    tracker = _tracker_for(p)
    for run_id in tracker.mark_dead_runs_killed():
        say(f"run {run_id} was left RUNNING by a driver that is gone: marked KILLED")
    parent_id, _ = tracker.start_run(
        p.spec.name, {"spec_hash": p.spec_hash, "role": "parent", **_driver_tags(p), "spec_file": str(p.loaded.source)}
    )
    tracker.log_params(
        parent_id, {"sweep": yaml.safe_dump(p.spec.sweep, sort_keys=False).strip() or "{}", "runs": str(len(p.runs))}
    )
    children = _start_children(p, tracker, parent_id)
    todo = [r for r in p.runs if children[r.run_hash][1] != "FINISHED" or not r.stages["eval"].done]
    results = {r.run_hash: _finished_result(tracker, r, children[r.run_hash][0]) for r in p.runs if r not in todo}
    board = Board(
        [
            RunRow(r.name, r.spec.train.max_steps, {k: "cached" if s.done else "waiting" for k, s in r.stages.items()})
            for r in p.runs
        ]
    )
    for r in p.runs:
        if r.run_hash in results:
            _close_row(board, r, results[r.run_hash])
        else:
            say(f"[{r.name}] " + ", ".join(f"{k} {'cached' if s.done else 'to run'}" for k, s in r.stages.items()))
    display.update(board)
    if todo:
        results.update(_execute(p, todo, tracker, children, display, board, poll_interval, fail_fast))
    runs = [results[r.run_hash] for r in p.runs]
    ok = all(r.status == "FINISHED" for r in runs)
    tracker.set_tags(parent_id, {"gptlab.runs_finished": str(sum(r.status == "FINISHED" for r in runs))})
    if p.spec.sweep:
        log_sweep_summary(tracker, parent_id, p, runs)
    tracker.finish(parent_id, ok, None if ok else "; ".join(f"{r.name}: {r.cause}" for r in runs if r.error)[:4000])
    return SubmitResult(
        p.spec.tracking.experiment or p.spec.name,
        tracker.experiment_id,
        parent_id,
        tracker.uri,
        runs,
        time.time() - started,
    )


def _driver_tags(p: Plan) -> dict[str, str]:
    """Where and by whom a run is driven: host, site, this driver's pid (to detect a killed driver later)
    and the git commit of the spec file's directory, when it is in a git work tree."""
    tags = {
        "host": socket.gethostname(),
        "site": p.spec.site.name,
        "driver_pid": str(os.getpid()),
        "runs_root": str(p.runs_root),
    }
    commit = _git_commit(Path(p.loaded.source))
    if commit:
        tags["git_commit"] = commit
    return tags


def _git_commit(path: Path) -> str | None:
    import subprocess

    try:
        head = subprocess.run(
            ["git", "-C", str(path.parent), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(path.parent), "status", "--porcelain", "--", path.name],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty else "")


def _start_children(p: Plan, tracker: Tracker, parent_id: str) -> dict[str, tuple[str, str]]:
    children = {}
    for r in p.runs:
        tags = {
            "run_hash": r.run_hash,
            "spec_hash": p.spec_hash,
            "role": "sweep_point",
            **_driver_tags(p),
            "stages": ",".join(s.label for s in r.stages.values()),
        }
        run_id, status = tracker.start_run(r.name, tags, parent_id=parent_id)
        if status != "FINISHED":
            tracker.log_params(run_id, flatten(r.spec.model_dump(mode="json", exclude={"sweep"})))
        children[r.run_hash] = (run_id, status)
    return children


def _execute(
    p: Plan,
    todo: list[RunPlan],
    tracker: Tracker,
    children: dict[str, tuple[str, str]],
    display: LineDisplay | LiveDisplay,
    board: Board,
    poll_interval: float,
    fail_fast: bool,
) -> dict[str, RunResult]:
    import parsl

    from site_configs import build_site

    trainings = sum(1 for k, s in p.stages.items() if s.kind == "train" and not s.done)
    site = build_site(p.spec.site, p.runs_root / "parsl", [r.spec.train for r in todo], trainings)
    cached = {s.key for s in p.stages.values() if s.done}
    from llmcore.io import file_lock

    with file_lock(p.runs_root / "parsl" / ".lock", "the Parsl run directory"):  # Parsl numbers run dirs racily
        dfk = parsl.load(site.config)
    try:
        for r in todo:
            tracker.set_tags(children[r.run_hash][0], {"gptlab.parsl_run_id": dfk.run_id})
        driver = Driver(p, tracker, display.say, poll_interval)
        driver.launch_all(_make_apps(site), site.train_env)
        results: dict[str, RunResult] = {}
        pending = list(todo)
        while pending:
            for r in pending:
                driver.forward(r, children[r.run_hash][0])
            driver.refresh(board)
            for r in [r for r in pending if driver.run_done(r)]:
                pending.remove(r)
                done = results[r.run_hash] = _finalize(driver, r, children[r.run_hash][0], cached)
                _close_row(board, r, done)
                display.say(f"[{r.name}] {done.status} {_metrics_line(done.metrics)}".rstrip())
            if fail_fast and pending and any(x.status == "FAILED" for x in results.values()):
                cancelled = _cancel(driver, pending, children)
                for r in pending:
                    _close_row(board, r, cancelled[r.run_hash])
                results.update(cancelled)
                pending = []
            display.update(board)
            if pending:
                driver.wait(pending, poll_interval)
        return results
    finally:
        dfk.cleanup()
        parsl.clear()


def _cancel(driver: Driver, runs: list[RunPlan], children: dict[str, tuple[str, str]]) -> dict[str, RunResult]:
    """--fail-fast: close the unfinished points as FAILED, then stop every task still running or queued.
    Committed stages stay committed; a later submit resumes the rest from their checkpoints."""
    error = "cancelled: another sweep point failed and --fail-fast was given"
    results = {}
    for r in runs:
        run_id = children[r.run_hash][0]
        driver.tracker.finish(run_id, False, error)
        driver.report(f"[{r.name}] FAILED ({error})")
        results[r.run_hash] = RunResult(r.name, run_id, "FAILED", r.point, {}, {}, error)
    _stop_tasks(driver)
    return results


def _stop_tasks(driver: Driver, seconds: float = 60.0) -> None:
    """Terminate this driver's child processes (trainings, worker pools) until every launched task has
    ended: a task queued behind a running one starts later, so one sweep is not enough."""
    import psutil

    futures = [f for f in (*driver.futures.values(), *driver.train_proc.values()) if f is not None]
    deadline = time.time() + seconds
    while not all(f.done() for f in futures) and time.time() < deadline:
        for child in psutil.Process().children(recursive=True):
            try:
                child.terminate()
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.25)


def _close_row(board: Board, run: RunPlan, result: RunResult) -> None:
    row = board.rows[run.name]
    row.status, row.val_bpb = result.status, result.metrics.get("val/bpb")
    for kind, state in result.stages.items():
        if state in ("failed", "not run") or row.stages.get(kind) not in ("done", "cached"):
            row.stages[kind] = {"ran": "done"}.get(state, state)


def _metrics_line(metrics: dict[str, float]) -> str:
    keys = ("val/loss", "val/ppl", "val/bpb")
    return " ".join(f"{k}={metrics[k]:.4f}" for k in keys if k in metrics)


def _finalize(driver: Driver, run: RunPlan, run_id: str, cached: set[str]) -> RunResult:
    """Close one sweep point's MLflow run with everything it produced, or with the error that stopped it."""
    tracker = driver.tracker
    driver.forward(run, run_id, now=True)
    states = {k: ("cached" if s.key in cached else "ran" if s.done else "not run") for k, s in run.stages.items()}
    tracker.set_tags(
        run_id, {"gptlab.cached_stages": ",".join(k for k, v in states.items() if v == "cached") or "none"}
    )
    failed = driver.failure(run)
    if failed or not run.stages["eval"].done:
        kind, error = failed or ("eval", "stage eval failed: it did not commit")
        states[kind] = "failed"
        result = RunResult(run.name, run_id, "FAILED", run.point, {}, states, error)
        tracker.finish(run_id, False, result.cause)
        return result
    metrics = _log_outputs(tracker, run, run_id)
    tracker.finish(run_id, True)
    return RunResult(run.name, run_id, "FINISHED", run.point, metrics, states)


def _log_outputs(tracker: Tracker, run: RunPlan, run_id: str) -> dict[str, float]:
    markers = {k: s.marker() for k, s in run.stages.items()}
    ev = markers["eval"]["result"]
    metrics = {
        "val/loss": ev["val_loss"],
        "val/ppl": ev["val_ppl"],
        "val/bpb": ev["val_bpb"],
        "tokenizer/bytes_per_token": markers["shards"]["result"]["bytes_per_token"]["val"],
        "model/params": markers["train"]["result"]["params"],
    }
    metrics.update({f"stage/{k}_seconds": m["seconds"] for k, m in markers.items()})
    tracker.log_values(run_id, metrics, step=int(ev["step"]))
    spec_yaml = yaml.safe_dump(run.spec.model_dump(mode="json", exclude={"sweep"}), sort_keys=False)
    tracker.log_text(run_id, spec_yaml, "spec.yaml")
    from llmcore.checkpoint import latest_checkpoint

    tok, evd, trd = run.stages["tokenizer"].dir, run.stages["eval"].dir, run.stages["train"].dir
    files = [(tok / "tokenizer.model", "tokenizer"), (evd / "eval.json", "eval"), (evd / "samples.txt", "eval")]
    reports = trd.parent.parent / "reports" / run.run_hash  # driver-owned: committed stage dirs stay as they are
    files.append((loss_curve_png(trd / "metrics.jsonl", reports / "loss_curve.png", run.name), "plots"))
    checkpoint = latest_checkpoint(trd)
    if run.spec.tracking.log_model and checkpoint is not None:
        files += [(checkpoint / "model.safetensors", "model"), (checkpoint / "meta.json", "model")]
    tracker.log_artifacts(run_id, files)
    return metrics


def _finished_result(tracker: Tracker, run: RunPlan, run_id: str) -> RunResult:
    """A sweep point finished by an earlier submit: report what MLflow holds, log nothing again."""
    data = tracker.client.get_run(run_id).data
    states = {k: "cached" for k in run.stages}
    return RunResult(run.name, run_id, "FINISHED", run.point, dict(data.metrics), states)
