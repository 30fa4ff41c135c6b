"""The checker itself: its verdicts on made-up histories (it must see every kind of
problem, or a green fault test means nothing), and one small run through the real stack."""

import asyncio

import pytest

from aodm.checker import main, run_check
from aodm.checker_report import PENDING, Keys, Note, Sent, Stored, judge
from aodm.notifications import notification_id


def sent(index: int, outcome: str = "ok", sender: str = "alice") -> Sent:
    recipient = "bob" if sender == "alice" else "alice"
    return Sent(0, sender, recipient, index, f"r.0.{sender}.{index}", f"id-{sender}-{index}", outcome, seq=None)


def stored(seq: int, s: Sent) -> Stored:
    return Stored(0, seq, s.sender, 1, s.message_id, s.text)


def note(s: Sent, note_id: str | None = None) -> Note:
    return Note(s.recipient, note_id or notification_id(s.message_id, "NewMessage", s.recipient), s.message_id)


KEYS = [Keys(0, current=1, present=[1], confirmed=1)]


def verdict(sends, stores, notes=None, keys=KEYS):
    notes = [note(s) for s in sends if s.outcome == "ok"] if notes is None else notes
    return judge(sends, stores, keys, notes, sessions=1, senders=1, elapsed_s=0.1)


def test_a_clean_history_is_ok():
    sends = [sent(i) for i in range(3)]
    report = verdict(sends, [stored(i + 1, s) for i, s in enumerate(sends)])
    assert report.ok and report.confirmed == report.stored == 3, report.summary()


def test_each_kind_of_problem_is_seen():
    a = [sent(i) for i in range(4)]
    refused = sent(9, "internal")
    stranger = Stored(0, 9, "alice", 1, "id-x", "r.0.alice.77")
    report = verdict(
        [*a, refused],
        # a[1] lost, a[2] stored twice, a[3] before a[0], a refused one stored, an unknown one
        [stored(1, a[3]), stored(2, a[0]), stored(3, a[2]), stored(4, a[2]), stored(5, refused), stranger],
        notes=[note(a[0]), note(a[0]), note(a[2], "forged"), note(a[3])],
    )
    assert (report.lost, report.duplicated, report.unexpected, report.order_violations) == (1, 1, 2, 1)
    assert (report.notifications_missing, report.notifications_duplicated, report.notifications_bad_id) == (1, 1, 1)
    assert not report.ok and len(report.problems()) == 6, report.problems()


def test_per_sender_order_is_checked_for_each_sender_apart():
    """Two senders interleaved in Seq order; bob's 2 before his 1 is one break in four
    comparisons (each stored message after its sender's first)."""
    a, b = [sent(i) for i in range(3)], [sent(i, sender="bob") for i in range(3)]
    report = verdict(a + b, [stored(1, a[0]), stored(2, b[0]), stored(3, a[1]), stored(4, b[2]),
                             stored(5, a[2]), stored(6, b[1])])
    assert (report.order_violations, report.order_checked) == (1, 4), report.summary()


def test_unanswered_but_stored_is_allowed():
    pending = sent(0, PENDING)
    report = verdict([sent(1), pending], [stored(1, pending), stored(2, sent(1))])
    assert report.ok and report.recovered == 1 and report.unconfirmed == 1, report.summary()


@pytest.mark.parametrize(
    "keys, gaps",
    [
        (Keys(0, current=2, present=[1, 2], confirmed=2), 0),
        (Keys(0, current=3, present=[1, 2, 3], confirmed=2), 1),  # a rotation applied twice
        (Keys(0, current=2, present=[2], confirmed=2), 1),  # generation 1 missing
        (Keys(0, current=3, present=[1, 2, 3], confirmed=2, unknown=1), 0),  # the unanswered one counted
        (Keys(0, current=2, present=[1, 2], confirmed=2, mismatched=1), 1),  # not the key rotated in
    ],
)
def test_generation_gaps(keys, gaps):
    assert verdict([], [], keys=[keys]).generation_gaps == gaps


def test_nothing_confirmed_proves_nothing():
    assert not verdict([], []).ok


def test_help():
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0


async def test_small_run_through_the_stack(stack):
    report = await run_check(stack.amqp_url, sessions=2, messages=15, rotate_every=6, duration=30, settle=15)
    assert report.ok, report.summary()
    assert report.confirmed == report.attempted == 60 and report.stored >= 60
    assert all(s["generations"] == 3 for s in report.per_session)
    assert report.order_checked == 60 - 2 * 2  # every message but each sender's first


async def test_a_burst_is_published_before_the_rate_applies(stack):
    """10 a sender at once, then 2 more at 1 message/s over the 4 senders: the burst
    alone would take 10 s at that rate."""
    started = asyncio.get_running_loop().time()
    report = await run_check(stack.amqp_url, sessions=2, messages=12, burst=10, rate=1.0, window=32,
                             duration=30, settle=15)
    elapsed = asyncio.get_running_loop().time() - started
    assert report.ok and report.confirmed == 48, report.summary()
    assert elapsed < 25, f"the burst waited for the rate: {elapsed:.1f}s"
