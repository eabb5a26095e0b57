"""Planning benchmark: seconds to validate, expand and plan a sweep of 10,000 points, running nothing.

    python bench/planning.py [--quick] [--points N] [--repeats R] [--profile] [--json PATH]   (from the repo root)

The spec is specs/quickstart.yaml with its sweep replaced by a 100 x 100 grid over ``train.lr`` and
``train.weight_decay`` (10,000 points, every one a valid run). Timed as ``gptlab plan`` does it, in this process:
``load_and_check`` (read the YAML, validate, expand the sweep and validate every point, corpus and site checks)
then ``plan`` (content-addressed stage graph). The median of ``--repeats`` runs is reported (target: < 2 s).
``--profile`` prints the 15 most expensive functions under cProfile. Results: bench/results/planning.json.
"""

from __future__ import annotations

import cProfile
import math
import pstats
import statistics
import tempfile
import time
from pathlib import Path

from common import figure, parser, quickstart_tree, write_report, write_spec

TARGET_S = 2.0


def sweep_spec(root: Path, points: int) -> Path:
    side = max(1, math.isqrt(points))
    tree = quickstart_tree(root / "runs", ["train.min_lr=1e-6"])
    tree["sweep"] = {
        "train.lr": [round(1e-4 * (i + 1), 6) for i in range(side)],
        "train.weight_decay": [round(1e-3 * i, 6) for i in range(points // side)],
    }
    return write_spec(root / "sweep.yaml", tree)


def validate_expand_plan(path: Path) -> tuple[float, float, int, int]:
    """(validate + expand seconds, plan seconds, runs, stages)."""
    from workflows.checks import load_and_check
    from workflows.planning import plan

    t0 = time.perf_counter()
    loaded = load_and_check(path)
    t1 = time.perf_counter()
    p = plan(loaded)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, len(p.runs), len(p.stages)


def main(argv: list[str] | None = None) -> int:
    p = parser("planning", __doc__)
    p.add_argument(
        "--points", type=int, default=None, help="sweep points, a square grid (default 10,000; --quick: 900)"
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="print a cProfile of one more run")
    args = p.parse_args(argv)
    points = args.points or (900 if args.quick else 10_000)
    with tempfile.TemporaryDirectory(prefix="gptlab-bench-plan-") as tmp:
        path = sweep_spec(Path(tmp), points)
        validate_expand_plan(path)  # warm: imports and the corpus file listing's page cache
        rounds = [validate_expand_plan(path) for _ in range(args.repeats)]
        if args.profile:
            prof = cProfile.Profile()
            prof.runcall(validate_expand_plan, path)
            pstats.Stats(prof).sort_stats("cumulative").print_stats(15)
    total = [a + b for a, b, _, _ in rounds]
    sec = statistics.median(total)
    runs, stages = rounds[0][2], rounds[0][3]
    figures = [  # the target is for 10,000 points: a --quick run has no verdict
        figure(
            f"validate + expand + plan, {runs:,} points",
            sec,
            "s",
            f"< {TARGET_S:g} s for 10,000",
            sec < TARGET_S if runs >= 10_000 else None,
        ),
        figure("  of which validate + expand", statistics.median(a for a, _, _, _ in rounds), "s"),
        figure("  of which plan", statistics.median(b for _, b, _, _ in rounds), "s"),
        figure("per sweep point", 1e6 * sec / runs, "us"),
    ]
    details = {
        "points": runs,
        "stages": stages,
        "repeats": args.repeats,
        "rounds_s": [{"validate_expand": a, "plan": b} for a, b, _, _ in rounds],
    }
    write_report("planning", args, figures, details)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
