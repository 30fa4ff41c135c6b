"""The request loop's bookkeeping and its pure rules, none of which needs a broker or a
database: what became of each delivery (`Outcome`), how its delivery is settled
(`settlement`, the one place that decides), how a batch is cut into segments and runs,
copies of one envelope in a batch, which stored requests publish their effects again, and
where replies may go."""

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aodm import topology
from aodm.envelope import Envelope
from aodm.transport import Delivery, Message
from shared import effects as outgoing
from shared.actions import FENCED, Action
from shared.effects import Effects


@dataclass
class Outcome:
    delivery: Delivery
    env: Envelope | None = None
    action: Action | None = None
    request: Any = None
    action_name: str | None = None
    caller: str | None = None
    caller_is_handle: bool = False
    reply: bytes | None = None
    effects: Effects = outgoing.NONE
    code: str = "ok"
    duplicate: bool = False
    # Found stored on its first try: taken before this delivery came (a replay, a resend or
    # a redelivery), not by an earlier try of this very handling (a run retried one by one).
    stored_earlier: bool = False
    tried: bool = False  # a handler has run for it (its statement may have committed)
    poison: bool = False
    failures: int = 0
    left: bool = False  # stopping while the database was away: nothing done, nothing answered
    committed: list[Callable[[], None]] = field(default_factory=list)  # Context.on_commit's

    @property
    def request_id(self) -> str | None:
        return self.env.id if self.env else None


class Settle(enum.Enum):
    ACK = "ack"  # answered: acknowledged once its answer is confirmed
    DEAD_LETTER = "dead-letter"  # poison: rejected into the dead letters, then answered `internal`
    LEAVE = "leave"  # not this worker's to answer: the broker gives it back (to the shard's new owner, or after a restart)


def settlement(outcome: Outcome) -> Settle:
    """How a request's delivery is settled: the one place that decides it."""
    if outcome.left or outcome.code == FENCED:
        return Settle.LEAVE
    if outcome.poison:
        return Settle.DEAD_LETTER
    return Settle.ACK


def is_read(outcome: Outcome) -> bool:
    return outcome.code == "ok" and outcome.action is not None and outcome.action.mode == "dryrun"


def sends(outcomes: list[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if o.code == "ok" and o.action is not None and o.action.mode == "send"]


def segments(outcomes: list[Outcome]) -> list[list[Outcome]]:
    """Consecutive sends that keep their own record, of one action, are a segment; so is
    whatever lies between them."""
    cut: list[list[Outcome]] = []
    for outcome in outcomes:
        last = cut[-1][0].action if cut else None
        assert outcome.action is not None
        if last is not None and (last is outcome.action or not (last.own_record or outcome.action.own_record)):
            cut[-1].append(outcome)
        else:
            cut.append([outcome])
    return cut


def runs(outcomes: list[Outcome], batched: bool) -> list[list[Outcome]]:
    """Consecutive requests of one batched action go to its handler together."""
    cut: list[list[Outcome]] = []
    for outcome in outcomes:
        assert outcome.action is not None
        if batched and outcome.action.batched and cut and cut[-1][0].action is outcome.action:
            cut[-1].append(outcome)
        else:
            cut.append([outcome])
    return cut


def firsts(batch: list[Outcome]) -> tuple[list[Outcome], list[tuple[Outcome, Outcome]]]:
    """The first of each envelope, and the copies behind them (a client resent it while the
    first was still waiting in the same batch), each with its first. Clears what an earlier
    try of this batch found."""
    first: dict[str, Outcome] = {}
    copies = []
    for outcome in batch:
        assert outcome.env is not None
        outcome.reply, outcome.effects, outcome.duplicate, outcome.stored_earlier = None, outgoing.NONE, False, False
        outcome.committed = []
        if outcome.env.id in first:
            copies.append((outcome, first[outcome.env.id]))
        else:
            first[outcome.env.id] = outcome
    return list(first.values()), copies


def answer_copies(copies: list[tuple[Outcome, Outcome]]) -> None:
    for copy, first in copies:
        copy.code, copy.reply, copy.caller, copy.duplicate = first.code, first.reply, first.caller, True


def no_effects_for_replays(outcomes: list[Outcome]) -> None:
    """A request found stored publishes its effects again only when the broker redelivers
    it. The services acknowledge a request once its effects are confirmed, so a request
    whose effects may not have gone out is still unacknowledged, and the broker hands that
    very delivery back flagged `redelivered` (after a crash, a lost channel or a hand-back).
    A new publish of a stored envelope (a client's resend, anyone's replay) is never flagged:
    it gets the first reply, and nobody's queue gets anything more. Per Id: a resend can
    share a batch with the redelivered original, ahead of it."""
    redelivered = {o.request_id for o in outcomes if o.delivery.redelivered}
    for outcome in outcomes:
        if outcome.stored_earlier and outcome.request_id not in redelivered:
            outcome.effects = outgoing.NONE


def replies(outcomes: list[Outcome]) -> list[Message]:
    """Only where the requester itself receives (topology.may_reply_to): a request naming
    any other queue is refused, and its refusal goes nowhere. Transient (persisting a reply
    buys nothing and costs the broker a disk write before it confirms) and not vouched for."""
    return [
        Message("", o.delivery.reply_to, o.reply, correlation_id=o.delivery.correlation_id or o.request_id,
                persistent=False, vouched=False)
        for o in outcomes if o.delivery.reply_to and o.reply is not None and topology.may_reply_to(o.delivery.reply_to)
    ]
