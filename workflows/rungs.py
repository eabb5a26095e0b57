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

HyperBand (``prune: {method: hyperband}`` on a search; Li et al. 2018): brackets s = s_max .. 0 of the above over
the search's trials, bracket ``s`` starting its trials at ``max_steps * reduction_factor**-s`` steps; the trial
budget is shared between the brackets as Li et al.'s ``n_s`` are, and the brackets share one journal.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from llmcore.io import atomic_write_json


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
    """One bracket of synchronous successive halving over a set of runs (by run hash). While ``open`` (a
    HyperBand bracket whose trials are not all asked for yet), its first rung decides nothing."""

    def __init__(self, runs: list[str], rungs: list[int], reduction_factor: int, journal: Journal):
        self.runs, self.rungs, self.rf, self.journal = [], rungs, reduction_factor, journal
        self.rung: dict[str, int] = {}  # run -> the rung it trains to now
        self.pruned: dict[str, int] = {}  # run -> the rung it was pruned at
        self.open = False
        self._journaled = journal.read()
        for run in runs:
            self.add(run)

    def add(self, run: str) -> None:
        """A run joins the bracket (at its first rung, or where the journal's decisions took it)."""
        if run in self.rung:
            return
        self.runs.append(run)
        self.rung[run] = 0
        for d in self._journaled:
            if d.run == run:
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
        if not live or self.open:
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
        self._journaled += decisions
        return decisions

    def step(self, run: str, k: int) -> int:
        """The step of a run's rung ``k``."""
        return self.rungs[k]

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


# ------------------------------------------------------------------------------------------ HyperBand


def bracket_count(min_steps: int, reduction_factor: int, max_steps: int) -> int:
    """HyperBand's brackets: ``s_max + 1``, ``s_max = floor(log_eta(max_steps / min_steps))`` (integers: the largest
    ``s`` with ``min_steps * eta**s <= max_steps``; 0 when ``min_steps`` is past the end)."""
    s = 0
    while min_steps * reduction_factor ** (s + 1) <= max_steps:
        s += 1
    return s + 1


def hyperband_rungs(s: int, reduction_factor: int, max_steps: int) -> list[int]:
    """Bracket ``s``'s rungs: its trials start at ``r_s = max_steps * eta**-s`` steps (rounded down), and each rung
    is ``eta`` times the last, the last being ``max_steps``."""
    return [max_steps // reduction_factor ** (s - i) for i in range(s)] + [max_steps]


def li_trials(s_max: int, reduction_factor: int) -> list[int]:
    """Li et al.'s trials per bracket, ``n_s = ceil((s_max + 1) / (s + 1) * eta**s)`` for s = s_max .. 0: each
    bracket spends about the same steps."""
    return [-(-(s_max + 1) * reduction_factor**s // (s + 1)) for s in range(s_max, -1, -1)]


def split_trials(trials: int, weights: list[int]) -> list[int]:
    """``trials`` shared in proportion to ``weights`` (largest remainders), at least one each (``trials`` must be
    at least ``len(weights)``)."""
    total = sum(weights)
    quota = [trials * w / total for w in weights]
    n = [max(1, int(q)) for q in quota]
    while sum(n) < trials:
        i = max(range(len(n)), key=lambda i: (quota[i] - n[i], -i))
        n[i] += 1
    while sum(n) > trials:
        i = max((i for i in range(len(n)) if n[i] > 1), key=lambda i: (n[i] - quota[i], -i))
        n[i] -= 1
    return n


@dataclass(frozen=True)
class Bracket:
    """One HyperBand bracket: SHA over trials ``first .. first + trials - 1`` (numbered as they are asked for)."""

    s: int  # Li et al.'s s: its trials start at max_steps * eta**-s steps
    first: int
    trials: int
    rungs: tuple[int, ...]


def min_trials(min_steps: int, reduction_factor: int, max_steps: int) -> int:
    """The fewest trials a HyperBand search can have: one per bracket."""
    return bracket_count(min_steps, reduction_factor, max_steps)


def brackets(rounds: list[int], min_steps: int, reduction_factor: int, max_steps: int) -> list[Bracket]:
    """The brackets of a HyperBand search whose trial budget grew in ``rounds`` (the ``search.trials`` of its first
    submit, then what each raise added): each round is one pass of HyperBand's brackets, s = s_max .. 0, its
    trials shared between them as Li et al.'s ``n_s`` are (at least one each)."""
    count = bracket_count(min_steps, reduction_factor, max_steps)
    out, first = [], 0
    for trials in rounds:
        for k, n in enumerate(split_trials(trials, li_trials(count - 1, reduction_factor)[: min(count, trials)])):
            s = count - 1 - k
            out.append(Bracket(s, first, n, tuple(hyperband_rungs(s, reduction_factor, max_steps))))
            first += n
    return out


class Hyperband:
    """HyperBand's brackets, each a :class:`Halving` over its own trials, sharing one journal. A trial belongs to
    the bracket its number falls in; a bracket's first rung decides once all its trials were asked for (``asked``)
    and have reported there."""

    def __init__(self, layout: list[Bracket], reduction_factor: int, journal: Journal):
        self.layout = layout
        self.halvings = [Halving([], list(b.rungs), reduction_factor, journal) for b in layout]
        self.bracket: dict[str, int] = {}  # run -> its bracket's index in the layout
        self.asked(0)

    @property
    def budget(self) -> int:
        return sum(b.trials for b in self.layout)

    def bracket_of(self, number: int) -> int | None:
        """The bracket of trial ``number`` (None: past the layout)."""
        return next((i for i, b in enumerate(self.layout) if b.first <= number < b.first + b.trials), None)

    def add(self, run: str, number: int) -> int | None:
        """Trial ``number``'s run joins its bracket; returns the bracket's index."""
        i = self.bracket_of(number)
        if i is not None:
            self.bracket[run] = i
            self.halvings[i].add(run)
        return i

    def asked(self, trials: int) -> None:
        """The study has asked for ``trials`` trials: the brackets they complete can decide."""
        for b, h in zip(self.layout, self.halvings):
            h.open = trials < b.first + b.trials

    def of(self, run: str) -> Halving:
        return self.halvings[self.bracket[run]]

    @property
    def rung(self) -> dict[str, int]:
        return {r: k for h in self.halvings for r, k in h.rung.items()}

    @property
    def pruned(self) -> dict[str, int]:
        return {r: k for h in self.halvings for r, k in h.pruned.items()}

    def target(self, run: str) -> int | None:
        return self.of(run).target(run) if run in self.bracket else None

    def step(self, run: str, k: int) -> int:
        return self.of(run).rungs[k]

    def decide(self, scores: dict[str, float | None]) -> list[Decision]:
        """Every bracket's open rung that can decide now (see :meth:`Halving.decide`)."""
        return [d for h in self.halvings for d in h.decide(scores)]

    def plan_lines(self, max_steps: int) -> list[str]:
        """The brackets, their trials and rungs, for `gptlab plan`."""
        out = []
        for i, b in enumerate(self.layout):
            n, reach = b.trials, []
            for steps in b.rungs:
                reach.append(f"{steps} ({n})")
                n = survivors(n, self.halvings[i].rf)
            out.append(f"  bracket {i} (s={b.s}): trials {b.first}-{b.first + b.trials - 1} ({b.trials}), "
                       f"rungs at steps (trials reaching them): {', '.join(reach)}")  # fmt: skip
        most = sum(halving_cost(b.trials, list(b.rungs), self.halvings[0].rf)[0] for b in self.layout)
        out.append(f"  at most {most:,} steps over every trial, {100 * most / (self.budget * max_steps):.1f}% of "
                   f"training all {self.budget} trials to {max_steps} steps")  # fmt: skip
        return out


class Layout:
    """Where a HyperBand search's rounds (its trial budget as it grew over submits) are kept:
    ``<runs_root>/studies/<spec hash>.brackets.json``, written by the driver only."""

    def __init__(self, path: Path):
        self.path = path

    def rounds(self) -> list[int]:
        try:
            return [int(n) for n in json.loads(self.path.read_text())["rounds"]]
        except FileNotFoundError:
            return []

    def grow(self, trials: int) -> list[int]:
        """The rounds for a budget of ``trials``: those recorded, plus one for the trials beyond them (recorded
        before any of them is asked for). A lower budget than recorded keeps the recorded one (brackets are not
        cut short)."""
        rounds = self.rounds()
        if trials > sum(rounds):
            rounds.append(trials - sum(rounds))
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.path, {"rounds": rounds})
        return rounds
