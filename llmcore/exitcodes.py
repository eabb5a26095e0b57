"""Exit codes of the llmcore command lines (``python -m llmcore.train``, ``python -m llmcore.evaluate``).

Torch-free, so the driver's retry policy and log reader can read them without importing torch. Every llmcore
entry point uses these and only these; ``MEANINGS`` says what each means to a user.
"""

from __future__ import annotations

OK = 0
#: An unexpected error (a traceback in the log): worth a retry.
FAILED = 1
#: Bad config, data, shards or checkpoint, or hardware the machine lacks: the same on every retry.
BAD_INPUT = 2
#: The output file system is full, over quota or read-only (EX_IOERR): no retry helps until space is freed;
#: the last committed checkpoint stays usable.
NO_SPACE = 74
#: Stopped at ``train.time_budget_s`` after a committed checkpoint (EX_TEMPFAIL): running it again resumes.
STOPPED_EARLY = 75
#: Stopped because it was asked to (a ``STOP`` request file in its directory, SIGTERM or SIGINT) after a
#: committed checkpoint: running it again resumes.
STOP_REQUESTED = 76

MEANINGS = {
    BAD_INPUT: "bad input, not retried",
    NO_SPACE: "file system full, over quota or read-only, not retried",
    STOPPED_EARLY: "stopped at train.time_budget_s after a committed checkpoint: submit again to resume",
    STOP_REQUESTED: "stopped on request after a committed checkpoint: submit again to resume",
}

#: Codes a retry cannot fix.
NOT_RETRIED = frozenset({BAD_INPUT, NO_SPACE, STOP_REQUESTED})
