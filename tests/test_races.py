"""Concurrency: one session per pair, consecutive generations, per-sender order."""

import asyncio

import asyncpg
import msgspec

from aodm import crypto
from aodm.session_api import SendMessage, Sent
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
    await bob.accept(session)  # a request's opener may create only a few generations
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


async def test_a_message_another_worker_stores_first_is_answered_from_its_row(make_client, stack):
    """Two workers on one request (a shard changing hands): the one that commits second
    meets the record of the first (its request id), and answers from the row the first
    stored, using no seq."""
    alice = await make_client("alice")
    bob = await make_client("bob")
    session, key = await open_pair(alice, bob)
    env = alice.sign(session, "SendMessage", SendMessage(crypto.encrypt(key, "raced"), 1))
    other_worker = await asyncpg.connect(stack.database_url)
    try:
        transaction = other_worker.transaction()
        await transaction.start()
        seq = await other_worker.fetchval(
            "UPDATE session.sessions SET message_seq = message_seq + 1 WHERE session_id = $1 RETURNING message_seq",
            session)
        await other_worker.execute(
            """INSERT INTO session.messages (session_id, seq, message_id, sender, sender_key, generation, ts, content)
               VALUES ($1, $2, $3, $4, $5, 1, $6, $7)""",
            session, seq, env.id, alice.handle, bytes(alice.identity.signing_key.verify_key), 1234, b"\0" * 40)
        await other_worker.execute("INSERT INTO session.requests (id, session_id, seq) VALUES ($1, $2, $3)",
                                   env.id, session, seq)
        reply = await alice.submit(env)  # blocks behind the other worker's transaction
        await asyncio.sleep(0.5)
        await transaction.commit()
        sent = msgspec.json.decode(await alice.result_of(env, reply), type=Sent)
    finally:
        await other_worker.close()
    assert (sent.message_id, sent.seq, sent.timestamp) == (env.id, seq, 1234)
    assert (await alice.send_text(session, "next")).seq == seq + 1
    assert [m.seq for m in (await bob.query_messages(session)).messages] == [seq, seq + 1]
