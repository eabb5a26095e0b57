"""MLflow tracking with one writer: the driver.

Workers never talk to MLflow. Training appends to ``metrics.jsonl`` in its stage directory and the driver
forwards new lines in batches while stages run, so the UI is live, a SQLite store is written by one process
only (safe on Lustre), and compute nodes that cannot reach a tracking server still record everything.

Several drivers may still share one store (two submits at once, a sweep per terminal). So every write goes
through one lock file next to the store (``mlflow.db.lock``, an ``flock``): the store is created (MLflow's
first-time schema migration, which races when several processes create it together) by exactly one of them,
find-or-create of a run is atomic (two submits of one spec share their runs, never duplicate them), metric
forwarding is exactly-once, and a "database is locked" that still gets through (a reader such as the UI) is
retried with backoff.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient

from llmcore.io import file_lock, is_no_space

T = TypeVar("T")

TAG = "gptlab."
BATCH = 1000  # MLflow accepts at most 1000 metrics per log_batch call
PARAM_BATCH = 100
MAX_PARAM_CHARS = 6000


def default_tracking_uri(runs_root: Path) -> str:
    return f"sqlite:///{runs_root / 'mlflow.db'}"


def is_local_store(uri: str) -> bool:
    """A store in a file on this machine (SQLite or a file store), not a tracking server."""
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def store_lock_path(uri: str, artifact_root: Path) -> Path:
    """The lock file every gptlab writer of this store takes: beside a SQLite file, else beside the artifacts."""
    if uri.startswith("sqlite:"):
        from sqlalchemy.engine import make_url  # parses the path as MLflow's store does (`#`, `;` included)

        db = make_url(uri).database
        if db and db != ":memory:":
            return Path(db).with_name(Path(db).name + ".lock")
    return artifact_root.parent / ".mlflow-tracking.lock"


LOCKED_RETRY_SECONDS = 120.0


def is_locked_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "database is locked" in text or "database table is locked" in text


class TrackingStoreError(RuntimeError):
    """The MLflow store cannot be written: its disk is full, over quota or read-only, or no MLflow tracking
    server answers at its URI. Nothing is lost: committed stages stay committed, and a submit after fixing it
    resumes the runs."""


STORE_FULL = (
    "database or disk is full",
    "no space left on device",
    "disk quota exceeded",
    "attempt to write a readonly database",
    "read-only file system",
)


def retry_locked(fn: Callable[[], T], seconds: float = LOCKED_RETRY_SECONDS) -> T:
    """Call ``fn``; retry SQLite's transient "database is locked" with jittered exponential backoff. A store
    whose disk is full or read-only raises :class:`TrackingStoreError` (one clear sentence, no retry)."""
    deadline, delay = time.monotonic() + seconds, 0.05
    while True:
        try:
            return fn()
        except Exception as exc:  # MLflow wraps sqlite3/sqlalchemy errors in MlflowException
            text = str(exc).lower()
            if any(w in text for w in STORE_FULL):
                reason = next(w for w in STORE_FULL if w in text)
                raise TrackingStoreError(
                    f"the MLflow store cannot be written ({reason}); free space (or make it writable) and submit "
                    "again: committed stages are kept and the runs resume"
                ) from None
            if not is_locked_error(exc) or time.monotonic() > deadline:
                raise
        time.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 2.0)


# A tracking server is asked once, with short timeouts and no retries, before any MLflow call to it: MLflow's
# own client retries a server that is not there with backoff for minutes, saying nothing.
PROBE_ENDPOINT = "/api/2.0/mlflow/experiments/search"
PROBE_CONNECT_SECONDS = 5.0
PROBE_READ_SECONDS = 15.0  # a busy server still answers a one-experiment search well within this
_answered: set[str] = set()  # URIs whose server answered in this process
_probe_lock = threading.Lock()


def check_tracking_server(uri: str) -> None:
    """Raise :class:`TrackingStoreError` (one sentence naming ``tracking.uri``) unless an MLflow tracking server
    answers at ``uri``; a no-op for local stores and, after the first answer, for the same URI.

    The probe is a GET of MLflow's REST experiment search for one experiment, sent through MLflow's own HTTP
    helper (its credentials, TLS and header settings) but once, without retries, with short timeouts. A server
    that answers with a transient error (429, 5xx) or denies access to this one call (403) passes: MLflow's
    own retries and errors deal with those."""
    if not uri.lower().startswith(("http://", "https://")) or uri in _answered:  # only servers over HTTP
        return
    with _probe_lock:
        if uri in _answered:
            return
        problem = _probe(uri)
        if problem is not None:
            raise TrackingStoreError(f"tracking.uri {uri}: {problem}")
        _answered.add(uri)


def _probe(uri: str) -> str | None:
    """None when an MLflow server answers at ``uri``, else what is wrong and what to do, in words."""
    from urllib.parse import urlsplit

    import requests
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    fix = "or point tracking.uri (--uri for status, compare and sample) at a running one"
    try:
        parts = urlsplit(uri)
        host, port = parts.hostname or "?", parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError as exc:
        return f"not a valid URL ({exc}); fix tracking.uri"
    start = f"start one there (`mlflow server --host {host} --port {port}`) {fix}"
    try:
        resp = http_request(
            get_default_host_creds(uri),
            PROBE_ENDPOINT,
            "GET",
            max_retries=0,
            backoff_factor=0,
            timeout=(PROBE_CONNECT_SECONDS, PROBE_READ_SECONDS),
            raise_on_status=False,
            params={"max_results": 1},
        )
    except Exception as exc:  # MLflow wraps every requests error in an MlflowException: look down the chain
        import urllib3

        chain, todo = [], [exc]
        while todo:
            e = todo.pop()
            if isinstance(e, BaseException) and not any(e is c for c in chain):
                chain.append(e)  # urllib3 keeps the error beneath a MaxRetryError in .reason, requests in args
                todo += [e.__cause__, e.__context__, getattr(e, "reason", None), *e.args[:1]]
        if any(isinstance(e, ConnectionRefusedError) for e in chain):
            return f"no MLflow server answers (connection refused: nothing listens on port {port} of {host}); {start}"
        if any(isinstance(e, socket.gaierror) for e in chain):
            return f"no MLflow server answers (host name {host!r} is not known); fix tracking.uri"
        connect_timeout = (requests.exceptions.ConnectTimeout, urllib3.exceptions.ConnectTimeoutError)
        if any(isinstance(e, connect_timeout) for e in chain):
            return (
                f"no MLflow server answers (no connection within {PROBE_CONNECT_SECONDS:g} s: the host is down "
                f"or a firewall drops the connection); {start}"
            )
        if any(isinstance(e, (requests.exceptions.ReadTimeout, urllib3.exceptions.ReadTimeoutError)) for e in chain):
            return (
                f"the server accepted a connection but sent no answer within {PROBE_READ_SECONDS:g} s: it is "
                f"hung, or not an HTTP server; restart it {fix}"
            )
        if any(isinstance(e, (requests.exceptions.SSLError, urllib3.exceptions.SSLError)) for e in chain):
            return (
                "the TLS handshake failed; for a server with its own certificate set "
                "MLFLOW_TRACKING_SERVER_CERT_PATH (or MLFLOW_TRACKING_INSECURE_TLS=true), or fix tracking.uri"
            )
        if any(isinstance(e, requests.exceptions.ConnectionError) for e in chain):
            reason = next((str(e.args[0]) for e in reversed(chain) if isinstance(e, OSError) and e.args), "")
            return f"no MLflow server answers (cannot connect{': ' + reason[:200] if reason else ''}); {start}"
        return f"cannot reach an MLflow server ({str(exc)[:300]}); {start}"
    code = resp.status_code
    if code == 401:
        return (
            "the MLflow server refuses these credentials (HTTP 401); set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN), or fix tracking.uri"
        )
    if code in (403, 429) or code >= 500:
        return None  # a server that is there: denied this one call, or busy; MLflow retries and reports those
    try:
        answer = resp.json() if code == 200 else None
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        kind = (resp.headers.get("Content-Type") or "no content type").split(";")[0]
        return (
            f"something answers there, but not an MLflow tracking server (HTTP {code}, {kind}, for "
            f"{PROBE_ENDPOINT}); point tracking.uri (--uri for status, compare and sample) at an MLflow "
            "server's address (its port, and its path prefix behind a proxy)"
        )
    return None


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts/lists -> {"model.n_layer": "4", "data.sources.0.path": "x"}."""
    out: dict[str, str] = {}
    if isinstance(tree, dict) and tree:
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(tree, list) and tree and all(isinstance(v, dict) for v in tree):
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        value = tree if isinstance(tree, str) else json.dumps(tree)
        out[prefix.rstrip(".")] = value[:MAX_PARAM_CHARS]
    return out


def quiet_mlflow_logs() -> None:
    """MLflow and alembic log every migration step at INFO; users need none of it."""
    for name in ("mlflow", "alembic", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")


class Tracker:
    """Finds or creates the experiment, the parent run of a submit and one child run per sweep point."""

    def __init__(self, uri: str, experiment: str, artifact_root: Path):
        quiet_mlflow_logs()
        check_tracking_server(uri)  # before the lock file, before anything is written: fail fast, in one sentence
        self.uri = uri
        self.lock_path = store_lock_path(uri, artifact_root)
        self._held = threading.local()
        with self.locked():  # the first client call creates (migrates) a new SQLite store: one process only
            self.client = retry_locked(lambda: MlflowClient(tracking_uri=uri))
            exp = retry_locked(lambda: self.client.get_experiment_by_name(experiment))
            if exp is None:
                # A local store keeps artifacts under runs_root; a tracking server keeps them where it serves them
                # from (its --artifacts-destination), which other machines can reach and this path may not be.
                location = None
                if is_local_store(uri):
                    artifact_root.mkdir(parents=True, exist_ok=True)
                    location = artifact_root.as_uri()
                self.experiment_id = retry_locked(
                    lambda: self.client.create_experiment(experiment, artifact_location=location)
                )
            else:
                if exp.lifecycle_stage == "deleted":
                    retry_locked(lambda: self.client.restore_experiment(exp.experiment_id))
                self.experiment_id = exp.experiment_id

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store's lock (re-entrant within a thread; other threads and processes wait)."""
        depth = getattr(self._held, "depth", 0)
        if depth:
            self._held.depth = depth + 1
            try:
                yield
            finally:
                self._held.depth -= 1
            return
        try:
            with file_lock(self.lock_path, say=lambda _: None):
                self._held.depth = 1
                try:
                    yield
                finally:
                    self._held.depth = 0
        except TrackingStoreError as exc:
            raise TrackingStoreError(f"{self.uri}: {exc}") from None
        except OSError as exc:  # the lock file itself, on a read-only or full file system
            if not is_no_space(exc) and not isinstance(exc, PermissionError):
                raise
            raise TrackingStoreError(f"{self.uri}: cannot create {self.lock_path} ({exc.strerror})") from None

    def _write(self, fn: Callable[[], T]) -> T:
        with self.locked():
            return retry_locked(fn)

    def find_runs(self, **tags: str) -> list[Any]:
        filt = " and ".join(f"tags.`{TAG}{k}` = '{v}'" for k, v in tags.items())
        return list(
            retry_locked(
                lambda: self.client.search_runs([self.experiment_id], filt, order_by=["attributes.start_time DESC"])
            )
        )

    def start_run(self, name: str, tags: dict[str, str], parent_id: str | None = None) -> tuple[str, str]:
        """(run id, previous status): an existing run with the same identity tags is reused, not duplicated
        (find and create happen under the store's lock, so two submits at once find the same run)."""
        with self.locked():
            return self._start_run(name, tags, parent_id)

    def _start_run(self, name: str, tags: dict[str, str], parent_id: str | None) -> tuple[str, str]:
        identity = {k: v for k, v in tags.items() if k in ("role", "spec_hash", "run_hash")}
        if parent_id:
            identity["parent"] = parent_id
        found = self.find_runs(**identity)
        all_tags = {f"{TAG}{k}": v for k, v in tags.items()}
        if parent_id:
            all_tags["mlflow.parentRunId"] = parent_id
            all_tags[f"{TAG}parent"] = parent_id
        if found:
            run = found[0]
            status = run.info.status
            if status != "FINISHED":
                retry_locked(lambda: self.client.update_run(run.info.run_id, status="RUNNING"))
            self.set_tags(run.info.run_id, all_tags)
            return run.info.run_id, status
        run = retry_locked(lambda: self.client.create_run(self.experiment_id, tags=all_tags, run_name=name))
        return run.info.run_id, "NEW"

    def mark_dead_runs_killed(self) -> list[str]:
        """Runs left RUNNING by a driver on this host that no longer exists become KILLED; returns their ids."""
        import psutil

        with self.locked():
            return self._mark_dead_runs_killed(psutil)

    def _mark_dead_runs_killed(self, psutil: Any) -> list[str]:
        host = socket.gethostname()
        killed = []
        for run in retry_locked(lambda: self.client.search_runs([self.experiment_id], "attributes.status = 'RUNNING'")):
            tags = run.data.tags
            pid = tags.get(f"{TAG}driver_pid")
            if tags.get(f"{TAG}host") != host or pid is None or not pid.isdigit():
                continue  # another machine's driver: it may well be alive
            if psutil.pid_exists(int(pid)) and int(pid) != os.getpid():
                continue
            retry_locked(lambda: self.client.set_terminated(run.info.run_id, "KILLED"))
            killed.append(run.info.run_id)
        return killed

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        batch = [RunTag(k, str(v)) for k, v in tags.items()]
        self._write(lambda: self.client.log_batch(run_id, tags=batch, synchronous=True))

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        with self.locked():
            existing = retry_locked(lambda: self.client.get_run(run_id).data.params)
            todo = [Param(k, v) for k, v in params.items() if k not in existing]
            for i in range(0, len(todo), PARAM_BATCH):
                chunk = todo[i : i + PARAM_BATCH]
                retry_locked(lambda: self.client.log_batch(run_id, params=chunk, synchronous=True))

    def log_metrics(self, run_id: str, metrics: list[Metric], tags: dict[str, str] | None = None) -> None:
        """Log metrics in batches of MLflow's maximum size; ``tags`` go with the last batch, in the same store
        transaction (one write, one fsync, where metrics and tags apart would take two)."""
        run_tags = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        if not metrics and not run_tags:
            return
        with self.locked():
            for i in range(0, max(len(metrics), 1), BATCH):
                chunk = metrics[i : i + BATCH]
                last = i + BATCH >= len(metrics)
                retry_locked(
                    lambda: self.client.log_batch(
                        run_id, metrics=chunk, tags=run_tags if last else [], synchronous=True
                    )
                )

    def log_values(self, run_id: str, values: dict[str, float], step: int) -> None:
        """Log final values at ``step``, each once: a value the run already holds at that step is not repeated
        (a second driver finishing the same run, or a re-submit, adds no duplicate points)."""
        now = int(time.time() * 1000)
        with self.locked():
            have = retry_locked(lambda: self.client.get_run(run_id).data)
            steps = {}
            todo = [
                Metric(k, float(v), now, step)
                for k, v in values.items()
                if v is not None
                and not (
                    k in have.metrics and have.metrics[k] == float(v) and self._latest_step(run_id, k, steps) == step
                )
            ]
            self.log_metrics(run_id, todo)

    def _latest_step(self, run_id: str, key: str, cache: dict[str, int]) -> int:
        if key not in cache:
            history = retry_locked(lambda: self.client.get_metric_history(run_id, key))
            cache[key] = max((m.step for m in history), default=-1)
        return cache[key]

    def log_artifacts(self, run_id: str, paths: Iterable[tuple[Path, str | None]]) -> None:
        with self.locked():
            for path, artifact_dir in paths:
                if path.is_file():
                    retry_locked(lambda: self.client.log_artifact(run_id, str(path), artifact_dir))

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._write(lambda: self.client.log_text(run_id, text, artifact_file))

    def finish(self, run_id: str, ok: bool, error: str | None = None) -> None:
        with self.locked():
            if error:
                self.set_tags(run_id, {f"{TAG}error": error[:5000], "mlflow.note.content": f"**Failed:** {error}"})
            status = RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED)
            retry_locked(lambda: self.client.set_terminated(run_id, status))

    def status(self, run_id: str) -> str:
        return retry_locked(lambda: self.client.get_run(run_id).info.status)


class MetricsForwarder:
    """Forwards new lines of a stage's ``metrics.jsonl`` to one MLflow run, never the same step twice.

    The last forwarded step per line kind is kept as a run tag, so a driver that restarts (or a training
    that resumes from a checkpoint and rewrites later steps) does not duplicate points.
    """

    def __init__(self, tracker: Tracker, run_id: str, path: Path):
        self.tracker, self.run_id, self.path = tracker, run_id, path
        self.offset, self.inode = 0, -1
        self.latest: dict[str, Any] | None = None  # newest train record seen, for progress display
        self.pending: list[str] = []  # lines read but not yet sent
        self.sent_at = float("-inf")
        self.last = self._forwarded()

    def _forwarded(self) -> dict[str, int]:
        """The last step per line kind forwarded to the run by any driver (kept as run tags)."""
        tags = retry_locked(lambda: self.tracker.client.get_run(self.run_id).data.tags)
        return {kind: int(tags.get(f"{TAG}forwarded.{kind}", "-1")) for kind in ("train", "eval")}

    def poll(self, min_interval: float = 0.0) -> int:
        """Read the complete new lines (``latest`` follows them at once) and send what is pending to the store
        when ``min_interval`` seconds have passed since the last send (0: now). Returns how many metric values
        were sent. Sending costs a store transaction whatever its size, so the driver sends every few seconds
        while a training runs and once more, at once, when it has ended."""
        lines = self._read_new_lines()
        if lines:
            self.pending += lines
            self._note_latest(lines)
        if not self.pending or time.monotonic() - self.sent_at < min_interval:
            return 0
        lines, self.pending = self.pending, []
        self.sent_at = time.monotonic()
        with self.tracker.locked():  # exactly once, even with another driver forwarding the same file
            self.last = self._forwarded()
            metrics, last = self._parse(lines)
            if metrics:
                self.tracker.log_metrics(self.run_id, metrics, {f"{TAG}forwarded.{k}": str(v) for k, v in last.items()})
                self.last.update(last)
        return len(metrics)

    def _read_new_lines(self) -> list[str]:
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return []
        with f:
            st = os.fstat(f.fileno())
            # A resumed training rewrites the file (atomically: a new inode) and may have grown it past our
            # offset by the time we look; reading on from the old offset would start mid-line and lose a
            # step. Re-read from the start instead: the step filter drops what was already sent.
            if st.st_ino != self.inode or st.st_size < self.offset or not self._at_line_start(f):
                self.inode, self.offset = st.st_ino, 0
            if st.st_size == self.offset:
                return []
            f.seek(self.offset)
            chunk = f.read(st.st_size - self.offset)
        end = chunk.rfind(b"\n") + 1  # only whole lines; a line being written is read next time
        self.offset += end
        return chunk[:end].decode("utf-8", errors="replace").splitlines()

    def _note_latest(self, lines: list[str]) -> None:
        """The newest train record, for the progress display."""
        from llmcore.metrics import TrainLine, parse_line

        for line in reversed(lines):
            rec = parse_line(line)
            if isinstance(rec, TrainLine):
                self.latest = rec
                return

    def _at_line_start(self, f: Any) -> bool:
        if self.offset == 0:
            return True
        f.seek(self.offset - 1)
        return f.read(1) == b"\n"

    def _parse(self, lines: list[str]) -> tuple[list[Metric], dict[str, int]]:
        from llmcore.metrics import parse_lines

        metrics: list[Metric] = []
        last: dict[str, int] = {}
        for rec in parse_lines(lines):
            if rec.step <= max(self.last.get(rec.kind, -1), last.get(rec.kind, -1)):
                continue
            ts = int(rec.time * 1000)
            metrics += [Metric(name, value, ts, rec.step) for name, value in rec.metrics().items()]
            last[rec.kind] = rec.step
        return metrics, last
