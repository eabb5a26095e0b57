"""Early stopping: the full grid against ASHA on the same 16-configuration space, the quickstart model.

    python bench/search.py [--quick] [--json PATH]        (from the repository root)

The space is specs/quickstart.yaml's model (learned positions) over ``train.lr`` x ``train.warmup_steps`` (4 x 4 =
16 points; --quick: 2 x 2 and 60 steps). Both sides run through ``gptlab submit`` (the Python API), one training
at a time (``site.max_workers: 1``), each in a runs_root of its own holding the same committed tokenizer and shards
(built once beforehand), so neither reuses the other's trainings. ASHA is ``sweep.prune: {min_steps: 25,
reduction_factor: 3}`` (rungs at 25, 75 and 225 steps of 250; validation estimates every 25 steps).

Figures: the total training seconds of each side (the trainings' own ``summary.json`` seconds, pruned ones
included), the best final val/bpb each found, and their ratios. Target (issue 17): ASHA's best within 1% of the
grid's for at most 40% of the grid's training time. Results: bench/results/search.json.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from common import copy_data_stages, figure, parser, prepare_data_stages, quickstart_tree, write_report, write_spec

LRS = [3e-4, 1e-3, 3e-3, 1e-2]
WARMUPS = [0, 25, 75, 125]
QUICK = ["data.sources.0.max_bytes=1000000", "tokenizer.vocab_size=512", "train.max_steps=60",
         "train.eval_interval=10", "train.checkpoint_interval=60", "eval.batches=4"]  # fmt: skip


def tree_for(root: Path, quick: bool, prune: bool) -> dict:
    tree = quickstart_tree(root / "runs", QUICK if quick else [])
    lrs, warmups = (LRS[1:3], WARMUPS[:2]) if quick else (LRS, WARMUPS)
    tree["sweep"] = {"train.lr": lrs, "train.warmup_steps": warmups}
    tree["train"]["min_lr"] = 1e-5
    tree["train"]["eval_interval"] = 10 if quick else 25
    tree["site"] = {"max_workers": 1}
    if prune:
        tree["sweep"]["prune"] = {"min_steps": 10 if quick else 25, "reduction_factor": 3}
    return tree


def training_seconds(runs_root: Path) -> tuple[float, int, int]:
    """(training seconds over every train stage, trainings, pruned ones) from their summary.json."""
    total, n, stopped = 0.0, 0, 0
    for summary in (runs_root / "stages").glob("train-*/summary.json"):
        s = json.loads(summary.read_text())
        total += s["seconds"]
        n += 1
        stopped += bool(s.get("stop_reason"))
    return total, n, stopped


def side(root: Path, quick: bool, prune: bool, data_plan) -> dict:
    from workflows import submit

    spec = write_spec(root / ("asha.yaml" if prune else "grid.yaml"), tree_for(root, quick, prune))
    copy_data_stages(data_plan, root / "runs")
    t0 = time.perf_counter()
    result = submit(spec, quiet=True, poll_interval=0.5)
    wall = time.perf_counter() - t0
    assert result.ok, [r.error for r in result.runs]
    finished = [r for r in result.runs if r.status == "FINISHED"]
    best = min(finished, key=lambda r: r.metrics["val/bpb"])
    seconds, trainings, pruned = training_seconds(root / "runs")
    return {"wall_s": wall, "train_s": seconds, "trainings": trainings, "pruned": pruned,
            "best": best.name, "best_bpb": best.metrics["val/bpb"],
            "bpb": {r.name: r.metrics.get("val/bpb") for r in result.runs}}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = parser("search", __doc__)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gptlab-bench-search-") as tmp:
        root = Path(tmp)
        data = prepare_data_stages(write_spec(root / "data.yaml", tree_for(root / "data", args.quick, False)))
        grid = side(root / "grid", args.quick, False, data)
        print(f"  grid: {grid['trainings']} trainings, {grid['train_s']:.0f} s, best {grid['best']} "
              f"{grid['best_bpb']:.4f}", flush=True)  # fmt: skip
        asha = side(root / "asha", args.quick, True, data)
        print(f"  asha: {asha['trainings']} trainings ({asha['pruned']} pruned), {asha['train_s']:.0f} s, best "
              f"{asha['best']} {asha['best_bpb']:.4f}", flush=True)  # fmt: skip
    time_ratio = asha["train_s"] / grid["train_s"]
    gap = 100 * (asha["best_bpb"] - grid["best_bpb"]) / grid["best_bpb"]
    met = None if args.quick else time_ratio <= 0.40 and gap <= 1.0
    figures = [
        figure("grid: training seconds", grid["train_s"], "s"),
        figure("ASHA: training seconds", asha["train_s"], "s"),
        figure("ASHA / grid training time", 100 * time_ratio, "%", "<= 40%", None if args.quick else time_ratio <= 0.4),
        figure("grid: best val/bpb", grid["best_bpb"], "bpb"),
        figure("ASHA: best val/bpb", asha["best_bpb"], "bpb"),
        figure("ASHA best above the grid's", gap, "%", "<= 1%", None if args.quick else gap <= 1.0),
        figure("ASHA: trainings pruned", asha["pruned"], f"of {asha['trainings']}"),
    ]
    write_report("search", args, figures, {"grid": grid, "asha": asha, "met": met})
    return 0


if __name__ == "__main__":
    sys.exit(main())
