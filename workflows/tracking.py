"""MLflow tracking with one writer: the driver.

Workers never talk to MLflow. Training appends to ``metrics.jsonl`` in its stage directory and the driver
forwards new lines in batches while stages run, so the UI is live, a SQLite store is written by one process
only (safe on Lustre), and compute nodes that cannot reach a tracking server still record everything.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterable

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient

TAG = "gptlab."
BATCH = 1000  # MLflow accepts at most 1000 metrics per log_batch call
PARAM_BATCH = 100
MAX_PARAM_CHARS = 6000

# metrics.jsonl field -> MLflow metric name, per line kind
TRAIN_METRICS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens_per_sec": "train/tokens_per_sec",
    "mfu": "train/mfu",
    "peak_mem_mb": "train/peak_mem_mb",
    "tokens_seen": "train/tokens_seen",
}
EVAL_METRICS = {"val_loss": "val/loss"}


def default_tracking_uri(runs_root: Path) -> str:
    return f"sqlite:///{runs_root / 'mlflow.db'}"


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
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            artifact_root.mkdir(parents=True, exist_ok=True)
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=artifact_root.as_uri())
        else:
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            self.experiment_id = exp.experiment_id

    def find_runs(self, **tags: str) -> list[Any]:
        filt = " and ".join(f"tags.`{TAG}{k}` = '{v}'" for k, v in tags.items())
        return list(self.client.search_runs([self.experiment_id], filt, order_by=["attributes.start_time DESC"]))

    def start_run(self, name: str, tags: dict[str, str], parent_id: str | None = None) -> tuple[str, str]:
        """(run id, previous status): an existing run with the same identity tags is reused, not duplicated."""
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
                self.client.update_run(run.info.run_id, status="RUNNING")
            self.set_tags(run.info.run_id, all_tags)
            return run.info.run_id, status
        run = self.client.create_run(self.experiment_id, tags=all_tags, run_name=name)
        return run.info.run_id, "NEW"

    def mark_dead_runs_killed(self) -> list[str]:
        """Runs left RUNNING by a driver on this host that no longer exists become KILLED; returns their ids."""
        import psutil

        host = socket.gethostname()
        killed = []
        for run in self.client.search_runs([self.experiment_id], "attributes.status = 'RUNNING'"):
            tags = run.data.tags
            pid = tags.get(f"{TAG}driver_pid")
            if tags.get(f"{TAG}host") != host or pid is None or not pid.isdigit():
                continue  # another machine's driver: it may well be alive
            if psutil.pid_exists(int(pid)) and int(pid) != os.getpid():
                continue
            self.client.set_terminated(run.info.run_id, "KILLED")
            killed.append(run.info.run_id)
        return killed

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()], synchronous=True)

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        existing = self.client.get_run(run_id).data.params
        todo = [Param(k, v) for k, v in params.items() if k not in existing]
        for i in range(0, len(todo), PARAM_BATCH):
            self.client.log_batch(run_id, params=todo[i : i + PARAM_BATCH], synchronous=True)

    def log_metrics(self, run_id: str, metrics: list[Metric]) -> None:
        for i in range(0, len(metrics), BATCH):
            self.client.log_batch(run_id, metrics=metrics[i : i + BATCH], synchronous=True)

    def log_values(self, run_id: str, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.log_metrics(run_id, [Metric(k, float(v), now, step) for k, v in values.items() if v is not None])

    def log_artifacts(self, run_id: str, paths: Iterable[tuple[Path, str | None]]) -> None:
        for path, artifact_dir in paths:
            if path.is_file():
                self.client.log_artifact(run_id, str(path), artifact_dir)

    def finish(self, run_id: str, ok: bool, error: str | None = None) -> None:
        if error:
            self.set_tags(run_id, {f"{TAG}error": error[:5000], "mlflow.note.content": f"**Failed:** {error}"})
        self.client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED))

    def status(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.status


class MetricsForwarder:
    """Forwards new lines of a stage's ``metrics.jsonl`` to one MLflow run, never the same step twice.

    The last forwarded step per line kind is kept as a run tag, so a driver that restarts (or a training
    that resumes from a checkpoint and rewrites later steps) does not duplicate points.
    """

    def __init__(self, tracker: Tracker, run_id: str, path: Path):
        self.tracker, self.run_id, self.path = tracker, run_id, path
        self.offset = 0
        self.latest: dict[str, Any] | None = None  # newest train record seen, for progress display
        tags = tracker.client.get_run(run_id).data.tags
        self.last = {kind: int(tags.get(f"{TAG}forwarded.{kind}", "-1")) for kind in ("train", "eval")}

    def poll(self) -> int:
        """Forward complete new lines; returns how many metric values were sent."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return 0
        if size < self.offset:  # rewritten on resume: re-read, the step filter drops what was sent
            self.offset = 0
        if size == self.offset:
            return 0
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read(size - self.offset)
        end = chunk.rfind(b"\n") + 1  # only whole lines; a line being written is read next time
        self.offset += end
        metrics, last = self._parse(chunk[:end].decode("utf-8", errors="replace").splitlines())
        if metrics:
            self.tracker.log_metrics(self.run_id, metrics)
            self.last.update(last)
            self.tracker.set_tags(self.run_id, {f"{TAG}forwarded.{k}": str(v) for k, v in last.items()})
        return len(metrics)

    def _parse(self, lines: list[str]) -> tuple[list[Metric], dict[str, int]]:
        metrics: list[Metric] = []
        last: dict[str, int] = {}
        now = int(time.time() * 1000)
        for line in lines:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            kind = rec.get("kind", "train")
            if kind == "train":
                self.latest = rec
            names = TRAIN_METRICS if kind == "train" else EVAL_METRICS
            step = int(rec["step"])
            if step <= max(self.last.get(kind, -1), last.get(kind, -1)):
                continue
            ts = int(rec["time"] * 1000) if "time" in rec else now
            metrics += [Metric(names[k], float(v), ts, step) for k, v in rec.items() if k in names and v is not None]
            last[kind] = step
        return metrics, last
