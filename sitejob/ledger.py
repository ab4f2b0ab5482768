"""The gather's range bookkeeping for one site job: a pure core (no I/O, no clock).

The gather (:mod:`sitejob.gather`) feeds it what it hears from the broker
(results, heartbeats, the server's max-deliveries advisories, snapshots of
the ranges stream) with the time ``now`` (monotonic seconds); the ledger
answers with :class:`Decision` values that say what to do, and the line to
make durable in ``DIR/ledger.jsonl`` *before* doing it. It keeps:

* ``committed``: the ranges whose journal line is durable (replayed from
  ``DIR/journal.jsonl`` at start, then added by :meth:`RangeLedger.commit`
  once the gather made the line durable);
* per range: its current generation (0 at submit, +1 at each deliberate
  re-publication), its failed attempts and their reasons (replayed from
  ``DIR/ledger.jsonl``), when it was last heard of (a heartbeat or a
  result: memory only), when it was last republished;
* abandoned ranges with the reason; counters (retries, re-publications,
  duplicates, refused messages by kind, ranges committed per node).

A range's life (``docs/SITE_JOBS.md``, "The gather")::

    published --ok result, output verified, journal line durable--> committed
        |  ^
        |  +-- failed result of the current generation, attempts left: retry (generation + 1)
        |  +-- neither committed, in the stream nor heard of for 2 x ack_wait: republish (+1)
        +----- failed result, no attempts left / max-deliveries advisory --> abandoned

Decisions, by input:

* an ok result: ``ACCEPT`` (the gather verifies and commits it, then calls
  :meth:`~RangeLedger.commit`, or :meth:`~RangeLedger.output_refused` when
  the output does not match) unless the range is committed or being
  committed: ``DUPLICATE``. A range that was abandoned is still accepted:
  a good output is never thrown away (committing lifts the abandonment).
* a failed result: of an older generation, or of a range committed,
  abandoned or being committed: already counted, ``STALE`` (a second copy
  of one failure must not use two attempts); else one more attempt:
  ``RETRY`` with the next generation below ``max_attempts``, ``ABANDON`` at it.
* a max-deliveries advisory (every node that ran it died): ``ABANDON``,
  unless committed, being committed or abandoned already (None).
* :meth:`~RangeLedger.reconcile`: ``REPUBLISH`` every range neither
  committed, abandoned, being committed, in the ranges stream, heard of nor
  republished within 2 x ack_wait; nothing during the first 2 x ack_wait
  after the gather started (what was in flight before a restart is heard
  of again by then).

Invariants: a range is committed at most once (``commit`` of a committed
range is refused); a range is never both committed and abandoned; the
generation of a range only grows, and a decision that raises it carries
the ledger line that records it (the gather fsyncs that line before
publishing, so a restarted gather never reuses a generation, whose message
id the broker would drop as a duplicate). Replaying ``ledger.jsonl`` gives
back generations, attempts and abandonments; a torn last line (the gather
died mid-append) was never acted on and is ignored.
"""

from __future__ import annotations

import enum
import json
import math
from collections import Counter
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from runner.exceptions import JournalError
from runner.scatter import KEPT_FAILURES, Plan, TaskSet

MAX_REASON = 500  # characters of one abandonment's reason kept


class Verdict(enum.Enum):
    ACCEPT = "accept"  # an ok result of a range not committed: verify, commit
    DUPLICATE = "duplicate"  # the range is committed or being committed already
    STALE = "stale"  # a failure already counted (older generation, second copy)
    RETRY = "retry"  # a failure counted; publish ``generation``
    ABANDON = "abandon"  # no attempts left, or every node that ran it died
    REPUBLISH = "republish"  # lost (reconciler); publish ``generation``


class Action(enum.Enum):
    """What a ``ledger.jsonl`` line records."""

    RETRY = "retry"
    REPUBLISH = "republish"
    ABANDON = "abandon"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    task: int
    generation: int  # RETRY/REPUBLISH: the generation to publish; else the current one
    line: str | None = None  # the ledger.jsonl line to make durable before acting
    reason: str = ""


@dataclass
class LedgerReplay:
    """What ``ledger.jsonl`` says: see :func:`replay_ledger`."""

    generations: dict[int, int] = field(default_factory=dict)
    attempts: dict[int, int] = field(default_factory=dict)
    reasons: dict[int, list[str]] = field(default_factory=dict)
    abandoned: dict[int, str] = field(default_factory=dict)
    retries: int = 0
    republished: int = 0
    good_bytes: int = 0  # length of the complete lines (a torn tail starts here)


def ledger_line(
    action: Action, task: int, generation: int, *, attempts: int = 0, reason: str = ""
) -> str:
    d: dict[str, Any] = {"action": action.value, "task": task, "generation": generation}
    if action is not Action.REPUBLISH:
        d["attempts"] = attempts
        d["reason"] = reason
    return json.dumps(d) + "\n"


def replay_ledger(lines: Iterable[bytes], plan: Plan) -> LedgerReplay:
    """Generations, attempts and abandonments from ``ledger.jsonl``'s lines
    (as a file opened in binary mode yields them).

    A last line without its newline is torn (never acted on) and ignored;
    ``good_bytes`` says where it starts, so the writer can cut it.

    Raises:
        JournalError: a complete line is malformed or names a range outside
            ``plan``.
    """
    out = LedgerReplay()
    for number, raw in enumerate(lines, start=1):
        if not raw.endswith(b"\n"):
            break  # torn: never acted on
        try:
            d = json.loads(raw)
            action = Action(d["action"])
            task, generation = int(d["task"]), int(d["generation"])
            attempts = int(d.get("attempts", 0))
            reason = str(d.get("reason", ""))
        except (ValueError, KeyError, TypeError) as exc:
            raise JournalError(f"ledger line {number} is malformed: {raw[:80]!r}") from exc
        if not 0 <= task < plan.tasks or generation < 0 or attempts < 0:
            raise JournalError(f"ledger line {number}: task {task} is outside the plan")
        out.generations[task] = max(out.generations.get(task, 0), generation)
        if action is Action.REPUBLISH:
            out.republished += 1
        else:
            out.attempts[task] = max(out.attempts.get(task, 0), attempts)
        if action is Action.RETRY:
            out.retries += 1
            out.reasons.setdefault(task, []).append(reason)
        elif action is Action.ABANDON:
            out.abandoned[task] = reason
        out.good_bytes += len(raw)
    return out


def journal_commit_line(plan: Plan, task: int, *, node: str, generation: int, attempt: int) -> str:
    """A commit line of ``journal.jsonl``: :func:`runner.scatter.replay_journal`'s
    keys (``worker`` is 0: site ranges run on nodes, named by ``node``) plus
    ``node`` and ``generation``."""
    r = plan.range_of(task)
    d = {
        "task": task,
        "first": r.first,
        "count": r.count,
        "attempt": attempt,
        "worker": 0,
        "node": node,
        "generation": generation,
    }
    return json.dumps(d) + "\n"


def nodes_from_journal(lines: Iterable[str]) -> Counter[str]:
    """Ranges committed per node, from ``journal.jsonl``'s complete commit lines
    (the header and lines without ``node`` are skipped; the journal itself
    was already checked by ``replay_journal``)."""
    nodes: Counter[str] = Counter()
    for number, line in enumerate(lines):
        if number == 0 or not line.endswith("\n"):
            continue
        try:
            node = json.loads(line).get("node")
        except (ValueError, AttributeError):
            continue
        if isinstance(node, str):
            nodes[node] += 1
    return nodes


class RangeLedger:
    """One site job's ranges as the gather knows them; see the module docstring.

    ``started`` is the (monotonic) time the gather started: the reconciler
    waits 2 x ``ack_wait`` after it. ``committed`` comes from the journal,
    ``history`` from ``ledger.jsonl``, ``nodes`` from the journal's lines.
    """

    def __init__(
        self,
        plan: Plan,
        *,
        ack_wait: float,
        max_attempts: int,
        started: float,
        committed: TaskSet | None = None,
        history: LedgerReplay | None = None,
        nodes: Counter[str] | None = None,
    ) -> None:
        if ack_wait <= 0 or max_attempts < 1:
            raise ValueError("ack_wait must be > 0 and max_attempts >= 1")
        self.plan = plan
        self.ack_wait = ack_wait
        self.max_attempts = max_attempts
        self.started = started
        self.committed = committed.copy() if committed is not None else TaskSet()
        bounds = self.committed.bounds()
        if bounds is not None and (bounds[0] < 0 or bounds[1] >= plan.tasks):
            raise JournalError(f"committed range {bounds[1]} is outside the plan")
        h = history or LedgerReplay()
        self.generations = dict(h.generations)
        self.attempts = dict(h.attempts)
        self.reasons = {t: list(r) for t, r in h.reasons.items()}
        # The journal wins over ledger.jsonl: a range committed after it was
        # abandoned (a late good result) is committed.
        self.abandoned = {t: r for t, r in h.abandoned.items() if t not in self.committed}
        self.retries = h.retries
        self.republished = h.republished
        self.nodes: Counter[str] = Counter(nodes or {})
        self.duplicates = 0
        self.refused: Counter[str] = Counter()
        self.committing: set[int] = set()  # accepted, output being made durable
        self.heard: dict[int, float] = {}  # last heartbeat or result, uncommitted ranges
        self.last_published: dict[int, float] = {}  # our last publication, uncommitted ranges

    # --- queries
    def generation(self, task: int) -> int:
        return self.generations.get(task, 0)

    @property
    def events_committed(self) -> int:
        return sum(self.plan.events_in(a, b) for a, b in self.committed.ranges())

    @property
    def finished(self) -> bool:
        """Every range is committed or abandoned, and nothing is being committed."""
        return not self.committing and len(self.committed) + len(self.abandoned) == (
            self.plan.tasks
        )

    def open_tasks(self) -> Iterator[int]:
        """Ranges neither committed, abandoned nor being committed, in order."""
        t = self.committed.first_absent(0)
        while t < self.plan.tasks:
            if t not in self.abandoned and t not in self.committing:
                yield t
            t = self.committed.first_absent(t + 1)

    def retrying(self) -> int:
        """Ranges with a failed attempt that are neither committed nor abandoned."""
        return sum(1 for t in self.attempts if t not in self.committed and t not in self.abandoned)

    def status(self) -> dict[str, Any]:
        """The job as the ledger knows it (the gather adds what it knows besides)."""
        abandoned = [
            {
                "task": t,
                "first": self.plan.range_of(t).first,
                "count": self.plan.range_of(t).count,
                "reason": self.abandoned[t],
            }
            for t in sorted(self.abandoned)[:KEPT_FAILURES]
        ]
        return {
            "job": self.plan.job,
            "events_planned": self.plan.events,
            "events_committed": self.events_committed,
            "ranges": {
                "planned": self.plan.tasks,
                "finished": len(self.committed),
                "retrying": self.retrying(),
                "abandoned": len(self.abandoned),
            },
            "nodes": dict(sorted(self.nodes.items())),
            "retries": self.retries,
            "republished": self.republished,
            "duplicates": self.duplicates,
            "refused": dict(sorted(self.refused.items())),
            "abandoned": abandoned,
            "complete": self.finished,
        }

    # --- what the broker says
    def heard_of(self, task: int, now: float) -> None:
        """A heartbeat (or a result) for ``task``: somebody holds it."""
        if 0 <= task < self.plan.tasks and task not in self.committed:
            self.heard[task] = now

    def refuse(self, kind: str) -> None:
        """A message that is not a valid one of this job (``kind`` says why)."""
        self.refused[kind] += 1

    def on_result(
        self, task: int, generation: int, ok: bool, node: str, reason: str | None, now: float
    ) -> Decision:
        """A result of range ``task`` (already checked against the plan)."""
        self.heard_of(task, now)
        if task in self.committed or task in self.committing:
            self.duplicates += 1
            return Decision(Verdict.DUPLICATE, task, self.generation(task))
        if ok:
            self.committing.add(task)
            return Decision(Verdict.ACCEPT, task, self.generation(task))
        return self._failed(task, generation, f"node {node}: {reason or 'failed'}", now)

    def output_refused(
        self, task: int, generation: int, kind: str, reason: str, now: float
    ) -> Decision:
        """An accepted result's output does not match what it claims (size,
        SHA-256, missing object): refused, and a failed attempt of the range."""
        self.committing.discard(task)
        self.refuse(kind)
        return self._failed(task, generation, reason, now)

    def release(self, task: int) -> None:
        """An accepted result could not be verified for want of the broker:
        neither committed nor counted (it is redelivered)."""
        self.committing.discard(task)

    def commit(self, task: int, node: str) -> None:
        """The accepted range's journal line is durable.

        Raises:
            ValueError: the range is committed already (a gather bug).
        """
        if not self.committed.add(task):
            raise ValueError(f"range {task} is committed already")
        self.committing.discard(task)
        self.nodes[node] += 1
        self.abandoned.pop(task, None)
        self.heard.pop(task, None)
        self.last_published.pop(task, None)
        self.attempts.pop(task, None)
        self.reasons.pop(task, None)

    def attempt_of(self, task: int) -> int:
        """The number of the attempt that is running (1 before any failure)."""
        return self.attempts.get(task, 0) + 1

    def max_deliveries(self, task: int, deliveries: int) -> Decision | None:
        """The server gave up delivering range ``task`` (every holder died)."""
        if task in self.committed or task in self.committing or task in self.abandoned:
            return None
        if not 0 <= task < self.plan.tasks:
            return None
        reason = (
            f"delivered {deliveries} times and never reported: every node that ran it "
            "died or went silent (max deliveries)"
        )
        return self._abandon(task, reason)

    def reconcile(self, now: float, in_stream: Collection[int]) -> list[Decision]:
        """Ranges lost by the broker or by a dead second holder: ``REPUBLISH``
        each with its next generation (see the module docstring).

        ``in_stream``: the ranges with a message in the ranges stream (ready,
        running or dead), taken after every result published before it was
        processed.
        """
        quiet = 2 * self.ack_wait
        if now < self.started + quiet:
            return []
        out = []
        never = -math.inf
        for t in self.open_tasks():
            if t in in_stream:
                continue
            if now - self.heard.get(t, never) < quiet:
                continue
            if now - self.last_published.get(t, never) < quiet:
                continue
            g = self.generation(t) + 1
            self.generations[t] = g
            self.last_published[t] = now
            self.republished += 1
            out.append(Decision(Verdict.REPUBLISH, t, g, ledger_line(Action.REPUBLISH, t, g)))
        return out

    # --- internals
    def _failed(self, task: int, generation: int, reason: str, now: float) -> Decision:
        current = self.generation(task)
        if task in self.committed or task in self.committing or task in self.abandoned:
            self.duplicates += 1
            return Decision(Verdict.STALE, task, current)
        if generation < current:
            # That generation's failure was counted when it first arrived
            # (this is a redelivered copy, or the other holder's report).
            self.duplicates += 1
            return Decision(Verdict.STALE, task, current)
        n = self.attempts.get(task, 0) + 1
        self.attempts[task] = n
        kept = self.reasons.setdefault(task, [])
        text = f"attempt {n} (generation {generation}): {reason}"
        kept.append(text)
        if n >= self.max_attempts:
            return self._abandon(task, "; ".join(kept))
        g = max(current, generation) + 1
        self.generations[task] = g
        self.last_published[task] = now
        self.retries += 1
        line = ledger_line(Action.RETRY, task, g, attempts=n, reason=text)
        return Decision(Verdict.RETRY, task, g, line, text)

    def _abandon(self, task: int, reason: str) -> Decision:
        if len(reason) > MAX_REASON:
            reason = reason[: MAX_REASON - 3] + "..."
        self.abandoned[task] = reason
        g = self.generation(task)
        line = ledger_line(
            Action.ABANDON, task, g, attempts=self.attempts.get(task, 0), reason=reason
        )
        return Decision(Verdict.ABANDON, task, g, line, reason)
