"""The request loop's pure parts, without a broker or a database: how a batch is cut into
segments and runs, how copies of one envelope in a batch are told apart, and which stored
requests publish their effects again (shared/outcomes.py)."""

from dataclasses import dataclass

import msgspec

from aodm.session_api import GetCurrentKey, RotateSessionKey, SendMessage
from shared import effects
from shared.actions import FENCED, Action
from shared.outcomes import Outcome, Settle, answer_copies, firsts, no_effects_for_replays, runs, segments, settlement


async def _handler(ctx: object, req: object) -> None:
    return None


SEND = Action(SendMessage, _handler, "send", batched=True, own_record=True)
ROTATE = Action(RotateSessionKey, _handler, "send")
READ = Action(GetCurrentKey, _handler, "dryrun")
SOME_EFFECTS = effects.Effects(messages=[])


@dataclass
class _Delivery:
    redelivered: bool = False


@dataclass
class _Envelope:
    id: str


def outcome(action: Action, request_id: str = "", redelivered: bool = False) -> Outcome:
    return Outcome(_Delivery(redelivered), _Envelope(request_id or f"id-{id(action)}"), action)  # type: ignore[arg-type]


def actions(groups: list[list[Outcome]]) -> list[list[Action]]:
    return [[o.action for o in group] for group in groups]


def test_sends_that_keep_their_own_record_are_a_segment_apart_from_what_lies_between():
    batch = [outcome(a) for a in (SEND, SEND, ROTATE, READ, ROTATE, SEND)]
    assert actions(segments(batch)) == [[SEND, SEND], [ROTATE, READ, ROTATE], [SEND]]


def test_a_batched_actions_consecutive_requests_are_one_run_unless_run_one_by_one():
    batch = [outcome(a) for a in (SEND, SEND, SEND, ROTATE, SEND)]
    assert actions(runs(batch, batched=True)) == [[SEND, SEND, SEND], [ROTATE], [SEND]]
    assert actions(runs(batch, batched=False)) == [[SEND]] * 3 + [[ROTATE], [SEND]]


def test_copies_of_one_envelope_in_a_batch_are_answered_as_the_first():
    first, other, copy = outcome(SEND, "a"), outcome(SEND, "b"), outcome(SEND, "a")
    unique, copies = firsts([first, other, copy])
    assert unique == [first, other] and copies == [(copy, first)]
    first.code, first.reply, first.caller = "ok", b"reply", "alice"
    answer_copies(copies)
    assert (copy.reply, copy.caller, copy.duplicate) == (b"reply", "alice", True)


def test_a_stored_request_publishes_its_effects_again_only_on_the_brokers_redelivery():
    replay, redelivered, resent_beside_it = outcome(SEND, "r"), outcome(SEND, "d", True), outcome(SEND, "d")
    for o in (replay, redelivered, resent_beside_it):
        o.stored_earlier, o.effects = True, SOME_EFFECTS
    fresh = outcome(SEND, "f")
    fresh.effects = SOME_EFFECTS
    no_effects_for_replays([replay, resent_beside_it, redelivered, fresh])
    assert replay.effects is effects.NONE  # a replay (or a client's resend) adds nothing
    assert redelivered.effects is SOME_EFFECTS and resent_beside_it.effects is SOME_EFFECTS  # per Id
    assert fresh.effects is SOME_EFFECTS


def test_each_delivery_is_settled_as_its_outcome_says():
    answered, refused, fenced, poison, left = (outcome(SEND) for _ in range(5))
    refused.code, fenced.code, poison.code, poison.poison, left.left = "forbidden", FENCED, "internal", True, True
    assert [settlement(o) for o in (answered, refused, fenced, poison, left)] == [
        Settle.ACK, Settle.ACK, Settle.LEAVE, Settle.DEAD_LETTER, Settle.LEAVE]


def test_a_retry_forgets_what_the_rolled_back_try_found():
    again = outcome(SEND, "a")
    again.reply, again.effects, again.duplicate, again.stored_earlier = b"old", SOME_EFFECTS, True, True
    again.committed = [lambda: None]
    firsts([again])
    assert (again.reply, again.effects, again.duplicate, again.stored_earlier, again.committed) == (
        None, effects.NONE, False, False, [])


def test_effects_stored_by_a_version_that_kept_activity_in_them_still_read():
    """Stored effects are positional (MessagePack arrays); older rows carry a third list."""
    old_row = msgspec.msgpack.encode([[["aodm.internal", "k", b"body"]], [], [["session-1", 5]]])
    read = effects.decode(old_row)
    assert read.messages == [effects.Outgoing("aodm.internal", "k", b"body")] and not read.notifications
    assert effects.merge([read]) == [effects.Message("aodm.internal", "k", b"body")]  # no activity report
