"""The per-session tracker that finds missed notifications, and the catch-up that reads the
messages back (aodm/catchup.py), and where `aodm listen` keeps its cursors (aodm/state.py):
without a broker, against a fake QueryMessage with the service's paging rules."""

import json

from aodm.catchup import LAST_PAGE, Mark, Tracker, missed
from aodm.crypto import Identity
from aodm.notifications import NewMessage
from aodm.session_api import MessagePage, StoredMessage
from aodm.state import State

SESSION = "s1"


def stored(seq: int, ts: int | None = None) -> StoredMessage:
    return StoredMessage(f"m{seq}", seq, "alice", "key", 1, 1000 + seq if ts is None else ts, f"c{seq}")


def note(seq: int, ts: int | None = None, session: str = SESSION) -> NewMessage:
    return NewMessage(f"n{seq}", "bob", 0, session, f"m{seq}", seq, "alice", 1, 1000 + seq if ts is None else ts, "c")


class FakeSession:
    """QueryMessage over a list, as the service pages it: From/Until inclusive, by Seq,
    the cursor exclusive and good for its Order only, NextCursor only when more follow.
    Counts its calls."""

    def __init__(self, messages: list[StoredMessage]) -> None:
        self.messages = messages
        self.calls: list[dict] = []

    async def query_messages(self, session_id, *, from_=None, until=None, limit=50, order="asc", cursor=None):
        self.calls.append({"from_": from_, "until": until, "limit": limit, "order": order, "cursor": cursor})
        lo, hi = -1 if from_ is None else from_, 2**62 if until is None else until
        rows = sorted((m for m in self.messages if lo <= m.timestamp <= hi), key=lambda m: (m.timestamp, m.seq))
        if order == "desc":
            rows.reverse()
        if cursor is not None:
            assert cursor[0] == order[0], "a cursor passed with the other Order (the service refuses it)"
            after = tuple(int(x) for x in cursor[1:].split("."))
            past = (lambda m: (m.timestamp, m.seq) < after) if order == "desc" else (lambda m: (m.timestamp, m.seq) > after)
            rows = [m for m in rows if past(m)]
        page = rows[:limit]
        more = len(rows) > limit
        return MessagePage(page, f"{order[0]}{page[-1].timestamp}.{page[-1].seq}" if more else None)


async def collect(client, mark, before=None) -> list[int]:
    return [m.seq async for m in missed(client, SESSION, mark, before)]


def test_the_tracker_finds_a_gap_only_past_the_next_seq() -> None:
    tracker = Tracker({SESSION: Mark(5, 1005)})
    assert not tracker.gap(note(6)) and tracker.gap(note(7)) and tracker.gap(note(500))
    assert tracker.seen(SESSION, 5) and tracker.seen(SESSION, 1) and not tracker.seen(SESSION, 6)
    # A session never seen: its first message is 1; anything past it has a gap before it.
    assert not tracker.gap(note(1, session="new")) and tracker.gap(note(2, session="new"))
    assert not tracker.seen("new", 1)


def test_a_mark_only_moves_forward() -> None:
    tracker = Tracker()
    assert tracker.advance(SESSION, 3, 1003)
    assert not tracker.advance(SESSION, 2, 1002) and not tracker.advance(SESSION, 3, 1003)
    assert not tracker.advance(SESSION, 0, 5) and not tracker.advance(SESSION, -7, 5)
    assert tracker.marks == {SESSION: Mark(3, 1003)}
    assert tracker.advance(SESSION, 9, 1009) and tracker.marks[SESSION] == Mark(9, 1009)


async def test_a_gap_is_read_back_in_seq_order_across_pages() -> None:
    """1,200 messages, the mark at 100, the notification of 1,150 the first to arrive: 101
    to 1,149 come back, once each, in order, over pages of 500 from the mark's timestamp."""
    client = FakeSession([stored(seq) for seq in range(1, 1201)])
    assert await collect(client, Mark(100, 1100), note(1150)) == list(range(101, 1150))
    assert client.calls[0]["from_"] == 1100 and client.calls[0]["until"] == 2150
    assert len(client.calls) == 3  # 1100..1599, 1600..2099, then the page that reaches 1,150


async def test_messages_of_one_millisecond_are_told_apart_by_seq() -> None:
    """Several messages share the mark's and the new one's timestamp: only those strictly
    between the two seqs come back."""
    client = FakeSession([stored(seq, ts=7) for seq in range(1, 11)])
    assert await collect(client, Mark(3, 7), note(8, ts=7)) == [4, 5, 6, 7]
    assert await collect(client, Mark(3, 7)) == list(range(4, 11))


async def test_without_a_mark_only_the_last_page_comes_back() -> None:
    client = FakeSession([stored(seq) for seq in range(1, 301)])
    got = await collect(client, None, note(301))
    assert got == list(range(301 - LAST_PAGE, 301))
    assert all(call["order"] == "desc" for call in client.calls)
    assert await collect(FakeSession([stored(1), stored(2)]), None) == [1, 2]
    assert await collect(FakeSession([]), None, note(1)) == []


async def test_a_disorderly_server_crashes_nothing_and_shows_nothing_twice() -> None:
    """Duplicates, a message before the mark, one past the notification, out of order: the
    catch-up yields what lies between; the caller's seen() drops the rest."""
    messages = [stored(4), stored(2), stored(6), stored(6), stored(5), stored(9)]
    client = FakeSession(messages)
    client.query_messages = _unsorted(messages)
    got = await collect(client, Mark(3, 1003), note(8))
    tracker, shown = Tracker({SESSION: Mark(3, 1003)}), []
    for seq in got:
        if not tracker.seen(SESSION, seq):
            shown.append(seq)
            tracker.advance(SESSION, seq, 1000 + seq)
    assert shown == [4, 6] and tracker.marks[SESSION].seq == 6


def _unsorted(messages):
    async def query_messages(session_id, **_):
        return MessagePage(list(messages), None)
    return query_messages


def _state(tmp_path, identity: Identity) -> State:
    return State.load(tmp_path / "identity.json", identity)


def test_the_state_keeps_the_cursors_of_each_handle(tmp_path) -> None:
    identity = Identity.generate()
    state = _state(tmp_path, identity)
    state.remember_cursors("bob", {"s1": (7, 1007), "s2": (1, 5)})
    state.remember_cursors("carol", {"s1": (2, 1002)})
    again = _state(tmp_path, identity)
    assert again.cursors_of("bob") == {"s1": (7, 1007), "s2": (1, 5)}
    assert again.cursors_of("carol") == {"s1": (2, 1002)} and again.cursors_of("dave") == {}
    assert _state(tmp_path, Identity.generate()).cursors_of("bob") == {}  # another identity's state


def test_a_cursor_never_moves_back_and_other_changes_survive(tmp_path) -> None:
    """Two listeners, or a listener and another command: each keeps the newest cursor of
    every chat, and a long `listen` does not write back its old copy of the rest."""
    identity = Identity.generate()
    listener, other = _state(tmp_path, identity), _state(tmp_path, identity)
    listener.remember_cursors("bob", {"s1": (10, 1010)})
    other.remember_broker("bob", "aodm-h.bob", "new-password")  # loaded before the cursor was saved
    listener.remember_cursors("bob", {"s1": (4, 1004), "s2": (3, 1003)})
    final = _state(tmp_path, identity)
    assert final.cursors_of("bob") == {"s1": (10, 1010), "s2": (3, 1003)}
    assert final.brokers["bob"]["password"] == "new-password"


def test_malformed_cursors_are_dropped_not_fatal(tmp_path) -> None:
    identity = Identity.generate()
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"address": identity.address, "cursors": {
        "bob": {"ok": {"seq": 3, "timestamp": 9}, "neg": {"seq": -1, "timestamp": 9},
                "str": {"seq": "3", "timestamp": 9}, "bool": {"seq": True, "timestamp": 9}, "list": [1, 2],
                "huge": {"seq": 2**70, "timestamp": 1}},
        "carol": "nonsense",
    }}))
    assert _state(tmp_path, identity).cursors_of("bob") == {"ok": (3, 9)}
    path.write_text(json.dumps({"address": identity.address, "cursors": [1, 2, 3]}))
    assert _state(tmp_path, identity).cursors == {}
