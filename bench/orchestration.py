"""Orchestration benchmark: the quickstart's trainings and evaluations launched by hand vs through
``gptlab submit`` with tracking on; overhead = (submit wall time - direct wall time) / direct wall time.

    python bench/orchestration.py [--quick] [--repeats R] [--json PATH]        (from the repository root)

Both sides do the same work on the same inputs: specs/quickstart.yaml (two sweep points, 250 steps each; --quick:
one point, a 1 MB corpus, 512 tokens, 10 steps) with ``site.max_workers: 1``, so the submit runs its two points
one after the other, as the direct side does. The tokenizer and shards stages are built once beforehand and are the same
directories for both sides.

- direct: for each sweep point, ``python -m llmcore.train`` on the train.json the driver would write (same
  OMP_NUM_THREADS as the site gives training), then ``python -m llmcore.evaluate`` on its checkpoint with the
  point's eval settings. Four interpreter starts, no tracking.
- submit: ``python -m workflows.cli submit SPEC --quiet`` (the ``gptlab`` command) on a fresh runs_root holding
  copies of the tokenizer and shards stages and an MLflow SQLite store already created (as after a first
  submit; creating one is timed separately): validation, planning, MLflow parent and child runs with every
  parameter, Parsl, both trainings as bash apps, metric forwarding every 2 s, evaluation in a Parsl worker
  thread, artifacts (spec, tokenizer, eval, samples, loss-curve plot, final weights).

Rounds alternate which side goes first. Figures: medians, overhead % (target <= 5%) and fixed seconds (target
< 10 s), from the wall times and, less noisy on a shared machine, from the time each side spends outside the
training loops themselves (wall time minus the trainings' own ``summary.json`` seconds).
Results: bench/results/orchestration.json.
"""

from __future__ import annotations

import dataclasses
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import (
    copy_data_stages,
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

OVERHEAD_TARGET_PCT = 5.0
FIXED_TARGET_S = 10.0
QUICK = [
    "sweep={}",
    "data.sources.0.max_bytes=1000000",
    "tokenizer.vocab_size=512",
    "train.max_steps=10",
    "train.warmup_steps=2",
    "train.eval_interval=10",
    "train.checkpoint_interval=10",
    "eval.batches=4",
    "eval.max_new_tokens=20",
]


def new_store(runs_root: Path, experiment: str) -> float:
    """Create the MLflow SQLite store a submit on ``runs_root`` uses; returns the seconds it took."""
    from workflows.store import Tracker, default_tracking_uri

    t0 = time.perf_counter()
    Tracker(default_tracking_uri(runs_root), experiment, runs_root / "mlartifacts")
    return time.perf_counter() - t0


class Sides:
    """The two ways of running the same plan; each call runs one round in a fresh directory."""

    def __init__(self, tmp: Path, tree: dict, plan):
        from site_configs import build_site

        self.tmp, self.tree, self.plan = tmp, tree, plan
        trains = [r.spec.train for r in plan.runs]
        self.train_env = build_site(plan.spec.site, tmp / "parsl-probe", trains, len(trains)).train_env
        self.store_seconds: list[float] = []
        self.train_seconds: dict[str, list[float]] = {"direct": [], "submit": []}

    def direct(self, r: int) -> float:
        from llmcore.io import atomic_write_json
        from workflows.stages import EVAL, SHARDS, TOKENIZER, write_train_config

        root = self.tmp / f"direct{r}"
        todo = []
        for run in self.plan.runs:
            train = dataclasses.replace(run.training, dir=root / run.training.dir.name)
            train.dir.mkdir(parents=True)
            write_train_config(train.dir, train.config, train.runtime)  # the exact train.json a submit writes
            evaluation = run.stage_of(EVAL)
            eval_dir = root / evaluation.dir.name
            atomic_write_json(eval_dir / "eval_config.json", evaluation.config["eval"])
            shards, tok = run.stage_of(SHARDS).dir, run.stage_of(TOKENIZER).dir / "tokenizer.model"
            evaluate = [
                sys.executable,
                "-m",
                "llmcore.evaluate",
                "--train-dir",
                str(train.dir),
                "--shards",
                str(shards),
                "--tokenizer",
                str(tok),
                "--out",
                str(eval_dir),
                "--config",
                str(eval_dir / "eval_config.json"),
                "--seed",
                str(run.spec.seed),
                "--device",
                run.spec.train.device,
            ]
            todo.append((train_cmd(train.dir / "train.json", shards, train.dir), evaluate, train.dir))
        t0 = time.perf_counter()
        for train, evaluate, out in todo:
            run_logged(train, out / "train.log", env=self.train_env)
            run_logged(evaluate, out / "eval.log")
        seconds = time.perf_counter() - t0
        self._training_seconds("direct", [out for _, _, out in todo])
        return seconds

    def submit(self, r: int) -> float:
        root = self.tmp / f"submit{r}"
        copy_data_stages(self.plan, root)
        self.store_seconds.append(new_store(root, self.plan.spec.name))
        spec = write_spec(self.tmp / f"submit{r}.yaml", {**self.tree, "runs_root": str(root)})
        seconds = run_logged(
            [sys.executable, "-m", "workflows.cli", "submit", str(spec), "--quiet"], root / "submit.log"
        ).seconds
        self._training_seconds("submit", [root / "stages" / r.training.dir.name for r in self.plan.runs])
        return seconds

    def _training_seconds(self, side: str, train_dirs: list[Path]) -> None:
        from llmcore.io import read_json

        self.train_seconds[side].append(sum(read_json(d / "summary.json")["seconds"] for d in train_dirs))


def main(argv: list[str] | None = None) -> int:
    p = parser("orchestration", __doc__)
    p.add_argument("--repeats", type=int, default=None, help="rounds of each side (default 1)")
    args = p.parse_args(argv)
    repeats = args.repeats or 1
    with tempfile.TemporaryDirectory(prefix="gptlab-bench-orch-") as tmp:
        tmp = Path(tmp)
        tree = quickstart_tree(tmp / "base", ["site.max_workers=1", *(QUICK if args.quick else [])])
        print("  building the tokenizer and shards once (untimed) ...", flush=True)
        plan = prepare_data_stages(write_spec(tmp / "base.yaml", tree))
        sides = Sides(tmp, tree, plan)
        times = interleaved({"direct": sides.direct, "submit": sides.submit}, repeats)
        shutil.rmtree(tmp / "parsl-probe", ignore_errors=True)
    direct, submit = statistics.median(times["direct"]), statistics.median(times["submit"])
    overhead, fixed = ratio_pct(submit, direct), submit - direct
    # Everything but the training loops (a training's own summary.json seconds), per round: on a shared machine
    # the loops' speed swings by far more than the orchestration costs, and both sides run the same loops.
    outside = {side: statistics.median(w - t for w, t in zip(times[side], sides.train_seconds[side])) for side in times}
    fixed_outside = outside["submit"] - outside["direct"]
    full = not args.quick
    figures = [
        figure(f"direct: {len(plan.runs)} x (train + evaluate)", direct, "s"),
        figure("gptlab submit, tracking on", submit, "s"),
        figure(
            "orchestration overhead (wall times)",
            overhead,
            "%",
            f"<= {OVERHEAD_TARGET_PCT:g}%",
            overhead <= OVERHEAD_TARGET_PCT if full else None,
        ),
        figure("orchestration fixed cost (wall times)", fixed, "s", f"< {FIXED_TARGET_S:g} s", fixed < FIXED_TARGET_S),
        figure("  direct, outside the training loops", outside["direct"], "s"),
        figure("  submit, outside the training loops", outside["submit"], "s"),
        figure(
            "orchestration fixed cost, outside the training loops",
            fixed_outside,
            "s",
            f"< {FIXED_TARGET_S:g} s",
            fixed_outside < FIXED_TARGET_S,
        ),
        figure(
            "  as overhead on the direct wall time",
            100 * fixed_outside / direct,
            "%",
            f"<= {OVERHEAD_TARGET_PCT:g}%",
            100 * fixed_outside / direct <= OVERHEAD_TARGET_PCT if full else None,
        ),
        figure(
            "creating a new MLflow store (first submit only; not in the above)",
            statistics.median(sides.store_seconds),
            "s",
        ),
    ]
    details = {
        "runs": [r.name for r in plan.runs],
        "repeats": repeats,
        "seconds": times,
        "training_loop_seconds": sides.train_seconds,
        "store_creation_seconds": sides.store_seconds,
        "train_env": sides.train_env,
        "overrides": ["site.max_workers=1", *(QUICK if args.quick else [])],
    }
    write_report("orchestration", args, figures, details)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
