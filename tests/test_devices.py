"""A handle's devices (protocol §13): the signed device log's rules without a broker, then,
against a running stack, every device getting every notification in its own queue, and
bad changes refused with nothing changed."""

import asyncio
import secrets

import pytest
from nacl.signing import SigningKey

from aodm import crypto, devices, envelope, topology
from aodm.client import Client
from aodm.crypto import Identity
from aodm.encoding import b64decode, b64encode
from aodm.errors import (
    Forbidden,
    InvalidArgument,
    KeyOutdated,
    NoSessionKey,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    Unauthorized,
)
from aodm.inbox import Inbox, InboxUnavailable
from aodm.notifications import DevicesChanged, NewMessage
from aodm.registry_api import REGISTRY_TARGET, AddDevice, DeviceChange, DeviceKeys, RemoveDevice
from aodm.session_api import Rotated, RotateSessionKey, SealedKey, Shared, ShareKeys
from services.registry import store as registry_store
from services.registry.devices import DEVICE_CHANGES_PER_DAY
from shared import db
from tests.isolation import drop_database, new_database

# -- the log's rules (no broker, no database) -----------------------------------------------


def _entry(signer: SigningKey, handle: str, action: str, data: AddDevice | RemoveDevice) -> bytes:
    import msgspec

    env = envelope.sign(signer, target=REGISTRY_TARGET, from_=handle, action=action,
                        data=msgspec.json.encode(data).decode(), anchor=b64encode(secrets.token_bytes(16)))
    return envelope.encode(env)


def _add(log: devices.DeviceLog, signer: SigningKey, new: Identity | SigningKey, *, prev: str | None = None) -> bytes:
    key = new.signing_key if isinstance(new, Identity) else new
    box = new.box_public if isinstance(new, Identity) else None
    keys = DeviceKeys(b64encode(bytes(key.verify_key)), box, "device" if box else "recovery")
    add = AddDevice(keys, devices.sign_claim(key, log.handle, keys), log.head if prev is None else prev)
    return _entry(signer, log.handle, "AddDevice", add)


@pytest.fixture
def first():
    return Identity.generate()


@pytest.fixture
def log(first):
    return devices.verify_log("alice", [devices.genesis_entry("alice", first.sign_public, first.box_public)])


def test_the_first_device_is_the_registration_and_another_is_added_by_it(log, first):
    phone = Identity.generate()
    after = log.apply(_add(log, first.signing_key, phone))
    assert after.seq == 2 and set(after.devices) == {devices.device_id(bytes(k.signing_key.verify_key)) for k in (first, phone)}
    assert after.devices[devices.device_id(bytes(phone.signing_key.verify_key))].added_seq == 2


def test_a_key_that_is_no_device_cannot_add_one(log):
    with pytest.raises(Unauthorized):
        log.apply(_add(log, SigningKey.generate(), Identity.generate()))


def test_a_claim_not_signed_by_the_new_key_is_refused(log, first):
    phone, other = Identity.generate(), SigningKey.generate()
    keys = DeviceKeys(phone.sign_public, phone.box_public)
    forged = AddDevice(keys, devices.sign_claim(other, "alice", keys), log.head)
    with pytest.raises(InvalidArgument, match="Proof"):
        log.apply(_entry(first.signing_key, "alice", "AddDevice", forged))


def test_an_entry_must_name_the_head_it_follows(log, first):
    with pytest.raises(InvalidArgument):
        log.apply(_add(log, first.signing_key, Identity.generate(), prev=devices.entry_hash(b"elsewhere")))


def test_a_device_is_removed_by_another_and_never_comes_back(log, first):
    phone = Identity.generate()
    two = log.apply(_add(log, first.signing_key, phone))
    phone_id = devices.device_id(bytes(phone.signing_key.verify_key))
    with pytest.raises(Forbidden):  # not by itself
        two.apply(_entry(phone.signing_key, "alice", "RemoveDevice", RemoveDevice(phone_id, two.head)))
    three = two.apply(_entry(first.signing_key, "alice", "RemoveDevice", RemoveDevice(phone_id, two.head)))
    assert phone_id not in three.devices
    with pytest.raises(Unauthorized):  # its key is refused from then on
        three.signer(phone.sign_public, "GetChatList")
    with pytest.raises(InvalidArgument):  # and never taken back
        three.apply(_add(three, first.signing_key, phone))


def test_the_last_device_is_never_removed(log, first):
    recovery = SigningKey.generate()
    two = log.apply(_add(log, first.signing_key, recovery))
    first_id = devices.device_id(bytes(first.signing_key.verify_key))
    with pytest.raises(InvalidArgument):
        two.apply(_entry(recovery, "alice", "RemoveDevice", RemoveDevice(first_id, two.head)))


def test_a_recovery_key_adds_devices_and_signs_nothing_else(log, first):
    recovery = SigningKey.generate()
    two = log.apply(_add(log, first.signing_key, recovery))
    three = two.apply(_add(two, recovery, Identity.generate()))
    assert three.seq == 3
    with pytest.raises(Unauthorized):
        three.signer(b64encode(bytes(recovery.verify_key)), "SendMessage")


def test_a_device_code_carries_the_keys_and_their_claim():
    phone = Identity.generate()
    handle, keys, proof = devices.read_device_code(devices.device_code("alice", phone.signing_key, phone.box_public))
    assert (handle, keys.sign_key, keys.box_key, keys.kind) == ("alice", phone.sign_public, phone.box_public, "device")
    phone.signing_key.verify_key.verify(devices.claim_bytes("alice", keys), b64decode(proof))


# -- against the stack --------------------------------------------------------------------------


async def second_device(stack, owner: Client) -> Client:
    """A new identity made a device of `owner`'s handle by `owner`."""
    phone = await Client.connect(stack.amqp_url, Identity.generate(), owner.handle)
    await owner.add_device(devices.device_code(owner.handle, phone.identity.signing_key, phone.identity.box_public))
    return phone


@pytest.fixture
async def devices_of(stack):
    made: list[Client] = []

    async def make(owner: Client, count: int) -> list[Client]:
        for _ in range(count):
            made.append(await second_device(stack, owner))
        return made[-count:]

    yield make
    for client in made:
        await client.close()


async def test_every_device_gets_every_notification_in_order(make_client, devices_of):
    alice, bob = await make_client("alice"), await make_client("bob")
    phone, tablet = await devices_of(bob, 2)
    queues = [await c.inbox_queue() for c in (bob, phone, tablet)]
    assert queues[0] == topology.inbox_queue(bob.handle) and len(set(queues)) == 3
    session = (await alice.establish_session(bob.handle)).session_id
    await alice.rotate_session_key(session, bob.handle)
    await bob.accept(session)
    sent = [(await alice.send_text(session, f"m{i}")).seq for i in range(6)]
    for client, queue in zip((bob, phone, tablet), queues, strict=True):
        async with Inbox(client.bus, bob.handle, queue=queue) as inbox:
            seen: list[int] = []
            while len(seen) < len(sent):
                note = await inbox.next(timeout=10)
                if isinstance(note, NewMessage):
                    seen.append(note.seq)
        assert seen == sent, f"{queue} got {seen}"


async def test_a_device_change_is_told_to_the_handles_devices_and_its_peers(make_client, devices_of):
    alice, bob = await make_client("alice"), await make_client("bob")
    await alice.establish_session(bob.handle)
    async with Inbox(alice.bus, alice.handle) as alice_inbox, Inbox(bob.bus, bob.handle) as bob_inbox:
        [phone] = await devices_of(bob, 1)
        for inbox in (alice_inbox, bob_inbox):
            note = await inbox.next(timeout=10)
            while not isinstance(note, DevicesChanged):
                note = await inbox.next(timeout=10)
            assert (note.subject, note.seq, note.change, note.device_id) == (bob.handle, 2, "added", phone.device_id)
    log = await alice.device_log(bob.handle)  # verified here, entry by entry
    assert set(log.devices) == {bob.device_id, phone.device_id}


async def test_a_second_device_acts_as_the_handle_at_the_registry(make_client, devices_of):
    bob = await make_client("bob")
    [phone] = await devices_of(bob, 1)
    assert (await phone.get_chat_list()).chats == []
    assert [h.handle for h in await phone.get_handles()] == [bob.handle]


async def test_a_removed_device_is_refused_and_its_queue_is_gone(stack, make_client, devices_of):
    bob = await make_client("bob")
    [phone] = await devices_of(bob, 1)
    queue = await phone.inbox_queue()
    with pytest.raises(Forbidden):
        await phone.remove_device(phone.device_id)
    change = await bob.remove_device(phone.device_id)
    assert change.seq == 3
    with pytest.raises(Unauthorized):
        await phone.get_chat_list()
    with pytest.raises(InboxUnavailable):
        async with Inbox(phone.bus, bob.handle, queue=queue, wait=0.5):
            pass
    assert set((await bob.device_log()).devices) == {bob.device_id}


async def test_bad_device_changes_are_refused_and_change_nothing(make_client):
    bob, mallory = await make_client("bob"), await make_client("mallory")
    before = await bob.device_log()
    phone = Identity.generate()
    code = devices.device_code(bob.handle, phone.signing_key, phone.box_public)
    _, keys, proof = devices.read_device_code(code)
    mallory.handle = bob.handle  # signs as bob with a key that is no device of bob's
    with pytest.raises(Unauthorized):
        await mallory.call(REGISTRY_TARGET, AddDevice(keys, proof, before.head), DeviceChange)
    with pytest.raises(InvalidArgument):  # a claim the new key did not sign
        forged = devices.sign_claim(SigningKey.generate(), bob.handle, keys)
        await bob.call(REGISTRY_TARGET, AddDevice(keys, forged, before.head), DeviceChange)
    with pytest.raises(InvalidArgument):  # a stale head
        await bob.call(REGISTRY_TARGET, AddDevice(keys, proof, devices.entry_hash(b"old")), DeviceChange)
    with pytest.raises(InvalidArgument):
        await bob.call(REGISTRY_TARGET, RemoveDevice("0123456789abcdef", before.head), DeviceChange)
    after = await bob.device_log()
    assert (after.seq, after.head, set(after.devices)) == (before.seq, before.head, set(before.devices))


async def test_two_changes_made_at_once_do_not_both_land(stack, make_client):
    bob = await make_client("bob")
    head = (await bob.device_log()).head
    adds = []
    for _ in range(2):
        phone = Identity.generate()
        keys = DeviceKeys(phone.sign_public, phone.box_public)
        adds.append(bob.call(REGISTRY_TARGET, AddDevice(keys, devices.sign_claim(phone.signing_key, bob.handle, keys), head),
                             DeviceChange))
    results = await asyncio.gather(*adds, return_exceptions=True)
    assert sorted(type(r).__name__ for r in results) == ["DeviceChange", "InvalidArgument"]
    assert (await bob.device_log()).seq == 2


async def test_device_changes_are_limited_per_day(stack, make_client):
    bob = await make_client("bob")
    for _ in range(DEVICE_CHANGES_PER_DAY):
        phone = Identity.generate()
        await bob.add_device(devices.device_code(bob.handle, phone.signing_key, phone.box_public))
    phone = Identity.generate()
    with pytest.raises(RateLimited):
        await bob.add_device(devices.device_code(bob.handle, phone.signing_key, phone.box_public))


async def test_recovery_adds_a_device_when_every_device_is_lost(stack, make_client):
    bob = await make_client("bob")
    secret = await bob.add_recovery_key()
    async with Client.connect(stack.amqp_url, Identity.generate()) as new_phone:
        change = await new_phone.recover(bob.handle, secret)
        assert change.device_id == new_phone.device_id
        await new_phone.remove_device(bob.device_id)  # the lost one
        assert (await new_phone.get_chat_list()).chats == []
    with pytest.raises(Unauthorized):
        await bob.get_chat_list()


async def test_the_device_migration_gives_every_handle_its_first_device_and_log():
    name, dsn = await new_database("aodm_test_devices_upgrade")
    pool = await db.connect(dsn, size=2)
    try:
        await db.migrate(pool, registry_store.SCHEMA, registry_store.MIGRATIONS[:-1])
        owners = {handle: Identity.generate() for handle in ("alice", "bob")}
        for handle, owner in owners.items():
            await pool.execute("INSERT INTO registry.handles (handle, sign_key, box_key, created_at) VALUES ($1, $2, $3, 1)",
                               handle, bytes(owner.signing_key.verify_key), bytes(owner.box_key.public_key))
        await db.migrate(pool, registry_store.SCHEMA, registry_store.MIGRATIONS)
        async with pool.acquire() as conn:
            for handle, owner in owners.items():
                entries = [bytes(r["entry"]) for r in await registry_store.log_entries(conn, handle, 0, 10)]
                assert entries == [devices.genesis_entry(handle, owner.sign_public, owner.box_public)]
                log = devices.verify_log(handle, entries)
                assert log.head == (await registry_store.log_head(conn, handle))["head"]
                key = bytes(owner.signing_key.verify_key)
                assert (await registry_store.device_of(conn, handle, key))["device_id"] == devices.device_id(key)
    finally:
        await pool.close()
        await drop_database(name)


# -- devices in sessions ------------------------------------------------------------------------


async def eventually(check, timeout: float = 10.0) -> None:
    """The session workers learn of a device change a moment after the registry (an event)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return await check()
        except AssertionError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)


async def known_to_the_session(device: Client, session: str) -> None:
    """Wait until the session workers take `device`'s key (before: unauthorized)."""

    async def known() -> None:
        try:
            await device.get_current_key(session)
        except Unauthorized as exc:
            raise AssertionError(str(exc)) from None
        except NoSessionKey:
            pass

    await eventually(known)


async def test_a_second_device_reads_and_sends_in_the_handles_sessions(make_client, devices_of):
    alice, bob = await make_client("alice"), await make_client("bob")
    [phone] = await devices_of(bob, 1)
    session = (await alice.establish_session(bob.handle)).session_id
    await known_to_the_session(phone, session)
    await alice.rotate_session_key(session, bob.handle)  # one sealed key per device of both
    batch = await phone.get_current_key(session)
    assert sorted((k.handle, k.box_key) for k in batch.keys) == sorted(
        [(alice.handle, alice.identity.box_public), (bob.handle, bob.identity.box_public),
         (bob.handle, phone.identity.box_public)])
    await alice.send_text(session, "to both of bob's devices")
    sent = await phone.send_text(session, "from bob's phone")  # a reply: accepts the request
    page = (await alice.query_messages(session)).messages
    assert [await alice.read_text(session, m) for m in page] == ["to both of bob's devices", "from bob's phone"]
    assert page[1].sender == bob.handle and page[1].sender_key == phone.identity.sign_public and sent.seq == 2
    assert [await c.read_text(session, page[0]) for c in (bob, phone)] == ["to both of bob's devices"] * 2


async def test_a_batch_must_seal_to_every_current_device(make_client, devices_of):
    alice, bob = await make_client("alice"), await make_client("bob")
    [phone] = await devices_of(bob, 1)
    session = (await alice.establish_session(bob.handle)).session_id
    await known_to_the_session(phone, session)
    key = b"k" * 32
    only_first = [SealedKey(h, c.identity.box_public, crypto.seal_session_key(key, c.identity.box_public))
                  for h, c in sorted([(alice.handle, alice), (bob.handle, bob)])]
    with pytest.raises(InvalidArgument, match="each current device"):
        await alice.call(session, RotateSessionKey(only_first), Rotated)
    twice = [*only_first, only_first[-1]]
    with pytest.raises(InvalidArgument):
        await alice.call(session, RotateSessionKey(twice), Rotated)
    with pytest.raises(NoSessionKey):  # nothing was stored
        await alice.get_current_key(session)


async def test_a_removed_device_is_refused_in_sessions_and_cannot_open_the_next_key(make_client, devices_of):
    alice, bob = await make_client("alice"), await make_client("bob")
    [phone] = await devices_of(bob, 1)
    session = (await alice.establish_session(bob.handle)).session_id
    await bob.accept(session)
    await known_to_the_session(phone, session)
    await alice.rotate_session_key(session, bob.handle)
    await bob.remove_device(phone.device_id)
    assert await bob.rotate_all() == [session]  # sealed to the devices left

    async def phone_refused() -> None:
        try:
            await phone.get_current_key(session)
        except Unauthorized:
            return
        raise AssertionError("the removed phone still reads the session")

    await eventually(phone_refused)
    batch = await bob.get_current_key(session)
    assert phone.identity.box_public not in {k.box_key for k in batch.keys}


async def test_an_older_device_list_never_replaces_a_newer_one(stack):
    from services.session import store as session_store

    pool = await db.connect(stack.database_url, size=1)
    try:
        async with pool.acquire() as conn:
            handle = f"h-{secrets.token_hex(4)}"
            assert await session_store.set_handle_devices(conn, handle, 3, [b"n" * 32], [b"b" * 32])
            assert not await session_store.set_handle_devices(conn, handle, 2, [b"o" * 32], [b"b" * 32])
            assert [bytes(k) for k in (await session_store.handle_devices(conn, handle))["sign_keys"]] == [b"n" * 32]
    finally:
        await pool.close()


async def test_the_session_device_migration_keeps_key_batches():
    from services.session import store as session_store

    name, dsn = await new_database("aodm_test_session_devices_upgrade")
    pool = await db.connect(dsn, size=2)
    try:
        await db.migrate(pool, session_store.SCHEMA, session_store.MIGRATIONS[:-1])
        await pool.execute("INSERT INTO session.sessions (session_id, created_at, key_generation) VALUES ('s', 0, 1)")
        for handle in ("alice", "bob"):
            await pool.execute("""INSERT INTO session.keys (session_id, generation, handle, box_key, sealed_key, rotated_by,
                                  created_at) VALUES ('s', 1, $1, $2, $3, 'alice', 0)""", handle, handle.encode() * 8, b"x" * 80)
        await db.migrate(pool, session_store.SCHEMA, session_store.MIGRATIONS)
        async with pool.acquire() as conn:
            assert [r["handle"] for r in await session_store.key_batch(conn, "s", 1)] == ["alice", "bob"]
            await session_store.insert_key_batch(conn, "s", 2, "alice", 1, [
                ("alice", b"a" * 32, b"x" * 80), ("bob", b"b" * 32, b"x" * 80), ("bob", b"p" * 32, b"x" * 80)])
            assert len(await session_store.key_batch(conn, "s", 2)) == 3
    finally:
        await pool.close()
        await drop_database(name)


async def test_a_send_under_a_key_sealed_before_a_device_change_is_refused_and_the_client_rotates(
        make_client, devices_of):
    alice, bob = await make_client("alice"), await make_client("bob")
    session = (await alice.establish_session(bob.handle)).session_id
    old = await alice.rotate_session_key(session, bob.handle)
    await bob.accept(session)
    [phone] = await devices_of(bob, 1)
    await known_to_the_session(phone, session)
    _, key = await alice.session_key(session, old)
    with pytest.raises(KeyOutdated):  # the phone could not read it: not stored
        await alice.send_message(session, crypto.encrypt(key, "under the old key"), old)
    sent = await alice.send_text(session, "under a key for the phone too")  # rotates, then sends
    assert sent.generation == old + 1
    [message] = (await phone.query_messages(session)).messages
    assert message.seq == 1 and await phone.read_text(session, message) == "under a key for the phone too"
    await bob.remove_device(phone.device_id)

    async def refused_again() -> None:
        try:
            await alice.send_message(session, crypto.encrypt((await alice.session_key(session, sent.generation))[1], "x"),
                                     sent.generation)
        except KeyOutdated:
            return
        raise AssertionError("a key the removed phone holds was still taken")

    await eventually(refused_again)


async def test_an_old_device_shares_the_history_with_a_new_one(make_client, devices_of):
    alice, bob = await make_client("alice"), await make_client("bob")
    session = (await alice.establish_session(bob.handle)).session_id
    await alice.rotate_session_key(session, bob.handle)
    await bob.accept(session)
    await alice.send_text(session, "before the phone")
    [phone] = await devices_of(bob, 1)
    await known_to_the_session(phone, session)
    [early] = (await phone.query_messages(session)).messages
    with pytest.raises(crypto.DecryptionFailed):  # sealed before it was added
        await phone.read_text(session, early)
    assert await bob.share_history() == 1
    assert await phone.read_text(session, early) == "before the phone"
    assert await bob.share_history() == 0  # nothing left to give
    await alice.send_text(session, "under the first key still")  # the batch seals to every device now
    key = SealedKey(alice.handle, alice.identity.box_public, crypto.seal_session_key(b"k" * 32, alice.identity.box_public))
    with pytest.raises(InvalidArgument):  # only to one's own devices
        await bob.call(session, ShareKeys(1, [key]), Shared)
    own = SealedKey(bob.handle, phone.identity.box_public, crypto.seal_session_key(b"k" * 32, phone.identity.box_public))
    with pytest.raises(NotFound):
        await bob.call(session, ShareKeys(9, [own]), Shared)


async def test_the_new_actions_refuse_strangers_and_oversized_data(make_client):
    alice, bob, mallory = await make_client("alice"), await make_client("bob"), await make_client("mallory")
    session = (await alice.establish_session(bob.handle)).session_id
    await alice.rotate_session_key(session, bob.handle)
    own = SealedKey(mallory.handle, mallory.identity.box_public,
                    crypto.seal_session_key(b"k" * 32, mallory.identity.box_public))
    with pytest.raises(Forbidden):  # not a member: no ShareKeys in someone else's session
        await mallory.call(session, ShareKeys(1, [own]), Shared)
    with pytest.raises(NotFound):
        await mallory.device_log(f"nobody-{secrets.token_hex(4)}")
    phone = Identity.generate()
    keys = DeviceKeys(phone.sign_public, phone.box_public)
    with pytest.raises(PayloadTooLarge):
        await bob.call(REGISTRY_TARGET, AddDevice(keys, "A" * 70_000, "x"), DeviceChange)
    assert (await bob.device_log()).seq == 1
