"""Where what gptlab does not print goes: Python warnings of the libraries it drives (Optuna, MLflow, Parsl, torch)
are written to a log file under runs_root, never to the terminal a user reads."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: The log of a submit's warnings, under its runs_root.
WARNINGS_LOG = Path("logs") / "warnings.log"


@contextmanager
def warnings_to(log_file: Path) -> Iterator[None]:
    """Within the block, every Python warning is appended to ``log_file`` (created at the first one) through
    ``logging.captureWarnings``, and none reaches stderr; as before afterwards."""
    logger = logging.getLogger("py.warnings")
    handler = logging.FileHandler(log_file, delay=True, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log_file.parent.mkdir(parents=True, exist_ok=True)
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        logger.removeHandler(handler)
        logger.propagate = propagate
        handler.close()
