"""Reading a failed training's train.log: its last try, the decisive error line, the lines before it, and
what its exit code means. Used by the driver (the error a failed run records) and by ``gptlab status``.

A training's stdout and stderr go to <train stage>/train.log, appended to by every try (Parsl retries,
re-submits). Parsl starts each try with the command it runs, between two markers; the second is LOG_TRY_END.
"""

from __future__ import annotations

from pathlib import Path

LOG_TAIL_LINES = 18  # lines of a failed training's log that submit shows under its error
LOG_TRY_END = "--> end executable <--"
LOG_READ = 256 * 1024  # bytes read from the end of a train.log: its last try is within them
TRACEBACK = "Traceback (most recent call last):"


def read_log(path: Path) -> str:
    """The end of a log file (LOG_READ bytes at most), or "" when it cannot be read."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - LOG_READ))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def last_try(text: str) -> list[str]:
    """The lines the last try of a training wrote (after Parsl's header of that try), blank ones at either end
    dropped."""
    at = text.rfind(LOG_TRY_END)
    return _strip_blank([x.rstrip() for x in (text[at + len(LOG_TRY_END) :] if at >= 0 else text).splitlines()])


def _strip_blank(lines: list[str]) -> list[str]:
    """``lines`` without the blank lines at either end."""
    nonblank = [i for i, x in enumerate(lines) if x.strip()]
    return lines[nonblank[0] : nonblank[-1] + 1] if nonblank else []


def failure_cause(lines: list[str]) -> tuple[str | None, int]:
    """(the decisive line(s) of a failed try's output, joined into one line, or None; the index where they start).

    After a traceback: the final exception's first line (``ValueError: ...``). Otherwise the message training
    prints for errors it handles (``error: ...`` or ``invalid training config:`` and the lines after it), or
    the last line written."""
    if not lines:
        return None, 0
    tb = max((i for i, x in enumerate(lines) if x == TRACEBACK), default=None)
    if tb is not None:
        at = next((i for i in range(tb + 1, len(lines)) if lines[i] and not lines[i][0].isspace()), None)
        if at is not None:
            return _clip(lines[at]), at
    at = max(
        (i for i, x in enumerate(lines) if x.startswith(("error:", "invalid training config:"))), default=len(lines) - 1
    )
    if lines[at].startswith("{"):  # the summary JSON training prints when it stops at its time budget
        return None, len(lines)
    text = lines[at].removeprefix("error:").strip()
    for x in (x.strip() for x in lines[at + 1 :]):
        if x:
            text += (" " if text.endswith(":") else "; ") + x
    return _clip(text), at


def lines_before(lines: list[str], at: int, n: int) -> list[str]:
    """About ``n`` lines before ``lines[at]``, never starting inside a traceback's frame: a traceback that fits
    in ``n + 8`` lines is shown from its first line, a longer one from a ``File ...`` line. Blank lines at
    either end are left out ([] when nothing but blanks precedes)."""
    start = max(0, at - n)
    tb = max((i for i in range(at) if lines[i] == TRACEBACK), default=None)
    if tb is not None and tb < start:
        if at - tb <= n + 8:
            start = tb
        else:
            start = next((i for i in range(start, at) if lines[i].startswith("  File ")), start)
    return _strip_blank(lines[start:at])


def _clip(line: str, limit: int = 500) -> str:
    return line if len(line) <= limit else line[: limit - 3] + "..."


def exit_meaning(code: int) -> str | None:
    """What a training's exit code says: llmcore.train's own codes, or the signal that killed it."""
    import signal

    from llmcore.exitcodes import MEANINGS

    if code in MEANINGS:
        return MEANINGS[code]
    sig = -code if code < 0 else code - 128 if 128 < code < 160 else None
    try:
        name = signal.Signals(sig).name if sig else None
    except ValueError:
        return None
    if name is None:
        return None
    return f"killed by {name}" + (" (out of memory, or a scheduler's limit?)" if name == "SIGKILL" else "")


def training_error(code: int, cause: str | None, log: Path | str, tries: int = 1) -> str:
    """One line: ``stage train failed (exit code 1; tried 3 times): ValueError: ... (full log: .../train.log)``."""
    meaning = exit_meaning(code)
    head = f"exit code {code}" + (f": {meaning}" if meaning else "") + (f"; tried {tries} times" if tries > 1 else "")
    return f"stage train failed ({head})" + (f": {cause}" if cause else "") + f" (full log: {log})"


def describe_failure(label: str, stage_dir: Path, exc: BaseException, tries: int = 1) -> str:
    """Why a stage failed. A training process that exited non-zero: one line with its exit code (and what it
    means), the final exception or error message of its last try and the path of its train.log, then the last
    LOG_TAIL_LINES lines of that try before the quoted error, under a header naming the log. Anything else:
    ``stage LABEL failed: ExceptionType: message``."""
    from parsl.app.errors import BashExitFailure

    log = stage_dir / "train.log"  # only a stage that is a process of its own (training) writes one
    if not log.is_file() or not isinstance(exc, BashExitFailure):
        text = " ".join(x.strip() for x in str(exc).splitlines() if x.strip()) or "(no message)"
        msg = f"stage {label} failed: {type(exc).__name__}: {text}"
        return msg + (f" (training log: {log})" if log.is_file() else "")
    lines = last_try(read_log(log))
    cause, at = failure_cause(lines)
    error = training_error(exc.exitcode, cause, log, tries)
    tail = lines_before(lines, at, LOG_TAIL_LINES)
    if tail:
        error += f"\n--- {log}: the last {len(tail)} lines before that error ---\n" + "\n".join(tail)
    return error


def lock_holder(stage_dir: Path) -> tuple[int, str] | None:
    """(pid, host) of the process that holds (or last held) a stage's lock, from the note it writes into the
    lock file (``pid N on HOST``): a running training's rank 0."""
    try:
        text = (stage_dir / ".lock").read_text(errors="replace").split()
    except OSError:
        return None
    if len(text) >= 4 and text[0] == "pid" and text[1].isdigit() and text[2] == "on":
        return int(text[1]), text[3]
    return None
