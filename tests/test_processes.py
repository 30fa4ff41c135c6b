"""Real processes: two session workers at once, and services killed (-9) and restarted in
the middle of a run. Nothing lost, nothing doubled, each sender's order kept."""

import asyncio
import secrets

import asyncpg
import pytest

from aodm.client import Client
from aodm.crypto import Identity
from aodm.inbox import Inbox
from aodm.notifications import NewMessage
from tests.conftest import isolated_settings, wait_ready
from tests.helpers import check_order, decrypt_all, open_pair, pipelined_send
from tests.processes import ServiceProcess

pytestmark = pytest.mark.slow


# These tests pipeline hundreds of messages a sender to load the workers, far past a
# person's rate: the send limits (tests/test_rate_limits.py) are set out of their way.
UNLIMITED = {"AODM_SEND_RATE": "1000000", "AODM_SEND_SESSION_RATE": "1000000"}


@pytest.fixture
async def system(tmp_path):
    """An isolated vhost and database with the three services as real processes."""
    async with isolated_settings() as settings:
        procs: dict[str, ServiceProcess] = {}

        def spawn(name: str, key: str | None = None) -> ServiceProcess:
            proc = ServiceProcess(name, settings, tmp_path, **UNLIMITED).start()
            procs[key or name] = proc
            return proc

        for name in ("registry", "session", "notifier"):
            spawn(name)
        clients: list[Client] = []

        async def client(prefix: str) -> Client:
            c = await Client.connect(settings.amqp_url, Identity.generate(), timeout=60)
            clients.append(c)
            await c.register(f"{prefix}-{secrets.token_hex(4)}")
            return c

        await wait_ready(settings, {}, timeout=60)
        try:
            yield settings, procs, spawn, client
        finally:
            for c in clients:
                await c.close()
            for proc in procs.values():
                if proc.alive:
                    proc.kill()


async def _conversation(alice, bob, session, key, n):
    texts = {alice.handle: [f"a{i}" for i in range(n)], bob.handle: [f"b{i}" for i in range(n)]}
    sent = await asyncio.gather(
        pipelined_send(alice, session, key, texts[alice.handle]),
        pipelined_send(bob, session, key, texts[bob.handle]),
    )
    return texts, sent


async def _wait_for(predicate, timeout=20.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.2)


async def test_two_session_workers_split_shards_and_keep_order(system):
    _settings, procs, spawn, client = system
    second = spawn("session", "session-2")
    # Each takes its fair share (8 shards / 2 workers) once it sees the other.
    await _wait_for(lambda: '"shard taken"' in second.log() and '"shard released"' in procs["session"].log())
    pairs = [(await client("alice"), await client("bob")) for _ in range(4)]
    sessions = [await open_pair(a, b) for a, b in pairs]
    results = await asyncio.gather(*(_conversation(a, b, s, k, 150) for (a, b), (s, k) in zip(pairs, sessions, strict=True)))
    for (alice, _), (session, key), (texts, sent) in zip(pairs, sessions, results, strict=True):
        assert sorted(s.seq for batch in sent for s in batch) == list(range(1, 301))
        check_order(decrypt_all(key, await alice.history(session, limit=500)), texts)


async def test_session_worker_killed_mid_run_loses_and_doubles_nothing(system):
    _settings, procs, spawn, client = system
    alice, bob = await client("alice"), await client("bob")
    session, key = await open_pair(alice, bob)
    standby = spawn("session", "session-2")

    async def kill_and_restart():
        await asyncio.sleep(0.5)
        procs["session"].kill()
        await asyncio.sleep(1.0)
        spawn("session")

    texts, sent = (await asyncio.gather(_conversation(alice, bob, session, key, 400), kill_and_restart()))[0]
    assert standby.alive
    assert sorted(s.seq for batch in sent for s in batch) == list(range(1, 801))
    check_order(decrypt_all(key, await alice.history(session, limit=500)), texts)


async def test_registry_killed_mid_run_answers_every_request_once(system):
    _settings, procs, spawn, client = system
    alice = await client("alice")
    peers = [await client("peer") for _ in range(30)]

    async def kill_and_restart():
        await asyncio.sleep(0.05)
        procs["registry"].kill()
        await asyncio.sleep(0.5)
        spawn("registry")

    results = (await asyncio.gather(
        asyncio.gather(*(alice.establish_session(p.handle) for p in peers)), kill_and_restart()
    ))[0]
    assert len({r.session_id for r in results}) == 30
    chats = await alice.get_chat_list()
    assert sorted(c.peer for c in chats.chats) == sorted(p.handle for p in peers)


async def test_notifier_killed_mid_run_delivers_every_notification(system):
    _settings, procs, spawn, client = system
    alice, bob = await client("alice"), await client("bob")
    session, key = await open_pair(alice, bob)

    async def kill_and_restart():
        await asyncio.sleep(0.2)
        procs["notifier"].kill()
        await asyncio.sleep(1.0)
        spawn("notifier")

    _texts, sent = (await asyncio.gather(_conversation(alice, bob, session, key, 200), kill_and_restart()))[0]
    expected = {s.message_id for s in sent[0]}
    seen: set[str] = set()
    async with Inbox(bob.bus, bob.handle) as inbox:
        while seen != expected:
            note = await inbox.next(timeout=30)
            if isinstance(note, NewMessage):
                seen.add(note.message_id)
    assert seen == expected


async def test_a_handler_that_always_hangs_is_dead_lettered_not_waited_for(tmp_path):
    """A timeout while the database answers is the request's fault: after three attempts
    it is answered `internal` and dead-lettered, and the service keeps answering."""
    from aodm import envelope, topology
    from aodm.errors import InternalError, NotFound
    from aodm.transport import Bus

    async with isolated_settings() as settings:
        registry = ServiceProcess(
            "registry", settings, tmp_path, AODM_FAULTS="stall-always", AODM_HANDLER_TIMEOUT_S="1"
        ).start()
        try:
            await wait_ready(settings, {}, timeout=60)
            client = await Client.connect(settings.amqp_url, Identity.generate(), timeout=30)
            hung = envelope.sign(
                client.identity.signing_key, target="registry", from_=None, action="QueryHandle",
                data='{"Handle":"nobody"}', anchor=secrets.token_hex(8),
                extra_tags=[envelope.Tag("Fault", "stall-always")],
            )
            started = asyncio.get_running_loop().time()
            with pytest.raises(InternalError):
                await client.send_envelope(hung)
            assert asyncio.get_running_loop().time() - started < 15  # three 1 s attempts, not forever
            with pytest.raises(NotFound):
                await client.query_handle("nobody-else")
            bus = await Bus.connect(settings.amqp_url, name="aodm-test-inspect")
            try:
                assert await bus.message_count(topology.DEAD_LETTER_QUEUE) == 1
            finally:
                await bus.close()
            await client.close()
        finally:
            registry.kill()


async def test_chat_list_activity_lost_by_a_killed_worker_is_re_reported_at_its_start(system):
    settings, procs, spawn, client = system
    alice, bob = await client("alice"), await client("bob")
    session, _key = await open_pair(alice, bob)
    procs["session"].kill()
    # What the dead worker had committed but not yet reported: the database is the truth.
    later = (await alice.get_chat_list()).chats[0].last_activity + 5_000
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute("UPDATE session.sessions SET last_timestamp = $2 WHERE session_id = $1", session, later)
    finally:
        await conn.close()
    spawn("session")
    deadline = asyncio.get_running_loop().time() + 20
    while (chat := (await alice.get_chat_list()).chats[0]).last_activity != later:
        assert asyncio.get_running_loop().time() < deadline, f"LastActivity still {chat.last_activity}, not {later}"
        await asyncio.sleep(0.2)
    assert chat.session_id == session
