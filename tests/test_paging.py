"""QueryMessage keyset paging over thousands of messages that share one millisecond."""

import asyncpg
import pytest

from aodm import crypto
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
    assert [m.seq for m in rest] == list(range(101, COUNT + 1)) + [sent.seq]
    assert await alice.query_messages(session, from_=0, until=1699999999999) == type(page)([], None)
