"""QueryMessage keyset paging over thousands of messages that share one millisecond."""

import asyncpg
import msgspec
import pytest

from aodm import crypto, envelope, topology
from aodm.replies import reply_decoder
from aodm.session_api import MAX_PAGE, MAX_PAGE_BYTES, MessagePage, QueryMessage
from tests.helpers import open_pair

COUNT = 3000


@pytest.fixture
async def crowded_session(make_client, stack):
    """A real session whose history is seeded straight into its tables with one timestamp
    (the service cannot be made to stamp 3,000 messages within one millisecond)."""
    alice = await make_client("alice")
    bob = await make_client("bob")
    session, key = await open_pair(alice, bob)
    content = crypto.encrypt(key, "same millisecond")
    conn = await asyncpg.connect(stack.database_url)
    try:
        await conn.execute(
            """INSERT INTO session.messages (session_id, seq, message_id, sender, sender_key, generation, ts, content)
               SELECT $1, g, 'seeded-' || g, $2, $3, 1, 1700000000000, $4 FROM generate_series(1, $5) AS g""",
            session, alice.handle, bytes(32), crypto.b64decode(content), COUNT,
        )
        await conn.execute(
            "UPDATE session.sessions SET message_seq = $2, last_timestamp = 1700000000000 WHERE session_id = $1",
            session, COUNT,
        )
    finally:
        await conn.close()
    return alice, bob, session


@pytest.mark.parametrize("order,limit", [("asc", 50), ("desc", 50), ("asc", 7), ("desc", 500)])
async def test_paging_has_no_gap_and_no_duplicate(crowded_session, order, limit):
    alice, _, session = crowded_session
    seqs = [m.seq for m in await alice.history(session, order=order, limit=limit)]
    expected = list(range(1, COUNT + 1))
    assert seqs == (expected if order == "asc" else expected[::-1])


async def test_bounds_are_inclusive_and_new_messages_land_after_the_cursor(crowded_session):
    alice, bob, session = crowded_session
    page = await alice.query_messages(session, from_=1700000000000, until=1700000000000, limit=100)
    assert len(page.messages) == 100 and page.next_cursor
    sent = await bob.send_text(session, "late")
    rest = await alice.history(session, cursor=page.next_cursor, limit=500)
    assert [m.seq for m in rest] == [*range(101, COUNT + 1), sent.seq]
    assert await alice.query_messages(session, from_=0, until=1699999999999) == type(page)([], None)


BIG = 40_000  # bytes of content a message (a 64 KiB Data holds about 48 KB)


async def seed(stack, session: str, sender: str, count: int, size: int, start_seq: int = 1) -> None:
    conn = await asyncpg.connect(stack.database_url)
    try:
        await conn.execute(
            """INSERT INTO session.messages (session_id, seq, message_id, sender, sender_key, generation, ts, content)
               SELECT $1, g, 'big-' || g, $2, $3, 1, 1700000000000 + g, $4 FROM generate_series($5::bigint, $6) AS g""",
            session, sender, bytes(32), bytes(size), start_seq, start_seq + count - 1,
        )
        await conn.execute("UPDATE session.sessions SET message_seq = $2 WHERE session_id = $1", session, start_seq + count - 1)
    finally:
        await conn.close()


@pytest.mark.parametrize("order", ["asc", "desc"])
async def test_a_page_ends_at_its_byte_bound_and_the_cursor_goes_on(make_client, stack, order):
    """Limit 500 over 40 messages of 40 KB: each page stops once 512 KiB of content came
    before a message, hands back its cursor, and the pages hold everything once."""
    alice, bob = await make_client("alice"), await make_client("bob")
    session, _ = await open_pair(alice, bob)
    await seed(stack, session, alice.handle, 40, BIG)
    pages, cursor = [], None
    while True:
        raw = await alice.bus.call(topology.REQUESTS, session, envelope.encode(
            alice.sign(session, "QueryMessage", QueryMessage(limit=MAX_PAGE, order=order, cursor=cursor))), timeout=15)
        assert len(raw) < 1_000_000, f"a reply of {len(raw)} bytes"
        page = msgspec.json.decode(reply_decoder.decode(raw).result, type=MessagePage)
        pages.append(page)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    per_page = -(-MAX_PAGE_BYTES // BIG)  # 14: the 14th begins at 520,000 bytes, below the bound
    assert [len(p.messages) for p in pages] == [per_page, per_page, 40 - 2 * per_page]
    seqs = [m.seq for p in pages for m in p.messages]
    assert seqs == (list(range(1, 41)) if order == "asc" else list(range(40, 0, -1)))


async def test_one_message_over_the_byte_bound_still_makes_a_page(make_client, stack):
    alice, bob = await make_client("alice"), await make_client("bob")
    session, _ = await open_pair(alice, bob)
    await seed(stack, session, alice.handle, 2, MAX_PAGE_BYTES + 1)
    first = await alice.query_messages(session, limit=10)
    assert [m.seq for m in first.messages] == [1] and first.next_cursor
    second = await alice.query_messages(session, limit=10, cursor=first.next_cursor)
    assert [m.seq for m in second.messages] == [2] and second.next_cursor is None
