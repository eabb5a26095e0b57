"""Helpers shared by the benchmarks in bench/ (not a benchmark itself).

Every benchmark is a script with ``--quick`` (small sizes, a smoke test) and ``--json PATH``; it prints its
figures and writes ``{"benchmark", "command", "machine", "figures", "details"}`` to bench/results/<name>.json
(``<name>.quick.json`` with ``--quick``).
A figure is ``{"name", "value", "unit", "target", "met"}``; ``met`` is None where the issue sets no target.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
QUICKSTART = REPO / "specs" / "quickstart.yaml"
# Benchmarks measure this checkout, whatever gptlab an environment has installed (run_all.py also exports
# PYTHONPATH, so training subprocesses and spawned workers import the same code).
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


# ------------------------------------------------------------------------------------------ reporting


def parser(name: str, doc: str) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark has: ``--quick`` and ``--json``."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke test of the benchmark, not figures")
    p.add_argument(
        "--json",
        type=Path,
        default=None,
        help=f"where the results go (default bench/results/{name}.json, with --quick {name}.quick.json)",
    )
    return p


def result_path(name: str, quick: bool) -> Path:
    """Where a benchmark writes its results by default: a --quick run never overwrites the full figures."""
    return RESULTS / f"{name}{'.quick' if quick else ''}.json"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """What the figures were measured on: CPU, cores, load, torch and Python versions, date."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu_model(),
        "cores": cores,
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def figure(name: str, value: float, unit: str, target: str | None = None, met: bool | None = None) -> dict[str, Any]:
    return {"name": name, "value": value, "unit": unit, "target": target, "met": met}


def show(fig: dict[str, Any]) -> str:
    value = fig["value"]
    shown = f"{value:,.3f}" if isinstance(value, float) and abs(value) < 100 else f"{value:,.0f}"
    verdict = "" if fig["met"] is None else ("  met" if fig["met"] else "  MISSED")
    target = f"  (target {fig['target']})" if fig["target"] else ""
    return f"  {fig['name']:<58} {shown:>12} {fig['unit']:<8}{target}{verdict}"


def write_report(name: str, args: argparse.Namespace, figures: list[dict], details: dict[str, Any]) -> dict:
    """Print the figures and write the benchmark's JSON (atomically); returns the report."""
    from llmcore.io import atomic_write_json

    command = f"python bench/{name}.py" + (" --quick" if args.quick else "")
    report = {
        "benchmark": name,
        "command": command,
        "quick": args.quick,
        "machine": machine(),
        "figures": figures,
        "details": details,
    }
    print(f"{name}:")
    for fig in figures:
        print(show(fig))
    path = args.json or result_path(name, args.quick)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, report)
    print(f"wrote {path}", flush=True)
    return report


def ratio_pct(with_: float, without: float) -> float:
    """Overhead of ``with_`` over ``without`` in percent."""
    return 100.0 * (with_ - without) / without


# ------------------------------------------------------------------------------------------- corpora


def stdlib_data(repeats: int = 1, max_bytes: int | None = None, **data: Any):
    """The Python standard library's source with its tests (about 30 MB), ``repeats`` times in a row, or its
    first ``max_bytes`` bytes: the corpus of the shards and tokenizer benchmarks (no download)."""
    from llmcore.config import DataConfig, PythonStdlibSource

    source = PythonStdlibSource(include_tests=True, max_bytes=max_bytes)
    return DataConfig(sources=[source] * repeats, **data)


def corpus_bytes(data) -> int:
    from llmcore.corpus import resolve_files

    return sum(path.stat().st_size for _, path, _ in resolve_files(data))


def quickstart_tree(runs_root: Path, overrides: list[str] = ()) -> dict[str, Any]:
    """specs/quickstart.yaml as a tree, with ``runs_root`` and ``--set``-style overrides applied."""
    from workflows.spec import parse_override, read_spec_file, set_dotted

    tree = read_spec_file(QUICKSTART)
    tree["runs_root"] = str(runs_root)
    for text in overrides:
        set_dotted(tree, *parse_override(text))
    return tree


def write_spec(path: Path, tree: dict[str, Any]) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")
    return path


def prepare_data_stages(spec_path: Path):
    """Plan the spec and run its tokenizer and shards stages (committed, through the stage registry as a submit
    runs them), so a later submit or direct run of the same spec only trains and evaluates. Returns the plan."""
    from workflows.planning import plan
    from workflows.spec import load_spec
    from workflows.stages import SHARDS, TOKENIZER, prepare_stage, run_stage

    p = plan(load_spec(spec_path))
    for stage in p.stages.values():
        if stage.definition in (TOKENIZER, SHARDS) and not stage.done:
            prepare_stage(stage.dir, stage.config)
            inputs = {k: str(d) for k, d in stage.inputs.items()}
            run_stage(stage.kind, str(stage.dir), stage.config, inputs, stage.runtime)
    return p


def copy_data_stages(p, runs_root: Path) -> None:
    """Copy the plan's committed tokenizer and shards stage directories into another runs_root."""
    from workflows.stages import SHARDS, TOKENIZER

    for stage in p.stages.values():
        if stage.definition in (TOKENIZER, SHARDS):
            shutil.copytree(stage.dir, runs_root / "stages" / stage.dir.name, dirs_exist_ok=True)


# ------------------------------------------------------------------------------------------- running


def train_cmd(config: Path, shards: Path, out: Path) -> list[str]:
    """``python -m llmcore.train`` exactly as the training stage runs it."""
    return [sys.executable, "-m", "llmcore.train", "--config", str(config), "--shards", str(shards), "--out", str(out)]


def run_logged(
    cmd: list[str],
    log: Path,
    env: dict[str, str] | None = None,
    while_running: Callable[[], None] | None = None,
    poll: float = 0.02,
    rss: bool = False,
) -> Ran:
    """Run ``cmd`` with output to ``log``, calling ``while_running()`` every ``poll`` seconds until it exits;
    with ``rss``, sample the peak resident memory of its whole process tree. Raises with the log's tail if it
    fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=REPO)
        with TreeRSS(proc.pid) if rss else contextlib.nullcontext() as sampler:
            while proc.poll() is None:
                if while_running is not None:
                    while_running()
                time.sleep(poll)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
    return Ran(seconds, sampler.peak if rss else None)


@dataclass
class Ran:
    seconds: float  # wall time, start to exit
    peak_rss: int | None  # bytes, the whole process tree together (with rss=True)


def interleaved(cases: dict[str, Callable[[int], float]], repeats: int) -> dict[str, list[float]]:
    """Run each case ``repeats`` times, rotating the order every round (A B, B A, ...) so drifting load on a
    shared machine hits every case alike. Each case gets the round number and returns seconds."""
    names = list(cases)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            out[name].append(cases[name](r))
            print(f"    round {r + 1}/{repeats} {name}: {out[name][-1]:.2f} s", flush=True)
    return out


class TreeRSS:
    """Peak resident memory of a process and all its descendants together, sampled every ``interval``."""

    def __init__(self, pid: int, interval: float = 0.02):
        import psutil

        self.root, self.interval, self.peak = psutil.Process(pid), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _total(self) -> int:
        import psutil

        total = 0
        for p in [self.root, *self.root.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self._total())
            except psutil.Error:
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
