"""Tracking at scale: how many concurrent trainings one driver's metric forwarding keeps up with.

    python bench/tracking_scale.py [--quick] [--sizes 10,100,1000] [--seconds S] [--uri URI] [--json PATH]

N simulated trainings: writer processes append real ``llmcore.metrics`` records to N ``metrics.jsonl`` files at
a training's rate (a ``TrainLine`` with every field a CPU training writes every ``--every`` seconds, 2 by
default, and an ``EvalLine`` every tenth line), each file's first line at a random offset. This process is the
driver: it creates one MLflow run per training in a real store (SQLite under a temporary runs_root by default,
or ``--uri`` for a tracking server) and runs the driver's own forwarding (``workflows.tail.MetricsForwarder``,
polled every ``submit``'s poll interval, each run's batch sent every ``driver.FORWARD_EVERY`` seconds) for
``--seconds`` (60 by default), then once more at once. Figures per N: forwarding lag (a metric's timestamp, when
its line was written, to the moment its batch was committed to the store) p50 and p99, the driver's CPU
(its process CPU seconds over wall seconds: 1.0 is one core busy), lines written and sent, and the store's size.
SQLite's ceiling is the largest N whose p99 lag stays under 30 s with the driver under one core.
Results: bench/results/tracking_scale.json.
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import figure, parser, write_report

LAG_TARGET_S = 30.0

WRITER = r"""
import random, sys, time
from pathlib import Path
from llmcore.metrics import EvalLine, MetricsWriter, TrainLine
files, every, until, seed = sys.argv[1].split(","), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)
writers = [MetricsWriter(Path(f)) for f in files]
due = [time.time() + rng.uniform(0, every) for _ in files]
step = [0] * len(files)
while time.time() < until:
    now = time.time()
    for i, w in enumerate(writers):
        if due[i] <= now:
            step[i] += 10
            w.write(TrainLine(step=step[i], time=time.time(), loss=3.0 - step[i] * 1e-4, lr=3e-4, grad_norm=0.9,
                              tokens_per_sec=12345.0, tokens_seen=step[i] * 4096, elapsed_s=now))
            if step[i] % 100 == 0:
                w.write(EvalLine(step=step[i], time=time.time(), val_loss=3.1 - step[i] * 1e-4, elapsed_s=now))
            due[i] += every
    time.sleep(max(0.0, min(due) - time.time()))
for w in writers:
    w.close()
"""


def simulate(n: int, seconds: float, every: float, uri: str | None, tmp: Path) -> dict:
    import inspect

    from workflows import submit
    from workflows.driver import FORWARD_EVERY
    from workflows.store import Tracker, default_tracking_uri
    from workflows.tail import MetricsForwarder

    poll = float(inspect.signature(submit).parameters["poll_interval"].default)
    root = tmp / f"n{n}"
    root.mkdir()
    tracker = Tracker(uri or default_tracking_uri(root), f"scale-{n}-{int(time.time())}", root / "mlartifacts")
    lags: list[float] = []
    log_metrics = tracker.log_metrics

    def timed(run_id, metrics, tags=None):  # the moment a batch is committed is when its lines are visible
        log_metrics(run_id, metrics, tags)
        now = time.time()
        lags.extend(now - m.timestamp / 1000 for m in metrics if m.key == "train/loss")

    tracker.log_metrics = timed
    files = [root / f"t{i:05d}" / "metrics.jsonl" for i in range(n)]
    forwarders = []
    for i, f in enumerate(files):
        f.parent.mkdir()
        forwarders.append(MetricsForwarder(tracker, tracker.create_run(f"t{i:05d}", {"role": "sweep_point"}), f))
    until = time.time() + seconds
    procs = max(1, min(8, n // 50))
    chunks = [files[i::procs] for i in range(procs)]
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, ",".join(map(str, c)), str(every), str(until), str(i)],
                                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
               for i, c in enumerate(chunks)]  # fmt: skip
    cpu0, wall0 = time.process_time(), time.time()
    while time.time() < until:
        t0 = time.time()
        for fw in forwarders:
            fw.poll(FORWARD_EVERY)
        time.sleep(max(0.0, poll - (time.time() - t0)))
    for w in writers:
        w.wait()
    for fw in forwarders:  # the trainings have ended: the driver sends the rest at once
        fw.poll(0.0)
    cpu, wall = time.process_time() - cpu0, time.time() - wall0
    written = sum(1 for f in files for line in f.read_bytes().splitlines() if b'"train"' in line)
    store = root / "mlflow.db"
    lags.sort()
    return {
        "n": n, "seconds": wall, "lines_written": written, "lines_sent": len(lags),
        "lag_p50_s": statistics.median(lags) if lags else None,
        "lag_p99_s": lags[int(0.99 * (len(lags) - 1))] if lags else None,
        "driver_cpu_cores": cpu / wall, "store_mb": store.stat().st_size / 2**20 if store.exists() else None,
    }  # fmt: skip


def big_experiment(n: int, tmp: Path) -> dict:
    """``gptlab status`` and ``gptlab compare`` over an experiment of ``n`` finished sweep-point runs (each with
    its params, final metrics and a 10-point loss curve) in a SQLite store: seconds each."""
    from mlflow.entities import Metric, Param, RunTag

    from workflows.store import Tracker, default_tracking_uri

    root = tmp / f"big{n}"
    root.mkdir()
    tracker = Tracker(default_tracking_uri(root), "big", root / "mlartifacts")
    client, now = tracker.client, int(time.time() * 1000)
    parent = tracker.create_run("big", {"role": "parent", "spec_hash": "h"})
    client.log_batch(parent, params=[Param("sweep", "{train.lr: [...]}"), Param("swept", "[train.lr]")])
    t0 = time.time()
    for i in range(n):
        run = tracker.create_run(f"lr={i}", {"role": "sweep_point", "spec_hash": "h", "parent": parent})
        curve = [Metric(k, 3.0 - s / 100, now, s) for s in range(0, 100, 10) for k in ("train/loss", "val/loss")]
        client.log_batch(run, metrics=[*curve, Metric("val/bpb", 1.9 + i / n, now, 100)],
                         params=[Param("train.lr", str(i))], tags=[RunTag("mlflow.parentRunId", parent)])  # fmt: skip
        client.set_terminated(run, "FINISHED")
    made = time.time() - t0
    out = {"runs": n, "create_s": made}
    for command in (["status", "--runs-root", str(root)], ["compare", "--runs-root", str(root), "--out",
                                                              str(root / "report")]):  # fmt: skip
        t0 = time.time()
        r = subprocess.run([sys.executable, "-m", "workflows.cli", *command], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        out[f"{command[0]}_s"] = time.time() - t0
    return out


def main(argv: list[str] | None = None) -> int:
    p = parser("tracking_scale", __doc__)
    p.add_argument("--sizes", default=None, help="comma-separated N (default 10,100,1000; --quick: 10,50)")
    p.add_argument("--seconds", type=float, default=None, help="seconds each N runs (default 60; --quick: 15)")
    p.add_argument("--every", type=float, default=2.0, help="seconds between a training's lines")
    p.add_argument("--uri", default=None, help="a tracking server (default: a SQLite store per N)")
    p.add_argument("--experiment-runs", type=int, default=None, help="status/compare over this many runs "
                   "(default 2000; --quick: 100; 0: skip)")  # fmt: skip
    args = p.parse_args(argv)
    sizes = [int(x) for x in (args.sizes or ("10,50" if args.quick else "10,100,1000")).split(",")]
    seconds = args.seconds or (15.0 if args.quick else 60.0)
    random.seed(0)
    rows, figures = [], []
    with tempfile.TemporaryDirectory(prefix="gptlab-bench-scale-") as tmp:
        for n in sizes:
            r = simulate(n, seconds, args.every, args.uri, Path(tmp))
            rows.append(r)
            lines = f"{r['lines_sent']}/{r['lines_written']} lines"
            print(f"  N={n}: p50 {r['lag_p50_s']:.2f} s, p99 {r['lag_p99_s']:.2f} s, driver "
                  f"{r['driver_cpu_cores']:.2f} cores, {lines}", flush=True)  # fmt: skip
        big = args.experiment_runs if args.experiment_runs is not None else (100 if args.quick else 2000)
        listed = big_experiment(big, Path(tmp)) if big else None
    if listed:
        print(f"  {big} runs: status {listed['status_s']:.1f} s, compare {listed['compare_s']:.1f} s", flush=True)
        figures += [figure(f"gptlab status over {big} runs (SQLite)", listed["status_s"], "s"),
                    figure(f"gptlab compare over {big} runs (SQLite)", listed["compare_s"], "s")]  # fmt: skip
    store = "server" if args.uri else "SQLite"
    for r in rows:
        ok = r["lag_p99_s"] is not None and r["lag_p99_s"] < LAG_TARGET_S and r["driver_cpu_cores"] < 1.0
        figures += [
            figure(f"{store}, N={r['n']}: forwarding lag p50", r["lag_p50_s"], "s"),
            figure(f"{store}, N={r['n']}: forwarding lag p99", r["lag_p99_s"], "s", f"< {LAG_TARGET_S:g} s", ok),
            figure(f"{store}, N={r['n']}: driver CPU (cores)", r["driver_cpu_cores"], "cores", "< 1"),
            figure(f"{store}, N={r['n']}: lines sent / written", r["lines_sent"], f"of {r['lines_written']}"),
        ]
        if r["store_mb"] is not None:
            figures.append(figure(f"{store}, N={r['n']}: store size", r["store_mb"], "MiB"))
    ceiling = max((r["n"] for r in rows if r["lag_p99_s"] is not None and r["lag_p99_s"] < LAG_TARGET_S
                   and r["driver_cpu_cores"] < 1.0), default=0)  # fmt: skip
    figures.append(figure(f"{store}: the largest N measured within the target", ceiling, "trainings"))
    details = {"rows": rows, "every_s": args.every, "seconds": seconds, "experiment": listed}
    write_report("tracking_scale", args, figures, details)
    return 0


if __name__ == "__main__":
    sys.exit(main())
