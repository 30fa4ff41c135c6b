"""The request loop's pure parts, without a broker or a database: how a batch is cut into
segments and runs, how copies of one envelope in a batch are told apart, and which stored
requests publish their effects again (shared/service.py)."""

from dataclasses import dataclass

from aodm.session_api import GetCurrentKey, RotateSessionKey, SendMessage
from shared import effects
from shared.service import Action, Outcome, _answer_copies, _firsts, _no_effects_for_replays, _runs, _segments


async def _handler(ctx: object, req: object) -> None:
    return None


SEND = Action(SendMessage, _handler, "send", batched=True, own_record=True)
ROTATE = Action(RotateSessionKey, _handler, "send")
READ = Action(GetCurrentKey, _handler, "dryrun")
SOME_EFFECTS = effects.Effects(activity=[])


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
    assert actions(_segments(batch)) == [[SEND, SEND], [ROTATE, READ, ROTATE], [SEND]]


def test_a_batched_actions_consecutive_requests_are_one_run_unless_run_one_by_one():
    batch = [outcome(a) for a in (SEND, SEND, SEND, ROTATE, SEND)]
    assert actions(_runs(batch, batched=True)) == [[SEND, SEND, SEND], [ROTATE], [SEND]]
    assert actions(_runs(batch, batched=False)) == [[SEND]] * 3 + [[ROTATE], [SEND]]


def test_copies_of_one_envelope_in_a_batch_are_answered_as_the_first():
    first, other, copy = outcome(SEND, "a"), outcome(SEND, "b"), outcome(SEND, "a")
    firsts, copies = _firsts([first, other, copy])
    assert firsts == [first, other] and copies == [(copy, first)]
    first.code, first.reply, first.caller = "ok", b"reply", "alice"
    _answer_copies(copies)
    assert (copy.reply, copy.caller, copy.duplicate) == (b"reply", "alice", True)


def test_a_stored_request_publishes_its_effects_again_only_on_the_brokers_redelivery():
    replay, redelivered, resent_beside_it = outcome(SEND, "r"), outcome(SEND, "d", True), outcome(SEND, "d")
    for o in (replay, redelivered, resent_beside_it):
        o.stored_earlier, o.effects = True, SOME_EFFECTS
    fresh = outcome(SEND, "f")
    fresh.effects = SOME_EFFECTS
    _no_effects_for_replays([replay, resent_beside_it, redelivered, fresh])
    assert replay.effects is effects.NONE  # a replay (or a client's resend) adds nothing
    assert redelivered.effects is SOME_EFFECTS and resent_beside_it.effects is SOME_EFFECTS  # per Id
    assert fresh.effects is SOME_EFFECTS
