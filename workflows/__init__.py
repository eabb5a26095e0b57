"""workflows: experiment specs, sweep expansion, planning, Parsl execution, MLflow tracking, the CLI.

Python API (the same as the CLI, for notebooks)::

    from workflows import submit
    result = submit("specs/quickstart.yaml", overrides=["train.max_steps=50"])
    for run in result.runs:
        print(run.name, run.status, run.metrics["val/bpb"])

Where each job lives: ``spec`` (the spec, overrides, sweep expansion), ``checks`` (what validate checks beyond the
schema), ``stages`` (the stage registry: every stage kind in one place), ``plan`` (runs -> content-addressed
stages), ``driver`` (running a plan through Parsl; ``submit``), ``lifecycle`` (the MLflow runs of a submit),
``store`` and ``server`` (writing to an MLflow store; probing a tracking server), ``tail`` (following a
training's metrics), ``progress`` (the live table), ``query`` (status, compare and sample from a store),
``compare`` and ``report`` (tables and plots), ``trainlog`` (reading failed trainings' logs), ``logfile`` (third-party
warnings to a log file), ``cli``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from workflows.checks import load_and_check
from workflows.logfile import WARNINGS_LOG, warnings_to
from workflows.planning import plan as make_plan
from workflows.progress import LineDisplay
from workflows.spec import ExperimentSpec, LoadedSpec, SpecError, load_spec

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from workflows.driver import SubmitResult
    from workflows.planning import Plan
    from workflows.progress import LiveDisplay


def submit(
    spec: str | Path | LoadedSpec,
    overrides: list[str] | None = None,
    *,
    site: str | None = None,
    quiet: bool = False,
    poll_interval: float = 2.0,
    report: Callable[[str], None] | None = None,
    fail_fast: bool = False,
    display: LineDisplay | LiveDisplay | None = None,
) -> SubmitResult:
    """Run an experiment spec end to end: every stage not yet committed, on the spec's site, tracked in MLflow.

    Args:
        spec: a spec file (YAML) or a spec loaded with ``workflows.load_spec``.
        overrides: ``KEY=VALUE`` strings, as ``--set`` takes them (``["train.max_steps=100"]``).
        site: the site to run on (``local``, ``local-processes``, ``polaris``, ``slurm``), over the spec's.
        quiet: print nothing until the end.
        poll_interval: seconds between looks at the running stages.
        report: where progress lines go (default: print).
        fail_fast: the first failure stops every other sweep point (closed FAILED, cancelled).
        display: a ``workflows.progress`` display (the CLI's live table); default plain lines through ``report``.

    Returns every sweep point's status, metrics and stage states (``SubmitResult.ok``: all FINISHED). A failing
    sweep point never stops the others unless ``fail_fast``. SIGINT or SIGTERM stops the submit cleanly
    (``SubmitResult.interrupted``): trainings save a checkpoint, runs are KILLED, and submitting again resumes.

    Raises SpecError (before any stage runs) when the spec, an override, the corpus or the site is invalid.
    """
    from workflows.driver import Driver  # (MLflow, Parsl)

    started = time.time()
    p = make_plan(load_and_check(spec, overrides, site, submitting=True))
    if display is None:
        display = LineDisplay(report or (None if quiet else lambda msg: print(msg, flush=True)))
    try:
        with warnings_to(p.runs_root / WARNINGS_LOG):  # third-party warnings: to the log, not the user's terminal
            return Driver(p, display, poll_interval, fail_fast).run(started)
    finally:
        display.close()


def plan(spec: str | Path | LoadedSpec, overrides: list[str] | None = None, site: str | None = None) -> Plan:
    """Load, check and plan a spec without running anything: its runs and their content-addressed stages."""
    return make_plan(load_and_check(spec, overrides, site))


__all__ = ["ExperimentSpec", "LoadedSpec", "SpecError", "load_spec", "plan", "submit"]
