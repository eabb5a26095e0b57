"""Following a training's ``metrics.jsonl`` while it runs: for the live table, for pruning, for MLflow.

Training (rank 0) appends records (``llmcore.metrics``) to its stage directory; the driver reads the new complete
lines every poll (:class:`MetricsTail`) and sends them to MLflow in batches (:class:`MetricsForwarder`), so the UI
is live, the store has one writer, and compute nodes that cannot reach a tracking server still record everything.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric

from llmcore.metrics import EvalLine, TrainLine, parse_lines
from workflows.store import Tracker, retry_locked, tag


class MetricsTail:
    """The complete records of a ``metrics.jsonl`` that are new since the last ``read()``.

    A resumed training rewrites the file from its checkpoint on (atomically: a new inode), and may have grown it
    past the read offset by the time we look: then the whole file is read again (never from mid-line), and a
    reader that must not see a step twice filters by step (the forwarder does).
    """

    def __init__(self, path: Path):
        self.path = path
        self.offset, self.inode = 0, -1
        self.latest: TrainLine | None = None  # the newest training step seen
        self.evals: dict[int, float] = {}  # step -> validation loss, every estimate seen (for pruning)

    def read(self) -> list[TrainLine | EvalLine]:
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return []
        with f:
            st = os.fstat(f.fileno())
            if st.st_ino != self.inode or st.st_size < self.offset or not self._at_line_start(f):
                self.inode, self.offset = st.st_ino, 0
            if st.st_size == self.offset:
                return []
            f.seek(self.offset)
            chunk = f.read(st.st_size - self.offset)
        end = chunk.rfind(b"\n") + 1  # only whole lines; a line being written is read next time
        self.offset += end
        records = parse_lines(chunk[:end].splitlines())
        for r in records:
            if isinstance(r, TrainLine):
                self.latest = r
            else:
                self.evals[r.step] = r.val_loss
        return records

    def _at_line_start(self, f: Any) -> bool:
        if self.offset == 0:
            return True
        f.seek(self.offset - 1)
        return f.read(1) == b"\n"


class MetricsForwarder:
    """Forwards a training's new records to one MLflow run, never the same step twice.

    The last forwarded step per record kind is kept as a run tag, so a driver that restarts (or a training that
    resumes from a checkpoint and rewrites later steps) does not duplicate points.
    """

    def __init__(self, tracker: Tracker, run_id: str, path: Path):
        self.tracker, self.run_id = tracker, run_id
        self.tail = MetricsTail(path)
        self.pending: list[TrainLine | EvalLine] = []  # read but not yet sent
        self.sent_at = float("-inf")
        self.last = self._forwarded()

    @property
    def latest(self) -> TrainLine | None:
        return self.tail.latest

    def _forwarded(self) -> dict[str, int]:
        """The last step per record kind forwarded to the run by any driver (kept as run tags)."""
        tags = retry_locked(lambda: self.tracker.client.get_run(self.run_id).data.tags)
        return {kind: int(tags.get(tag(f"forwarded.{kind}"), "-1")) for kind in ("train", "eval")}

    def poll(self, min_interval: float = 0.0) -> int:
        """Read the new records (``latest`` follows them at once) and send what is pending to the store when
        ``min_interval`` seconds have passed since the last send (0: now). Returns how many metric values were
        sent. Sending costs a store transaction whatever its size, so the driver sends every few seconds while a
        training runs and once more, at once, when it has ended."""
        self.pending += self.tail.read()
        if not self.pending or time.monotonic() - self.sent_at < min_interval:
            return 0
        records, self.pending = self.pending, []
        self.sent_at = time.monotonic()
        with self.tracker.locked():  # exactly once, even with another driver forwarding the same file
            self.last = self._forwarded()
            metrics, last = self._metrics(records)
            if metrics:
                self.tracker.log_metrics(self.run_id, metrics, {f"forwarded.{k}": str(v) for k, v in last.items()})
                self.last.update(last)
        return len(metrics)

    def _metrics(self, records: list[TrainLine | EvalLine]) -> tuple[list[Metric], dict[str, int]]:
        metrics: list[Metric] = []
        last: dict[str, int] = {}
        for rec in records:
            if rec.step <= max(self.last.get(rec.kind, -1), last.get(rec.kind, -1)):
                continue
            ts = int(rec.time * 1000)
            metrics += [Metric(name, value, ts, rec.step) for name, value in rec.metrics().items()]
            last[rec.kind] = rec.step
        return metrics, last
