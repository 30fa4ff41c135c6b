"""Concurrency: one session per pair, consecutive generations, per-sender order."""

import asyncio

import asyncpg

from tests.helpers import check_order, decrypt_all, open_pair, pipelined_send


async def test_fifty_concurrent_establish_both_ways_make_one_session(make_client, stack):
    alice = await make_client("alice")
    bob = await make_client("bob")
    calls = [alice.establish_session(bob.handle) for _ in range(25)] + [
        bob.establish_session(alice.handle) for _ in range(25)
    ]
    results = await asyncio.gather(*calls)
    assert len({r.session_id for r in results}) == 1
    assert sum(r.created for r in results) == 1
    assert await alice.query_session(bob.handle, alice.handle) == results[0].session_id
    conn = await asyncpg.connect(stack.database_url)
    try:
        pairs = await conn.fetchval(
            "SELECT count(*) FROM registry.sessions WHERE $1 IN (handle_lo, handle_hi)", alice.handle
        )
    finally:
        await conn.close()
    assert pairs == 1


async def test_twenty_concurrent_rotations_get_generations_one_to_twenty(make_client):
    alice = await make_client("alice")
    bob = await make_client("bob")
    session = (await alice.establish_session(bob.handle)).session_id
    rotations = [alice.rotate_session_key(session, bob.handle) for _ in range(10)] + [
        bob.rotate_session_key(session, alice.handle) for _ in range(10)
    ]
    generations = await asyncio.gather(*rotations)
    assert sorted(generations) == list(range(1, 21))
    assert (await bob.get_current_key(session)).generation == 20


async def test_two_members_five_hundred_each_interleaved(make_client):
    alice = await make_client("alice")
    bob = await make_client("bob")
    session, key = await open_pair(alice, bob)
    texts = {alice.handle: [f"a{i}" for i in range(500)], bob.handle: [f"b{i}" for i in range(500)]}
    sent = await asyncio.gather(
        pipelined_send(alice, session, key, texts[alice.handle]),
        pipelined_send(bob, session, key, texts[bob.handle]),
    )
    seqs = sorted(s.seq for batch in sent for s in batch)
    assert seqs == list(range(1, 1001))
    history = await alice.history(session, limit=500)
    check_order(decrypt_all(key, history), texts)
