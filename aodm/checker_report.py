"""What the checker saw, and the verdict, after RabbitMQ's Jepsen total-queue checker.

The checker collects three things: every SendMessage it signed (with the outcome the
system gave it), every message stored in the sessions (read back with QueryMessage), and
every NewMessage notification found in the recipients' queues. `judge` compares them.
"""

import json
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from aodm.notifications import notification_id

PENDING = "pending"  # no reply before the checker gave up: it may or may not have happened


@dataclass
class Sent:
    session: int
    sender: str
    recipient: str
    index: int  # the sender's publish order
    text: str
    message_id: str  # the envelope Id
    outcome: str = PENDING  # "ok", an error code, or PENDING
    seq: int | None = None  # from the Ok reply
    resends: int = 0


@dataclass
class Stored:
    session: int
    seq: int
    sender: str
    generation: int
    message_id: str
    text: str | None  # None: it did not decrypt with its generation's key


@dataclass
class Keys:
    """A session's key generations as read back, against the rotations the checker made."""

    session: int
    current: int  # GetCurrentKey's generation (0: none)
    present: list[int]  # generations GetKeyByGeneration found
    confirmed: int  # rotations that got an Ok reply (the first key included)
    unknown: int = 0  # rotations that never got a reply
    mismatched: int = 0  # generations whose key is not the one the checker rotated in

    def gaps(self) -> int:
        """Generations must be exactly 1..n, each holding the checker's key, with n the
        number of rotations made (a pending rotation may or may not count)."""
        missing = len(set(range(1, self.current + 1)) - set(self.present))
        extra = len([g for g in self.present if g > self.current])
        within = self.confirmed <= self.current <= self.confirmed + self.unknown
        off = 0 if within else abs(self.current - self.confirmed)
        return missing + extra + off + self.mismatched


@dataclass
class Note:
    recipient: str
    id: str
    message_id: str


@dataclass
class Report:
    sessions: int = 0
    senders: int = 0
    attempted: int = 0  # SendMessage envelopes published at least once
    confirmed: int = 0  # ... answered Ok
    refused: int = 0  # ... answered with an error (not expected to be stored)
    unconfirmed: int = 0  # ... never answered in time (may or may not be stored)
    resends: int = 0  # same envelope published again after no reply in time
    stored: int = 0  # messages read back through QueryMessage
    lost: int = 0  # confirmed, not stored
    duplicated: int = 0  # stored more than once (same plaintext)
    unexpected: int = 0  # stored but never sent, refused, undecryptable or from the wrong sender
    recovered: int = 0  # unconfirmed but stored (allowed: the reply was what got lost)
    order_violations: int = 0  # a sender's messages out of publish order in Seq
    order_checked: int = 0  # stored messages compared with the same sender's one before them in Seq
    seq_mismatches: int = 0  # the Ok reply's Seq is not the stored one
    generation_gaps: int = 0  # key generations not 1..n with the checker's keys
    notifications_expected: int = 0  # confirmed messages (one NewMessage each to the peer)
    notifications_missing: int = 0  # confirmed messages without a NewMessage for the peer
    notifications_duplicated: int = 0  # a NewMessage Id seen again (allowed: at-least-once)
    notifications_bad_id: int = 0  # a NewMessage whose Id is not the one derived from its request
    errors: dict[str, int] = field(default_factory=dict)  # error replies by code
    per_session: list[dict[str, Any]] = field(default_factory=list)
    examples: dict[str, list[str]] = field(default_factory=dict)  # a few of each problem
    elapsed_s: float = 0.0

    def problems(self) -> list[str]:
        found = [
            f"{name.replace('_', ' ')}: {getattr(self, name)}"
            for name in ("lost", "duplicated", "unexpected", "order_violations", "seq_mismatches",
                         "generation_gaps", "notifications_missing", "notifications_bad_id")
            if getattr(self, name)
        ]
        if not self.confirmed:
            found.append("nothing was confirmed: the run proves nothing")
        return found

    @property
    def ok(self) -> bool:
        return not self.problems()

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok, "problems": self.problems()}

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, sort_keys=True)

    def summary(self) -> str:
        line = (
            f"confirmed {self.confirmed}/{self.attempted}, stored {self.stored}, lost {self.lost}, "
            f"duplicated {self.duplicated}, unexpected {self.unexpected}, order violations "
            f"{self.order_violations} (of {self.order_checked} checked), generation gaps {self.generation_gaps}, notifications missing "
            f"{self.notifications_missing}/{self.notifications_expected}"
        )
        rows = [
            "aodm checker: " + ("OK" if self.ok else "FAILED"),
            f"  {self.sessions} sessions, {self.senders} senders, {self.elapsed_s:.1f}s",
            f"  {line}",
            f"  refused {self.refused}{f' {self.errors}' if self.errors else ''}, unconfirmed {self.unconfirmed}, recovered "
            f"{self.recovered}, resends {self.resends}, duplicate notifications {self.notifications_duplicated} "
            f"(allowed), seq mismatches {self.seq_mismatches}, notification id errors {self.notifications_bad_id}",
        ]
        rows += [f"  PROBLEM {p}" for p in self.problems()]
        rows += [f"  e.g. {kind}: {', '.join(items)}" for kind, items in self.examples.items() if items]
        return "\n".join(rows)


def _order_violations(messages: list[Stored], index_of: dict[str, int]) -> tuple[int, int]:
    """Per sender, walking the session in Seq order: how often a message follows one of the
    same sender's that was published after it (each break in the order counts once), and
    how many messages were compared with the sender's one before them."""
    last: dict[str, int] = {}
    seen: set[str] = set()
    violations = compared = 0
    for message in sorted(messages, key=lambda m: m.seq):
        if message.text not in index_of or message.text in seen:
            continue  # unexpected ones and duplicates are counted elsewhere
        seen.add(message.text)
        index = index_of[message.text]
        if message.sender in last:
            compared += 1
            violations += index < last[message.sender]
        last[message.sender] = index
    return violations, compared


def judge(sent: list[Sent], stored: list[Stored], keys: list[Keys], notes: list[Note], *,
          sessions: int, senders: int, elapsed_s: float) -> Report:
    by_text = {s.text: s for s in sent}
    counts = Counter(m.text for m in stored if m.text is not None)
    examples: dict[str, list[str]] = defaultdict(list)

    def example(kind: str, what: str) -> None:
        if len(examples[kind]) < 5:
            examples[kind].append(what)

    report = Report(sessions=sessions, senders=senders, elapsed_s=round(elapsed_s, 2))
    report.attempted = len(sent)
    report.errors = dict(Counter(s.outcome for s in sent if s.outcome not in ("ok", PENDING)))
    report.resends = sum(s.resends for s in sent)
    report.stored = len(stored)
    for s in sent:
        if s.outcome == "ok":
            report.confirmed += 1
            if not counts[s.text]:
                report.lost += 1
                example("lost", s.text)
        elif s.outcome == PENDING:
            report.unconfirmed += 1
            report.recovered += bool(counts[s.text])
        else:
            report.refused += 1
    for text, n in counts.items():
        if n > 1:
            report.duplicated += n - 1
            example("duplicated", text)
    for m in stored:
        origin = by_text.get(m.text) if m.text is not None else None
        if m.text is None or origin is None or origin.sender != m.sender or origin.outcome not in ("ok", PENDING):
            report.unexpected += 1
            example("unexpected", f"session {m.session} seq {m.seq} ({m.text or 'undecryptable'})")
        elif origin.seq is not None and origin.seq != m.seq and counts[m.text] == 1:
            report.seq_mismatches += 1
            example("seq_mismatch", f"{m.text}: replied {origin.seq}, stored {m.seq}")

    index_of = {s.text: s.index for s in sent}
    for k in keys:
        in_session = [m for m in stored if m.session == k.session]
        violations, compared = _order_violations(in_session, index_of)
        report.order_violations += violations
        report.order_checked += compared
        report.generation_gaps += k.gaps()
        report.per_session.append({
            "session": k.session, "stored": len(in_session), "order_violations": violations,
            "generations": k.current, "rotations_confirmed": k.confirmed, "generation_gaps": k.gaps(),
        })

    delivered = {(n.recipient, n.message_id) for n in notes}
    report.notifications_duplicated = len(notes) - len({(n.recipient, n.id) for n in notes})
    report.notifications_bad_id = sum(n.id != notification_id(n.message_id, "NewMessage", n.recipient) for n in notes)
    for s in sent:
        if s.outcome == "ok":
            report.notifications_expected += 1
            if (s.recipient, s.message_id) not in delivered:
                report.notifications_missing += 1
                example("notification_missing", s.text)
    report.examples = dict(examples)
    return report
