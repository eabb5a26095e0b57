"""Successive halving that waits (``prune: {method: sha}``): rungs decided once every point has reached them.

Synchronous successive halving (Jamieson & Talwalkar 2016; the inner loop of Li et al.'s HyperBand, as Ray Tune's
``HyperBandScheduler`` pauses and resumes trials): every point trains to the first rung (``min_steps``) and stops
there with a validation estimate and a committed checkpoint (``train.pause_at``). Once every live point has
reported at the rung, or failed, the best ``1/reduction_factor`` of them (at least one; ties broken by run hash,
so the result never depends on the order points come in) are promoted and resume from their checkpoints to the
next rung (``min_steps * reduction_factor**k``, the last rung being ``train.max_steps``); the others are pruned,
their checkpoints kept.

Every decision is appended to a journal (``<runs_root>/studies/<spec hash>.rungs.jsonl``, flushed and fsynced)
*before* it is acted on: a driver killed mid-rung is continued by the next submit from the journal, a decision is
never taken twice, and no point trains past a rung twice (a point paused at its rung is not launched again until
its rung decides).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path


def rung_steps(min_steps: int, reduction_factor: int, max_steps: int) -> list[int]:
    """The steps a point is judged at: ``min_steps * reduction_factor**k`` below ``max_steps``, then ``max_steps``."""
    steps, s = [], min_steps
    while s < max_steps:
        steps.append(s)
        s *= reduction_factor
    return [*steps, max_steps]


def survivors(n: int, reduction_factor: int) -> int:
    """How many of ``n`` points a rung promotes: the best ``n // reduction_factor``, at least one."""
    return max(1, n // reduction_factor)


@dataclass(frozen=True)
class Decision:
    """One point at one rung: promoted to the next rung, or pruned there."""

    run: str  # run hash
    rung: int  # the rung decided (0: the first)
    promoted: bool
    score: float | None  # its validation estimate at the rung (None: it failed)


class Journal:
    """An append-only JSON-lines file of decisions, each fsynced before it is acted on."""

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> list[Decision]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            try:
                d = json.loads(line)
                out.append(Decision(d["run"], int(d["rung"]), bool(d["promoted"]), d.get("score")))
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line (the driver was killed while writing it): not a decision
        return out

    def append(self, decisions: list[Decision]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            for d in decisions:
                f.write(json.dumps({"run": d.run, "rung": d.rung, "promoted": d.promoted, "score": d.score,
                                    "at": round(time.time(), 3)}) + "\n")  # fmt: skip
            f.flush()
            os.fsync(f.fileno())


class Halving:
    """One bracket of synchronous successive halving over a set of runs (by run hash)."""

    def __init__(self, runs: list[str], rungs: list[int], reduction_factor: int, journal: Journal):
        self.runs, self.rungs, self.rf, self.journal = list(runs), rungs, reduction_factor, journal
        self.rung: dict[str, int] = dict.fromkeys(self.runs, 0)  # run -> the rung it trains to now
        self.pruned: dict[str, int] = {}  # run -> the rung it was pruned at
        for d in journal.read():
            if d.run in self.rung:
                self._apply(d)

    def _apply(self, d: Decision) -> None:
        if d.promoted:
            self.rung[d.run] = max(self.rung[d.run], d.rung + 1)
        else:
            self.pruned[d.run] = d.rung

    @property
    def last(self) -> int:
        return len(self.rungs) - 1

    def target(self, run: str) -> int | None:
        """The step this run may train to now (``train.pause_at``), or None: its rung is the last (to the end)."""
        k = self.rung[run]
        return None if k >= self.last else self.rungs[k]

    def live(self) -> list[str]:
        return [r for r in self.runs if r not in self.pruned]

    def decide(self, scores: dict[str, float | None]) -> list[Decision]:
        """The decisions of the lowest open rung, once every live point on it has a score there (``scores``: run ->
        its estimate at its current rung, None when it failed; points not yet at their rung are left out), else [].
        The decisions are journaled before they are returned."""
        live = [r for r in self.live() if self.rung[r] < self.last]
        if not live:
            return []
        k = min(self.rung[r] for r in live)
        at = [r for r in live if self.rung[r] == k]
        if any(r not in scores for r in at):
            return []  # a straggler: the rung waits for it
        ok = sorted((r for r in at if scores[r] is not None), key=lambda r: (scores[r], r))
        keep = set(ok[: survivors(len(at), self.rf)])
        decisions = [Decision(r, k, r in keep, scores[r]) for r in sorted(at)]
        self.journal.append(decisions)
        for d in decisions:
            self._apply(d)
        return decisions

    def plan_lines(self) -> list[str]:
        """The rungs and how many points reach each, for `gptlab plan`."""
        n, out = len(self.runs), []
        for k, steps in enumerate(self.rungs):
            out.append(f"  rung {k}: {steps} steps, {n} point(s)")
            n = survivors(n, self.rf)
        return out


def halving_cost(points: int, rungs: list[int], reduction_factor: int) -> tuple[int, int]:
    """(total steps trained at most, steps of a full grid) for ``points`` points."""
    total, n, before = 0, points, 0
    for steps in rungs:
        total += n * (steps - before)
        before, n = steps, survivors(n, reduction_factor)
    return total, points * rungs[-1]
