"""Early stopping: the full grid against ASHA on the same 16-configuration space, the quickstart model.

    python bench/search.py [--quick] [--json PATH]        (from the repository root)

The space is specs/quickstart.yaml's model (learned positions) over ``train.lr`` x ``train.warmup_steps`` (4 x 4 =
16 points; --quick: 2 x 2 and 60 steps). Both sides run through ``gptlab submit`` (the Python API), one training
at a time (``site.max_workers: 1``), each in a runs_root of its own holding the same committed tokenizer and shards
(built once beforehand), so neither reuses the other's trainings. ASHA is ``sweep.prune: {min_steps: 25,
reduction_factor: 3}`` (rungs at 25, 75 and 225 steps of 250; validation estimates every 25 steps).

Figures: the total training seconds of each side (the trainings' own ``summary.json`` seconds, pruned ones
included), the best final val/bpb each found, and their ratios. Target (issue 17): ASHA's best within 1% of the
grid's for at most 40% of the grid's training time.

Replay: with one training at a time, what ASHA prunes depends on the order the points come in (a point is promoted
past a rung while fewer than ``reduction_factor`` others reached it only if it is the best there so far). So the
grid's measured validation curves (the estimates the driver reports) are replayed through the same Optuna pruner,
one trial at a time, in the grid's order (which must give the measured ASHA side's steps: the check that the
replay is faithful), in reverse and in 100 seeded random orders; figures: steps trained over the grid's, and how
often the best point found is within 1% of the grid's best val/bpb. Results: bench/results/search.json.
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


def tree_for(root: Path, quick: bool, prune: bool | str) -> dict:
    tree = quickstart_tree(root / "runs", QUICK if quick else [])
    lrs, warmups = (LRS[1:3], WARMUPS[:2]) if quick else (LRS, WARMUPS)
    tree["sweep"] = {"train.lr": lrs, "train.warmup_steps": warmups}
    tree["train"]["min_lr"] = 1e-5
    tree["train"]["eval_interval"] = 10 if quick else 25
    tree["site"] = {"max_workers": 1}
    if prune:
        tree["sweep"]["prune"] = {"min_steps": 10 if quick else 25, "reduction_factor": 3}
        if prune == "sha":
            tree["sweep"]["prune"]["method"] = "sha"
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


def curves(runs_root: Path, lrs: list[float], warmups: list[int]) -> list[list[tuple[int, float]]]:
    """The validation estimates (step, loss) of each grid training, in the grid's order (lr major)."""
    from llmcore.metrics import EvalLine, read_metrics

    found = {}
    for stage in (runs_root / "stages").glob("train-*"):
        train = json.loads((stage / "config.json").read_text())["train"]
        evals = [(r.step, r.val_loss) for r in read_metrics(stage / "metrics.jsonl") if isinstance(r, EvalLine)]
        found[(train["lr"], train["warmup_steps"])] = evals
    return [found[(lr, w)] for lr in lrs for w in warmups]


def replay(evals: list[list[tuple[int, float]]], order: list[int], prune: dict, max_steps: int) -> tuple[float, int]:
    """Optuna's successive-halving pruner over measured curves, one trial at a time in ``order``: (steps trained
    over the grid's steps, index of the best trial that ran to the end, by its last estimate)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=prune["min_steps"],
                                                    reduction_factor=prune["reduction_factor"])  # fmt: skip
    study, steps, finished = optuna.create_study(pruner=pruner), 0, {}
    for i in order:
        trial, stop = study.ask(), max_steps
        for step, loss in evals[i]:
            trial.report(loss, step)
            if trial.should_prune():
                stop = step
                break
        if stop == max_steps:
            study.tell(trial, evals[i][-1][1])
            finished[i] = evals[i][-1][1]
        else:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        steps += stop
    return steps / (len(order) * max_steps), min(finished, key=finished.get)


def replay_sha(
    evals: list[list[tuple[int, float]]], order: list[int], prune: dict, max_steps: int
) -> tuple[float, int]:
    """Synchronous successive halving (workflows.rungs.Halving, the driver's own decisions) over the measured
    curves, the points given in ``order``: (steps trained over the grid's steps, index of the point it trains to
    the end)."""
    import tempfile

    from workflows.rungs import Halving, Journal, rung_steps

    rungs = rung_steps(prune["min_steps"], prune["reduction_factor"], max_steps)
    with tempfile.TemporaryDirectory() as tmp:
        names = [f"p{i:02d}" for i in order]
        h = Halving(names, rungs, prune["reduction_factor"], Journal(Path(tmp) / "j.jsonl"))
        while h.decide({n: dict(evals[int(n[1:])])[h.target(n)] for n in h.live() if h.target(n) is not None}):
            pass
    steps = sum(rungs[h.pruned[n]] if n in h.pruned else max_steps for n in names)
    (winner,) = [int(n[1:]) for n in names if n not in h.pruned]
    return steps / (len(order) * max_steps), winner


def replays(runs_root: Path, quick: bool, points: list[list[float]]) -> dict:
    """The replay figures: grid order, reversed, 100 seeded random orders (``points``: [lr, warmup, val/bpb])."""
    import random

    tree = tree_for(runs_root, quick, True)
    lrs, warmups = tree["sweep"]["train.lr"], tree["sweep"]["train.warmup_steps"]
    evals, prune, max_steps = curves(runs_root, lrs, warmups), tree["sweep"]["prune"], tree["train"]["max_steps"]
    bpb = {(lr, w): v for lr, w, v in points}
    grid_bpb = [bpb[(lr, w)] for lr in lrs for w in warmups]
    best = min(grid_bpb)

    def within(i: int) -> bool:
        return grid_bpb[i] <= 1.01 * best

    n = len(evals)
    grid_order, reverse = replay(evals, list(range(n)), prune, max_steps), replay(evals, list(range(n))[::-1], prune,
                                                                                   max_steps)  # fmt: skip
    rng = random.Random(0)
    shuffled = [replay(evals, rng.sample(range(n), n), prune, max_steps) for _ in range(100)]
    fractions = sorted(f for f, _ in shuffled)
    sha_orders = [list(range(n)), list(range(n))[::-1], *(random.Random(s).sample(range(n), n) for s in range(20))]
    sha = [replay_sha(evals, order, prune, max_steps) for order in sha_orders]
    return {"grid_order": grid_order[0], "grid_order_best_within_1pct": within(grid_order[1]),
            "reverse": reverse[0], "reverse_best_within_1pct": within(reverse[1]),
            "random_mean": sum(fractions) / len(fractions), "random_median": fractions[len(fractions) // 2],
            "random_share_at_most_40pct": sum(f <= 0.40 for f in fractions) / len(fractions),
            "random_share_best_within_1pct": sum(within(b) for _, b in shuffled) / len(shuffled),
            "random_share_both": sum(f <= 0.40 and within(b) for f, b in shuffled) / len(shuffled),
            "sha_fractions": sorted({f for f, _ in sha}), "sha_best_within_1pct": [within(b) for _, b in sha],
            "sha_is_the_grids_best": all(grid_bpb[b] == best for _, b in sha)}  # fmt: skip


def side(root: Path, quick: bool, prune: bool | str, data_plan) -> dict:
    from workflows import submit

    name = {False: "grid", True: "asha", "sha": "sha"}[prune]
    spec = write_spec(root / f"{name}.yaml", tree_for(root, quick, prune))
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
            "bpb": {r.name: r.metrics.get("val/bpb") for r in result.runs},
            "points": [[r.point["train.lr"], r.point["train.warmup_steps"], r.metrics.get("val/bpb")]
                       for r in result.runs]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = parser("search", __doc__)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gptlab-bench-search-") as tmp:
        root = Path(tmp)
        data = prepare_data_stages(write_spec(root / "data.yaml", tree_for(root / "data", args.quick, False)))
        grid = side(root / "grid", args.quick, False, data)
        print(f"  grid: {grid['trainings']} trainings, {grid['train_s']:.0f} s, best {grid['best']} "
              f"{grid['best_bpb']:.4f}", flush=True)  # fmt: skip
        replayed = replays(root / "grid" / "runs", args.quick, grid["points"])
        asha = side(root / "asha", args.quick, True, data)
        print(f"  asha: {asha['trainings']} trainings ({asha['pruned']} pruned), {asha['train_s']:.0f} s, best "
              f"{asha['best']} {asha['best_bpb']:.4f}", flush=True)  # fmt: skip
        sha = side(root / "sha", args.quick, "sha", data)
        print(f"  sha: {sha['trainings']} trainings ({sha['pruned']} pruned), {sha['train_s']:.0f} s, best "
              f"{sha['best']} {sha['best_bpb']:.4f}", flush=True)  # fmt: skip
    time_ratio = asha["train_s"] / grid["train_s"]
    gap = 100 * (asha["best_bpb"] - grid["best_bpb"]) / grid["best_bpb"]
    met = None if args.quick else time_ratio <= 0.40 and gap <= 1.0
    sha_ratio = sha["train_s"] / grid["train_s"]
    sha_gap = 100 * (sha["best_bpb"] - grid["best_bpb"]) / grid["best_bpb"]
    figures = [
        figure("grid: training seconds", grid["train_s"], "s"),
        figure("ASHA: training seconds", asha["train_s"], "s"),
        figure("ASHA / grid training time", 100 * time_ratio, "%", "<= 40%", None if args.quick else time_ratio <= 0.4),
        figure("grid: best val/bpb", grid["best_bpb"], "bpb"),
        figure("ASHA: best val/bpb", asha["best_bpb"], "bpb"),
        figure("ASHA best above the grid's", gap, "%", "<= 1%", None if args.quick else gap <= 1.0),
        figure("ASHA: trainings pruned", asha["pruned"], f"of {asha['trainings']}"),
        figure("replay, grid order: steps / the grid's (the measured side's check)", 100 * replayed["grid_order"], "%"),
        figure("replay, reverse order: steps / the grid's", 100 * replayed["reverse"], "%"),
        figure("replay, 100 random orders: mean steps / the grid's", 100 * replayed["random_mean"], "%"),
        figure("  orders at <= 40% of the grid's steps", 100 * replayed["random_share_at_most_40pct"], "%"),
        figure("  orders whose best is within 1% of the grid's", 100 * replayed["random_share_best_within_1pct"], "%"),
        figure("  orders with both", 100 * replayed["random_share_both"], "%"),
        figure("sha: training seconds", sha["train_s"], "s"),
        figure("sha / grid training time", 100 * sha_ratio, "%", "<= 25%", None if args.quick else sha_ratio <= 0.25),
        figure(
            "sha: best val/bpb above the grid's",
            sha_gap,
            "%",
            "the grid's best",
            None if args.quick else sha["best_bpb"] == grid["best_bpb"],
        ),
        figure(
            "sha replay over the grid's curves, 22 orders: largest steps / the grid's",
            100 * max(replayed["sha_fractions"]),
            "%",
            "<= 25%",
        ),
        figure(
            "sha replay: orders whose winner is the grid's best",
            100 * sum(replayed["sha_best_within_1pct"]) / len(replayed["sha_best_within_1pct"]),
            "%",
        ),
    ]
    write_report("search", args, figures, {"grid": grid, "asha": asha, "sha": sha, "replay": replayed, "met": met})
    return 0


if __name__ == "__main__":
    sys.exit(main())
