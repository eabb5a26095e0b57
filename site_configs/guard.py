"""``python -m site_configs.guard CMD ...``: start Parsl's interchange so that it goes when the driver goes.

Parsl's HighThroughputExecutor starts its interchange as a child of the driver (``interchange_launch_cmd``). Two
things go wrong with a plain child on a login node or a laptop:

- Ctrl-C in the terminal (SIGINT), and a scheduler's SIGTERM, reach the whole foreground process group: the
  interchange died with the driver's first ``^C`` and the driver, trying to shut Parsl down cleanly, waited for
  it. Here the interchange runs in a process group of its own; the driver handles the signal and stops the
  interchange itself.
- A driver killed with SIGKILL (the OOM killer, a dropped session) leaves the interchange running, and the worker
  pools it serves keep their nodes until walltime. Here the kernel sends the interchange SIGTERM when the driver
  dies (Linux ``PR_SET_PDEATHSIG``, kept across ``exec``); the pools then miss its heartbeats and exit after
  ``site.heartbeat_threshold_s``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit("usage: python -m site_configs.guard CMD [ARGS...]")
    parent = os.getppid()
    os.setpgid(0, 0)  # out of the terminal's foreground group: its signals are the driver's to handle
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: no parent-death signal, the heartbeats still end the pools
        pass
    if os.getppid() != parent:  # the driver died before the watch was set
        sys.exit(1)
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
