"""Run every gptlab benchmark and print one table of figures against the issue's targets.

    python bench/run_all.py [--quick] [--only NAME ...]        (from the repository root)

Runs, each in its own process (so one's memory or threads never colour another's figures): cli, planning,
tokenizer, shards, tracking, tracking_scale, orchestration, train_step, fsdp, search, tasks, pretrained, inspection,
lora. Each writes bench/results/<name>.json; this script then writes bench/results/summary.json and
bench/results/summary.md (the table docs/performance.md quotes: figure, value, target, met, command, and the
machine). ``--quick`` runs every benchmark at small sizes (a smoke test in a few minutes; its figures are not the
published ones). The full suite takes about 40 minutes on 2 cores (search alone about 16).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from common import REPO, RESULTS, figure, machine, result_path, show

BENCHMARKS = (
    "cli",
    "planning",
    "tokenizer",
    "shards",
    "tracking",
    "tracking_scale",
    "orchestration",
    "train_step",
    "fsdp",
    "search",
    "tasks",
    "pretrained",
    "inspection",
    "lora",
)
NANOGPT_MS = 30.0  # nanoGPT's train.py, CPU recipe, 2 cores (the reference)


def train_step_figures(report: dict) -> list[dict]:
    """bench/train_step.py predates the figures format: derive its figures from its results."""
    figures = []
    for r in report["results"]:
        ms = r["ms_per_step"]
        if r["case"].startswith("nanogpt-cpu"):
            figures.append(
                figure(f"{r['case']} (median)", ms, "ms/step", f"<= {NANOGPT_MS:g} ms (nanoGPT)", ms <= NANOGPT_MS)
            )
            figures.append(figure(f"{r['case']} (fastest step)", r["ms_per_step_min"], "ms/step"))
        else:
            figures.append(figure(f"{r['case']} (median)", ms, "ms/step"))
        figures.append(figure(f"  {r['case']} tokens/s", r["tokens_per_sec"], "tok/s"))
        if r.get("mfu") is not None:
            figures.append(figure(f"  {r['case']} MFU", 100 * r["mfu"], "%", ">= 45%", r["mfu"] >= 0.45))
    return figures


def run(name: str, quick: bool) -> dict:
    cmd = [sys.executable, str(REPO / "bench" / f"{name}.py")]
    path = result_path(name, quick)
    if name == "train_step":  # no --quick of its own: fewer steps
        cmd += ["--steps", "10" if quick else "100", "--json", str(path)]
    elif quick:
        cmd.append("--quick")
    print(f"== {' '.join(cmd[1:])}", flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, env=env)
    seconds = time.perf_counter() - t0
    report = json.loads(path.read_text())
    if name == "train_step":
        report = {
            "benchmark": name,
            "command": " ".join(["python", "bench/train_step.py", *cmd[2:4]]),
            "figures": train_step_figures(report),
            "details": report,
        }
    report["wall_s"] = seconds
    return report


def markdown(reports: list[dict], info: dict) -> str:
    rows = ["| benchmark | figure | value | target | met | command |", "|---|---|---|---|---|---|"]
    for rep in reports:
        for f in rep["figures"]:
            v = f["value"]
            value = f"{v:,.3g}" if isinstance(v, float) and abs(v) < 100 else f"{v:,.0f}"
            met = "" if f["met"] is None else ("yes" if f["met"] else "**no**")
            rows.append(
                f"| {rep['benchmark']} | {f['name'].strip()} | {value} {f['unit']} | {f['target'] or ''} | "
                f"{met} | `{rep['command']}` |"
            )
    head = (
        f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, Python {info['python']}, "
        f"{info['date']} (1-minute load average at the start: {info['load_avg_1m']})."
    )
    return head + "\n\n" + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke test of every benchmark")
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these benchmarks")
    args = p.parse_args(argv)
    info = machine()
    reports = [run(name, args.quick) for name in (args.only or BENCHMARKS)]
    print(
        f"\nAll benchmarks ({'quick' if args.quick else 'full'}) on {info['cpu']}, {info['cores']} cores, "
        f"torch {info['torch']}, {info['date']}:"
    )
    for rep in reports:
        print(f"{rep['benchmark']} ({rep['wall_s']:.0f} s; {rep['command']}):")
        for fig in rep["figures"]:
            print(show(fig))
    suffix = ".quick" if args.quick else ""
    (RESULTS / f"summary{suffix}.json").write_text(
        json.dumps({"machine": info, "quick": args.quick, "reports": reports}, indent=1)
    )
    (RESULTS / f"summary{suffix}.md").write_text(markdown(reports, info))
    print(f"wrote {RESULTS / f'summary{suffix}.json'} and {RESULTS / f'summary{suffix}.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
