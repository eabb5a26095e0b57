"""Process control: the driver's signals, and the trainings it asks to stop, halts and kills.

- :class:`StopRequest`: the first SIGINT / SIGTERM asks the driver to stop cleanly, a second forces it out.
- The **halt file** of a submit (:class:`Halt`): written first thing when the driver is told to stop. Every stage
  the submit launched checks it before doing any work (a queued Python stage returns at once, a queued training's
  shell line exits before starting Python), and a running training checks it at every step (``llmcore.train``'s
  ``GPTLAB_HALT_FILE``), so nothing new starts anywhere after a Ctrl-C, on this machine or on a compute node
  that sees the runs_root's file system.
- A training is asked to stop with a STOP file in its directory (and SIGTERM where it runs here); a pruning
  decision is recorded in its directory (``PRUNED.json``) *before* that, so an interrupt never loses it.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmcore.io import atomic_write_bytes, atomic_write_json
from workflows.trainlog import lock_holder

__all__ = ["Halt", "StopRequest", "kill_children", "kill_training", "record_pruned", "request_stop",
           "resume_step"]  # fmt: skip

STOP_FILE = "STOP"  # llmcore.train.STOP_FILE (not imported: that module imports torch)
PRUNED_FILE = "PRUNED.json"  # workflows.states reads it


class StopRequest:
    """SIGINT / SIGTERM during a submit. The first sets ``signal`` and calls ``first`` (the driver halts its
    submit at once, from the handler); a second calls ``force`` (which does not return). Installed only in the
    main thread."""

    def __init__(self, force: Callable[[str], None], first: Callable[[str], None] | None = None):
        self.signal: str | None = None
        self.force, self.first = force, first
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signal is None:
            self.signal = name
            if self.first is not None:
                self.first(name)
        else:
            self.force(name)


class Halt:
    """A submit's halt file, ``<runs_root>/submits/<id>/HALT``: once it exists, none of the submit's stages
    starts work."""

    def __init__(self, runs_root: Path):
        self.path = runs_root / "submits" / uuid.uuid4().hex[:16] / "HALT"

    def prepare(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def set(self, why: str) -> None:
        atomic_write_bytes(self.path, f"{why} at {time.time():.0f}\n".encode())

    @property
    def is_set(self) -> bool:
        return self.path.exists()

    def clean(self) -> None:
        import shutil

        shutil.rmtree(self.path.parent, ignore_errors=True)


def halted(halt: str | None) -> bool:
    """Whether the halt file a stage was launched with exists (checked by a stage before it does any work)."""
    return bool(halt) and Path(halt).exists()


def resume_step(train_dir: Path) -> int | None:
    """The step of a training's newest committed checkpoint (what a resume continues from), or None."""
    from llmcore.checkpoint import latest_checkpoint

    found = latest_checkpoint(train_dir)
    return int(found.name.split("_")[-1]) if found is not None else None


def record_pruned(train_dir: Path, step: int, why: str) -> None:
    """Record a pruning decision in the training's directory (before the training is asked to stop)."""
    atomic_write_json(train_dir / PRUNED_FILE, {"step": step, "why": why, "at": time.time()})


def forget_pruned(train_dir: Path) -> None:
    """Withdraw a pruning decision (a re-submit with pruning switched off resumes the training)."""
    (train_dir / PRUNED_FILE).unlink(missing_ok=True)


def request_stop(train_dir: Path) -> None:
    """Ask a running training to save a checkpoint and stop: a STOP file (read wherever it runs, through the
    shared file system) and SIGTERM to its rank 0 where it runs on this machine."""
    atomic_write_bytes(train_dir / STOP_FILE, f"stop requested at {time.time():.0f}\n".encode())
    kill_training(train_dir, signal.SIGTERM)


def kill_training(train_dir: Path, sig: int) -> bool:
    """Send ``sig`` to the training holding this stage's lock, if it runs on this machine; whether one did."""
    import psutil

    holder = lock_holder(train_dir)
    if holder is None or holder[1] != socket.gethostname():
        return False
    try:
        proc = psutil.Process(holder[0])
        if "llmcore.train" not in " ".join(proc.cmdline()):
            return False  # the lock's last holder is gone, and its pid was reused
        proc.send_signal(sig)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return True


def training_alive(train_dir: Path) -> bool:
    """Whether a training process holds this stage's lock on this machine."""
    return kill_training(train_dir, 0)


def kill_children() -> None:
    """SIGKILL every process this driver started (Parsl's interchange, local trainings under a thread pool)."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def exit_code(sig: str) -> int:
    """The shell's exit code for a process ended by this signal (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + signal.Signals[sig].value
