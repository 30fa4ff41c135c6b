"""The DM session's actions against a running stack: keys, messages, paging, who may call,
and that reads (dryruns) never write."""

import asyncio
import secrets
from dataclasses import dataclass

import asyncpg
import msgspec
import pytest

from aodm import crypto, envelope
from aodm.client import Client
from aodm.encoding import b64decode, b64encode
from aodm.errors import (
    AodmError,
    Forbidden,
    InvalidArgument,
    MalformedRequest,
    NoSessionKey,
    NotAccepted,
    NotFound,
    Unauthorized,
)
from aodm.inbox import Inbox
from aodm.notifications import AnyNotification, KeyRotated, NewMessage
from aodm.session_api import (
    MAX_GENERATION,
    SEALED_KEY_BYTES,
    KeyBatch,
    MessagePage,
    QueryMessage,
    Rotated,
    RotateSessionKey,
    SealedKey,
    SendMessage,
    Sent,
    StoredMessage,
)
from services.session import store

_encoder = msgspec.json.Encoder()


@dataclass
class Pair:
    alice: Client
    bob: Client
    session: str


async def new_pair(make_client) -> Pair:
    alice = await make_client("alice")
    bob = await make_client("bob")
    session = (await alice.establish_session(bob.handle)).session_id
    await bob.accept(session)  # these tests are of an accepted session (test_consent.py: requests)
    return Pair(alice, bob, session)


@pytest.fixture
async def pair(make_client) -> Pair:
    return await new_pair(make_client)


@pytest.fixture
async def keyed(pair) -> Pair:
    """A pair whose session has one key generation."""
    await pair.alice.rotate_session_key(pair.session, pair.bob.handle)
    return pair


async def raw_call(client: Client, target: str, action: str, data: str | dict, *, from_: str | None = "self") -> msgspec.Raw:
    """Sign `data` exactly as given; `from_` defaults to the client's handle."""
    text = data if isinstance(data, str) else _encoder.encode(data).decode()
    env = envelope.sign(
        client.identity.signing_key,
        target=target,
        from_=client.handle if from_ == "self" else from_,
        action=action,
        data=text,
        anchor=b64encode(secrets.token_bytes(16)),
    )
    return await client.send_envelope(env)


def entry(handle: str, box_public: str, session_key: bytes | None = None) -> SealedKey:
    return SealedKey(handle, box_public, crypto.seal_session_key(session_key or crypto.new_session_key(), box_public))


def both(p: Pair, session_key: bytes | None = None) -> list[SealedKey]:
    session_key = session_key or crypto.new_session_key()
    return [
        entry(p.alice.handle, p.alice.identity.box_public, session_key),
        entry(p.bob.handle, p.bob.identity.box_public, session_key),
    ]


async def rotate(client: Client, session: str, keys: list[SealedKey]) -> int:
    return (await client.call(session, RotateSessionKey(keys), Rotated)).generation


def ciphertext(n: int = 1) -> str:
    """Something shaped like nonce ‖ SecretBox ciphertext (the service cannot tell)."""
    return crypto.encrypt(crypto.new_session_key(), "x" * n)


async def until(inbox: Inbox, predicate, timeout: float = 10) -> list[AnyNotification]:
    """Every notification up to and including the first that matches."""
    seen = []
    while True:
        note = await inbox.next(timeout=timeout)
        seen.append(note)
        if predicate(note):
            return seen


def unknown_session() -> str:
    return b64encode(secrets.token_bytes(32))


# -- RotateSessionKey -----------------------------------------------------------------


async def test_rotate_counts_generations_and_serves_the_latest(pair):
    assert await pair.alice.rotate_session_key(pair.session, pair.bob.handle) == 1
    assert await pair.bob.rotate_session_key(pair.session, pair.alice.handle) == 2
    key3 = crypto.new_session_key()
    assert await pair.alice.rotate_session_key(pair.session, pair.bob.handle, key3) == 3

    for client in (pair.alice, pair.bob):
        batch = await client.get_current_key(pair.session)
        assert batch.generation == 3
        assert batch.rotated_by == pair.alice.handle
        assert sorted(k.handle for k in batch.keys) == sorted([pair.alice.handle, pair.bob.handle])
        mine = next(k for k in batch.keys if k.handle == client.handle)
        assert mine.box_key == client.identity.box_public
        assert crypto.open_session_key(mine.sealed_key, client.identity.box_key) == key3

    second = await pair.alice.get_key_by_generation(pair.session, 2)
    assert second.generation == 2 and second.rotated_by == pair.bob.handle


async def test_rotate_notifies_both_members(pair):
    generation = await pair.bob.rotate_session_key(pair.session, pair.alice.handle)
    for client in (pair.alice, pair.bob):
        async with Inbox(client.bus, client.handle) as inbox:
            notes = await until(inbox, lambda n: isinstance(n, KeyRotated))
        rotated = notes[-1]
        assert rotated.session_id == pair.session
        assert rotated.generation == generation
        assert rotated.rotated_by == pair.bob.handle


async def test_rotate_with_a_missing_member_is_invalid(pair):
    keys = both(pair)
    for partial in ([keys[0]], [keys[1]], []):
        with pytest.raises(InvalidArgument):
            await rotate(pair.alice, pair.session, partial)
    with pytest.raises(NoSessionKey):
        await pair.alice.get_current_key(pair.session)


async def test_rotate_with_an_extra_member_is_invalid(pair, make_client):
    carol = await make_client("carol")
    keys = [*both(pair), entry(carol.handle, carol.identity.box_public)]
    with pytest.raises(InvalidArgument):
        await rotate(pair.alice, pair.session, keys)
    # a third entry with a made-up name
    with pytest.raises(InvalidArgument):
        await rotate(pair.alice, pair.session, [*both(pair), entry("zzz-nobody", pair.bob.identity.box_public)])


async def test_rotate_with_a_duplicated_member_is_invalid(pair):
    a, b = both(pair)
    for keys in ([a, a], [b, b], [a, a, b], [a, b, b], [a, b, a, b]):
        with pytest.raises(InvalidArgument):
            await rotate(pair.alice, pair.session, keys)
    with pytest.raises(NoSessionKey):
        await pair.alice.get_current_key(pair.session)


async def test_rotate_with_a_replaced_member_is_invalid(pair, make_client):
    mallory = await make_client("mallory")
    keys = [entry(pair.alice.handle, pair.alice.identity.box_public), entry(mallory.handle, mallory.identity.box_public)]
    with pytest.raises(InvalidArgument):
        await rotate(pair.alice, pair.session, keys)


async def test_rotate_sealed_to_an_unregistered_box_key_is_invalid(pair):
    rogue = crypto.Identity.generate().box_public
    # bob's entry sealed to a key that is not bob's registered box key
    keys = [entry(pair.alice.handle, pair.alice.identity.box_public), entry(pair.bob.handle, rogue)]
    with pytest.raises(InvalidArgument):
        await rotate(pair.alice, pair.session, keys)
    # the two members' box keys swapped
    a, b = both(pair)
    swapped = [SealedKey(a.handle, b.box_key, a.sealed_key), SealedKey(b.handle, a.box_key, b.sealed_key)]
    with pytest.raises(InvalidArgument):
        await rotate(pair.alice, pair.session, swapped)
    with pytest.raises(NoSessionKey):
        await pair.alice.get_current_key(pair.session)


@pytest.mark.parametrize(
    "sealed",
    [
        "",
        b64encode(bytes(SEALED_KEY_BYTES - 1)),
        b64encode(bytes(SEALED_KEY_BYTES + 1)),
        b64encode(bytes(32)),  # an unsealed key
        "+" * 107,
        "!",
    ],
)
async def test_rotate_with_a_bad_sealed_key_is_malformed(pair, sealed):
    a, b = both(pair)
    with pytest.raises(MalformedRequest):
        await rotate(pair.alice, pair.session, [a, SealedKey(b.handle, b.box_key, sealed)])
    with pytest.raises(NoSessionKey):
        await pair.alice.get_current_key(pair.session)


@pytest.mark.parametrize("box_key", ["", "A" * 42, b64encode(bytes(33)), "+" * 43])
async def test_rotate_with_a_bad_box_key_encoding_is_malformed(pair, box_key):
    a, b = both(pair)
    with pytest.raises(MalformedRequest):
        await rotate(pair.alice, pair.session, [a, SealedKey(b.handle, box_key, b.sealed_key)])


@pytest.mark.parametrize(
    "data",
    [
        "{}",
        '{"Keys": null}',
        '{"Keys": {}}',
        '{"Keys": [{"Handle": "x"}]}',
        '{"Keys": [], "Extra": 1}',
        '{"Keys": [{"Handle": "x", "BoxKey": "y", "SealedKey": "z", "More": 1}]}',
        "not json",
    ],
)
async def test_rotate_malformed_data(pair, data):
    with pytest.raises(MalformedRequest):
        await raw_call(pair.alice, pair.session, "RotateSessionKey", data)


async def test_rotate_by_a_non_member_is_forbidden(pair, make_client):
    mallory = await make_client("mallory")
    with pytest.raises(Forbidden):
        await rotate(mallory, pair.session, both(pair))
    with pytest.raises(NoSessionKey):
        await pair.alice.get_current_key(pair.session)


async def test_rotate_on_an_unknown_session_is_not_found(make_client):
    alice = await make_client("alice")
    keys = [entry(alice.handle, alice.identity.box_public)]
    with pytest.raises(NotFound):
        await rotate(alice, unknown_session(), keys)


# -- GetCurrentKey / GetKeyByGeneration -----------------------------------------------


async def test_get_current_key_before_any_key(pair):
    for client in (pair.alice, pair.bob):
        with pytest.raises(NoSessionKey):
            await client.get_current_key(pair.session)
        with pytest.raises(NotFound):
            await client.get_key_by_generation(pair.session, 1)


async def test_get_current_key_after_rotations(pair):
    await pair.alice.rotate_session_key(pair.session, pair.bob.handle)
    assert (await pair.bob.get_current_key(pair.session)).generation == 1
    await pair.alice.rotate_session_key(pair.session, pair.bob.handle)
    assert (await pair.bob.get_current_key(pair.session)).generation == 2
    assert (await pair.bob.get_key_by_generation(pair.session, 1)).generation == 1
    with pytest.raises(NotFound):
        await pair.bob.get_key_by_generation(pair.session, 3)
    with pytest.raises(NotFound):
        await pair.bob.get_key_by_generation(pair.session, MAX_GENERATION)


@pytest.mark.parametrize(
    "value, error",
    [
        ("0", InvalidArgument),
        ("-1", InvalidArgument),
        ("-9223372036854775809", InvalidArgument),
        (str(2**31), InvalidArgument),
        (str(2**63), InvalidArgument),
        (str(2**64), InvalidArgument),
        ("1" + "0" * 400, InvalidArgument),
        ('"1"', MalformedRequest),
        ("1.5", MalformedRequest),
        ("1.0", MalformedRequest),
        ("1e3", MalformedRequest),
        ("true", MalformedRequest),
        ("null", MalformedRequest),
        ("[1]", MalformedRequest),
        ("{}", MalformedRequest),
    ],
)
async def test_get_key_by_generation_rejects_bad_numbers(keyed, value, error):
    with pytest.raises(error):
        await raw_call(keyed.alice, keyed.session, "GetKeyByGeneration", f'{{"Generation": {value}}}')


async def test_get_key_by_generation_missing_field_is_malformed(keyed):
    with pytest.raises(MalformedRequest):
        await raw_call(keyed.alice, keyed.session, "GetKeyByGeneration", "{}")


async def test_key_reads_by_outsiders(keyed, make_client):
    mallory = await make_client("mallory")
    with pytest.raises(Forbidden):
        await mallory.get_current_key(keyed.session)
    with pytest.raises(Forbidden):
        await mallory.get_key_by_generation(keyed.session, 1)
    # as the bare signer address: not a member either
    with pytest.raises(Forbidden):
        await raw_call(keyed.alice, keyed.session, "GetCurrentKey", "{}", from_=None)
    # alice's handle, mallory's signature
    with pytest.raises(Unauthorized):
        await raw_call(mallory, keyed.session, "GetCurrentKey", "{}", from_=keyed.alice.handle)
    with pytest.raises(NotFound):
        await keyed.alice.get_current_key(unknown_session())


# -- SendMessage ----------------------------------------------------------------------


async def test_send_before_any_key_is_no_session_key(pair):
    with pytest.raises(NoSessionKey):
        await pair.alice.send_message(pair.session, ciphertext(), 1)
    with pytest.raises(NoSessionKey):
        await pair.bob.send_message(pair.session, ciphertext(), generation=1)
    # nothing was stored, and the failed sends did not use up sequence numbers
    await pair.alice.rotate_session_key(pair.session, pair.bob.handle)
    sent = await pair.alice.send_text(pair.session, "first")
    assert sent.seq == 1
    assert [m.message_id for m in await pair.bob.history(pair.session)] == [sent.message_id]


async def test_send_and_read_back(keyed):
    sent = await keyed.alice.send_text(keyed.session, "hello bob")
    assert sent.generation == 1 and sent.seq == 1
    (stored,) = (await keyed.bob.query_messages(keyed.session)).messages
    assert stored.message_id == sent.message_id
    assert stored.sender == keyed.alice.handle
    assert stored.sender_key == keyed.alice.identity.address
    assert stored.timestamp == sent.timestamp
    assert await keyed.bob.read_text(keyed.session, stored) == "hello bob"
    reply = await keyed.bob.send_text(keyed.session, "hello alice")
    assert reply.seq == 2 and reply.timestamp >= sent.timestamp


async def test_send_with_an_unknown_generation_is_not_found(keyed):
    with pytest.raises(NotFound):
        await keyed.alice.send_message(keyed.session, ciphertext(), generation=2)
    with pytest.raises(NotFound):
        await keyed.alice.send_message(keyed.session, ciphertext(), generation=MAX_GENERATION)
    for value in ("0", "-1", str(2**31), str(2**64)):
        with pytest.raises(InvalidArgument):
            await raw_call(keyed.alice, keyed.session, "SendMessage", f'{{"Content": "{ciphertext()}", "Generation": {value}}}')
    with pytest.raises(MalformedRequest):
        await raw_call(keyed.alice, keyed.session, "SendMessage", f'{{"Content": "{ciphertext()}", "Generation": "1"}}')
    assert (await keyed.alice.query_messages(keyed.session)).messages == []


async def test_send_with_an_older_generation(keyed):
    key1 = (await keyed.alice.session_key(keyed.session, 1))[1]
    await keyed.bob.rotate_session_key(keyed.session, keyed.alice.handle)
    await keyed.bob.rotate_session_key(keyed.session, keyed.alice.handle)
    old = await keyed.alice.send_message(keyed.session, crypto.encrypt(key1, "old key"), generation=1)
    assert old.generation == 1
    latest = await keyed.alice.send_message(keyed.session, ciphertext(), generation=3)
    assert latest.generation == 3
    messages = (await keyed.bob.query_messages(keyed.session)).messages
    assert [m.generation for m in messages] == [1, 3]
    assert await keyed.bob.read_text(keyed.session, messages[0]) == "old key"


async def test_a_resend_after_the_peer_rotated_is_never_filed_under_another_generation(make_client):
    """§9.2 says to resend a refused message (not_accepted, rate_limited: nothing stored)
    unchanged. Meanwhile the peer may rotate. A message that does not name its Generation
    would be filed under the one current when it is finally stored, which it was not
    encrypted with: nobody could ever read it. So Generation is required (omitted and
    null alike are invalid_argument), and a message that names it is stored under it."""
    alice, bob = await make_client("alice"), await make_client("bob")
    session = (await alice.establish_session(bob.handle)).session_id  # a message request: 3 messages
    await alice.rotate_session_key(session, bob.handle)
    generation, key = await alice.session_key(session)
    for i in range(3):
        await alice.send_text(session, f"asking {i}")

    def signed(data: str) -> envelope.Envelope:
        return envelope.sign(alice.identity.signing_key, target=session, from_=alice.handle, action="SendMessage",
                             data=data, anchor=b64encode(secrets.token_bytes(16)))

    named = signed(_encoder.encode(SendMessage(crypto.encrypt(key, "named"), generation)).decode())
    omitted = signed(_encoder.encode({"Content": crypto.encrypt(key, "omitted")}).decode())
    null = signed(_encoder.encode({"Content": crypto.encrypt(key, "null"), "Generation": None}).decode())
    for env in (named, omitted, null):  # first tries: none is stored
        with pytest.raises((NotAccepted, InvalidArgument)):
            await alice.send_envelope(env)
    await bob.accept(session)
    assert await bob.rotate_session_key(session, alice.handle) == generation + 1
    resent = msgspec.json.decode(await alice.send_envelope(named), type=Sent)
    assert resent.generation == generation
    for env in (omitted, null):
        with pytest.raises(InvalidArgument, match="Generation"):
            await alice.send_envelope(env)
    messages = (await bob.query_messages(session)).messages
    assert [await bob.read_text(session, m) for m in messages] == ["asking 0", "asking 1", "asking 2", "named"]


async def test_a_message_stored_without_generation_by_a_server_before_keeps_its_first_reply(keyed, stack):
    """Servers before filled an omitted Generation in. A resend of a message one of them
    stored (as its statement did, here straight into the database) is answered from its
    row like any stored message, not refused for what it omitted."""
    content = ciphertext()
    env = keyed.alice.sign(keyed.session, "SendMessage", SendMessage(content))
    conn = await asyncpg.connect(stack.database_url)
    try:
        earlier = (keyed.session, None, env.id, keyed.alice.handle, b64decode(keyed.alice.identity.address),
                   b64decode(content), True, None, None)
        stored = (await store.store_messages(conn, envelope.now_ms(), [earlier], 3))[env.id]
    finally:
        await conn.close()
    assert (stored["seq"], stored["generation"]) == (1, 1)
    sent = msgspec.json.decode(await keyed.alice.send_envelope(env), type=Sent)
    assert (sent.message_id, sent.seq, sent.generation, sent.timestamp) == (env.id, 1, 1, stored["ts"])
    with pytest.raises(InvalidArgument, match="Generation"):  # a new one without it is refused
        await keyed.alice.send_envelope(keyed.alice.sign(keyed.session, "SendMessage", SendMessage(ciphertext())))


@pytest.mark.parametrize(
    "content, error",
    [
        ("", InvalidArgument),
        (b64encode(bytes(39)), InvalidArgument),  # one byte short of nonce ‖ MAC
        ("!!!!", MalformedRequest),
        ("+" * 64, MalformedRequest),
        (b64encode(bytes(40)) + "=", MalformedRequest),
        ("hello world, not base64", MalformedRequest),
        ("A", MalformedRequest),
    ],
)
async def test_send_bad_content(keyed, content, error):
    with pytest.raises(error):
        await keyed.alice.send_message(keyed.session, content, 1)
    assert (await keyed.alice.query_messages(keyed.session)).messages == []


@pytest.mark.parametrize("data", ["{}", '{"Content": 5}', '{"Content": null}', '{"Content": "x", "To": "bob"}', "[]"])
async def test_send_malformed_data(keyed, data):
    with pytest.raises(MalformedRequest):
        await raw_call(keyed.alice, keyed.session, "SendMessage", data)


async def test_send_shortest_valid_content(keyed):
    sent = await keyed.alice.send_message(keyed.session, b64encode(bytes(40)), 1)
    assert sent.seq == 1


async def test_send_notifies_only_the_other_member(keyed):
    async with Inbox(keyed.alice.bus, keyed.alice.handle) as alice_inbox, Inbox(keyed.bob.bus, keyed.bob.handle) as bob_inbox:
        sent = await keyed.alice.send_text(keyed.session, "for bob")
        bob_notes = await until(bob_inbox, lambda n: isinstance(n, NewMessage))
        note = bob_notes[-1]
        assert note.message_id == sent.message_id
        assert note.sender == keyed.alice.handle
        assert note.seq == sent.seq and note.generation == sent.generation and note.timestamp == sent.timestamp
        assert await keyed.bob.decrypt(keyed.session, note.generation, note.content) == "for bob"
        # Barrier: bob answers; alice's notifications are delivered in order, so her own
        # message would have to show up before bob's answer.
        answer = await keyed.bob.send_text(keyed.session, "for alice")
        alice_notes = await until(alice_inbox, lambda n: isinstance(n, NewMessage) and n.message_id == answer.message_id)
    assert [n for n in alice_notes if isinstance(n, NewMessage) and n.sender == keyed.alice.handle] == []
    assert all(n.handle == keyed.alice.handle for n in alice_notes)
    assert all(n.handle == keyed.bob.handle for n in bob_notes)


async def test_refused_sends_among_pipelined_ones_leave_their_neighbours_stored(keyed):
    """Pipelined sends usually share a batch, stored with one statement: the refused ones get
    their own errors and are written nowhere; the rest get consecutive seqs in publish order."""
    plan = [(ciphertext(1), 1), (ciphertext(2), 99), (b64encode(bytes(8)), 1), (ciphertext(3), 1), (ciphertext(4), 1)]
    pending = []
    for content, generation in plan:
        env = keyed.alice.sign(keyed.session, "SendMessage", SendMessage(content, generation))
        pending.append((env, await keyed.alice.submit(env)))
    results = await asyncio.gather(*(keyed.alice.result_of(env, reply) for env, reply in pending), return_exceptions=True)
    assert isinstance(results[1], NotFound) and isinstance(results[2], InvalidArgument)
    stored = [msgspec.json.decode(r, type=Sent) for i, r in enumerate(results) if i not in (1, 2)]
    assert [s.seq for s in stored] == [1, 2, 3]
    assert [s.message_id for s in stored] == [env.id for i, (env, _) in enumerate(pending) if i not in (1, 2)]
    assert ids((await keyed.bob.query_messages(keyed.session)).messages) == [s.message_id for s in stored]


async def test_send_by_outsiders(keyed, make_client):
    mallory = await make_client("mallory")
    with pytest.raises(Forbidden):
        await mallory.send_message(keyed.session, ciphertext(), 1)
    with pytest.raises(Unauthorized):
        await raw_call(mallory, keyed.session, "SendMessage", {"Content": ciphertext()}, from_=keyed.alice.handle)
    with pytest.raises(Unauthorized):
        await raw_call(mallory, keyed.session, "SendMessage", {"Content": ciphertext()}, from_=keyed.bob.handle)
    with pytest.raises(NotFound):
        await keyed.alice.send_message(unknown_session(), ciphertext(), 1)
    assert (await keyed.bob.query_messages(keyed.session)).messages == []


# -- QueryMessage ---------------------------------------------------------------------


async def send_many(p: Pair, n: int) -> list[Sent]:
    sent = []
    for i in range(n):
        sender = p.alice if i % 2 == 0 else p.bob
        sent.append(await sender.send_message(p.session, ciphertext(i + 1), 1))
    return sent


def ids(messages: list[StoredMessage]) -> list[str]:
    return [m.message_id for m in messages]


async def test_query_in_both_orders(keyed):
    sent = await send_many(keyed, 5)
    asc = (await keyed.bob.query_messages(keyed.session)).messages
    assert ids(asc) == [s.message_id for s in sent]
    assert [m.seq for m in asc] == [1, 2, 3, 4, 5]
    assert [m.sender for m in asc] == [keyed.alice.handle, keyed.bob.handle] * 2 + [keyed.alice.handle]
    desc = (await keyed.bob.query_messages(keyed.session, order="desc")).messages
    assert ids(desc) == ids(asc)[::-1]
    assert [(m.timestamp, m.seq) for m in asc] == sorted((m.timestamp, m.seq) for m in asc)


async def test_query_bounds_are_inclusive(keyed):
    sent = await send_many(keyed, 6)
    lo, hi = sent[1].timestamp, sent[4].timestamp
    expected = [s.message_id for s in sent if lo <= s.timestamp <= hi]
    assert sent[1].message_id in expected and sent[4].message_id in expected
    page = await keyed.alice.query_messages(keyed.session, from_=lo, until=hi)
    assert ids(page.messages) == expected
    page = await keyed.alice.query_messages(keyed.session, from_=lo, until=hi, order="desc")
    assert ids(page.messages) == expected[::-1]
    # a single instant
    t = sent[2].timestamp
    exact = await keyed.alice.query_messages(keyed.session, from_=t, until=t)
    assert ids(exact.messages) == [s.message_id for s in sent if s.timestamp == t]
    # open on either side
    assert ids((await keyed.alice.query_messages(keyed.session, from_=lo)).messages) == [
        s.message_id for s in sent if s.timestamp >= lo
    ]
    assert ids((await keyed.alice.query_messages(keyed.session, until=hi)).messages) == [
        s.message_id for s in sent if s.timestamp <= hi
    ]
    # before everything, after everything
    assert (await keyed.alice.query_messages(keyed.session, until=sent[0].timestamp - 1)).messages == []
    assert (await keyed.alice.query_messages(keyed.session, from_=sent[-1].timestamp + 1)).messages == []
    assert (await keyed.alice.query_messages(keyed.session, from_=0, until=0)).messages == []


async def test_query_pages_yield_every_message_once(keyed):
    sent = await send_many(keyed, 7)
    expected = [s.message_id for s in sent]
    for order, want in (("asc", expected), ("desc", expected[::-1])):
        for limit in (1, 2, 3, 7, 8):
            got, cursor, pages = [], None, 0
            while True:
                page = await keyed.alice.query_messages(keyed.session, limit=limit, order=order, cursor=cursor)
                assert len(page.messages) <= limit
                got += ids(page.messages)
                pages += 1
                assert pages <= 8, "paging does not terminate"
                if page.next_cursor is None:
                    break
                cursor = page.next_cursor
            assert got == want, (order, limit)
    # paging inside bounds
    lo, hi = sent[1].timestamp, sent[5].timestamp
    inside = [s.message_id for s in sent if lo <= s.timestamp <= hi]
    assert ids(await keyed.bob.history(keyed.session, from_=lo, until=hi, limit=2)) == inside
    assert ids(await keyed.bob.history(keyed.session, from_=lo, until=hi, limit=2, order="desc")) == inside[::-1]


async def test_query_an_empty_session(pair):
    page = await pair.alice.query_messages(pair.session)
    assert page == MessagePage([], None)


async def test_query_limit_bounds(keyed):
    await send_many(keyed, 2)
    for limit in (0, -1, 501, 2**40):
        with pytest.raises(InvalidArgument):
            await keyed.alice.query_messages(keyed.session, limit=limit)
    assert len((await keyed.alice.query_messages(keyed.session, limit=1)).messages) == 1
    assert len((await keyed.alice.query_messages(keyed.session, limit=500)).messages) == 2


async def test_query_inverted_bounds(keyed):
    with pytest.raises(InvalidArgument):
        await keyed.alice.query_messages(keyed.session, from_=2, until=1)
    for data in ('{"From": -1}', '{"Until": -1}', f'{{"From": {2**53 + 1}}}'):
        with pytest.raises(InvalidArgument):
            await raw_call(keyed.alice, keyed.session, "QueryMessage", data)


@pytest.mark.parametrize("order", ["sideways", "ASC", "Desc", "", "asc "])
async def test_query_bad_order(keyed, order):
    with pytest.raises(AodmError) as raised:
        await keyed.alice.query_messages(keyed.session, order=order)
    assert raised.value.code in {"invalid_argument", "malformed_request"}


@pytest.mark.parametrize(
    "cursor",
    ["", "abc", "1", "1.", ".1", "1.2.3", "-1.5", "5.-1", "1.5e3", "0x10.1", "nan.nan", "9" * 5000 + ".1", f"{2**63}.1",
     "a", "a1", "a1.", "a.1", "A1.1", "x1.1", "aa1.1", "a-1.5", " a1.1", "a1.1 ", f"a{2**63}.1", f"a1.{2**63}",
     # the form servers before issued (no Order in it): refused, not read for either order
     "1700000000000.7", "1.1"],
)
async def test_query_bad_cursor(keyed, cursor):
    await send_many(keyed, 1)
    with pytest.raises(InvalidArgument):
        await keyed.alice.query_messages(keyed.session, cursor=cursor)


@pytest.mark.parametrize("order, other", [("asc", "desc"), ("desc", "asc")])
async def test_a_cursor_passed_back_with_the_other_order_is_refused(keyed, order, other):
    """A NextCursor is good for the Order it was issued for; with the other one it would
    page from the wrong end, so it is invalid_argument, never a page."""
    await send_many(keyed, 5)
    first = await keyed.alice.query_messages(keyed.session, limit=2, order=order)
    assert first.next_cursor is not None
    with pytest.raises(InvalidArgument, match="Order"):
        await keyed.alice.query_messages(keyed.session, limit=2, order=other, cursor=first.next_cursor)
    second = await keyed.alice.query_messages(keyed.session, limit=2, order=order, cursor=first.next_cursor)
    assert len(second.messages) == 2 and not set(ids(first.messages)) & set(ids(second.messages))


@pytest.mark.parametrize(
    "data",
    ['{"Limit": "10"}', '{"Limit": 1.5}', '{"From": "yesterday"}', '{"Cursor": 5}', '{"Order": 1}', '{"Page": 2}', "[]"],
)
async def test_query_malformed_data(keyed, data):
    with pytest.raises(MalformedRequest):
        await raw_call(keyed.alice, keyed.session, "QueryMessage", data)


async def test_query_by_outsiders(keyed, make_client):
    await keyed.alice.send_text(keyed.session, "private")
    mallory = await make_client("mallory")
    with pytest.raises(Forbidden):
        await mallory.query_messages(keyed.session)
    with pytest.raises(Unauthorized):
        await raw_call(mallory, keyed.session, "QueryMessage", "{}", from_=keyed.alice.handle)
    with pytest.raises(Unauthorized):
        await raw_call(mallory, keyed.session, "QueryMessage", "{}", from_=keyed.bob.handle)
    with pytest.raises(Forbidden):
        await raw_call(mallory, keyed.session, "QueryMessage", "{}", from_=None)
    with pytest.raises(NotFound):
        await mallory.query_messages(unknown_session())


async def test_a_member_of_one_session_cannot_read_another(make_client):
    first = await new_pair(make_client)
    carol = await make_client("carol")
    other = (await first.alice.establish_session(carol.handle)).session_id
    await first.alice.rotate_session_key(first.session, first.bob.handle)
    await first.alice.send_text(first.session, "for bob only")
    # carol is alice's peer elsewhere, but not in alice ↔ bob
    with pytest.raises(Forbidden):
        await carol.query_messages(first.session)
    # bob cannot use alice ↔ carol
    with pytest.raises(Forbidden):
        await first.bob.query_messages(other)


# -- dryruns never write --------------------------------------------------------------

TABLES = ("sessions", "members", "keys", "messages")


async def row_counts(conn: asyncpg.Connection, session: str) -> dict[str, int]:
    counts = {t: await conn.fetchval(f"SELECT count(*) FROM session.{t} WHERE session_id = $1", session) for t in TABLES}
    counts["requests"] = await conn.fetchval("SELECT count(*) FROM session.requests")
    counts["state"] = tuple(
        await conn.fetchrow(
            "SELECT key_generation, message_seq, last_timestamp FROM session.sessions WHERE session_id = $1", session
        )
    )
    return counts


async def test_reads_never_write(stack, keyed, make_client):
    await send_many(keyed, 3)
    mallory = await make_client("mallory")
    conn = await asyncpg.connect(stack.database_url)
    try:
        before = await row_counts(conn, keyed.session)
        assert before["messages"] == 3 and before["keys"] == 2 and before["members"] == 2
        for _ in range(5):
            for client in (keyed.alice, keyed.bob):
                await client.get_current_key(keyed.session)
                await client.get_key_by_generation(keyed.session, 1)
                await client.query_messages(keyed.session)
                await client.query_messages(keyed.session, order="desc", limit=1)
                await client.history(keyed.session, limit=1)
                with pytest.raises(NotFound):
                    await client.get_key_by_generation(keyed.session, 9)
                with pytest.raises(InvalidArgument):
                    await client.query_messages(keyed.session, limit=0)
            with pytest.raises(Forbidden):
                await mallory.query_messages(keyed.session)
            with pytest.raises(Unauthorized):
                await raw_call(mallory, keyed.session, "GetCurrentKey", "{}", from_=keyed.alice.handle)
        after = await row_counts(conn, keyed.session)
    finally:
        await conn.close()
    assert after == before


async def test_a_repeated_read_envelope_is_answered_again(keyed):
    """Reads are not claimed in the dedup table, so the same signed read still answers."""
    await keyed.alice.send_text(keyed.session, "x")
    env = keyed.alice.sign(keyed.session, "QueryMessage", QueryMessage())
    first = msgspec.json.decode(await keyed.alice.send_envelope(env), type=MessagePage)
    await keyed.bob.send_text(keyed.session, "y")
    second = msgspec.json.decode(await keyed.alice.send_envelope(env), type=MessagePage)
    assert len(first.messages) == 1 and len(second.messages) == 2


async def test_key_batch_shape(keyed):
    batch = await keyed.bob.get_current_key(keyed.session)
    assert isinstance(batch, KeyBatch)
    for k in batch.keys:
        assert len(k.sealed_key) == len(b64encode(bytes(SEALED_KEY_BYTES)))
