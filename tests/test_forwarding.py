"""The driver's metric forwarding at scale (issue 22): many trainings' sends go out together (``poll_all``), and a
forwarder alone with its store does not read its run's tags again before every send, while two drivers forwarding
one file (each with its own tracker, as two submits of one spec) still send every step exactly once.

Figures (lag, CPU, store size for 10 to 1,000 trainings) come from ``bench/tracking_scale.py``, not from here."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from mlflow.tracking import MlflowClient
from test_tracking_server import server  # noqa: F401 (a fixture: a real mlflow server on loopback)

from workflows.store import Tracker
from workflows.tail import MetricsForwarder, poll_all


def append_steps(path: Path, steps: range) -> None:
    with path.open("a") as f:
        for s in steps:
            f.write(json.dumps({"kind": "train", "step": s, "time": 1e9 + s, "loss": 1.0 / s, "lr": 1e-3}) + "\n")


def count_reads(tracker: Tracker) -> Counter:
    """Count the forwarder's reads of a run's tags (``client.get_run``) through this tracker."""
    calls: Counter = Counter()
    get_run = tracker.client.get_run

    def counted(run_id):
        calls[run_id] += 1
        return get_run(run_id)

    tracker.client.get_run = counted
    return calls


def steps_in_mlflow(uri: str, run: str) -> Counter:
    return Counter(m.step for m in MlflowClient(uri).get_metric_history(run, "train/loss"))


def test_two_drivers_forwarding_one_file_send_each_step_once_and_one_alone_reads_its_tags_once(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    a, b = (Tracker(uri, "fw", tmp_path / "mlartifacts") for _ in range(2))  # two drivers, one store
    run = a.create_run("r", {"role": "sweep_point"})
    path = tmp_path / "metrics.jsonl"
    reads = count_reads(a)
    fa = MetricsForwarder(a, run, path)
    for start in range(1, 50, 7):  # alone: each send is answered and nobody else takes the lock
        append_steps(path, range(start, start + 7))
        assert fa.poll() == 14
    assert reads[run] == 1  # when made, under the store's lock; never again while nobody else takes the lock
    fb = MetricsForwarder(b, run, path)
    for i, fw in enumerate((fb, fa, fb, fa, fb)):  # turns: each must see what the other sent in between
        append_steps(path, range(50 + 10 * i, 60 + 10 * i))
        assert fw.poll() == 20
    assert steps_in_mlflow(uri, run) == Counter(range(1, 100))


def test_poll_all_sends_many_trainings_together_to_a_server_each_step_once(server, tmp_path):  # noqa: F811
    tracker = Tracker(server["uri"], "poll-all", tmp_path / "mlartifacts")
    runs = [tracker.create_run(f"t{i}", {"role": "sweep_point"}) for i in range(24)]
    paths = [tmp_path / f"t{i}.jsonl" for i in range(24)]
    forwarders = [MetricsForwarder(tracker, r, p) for r, p in zip(runs, paths)]
    reads = count_reads(tracker)
    for start in range(1, 40, 13):  # three rounds, each run with new lines
        for p in paths:
            append_steps(p, range(start, start + 13))
        assert poll_all(forwarders, 0.0) == 24 * 13 * 2  # train/loss and train/lr of every line
    assert sum(reads.values()) == 0  # read once when made, under the store's lock; never again while alone
    for r in runs:
        assert steps_in_mlflow(tracker.uri, r) == Counter(range(1, 40))


def test_a_backlog_past_mlflows_limit_of_a_call_goes_in_batches_each_with_its_tags(server, tmp_path):  # noqa: F811
    """After an outage a training's backlog is thousands of values: each call carries at most 1000 metrics and
    tags together (the server's limit), its forwarded.* tags included."""
    uri = server["uri"]
    tracker = Tracker(uri, "backlog", tmp_path / "mlartifacts")
    run = tracker.create_run("r", {"role": "sweep_point"})
    path = tmp_path / "metrics.jsonl"
    append_steps(path, range(1, 1501))  # 3000 values
    with path.open("a") as f:
        f.writelines(
            json.dumps({"kind": "eval", "step": s, "time": 1e9 + s, "val_loss": 1.0}) + "\n" for s in (500, 1000)
        )
    assert MetricsForwarder(tracker, run, path).poll() == 3002
    assert steps_in_mlflow(uri, run) == Counter(range(1, 1501))
    tags = MlflowClient(uri).get_run(run).data.tags
    assert (tags["gptlab.forwarded.train"], tags["gptlab.forwarded.eval"]) == ("1500", "1000")


def test_the_longest_waiting_training_sends_first_and_a_call_keeps_to_its_time(server, tmp_path):  # noqa: F811
    """A store slower than the trainings' lines (a thousand trainings on a shared server) sets the pace: each call
    sends for at most its budget (at least one send), the training whose oldest unsent line is oldest first, and
    the ones not reached go first at the next call; so no training waits more than its turn."""
    for uri in (f"sqlite:///{tmp_path / 'mlflow.db'}", server["uri"]):  # one writer at a time; sends in flight
        tracker = Tracker(uri, "oldest-first", tmp_path / "mlartifacts")
        runs = [tracker.create_run(f"t{i}", {"role": "sweep_point"}) for i in range(6)]
        forwarders = []
        for i, (run, age) in enumerate(zip(runs, (30, 50, 10, 60, 20, 40))):  # seconds since the first line
            path = tmp_path / f"{i}-{uri[:4]}.jsonl"
            with path.open("a") as f:
                f.write(json.dumps({"kind": "train", "step": 1, "time": 1e9 - age, "loss": 1.0, "lr": 1e-3}) + "\n")
            forwarders.append(MetricsForwarder(tracker, run, path))
        order = []
        for _ in range(6):
            assert poll_all(forwarders, 5.0, budget_s=0.0) == 2  # its time is up after one send
            order += [i for i, fw in enumerate(forwarders) if not fw.pending and i not in order]
        assert order == [3, 1, 5, 0, 4, 2]  # the oldest unsent line first
        assert all(steps_in_mlflow(uri, r) == Counter([1]) for r in runs)
