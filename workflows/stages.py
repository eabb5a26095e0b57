"""Stage bodies: each runs one llmcore step in its stage directory and commits it with ``DONE.json``.

These functions run on Parsl workers (a thread here, a process on a compute node elsewhere), so they take
plain paths and JSON-able dicts and import nothing from Parsl or MLflow.

Each stage body runs holding the stage directory's lock (``<stage>/.lock``, an ``flock``), and so does the
training process for its whole run: two submits of the same spec at once (or a re-submit while a killed
driver's training still runs) never work in one stage directory at the same time. The second one waits,
then finds the stage committed (or the checkpoint complete) and does nothing again.
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmcore.io import LOCK_FILE, atomic_write_json, file_lock, is_committed, read_json, write_commit_marker
from workflows.spec import ExperimentSpec


def _commit(stage_dir: Path, kind: str, started: float, result: dict[str, Any]) -> dict[str, Any]:
    info = {"kind": kind, "seconds": round(time.time() - started, 3), "finished_at": time.time(), "result": result}
    write_commit_marker(stage_dir, info)
    return info


def _run(stage_dir: str, kind: str, body: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Run ``body`` in ``stage_dir`` unless the stage is already committed; return the commit marker."""
    d = Path(stage_dir)
    if is_committed(d):
        return read_json(d / "DONE.json")
    with file_lock(d / LOCK_FILE, f"stage {d.name}"):
        if is_committed(d):  # another submit ran it while this one waited
            return read_json(d / "DONE.json")
        started = time.time()
        return _commit(d, kind, started, body(d))


def prepare_stage(stage_dir: Path, config: dict[str, Any]) -> None:
    """Create the stage directory and record the exact config its key was computed from."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(stage_dir / "config.json", config)


def tokenizer_stage(stage_dir: str, spec: dict[str, Any]) -> dict[str, Any]:
    from llmcore.tokenizer import train_tokenizer

    s = ExperimentSpec.model_validate(spec)
    return _run(stage_dir, "tokenizer", lambda d: train_tokenizer(s.data, s.tokenizer, d, s.seed))


def shards_stage(stage_dir: str, spec: dict[str, Any], tokenizer_dir: str, inputs: list = ()) -> dict[str, Any]:
    from llmcore.shards import write_shards

    s = ExperimentSpec.model_validate(spec)
    model = Path(tokenizer_dir) / "tokenizer.model"

    def body(d: Path) -> dict[str, Any]:
        manifest = write_shards(s.data, model, d, s.seed)
        return {
            "vocab_size": manifest["vocab_size"],
            "dtype": manifest["dtype"],
            "tokens": {k: v["tokens"] for k, v in manifest["splits"].items()},
            "bytes_per_token": manifest["bytes_per_token"],
        }

    return _run(stage_dir, "shards", body)


def train_command(stage_dir: str, shards_dir: str, env: dict[str, str], launcher: str = "") -> str:
    """The shell command that trains one run. ``launcher`` starts the ranks: empty for one process,
    ``$PARSL_MPI_PREFIX`` under Parsl's MPIExecutor, an ``mpiexec ...`` prefix on local sites. Every
    argument is shell-quoted; only the launcher (built by gptlab, never from a spec) is left to the shell."""
    args = [
        sys.executable,
        "-m",
        "llmcore.train",
        "--config",
        f"{stage_dir}/train.json",
        "--shards",
        shards_dir,
        "--out",
        stage_dir,
    ]
    env_args = [f"{k}={v}" for k, v in sorted(env.items())]
    command = " ".join(shlex.quote(a) for a in (["env", *env_args] if env_args else []) + args)
    return f"{launcher} {command}" if launcher else command


def train_app(
    stage_dir: str,
    shards_dir: str,
    env: dict[str, str],
    launcher: str = "",
    inputs: list = (),
    stdout: str | None = None,
    stderr: str | None = None,
    parsl_resource_specification: dict[str, Any] | None = None,
) -> str:
    """Body of the training bash app (module level, so every executor can ship it by reference)."""
    return train_command(stage_dir, shards_dir, env, launcher)


def commit_train(stage_dir: str, inputs: list = ()) -> dict[str, Any]:
    """Commit a training stage once its process exited 0 and wrote a complete summary."""
    d = Path(stage_dir)
    with file_lock(d / LOCK_FILE, f"stage {d.name}"):
        if is_committed(d):
            return read_json(d / "DONE.json")
        summary = read_json(d / "summary.json")
        if summary.get("stopped_early"):
            raise RuntimeError(
                f"training in {d} stopped at its time budget after {summary['steps']} steps; submit again to "
                "resume from its checkpoint"
            )
        return _commit(d, "train", time.time() - float(summary["seconds"]), summary)


def eval_stage(
    stage_dir: str, spec: dict[str, Any], train_dir: str, shards_dir: str, tokenizer_dir: str, inputs: list = ()
) -> dict[str, Any]:
    from llmcore.evaluate import evaluate

    s = ExperimentSpec.model_validate(spec)
    model = Path(tokenizer_dir) / "tokenizer.model"
    return _run(
        stage_dir,
        "eval",
        lambda d: evaluate(Path(train_dir), Path(shards_dir), model, s.eval, d, s.seed, device=s.train.device),
    )
