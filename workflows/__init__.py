"""workflows: experiment specs, sweep expansion, planning, Parsl execution, MLflow tracking, the CLI.

Python API (the same as the CLI, for notebooks)::

    from workflows import submit
    result = submit("specs/quickstart.yaml", overrides=["train.max_steps=50"])
    for run in result.runs:
        print(run.name, run.status, run.metrics["val/bpb"])
"""

from workflows.spec import ExperimentSpec, SpecError, load_spec


def submit(*args, **kwargs):
    """Run a spec end to end; see :func:`workflows.driver.submit`."""
    from workflows.driver import submit as _submit

    return _submit(*args, **kwargs)


def plan(spec, overrides=None, site=None):
    """Load, check and plan a spec without running anything; see :func:`workflows.plan.plan`."""
    from workflows.driver import load_and_check
    from workflows.plan import plan as _plan

    return _plan(load_and_check(spec, overrides, site))


__all__ = ["ExperimentSpec", "SpecError", "load_spec", "plan", "submit"]
