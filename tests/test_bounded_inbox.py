"""Bounded inboxes against the real broker and services (issue 17; docs/reliability.md,
"When an inbox is full"): the services set the bound through the management API, the
broker holds a handle's queue at it by dropping the oldest notifications, every message
stays readable with QueryMessage, and a client that reads afterwards finds the gap and
shows every message once, in Seq order (aodm/catchup.py, `aodm listen`)."""

import asyncio
import json
import os
import re
import secrets
import sys
import urllib.parse
from contextlib import asynccontextmanager

import pytest

from aodm import crypto, topology
from aodm.catchup import Mark, Tracker, missed
from aodm.client import Client
from aodm.inbox import Inbox
from aodm.notifications import NewMessage
from aodm.transport import Bus, Message
from shared.management import vhost_of
from tests.conftest import MANAGEMENT, isolated_settings, management, running_services
from tests.helpers import pipelined_send
from tests.test_cli import ROOT, Run, aodm

BOUND = 20
SENT = 45  # more than twice the bound
LEGACY_DEPTH = 50


def q(name: str) -> str:
    return urllib.parse.quote(name, safe="")


@pytest.fixture(scope="module")
async def bounded():
    """Services with a bound of 20 and the admin URL (so they set the policies), on a vhost
    that already holds an inbox from before the bound: declared without arguments, 50 deep."""
    prefix = f"aodm-tb{secrets.token_hex(3)}."
    async with isolated_settings("aodm-test-bound", inbox_max_messages=BOUND, broker_admin_url=MANAGEMENT,
                                 broker_user_prefix=prefix, send_rate=10**6, send_session_rate=10**6) as settings:
        bus = await Bus.connect(settings.amqp_url, name="aodm-test-bound")
        legacy = topology.inbox_queue(f"legacy-{secrets.token_hex(3)}")
        await bus.declare_queue(legacy)
        await bus.publish_all([Message("", legacy, b"{}") for _ in range(LEGACY_DEPTH)])
        assert await bus.message_count(legacy) == LEGACY_DEPTH
        try:
            async with running_services(settings):
                yield settings, bus, legacy
        finally:
            await bus.close()
            for user in json.loads(management("GET", "/users")):
                if user["name"].startswith(prefix):
                    management("DELETE", f"/users/{q(user['name'])}")


async def depth_reaches(bus: Bus, queue: str, depth: int, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (now := await bus.message_count(queue)) != depth:
        assert asyncio.get_running_loop().time() < deadline, f"{queue} holds {now}, not {depth}"
        await asyncio.sleep(0.1)


async def test_the_services_bound_existing_inboxes_in_place(bounded):
    """An inbox declared before the bound existed is cut to it, with no redeclare, once the
    services have set the policy and the operator policy of aodm/topology.py."""
    settings, bus, legacy = bounded
    vhost = vhost_of(settings.amqp_url)
    await depth_reaches(bus, legacy, BOUND)
    expected = topology.inbox_policies(BOUND, settings.inbox_max_bytes)
    for kind in ("policies", "operator-policies"):
        got = json.loads(management("GET", f"/{kind}/{q(vhost)}/{topology.INBOX_POLICY}"))
        assert {k: got[k] for k in expected[kind]} == expected[kind]


async def test_a_user_policy_cannot_lift_the_bound(bounded):
    """A user policy of higher priority on every queue replaces ours on the inboxes, but the
    operator policy still holds them at the bound."""
    settings, bus, legacy = bounded
    vhost = vhost_of(settings.amqp_url)
    path = f"/policies/{q(vhost)}/lift-the-bound"
    management("PUT", path, {"pattern": ".*", "apply-to": "queues", "priority": 100,
                             "definition": {"max-length": 1_000_000}})
    try:
        await applied(vhost, legacy, "lift-the-bound")  # without the operator policy: 60 here
        await bus.publish_all([Message("", legacy, b"{}") for _ in range(2 * BOUND)])
        assert await bus.message_count(legacy) == BOUND
    finally:
        management("DELETE", path)


async def applied(vhost: str, queue: str, policy: str, timeout: float = 20.0) -> None:
    """Until the management API shows the queue under the policy (its figures lag up to 5 s)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while json.loads(management("GET", f"/queues/{q(vhost)}/{q(queue)}")).get("policy") != policy:
        assert asyncio.get_running_loop().time() < deadline, f"{queue} is not under {policy}"
        await asyncio.sleep(0.2)


async def connected(settings, prefix: str) -> Client:
    client = await Client.connect(settings.amqp_url, crypto.Identity.generate())
    await client.register(f"{prefix}-{secrets.token_hex(4)}")
    return client


async def open_accepted(alice: Client, bob: Client) -> tuple[str, bytes]:
    """Alice opens the chat and gives it a key; Bob answers, which accepts a message request
    where there are any (where not, it is one more message). Bob's message is #1."""
    session = (await alice.establish_session(bob.handle)).session_id
    key = crypto.new_session_key()
    await alice.rotate_session_key(session, bob.handle, key)
    await bob.send_text(session, "hi alice")
    return session, key


@asynccontextmanager
async def watching(settings):
    """A connection of its own for passive declares (a queue's depth)."""
    bus = await Bus.connect(settings.amqp_url, name="aodm-test-depth")
    try:
        yield bus
    finally:
        await bus.close()


async def flood(settings, alice: Client, session: str, key: bytes, inbox: str, texts: list[str]) -> list[int]:
    """Send in fives; the recipient's queue depth after each five."""
    async with watching(settings) as bus:
        depths = []
        for i in range(0, len(texts), 5):
            await pipelined_send(alice, session, key, texts[i:i + 5])
            depths.append(await bus.message_count(inbox))
        return depths


async def test_a_full_inbox_keeps_the_newest_and_the_client_catches_up(bounded):
    """45 messages to a handle that does not read, bound 20: its queue never holds more than
    20, every message stays readable, and the client reading afterwards finds the gap at
    the first notification left (#27) and shows #2..#46 once each, in Seq order."""
    settings, _, _ = bounded
    alice, bob = await connected(settings, "alice"), await connected(settings, "bob")
    try:
        session, key = await open_accepted(alice, bob)
        mine = (await bob.query_messages(session)).messages[-1]
        texts = [f"m{i:02d}" for i in range(SENT)]
        depths = await flood(settings, alice, session, key, topology.inbox_queue(bob.handle), texts)
        print(f"\nqueue depth after each 5 of {SENT} sent, bound {BOUND}: {depths}")
        assert max(depths) <= BOUND and depths[-1] == BOUND, depths

        stored = await alice.history(session, limit=500)
        assert [m.seq for m in stored] == list(range(1, SENT + 2))  # bob's #1, then all 45
        assert [crypto.decrypt(key, m.content) for m in stored[1:]] == texts

        tracker, shown, gaps = Tracker({session: Mark(mine.seq, mine.timestamp)}), [], []
        async with Inbox(bob.bus, bob.handle) as inbox:
            while len(shown) < SENT:
                note = await inbox.next(10)
                if not isinstance(note, NewMessage) or tracker.seen(session, note.seq):
                    continue
                if tracker.gap(note):
                    gaps.append((tracker.marks[session].seq, note.seq))
                    async for message in missed(bob, session, tracker.marks.get(session), note):
                        if tracker.advance(session, message.seq, message.timestamp):
                            shown.append((message.seq, crypto.decrypt(key, message.content)))
                if tracker.advance(session, note.seq, note.timestamp):
                    shown.append((note.seq, crypto.decrypt(key, note.content)))
        first_left = SENT + 2 - BOUND
        assert gaps == [(1, first_left)], gaps
        assert shown == [(seq, texts[seq - 2]) for seq in range(2, SENT + 2)]
    finally:
        await alice.close()
        await bob.close()


# -- the CLI ----------------------------------------------------------------------------


async def cli_person(settings, tmp_path_factory, prefix: str):
    home = tmp_path_factory.mktemp(prefix)
    handle = f"{prefix}-{secrets.token_hex(3)}"

    async def run(*args: str, **kw) -> Run:
        return await aodm(settings.amqp_url, home, *args, **kw)

    assert (await run("identity", "new")).code == 0
    registered = await run("register", handle)
    assert registered.code == 0, registered.err
    return handle, home, run


def message_lines(out: str, sender: str) -> list[str]:
    return re.findall(rf"^\[[^\]]+\] {re.escape(sender)}: (.*)$", out, re.M)


async def test_the_cli_catches_up_after_being_offline(bounded, tmp_path_factory):
    """`aodm listen` saves where it got to; started again after 45 messages to a full
    inbox, it says it is catching up and shows each message once, in order."""
    settings, _, _ = bounded
    bob, _, as_bob = await cli_person(settings, tmp_path_factory, "bob")
    alice = await connected(settings, "alice")
    try:
        session = (await alice.establish_session(bob)).session_id
        key = crypto.new_session_key()
        await alice.rotate_session_key(session, bob, key)
        replied = await as_bob("send", alice.handle, "hi alice")  # accepts a message request
        assert replied.code == 0, replied.err
        first = await as_bob("listen", "--once", "--timeout", "5")
        assert first.code == 0, first.err
        assert message_lines(first.out, bob) == ["hi alice"]

        texts = [f"m{i:02d}" for i in range(SENT)]
        depths = await flood(settings, alice, session, key, topology.inbox_queue(bob), texts)
        assert max(depths) <= BOUND, depths

        again = await as_bob("listen", "--once", "--timeout", "10")
        assert again.code == 0, again.err
        assert f"catching up the chat with {alice.handle} from #2" in again.out, again.out
        assert message_lines(again.out, alice.handle) == texts, again.out
        assert message_lines(again.out, bob) == []  # shown the first time, not again

        third = await as_bob("listen", "--once", "--timeout", "2")
        assert message_lines(third.out, alice.handle) == [] and "catching up" not in third.out
    finally:
        await alice.close()


async def test_the_cli_fills_a_gap_while_it_listens(bounded, tmp_path_factory):
    """A message the handle sent from elsewhere is not notified to it: the next message's
    Seq shows the gap, and `listen` shows the missing one first."""
    settings, _, _ = bounded
    bob, home, as_bob = await cli_person(settings, tmp_path_factory, "bob")
    alice = await connected(settings, "alice")
    try:
        session = (await alice.establish_session(bob)).session_id
        await alice.rotate_session_key(session, bob)
        assert (await as_bob("send", alice.handle, "hi alice")).code == 0
        assert (await as_bob("listen", "--once", "--timeout", "3")).code == 0

        listener = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "aodm", "listen", "--timeout", "4", cwd=ROOT,
            env={**os.environ, "AODM_AMQP_URL": settings.amqp_url, "AODM_IDENTITY": str(home / "identity.json"),
                 "HOME": str(home)},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        started = await asyncio.wait_for(listener.stderr.readline(), 30)
        assert b"listening as" in started, started
        assert (await as_bob("send", alice.handle, "from my other device")).code == 0
        await alice.send_text(session, "after that")
        out, err = await asyncio.wait_for(listener.communicate(), 60)
        out = out.decode()
        assert listener.returncode == 0, err.decode()
        assert f"catching up the chat with {alice.handle} from #2" in out, out
        assert message_lines(out, bob) == ["from my other device"], out
        assert out.index("from my other device") < out.index("after that")
        assert message_lines(out, alice.handle) == ["after that"]
    finally:
        await alice.close()



# -- measured (docs/operations.md, "Sizing") ---------------------------------------------

MEASURE = pytest.mark.skipif(not os.environ.get("AODM_TEST_MEASURE"), reason="a measurement: AODM_TEST_MEASURE=1 runs it")


async def measure(count: int, chunk: int, length: int, **bound) -> tuple[list[int], dict, object]:
    """`count` messages of `length` characters to a handle that does not read, its queue's
    depth sampled after every `chunk`; then the management API's figures for it."""
    prefix = f"aodm-tm{secrets.token_hex(3)}."
    async with isolated_settings("aodm-test-bound", broker_admin_url=MANAGEMENT, broker_user_prefix=prefix,
                                 send_rate=10**6, send_session_rate=10**6, **bound) as settings:
        try:
            async with running_services(settings):
                alice, bob = await connected(settings, "alice"), await connected(settings, "bob")
                try:
                    session, key = await open_accepted(alice, bob)
                    inbox, vhost = topology.inbox_queue(bob.handle), vhost_of(settings.amqp_url)
                    async with watching(settings) as bus:
                        depths = []
                        for i in range(0, count, chunk):
                            texts = [f"{i + j:05d} ".ljust(length, "x") for j in range(chunk)]
                            await pipelined_send(alice, session, key, texts)
                            depths.append(await bus.message_count(inbox))
                    await applied(vhost, inbox, topology.INBOX_POLICY)
                    await asyncio.sleep(5.5)  # the management API's figures are sampled every 5 s
                    queue = json.loads(management("GET", f"/queues/{q(vhost)}/{q(inbox)}"))
                    stored = [m.seq for m in await alice.history(session, limit=500)]
                    assert stored == list(range(1, count + 2)), "a message is not readable"
                    print(f"\n{count} messages of {length} characters, depth after each {chunk}: {depths}; "
                          f"then {queue['messages']} notifications, {queue['message_bytes']} bytes")
                    return depths, queue, settings
                finally:
                    await alice.close()
                    await bob.close()
        finally:
            for user in json.loads(management("GET", "/users")):
                if user["name"].startswith(prefix):
                    management("DELETE", f"/users/{q(user['name'])}")


@MEASURE
async def test_the_default_bound_holds_while_twelve_thousand_arrive():
    """12,000 messages of 200 characters at the default bound (10,000). The tests above
    hold the same behaviour at a bound of 20 on every run."""
    depths, queue, settings = await measure(12_000, 500, 200)
    bound = settings.inbox_max_messages
    assert depths[-5:] == [bound] * 5 and max(depths) == bound
    assert queue["messages"] == bound and queue["message_bytes"] <= settings.inbox_max_bytes


@MEASURE
async def test_the_byte_bound_holds_for_large_messages():
    """200 messages of 10,000 characters with AODM_INBOX_MAX_BYTES = 1 MiB."""
    depths, queue, settings = await measure(200, 20, 10_000, inbox_max_bytes=2**20)
    assert max(depths) < settings.inbox_max_messages and depths[-1] == depths[-2] == queue["messages"]
    assert queue["message_bytes"] <= settings.inbox_max_bytes


# -- without a way to set it ------------------------------------------------------------


async def test_without_the_admin_url_nothing_is_tried_and_the_notifier_warns(monkeypatch):
    from dataclasses import replace

    from shared import config, inbox_bound

    logged = []
    monkeypatch.setattr(inbox_bound, "log", _Recorder(logged))
    settings = config.load({})
    await asyncio.wait_for(inbox_bound.keep(settings, asyncio.Event()), 1)
    assert logged == []
    inbox_bound.warn_if_unset(settings)
    assert [level for level, _ in logged] == ["warning"]
    assert "AODM_BROKER_ADMIN_URL" in logged[0][1] and "grows without bound" in logged[0][1]
    inbox_bound.warn_if_unset(replace(settings, broker_admin_url="http://a:b@127.0.0.1:1"))
    assert len(logged) == 1


async def test_an_unreachable_api_is_tried_again_and_reported_once(monkeypatch):
    """The service starts anyway; the same failure is logged once however often it recurs."""
    from dataclasses import replace

    from shared import config, inbox_bound

    logged = []
    monkeypatch.setattr(inbox_bound, "log", _Recorder(logged))
    monkeypatch.setattr(inbox_bound, "RETRY_S", (0.05,))
    settings = replace(config.load({}), broker_admin_url="http://a:b@127.0.0.1:1")
    stop = asyncio.Event()
    task = asyncio.create_task(inbox_bound.keep(settings, stop))
    await asyncio.sleep(0.6)
    assert not task.done()
    stop.set()
    await asyncio.wait_for(task, 5)
    assert [level for level, _ in logged] == ["warning"] and "not set yet" in logged[0][1]


class _Recorder:
    def __init__(self, into: list) -> None:
        self._into = into

    def warning(self, event: str, **_: object) -> None:
        self._into.append(("warning", event))

    def info(self, event: str, **_: object) -> None:
        self._into.append(("info", event))
