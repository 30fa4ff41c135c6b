"""Shard leases against a real PostgreSQL (services/session/shards.py): a worker that lost a
shard writes nothing for it again, and taking a shard waits for the writes under way."""

import asyncio
import secrets

import asyncpg
import pytest

from services.session import store
from shared import db
from tests.isolation import drop_database, migrated_database, new_database


@pytest.fixture
async def dsn():
    async with migrated_database("aodm_test_leases", store.SCHEMA, store.MIGRATIONS) as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("INSERT INTO session.sessions (session_id, created_at, key_generation) VALUES ('s', 0, 1)")
        finally:
            await conn.close()
        yield dsn


def message(shard: int, epoch: int) -> tuple:
    return ("s", None, secrets.token_hex(16), "alice", b"k" * 32, secrets.token_bytes(64), True, shard, epoch)


async def stored(conn: asyncpg.Connection) -> int:
    return await conn.fetchval("SELECT count(*) FROM session.messages")


async def test_a_write_under_an_epoch_since_taken_stores_nothing(dsn):
    conn = await asyncpg.connect(dsn)
    try:
        assert await store.take_shard(conn, 3, "a") == 1
        assert await store.take_shard(conn, 3, "b") == 2
        old, new = message(3, 1), message(3, 2)
        rows = await store.store_messages(conn, 1, [old, new], 3)  # one batch: the same worker retook it
        assert rows[old[2]]["fenced"] and rows[old[2]]["seq"] is None
        assert not rows[new[2]]["fenced"] and rows[new[2]]["seq"] == 1
        again = await store.store_messages(conn, 2, [old], 3)  # not even found as stored before
        assert again[old[2]]["fenced"] and not again[old[2]]["stored_before"]
        assert await stored(conn) == 1
        async with conn.transaction():
            assert await store.lost_leases(conn, [(3, 1), (3, 2), (4, 7)]) == {(3, 1)}  # 4 was never taken
    finally:
        await conn.close()


async def test_a_take_waits_for_the_old_owners_write_and_later_ones_are_fenced(dsn):
    old_owner, new_owner = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
    try:
        assert await store.take_shard(old_owner, 0, "a") == 1
        writing = old_owner.transaction()
        await writing.start()
        assert await store.lost_leases(old_owner, [(0, 1)]) == set()  # held shared from here
        taking = asyncio.create_task(store.take_shard(new_owner, 0, "b"))
        await asyncio.sleep(0.5)
        assert not taking.done(), "the take did not wait for the write under way"
        await old_owner.execute("UPDATE session.sessions SET message_seq = 41 WHERE session_id = 's'")
        await writing.commit()
        assert await asyncio.wait_for(taking, 5) == 2
        assert await new_owner.fetchval("SELECT message_seq FROM session.sessions") == 41  # landed first
        late = message(0, 1)
        assert (await store.store_messages(old_owner, 1, [late], 3))[late[2]]["fenced"]
        assert await stored(new_owner) == 0
    finally:
        await old_owner.close()
        await new_owner.close()


async def test_a_take_ends_a_transaction_that_holds_the_shard_too_long(dsn):
    """An owner frozen in the middle of a transaction: the take ends its connection."""
    frozen, new_owner = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
    try:
        assert await store.take_shard(frozen, 5, "a") == 1
        await frozen.execute("BEGIN")
        assert await store.lost_leases(frozen, [(5, 1)]) == set()
        started = asyncio.get_running_loop().time()
        assert await store.take_shard(new_owner, 5, "b", wait_s=0.3) == 2
        assert 0.3 <= asyncio.get_running_loop().time() - started < 5
        with pytest.raises(db.DatabaseUnavailable):  # what the services wait out, as any database fault
            await frozen.execute("UPDATE session.sessions SET message_seq = 99")
        assert await new_owner.fetchval("SELECT message_seq FROM session.sessions") == 0
        assert await new_owner.fetchval("SELECT owner FROM session.shard_leases WHERE shard = 5") == "b"
    finally:
        await frozen.close()
        await new_owner.close()


LEASES = -2  # the migrations before the leases' (the last one added message requests)


async def test_the_lease_migration_upgrades_a_database_holding_messages():
    """From the schema before it, with messages stored: they stay, the new statement stores
    after them, and the previous version's statement still works for workers not yet
    replaced (they take no leases)."""
    name, dsn = await new_database("aodm_test_upgrade")
    pool = await db.connect(dsn, size=2)
    try:
        await db.migrate(pool, store.SCHEMA, store.MIGRATIONS[:LEASES])
        await pool.execute("INSERT INTO session.sessions (session_id, created_at, key_generation) VALUES ('s', 0, 1)")
        previous = "SELECT * FROM session.append_messages($1, $2, $3, $4, $5, $6, $7, $8)"
        before = [message(0, 0)[:7] for _ in range(3)]
        await pool.fetch(previous, 1, *map(list, zip(*before, strict=True)))
        await db.migrate(pool, store.SCHEMA, store.MIGRATIONS)
        async with pool.acquire() as conn:
            epoch = await store.take_shard(conn, 0, "new")
            rows = await store.store_messages(conn, 2, [message(0, epoch)], 3)
            assert [row["seq"] for row in rows.values()] == [4]
            assert [r["seq"] for r in await conn.fetch(previous, 3, *map(list, zip(message(1, 1)[:7])))] == [5]
            assert await stored(conn) == 5
            assert (await store.store_messages(conn, 4, [(*before[0][:7], 0, epoch)], 3))[before[0][2]]["stored_before"]
    finally:
        await pool.close()
        await drop_database(name)
