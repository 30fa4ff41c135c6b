"""The session store's SendMessage statement against a real PostgreSQL, in a database of its own.

Its plan is made once per connection (docs/performance.md): this test holds it to a plan
that reaches every table by key, however small the tables were when it was made."""

import secrets

import asyncpg
import pytest

from services.session import store
from tests.isolation import migrated_database

TABLES = ("sessions", "messages", "requests", "shard_leases")


@pytest.fixture
async def database():
    async with migrated_database("aodm_test_store", store.SCHEMA, store.MIGRATIONS) as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            yield conn
        finally:
            await conn.close()


def _messages(session_ids: list[str], shard: int = 0, epoch: int = 1) -> list[tuple]:
    return [(s, None, secrets.token_hex(16), "alice", b"k" * 32, secrets.token_bytes(64), True, shard, epoch)
            for s in session_ids]


async def _seq_scans(conn: asyncpg.Connection) -> dict[str, int]:
    await conn.execute("SELECT pg_stat_force_next_flush()")  # this backend's counts, before they are read
    rows = await conn.fetch("SELECT relname, seq_scan FROM pg_stat_user_tables WHERE schemaname = 'session'")
    return {row["relname"]: row["seq_scan"] for row in rows if row["relname"] in TABLES}


async def test_the_plan_made_on_empty_tables_still_reaches_rows_by_key(database):
    conn = database
    assert await store.take_shard(conn, 0, "test") == 1
    # The plan is made here, while every table is empty (no such session: nothing is stored).
    assert (await store.store_messages(conn, 1, _messages(["nobody"]), 3))  # answered, as not taken
    await conn.executemany(
        "INSERT INTO session.sessions (session_id, created_at, key_generation) VALUES ($1, 0, 1)",
        [(f"s{i}",) for i in range(3000)],
    )
    for start in range(0, 3000, 500):  # messages and their records, through the statement itself
        await store.store_messages(conn, 2, _messages([f"s{i}" for i in range(start, start + 500)]), 3)
    before = await _seq_scans(conn)

    one = _messages(["s7"])
    many = _messages([f"s{i}" for i in range(100, 150)])
    stored = await store.store_messages(conn, 3, one, 3) | await store.store_messages(conn, 3, many, 3)
    again = await store.store_messages(conn, 4, one, 3)  # the same request: found, not stored twice

    assert await _seq_scans(conn) == before
    assert all(row["seq"] == 2 and not row["stored_before"] for row in stored.values())
    assert [(row["stored_before"], row["seq"]) for row in again.values()] == [(True, 2)]
    assert await conn.fetchval("SELECT count(*) FROM session.messages") == 3000 + 51
