"""Command-line start-up: wall seconds of `gptlab validate` and `gptlab plan` on a 4-point quickstart sweep.

    python bench/cli.py [--quick] [--repeats R] [--json PATH]        (from the repository root)

Each command runs as a user runs it (a new interpreter: start-up, imports, the spec and corpus checks, and for
plan the stage keys and the site's executors), the median of ``--repeats`` runs (--quick: 3). Also reported:
which heavy libraries each command imports (torch, Parsl, MLflow), from the same command run in-process.
Target (issue 12): validate under 1 s. Results: bench/results/cli.json.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, figure, parser, quickstart_tree, write_report, write_spec

TARGET_VALIDATE_S = 1.0
HEAVY = ("torch", "parsl", "mlflow")


def timed(args: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "workflows.cli", *args], cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode:
        raise RuntimeError(f"gptlab {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return seconds


def imports_of(args: list[str], cwd: Path) -> list[str]:
    """The heavy libraries a command imports."""
    code = (
        "import sys\nfrom workflows.cli import app\n"
        f"try:\n    app({args!r}, prog_name='gptlab')\nexcept SystemExit:\n    pass\n"
        f"print('HEAVY:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True)
    line = next(x for x in out.stdout.splitlines() if x.startswith("HEAVY:"))
    return [m for m in line.removeprefix("HEAVY:").split(",") if m]


def main(argv: list[str] | None = None) -> int:
    p = parser("cli", __doc__)
    p.add_argument("--repeats", type=int, default=None)
    args = p.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 9)
    with tempfile.TemporaryDirectory(prefix="gptlab-bench-cli-") as tmp:
        root = Path(tmp)
        tree = quickstart_tree(root / "runs")
        tree["sweep"] = {"model.pos_encoding": ["learned", "rope"], "model.n_layer": [2, 3]}
        spec = write_spec(root / "four.yaml", tree)
        commands = {"validate": ["validate", str(spec)], "plan": ["plan", str(spec)]}
        for cmd in commands.values():
            timed(cmd, root)  # warm the page cache
        seconds = {name: [timed(cmd, root) for _ in range(repeats)] for name, cmd in commands.items()}
        imported = {name: imports_of(cmd, REPO) for name, cmd in commands.items()}
    validate = statistics.median(seconds["validate"])
    figures = [
        figure(
            "gptlab validate, 4 points (median)",
            validate,
            "s",
            f"< {TARGET_VALIDATE_S:g} s",
            validate < TARGET_VALIDATE_S,
        ),  # fmt: skip
        figure("gptlab plan, 4 points (median)", statistics.median(seconds["plan"]), "s"),
        figure("python -c pass (the interpreter alone)", _interpreter(), "s"),
    ]
    details = {"seconds": seconds, "heavy_imports": imported, "repeats": repeats}
    for name, mods in imported.items():
        print(f"  {name} imports: {', '.join(mods) or 'none of ' + ', '.join(HEAVY)}")
    write_report("cli", args, figures, details)
    return 0


def _interpreter() -> float:
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


if __name__ == "__main__":
    sys.exit(main())
