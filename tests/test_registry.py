"""The registry's actions against a running stack: every happy path and the bad inputs
that must come back as typed errors."""

import asyncio
import secrets
from dataclasses import replace

import msgspec
import pytest

from aodm import crypto, envelope, topology
from aodm.client import Client
from aodm.crypto import Identity
from aodm.encoding import b64encode
from aodm.errors import (
    AlreadyExists,
    Forbidden,
    InvalidArgument,
    MalformedRequest,
    NotFound,
    Unauthorized,
)
from aodm.inbox import Inbox
from aodm.notifications import SessionEstablished
from aodm.registry_api import REGISTRY_TARGET, Established, HandleInfo
from aodm.transport import QueueMissing, Unroutable

_encoder = msgspec.json.Encoder()


def fresh(prefix: str = "h") -> str:
    return f"{prefix}-{secrets.token_hex(5)}"


async def raw_call(client: Client, action: str, data: str | dict, *, from_: str | None = None) -> msgspec.Raw:
    """Sign `data` (a JSON text, or an object to encode) exactly as given, as `from_`
    (default: the bare signer address) and send it to the registry."""
    text = data if isinstance(data, str) else _encoder.encode(data).decode()
    env = envelope.sign(
        client.identity.signing_key,
        target=REGISTRY_TARGET,
        from_=from_,
        action=action,
        data=text,
        anchor=b64encode(secrets.token_bytes(16)),
    )
    return await client.send_envelope(env)


async def register_raw(client: Client, handle: str, box_key: str | None = None, *, from_: str | None = None) -> HandleInfo:
    data = {"Handle": handle, "BoxKey": client.identity.box_public if box_key is None else box_key}
    return msgspec.json.decode(await raw_call(client, "Register", data, from_=from_), type=HandleInfo)


# -- Register -------------------------------------------------------------------------


async def test_register_returns_the_keys(make_client):
    client = await make_client(register=False)
    name = fresh("alice")
    before = envelope.now_ms()
    info = await client.register(name)
    assert info.handle == name
    assert info.sign_key == client.identity.address
    assert info.box_key == client.identity.box_public
    assert before <= info.created_at <= envelope.now_ms()
    assert client.handle == name
    # and the registry answers with the same record
    found = await client.query_handle(name)
    assert (found.handle, found.sign_key, found.box_key, found.created_at) == (
        info.handle, info.sign_key, info.box_key, info.created_at
    )


@pytest.fixture(scope="module")
async def private_registry():
    """A registry of this module's own: the fixed names below are free in it whatever other
    tests (the fuzzers) have registered in the shared stack."""
    from tests.conftest import isolated_settings, running_services

    async with isolated_settings() as settings, running_services(settings, names=("registry", "notifier")):
        yield settings


@pytest.mark.parametrize(
    "name",
    [
        "q7z",  # minimum length
        "q" * 32,  # maximum length
        "0123456789",
        "under_score-dash",
        "---",
        "___",
    ],
)
async def test_register_accepts_every_allowed_shape(private_registry, name):
    client = await Client.connect(private_registry.amqp_url, Identity.generate())
    try:
        info = await client.register(name)
        assert info.handle == name
        assert (await client.query_handle(name)).sign_key == client.identity.address
    finally:
        await client.close()


@pytest.mark.parametrize(
    "name",
    [
        "",
        "ab",  # too short
        "a" * 33,  # too long by one
        "a" * 64,  # longest string the type accepts, still too long a handle
        "a" * 65,  # over the type's own cap
        "Alice",  # uppercase
        "ALICE",
        "\u0430lice",  # Cyrillic 'а'  # noqa: RUF003 (the look-alike under test)
        "alic\u0435",  # Cyrillic 'е'  # noqa: RUF003 (the look-alike under test)
        "\uff41\uff4c\uff49\uff43\uff45",  # fullwidth "alice"
        "ali\u200bce",  # zero-width space
        "\u200balice",
        "alice\u200d",  # zero-width joiner
        "alice\n",  # trailing newline ($ would accept it)
        "\nalice",
        "ali ce",
        " alice",
        "alice\t",
        "a.c",  # regex metacharacters
        "a.*",
        ".*",
        "abc|def",
        "[abc]",
        "^abc",
        "abc$",
        "a+b",
        "(abc)",
        "a\\d",
        "abc?",
        "a{3}",
        "al%ce",  # SQL LIKE wildcard
        "alice'--",
        "ali/ce",
        "ali.ce",
        "alicé",
        "ålice",
        "😀😀😀",
        "ǅabc",  # titlecase letter
        "abc\u0301",  # combining accent
    ],
)
async def test_register_rejects_bad_handles(make_client, name):
    client = await make_client(register=False)
    with pytest.raises(InvalidArgument):
        await client.register(name)
    assert client.handle is None
    # nothing was created under the key
    assert await client.get_handles() == []


@pytest.mark.parametrize("name", ["ali\x00ce", "\x00\x00\x00", "alice\x00"])
async def test_register_with_nul_is_refused_at_the_envelope(make_client, name):
    client = await make_client(register=False)
    with pytest.raises(MalformedRequest):
        await client.register(name)
    assert await client.get_handles() == []


async def test_register_lookalike_of_an_existing_handle_is_rejected(make_client):
    owner = await make_client("paypal")
    attacker = await make_client(register=False)
    lookalike = owner.handle.replace("a", "\u0430", 1)
    assert lookalike != owner.handle
    with pytest.raises(InvalidArgument):
        await attacker.register(lookalike)
    with pytest.raises(InvalidArgument):
        await attacker.query_handle(lookalike)


@pytest.mark.parametrize("data", ['{"Handle": 5, "BoxKey": "x"}', '{"Handle": "abcde"}', "[]", "not json", "null"])
async def test_register_malformed_data(make_client, data):
    client = await make_client(register=False)
    with pytest.raises(MalformedRequest):
        await raw_call(client, "Register", data)


async def test_register_unknown_field_is_malformed(make_client):
    client = await make_client(register=False)
    with pytest.raises(MalformedRequest):
        await raw_call(client, "Register", {"Handle": fresh(), "BoxKey": client.identity.box_public, "Admin": True})


async def test_register_duplicate_is_already_exists(make_client):
    first = await make_client("dup")
    # same key again
    with pytest.raises(AlreadyExists):
        await register_raw(first, first.handle)
    # another key, another box key
    other = await make_client(register=False)
    with pytest.raises(AlreadyExists):
        await other.register(first.handle)
    assert await other.get_handles() == []
    # the original owner still holds it, unchanged
    info = await other.query_handle(first.handle)
    assert info.sign_key == first.identity.address
    assert info.box_key == first.identity.box_public


async def test_register_duplicate_race_has_one_winner(make_client):
    name = fresh("race")
    clients = [await make_client(register=False) for _ in range(5)]
    results = await asyncio.gather(*(c.register(name) for c in clients), return_exceptions=True)
    winners = [r for r in results if not isinstance(r, BaseException)]
    losers = [r for r in results if isinstance(r, BaseException)]
    assert len(winners) == 1
    assert all(isinstance(r, AlreadyExists) for r in losers), losers
    owner = (await clients[0].query_handle(name)).sign_key
    assert owner == winners[0].sign_key


@pytest.mark.parametrize(
    "box_key",
    [
        "",
        "A" * 42,  # 31 bytes
        "A" * 44,  # 33 bytes
        b64encode(bytes(16)),
        b64encode(bytes(64)),
        "+" * 43,  # standard alphabet, not base64url
        "/" * 43,
        "A" * 42 + "=",  # padding
        "A" * 42 + "B",  # non-canonical trailing bits
        "!" * 43,
        "\u0410" * 43,  # Cyrillic capital A
        "A" * 43 + "\n",
    ],
)
async def test_register_bad_box_key_is_malformed(make_client, box_key):
    client = await make_client(register=False)
    with pytest.raises(MalformedRequest):
        await register_raw(client, fresh(), box_key)
    assert await client.get_handles() == []


# Curve25519's points of low order (and their non-canonical spellings): every shared secret
# with one is all zeros.
LOW_ORDER = [bytes.fromhex(h) for h in (
    "00" * 32,
    "01" + "00" * 31,
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
    "ec" + "ff" * 30 + "7f",
    "ed" + "ff" * 30 + "7f",
    "ee" + "ff" * 30 + "7f",
)]


@pytest.mark.parametrize("point", LOW_ORDER, ids=[p.hex()[:8] for p in LOW_ORDER])
async def test_register_with_a_low_order_box_key_is_refused_and_leaves_nothing(make_client, point):
    client = await make_client(register=False)
    name = fresh("loworder")
    with pytest.raises(InvalidArgument, match="low-order"):
        await register_raw(client, name, b64encode(point))
    with pytest.raises(NotFound):
        await client.query_handle(name)
    assert await client.get_handles() == []


async def test_register_box_key_of_the_wrong_type_is_malformed(make_client):
    client = await make_client(register=False)
    with pytest.raises(MalformedRequest):
        await raw_call(client, "Register", {"Handle": fresh(), "BoxKey": 12345})


async def test_register_from_own_handle_adds_a_second_handle(make_client):
    client = await make_client("first")
    second = fresh("second")
    info = await register_raw(client, second, from_=client.handle)
    assert info.handle == second and info.sign_key == client.identity.address


async def test_register_from_someone_elses_handle_is_unauthorized(make_client):
    victim = await make_client("victim")
    attacker = await make_client(register=False)
    name = fresh("stolen")
    with pytest.raises(Unauthorized):
        await register_raw(attacker, name, from_=victim.handle)
    with pytest.raises(NotFound):
        await attacker.query_handle(name)


async def test_register_from_someone_elses_address_is_unauthorized(make_client):
    victim = await make_client(register=False)
    attacker = await make_client(register=False)
    with pytest.raises(Unauthorized):
        await register_raw(attacker, fresh(), from_=victim.identity.address)


async def test_register_from_an_unregistered_name_is_unauthorized(make_client):
    client = await make_client(register=False)
    with pytest.raises(Unauthorized):
        await register_raw(client, fresh(), from_=fresh("ghost"))


# -- QueryHandle ----------------------------------------------------------------------


async def test_query_handle_unknown_is_not_found(make_client):
    client = await make_client()
    with pytest.raises(NotFound):
        await client.query_handle(fresh("nobody"))


@pytest.mark.parametrize("name", ["", "ab", "Alice", "a" * 33, "\u0430bc", "abc\n", ".*"])
async def test_query_handle_bad_name_is_invalid_argument(make_client, name):
    client = await make_client()
    with pytest.raises(InvalidArgument):
        await client.query_handle(name)


async def test_query_handle_needs_no_handle_but_accepts_one(make_client):
    client = await make_client()
    other = await make_client()
    # as the bare address (the client's default for lookups) and as its own handle
    assert (await client.query_handle(other.handle)).handle == other.handle
    raw = await raw_call(client, "QueryHandle", {"Handle": other.handle}, from_=client.handle)
    assert msgspec.json.decode(raw, type=HandleInfo).box_key == other.identity.box_public


# -- GetHandles -----------------------------------------------------------------------


async def test_get_handles_lists_every_handle_of_a_key(make_client):
    client = await make_client("one")
    names = [client.handle]
    for _ in range(2):
        name = fresh("more")
        await register_raw(client, name)
        names.append(name)
    unrelated = await make_client("unrelated")
    handles = await unrelated.get_handles(client.identity.address)
    assert [h.handle for h in handles] == sorted(names)
    assert {h.sign_key for h in handles} == {client.identity.address}
    assert {h.box_key for h in handles} == {client.identity.box_public}
    assert [h.handle for h in await unrelated.get_handles()] == [unrelated.handle]


async def test_get_handles_of_an_unknown_key_is_empty(make_client):
    client = await make_client()
    assert await client.get_handles(crypto.Identity.generate().address) == []


@pytest.mark.parametrize("owner", ["", "A" * 42, "A" * 44, "+" * 43, "A" * 42 + "B", b64encode(bytes(31))])
async def test_get_handles_bad_owner_is_malformed(make_client, owner):
    client = await make_client()
    with pytest.raises(MalformedRequest):
        await raw_call(client, "GetHandles", {"Owner": owner})


# -- QuerySession ---------------------------------------------------------------------


async def test_query_session_is_null_then_the_id_in_either_order(make_client):
    alice = await make_client("alice")
    bob = await make_client("bob")
    outsider = await make_client("outsider")
    assert await outsider.query_session(alice.handle, bob.handle) is None
    established = await alice.establish_session(bob.handle)
    assert await outsider.query_session(alice.handle, bob.handle) == established.session_id
    assert await outsider.query_session(bob.handle, alice.handle) == established.session_id
    assert await outsider.query_session(alice.handle, outsider.handle) is None
    # unknown handles are simply "no session"
    assert await outsider.query_session(alice.handle, fresh("ghost")) is None


async def test_query_session_bad_handle_is_invalid_argument(make_client):
    client = await make_client()
    with pytest.raises(InvalidArgument):
        await client.query_session(client.handle, "NOT-A-HANDLE")
    with pytest.raises(InvalidArgument):
        await client.query_session("\u0430bc", client.handle)


async def test_query_session_missing_field_is_malformed(make_client):
    client = await make_client()
    with pytest.raises(MalformedRequest):
        await raw_call(client, "QuerySession", {"HandleA": client.handle})


# -- EstablishSession -----------------------------------------------------------------


async def test_establish_session_notifies_both_and_is_idempotent(make_client):
    alice = await make_client("alice")
    bob = await make_client("bob")
    first = await alice.establish_session(bob.handle)
    assert first.created is True
    again = await alice.establish_session(bob.handle)
    assert again == Established(first.session_id, created=False)
    # from the other side: the same pair, the same session
    reverse = await bob.establish_session(alice.handle)
    assert reverse == Established(first.session_id, created=False)

    for client, peer in ((alice, bob.handle), (bob, alice.handle)):
        async with Inbox(client.bus, client.handle) as inbox:
            note = await inbox.next(timeout=10)
        assert isinstance(note, SessionEstablished)
        assert note.handle == client.handle
        assert note.session_id == first.session_id
        assert note.peer == peer


async def test_establish_session_concurrently_yields_one_session(make_client):
    alice = await make_client("alice")
    bob = await make_client("bob")
    results = await asyncio.gather(
        *(alice.establish_session(bob.handle) for _ in range(3)), *(bob.establish_session(alice.handle) for _ in range(3))
    )
    assert len({r.session_id for r in results}) == 1
    assert sum(r.created for r in results) == 1


async def test_establish_session_with_itself_is_forbidden(make_client):
    alice = await make_client("alice")
    with pytest.raises(Forbidden):
        await alice.establish_session(alice.handle)
    # even with a second handle of the same key it is a different handle, so allowed
    second = fresh("alt")
    await register_raw(alice, second)
    assert (await alice.establish_session(second)).created is True


async def test_establish_session_with_unknown_peer_is_not_found(make_client):
    alice = await make_client("alice")
    with pytest.raises(NotFound):
        await alice.establish_session(fresh("ghost"))


async def test_establish_session_bad_peer_name_is_invalid_argument(make_client):
    alice = await make_client("alice")
    with pytest.raises(InvalidArgument):
        await alice.establish_session("B\u043eb")


async def test_establish_session_from_bare_address_is_unauthorized(make_client):
    alice = await make_client("alice")
    bob = await make_client("bob")
    with pytest.raises(Unauthorized):
        await raw_call(alice, "EstablishSession", {"Handle": bob.handle})
    assert await bob.query_session(alice.handle, bob.handle) is None


async def test_establish_session_with_forged_from_is_unauthorized(make_client):
    alice = await make_client("alice")
    bob = await make_client("bob")
    mallory = await make_client("mallory")
    # mallory signs with her own key but claims to be alice
    with pytest.raises(Unauthorized):
        await raw_call(mallory, "EstablishSession", {"Handle": bob.handle}, from_=alice.handle)
    # and a From nobody registered
    with pytest.raises(Unauthorized):
        await raw_call(mallory, "EstablishSession", {"Handle": bob.handle}, from_=fresh("ghost"))
    assert await bob.query_session(alice.handle, bob.handle) is None


# -- GetChatList ----------------------------------------------------------------------


async def test_get_chat_list_lists_peers(make_client):
    alice = await make_client("alice")
    bob = await make_client("bob")
    carol = await make_client("carol")
    assert (await alice.get_chat_list()).chats == []
    with_bob = await alice.establish_session(bob.handle)
    with_carol = await carol.establish_session(alice.handle)
    chats = {c.session_id: c for c in (await alice.get_chat_list()).chats}
    assert set(chats) == {with_bob.session_id, with_carol.session_id}
    assert chats[with_bob.session_id].peer == bob.handle
    assert chats[with_carol.session_id].peer == carol.handle
    for chat in chats.values():
        assert chat.last_activity >= chat.created_at
    bob_chats = (await bob.get_chat_list()).chats
    assert [(c.session_id, c.peer) for c in bob_chats] == [(with_bob.session_id, alice.handle)]


async def test_get_chat_list_last_activity_moves_forward(make_client):
    alice = await make_client("alice")
    bob = await make_client("bob")
    session = (await alice.establish_session(bob.handle)).session_id
    (before,) = (await alice.get_chat_list()).chats
    assert before.last_activity == before.created_at
    await alice.rotate_session_key(session, bob.handle)
    sent = await alice.send_text(session, "hi")
    assert sent.timestamp >= before.created_at

    # The activity reaches the registry asynchronously: poll briefly.
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        (chat,) = (await bob.get_chat_list()).chats
        if chat.last_activity == sent.timestamp or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.05)
    assert chat.last_activity == sent.timestamp
    assert chat.created_at == before.created_at
    assert chat.peer == alice.handle
    (mine,) = (await alice.get_chat_list()).chats
    assert mine.last_activity == sent.timestamp


async def test_get_chat_list_orders_by_last_activity(make_client):
    alice = await make_client("alice")
    bob = await make_client("bob")
    carol = await make_client("carol")
    quiet = (await alice.establish_session(bob.handle)).session_id
    busy = (await alice.establish_session(carol.handle)).session_id
    await alice.rotate_session_key(busy, carol.handle)
    sent = await alice.send_text(busy, "first")
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        chats = (await alice.get_chat_list()).chats
        if chats[0].last_activity == sent.timestamp or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.05)
    assert [c.session_id for c in chats] == [busy, quiet]


async def test_get_chat_list_needs_a_handle(make_client):
    alice = await make_client("alice")
    with pytest.raises(Unauthorized):
        await raw_call(alice, "GetChatList", "{}")
    mallory = await make_client("mallory")
    with pytest.raises(Unauthorized):
        await raw_call(mallory, "GetChatList", "{}", from_=alice.handle)


async def test_get_chat_list_rejects_data(make_client):
    alice = await make_client("alice")
    with pytest.raises(MalformedRequest):
        await raw_call(alice, "GetChatList", {"Handle": alice.handle}, from_=alice.handle)


async def test_pairs_are_ordered_the_same_under_a_language_collation():
    """The registry orders a pair in code points; a database whose default collation is
    language-aware (ICU en-US puts '_' before '-') must not refuse the pair."""
    import asyncpg

    from tests.conftest import DATABASE_BASE, isolated_settings, running_services

    async with isolated_settings() as settings:
        conn = await asyncpg.connect(DATABASE_BASE)
        name = settings.database_url.rsplit("/", 1)[1] + "_icu"
        try:
            await conn.execute(
                f"CREATE DATABASE \"{name}\" LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8' TEMPLATE template0"
            )
            icu = replace(settings, database_url=settings.database_url.rsplit("/", 1)[0] + "/" + name)
            async with running_services(icu, names=("registry", "notifier")):
                suffix = secrets.token_hex(3)
                dash = await Client.connect(icu.amqp_url, Identity.generate())
                under = await Client.connect(icu.amqp_url, Identity.generate())
                try:
                    await dash.register(f"q-x{suffix}")
                    await under.register(f"q_x{suffix}")
                    established = await dash.establish_session(under.handle)
                    assert established.created
                    assert await under.query_session(dash.handle, under.handle) == established.session_id
                finally:
                    await dash.close()
                    await under.close()
        finally:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await conn.close()


async def test_the_inbox_exists_and_is_bound_when_register_answers(make_client):
    """§4.4: the registry declares the handle's queue and binds it before it answers
    Register, so a consume right after the reply never fails with 404, nor a publish to
    the handle finds no binding (both happened while only the notifier declared them, after
    the commit: 2 of 50 here). 50 registrations, each by a key of its own (a key may
    register 10 handles a day), each consumed at once."""
    client = await make_client(register=False)
    missing = []
    for _ in range(50):
        identity, handle = Identity.generate(), fresh("inbox")
        env = envelope.sign(identity.signing_key, target=REGISTRY_TARGET, from_=None, action="Register",
                            data=msgspec.json.encode({"Handle": handle, "BoxKey": identity.box_public}).decode())
        assert msgspec.json.decode(await client.send_envelope(env), type=HandleInfo).handle == handle
        try:
            consumer = await client.bus.consume(topology.inbox_queue(handle), lambda delivery: delivery.ack(), prefetch=1)
        except QueueMissing:
            missing.append(handle)
            continue
        await consumer.close()
        try:
            await client.bus.publish(topology.INBOX, handle, b"{}")
        except Unroutable:  # the queue, but not its binding yet
            missing.append(f"{handle} (unbound)")
    assert missing == [], f"{len(missing)} of 50 inboxes were missing or unbound right after Register: {missing}"
