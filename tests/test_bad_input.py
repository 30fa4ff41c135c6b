"""Hostile raw input straight onto the request exchange. Every body must come back as a
typed `Err` (never `internal`, never silence), and the service must keep answering."""

import asyncio
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg
import msgspec
import pytest
from nacl.signing import SigningKey

from aodm import crypto, envelope, topology
from aodm.client import Client
from aodm.encoding import b64decode, b64encode
from aodm.envelope import MAX_BODY_BYTES, MAX_DATA_BYTES, MAX_TAGS, Envelope, Tag
from aodm.errors import NoSessionKey
from aodm.inbox import Inbox
from aodm.notifications import AnyNotification, NewMessage, RequestFailed, SessionEstablished, notification_decoder
from aodm.registry_api import REGISTRY_TARGET, EstablishSession, HandleInfo, Register
from aodm.replies import Err, Ok, reply_decoder
from aodm.session_api import MessagePage, QueryMessage, SendMessage, Sent

MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS
_encoder = msgspec.json.Encoder()


@dataclass
class World:
    alice: Client
    bob: Client
    session: str  # alice ↔ bob, with one key generation


@pytest.fixture
async def world(make_client) -> World:
    alice = await make_client("alice")
    bob = await make_client("bob")
    session = (await alice.establish_session(bob.handle)).session_id
    await bob.accept(session)
    await alice.rotate_session_key(session, bob.handle)
    return World(alice, bob, session)


@dataclass
class Req:
    """A valid request for one service, which each case then breaks in one way."""

    key: SigningKey
    target: str
    from_: str
    action: str
    data: str


def valid_request(w: World, service: str) -> Req:
    if service == "registry":
        data = _encoder.encode({"Handle": w.bob.handle}).decode()
        return Req(w.alice.identity.signing_key, REGISTRY_TARGET, w.alice.identity.address, "QueryHandle", data)
    return Req(w.alice.identity.signing_key, w.session, w.alice.handle, "QueryMessage", "{}")


def forge(
    key: SigningKey,
    *,
    target: str,
    from_: str,
    tags: list[Tag],
    data: str,
    anchor: str | None = None,
    timestamp: int | None = None,
    owner: str | None = None,
    signer: SigningKey | None = None,
) -> Envelope:
    """Sign any combination of fields (including ones `envelope.sign` refuses to build)."""
    fields = dict(
        target=target,
        from_=from_,
        owner=owner or envelope.address_of(bytes(key.verify_key)),
        anchor=b64encode(secrets.token_bytes(16)) if anchor is None else anchor,
        timestamp=envelope.now_ms() if timestamp is None else timestamp,
        tags=tags,
        data=data,
    )
    signature = (signer or key).sign(envelope.signing_bytes(**fields)).signature
    return Envelope(id=envelope.id_from_signature(signature), signature=b64encode(signature), **fields)


def signed(r: Req, *, tags: list[Tag] | None = None, **over) -> Envelope:
    fields = dict(target=r.target, from_=r.from_, data=r.data)
    fields.update({k: v for k, v in over.items() if k in fields})
    extra = {k: v for k, v in over.items() if k not in fields}
    return forge(r.key, tags=[Tag("Action", r.action)] if tags is None else tags, **fields, **extra)


def body(env: Envelope) -> bytes:
    return envelope.encode(env)


def as_dict(r: Req, **over) -> dict:
    return msgspec.json.decode(body(signed(r, **over)))


NULL = object()  # for `edited`: set a field to JSON null


def edited(r: Req, **changes) -> bytes:
    """A validly signed envelope, then fields changed in its JSON (None removes one)."""
    d = as_dict(r)
    for name, value in changes.items():
        if value is None:
            d.pop(name)
        else:
            d[name] = None if value is NULL else value
    return msgspec.json.encode(d)


def tampered(r: Req, **changes) -> bytes:
    """Sign, then change envelope fields without re-signing (a callable gets the old value)."""
    env = signed(r)
    changes = {k: v(getattr(env, k)) if callable(v) else v for k, v in changes.items()}
    assert all(getattr(env, k) != v for k, v in changes.items())
    return body(msgspec.structs.replace(env, **changes))


def flipped(text: str) -> str:
    raw = bytearray(b64decode(text))
    raw[0] ^= 0x01
    return b64encode(bytes(raw))


async def call(client: Client, routing_key: str, raw: bytes) -> Ok | Err:
    return reply_decoder.decode(await client.bus.call(topology.REQUESTS, routing_key, raw, timeout=15))


async def still_works(w: World, service: str) -> None:
    """A normal request on the same service (and the same session shard) succeeds."""
    if service == "registry":
        info = await w.alice.query_handle(w.bob.handle)
        assert info.box_key == w.bob.identity.box_public
    else:
        page = await w.alice.query_messages(w.session)
        assert page.messages == []


def claimed_id(raw: bytes) -> str:
    return msgspec.json.decode(raw)["Id"]


def doubled_key(data: str, *, escaped: bool = False) -> str:
    """Data with its first key twice (a decoy value first); QueryMessage's empty Data gets Limit."""
    fields = msgspec.json.decode(data) or {"Limit": 5}
    key, value = next(iter(fields.items()))
    decoy = msgspec.json.encode("decoy" if isinstance(value, str) else 1).decode()
    first = "\\u00" + format(ord(key[0]), "02x") + key[1:] if escaped else key
    rest = msgspec.json.encode(fields).decode()[1:]
    return f'{{"{first}":{decoy},' + rest


M, P, S, U, A = "malformed_request", "payload_too_large", "invalid_signature", "unknown_action", "stale_request"

# (name, build, code, reply echoes the envelope's Id)
Case = tuple[str, Callable[[Req], bytes], str, bool]
CASES: list[Case] = [
    # not an envelope at all
    ("not_json", lambda r: b"hello, broker", M, False),
    ("empty", lambda r: b"", M, False),
    ("whitespace", lambda r: b" \n\t ", M, False),
    ("nul_bytes", lambda r: b"\x00" * 32, M, False),
    ("binary", lambda r: secrets.token_bytes(200), M, False),
    ("truncated", lambda r: body(signed(r))[:-10], M, False),
    ("truncated_half", lambda r: body(signed(r))[: len(body(signed(r))) // 2], M, False),
    ("trailing_garbage", lambda r: body(signed(r)) + b"}", M, False),
    ("two_envelopes", lambda r: body(signed(r)) + body(signed(r)), M, False),
    ("json_array", lambda r: b"[]", M, False),
    ("json_array_of_envelope", lambda r: b"[" + body(signed(r)) + b"]", M, False),
    ("json_array_of_fields", lambda r: msgspec.json.encode(list(as_dict(r).values())), M, False),
    ("json_null", lambda r: b"null", M, False),
    ("json_number", lambda r: b"42", M, False),
    ("json_string", lambda r: b'"Action"', M, False),
    ("json_true", lambda r: b"true", M, False),
    ("deep_nesting", lambda r: b"[" * 40_000 + b"]" * 40_000, M, False),
    ("invalid_utf8_in_string", lambda r: body(signed(r, anchor="MARK")).replace(b"MARK", b"\xff\xfe"), M, False),
    ("utf8_surrogate_in_string", lambda r: body(signed(r, anchor="MARK")).replace(b"MARK", b"\xed\xa0\x80"), M, False),
    ("overlong_utf8_in_string", lambda r: body(signed(r, anchor="MARK")).replace(b"MARK", b"\xc0\xaf"), M, False),
    ("lone_surrogate_escape", lambda r: body(signed(r, anchor="MARK")).replace(b"MARK", b"\\ud800"), M, False),
    ("invalid_utf8_outside_strings", lambda r: b"\xff" + body(signed(r)), M, False),
    # wrong types
    ("timestamp_string", lambda r: edited(r, Timestamp="1700000000000"), M, False),
    ("timestamp_float", lambda r: edited(r, Timestamp=1.5), M, False),
    ("timestamp_null", lambda r: edited(r, Timestamp=NULL), M, False),
    ("tags_object", lambda r: edited(r, Tags={"Action": r.action}), M, False),
    ("tags_strings", lambda r: edited(r, Tags=["Action", r.action]), M, False),
    ("tag_as_array", lambda r: edited(r, Tags=[["Action", r.action]]), M, False),
    ("tag_value_number", lambda r: edited(r, Tags=[{"name": "Action", "value": 1}]), M, False),
    ("tag_capitalised_fields", lambda r: edited(r, Tags=[{"Name": "Action", "Value": r.action}]), M, False),
    ("data_object", lambda r: edited(r, Data=msgspec.json.decode(r.data)), M, False),
    ("data_number", lambda r: edited(r, Data=5), M, False),
    ("signature_number", lambda r: edited(r, Signature=12345), M, False),
    ("target_number", lambda r: edited(r, Target=1), M, False),
    ("id_array", lambda r: edited(r, Id=["x"]), M, False),
    # missing and unknown fields
    *[
        (f"missing_{name}", (lambda name: lambda r: edited(r, **{name: None}))(name), M, False)  # noqa: B023 (bound)
        for name in ("Id", "Target", "From", "Owner", "Anchor", "Timestamp", "Tags", "Data", "Signature")
    ],
    ("unknown_field", lambda r: edited(r, Extra=1), M, False),
    ("unknown_field_null", lambda r: edited(r, Admin=True), M, False),
    ("unknown_field_in_tag", lambda r: edited(r, Tags=[{"name": "Action", "value": r.action, "x": 1}]), M, False),
    ("lowercase_field_names", lambda r: msgspec.json.encode({k.lower(): v for k, v in as_dict(r).items()}), M, False),
    # size limits
    ("body_over_cap", lambda r: body(signed(r)) + b" " * MAX_BODY_BYTES, P, False),
    ("body_over_cap_by_data", lambda r: body(signed(r, data=r.data + " " * (MAX_BODY_BYTES + 1))), P, False),
    ("huge_garbage", lambda r: b"x" * (MAX_BODY_BYTES + 1), P, False),
    ("data_over_cap", lambda r: body(signed(r, data=r.data + " " * (MAX_DATA_BYTES - len(r.data) + 1))), P, False),
    ("data_over_cap_in_utf8_bytes", lambda r: body(signed(r, data='{"X":"' + "é" * (MAX_DATA_BYTES // 2) + '"}')), P, False),
    ("too_many_tags", lambda r: body(signed(r, tags=[Tag("Action", r.action)] + [Tag(f"T{i}", "v") for i in range(MAX_TAGS)])), P, False),
    ("tag_name_too_long", lambda r: body(signed(r, tags=[Tag("Action", r.action), Tag("n" * 65, "v")])), P, False),
    ("tag_value_too_long", lambda r: body(signed(r, tags=[Tag("Action", r.action), Tag("n", "v" * 257)])), P, False),
    ("action_value_too_long", lambda r: body(signed(r, tags=[Tag("Action", "A" * 257)])), P, False),
    ("target_too_long", lambda r: edited(r, Target="t" * 65), M, False),
    ("from_too_long", lambda r: body(signed(r, from_="f" * 65)), M, False),
    ("anchor_too_long", lambda r: body(signed(r, anchor="a" * 65)), M, False),
    # bad encodings of Owner and Signature
    ("signature_not_base64", lambda r: edited(r, Signature="!" * 86), M, True),
    ("signature_padded", lambda r: edited(r, Signature=as_dict(r)["Signature"] + "=="), M, True),
    ("signature_standard_alphabet", lambda r: edited(r, Signature="+/" * 43), M, True),
    ("signature_empty", lambda r: edited(r, Signature=""), M, True),
    ("signature_63_bytes", lambda r: edited(r, Signature=b64encode(bytes(63))), M, True),
    ("signature_65_bytes", lambda r: edited(r, Signature=b64encode(bytes(65))), M, True),
    ("owner_not_base64", lambda r: edited(r, Owner="*" * 43), M, True),
    ("owner_padded", lambda r: edited(r, Owner=as_dict(r)["Owner"] + "="), M, True),
    ("owner_31_bytes", lambda r: edited(r, Owner=b64encode(bytes(31))), M, True),
    ("owner_33_bytes", lambda r: edited(r, Owner=b64encode(bytes(33))), M, True),
    ("owner_empty", lambda r: edited(r, Owner=""), M, True),
    # signatures that do not verify
    ("signature_bit_flipped", lambda r: edited(r, Signature=flipped(as_dict(r)["Signature"])), S, True),
    ("signature_zero", lambda r: edited(r, Signature=b64encode(bytes(64))), S, True),
    ("signed_by_another_key", lambda r: body(signed(r, signer=SigningKey.generate())), S, True),
    ("owner_swapped", lambda r: tampered(r, owner=crypto.Identity.generate().address), S, True),
    ("owner_zero_key", lambda r: tampered(r, owner=b64encode(bytes(32))), S, True),
    ("tampered_action", lambda r: tampered(r, tags=[Tag("Action", "GetHandles")]), S, True),
    ("tampered_action_tag_name", lambda r: tampered(r, tags=[Tag("action", r.action)]), S, True),
    ("tampered_added_tag", lambda r: tampered(r, tags=[Tag("Action", r.action), Tag("X", "y")]), S, True),
    ("tampered_data", lambda r: tampered(r, data=r.data.replace("}", ' }')), S, True),
    ("tampered_from", lambda r: tampered(r, from_=r.from_ + "x"), S, True),
    ("tampered_anchor", lambda r: tampered(r, anchor="other"), S, True),
    ("tampered_timestamp", lambda r: tampered(r, timestamp=lambda t: t + 1), S, True),
    ("id_and_signature_of_another_request", lambda r: edited(r, Id=as_dict(r)["Id"], Signature=as_dict(r)["Signature"]), S, True),
    # Id
    ("wrong_id", lambda r: edited(r, Id=b64encode(secrets.token_bytes(32))), M, True),
    ("empty_id", lambda r: edited(r, Id=""), M, True),
    ("id_of_signature_base64", lambda r: edited(r, Id=as_dict(r)["Signature"]), M, True),
    # timestamps outside the window
    ("stale_one_hour", lambda r: body(signed(r, timestamp=envelope.now_ms() - HOUR_MS)), A, True),
    ("stale_16_minutes", lambda r: body(signed(r, timestamp=envelope.now_ms() - 16 * MINUTE_MS)), A, True),
    ("future_one_hour", lambda r: body(signed(r, timestamp=envelope.now_ms() + HOUR_MS)), A, True),
    ("future_3_minutes", lambda r: body(signed(r, timestamp=envelope.now_ms() + 3 * MINUTE_MS)), A, True),
    ("timestamp_zero", lambda r: body(signed(r, timestamp=0)), A, True),
    ("timestamp_negative", lambda r: body(signed(r, timestamp=-1)), A, True),
    ("timestamp_2_64", lambda r: body(signed(r, timestamp=2**64)), A, True),
    ("timestamp_minus_2_70", lambda r: body(signed(r, timestamp=-(2**70))), A, True),
    # the Action tag
    ("unknown_action", lambda r: body(signed(r, tags=[Tag("Action", "DropAllTables")])), U, True),
    ("empty_action", lambda r: body(signed(r, tags=[Tag("Action", "")])), U, True),
    ("action_wrong_case", lambda r: body(signed(r, tags=[Tag("Action", r.action.lower())])), U, True),
    ("action_with_space", lambda r: body(signed(r, tags=[Tag("Action", r.action + " ")])), U, True),
    ("action_of_the_other_service",
     lambda r: body(signed(r, tags=[Tag("Action", "SendMessage" if r.target == REGISTRY_TARGET else "Register")])), U, True),
    ("action_dunder", lambda r: body(signed(r, tags=[Tag("Action", "__init__")])), U, True),
    ("missing_action_tag", lambda r: body(signed(r, tags=[])), M, True),
    ("action_tag_name_lowercase", lambda r: body(signed(r, tags=[Tag("action", r.action)])), M, True),
    ("action_tag_only_other_tags", lambda r: body(signed(r, tags=[Tag("Kind", r.action)])), M, True),
    ("duplicated_action_tag", lambda r: body(signed(r, tags=[Tag("Action", r.action), Tag("Action", r.action)])), M, True),
    ("conflicting_action_tags", lambda r: body(signed(r, tags=[Tag("Action", r.action), Tag("Action", "GetHandles")])), M, True),
    # Data that does not fit the action
    ("data_not_json", lambda r: body(signed(r, data="{nope")), M, True),
    ("data_empty", lambda r: body(signed(r, data="")), M, True),
    ("data_array", lambda r: body(signed(r, data="[]")), M, True),
    ("data_null", lambda r: body(signed(r, data="null")), M, True),
    ("data_unknown_field", lambda r: body(signed(r, data=r.data[:-1] + (',' if r.data != "{}" else '') + '"Sneaky":1}')), M, True),
    ("data_invalid_utf8_escape", lambda r: body(signed(r, data='{"Handle":"\\ud800"}')), M, True),
    # a key twice: the last one would win, and another parser may read the first
    ("duplicate_envelope_field", lambda r: b'{"Target":"decoy",' + body(signed(r))[1:], M, False),
    ("duplicate_envelope_field_same_value", lambda r: body(signed(r))[:-1] + b',"Data":' + msgspec.json.encode(r.data) + b"}", M, False),
    ("duplicate_envelope_field_escaped", lambda r: b'{"\\u0054arget":"decoy",' + body(signed(r))[1:], M, False),
    ("duplicate_tag_field", lambda r: body(signed(r)).replace(b'{"name":"Action"', b'{"name":"Decoy","name":"Action"'), M, False),
    ("duplicate_data_key", lambda r: body(signed(r, data=doubled_key(r.data))), M, True),
    ("duplicate_data_key_escaped", lambda r: body(signed(r, data=doubled_key(r.data, escaped=True))), M, True),
]


@pytest.mark.parametrize("service", ["registry", "session"])
@pytest.mark.parametrize("name, build, code, echoes_id", CASES, ids=[c[0] for c in CASES])
async def test_hostile_body_gets_a_typed_error(world, service, name, build, code, echoes_id):
    r = valid_request(world, service)
    raw = build(r)
    reply = await call(world.alice, r.target, raw)
    assert isinstance(reply, Err), reply
    assert reply.code == code, reply.message
    assert reply.message
    assert reply.request_id == (claimed_id(raw) if echoes_id else "")
    await still_works(world, service)


def test_every_case_is_distinct():
    names = [c[0] for c in CASES]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("service", ["registry", "session"])
async def test_the_untouched_request_is_accepted(world, service):
    """The baseline every case breaks: proves the cases fail for their one change."""
    r = valid_request(world, service)
    reply = await call(world.alice, r.target, body(signed(r)))
    assert isinstance(reply, Ok)


@pytest.mark.parametrize("service", ["registry", "session"])
async def test_limits_are_inclusive(world, service):
    r = valid_request(world, service)
    accepted = [
        # body of exactly the cap (JSON allows trailing whitespace)
        (lambda raw: raw + b" " * (MAX_BODY_BYTES - len(raw)))(body(signed(r))),
        # Data of exactly the cap
        body(signed(r, data=r.data + " " * (MAX_DATA_BYTES - len(r.data)))),
        # as many tags as allowed, each name and value at its cap (counted in code points)
        body(signed(r, tags=[Tag("Action", r.action)] + [Tag(f"{i:02d}" + "n" * 62, "é" * 256) for i in range(MAX_TAGS - 1)])),
        # Target, From, Anchor at 64 characters where the service allows it
        body(signed(r, anchor="ä" * 64)),
        # timestamps well inside the window
        body(signed(r, timestamp=envelope.now_ms() - 10 * MINUTE_MS)),
        body(signed(r, timestamp=envelope.now_ms() + MINUTE_MS)),
    ]
    for raw in accepted:
        assert len(raw) <= MAX_BODY_BYTES
        reply = await call(world.alice, r.target, raw)
        assert isinstance(reply, Ok), reply


@pytest.mark.parametrize("service", ["registry", "session"])
async def test_body_reordered_and_respelled_is_accepted(world, service):
    """The signature covers values, not the body's bytes."""
    r = valid_request(world, service)
    d = as_dict(r)
    respelled = b"{\n" + b",\n".join(
        msgspec.json.encode(k) + b" : " + msgspec.json.encode(v) for k, v in reversed(list(d.items()))
    ) + b"\n}"
    reply = await call(world.alice, r.target, respelled)
    assert isinstance(reply, Ok), reply


@pytest.mark.parametrize("service, table", [("registry", "registry.handles"), ("session", "session.messages")])
async def test_a_forged_read_is_refused_before_any_database_work(world, stack, service, table):
    """The table the read would query is locked: a read that reached the database would
    wait. The forged one is answered at once; the genuine one (the control) waits."""
    r = valid_request(world, service)
    conn = await asyncpg.connect(stack.database_url)
    try:
        async with conn.transaction():
            await conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            forged = await asyncio.wait_for(call(world.alice, r.target, body(signed(r, signer=SigningKey.generate()))), 5)
            assert isinstance(forged, Err) and forged.code == S, forged
            genuine = asyncio.ensure_future(call(world.alice, r.target, body(signed(r))))
            await asyncio.sleep(1.0)
            assert not genuine.done(), "the genuine read did not wait for the lock: the test proves nothing"
        assert isinstance(await asyncio.wait_for(genuine, 10), Ok)
    finally:
        await conn.close()


async def test_nul_characters_are_refused(world):
    """PostgreSQL text cannot hold NUL: every field that could carry one is refused up front
    as malformed_request (never `internal`), with no Id since it fails before verification."""
    key = world.alice.identity.signing_key
    query = _encoder.encode({"Handle": world.bob.handle}).decode()
    target = world.session[:10] + "\x00"
    cases = [
        # (routing key, envelope)
        (REGISTRY_TARGET, forge(key, target=REGISTRY_TARGET, from_="ali\x00ce", tags=[Tag("Action", "QueryHandle")], data=query)),
        (target, forge(key, target=target, from_=world.alice.handle, tags=[Tag("Action", "QueryMessage")], data="{}")),
        (world.session, forge(key, target=world.session, from_="\x00", tags=[Tag("Action", "QueryMessage")], data="{}")),
        (world.session, forge(key, target=world.session, from_=world.alice.handle, anchor="\x00",
                              tags=[Tag("Action", "QueryMessage")], data="{}")),
        (world.session, forge(key, target=world.session, from_=world.alice.handle,
                              tags=[Tag("Action", "QueryMessage"), Tag("X", "\x00")], data="{}")),
        (REGISTRY_TARGET, forge(key, target=REGISTRY_TARGET, from_=world.alice.identity.address,
                                tags=[Tag("Action", "QueryHandle")], data='{"Handle":"a\\u0000b"}')),
        (world.session, forge(key, target=world.session, from_=world.alice.handle,
                              tags=[Tag("Action", "QueryMessage")], data='{"Cursor":"1.\\u0000"}')),
    ]
    for routing_key, env in cases:
        reply = await call(world.alice, routing_key, body(env))
        assert isinstance(reply, Err) and reply.code == "malformed_request", (env, reply)
    await still_works(world, "registry")
    await still_works(world, "session")


# -- Target and routing key -----------------------------------------------------------


async def test_target_must_match_the_routing_key(world, make_client):
    key = world.alice.identity.signing_key
    other = (await world.alice.establish_session((await make_client("carol")).handle)).session_id
    # signed for the registry, routed to a session
    env = forge(key, target=REGISTRY_TARGET, from_=world.alice.handle, tags=[Tag("Action", "QueryHandle")],
                data=_encoder.encode({"Handle": world.bob.handle}).decode())
    reply = await call(world.alice, world.session, body(env))
    assert isinstance(reply, Err) and reply.code == "malformed_request" and reply.request_id == env.id, reply
    # signed for a session, routed to the registry
    env = forge(key, target=world.session, from_=world.alice.handle, tags=[Tag("Action", "QueryMessage")], data="{}")
    reply = await call(world.alice, REGISTRY_TARGET, body(env))
    assert isinstance(reply, Err) and reply.code == "malformed_request", reply
    # signed for one session, routed to another one the signer also belongs to
    env = forge(key, target=world.session, from_=world.alice.handle, tags=[Tag("Action", "SendMessage")],
                data=_encoder.encode(SendMessage(crypto.encrypt(crypto.new_session_key(), "x"), 1)).decode())
    reply = await call(world.alice, other, body(env))
    assert isinstance(reply, Err) and reply.code == "malformed_request", reply
    # a routing key that differs only in case or padding
    env = forge(key, target=REGISTRY_TARGET, from_=world.alice.identity.address, tags=[Tag("Action", "QueryHandle")],
                data=_encoder.encode({"Handle": world.bob.handle}).decode())
    for routing_key in ("Registry", "registry ", world.session):
        reply = await call(world.alice, routing_key, body(env))
        assert isinstance(reply, Err) and reply.code == "malformed_request", (routing_key, reply)
    # nothing was stored in either session
    assert (await world.alice.query_messages(world.session)).messages == []
    assert (await world.alice.query_messages(other)).messages == []
    await still_works(world, "registry")


async def test_tampered_target_is_an_invalid_signature(world):
    key = world.alice.identity.signing_key
    env = forge(key, target=world.session, from_=world.alice.handle, tags=[Tag("Action", "QueryMessage")], data="{}")
    moved = msgspec.structs.replace(env, target=REGISTRY_TARGET)
    reply = await call(world.alice, REGISTRY_TARGET, body(moved))
    assert isinstance(reply, Err) and reply.code == "invalid_signature" and reply.request_id == env.id, reply
    env = forge(key, target=REGISTRY_TARGET, from_=world.alice.handle, tags=[Tag("Action", "GetChatList")], data="{}")
    moved = msgspec.structs.replace(env, target=world.session)
    reply = await call(world.alice, world.session, body(moved))
    assert isinstance(reply, Err) and reply.code == "invalid_signature", reply


# -- replays --------------------------------------------------------------------------


async def test_replayed_send_message_is_stored_once(world):
    content = crypto.encrypt(crypto.new_session_key(), "once")
    env = world.alice.sign(world.session, "SendMessage", SendMessage(content, 1))
    raw = body(env)
    first = await world.alice.bus.call(topology.REQUESTS, world.session, raw, timeout=15)
    second = await world.alice.bus.call(topology.REQUESTS, world.session, raw, timeout=15)
    assert first == second
    reply = reply_decoder.decode(first)
    assert isinstance(reply, Ok) and reply.request_id == env.id
    sent = msgspec.json.decode(reply.result, type=Sent)
    assert sent.message_id == env.id
    # concurrently, a few more times
    replies = await asyncio.gather(
        *(world.alice.bus.call(topology.REQUESTS, world.session, raw, timeout=15) for _ in range(5))
    )
    assert set(replies) == {first}
    page = await world.bob.query_messages(world.session)
    assert [m.message_id for m in page.messages] == [env.id]
    # the next message gets the next sequence number: the replays used none
    assert (await world.alice.send_text(world.session, "two")).seq == sent.seq + 1


async def raw_notes(client: Client, until_message: str) -> list[AnyNotification]:
    """Everything in the client's queue up to the NewMessage of `until_message`, left there."""
    notes: asyncio.Queue[AnyNotification] = asyncio.Queue()

    async def collect(delivery):  # not acknowledged: closing the consumer puts them back
        await notes.put(notification_decoder.decode(delivery.body))

    consumer = await client.bus.consume(topology.inbox_queue(client.handle), collect, prefetch=100)
    try:
        seen = []
        while True:
            seen.append(await asyncio.wait_for(notes.get(), 10))
            if isinstance(seen[-1], NewMessage) and seen[-1].message_id == until_message:
                return seen
    finally:
        await consumer.close()


async def test_a_replayed_send_adds_nothing_to_the_peers_queue(world):
    """Anyone holding a stored envelope may publish it again: each gets the first reply,
    and Bob's queue gets the notification once (only a broker redelivery republishes it)."""
    env = world.alice.sign(world.session, "SendMessage", SendMessage(crypto.encrypt(crypto.new_session_key(), "hi"), 1))
    replies = [reply_decoder.decode(await world.alice.bus.call(topology.REQUESTS, world.session, body(env), timeout=15))
               for _ in range(5)]
    assert all(isinstance(r, Ok) for r in replies) and len({bytes(r.result) for r in replies}) == 1
    barrier = await world.alice.send_text(world.session, "barrier")
    seen = await raw_notes(world.bob, barrier.message_id)
    assert [n.message_id for n in seen if isinstance(n, NewMessage)] == [env.id, barrier.message_id], seen


async def test_a_replayed_establish_session_adds_nothing_to_the_peers_queue(make_client):
    alice, bob = await make_client("alice"), await make_client("bob")
    env = alice.sign(REGISTRY_TARGET, "EstablishSession", EstablishSession(bob.handle))
    for _ in range(5):
        assert isinstance(await call(alice, REGISTRY_TARGET, body(env)), Ok)
    session = (await alice.establish_session(bob.handle)).session_id
    await alice.rotate_session_key(session, bob.handle)
    barrier = await alice.send_text(session, "barrier")
    seen = await raw_notes(bob, barrier.message_id)
    assert sum(isinstance(n, SessionEstablished) for n in seen) == 1, seen


async def test_a_stored_message_replayed_once_stale_gets_its_first_reply(world, monkeypatch):
    """Freshness is judged at the first sighting: a request stored before gets its reply even
    when its timestamp has left the window since (a redelivery after a long outage); a new
    request that old is refused."""
    ten_minutes_ago = envelope.now_ms() - 10 * MINUTE_MS

    def old_message(text: str) -> bytes:
        data = msgspec.json.encode(SendMessage(crypto.encrypt(crypto.new_session_key(), text), 1)).decode()
        return body(envelope.sign(world.alice.identity.signing_key, target=world.session, from_=world.alice.handle,
                                  action="SendMessage", data=data, timestamp=ten_minutes_ago))

    stored = old_message("stored while fresh")
    first = await call(world.alice, world.session, stored)
    assert isinstance(first, Ok)
    monkeypatch.setattr(envelope, "MAX_AGE_MS", 5 * MINUTE_MS)  # the window has moved past it
    assert await call(world.alice, world.session, stored) == first
    late = await call(world.alice, world.session, old_message("new, and as old"))
    assert isinstance(late, Err) and late.code == "stale_request", late
    page = await world.bob.query_messages(world.session)
    assert [m.message_id for m in page.messages] == [first.request_id]


async def test_replayed_register_is_the_same_reply(make_client):
    client = await make_client(register=False)
    name = f"replay-{secrets.token_hex(4)}"
    env = client.sign(REGISTRY_TARGET, "Register", Register(name, client.identity.box_public), as_handle=False)
    first = await client.bus.call(topology.REQUESTS, REGISTRY_TARGET, body(env), timeout=15)
    second = await client.bus.call(topology.REQUESTS, REGISTRY_TARGET, body(env), timeout=15)
    assert first == second
    reply = reply_decoder.decode(first)
    assert isinstance(reply, Ok)
    assert msgspec.json.decode(reply.result, type=HandleInfo).handle == name
    # a new request for the same handle is a conflict, not a replay
    other = await make_client(register=False)
    again = other.sign(REGISTRY_TARGET, "Register", Register(name, other.identity.box_public), as_handle=False)
    reply = await call(other, REGISTRY_TARGET, body(again))
    assert isinstance(reply, Err) and reply.code == "already_exists"


async def test_a_failed_send_can_be_retried_with_the_same_envelope(world, make_client):
    """A failure is not remembered as the answer: the claim rolls back with the error."""
    carol = await make_client("carol")
    session = (await carol.establish_session(world.alice.handle)).session_id
    env = carol.sign(session, "SendMessage", SendMessage(crypto.encrypt(crypto.new_session_key(), "early"), 1))
    with pytest.raises(NoSessionKey):
        await carol.send_envelope(env)
    await carol.rotate_session_key(session, world.alice.handle)
    reply = await call(carol, session, body(env))
    assert isinstance(reply, Ok), reply
    assert [m.message_id for m in (await world.alice.query_messages(session)).messages] == [env.id]


# -- no reply_to ----------------------------------------------------------------------


async def next_failure(inbox: Inbox) -> RequestFailed:
    while True:
        note = await inbox.next(timeout=10)
        if isinstance(note, RequestFailed):
            return note


async def test_failure_without_reply_to_goes_to_the_inbox(world, make_client):
    carol = await make_client("carol")
    session = (await carol.establish_session(world.bob.handle)).session_id
    env = carol.sign(session, "SendMessage", SendMessage(crypto.encrypt(crypto.new_session_key(), "too early"), 1))
    await carol.bus.publish(topology.REQUESTS, session, body(env))
    async with Inbox(carol.bus, carol.handle) as inbox:
        failure = await next_failure(inbox)
    assert failure.handle == carol.handle
    assert failure.request_id == env.id
    assert failure.action == "SendMessage"
    assert failure.code == "no_session_key"
    assert failure.message
    # the failed send changed nothing; the session works
    await carol.rotate_session_key(session, world.bob.handle)
    assert (await carol.send_text(session, "now")).seq == 1


async def test_failure_without_reply_to_in_the_registry(world):
    env = world.alice.sign(REGISTRY_TARGET, "EstablishSession", EstablishSession(world.alice.handle))
    await world.alice.bus.publish(topology.REQUESTS, REGISTRY_TARGET, body(env))
    async with Inbox(world.alice.bus, world.alice.handle) as inbox:
        failure = await next_failure(inbox)
    assert (failure.request_id, failure.code, failure.action) == (env.id, "forbidden", "EstablishSession")


async def test_unauthenticated_failures_without_reply_to_notify_nobody(world, make_client):
    """A bad signature, or a forged From, without reply_to: no crash, and no notification
    to anyone (a forger must not be able to write into a victim's queue)."""
    mallory = await make_client("mallory")
    r = valid_request(world, "session")
    content = crypto.encrypt(crypto.new_session_key(), "forged")
    # alice's envelope with a broken signature
    await world.alice.bus.publish(topology.REQUESTS, world.session, edited(r, Signature=flipped(as_dict(r)["Signature"])))
    # mallory signing as alice and as bob
    for victim in (world.alice.handle, world.bob.handle):
        forged = forge(mallory.identity.signing_key, target=world.session, from_=victim,
                       tags=[Tag("Action", "SendMessage")], data=_encoder.encode(SendMessage(content, 1)).decode())
        await mallory.bus.publish(topology.REQUESTS, world.session, body(forged))
    # plain garbage and a stale request
    await mallory.bus.publish(topology.REQUESTS, world.session, b"\xff not json")
    await world.alice.bus.publish(topology.REQUESTS, world.session, body(signed(r, timestamp=envelope.now_ms() - HOUR_MS)))
    await mallory.bus.publish(topology.REQUESTS, REGISTRY_TARGET, b"[]")
    # Barrier: an authenticated failure without reply_to on the same shard, after all of them.
    barrier = world.alice.sign(world.session, "SendMessage", SendMessage("!!"))
    await world.alice.bus.publish(topology.REQUESTS, world.session, body(barrier))
    async with Inbox(world.alice.bus, world.alice.handle) as inbox:
        failure = await next_failure(inbox)
    assert failure.request_id == barrier.id and failure.code == "malformed_request"
    # bob got nothing either: his next notification is for a message alice really sends
    sent = await world.alice.send_text(world.session, "real")
    async with Inbox(world.bob.bus, world.bob.handle) as inbox:
        seen = []
        while not (seen and isinstance(seen[-1], NewMessage)):
            seen.append(await inbox.next(timeout=10))
    assert not any(isinstance(n, RequestFailed) for n in seen)
    assert seen[-1].message_id == sent.message_id
    # nothing forged was stored, and both services still answer
    page = await world.bob.query_messages(world.session)
    assert [m.message_id for m in page.messages] == [sent.message_id]
    await still_works(world, "registry")


async def test_no_reply_to_success_is_silent_but_effective(world):
    env = world.alice.sign(world.session, "SendMessage", SendMessage(crypto.encrypt(crypto.new_session_key(), "fire"), 1))
    await world.alice.bus.publish(topology.REQUESTS, world.session, body(env))
    # Replaying it with a reply address returns the stored reply (and proves it was stored).
    reply = await call(world.alice, world.session, body(env))
    assert isinstance(reply, Ok)
    assert msgspec.json.decode(reply.result, type=Sent).message_id == env.id
    page = msgspec.json.decode(
        (await call(world.bob, world.session, body(world.bob.sign(world.session, "QueryMessage", QueryMessage())))).result,
        type=MessagePage,
    )
    assert [m.message_id for m in page.messages] == [env.id]


# -- where replies may go ------------------------------------------------------------------


async def trap(client: Client) -> str:
    """A named queue of the test's: a reply_to naming it must get nothing."""
    name = f"aodm-test-trap-{secrets.token_hex(4)}"
    await client.bus.declare_queue(name)
    return name


@pytest.mark.parametrize("reply_to", ["trap", "inbox", "notifier", "shard", "registry"])
async def test_a_reply_to_naming_a_queue_gets_nothing_and_runs_nothing(world, reply_to):
    queue = {"trap": await trap(world.alice), "inbox": topology.inbox_queue(world.bob.handle),
             "notifier": topology.NOTIFIER_QUEUE, "shard": topology.shard_queue(0),
             "registry": topology.REGISTRY_QUEUE}[reply_to]
    env = world.alice.sign(world.session, "SendMessage", SendMessage(crypto.encrypt(crypto.new_session_key(), "x"), 1))
    await world.alice.bus.publish(topology.REQUESTS, world.session, body(env), reply_to=queue, correlation_id="c")
    barrier = await world.alice.send_text(world.session, "barrier")  # same shard, behind it
    page = await world.alice.query_messages(world.session)
    assert [m.message_id for m in page.messages] == [barrier.message_id], "the request was run"
    if reply_to == "trap":
        assert await world.alice.bus.message_count(queue) == 0
    if reply_to == "inbox":
        seen = await raw_notes(world.bob, barrier.message_id)
        assert [n.message_id for n in seen if isinstance(n, NewMessage)] == [barrier.message_id], seen


async def test_a_reply_goes_to_the_requesters_server_named_queue_without_the_services_user_id(world):
    got: asyncio.Queue = asyncio.Queue()
    channel = await world.alice.bus._consumer_connection()
    amqp = await (await channel.channel()).get_underlay_channel()
    declared = await amqp.queue_declare("", exclusive=True, auto_delete=True)
    await amqp.basic_consume(declared.queue, got.put_nowait, no_ack=True)
    r = valid_request(world, "session")
    await world.alice.bus.publish(topology.REQUESTS, r.target, body(signed(r)), reply_to=declared.queue, correlation_id="c1")
    message = await asyncio.wait_for(got.get(), 10)
    assert isinstance(reply_decoder.decode(message.body), Ok)
    assert message.header.properties.correlation_id == "c1"
    assert message.header.properties.user_id is None, "a reply must not carry the services' broker user"


async def test_the_inbox_drops_and_counts_what_is_no_notification(world):
    """Whatever lands in a handle's queue, the Inbox hands on only notifications, and a
    message it cannot read neither stops it nor comes back."""
    queue = topology.inbox_queue(world.bob.handle)
    for junk in (b"not json", b"null", b"[]", b'{"Kind":"Nonsense","Id":"x"}', secrets.token_bytes(64)):
        await world.alice.bus.publish("", queue, junk)
    sent = await world.alice.send_text(world.session, "after the junk")
    async with Inbox(world.bob.bus, world.bob.handle) as inbox:
        while not isinstance(note := await inbox.next(timeout=10), NewMessage):
            pass  # the session's own notifications, from before the junk
        assert note.message_id == sent.message_id
        assert inbox.dropped == 5
    async with Inbox(world.bob.bus, world.bob.handle) as inbox:  # nothing came back
        with pytest.raises(TimeoutError):
            await inbox.next(timeout=1)


# -- the order of the checks (protocol §7) ----------------------------------------------

SESSION_DATA = {
    "SendMessage": lambda: _encoder.encode(SendMessage(crypto.encrypt(crypto.new_session_key(), "late"), 1)).decode(),
    "QueryMessage": lambda: "{}",
    "GetCurrentKey": lambda: "{}",
    "GetKeyByGeneration": lambda: '{"Generation":1}',
    "RotateSessionKey": lambda: '{"Keys":[]}',
    "Accept": lambda: "{}",
    "Block": lambda: "{}",
    "Unblock": lambda: "{}",
}


@pytest.mark.parametrize("action", sorted(SESSION_DATA))
@pytest.mark.parametrize("refusal", ["no_such_session", "not_a_member", "not_the_owner"])
async def test_a_stale_request_is_stale_before_it_is_authenticated(world, make_client, action, refusal):
    """§7: the timestamp (step 8) before authentication (step 9), for every action. A stale
    new request that authentication would also refuse is answered `stale_request`: it cannot
    have been stored before (SendMessage looks that up first), so nothing else applies."""
    mallory = await make_client("mallory")
    target, signer, from_ = {
        "no_such_session": (b64encode(secrets.token_bytes(32)), world.alice.identity.signing_key, world.alice.handle),
        "not_a_member": (world.session, mallory.identity.signing_key, mallory.handle),
        "not_the_owner": (world.session, mallory.identity.signing_key, world.bob.handle),
    }[refusal]
    env = forge(signer, target=target, from_=from_, tags=[Tag("Action", action)], data=SESSION_DATA[action](),
                timestamp=envelope.now_ms() - HOUR_MS)
    reply = await call(world.alice, target, body(env))
    assert isinstance(reply, Err) and reply.code == "stale_request", reply
    fresh = forge(signer, target=target, from_=from_, tags=[Tag("Action", action)], data=SESSION_DATA[action]())
    reply = await call(world.alice, target, body(fresh))  # the control: fresh, it is refused for who sent it
    assert isinstance(reply, Err) and reply.code in {"not_found", "forbidden", "unauthorized"}, reply


async def test_a_stale_request_from_no_handle_is_stale_in_the_registry(world):
    env = forge(world.alice.identity.signing_key, target=REGISTRY_TARGET, from_="nobody-registered-this",
                tags=[Tag("Action", "GetChatList")], data="{}", timestamp=envelope.now_ms() - HOUR_MS)
    reply = await call(world.alice, REGISTRY_TARGET, body(env))
    assert isinstance(reply, Err) and reply.code == "stale_request", reply
