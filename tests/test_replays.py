"""Which stored requests publish their effects again (shared.outcomes.no_effects_for_replays):
pure logic, no broker or database."""

from dataclasses import dataclass

from aodm.notifications import NewMessage
from shared import effects
from shared.outcomes import Outcome, no_effects_for_replays


@dataclass
class Arrival:  # what the rule reads of a delivery
    redelivered: bool


@dataclass
class Env:
    id: str


NOTE = effects.Effects(notifications=[NewMessage(id="n", handle="bob", at=1, session_id="s", message_id="m", seq=1,
                                                 sender="alice", generation=1, timestamp=1, content="c")])


def outcome(request_id: str, *, redelivered: bool = False, stored_earlier: bool = False) -> Outcome:
    return Outcome(delivery=Arrival(redelivered), env=Env(request_id), effects=NOTE, duplicate=stored_earlier,
                   stored_earlier=stored_earlier)


def test_a_replay_publishes_nothing_and_a_redelivery_publishes_again():
    replay, redelivery, new = outcome("a", stored_earlier=True), outcome("b", redelivered=True, stored_earlier=True), outcome("c")
    no_effects_for_replays([replay, redelivery, new])
    assert (replay.effects, redelivery.effects, new.effects) == (effects.NONE, NOTE, NOTE)


def test_a_resend_ahead_of_its_redelivered_original_in_one_batch_publishes():
    resend, original = outcome("a", stored_earlier=True), outcome("a", redelivered=True, stored_earlier=True)
    no_effects_for_replays([resend, original])
    assert resend.effects == NOTE


def test_a_request_stored_by_an_earlier_try_of_the_same_handling_publishes():
    """A run retried one by one finds what its first try stored: not a replay."""
    retried = outcome("a")
    retried.duplicate = True  # stored before this try, by the first one: stored_earlier stays False
    no_effects_for_replays([retried])
    assert retried.effects == NOTE
