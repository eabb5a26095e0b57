"""Following a training's ``metrics.jsonl`` while it runs: for the live table, for pruning, for MLflow.

Training (rank 0) appends records (``llmcore.metrics``) to its stage directory; the driver reads the new complete
lines every poll (:class:`MetricsTail`) and sends them to MLflow in batches (:class:`MetricsForwarder`), so the UI
is live, the store has one writer, and compute nodes that cannot reach a tracking server still record everything.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from mlflow.entities import Metric

from llmcore.metrics import EvalLine, TrainLine, parse_lines
from workflows.store import BATCH, Tracker, is_local_store, is_unreachable, retry_locked, tag


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
    """Forwards a training's new records to one MLflow run, each point exactly once, through server outages.

    The last forwarded step per record kind is kept as a run tag, written in the same store transaction as the
    points it covers (one ``log_batch`` of at most 1000 values each), and re-read before a send unless this
    forwarder's own last send was answered and no other process held the store's lock since: so a driver that
    restarts, another driver forwarding the same file, a training that resumes from a checkpoint and rewrites later
    steps, or a batch that may or may not have landed before the server went away, never duplicates a point (and
    a driver alone with its store sends one request per batch, not two).

    When the tracking server (or the database behind it) does not answer, the records stay pending and the
    training goes on; past MAX_PENDING records they are let go from memory and read again from ``metrics.jsonl``
    (the buffer on disk) once the server is back. An outage longer than the tracker's ``outage_report_s`` is said
    in the driver's output when it passes that time, and recorded on the run (tag ``gptlab.tracking_outage``)
    when the server is back.
    """

    MAX_PENDING = 20_000  # records held in memory while the server is away; beyond, metrics.jsonl holds them

    def __init__(self, tracker: Tracker, run_id: str, path: Path, say: Callable[[str], None] | None = None):
        self.tracker, self.run_id = tracker, run_id
        self.tail = MetricsTail(path)
        self.pending: list[TrainLine | EvalLine] = []  # read but not yet sent
        self.sent_at = float("-inf")
        self.say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.down_since: float | None = None  # monotonic time of the first failed send of this outage
        self.down_wall = ""  # the same, as a UTC clock time, for the messages
        self.reported = False  # this outage was said in the driver's output
        self.reread = False  # pending records were let go: read metrics.jsonl again from its start
        self.outages: list[str] = []  # outages past outage_report_s, not yet recorded on the run
        # ``last`` is what the run holds: read, or written by this forwarder's answered sends since, with no other
        # process holding the store's lock in between (Tracker.held_alone); else it is read again before a send.
        self.confirmed = False
        try:
            with tracker.locked():  # read under the lock: still true at the first send if nobody held it since
                self.last, self.confirmed = self._forwarded(), True
        except Exception as exc:
            if not is_unreachable(exc):
                raise
            self.last = {"train": -1, "eval": -1}  # re-read before any send
            self._down()

    @property
    def latest(self) -> TrainLine | None:
        return self.tail.latest

    @property
    def waiting(self) -> bool:
        """Records read (or let go from memory) that the store does not hold yet: the server was away."""
        return bool(self.pending) or self.reread or self.down_since is not None

    def _forwarded(self) -> dict[str, int]:
        """The last step per record kind forwarded to the run by any driver (kept as run tags)."""
        tags = retry_locked(lambda: self.tracker.client.get_run(self.run_id).data.tags)
        return {kind: int(tags.get(tag(f"forwarded.{kind}"), "-1")) for kind in ("train", "eval")}

    def poll(self, min_interval: float = 0.0) -> int:
        """Read the new records (``latest`` follows them at once) and send what is pending to the store when
        ``min_interval`` seconds have passed since the last send (0: now). Returns how many metric values were
        sent. Sending costs a store transaction whatever its size, so the driver sends every few seconds while a
        training runs and once more, at once, when it has ended. A server that does not answer keeps the records
        pending (see the class docstring); this never raises for that. Many trainings: :func:`poll_all`."""
        self.read()
        return self.send() if self.due(min_interval) else 0

    def read(self) -> None:
        """Take the training's new records (``latest`` and ``tail.evals`` follow them at once)."""
        self.pending += self.tail.read()
        if len(self.pending) > self.MAX_PENDING:
            self.pending, self.reread = [], True  # they are in metrics.jsonl: read again when the server is back

    def due(self, min_interval: float) -> bool:
        """Something is pending and ``min_interval`` seconds have passed since the last send."""
        return (bool(self.pending) or self.reread) and time.monotonic() - self.sent_at >= min_interval

    def send(self) -> int:
        """Send what is pending now; returns how many metric values were sent (0 while the server is away)."""
        self.sent_at = time.monotonic()
        try:
            sent = self._send()
        except Exception as exc:
            if not is_unreachable(exc):
                raise
            self._down()
            return 0
        if self.down_since is not None:
            self._back(sent)
        return sent

    def _send(self) -> int:
        """Send every pending record not yet in the run, batch by batch; each batch and the tags saying how far
        it reaches land in one transaction, and the tags are read again first unless ``confirmed`` (a send that
        failed may have landed)."""
        sent = 0
        with self.tracker.locked():  # exactly once, even with another driver forwarding the same file
            if not (self.confirmed and self.tracker.held_alone):
                self.last = self._forwarded()
            self.confirmed = False  # until every batch of this send has been answered
            if self.reread:
                self.tail.offset, self.tail.inode = 0, -1
                self.pending, self.reread = self.tail.read(), False
            for metrics, last in self._batches(self.pending):
                tags = {f"forwarded.{k}": str(v) for k, v in last.items()}
                if self.outages:
                    tags["tracking_outage"] = "; ".join(self.outages)
                self.tracker.log_batch_once(self.run_id, metrics, tags)
                self.last.update(last)
                self.outages = []
                sent += len(metrics)
            self.pending, self.confirmed = [], True
        return sent

    def _batches(self, records: list[TrainLine | EvalLine]) -> Iterator[tuple[list[Metric], dict[str, int]]]:
        """(metrics, last step per kind) of the records past ``last``, whole records, at most BATCH values with the
        tags that go with them (``forwarded.train``, ``forwarded.eval``, ``tracking_outage``): MLflow refuses a
        ``log_batch`` of more than 1000 metrics, params and tags together."""
        metrics: list[Metric] = []
        last: dict[str, int] = {}
        for rec in records:
            if rec.step <= max(self.last.get(rec.kind, -1), last.get(rec.kind, -1)):
                continue
            ts = int(rec.time * 1000)
            points = [Metric(name, value, ts, rec.step) for name, value in rec.metrics().items()]
            if metrics and len(metrics) + len(points) > BATCH - 3:
                yield metrics, last
                metrics, last = [], {}
            metrics += points
            last[rec.kind] = rec.step
        if metrics:
            yield metrics, last

    def _down(self) -> None:
        now = time.monotonic()
        if self.down_since is None:
            self.down_since, self.down_wall = now, time.strftime("%H:%M:%S UTC", time.gmtime())
        gone = now - self.down_since
        if not self.reported and gone >= self.tracker.outage_report_s:
            self.reported = True
            self.say(
                f"the tracking server {self.tracker.uri} has not answered since {self.down_wall} ({gone:.0f} s, "
                f"past tracking.outage_report_s): training goes on, its metrics wait in {self.tail.path} and are "
                "sent when the server answers"
            )

    def _back(self, sent: int) -> None:
        gone = time.monotonic() - self.down_since
        if gone >= self.tracker.outage_report_s:
            note = f"server unreachable from {self.down_wall} for {gone:.0f} s; metrics sent late, none lost"
            self.say(f"the tracking server {self.tracker.uri} answers again after {gone:.0f} s: {sent} metric "
                     "values sent late, none lost")  # fmt: skip
            try:  # on the run, with the next batch if this one is already sent
                self.tracker.set_tags(self.run_id, {"tracking_outage": note})
            except Exception as exc:
                if not is_unreachable(exc):
                    raise
                self.outages.append(note)
        self.down_since, self.reported = None, False


SEND_THREADS = 8  # sends to a tracking server in flight at once (each a REST round trip of a few milliseconds)
# Sends per second the driver asks of a store at most: a send costs a team server about the same whatever it holds
# (~20 ms of CPU for a member's log_batch through the basic-auth app, bench/tracking_scale.py: 0.4 cores for 100
# trainings' 20 sends/s), so past SENDS_PER_S * FORWARD_EVERY trainings each one's batches go out less often and
# hold more, and one driver asks at most ~2 cores of a team's server. A server slower than this (one sharing its
# cores) sets the pace itself: the sends go out as fast as it answers them, the longest-waiting training first.
SENDS_PER_S = 100.0


def _oldest(fw: MetricsForwarder) -> float:
    """When the oldest record a forwarder holds for sending was written (records let go from memory: the oldest)."""
    return float("-inf") if fw.reread or not fw.pending else fw.pending[0].time


def poll_all(forwarders: Sequence[MetricsForwarder], min_interval: float, budget_s: float = 2.0) -> int:
    """:meth:`MetricsForwarder.poll` for every training a driver follows (one tracker): each reads its new records,
    and the trainings whose send is due (every ``min_interval`` seconds, or with more trainings than SENDS_PER_S *
    min_interval, every ``len(forwarders) / SENDS_PER_S``) send, the one whose oldest unsent record is oldest first,
    each reading its file again just before its send, for at most ``budget_s`` seconds (the driver's poll interval:
    its loop stays responsive, and the trainings not reached go first at the next call). So the sends go out as
    fast as the store answers them, and a training waits about ``len(forwarders)`` sends whatever the store's pace.
    To a tracking server they go SEND_THREADS at a time under one hold of the store's lock: one send is a round
    trip the driver would otherwise wait out (bench/tracking_scale.py). A local store takes them one at a time
    (SQLite has one writer). ``min_interval`` 0 sends everything pending now, with no time limit (the trainings have
    ended). Returns how many metric values were sent."""
    for fw in forwarders:
        fw.read()
    interval = max(min_interval, len(forwarders) / SENDS_PER_S) if min_interval > 0 else 0.0
    due = sorted((fw for fw in forwarders if fw.due(interval)), key=_oldest)
    if not due:
        return 0
    deadline = time.monotonic() + budget_s if min_interval > 0 else float("inf")

    def read_send(fw: MetricsForwarder) -> int:
        fw.read()  # what was written while it waited its turn goes too
        return fw.send()

    tracker = due[0].tracker
    assert all(fw.tracker is tracker for fw in due)
    if len(due) == 1 or is_local_store(tracker.uri):
        sent = 0
        for i, fw in enumerate(due):
            if i and time.monotonic() >= deadline:  # at least one send a call, whatever the budget
                break
            sent += read_send(fw)
        return sent
    sent, queue, running, fw = 0, iter(due), set(), None
    with tracker.locked(), ThreadPoolExecutor(SEND_THREADS, "gptlab-forward") as pool:
        while True:
            while len(running) < SEND_THREADS and (fw is None or time.monotonic() < deadline):
                fw = next(queue, None)
                if fw is None:
                    break
                running.add(pool.submit(tracker.on_behalf, functools.partial(read_send, fw)))
            if not running:
                return sent
            done, running = wait(running, return_when=FIRST_COMPLETED)
            sent += sum(f.result() for f in done)
