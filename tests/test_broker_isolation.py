"""Broker-level isolation (docs/security.md), against the real broker.

A vhost of its own, the services in this process with per-handle broker users issued
through the management API, a public bootstrap user like the compose stack's. Checks that a
handle's own broker user can publish requests, get replies and read its own notification
queue, and nothing else; that the public user reads no queue; that the broker refuses a
forged `user_id` and the services ignore internal messages from anyone but their own user;
and that `IssueBrokerCredentials` rotates the password. Every broker user made here is
deleted at the end."""

import asyncio
import base64
import json
import secrets
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest

from aodm import envelope, topology
from aodm.client import Client, with_credentials
from aodm.crypto import Identity
from aodm.encoding import b64encode
from aodm.errors import InvalidArgument, NoSessionKey, NotFound, Unauthorized
from aodm.inbox import Inbox, InboxUnavailable
from aodm.notifications import Fanout, HandleRegistered, NewMessage, SessionEstablished
from aodm.registry_api import REGISTRY_TARGET, Activity, ActivityReport
from aodm.session_api import Member, Spawn
from aodm.transport import AccessRefused, BrokerError, Bus, LoginRefused, QueueMissing, url_user
from services.registry.credentials import PUBLIC_PERMISSIONS, permissions_for, vhost_of
from tests.conftest import MANAGEMENT, isolated_settings, running_services
from tests.test_cli import aodm

_encoder = msgspec.json.Encoder()


def api(method: str, path: str, body: dict | None = None) -> bytes:
    """The management API as the test broker's administrator."""
    parts = urllib.parse.urlsplit(MANAGEMENT)
    request = urllib.request.Request(
        f"{parts.scheme}://{parts.hostname}:{parts.port}/api{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
    )
    token = base64.b64encode(f"{parts.username}:{parts.password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read()


def q(name: str) -> str:
    return urllib.parse.quote(name, safe="")


@dataclass
class System:
    settings: object
    vhost: str
    prefix: str  # every broker user this module makes starts with it
    public_url: str
    service_user: str

    def user_url(self, user: str, password: str) -> str:
        return with_credentials(self.settings.amqp_url, user, password)

    def make_user(self, name: str, permissions: dict[str, str]) -> str:
        """A broker user (named with the prefix) with these permissions; returns its URL."""
        user, password = f"{self.prefix}{name}", secrets.token_urlsafe(12)
        api("PUT", f"/users/{q(user)}", {"password": password, "tags": ""})
        api("PUT", f"/permissions/{q(self.vhost)}/{q(user)}", permissions)
        return self.user_url(user, password)


@pytest.fixture(scope="module")
async def system():
    # The prefix ends in a dot, so no issued user (prefix + handle) can equal "<prefix>x.y".
    prefix = f"aodm-t{secrets.token_hex(4)}."
    async with isolated_settings(broker_admin_url=MANAGEMENT, broker_user_prefix=prefix) as settings:
        vhost = vhost_of(settings.amqp_url)
        made = System(settings, vhost, prefix, "", url_user(settings.amqp_url))
        try:
            made.public_url = made.make_user("bootstrap.public", PUBLIC_PERMISSIONS)
            async with running_services(settings):
                yield made
        finally:
            for user in json.loads(api("GET", "/users")):
                if user["name"].startswith(prefix):
                    api("DELETE", f"/users/{q(user['name'])}")
            left = [u["name"] for u in json.loads(api("GET", "/users")) if u["name"].startswith(prefix)]
            assert not left, f"broker users left behind: {left}"


@pytest.fixture
async def person(system):
    """Factory: a fresh identity registers a handle through the public user, then connects
    with the handle's own issued broker user."""
    opened: list[Client] = []

    async def make(prefix: str = "iso") -> Client:
        identity = Identity.generate()
        public = await Client.connect(system.public_url, identity)
        opened.append(public)
        await public.register(f"{prefix}-{secrets.token_hex(4)}")
        assert public.broker_url is not None, "the registry issued no broker user"
        own = await Client.connect(public.broker_url, identity, public.handle)
        own.broker_user, own.broker_password = public.broker_user, public.broker_password
        opened.append(own)
        return own

    yield make
    for client in opened:
        await client.close()


async def refused(url: str, operation, code: str = "ACCESS_REFUSED") -> str:
    """Run `operation(bus)` on a fresh connection (a refusal closes the channel) and return
    the broker's refusal; fail if the broker allowed it."""
    bus = await Bus.connect(url, name="aodm-test-isolation")
    try:
        with pytest.raises((*BrokerError, AccessRefused)) as caught:
            await asyncio.wait_for(operation(bus), 10)
        text = f"{caught.value} {caught.value.__cause__ or ''}"
        assert code in text or isinstance(caught.value, AccessRefused), text
        return text
    finally:
        await bus.close()


async def ignore(delivery) -> None:
    pass


# -- issuance --------------------------------------------------------------------------


async def test_register_issues_the_handle_its_own_broker_user(system, person):
    alice = await person("alice")
    assert alice.broker_user == system.prefix + alice.handle
    granted = json.loads(api("GET", f"/permissions/{q(system.vhost)}/{q(alice.broker_user)}"))
    assert {k: granted[k] for k in ("configure", "write", "read")} == permissions_for(topology.inbox_queue(alice.handle))
    assert granted["read"] == rf"^aodm\.inbox\.{alice.handle}$"
    user = json.loads(api("GET", f"/users/{q(alice.broker_user)}"))
    assert user["tags"] in ([], ""), "an issued user must not log in to the management API"


async def test_a_low_order_box_key_is_refused_before_any_broker_user_is_issued(system):
    """All zeros cannot be sealed to: refused up front, with no broker user left behind."""
    client = await Client.connect(system.public_url, Identity.generate())
    try:
        name = f"zero-{secrets.token_hex(4)}"
        data = msgspec.json.encode({"Handle": name, "BoxKey": b64encode(bytes(32))}).decode()
        env = envelope.sign(client.identity.signing_key, target=REGISTRY_TARGET, from_=None, action="Register",
                            data=data, anchor=b64encode(secrets.token_bytes(16)))
        with pytest.raises(InvalidArgument):
            await client.send_envelope(env)
    finally:
        await client.close()
    users = [u["name"] for u in json.loads(api("GET", "/users"))]
    assert system.prefix + name not in users


async def test_an_issued_user_is_refused_connections_past_its_limit(system, person):
    alice = await person("alice")  # holds one or two connections already
    limits = json.loads(api("GET", f"/user-limits/{q(alice.broker_user)}"))[0]["value"]
    assert limits == {"max-connections": 16, "max-channels": 64}
    opened: list[Bus] = []
    refusal: BaseException | None = None
    try:
        for _ in range(20):
            try:
                opened.append(await asyncio.wait_for(Bus.connect(alice.broker_url, name="aodm-test-limit"), 10))
            except Exception as exc:  # the broker closes the one too many
                refusal = exc
                break
        assert refusal is not None, f"{len(opened)} more connections were let in"
        assert 14 <= len(opened) <= 15  # the 16th connection of the user, counting its own
    finally:
        await asyncio.gather(*(bus.close() for bus in opened), return_exceptions=True)


async def test_issuance_is_off_without_an_admin_url(make_client):
    client = await make_client("plain")
    assert client.broker_url is None and client.broker_user is None
    assert await client.issue_broker_credentials() is None


# -- what a handle's own user can do ---------------------------------------------------


async def test_own_user_publishes_requests_gets_replies_and_reads_its_queue(person):
    alice, bob = await person("alice"), await person("bob")
    assert (await alice.query_handle(bob.handle)).handle == bob.handle  # RPC via direct reply-to
    session = (await alice.establish_session(bob.handle)).session_id
    await alice.rotate_session_key(session, bob.handle)
    await alice.send_text(session, "only bob reads this")
    async with Inbox(bob.bus, bob.handle) as inbox:
        while not isinstance(note := await inbox.next(10), NewMessage):
            pass
    assert await bob.decrypt(session, note.generation, note.content) == "only bob reads this"


async def test_own_user_consumes_its_queue_right_after_register(system, person):
    """The registry declares the queue, as the services' user, before Register answers: the
    handle's own user (whose read permission names the queue) consumes it at once, with no
    retry, and gets what is published to the handle."""
    for _ in range(5):
        own = await person("fresh")
        got: asyncio.Queue = asyncio.Queue()
        consumer = await own.bus.consume(topology.inbox_queue(own.handle), got.put, prefetch=1)
        try:
            service = await Bus.connect(system.settings.amqp_url, name="aodm-test-service")
            try:
                await service.publish(topology.INBOX, own.handle, b"{}")
            finally:
                await service.close()
            delivery = await asyncio.wait_for(got.get(), 10)
            assert delivery.body == b"{}"
            await delivery.ack()
        finally:
            await consumer.close()


# -- what it cannot do -----------------------------------------------------------------


async def test_a_handle_cannot_consume_another_handles_queue(person):
    alice, carol = await person("alice"), await person("carol")
    text = await refused(carol.broker_url, lambda bus: bus.consume(topology.inbox_queue(alice.handle), ignore, prefetch=1))
    assert topology.inbox_queue(alice.handle) in text
    with pytest.raises(InboxUnavailable, match="may not read"):
        async with Inbox(carol.bus, alice.handle):
            pass


@pytest.mark.parametrize("queue", [
    topology.REGISTRY_QUEUE, topology.ACTIVITY_QUEUE, topology.NOTIFIER_QUEUE, topology.shard_queue(0),
    topology.DEAD_LETTER_QUEUE, topology.WORKERS_QUEUE,
])
async def test_a_handle_cannot_read_the_services_queues(person, queue):
    carol = await person("carol")
    await refused(carol.broker_url, lambda bus: bus.consume(queue, ignore, prefetch=1))


@pytest.mark.parametrize("exchange,routing_key", [
    (topology.INTERNAL, topology.NOTIFIER_ROUTING_KEY),
    (topology.INTERNAL, topology.ACTIVITY_ROUTING_KEY),
    (topology.SESSIONS, "any-session"),
    (topology.INBOX, "victim"),
    (topology.DEAD_LETTERS, ""),
    ("", topology.REGISTRY_QUEUE),  # the default exchange: straight into any queue
])
async def test_a_handle_cannot_publish_to_internal_exchanges(person, exchange, routing_key):
    carol = await person("carol")
    await refused(carol.broker_url, lambda bus: bus.publish(exchange, routing_key, b"{}"))


async def declare_server_named(bus: Bus) -> None:
    """queue.declare with an empty name (amq.gen-…), straight on the AMQP channel: aio-pika
    would otherwise name the queue itself."""
    underlay = await bus._channel.get_underlay_channel()
    await underlay.queue_declare("", exclusive=True, auto_delete=True)


@pytest.mark.parametrize("what", ["its own queue", "another queue", "a server-named queue", "an exchange", "a binding"])
async def test_a_handle_cannot_declare_or_bind(person, what):
    alice, carol = await person("alice"), await person("carol")
    operations = {
        "its own queue": lambda bus: bus.declare_queue(topology.inbox_queue(carol.handle)),
        "another queue": lambda bus: bus.declare_queue(f"aodm.inbox.{carol.handle}-2"),
        "a server-named queue": declare_server_named,
        "an exchange": lambda bus: bus.declare_exchange(f"aodm.{carol.handle}", "fanout"),
        # binding its own queue to alice's routing key would copy alice's notifications
        "a binding": lambda bus: bus.bind(topology.inbox_queue(carol.handle), topology.INBOX, alice.handle),
    }
    await refused(carol.broker_url, operations[what])


async def test_the_public_user_registers_but_reads_no_queue(system, person):
    alice = await person("alice")
    identity = Identity.generate()
    public = await Client.connect(system.public_url, identity)
    try:
        await public.register(f"pub-{secrets.token_hex(4)}")  # requests and replies work
        for handle in (public.handle, alice.handle):
            # B023: `refused` calls it and is awaited within this iteration.
            await refused(system.public_url, lambda bus: bus.consume(topology.inbox_queue(handle), ignore, prefetch=1))  # noqa: B023
        await refused(system.public_url, lambda bus: bus.publish(topology.INTERNAL, topology.NOTIFIER_ROUTING_KEY, b"{}"))
        await refused(system.public_url, declare_server_named)
    finally:
        await public.close()


# -- user_id: the broker vouches for the publisher, the services check it --------------


async def test_the_broker_refuses_a_forged_user_id(system, person):
    carol = await person("carol")

    async def forge(bus: Bus) -> None:
        bus.user = system.service_user  # what Bus puts in user_id
        await bus.publish(topology.REQUESTS, topology.REGISTRY_ROUTING_KEY, b"{}")

    await refused(carol.broker_url, forge, code="PRECONDITION_FAILED")
    await refused(system.public_url, forge, code="PRECONDITION_FAILED")

    # Even a user allowed to write to the internal exchanges cannot pass for the services.
    rogue_url = system.make_user("rogue.forger", {"configure": "^$", "write": ".*", "read": "^$"})
    session = b64encode(secrets.token_bytes(32))
    spawn = _encoder.encode(Spawn(session, [Member(carol.handle, carol.identity.address, carol.identity.box_public)]))
    event = _encoder.encode(HandleRegistered(f"ghost-{secrets.token_hex(4)}"))
    for exchange, routing_key, body in [(topology.SESSIONS, session, spawn),
                                        (topology.INTERNAL, topology.NOTIFIER_ROUTING_KEY, event)]:
        async def forge_internal(bus: Bus) -> None:
            bus.user = system.service_user
            await bus.publish(exchange, routing_key, body)  # noqa: B023 (awaited within this iteration)

        await refused(rogue_url, forge_internal, code="PRECONDITION_FAILED")


async def test_internal_messages_from_other_users_are_ignored(system, person):
    """A user allowed to write everywhere (a misconfigured broker) is still not the
    services: its Spawn, notifier events and activity events are dropped."""
    alice, bob = await person("alice"), await person("bob")
    rogue_url = system.make_user("rogue.writer", {"configure": "^$", "write": ".*", "read": "^$"})
    rogue = await Bus.connect(rogue_url, name="aodm-test-rogue")
    try:
        # A Spawn of a session nobody established, with alice as a member.
        forged_session = b64encode(secrets.token_bytes(32))
        members = [Member(h.handle, h.identity.address, h.identity.box_public) for h in (alice, bob)]
        await rogue.publish(topology.SESSIONS, forged_session, _encoder.encode(Spawn(forged_session, members)))
        # A notification for alice, and a queue for a handle that does not exist.
        fake = NewMessage(id="forged", handle=alice.handle, at=1, session_id=forged_session, message_id="m", seq=1,
                          sender=bob.handle, generation=1, timestamp=1, content="forged")
        await rogue.publish(topology.INTERNAL, topology.NOTIFIER_ROUTING_KEY, _encoder.encode(Fanout([fake])))
        ghost = f"ghost-{secrets.token_hex(4)}"
        await rogue.publish(topology.INTERNAL, topology.NOTIFIER_ROUTING_KEY, _encoder.encode(HandleRegistered(ghost)))
    finally:
        await rogue.close()

    # The session worker handles its shard in order: the Spawn was seen before this request.
    with pytest.raises(NotFound):
        await alice.get_current_key(forged_session)
    # The notifier handles events in order: the genuine notification comes first.
    established = await bob.establish_session(alice.handle)
    async with Inbox(alice.bus, alice.handle) as inbox:
        first = await inbox.next(10)
    assert isinstance(first, SessionEstablished) and first.session_id == established.session_id, first
    # ... and the forged HandleRegistered made no queue.
    service = await Bus.connect(system.settings.amqp_url, name="aodm-test-service")
    try:
        with pytest.raises(QueueMissing):
            await service.consume(topology.inbox_queue(ghost), ignore, prefetch=1)
    finally:
        await service.close()
    # A genuine session still works, and a forged activity event does not touch the chat list.
    with pytest.raises(NoSessionKey):
        await alice.get_current_key(established.session_id)
    rogue = await Bus.connect(rogue_url, name="aodm-test-rogue")
    try:
        future = 4_000_000_000_000
        await rogue.publish(topology.INTERNAL, topology.ACTIVITY_ROUTING_KEY,
                            _encoder.encode(ActivityReport([Activity(established.session_id, future)])))
    finally:
        await rogue.close()
    await asyncio.sleep(1.0)
    chats = (await alice.get_chat_list()).chats
    assert [c.last_activity for c in chats if c.session_id == established.session_id] != [future]


# -- rotation --------------------------------------------------------------------------


async def test_issue_broker_credentials_rotates_the_password(system, person):
    alice = await person("alice")
    old_url = alice.broker_url
    new_url = await alice.issue_broker_credentials()
    assert new_url is not None and new_url != old_url and alice.broker_user == system.prefix + alice.handle
    with pytest.raises(LoginRefused):
        await Bus.connect(old_url, name="aodm-test-old-password")
    fresh = await Client.connect(new_url, alice.identity, alice.handle)
    try:
        async with Inbox(fresh.bus, alice.handle):
            pass
        await fresh.query_handle(alice.handle)
    finally:
        await fresh.close()


async def test_only_the_handles_owner_can_rotate(system, person):
    """IssueBrokerCredentials acts as From, which must be signed by the handle's owner."""
    from aodm.errors import Unauthorized

    alice, mallory = await person("alice"), await person("mallory")
    mallory.handle = alice.handle  # sign as alice's handle with mallory's key
    with pytest.raises(Unauthorized):
        await mallory.issue_broker_credentials()
    bus = await Bus.connect(alice.broker_url, name="aodm-test-still-valid")  # alice's password is unchanged
    await bus.close()


# -- the CLI and the demo with issued users ---------------------------------------------


async def test_cli_keeps_and_uses_the_handles_own_login(system, tmp_path: Path):
    handle = f"cli-{secrets.token_hex(3)}"

    async def run(*args: str):
        return await aodm(system.public_url, tmp_path, *args)

    assert (await run("identity", "new")).code == 0
    registered = await run("register", handle)
    assert registered.code == 0, registered.err
    assert system.prefix + handle in registered.out
    state = json.loads((tmp_path / "state.json").read_text())
    first = state["brokers"][handle]
    assert first["user"] == system.prefix + handle
    assert oct((tmp_path / "state.json").stat().st_mode & 0o777) == "0o600"

    listened = await run("listen", "--once", "--timeout", "2")  # reads its own queue
    assert listened.code == 0, listened.err

    rotated = await run("credentials")
    assert rotated.code == 0, rotated.err
    second = json.loads((tmp_path / "state.json").read_text())["brokers"][handle]
    assert second["user"] == first["user"] and second["password"] != first["password"]
    assert (await run("listen", "--once", "--timeout", "1")).code == 0

    # Without its own login the public user cannot read the queue: one clear line.
    state = json.loads((tmp_path / "state.json").read_text())
    state["brokers"] = {}
    (tmp_path / "state.json").write_text(json.dumps(state))
    denied = await run("listen", "--once", "--timeout", "1")
    assert denied.failed_cleanly(), denied
    assert "may not read" in denied.err

    # A stale stored password: one clear line that names the fix.
    state["brokers"] = {handle: first}
    (tmp_path / "state.json").write_text(json.dumps(state))
    stale = await run("chats")
    assert stale.failed_cleanly(), stale
    assert "aodm credentials" in stale.err


async def test_demo_runs_with_issued_users(system, tmp_path: Path):
    result = await aodm(system.public_url, tmp_path, "demo", "--wait", "30")
    assert result.code == 0, result.out + result.err
    assert "reconnects as its own broker user" in result.out
    assert "the same key" in result.out


# -- a management API outage ------------------------------------------------------------


async def test_a_management_api_outage_is_waited_out():
    """Register waits while the management API is unreachable (retried like a database
    outage, never answered `internal`) and completes once it is back."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    upstream = urllib.parse.urlsplit(MANAGEMENT)

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(upstream.hostname, upstream.port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)

    prefix = f"aodm-t{secrets.token_hex(4)}."
    admin_url = f"http://{upstream.username}:{upstream.password}@127.0.0.1:{port}"
    server = None
    try:
        async with isolated_settings(broker_admin_url=admin_url, broker_user_prefix=prefix) as settings, \
                running_services(settings, names=("registry",)):
            client = await Client.connect(settings.amqp_url, Identity.generate(), timeout=30)
            try:
                registering = asyncio.create_task(client.register(f"late-{secrets.token_hex(4)}"))
                await asyncio.sleep(2.0)
                assert not registering.done(), "Register answered while the management API was down"
                server = await asyncio.start_server(forward, "127.0.0.1", port)
                await registering
                assert client.broker_url is not None
                bus = await Bus.connect(client.broker_url, name="aodm-test-late")
                await bus.close()
            finally:
                await client.close()
    finally:
        if server is not None:
            server.close()
        for user in json.loads(api("GET", "/users")):
            if user["name"].startswith(prefix):
                api("DELETE", f"/users/{q(user['name'])}")


# -- devices ---------------------------------------------------------------------------


async def test_each_device_has_its_own_broker_user_reading_only_its_own_queue(system, person):
    from aodm import devices

    alice = await person("alice")
    phone = await Client.connect(system.public_url, Identity.generate(), alice.handle)
    try:
        await alice.add_device(devices.device_code(alice.handle, phone.identity.signing_key, phone.identity.box_public))
        phone_url = await phone.issue_broker_credentials()  # signed by the phone: the phone's own user
        assert phone.broker_user == f"{system.prefix}{alice.handle}.{phone.device_id}"
        phone_queue = await phone.inbox_queue()
        assert phone_queue == f"aodm.inbox.{alice.handle}.{phone.device_id}"
        async with Client.connect(phone_url, phone.identity, alice.handle) as own, \
                Inbox(own.bus, alice.handle, queue=phone_queue):
            pass  # it reads its own queue
        await refused(phone_url, lambda bus: bus.consume(topology.inbox_queue(alice.handle), ignore, prefetch=1))  # not the first device's
        await refused(alice.broker_url, lambda bus: bus.consume(phone_queue, ignore, prefetch=1))  # nor the other way round
        await alice.remove_device(phone.device_id)
        users = [u["name"] for u in json.loads(api("GET", "/users"))]
        assert phone.broker_user not in users and alice.broker_user in users
    finally:
        await phone.close()


async def test_a_forged_device_list_from_another_user_is_ignored(system, person):
    """A DevicesOf from a broker user that is not the services' would make any key a device
    of anyone's handle in its sessions: the session workers drop it."""
    from aodm.session_api import DeviceKeysOf, DevicesOf

    alice, bob = await person("alice"), await person("bob")
    session = (await alice.establish_session(bob.handle)).session_id
    mallory = Identity.generate()
    rogue_url = system.make_user("rogue.devices", {"configure": "^$", "write": ".*", "read": "^$"})
    rogue = await Bus.connect(rogue_url, name="aodm-test-rogue")
    try:
        forged = DevicesOf(alice.handle, 99, [DeviceKeysOf(mallory.sign_public, mallory.box_public)])
        await rogue.publish(topology.INTERNAL, topology.SESSION_DEVICES_ROUTING_KEY, _encoder.encode(forged))
    finally:
        await rogue.close()
    await asyncio.sleep(1.0)
    impostor = Client(alice.bus, mallory, alice.handle)
    with pytest.raises(Unauthorized):
        await impostor.get_current_key(session)
    with pytest.raises(NoSessionKey):  # alice's own key still acts for her
        await alice.get_current_key(session)
