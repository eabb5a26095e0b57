"""Tracking benchmark: what per-step metric forwarding to MLflow costs, as a fraction of training time.

    python bench/tracking.py [--quick] [--repeats R] [--json PATH]        (from the repository root)

The same training, ``python -m llmcore.train`` on the quickstart model with ``train.log_interval: 1`` (a
metrics line every step; 100 steps, --quick: 20), is run without tracking and with it, alternating which goes
first in every round. With tracking, this process does what the driver does while a training runs: a
``MetricsForwarder`` polls the training's ``metrics.jsonl`` every ``poll_interval`` seconds (the driver's
default) and logs the new lines in batches to a child run in a real MLflow SQLite store, then polls once more
when the training has exited. Figures (medians over the rounds): wall time without and with tracking,
overhead = (with - without) / without (target <= 1%), and the CPU time the forwarding used over the training's
wall time (inside ``poll``, and all the CPU this process used more than during a plain training, MLflow's
background threads included): the part of the overhead that does not depend on how noisy the machine is.
Results: bench/results/tracking.json.
"""

from __future__ import annotations

import inspect
import statistics
import tempfile
import time
from pathlib import Path

from common import (
    figure,
    interleaved,
    parser,
    prepare_data_stages,
    quickstart_tree,
    ratio_pct,
    run_logged,
    train_cmd,
    write_report,
    write_spec,
)

from workflows.driver import FORWARD_EVERY  # common put this checkout first on sys.path
from workflows.stages import SHARDS

TARGET_PCT = 1.0


def driver_poll_interval() -> float:
    from workflows import submit

    return float(inspect.signature(submit).parameters["poll_interval"].default)


class Trainings:
    """One training per call, in a fresh directory, with or without a forwarder on its metrics."""

    def __init__(self, tmp: Path, plan, poll_interval: float):
        from workflows.stages import write_train_config
        from workflows.store import Tracker, default_tracking_uri

        self.tmp, self.plan, self.poll_interval = tmp, plan, poll_interval
        self.run = plan.runs[0]
        self.stage = self.run.training
        self.stage.dir.mkdir(parents=True, exist_ok=True)
        write_train_config(
            self.stage.dir, self.stage.config, self.stage.runtime
        )  # the exact train.json a submit writes
        self.tracker = Tracker(default_tracking_uri(tmp / "store"), "bench-tracking", tmp / "store" / "mlartifacts")
        self.forward_cpu: list[float] = []  # CPU seconds inside MetricsForwarder.poll, per tracked training
        self.bench_cpu: dict[str, list[float]] = {}  # "plain" / "tracked" -> this process's CPU seconds per training
        self.metrics_sent: list[int] = []
        self.polls: list[int] = []

    def _train(self, name: str, while_running=None) -> tuple[float, Path]:
        """Run one training; returns its wall seconds and records this process's CPU seconds meanwhile (all
        threads: MLflow's own background threads count too)."""
        out = self.tmp / name
        cmd = train_cmd(self.stage.dir / "train.json", self.run.stage_of(SHARDS).dir, out)
        c0 = time.process_time()
        seconds = run_logged(cmd, self.tmp / f"{name}.log", while_running=while_running).seconds
        self.bench_cpu.setdefault(name.rstrip("0123456789"), []).append(time.process_time() - c0)
        return seconds, out

    def without(self, r: int) -> float:
        return self._train(f"plain{r}")[0]

    def with_tracking(self, r: int) -> float:
        from workflows.tail import MetricsForwarder

        run_id, _ = self.tracker.start_run(f"round{r}", {"role": "sweep_point", "run_hash": f"bench{r}"})
        out = self.tmp / f"tracked{r}"
        fw = MetricsForwarder(self.tracker, run_id, out / "metrics.jsonl")
        state = {"next": time.perf_counter() + self.poll_interval, "cpu": 0.0, "sent": 0, "polls": 0}

        def poll(min_interval: float = 0.0) -> None:
            c0 = time.process_time()
            state["sent"] += fw.poll(min_interval)
            state["cpu"] += time.process_time() - c0
            state["polls"] += 1

        def maybe_poll() -> None:
            if time.perf_counter() >= state["next"]:
                poll(FORWARD_EVERY)  # as the driver: reads every poll, sends every FORWARD_EVERY seconds
                state["next"] = time.perf_counter() + self.poll_interval

        seconds, _ = self._train(f"tracked{r}", maybe_poll)
        t0 = time.perf_counter()
        poll()  # the driver forwards what is left once the training has exited
        seconds += time.perf_counter() - t0
        self.tracker.finish(run_id, True)
        self.forward_cpu.append(state["cpu"])
        self.metrics_sent.append(state["sent"])
        self.polls.append(state["polls"])
        return seconds


def main(argv: list[str] | None = None) -> int:
    p = parser("tracking", __doc__)
    p.add_argument("--repeats", type=int, default=None, help="rounds of each case (default 3; --quick: 1)")
    args = p.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    steps = 20 if args.quick else 100
    overrides = [
        "sweep={}",
        "train.log_interval=1",
        f"train.max_steps={steps}",
        "train.warmup_steps=5",
        f"train.eval_interval={steps}",
        f"train.checkpoint_interval={steps}",
    ]
    if args.quick:
        overrides += ["data.sources.0.max_bytes=1000000", "tokenizer.vocab_size=512"]
    interval = driver_poll_interval()
    with tempfile.TemporaryDirectory(prefix="gptlab-bench-track-") as tmp:
        tmp = Path(tmp)
        print("  building the tokenizer and shards once (untimed) ...", flush=True)
        plan = prepare_data_stages(write_spec(tmp / "spec.yaml", quickstart_tree(tmp / "runs", overrides)))
        t = Trainings(tmp, plan, interval)
        times = interleaved({"without tracking": t.without, "with tracking": t.with_tracking}, repeats)
    without, with_ = statistics.median(times["without tracking"]), statistics.median(times["with tracking"])
    overhead = ratio_pct(with_, without)
    cpu_share = 100 * statistics.median(c / s for c, s in zip(t.forward_cpu, times["with tracking"]))
    # the same, counting everything tracking adds to this process (MLflow's background threads too): CPU seconds
    # of this process during a tracked training minus during a plain one (both poll the subprocess alike)
    extra_cpu = statistics.median(t.bench_cpu["tracked"]) - statistics.median(t.bench_cpu["plain"])
    all_share = 100 * extra_cpu / with_
    full = not args.quick  # a --quick run has no verdicts: 20 steps are too few to show a 1% cost
    figures = [
        figure(f"training, {steps} steps, log_interval 1, no tracking", without, "s"),
        figure(f"the same, read every {interval:g} s, sent to MLflow (SQLite) every {FORWARD_EVERY:g} s", with_, "s"),
        figure(
            "tracking overhead (wall time)",
            overhead,
            "%",
            f"<= {TARGET_PCT:g}%",
            overhead <= TARGET_PCT if full else None,
        ),
        figure(
            "forwarding CPU time / training wall time",
            cpu_share,
            "%",
            f"<= {TARGET_PCT:g}%",
            cpu_share <= TARGET_PCT if full else None,
        ),
        figure(
            "  all CPU time tracking adds to the driver / training wall time",
            all_share,
            "%",
            f"<= {TARGET_PCT:g}%",
            all_share <= TARGET_PCT if full else None,
        ),
        figure("metric values forwarded per training", statistics.median(t.metrics_sent), "values"),
    ]
    details = {
        "steps": steps,
        "poll_interval_s": interval,
        "repeats": repeats,
        "seconds": times,
        "forward_cpu_s": t.forward_cpu,
        "driver_process_cpu_s": t.bench_cpu,
        "metrics_sent": t.metrics_sent,
        "polls": t.polls,
    }
    write_report("tracking", args, figures, details)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
