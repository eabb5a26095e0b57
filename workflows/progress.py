"""What a submit shows while it runs: every run's stages, its training step, tokens per second and loss.

Three ways to show it, chosen by the command line:

- ``LiveDisplay``: a rich table redrawn in place (an interactive terminal);
- ``LineDisplay``: plain lines, a stage as it finishes and each training's step when it has moved on (logs,
  pipes, batch jobs that keep their output);
- ``quiet``: nothing until the final summary (``LineDisplay`` with no writer).

The driver keeps a ``Board`` up to date and calls ``display.update(board)`` once per poll.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workflows.processes import resume_step
from workflows.states import StageState


@dataclass
class RunRow:
    name: str
    max_steps: int
    stages: dict[str, StageState] = field(default_factory=dict)  # stage label -> state, in dependency order
    step: int | None = None
    loss: float | None = None
    tokens_per_sec: float | None = None
    status: str = "RUNNING"
    val_bpb: float | None = None  # once the run is evaluated


class Board:
    """Every run of a submit, in plan order."""

    def __init__(self, rows: list[RunRow]):
        self.rows = {r.name: r for r in rows}
        self.started = time.time()

    @property
    def labels(self) -> list[str]:
        """Every stage label some run has, in order (tokenizer, shards, train, eval, then any others)."""
        return list(dict.fromkeys(label for r in self.rows.values() for label in r.stages))

    def table(self) -> Any:
        from rich.table import Table

        elapsed = time.time() - self.started
        ended = sum(r.status != "RUNNING" for r in self.rows.values())
        t = Table(title=f"gptlab submit: {ended}/{len(self.rows)} runs ended, {elapsed:.0f}s", title_justify="left")
        labels = self.labels
        for col in ("run", *labels, "step", "tok/s", "loss", "val/bpb", "status"):
            t.add_column(col, justify="right" if col in ("step", "tok/s", "loss", "val/bpb") else "left", no_wrap=True)
        for r in self.rows.values():
            step = f"{r.step}/{r.max_steps}" if r.step is not None else "-"
            t.add_row(
                r.name,
                *(_styled(str(r.stages.get(k, "-"))) for k in labels),
                step,
                f"{r.tokens_per_sec:,.0f}" if r.tokens_per_sec else "-",
                f"{r.loss:.4f}" if r.loss is not None else "-",
                f"{r.val_bpb:.4f}" if r.val_bpb is not None else "-",
                _styled(r.status),
            )
        return t


def stage_line(label: str, state: StageState, stage_dir: Path) -> str:
    """One stage as a submit's first line about its run says it: ``train resuming from step 40``."""
    if state == StageState.RESUMING:
        return f"{label} resuming from step {resume_step(stage_dir)}"
    return f"{label} {state}"


STYLES = {"done": "green", "cached": "cyan", "FINISHED": "bold green", "running": "yellow", "retrying": "magenta",
          "resuming": "cyan", "interrupted": "magenta", "KILLED": "bold magenta", "pruned": "magenta",
          "PRUNED": "bold magenta", "failed": "bold red", "FAILED": "bold red", "not run": "dim"}  # fmt: skip


def _styled(state: str) -> str:
    style = STYLES.get(state)
    return f"[{style}]{state}[/{style}]" if style else state


class LineDisplay:
    """Plain lines: one when a stage changes state to done or failed, each training's step every ``every``
    seconds when it has moved since its last line. ``write=None`` is quiet mode."""

    def __init__(self, write: Callable[[str], None] | None, every: float = 10.0):
        self.write, self.every = write, every
        self.last_states: dict[tuple[str, str], StageState] = {}
        self.last_steps: dict[str, int | None] = {}
        self.last_progress = time.time()

    def say(self, msg: str) -> None:
        if self.write:
            self.write(msg)

    def update(self, board: Board) -> None:
        for r in board.rows.values():
            for label, state in r.stages.items():
                if state in (StageState.DONE, StageState.FAILED) and self.last_states.get((r.name, label)) != state:
                    self.say(f"  [{r.name}] {label} {state}")
                self.last_states[(r.name, label)] = state
        if time.time() - self.last_progress < self.every:
            return
        self.last_progress = time.time()
        for r in board.rows.values():
            training = StageState.RUNNING in r.stages.values() and r.step is not None
            if training and self.last_steps.get(r.name) != r.step:
                self.last_steps[r.name] = r.step
                self.say(
                    f"  [{r.name}] step {r.step}/{r.max_steps} loss {r.loss:.4f} {r.tokens_per_sec or 0:.0f} tok/s"
                )

    def close(self) -> None:
        pass


class LiveDisplay:
    """A rich table redrawn in place; messages scroll above it."""

    def __init__(self, console: Any = None, refresh_per_second: float = 2.0):
        from rich.console import Console
        from rich.live import Live

        self.console = console or Console()
        self.live = Live(
            console=self.console, refresh_per_second=refresh_per_second, transient=False, redirect_stdout=False,
            redirect_stderr=False,
        )  # fmt: skip
        self.board: Board | None = None

    def say(self, msg: str) -> None:
        self.console.print(msg, markup=False, highlight=False)

    def update(self, board: Board) -> None:
        if self.board is None:
            self.board = board
            self.live.start()
        self.live.update(board.table(), refresh=True)

    def close(self) -> None:
        if self.board is not None:
            self.live.update(self.board.table(), refresh=True)
            self.live.stop()
