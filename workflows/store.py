"""The MLflow store, written by one process at a time: the lock, the retry policy and the writes.

Workers never talk to MLflow: the driver is the one writer (see ``workflows.tail`` for how training metrics get
there). Several drivers may still share one store (two submits at once, a sweep per terminal), so every write
goes through one lock file next to the store (``mlflow.db.lock``, an ``flock``): the store is created (MLflow's
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
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient

from llmcore.io import file_lock, is_no_space
from workflows.server import TrackingStoreError, check_tracking_server

T = TypeVar("T")

TAG_PREFIX = "gptlab."


def tag(name: str) -> str:
    """The MLflow tag of a gptlab name (``role`` -> ``gptlab.role``); MLflow's own ``mlflow.*`` tags as they are."""
    return name if name.startswith(("mlflow.", TAG_PREFIX)) else TAG_PREFIX + name


BATCH = 1000  # MLflow accepts at most 1000 metrics, params and tags together per log_batch call
PARAM_BATCH = 100
MAX_PARAM_CHARS = 6000


#: Concurrent trainings whose metrics one driver forwards into a SQLite store with a p99 lag under 30 s and under
#: one core: measured between 1,500 and 2,000 on a local disk (``python bench/tracking_scale.py``: see
#: docs/performance.md), a third of that for a ``runs_root`` on a parallel filesystem, whose commits cost more;
#: ``gptlab plan`` warns past it.
SQLITE_CEILING = 500


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
    # MLflow's client retries a tracking server that does not answer 7 times with a backoff of 2, 4, ... 64 s, each
    # try waiting up to 120 s: minutes of silence. Bounded here (a few seconds when nothing listens, about a
    # minute at worst); the metric forwarder never retries a write itself (see ``Tracker.log_batch_once``).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


def is_unreachable(exc: BaseException) -> bool:
    """The tracking server (or the database behind it) does not answer for now: no connection, a timeout, or an
    HTTP 5xx. Not a refusal (401, 403) and not a bad request, which waiting does not fix."""
    import requests

    seen, todo = [], [exc]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or any(e is x for x in seen):
            continue
        seen.append(e)
        if isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError)):
            return True
        code = getattr(e, "error_code", "")
        if code in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE") and "403" not in str(e):
            return True
        if re.search(r"error code 5\d\d|Max retries exceeded|failed with exception", str(e)):
            return True
        todo += [e.__cause__, e.__context__]
    return False


@contextmanager
def permitted(experiment: str) -> Iterator[None]:
    """Turn a tracking server's "permission denied" (MLflow's basic-auth: the experiment is another member's) into
    a :class:`TrackingStoreError` naming ``tracking.experiment`` and what to do."""
    try:
        yield
    except Exception as exc:
        if getattr(exc, "error_code", "") != "PERMISSION_DENIED" and "error code 403" not in str(exc):
            raise
        user = os.environ.get("MLFLOW_TRACKING_USERNAME") or "(none: MLFLOW_TRACKING_USERNAME is not set)"
        raise TrackingStoreError(
            f"tracking.experiment {experiment}: the server's user {user} has no permission on it (HTTP 403: it is "
            "another member's experiment); ask its owner or the server's admin to grant you EDIT on it, or name "
            "another tracking.experiment"
        ) from None


class Tracker:
    """Writes to one experiment of an MLflow store, each write under the store's lock and retried while the store
    is locked. Tags are gptlab names (``role``); the ``gptlab.`` prefix is added here and only here."""

    def __init__(self, uri: str, experiment: str, artifact_root: Path):
        quiet_mlflow_logs()
        check_tracking_server(uri)  # before the lock file, before anything is written: fail fast, in one sentence
        self.uri = uri
        self.outage_report_s = 120.0  # the spec's tracking.outage_report_s, set by whoever read the spec
        self.lock_path = store_lock_path(uri, artifact_root)
        self._held = threading.local()
        self._token = f"(gptlab tracker {secrets.token_hex(6)})"  # this tracker's mark in the lock file
        # Nobody else held the store's lock between this tracker's last hold and its current one: what this
        # tracker wrote meanwhile is still what the store holds (the metric forwarder then skips re-reading it).
        self.held_alone = False
        with self.locked(), permitted(experiment):  # the first client call creates (migrates) a new SQLite store
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
            with file_lock(self.lock_path, say=lambda _: None, note=self._token) as previous:
                self.held_alone = previous.endswith(self._token)
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

    def on_behalf(self, fn: Callable[[], T]) -> T:
        """Call ``fn`` in a worker thread of a thread that holds the store's lock and waits for the worker (the
        metric forwarder's sends, :func:`workflows.tail.poll_all`): its writes are under that hold."""
        self._held.depth = 1
        try:
            return fn()
        finally:
            self._held.depth = 0

    def _write(self, fn: Callable[[], T]) -> T:
        with self.locked():
            return retry_locked(fn)

    def find_runs(self, filter_string: str = "", **tags: str) -> list[Any]:
        """Runs of the experiment with these gptlab tags (and an MLflow filter string), the newest first."""
        filt = " and ".join(
            [f"tags.`{tag(k)}` = '{v}'" for k, v in tags.items()] + ([filter_string] if filter_string else [])
        )
        return list(
            retry_locked(
                lambda: self.client.search_runs([self.experiment_id], filt, order_by=["attributes.start_time DESC"])
            )
        )

    def create_run(self, name: str, tags: dict[str, str]) -> str:
        run = retry_locked(
            lambda: self.client.create_run(
                self.experiment_id, tags={tag(k): str(v) for k, v in tags.items()}, run_name=name
            )  # fmt: skip
        )
        return run.info.run_id

    def set_status(self, run_id: str, status: str) -> None:
        """RUNNING again (a run resumed), or an end state: FINISHED, FAILED, KILLED."""
        if status == "RUNNING":
            self._write(lambda: self.client.update_run(run_id, status="RUNNING"))
        else:
            self._write(lambda: self.client.set_terminated(run_id, RunStatus.to_string(getattr(RunStatus, status))))

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        batch = [RunTag(tag(k), str(v)) for k, v in tags.items()]
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
        run_tags = [RunTag(tag(k), str(v)) for k, v in (tags or {}).items()]
        if not metrics and not run_tags:
            return
        with self.locked():
            size = BATCH - len(run_tags)  # the tags count towards MLflow's limit of a call
            for i in range(0, max(len(metrics), 1), size):
                chunk = metrics[i : i + size]
                last = i + size >= len(metrics)
                retry_locked(
                    lambda: self.client.log_batch(
                        run_id, metrics=chunk, tags=run_tags if last else [], synchronous=True
                    )
                )

    def log_batch_once(self, run_id: str, metrics: list[Metric], tags: dict[str, str]) -> None:
        """One ``log_batch`` (at most BATCH metrics, with run tags, one store transaction), sent once: never retried
        by MLflow's client, since a retry of a batch that landed but whose answer was lost would log its points
        twice. The caller re-reads the run's tags before sending again. On a tracking server this is a single
        REST call with bounded timeouts; on a local store, a client call (retried only while SQLite is locked,
        which means it did not land)."""
        assert len(metrics) + len(tags) <= BATCH
        run_tags = [RunTag(tag(k), str(v)) for k, v in tags.items()]
        if is_local_store(self.uri):
            with self.locked():
                retry_locked(lambda: self.client.log_batch(run_id, metrics=metrics, tags=run_tags, synchronous=True))
            return
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.rest_utils import http_request, verify_rest_response

        body = {
            "run_id": run_id,
            "metrics": [{"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step} for m in metrics],
            "tags": [{"key": t.key, "value": t.value} for t in run_tags],
        }
        endpoint = "/api/2.0/mlflow/runs/log-batch"
        with self.locked():
            resp = http_request(get_default_host_creds(self.uri), endpoint, "POST", max_retries=0, backoff_factor=0,
                                timeout=(5, 60), raise_on_status=False, json=body)  # fmt: skip
            verify_rest_response(resp, endpoint)

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

    def status(self, run_id: str) -> str:
        return retry_locked(lambda: self.client.get_run(run_id).info.status)
