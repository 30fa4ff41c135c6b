"""Message requests in the stores, against a real PostgreSQL: the send statement's consent
rules batch by batch, and the upgrade of both schemas from the version before, with data."""

import secrets

import asyncpg
import pytest

from services.registry import store as registry_store
from services.session import store
from shared import db
from tests.isolation import drop_database, migrated_database, new_database

REGISTRY_CONSENT = 5  # the registry's consent migration: the ones before it are the previous schema


def message(sender: str, session: str = "s") -> tuple:
    return (session, None, secrets.token_hex(16), sender, b"k" * 32, secrets.token_bytes(64), True, None, None)


@pytest.fixture
async def conn():
    async with migrated_database("aodm_test_consent", store.SCHEMA, store.MIGRATIONS) as dsn:
        conn = await asyncpg.connect(dsn)
        await store.create_session(conn, "s", 0, [("alice", b"a" * 32, b"a" * 32), ("bob", b"b" * 32, b"b" * 32)], "bob")
        await conn.execute("UPDATE session.sessions SET key_generation = 1")
        try:
            yield conn
        finally:
            await conn.close()


async def test_one_batch_holds_the_request_then_a_reply_accepts_for_what_follows(conn):
    """alice ×4, bob, alice ×2 in one statement: alice's 4th is refused (the request was full
    when it came), bob's reply accepts, and alice's after it are taken; only the first of
    the request's messages is notified."""
    batch = [message("alice") for _ in range(4)] + [message("bob")] + [message("alice") for _ in range(2)]
    rows = await store.store_messages(conn, 1, batch, 3)
    got = [rows[m[2]] for m in batch]
    assert [r["seq"] for r in got] == [1, 2, 3, None, 4, 5, 6]
    assert [r["refused"] for r in got] == [None, None, None, "not_accepted", None, None, None]
    assert [r["quiet"] for r in got if r["seq"]] == [False, True, True, False, False, False]
    assert [r["accepted"] for r in got] == [False] * 4 + [True, False, False]
    consent = await store.consent(conn, "s")
    assert consent["pending_for"] is None and consent["consent_version"] == 1


async def test_a_block_refuses_both_ways_and_the_blocker_is_told_why(conn):
    assert (await store.change_consent(conn, "s", "bob", "block"))["blocked_by"] == ["bob"]
    assert await store.change_consent(conn, "s", "bob", "block") is None  # nothing to change
    rows = await store.store_messages(conn, 1, [alice := message("alice"), bob := message("bob")], 3)
    assert rows[alice[2]]["refused"] == "not_accepted" and rows[bob[2]]["refused"] == "you_blocked"
    assert await store.next_generation(conn, "s", "alice", 3) is None
    unblocked = await store.change_consent(conn, "s", "bob", "unblock")
    assert unblocked["blocked_by"] == [] and unblocked["pending_for"] is None  # the block answered the request
    assert (await store.store_messages(conn, 2, [again := message("alice")], 3))[again[2]]["seq"] == 1


async def test_the_opener_may_create_a_few_generations_while_pending(conn):
    rotated = [await store.next_generation(conn, "s", "alice", 3) for _ in range(3)]
    assert [r and (r["generation"], r["pending_for"]) for r in rotated] == [(2, "bob"), (3, "bob"), None]
    assert tuple(await store.next_generation(conn, "s", "bob", 3)) == (4, "bob")


async def test_the_upgrade_keeps_sessions_and_messages_and_makes_them_accepted():
    name, dsn = await new_database("aodm_test_consent_upgrade")
    pool = await db.connect(dsn, size=2)
    try:
        await db.migrate(pool, store.SCHEMA, store.MIGRATIONS[:-1])
        await db.migrate(pool, registry_store.SCHEMA, registry_store.MIGRATIONS[:REGISTRY_CONSENT])
        await pool.execute("INSERT INTO session.sessions (session_id, created_at, key_generation) VALUES ('s', 0, 1)")
        previous = "SELECT * FROM session.append_messages($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
        await pool.fetch(previous, 1, *map(list, zip(*[message("alice") for _ in range(5)], strict=True)))
        for handle in ("alice", "bob"):
            await registry_store.insert_handle(pool, handle, handle.encode() * 8, b"x" * 32, 0)
        await pool.execute("""INSERT INTO registry.sessions (session_id, handle_lo, handle_hi, created_at, last_activity,
                              opened_by) VALUES ('s', 'alice', 'bob', 0, 0, 'alice')""")
        await db.migrate(pool, store.SCHEMA, store.MIGRATIONS)
        await db.migrate(pool, registry_store.SCHEMA, registry_store.MIGRATIONS)
        async with pool.acquire() as conn:
            rows = await store.store_messages(conn, 2, [message("alice") for _ in range(5)], 3)
            assert sorted(r["seq"] for r in rows.values()) == [6, 7, 8, 9, 10]  # accepted: no request limit
            assert not any(r["quiet"] for r in rows.values())
            chats = await registry_store.chats_of(conn, "bob")
            assert [(c["pending_for"], c["blocked_by"]) for c in chats] == [(None, [])]
            await pool.fetch(previous, 3, *map(list, zip(message("alice"))))  # workers not yet replaced
            assert await conn.fetchval("SELECT count(*) FROM session.messages") == 11
    finally:
        await pool.close()
        await drop_database(name)
