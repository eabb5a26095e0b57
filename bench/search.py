"""Early stopping: the full grid against successive halving (sha) and ASHA on the same 16-point space.

    nice python bench/search.py [--quick] [--json PATH]        (from the repository root)

The space is specs/quickstart.yaml's model (learned positions) over ``train.lr`` x ``train.warmup_steps`` (4 x 4 =
16 points; --quick: 2 x 2 and 60 steps). Every side runs through ``gptlab submit`` (the Python API), one training
at a time (``site.max_workers: 1``), each in a runs_root of its own holding the same committed tokenizer and shards
(built once beforehand), so none reuses another's trainings. Both pruners use ``min_steps: 25, reduction_factor:
3`` (rungs at 25, 75 and 225 steps of 250; validation estimates every 25 steps): ``sweep.prune: {method: sha}``
(synchronous: every point pauses at a rung until all have reached it) and ``{method: asha}`` (Optuna's).

Measured figures: the total training seconds of each side (the trainings' own ``summary.json`` seconds over every
attempt, pruned and paused ones included), the best final val/bpb each found, their ratios to the grid's. Targets:
issue 17, ASHA's best within 1% of the grid's for at most 40% of its training time; issue 23, sha at most 25% of
the grid's training time keeping the grid's best point, in the grid's order, reversed and in 20 random orders.

Orders: a real submit runs the grid in its order only, so the other orders are replays of the grid's measured
validation curves (step, loss, training seconds so far, per point): through the driver's own ``Halving`` for sha
and through the same Optuna pruner for ASHA, one trial at a time, in the grid's order, reversed and 20 seeded
random orders (ASHA also 100, as before). A replayed point pruned at a step costs the grid training's seconds to
that step. The sha replay is checked against the real sha submit (the same step for each point; its resumed
trainings' estimates against the grid's at the same steps). Results: bench/results/search.json.
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


def curves(runs_root: Path, lrs: list[float], warmups: list[int]) -> list[list[tuple[int, float, float]]]:
    """The validation estimates (step, loss, training seconds so far) of each training, in the grid's order (lr
    major)."""
    from llmcore.metrics import EvalLine, read_metrics

    found = {}
    for stage in (runs_root / "stages").glob("train-*"):
        train = json.loads((stage / "config.json").read_text())["train"]
        evals = [(r.step, r.val_loss, r.elapsed_s) for r in read_metrics(stage / "metrics.jsonl")
                 if isinstance(r, EvalLine)]  # fmt: skip
        found[(train["lr"], train["warmup_steps"])] = evals
    return [found[(lr, w)] for lr in lrs for w in warmups]


def replay(
    evals: list[list[tuple[int, float, float]]], order: list[int], prune: dict, max_steps: int
) -> tuple[dict, int]:
    """Optuna's successive-halving pruner over measured curves, one trial at a time in ``order``: (point -> the step
    it stopped at, the best point that ran to the end, by its last estimate)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = optuna.pruners.SuccessiveHalvingPruner(min_resource=prune["min_steps"],
                                                    reduction_factor=prune["reduction_factor"])  # fmt: skip
    study, stops, finished = optuna.create_study(pruner=pruner), {}, {}
    for i in order:
        trial, stop = study.ask(), max_steps
        for step, loss, _ in evals[i]:
            trial.report(loss, step)
            if trial.should_prune():
                stop = step
                break
        if stop == max_steps:
            study.tell(trial, evals[i][-1][1])
            finished[i] = evals[i][-1][1]
        else:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        stops[i] = stop
    return stops, min(finished, key=finished.get)


def replay_sha(
    evals: list[list[tuple[int, float, float]]], order: list[int], prune: dict, max_steps: int
) -> tuple[dict, int]:
    """Synchronous successive halving (workflows.rungs.Halving, the driver's own decisions) over the measured
    curves, the points given in ``order``: (point -> the step it stopped at, the point it trains to the end)."""
    from workflows.rungs import Halving, Journal, rung_steps

    rungs = rung_steps(prune["min_steps"], prune["reduction_factor"], max_steps)
    with tempfile.TemporaryDirectory() as tmp:
        names = [f"p{i:02d}" for i in order]
        h = Halving(names, rungs, prune["reduction_factor"], Journal(Path(tmp) / "j.jsonl"))
        loss = {n: {step: v for step, v, _ in evals[int(n[1:])]} for n in names}
        while h.decide({n: loss[n][h.target(n)] for n in h.live() if h.target(n) is not None}):
            pass
    stops = {int(n[1:]): rungs[h.pruned[n]] if n in h.pruned else max_steps for n in names}
    (winner,) = [int(n[1:]) for n in names if n not in h.pruned]
    return stops, winner


def cost(evals: list[list[tuple[int, float, float]]], stops: dict[int, int], max_steps: int) -> tuple[float, float]:
    """(steps, training seconds) of the trainings stopped at ``stops`` over the full grid's: a point's seconds at a
    step are its measured training's (the elapsed seconds of its estimate there)."""
    seconds = [{step: t for step, _, t in e} for e in evals]
    steps = sum(stops.values()) / (len(evals) * max_steps)
    return steps, sum(seconds[i][s] for i, s in stops.items()) / sum(s[max_steps] for s in seconds)


ORDERS = 20  # random orders of the sha / ASHA comparison (seeds 0..19), beside the grid's order and its reverse


def orders(n: int) -> dict[str, list[int]]:
    import random

    return {"grid": list(range(n)), "reversed": list(range(n))[::-1],
            **{f"random {s}": random.Random(s).sample(range(n), n) for s in range(ORDERS)}}  # fmt: skip


def replays(runs_root: Path, quick: bool, points: list[list[float]]) -> dict:
    """The replay figures over the grid's curves (``points``: [lr, warmup, val/bpb]): sha and ASHA in the grid's
    order, reversed and 20 seeded random orders (each: steps and training seconds over the grid's, whether the
    point trained to the end is the grid's best, or within 1% of it); ASHA also over 100 seeded random orders."""
    import random

    tree = tree_for(runs_root, quick, True)
    lrs, warmups = tree["sweep"]["train.lr"], tree["sweep"]["train.warmup_steps"]
    evals, prune, max_steps = curves(runs_root, lrs, warmups), tree["sweep"]["prune"], tree["train"]["max_steps"]
    bpb = {(lr, w): v for lr, w, v in points}
    grid_bpb = [bpb[(lr, w)] for lr in lrs for w in warmups]
    best = min(grid_bpb)

    def within(i: int) -> bool:
        return grid_bpb[i] <= 1.01 * best

    def row(stops: dict[int, int], winner: int) -> dict:
        steps, seconds = cost(evals, stops, max_steps)
        return {"steps": steps, "time": seconds, "best": grid_bpb[winner] == best, "within_1pct": within(winner),
                "stops": [stops[i] for i in range(len(evals))]}  # fmt: skip

    n = len(evals)
    compared = orders(n)
    sha = {name: row(*replay_sha(evals, order, prune, max_steps)) for name, order in compared.items()}
    asha = {name: row(*replay(evals, order, prune, max_steps)) for name, order in compared.items()}
    rng = random.Random(0)
    shuffled = [row(*replay(evals, rng.sample(range(n), n), prune, max_steps)) for _ in range(100)]
    fractions = sorted(r["steps"] for r in shuffled)
    return {"sha": sha, "asha": asha,
            "grid_order": asha["grid"]["steps"], "grid_order_best_within_1pct": asha["grid"]["within_1pct"],
            "reverse": asha["reversed"]["steps"], "reverse_best_within_1pct": asha["reversed"]["within_1pct"],
            "random_mean": sum(fractions) / len(fractions), "random_median": fractions[len(fractions) // 2],
            "random_share_at_most_40pct": sum(f <= 0.40 for f in fractions) / len(fractions),
            "random_share_best_within_1pct": sum(r["within_1pct"] for r in shuffled) / len(shuffled),
            "random_share_both": sum(r["steps"] <= 0.40 and r["within_1pct"] for r in shuffled) / len(shuffled),
            "grid_curves": evals}  # fmt: skip


def sha_agreement(grid_evals: list, sha_root: Path, lrs: list[float], warmups: list[int], replayed: dict) -> dict:
    """The replay checked against the real sha submit (grid order): the step each of its trainings stopped at
    (summary.json) against the replay's, and its validation estimates against the grid's at the same steps (a
    resumed training continues the same curve)."""
    measured = curves(sha_root, lrs, warmups)
    steps = [max(s for s, _, _ in stage_evals) for stage_evals in measured]
    diffs = []
    for got, full in zip(measured, grid_evals):
        ref = {s: v for s, v, _ in full}
        diffs += [abs(v - ref[s]) for s, v, _ in got if s in ref]
    expected = replayed["sha"]["grid"]["stops"]
    agreeing = sum(a == b for a, b in zip(steps, expected))
    return {"measured_stops": steps, "replay_stops": expected, "points_agreeing": agreeing,
            "points": len(steps), "max_abs_val_loss_diff": max(diffs), "estimates_compared": len(diffs)}  # fmt: skip


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


def order_figures(label: str, rows: dict[str, dict], quick: bool, limit: float | None) -> list[dict]:
    """One method's replay figures: grid order, reversed, and the 20 random orders (the worst of them)."""
    out = []
    for name in ("grid", "reversed"):
        r = rows[name]
        met = None if quick or limit is None else r["time"] <= limit and r["best"]
        target = None if limit is None else f"<= {100 * limit:.0f}% with the grid's best"
        out.append(figure(f"{label}, {name} order: training time / the grid's", 100 * r["time"], "%", target, met))
        out.append(figure(f"{label}, {name} order: steps / the grid's", 100 * r["steps"], "%"))
        out.append(figure(f"{label}, {name} order: keeps the grid's best point (1 yes, 0 no)", int(r["best"]), ""))
    rand = [r for name, r in rows.items() if name.startswith("random")]
    worst = max(r["time"] for r in rand)
    met = None if quick or limit is None else worst <= limit and all(r["best"] for r in rand)
    target = None if limit is None else f"<= {100 * limit:.0f}% with the grid's best, every order"
    n = len(rand)
    out += [figure(f"{label}, {n} random orders: largest training time / the grid's", 100 * worst, "%", target, met),
            figure(f"{label}, {len(rand)} random orders: mean training time / the grid's",
                   100 * sum(r["time"] for r in rand) / len(rand), "%"),
            figure(f"{label}, {len(rand)} random orders: orders keeping the grid's best", sum(r["best"] for r in rand),
                   f"of {len(rand)}"),
            figure(f"{label}, {len(rand)} random orders: orders whose best is within 1% of the grid's",
                   sum(r["within_1pct"] for r in rand), f"of {len(rand)}")]  # fmt: skip
    return out


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
        sha = side(root / "sha", args.quick, "sha", data)
        print(f"  sha: {sha['trainings']} trainings ({sha['pruned']} pruned), {sha['train_s']:.0f} s, best "
              f"{sha['best']} {sha['best_bpb']:.4f}", flush=True)  # fmt: skip
        tree = tree_for(root, args.quick, True)
        lrs, warmups = tree["sweep"]["train.lr"], tree["sweep"]["train.warmup_steps"]
        agree = sha_agreement(replayed.pop("grid_curves"), root / "sha" / "runs", lrs, warmups, replayed)
        print(
            f"  sha replay against the real sha submit: {agree['points_agreeing']} of {agree['points']} points "
            f"stopped at the same step; estimates differ by at most {agree['max_abs_val_loss_diff']:.2e}",
            flush=True,
        )
        asha = side(root / "asha", args.quick, True, data)
        print(f"  asha: {asha['trainings']} trainings ({asha['pruned']} pruned), {asha['train_s']:.0f} s, best "
              f"{asha['best']} {asha['best_bpb']:.4f}", flush=True)  # fmt: skip
    time_ratio = asha["train_s"] / grid["train_s"]
    gap = 100 * (asha["best_bpb"] - grid["best_bpb"]) / grid["best_bpb"]
    met = None if args.quick else time_ratio <= 0.40 and gap <= 1.0
    sha_ratio = sha["train_s"] / grid["train_s"]
    sha_best = sha["best"] == grid["best"]
    q = args.quick
    figures = [
        figure("grid: training seconds", grid["train_s"], "s"),
        figure("grid: best val/bpb", grid["best_bpb"], "bpb"),
        figure("sha (measured, grid order): training seconds", sha["train_s"], "s"),
        figure("sha / grid training time", 100 * sha_ratio, "%", "<= 25%", None if q else sha_ratio <= 0.25),
        figure(
            "sha: keeps the grid's best point (1 yes, 0 no)",
            int(sha_best),
            "",
            "the grid's best",
            None if q else sha_best,
        ),  # fmt: skip
        figure("sha / grid wall time (with Parsl, restarts, evaluation)", 100 * sha["wall_s"] / grid["wall_s"], "%"),
        figure(
            "sha replay vs the real sha submit: points stopped at the same step",
            agree["points_agreeing"],
            f"of {agree['points']}",
        ),  # fmt: skip
        figure(
            "  largest |val loss| difference at the same step (resumed vs the grid's)",
            agree["max_abs_val_loss_diff"],
            "nats",
        ),  # fmt: skip
        *order_figures("sha replay", replayed["sha"], q, 0.25),
        figure("ASHA (measured, grid order): training seconds", asha["train_s"], "s"),
        figure("ASHA / grid training time", 100 * time_ratio, "%", "<= 40%", None if q else time_ratio <= 0.4),
        figure("ASHA: best val/bpb", asha["best_bpb"], "bpb"),
        figure("ASHA best above the grid's", gap, "%", "<= 1%", None if q else gap <= 1.0),
        figure("ASHA: trainings pruned", asha["pruned"], f"of {asha['trainings']}"),
        *order_figures("ASHA replay", replayed["asha"], q, None),
        figure("ASHA replay, 100 random orders: mean steps / the grid's", 100 * replayed["random_mean"], "%"),
        figure("  orders at <= 40% of the grid's steps", 100 * replayed["random_share_at_most_40pct"], "%"),
        figure("  orders whose best is within 1% of the grid's", 100 * replayed["random_share_best_within_1pct"], "%"),
        figure("  orders with both", 100 * replayed["random_share_both"], "%"),
    ]
    details = {"grid": grid, "asha": asha, "sha": sha, "replay": replayed, "sha_agreement": agree, "met": met}
    write_report("search", args, figures, details)
    return 0


if __name__ == "__main__":
    sys.exit(main())
