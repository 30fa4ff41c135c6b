"""Rate limits against the real services (docs/security.md): a refusal is `rate_limited`
with the time to wait, and stores nothing."""

import secrets

import pytest

from aodm import crypto, envelope, topology
from aodm.client import Client
from aodm.errors import NotFound, RateLimited
from aodm.replies import Err, Ok, reply_decoder
from aodm.session_api import SendMessage
from services.registry import store as registry_store
from shared import db
from tests.conftest import drop_database, isolated_settings, new_database, running_services
from tests.helpers import open_pair

OPENED_BY = 4  # the registry's migration that added sessions.opened_by: the ones before it are the previous schema


@pytest.fixture(scope="module")
async def slow_sessions():
    """A session may take 20 messages at once, then 2 a second; a handle may open 3 sessions
    an hour, a key register 2 handles a day."""
    async with isolated_settings(send_session_rate=2, send_rate=1000, sessions_per_hour=3, handles_per_day=2) as settings, \
            running_services(settings):
        yield settings


async def test_a_sender_over_its_session_rate_is_refused_with_the_time_to_wait(slow_sessions):
    alice = await Client.connect(slow_sessions.amqp_url, crypto.Identity.generate())
    bob = await Client.connect(slow_sessions.amqp_url, crypto.Identity.generate())
    try:
        await alice.register(f"fast-{secrets.token_hex(4)}")
        await bob.register(f"peer-{secrets.token_hex(4)}")
        session, key = await open_pair(alice, bob)
        pending = [await alice.bus.request(topology.REQUESTS, session, envelope.encode(
            alice.sign(session, "SendMessage", SendMessage(crypto.encrypt(key, f"m{i}"), 1)))) for i in range(30)]
        replies = [reply_decoder.decode(await p) for p in pending]
        sent = [r for r in replies if isinstance(r, Ok)]
        refused = [r for r in replies if isinstance(r, Err)]
        assert 20 <= len(sent) < 30 and len(sent) + len(refused) == 30
        assert {r.code for r in refused} == {"rate_limited"} and all(r.retry_after >= 1 for r in refused)
        stored = await alice.history(session, limit=500)
        assert len(stored) == len(sent), "a refused message was stored"
        with pytest.raises(RateLimited) as caught:  # the client library's error, with the wait
            await alice.send_text(session, "one more")
        assert caught.value.retry_after_ms >= 1
    finally:
        await alice.close()
        await bob.close()


async def connected(settings, identity: crypto.Identity | None = None) -> Client:
    return await Client.connect(settings.amqp_url, identity or crypto.Identity.generate())


async def test_a_key_over_its_handles_a_day_is_refused_and_nothing_is_registered(slow_sessions):
    identity = crypto.Identity.generate()
    client, other = await connected(slow_sessions, identity), await connected(slow_sessions)
    try:
        for i in range(2):
            await client.register(f"many-{i}-{secrets.token_hex(3)}")
        third = f"many-2-{secrets.token_hex(3)}"
        with pytest.raises(RateLimited) as caught:
            await client.register(third)
        assert 23 * 3600_000 < caught.value.retry_after_ms <= 24 * 3600_000  # when the first leaves the day
        with pytest.raises(NotFound):
            await other.query_handle(third)
        await other.register(f"other-{secrets.token_hex(3)}")  # another key is not held up
    finally:
        await client.close()
        await other.close()


async def test_a_handle_over_its_sessions_an_hour_is_refused_and_opens_nothing(slow_sessions):
    clients = [await connected(slow_sessions) for _ in range(6)]
    try:
        for i, client in enumerate(clients):
            await client.register(f"open-{i}-{secrets.token_hex(3)}")
        opener, *peers = clients
        first = [await opener.establish_session(p.handle) for p in peers[:3]]
        with pytest.raises(RateLimited) as caught:
            await opener.establish_session(peers[3].handle)
        assert 3500_000 < caught.value.retry_after_ms <= 3600_000
        assert await opener.query_session(opener.handle, peers[3].handle) is None
        again = await opener.establish_session(peers[0].handle)  # an existing one: not a new opening
        assert again.session_id == first[0].session_id and not again.created
        opened_to = await peers[4].establish_session(opener.handle)  # the peer's opening counts for the peer
        assert opened_to.created
    finally:
        for client in clients:
            await client.close()


async def test_the_opened_by_migration_upgrades_a_registry_holding_sessions():
    """Sessions from before have no opener and count for nobody; the pair still finds its
    session, and a new one is counted for its opener."""
    name, dsn = await new_database("aodm_test_registry_upgrade")
    pool = await db.connect(dsn, size=2)
    try:
        await db.migrate(pool, registry_store.SCHEMA, registry_store.MIGRATIONS[:OPENED_BY])
        for handle in ("alice", "bob", "carol"):
            await pool.execute("INSERT INTO registry.handles (handle, sign_key, box_key, created_at) VALUES ($1, $2, $3, 1)",
                               handle, handle.encode().ljust(32, b"k"), bytes(32))
        await pool.execute("""INSERT INTO registry.sessions (session_id, handle_lo, handle_hi, created_at, last_activity)
                              VALUES ('old', 'alice', 'bob', 1, 1)""")
        await db.migrate(pool, registry_store.SCHEMA, registry_store.MIGRATIONS)
        async with pool.acquire() as conn, conn.transaction():
            assert await registry_store.session_of(conn, "bob", "alice") == "old"
            assert await registry_store.opened_since(conn, "alice", 0) == []
            assert await registry_store.insert_session(conn, "new", "alice", "carol", 5)
            assert await registry_store.opened_since(conn, "alice", 0) == [5]
            assert await registry_store.opened_since(conn, "carol", 0) == []
    finally:
        await pool.close()
        await drop_database(name)
