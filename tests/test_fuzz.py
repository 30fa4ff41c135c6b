"""Property-based fuzzing (hypothesis) of everything a request body passes through.

1. The envelope, pure: `envelope.decode` on arbitrary bytes, JSON and envelope-shaped
   objects either returns an Envelope or raises an `AodmError`; a signed envelope round-trips;
   any one changed field fails `verify`; `b64decode` accepts exactly the canonical spellings.
2. Each action's Data, pure: `decode_data` on arbitrary JSON and on objects built from the
   request struct's own field names returns the struct or raises `MalformedRequest` /
   `InvalidArgument`, and type-valid Data is always accepted.
3. Through the running stack: for every action, validly signed envelopes from a real member
   with fuzzed Data are answered `Ok` or a typed `Err` with a known code (never `internal`,
   never silence), and the service still answers a normal request afterwards.

For the stack tests the examples are drawn up front by a synchronous `@given` function and
then sent from the async test (hypothesis cannot drive an async test on pytest-asyncio's
shared loop directly); a failing example is printed in full in the assertion message.
AODM_FUZZ_SCALE=10 multiplies every example count (a longer, deeper run).
"""

import asyncio
import base64
import json
import os
import secrets
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from aodm import envelope, topology
from aodm.client import Client
from aodm.encoding import b64decode, b64encode
from aodm.envelope import (
    MAX_BODY_BYTES,
    MAX_DATA_BYTES,
    MAX_ID_FIELD,
    MAX_TAG_NAME,
    MAX_TAG_VALUE,
    MAX_TAGS,
    Envelope,
    Tag,
)
from aodm.errors import ERROR_CODES, AodmError, InvalidArgument, InvalidSignature, MalformedRequest
from aodm.registry_api import (
    REGISTRY_TARGET,
    BrokerCredentials,
    ChatList,
    DeviceChange,
    DeviceLogPage,
    Established,
    HandleInfo,
    HandleList,
    Registered,
    SessionRef,
)
from aodm.replies import Err, Ok, reply_decoder
from aodm.session_api import Consent, KeyBatch, MessagePage, Rotated, Sent, Shared
from services.registry.__main__ import ACTIONS as REGISTRY_ACTIONS
from services.session.__main__ import ACTIONS as SESSION_ACTIONS
from shared.actions import Action, decode_data

SCALE = int(os.environ.get("AODM_FUZZ_SCALE", "1"))
PURE = settings(
    max_examples=200 * SCALE, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
ENVELOPE_FIELDS = ("Id", "Target", "From", "Owner", "Anchor", "Timestamp", "Tags", "Data", "Signature")
ALL_ACTIONS: list[tuple[str, str, Action]] = [
    *(("registry", name, action) for name, action in REGISTRY_ACTIONS.items()),
    *(("session", name, action) for name, action in SESSION_ACTIONS.items()),
]
ACTION_IDS = [f"{service}-{name}" for service, name, _ in ALL_ACTIONS]
RESULT_TYPES: dict[str, type] = {
    "Register": Registered,
    "QueryHandle": HandleInfo,
    "GetHandles": HandleList,
    "QuerySession": SessionRef,
    "EstablishSession": Established,
    "GetChatList": ChatList,
    "IssueBrokerCredentials": BrokerCredentials,
    "AddDevice": DeviceChange,
    "RemoveDevice": DeviceChange,
    "GetDeviceLog": DeviceLogPage,
    "RotateSessionKey": Rotated,
    "ShareKeys": Shared,
    "GetCurrentKey": KeyBatch,
    "GetKeyByGeneration": KeyBatch,
    "SendMessage": Sent,
    "QueryMessage": MessagePage,
    "Accept": Consent,
    "Block": Consent,
    "Unblock": Consent,
}


def test_every_action_is_fuzzed():
    assert set(RESULT_TYPES) == {name for _, name, _ in ALL_ACTIONS}


# -- strategies --------------------------------------------------------------------------

BOUNDARY_INTS = [
    0, 1, -1, 2, 63, 64, 65, 499, 500, 501, 2**31 - 2, 2**31 - 1, 2**31, -(2**31), 2**32,
    2**53 - 1, 2**53, 2**53 + 1, 2**62, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64 - 1, 2**64, 10**30, -(10**30),
]
ints = st.one_of(st.integers(), st.sampled_from(BOUNDARY_INTS), st.integers(min_value=-(10**40), max_value=10**40))
floats = st.floats(allow_nan=False, allow_infinity=False)
SPECIAL_TEXT = [
    "", " ", "\x00", "a\x00b", "\\u0000", "\\", '"', "\ufeff", "\u2028", "é" * 33, "💬" * 17, "\uffff", "\U0010ffff",
    "Action", "null", "true", "0", "-1", "1e999", "NaN", "asc", "desc", "ASC", "=", "==", "AAAA====", "A", "AA", "AAA",
    "1.1", "0.0", "18446744073709551616.1", "9999999999999999999.9999999999999999999", "+1", " 1", "1 ",
]


CHARS = st.characters(codec="utf-8")
CHARS_NO_NUL = st.characters(codec="utf-8", exclude_characters="\x00")  # (codec: no lone surrogates)


def texts(*, nul: bool = True, max_size: int = 40) -> st.SearchStrategy[str]:
    """Any Unicode (no lone surrogates: a Python str from JSON cannot hold one), mixed with
    lengths around the caps, base64url of interesting sizes and look-alike strings."""
    alphabet = CHARS if nul else CHARS_NO_NUL
    special = [t for t in SPECIAL_TEXT if nul or "\x00" not in t]
    return st.one_of(
        st.text(alphabet, max_size=max_size),
        st.text(st.characters(codec="ascii", exclude_characters=() if nul else "\x00"), max_size=max_size),
        st.sampled_from(special),
        st.binary(max_size=100).map(b64encode),
        st.sampled_from([31, 32, 33, 39, 40, 63, 64, 65, 79, 80, 81]).flatmap(lambda n: st.binary(min_size=n, max_size=n)).map(b64encode),
        st.from_regex(r"[a-z0-9_-]{1,40}", fullmatch=True),
        st.from_regex(r"-?[0-9]{1,21}\.-?[0-9]{1,21}", fullmatch=True),
        st.integers(min_value=0, max_value=300).flatmap(lambda n: st.sampled_from(["x" * n, "é" * n, "\U0001f4ac" * n])),
    )


def json_values(*, nul: bool = True, leaves: int = 12) -> st.SearchStrategy[Any]:
    scalars = st.one_of(st.none(), st.booleans(), ints, floats, texts(nul=nul))
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(texts(nul=nul, max_size=12), inner, max_size=4)
        ),
        max_leaves=leaves,
    )


def dumps(value: Any, ascii_only: bool) -> str:
    """JSON text; `ascii_only` writes every non-ASCII character (astral: surrogate pairs) escaped."""
    return json.dumps(value, ensure_ascii=ascii_only, allow_nan=False)


def raw_json_strings(nul: bool = True) -> st.SearchStrategy[str]:
    """Hand-written JSON string literals, for escapes json.dumps never writes: lone
    surrogates, reversed pairs, bad escapes, raw control characters."""
    pieces = [
        "\\ud800", "\\udc00", "\\udfff", "\\ud83d\\ude00", "\\ude00\\ud83d", "\\ud83d", "\\ud83dx", "\\u0000", "\\u00e9",
        "\\uD800", "\\u12", "\\u", "\\x41", "\\U0041", "\\'", "\\a", "\\", "\\n", "\\\\", "\\/", "\\b\\f\\r\\t", "\t", "\n",
        "\x00", "\x7f", "é", "💬",
    ]
    if not nul:
        pieces = [p for p in pieces if "\x00" not in p and "\\u0000" not in p]
    piece = st.one_of(
        st.sampled_from(pieces),
        st.text(st.characters(codec="utf-8", exclude_characters='"\\' + ("" if nul else "\x00")), max_size=6),
    )
    return st.lists(piece, max_size=6).map(lambda ps: '"' + "".join(ps) + '"')


raw_json_numbers = st.one_of(
    st.sampled_from([
        "1e999", "-1e999", "NaN", "Infinity", "-0", "01", "1.", ".5", "1e", "0x10", "+1", "1.0", "1e3", "-0.0",
        "18446744073709551615", "18446744073709551616", "-9223372036854775808", "-9223372036854775809", "9" * 400,
    ]),
    ints.map(str),
)


def raw_fragments(nul: bool = True) -> st.SearchStrategy[str]:
    """One JSON value as text: well-formed (any escaping) or one of the hand-written oddities."""
    return st.one_of(
        st.builds(dumps, json_values(nul=nul), st.booleans()),
        raw_json_strings(nul),
        raw_json_numbers,
        st.sampled_from(["", "[", "{", "}", "[1,]", "{,}", "nul", "truee", "[]]", '{"a":1,}', "[" * 300 + "]" * 300]),
    )


def raw_object(members: dict[str, st.SearchStrategy[str]]) -> st.SearchStrategy[str]:
    """A JSON object as text from per-key raw value fragments (keys in random order)."""
    return st.fixed_dictionaries({}, optional=members).flatmap(
        lambda d: st.permutations(list(d.items())).map(
            lambda items: "{" + ",".join(json.dumps(k) + ":" + v for k, v in items) + "}"
        )
    )


def typed_values(t: msgspec.inspect.Type, strings: st.SearchStrategy[str], nul: bool) -> st.SearchStrategy[Any]:
    """Values of the type msgspec expects for `t` (so that only semantics can reject them);
    lengths and ranges are drawn within the declared constraints."""
    mi = msgspec.inspect
    if isinstance(t, mi.StrType):
        lo, hi = t.min_length or 0, t.max_length
        if lo or hi is not None:
            alphabet = CHARS if nul else CHARS_NO_NUL
            fitting = st.text(alphabet, min_size=lo, max_size=min(hi if hi is not None else 80, 80))
            return st.one_of(fitting, strings.filter(lambda s: lo <= len(s) and (hi is None or len(s) <= hi)))
        return strings
    if isinstance(t, mi.IntType):
        lo = t.ge if t.ge is not None else -(2**63)
        hi = t.le if t.le is not None else 2**63 - 1
        return st.one_of(st.integers(lo, hi), st.sampled_from([lo, hi, min(lo + 1, hi), max(hi - 1, lo)]))
    if isinstance(t, mi.BoolType):
        return st.booleans()
    if isinstance(t, mi.NoneType):
        return st.none()
    if isinstance(t, mi.LiteralType):
        return st.sampled_from(t.values)
    if isinstance(t, mi.UnionType):
        return st.one_of(*(typed_values(u, strings, nul) for u in t.types))
    if isinstance(t, mi.ListType):
        return st.lists(typed_values(t.item_type, strings, nul), max_size=3)
    if isinstance(t, mi.StructType):
        return struct_objects(t.cls, strings, nul=nul, valid=True)
    return json_values(nul=nul)


def struct_objects(
    cls: type[msgspec.Struct], strings: st.SearchStrategy[str], *, nul: bool = True, valid: bool = False
) -> st.SearchStrategy[dict]:
    """Objects keyed by the struct's wire names (msgspec.structs.fields). `valid`: every
    required field present with a value of its declared type. Otherwise any subset, each
    value typed or arbitrary JSON, sometimes with an unknown key."""
    fields = msgspec.structs.fields(cls)
    values = {f.encode_name: typed_values(msgspec.inspect.type_info(f.type), strings, nul) for f in fields}
    if valid:
        required = {f.encode_name: values[f.encode_name] for f in fields if f.required}
        optional = {f.encode_name: values[f.encode_name] for f in fields if not f.required}
        return st.fixed_dictionaries(required, optional=optional)
    fuzzed = {name: st.one_of(typed, typed, json_values(nul=nul, leaves=6)) for name, typed in values.items()}
    known = st.fixed_dictionaries({}, optional=fuzzed)
    unknown = st.dictionaries(texts(nul=nul, max_size=12), json_values(nul=nul, leaves=4), max_size=2)
    return st.one_of(known, known, st.builds(lambda a, b: {**b, **a}, known, unknown))


def fuzzed_data(cls: type[msgspec.Struct], strings: st.SearchStrategy[str], *, nul: bool = True) -> st.SearchStrategy[str]:
    """Data text: objects with the struct's field names (escaped or not, any key order),
    arbitrary JSON, hand-written JSON oddities, and text that is not JSON at all."""
    return st.one_of(
        st.builds(dumps, struct_objects(cls, strings, nul=nul), st.booleans()),
        st.builds(dumps, struct_objects(cls, strings, nul=nul), st.booleans()),
        raw_object({
            f.encode_name: st.one_of(
                raw_fragments(nul),
                st.builds(dumps, typed_values(msgspec.inspect.type_info(f.type), strings, nul), st.booleans()),
            )
            for f in msgspec.structs.fields(cls)
        }),
        st.builds(dumps, json_values(nul=nul), st.booleans()),
        raw_fragments(nul),
        texts(nul=nul),
    )


# -- 1. the envelope (pure) --------------------------------------------------------------

SIGNERS = [SigningKey(bytes([i]) * 32) for i in range(4)]
signers = st.sampled_from(SIGNERS)
id_fields = st.text(CHARS_NO_NUL, max_size=MAX_ID_FIELD)
tags = st.builds(
    Tag,
    st.text(CHARS_NO_NUL, max_size=MAX_TAG_NAME),
    st.text(CHARS_NO_NUL, max_size=MAX_TAG_VALUE),
)
datas = st.one_of(
    st.text(CHARS_NO_NUL, max_size=300),
    st.builds(dumps, json_values(nul=False), st.booleans()),
).filter(lambda d: "\\u0000" not in d)
timestamps = st.one_of(st.integers(min_value=-(2**63), max_value=2**64 - 1), st.just(envelope.now_ms()))


@st.composite
def signed_envelopes(draw) -> Envelope:
    """Any envelope `decode` must accept, validly signed (Owner = the signer)."""
    return envelope.sign(
        draw(signers),
        target=draw(id_fields),
        from_=draw(st.none() | id_fields),
        action=draw(st.text(CHARS_NO_NUL, max_size=MAX_TAG_VALUE)),
        data=draw(datas),
        anchor=draw(id_fields),
        timestamp=draw(timestamps),
        extra_tags=draw(st.lists(tags, max_size=MAX_TAGS - 1)),
    )


def check_decode(body: bytes) -> Envelope | None:
    """The property every body must have: an Envelope within the caps, or a typed error.
    What comes out must also go through the later checks with typed errors only."""
    try:
        env = envelope.decode(body)
    except AodmError:
        return None
    assert isinstance(env, Envelope)
    assert len(env.data.encode()) <= MAX_DATA_BYTES and len(env.tags) <= MAX_TAGS
    assert all(len(t.name) <= MAX_TAG_NAME and len(t.value) <= MAX_TAG_VALUE for t in env.tags)
    assert all(len(s) <= MAX_ID_FIELD for s in (env.target, env.from_, env.anchor))
    texts_in = [env.target, env.from_, env.owner, env.anchor, env.data, *(t.name for t in env.tags), *(t.value for t in env.tags)]
    assert not any("\x00" in s for s in texts_in)
    for check in (lambda: envelope.verify(env), lambda: envelope.check_fresh(env), lambda: env.action):
        try:
            check()
        except AodmError:
            pass
    return env


@PURE
@given(st.binary(max_size=2000))
def test_decode_arbitrary_bytes(body):
    check_decode(body)


@PURE
@given(json_values(leaves=30), st.booleans())
def test_decode_arbitrary_json(value, ascii_only):
    check_decode(dumps(value, ascii_only).encode())


@PURE
@given(raw_fragments())
def test_decode_raw_json_text(text):
    check_decode(text.encode("utf-8", "surrogatepass"))


ENVELOPE_VALUES = {
    "Tags": st.one_of(
        st.lists(
            st.fixed_dictionaries({}, optional={"name": json_values(leaves=3), "value": json_values(leaves=3)}),
            max_size=MAX_TAGS + 2,
        ),
        st.lists(st.builds(lambda t: {"name": t.name, "value": t.value}, tags), min_size=MAX_TAGS - 1, max_size=MAX_TAGS + 1),
        json_values(),
    ),
    "Timestamp": st.one_of(ints, floats, json_values(leaves=3)),
    "Data": st.one_of(
        texts(),
        st.sampled_from([MAX_DATA_BYTES // 2 - 1, MAX_DATA_BYTES // 2, MAX_DATA_BYTES // 2 + 1]).map(lambda n: "é" * n),
        json_values(leaves=3),
    ),
}


@st.composite
def envelope_shaped(draw) -> dict:
    """A validly signed envelope's fields, each kept, dropped, or replaced by anything
    (sometimes with an unknown field added)."""
    base = msgspec.to_builtins(draw(signed_envelopes()))
    out = {}
    for name in ENVELOPE_FIELDS:
        choice = draw(st.sampled_from(["keep", "keep", "drop", "replace", "replace"]))
        if choice == "keep":
            out[name] = base[name]
        elif choice == "replace":
            out[name] = draw(ENVELOPE_VALUES.get(name, st.one_of(texts(max_size=MAX_ID_FIELD + 2), json_values(leaves=4))))
    if draw(st.booleans()) and draw(st.booleans()):
        out[draw(texts(max_size=10))] = draw(json_values(leaves=3))
    return out


@PURE
@given(envelope_shaped(), st.booleans())
def test_decode_envelope_shaped_objects(fields, ascii_only):
    check_decode(dumps(fields, ascii_only).encode())


@PURE
@given(raw_object({name: raw_fragments() for name in ENVELOPE_FIELDS}))
def test_decode_envelope_shaped_raw_text(text):
    check_decode(text.encode("utf-8", "surrogatepass"))


@PURE
@given(signed_envelopes(), st.data())
def test_decode_byte_mutations_of_a_signed_body(env, data):
    """Flip, drop, insert and overwrite bytes of a real body (invalid UTF-8 inside strings,
    broken structure, changed values)."""
    body = bytearray(envelope.encode(env))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "drop", "insert", "set"]))
        i = data.draw(st.integers(0, len(body) - 1)) if body else 0
        if op == "flip" and body:
            body[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "drop" and body:
            del body[i]
        elif op == "insert":
            body[i:i] = data.draw(st.sampled_from(
                [b"\x00", b"\xff", b"\xc3", b"\xed\xa0\x80", b"\\", b'"', b"\\u0000", b"\\ud800", b",", b"[", b" "]
            ))
        elif body:
            body[i] = data.draw(st.integers(0, 255))
    check_decode(bytes(body))


@PURE
@given(signed_envelopes())
def test_signed_envelope_round_trips(env):
    body = envelope.encode(env)
    assert len(body) <= MAX_BODY_BYTES
    decoded = envelope.decode(body)
    assert decoded == env
    assert envelope.verify(decoded) == b64decode(env.owner)
    assert envelope.decode(dumps(msgspec.to_builtins(env), True).encode()) == env  # escaped spelling too


def _different(draw, strategy, old):
    return draw(strategy.filter(lambda v: v != old))


@st.composite
def mutated_envelopes(draw) -> tuple[str, Envelope]:
    """A signed envelope with exactly one field changed (not re-signed)."""
    env = draw(signed_envelopes())
    field = draw(st.sampled_from(["target", "from_", "owner", "anchor", "timestamp", "tag_name", "tag_value", "tag_added",
                                  "tag_removed", "tags_reordered", "data", "signature", "id"]))
    any_text = st.one_of(id_fields, texts(max_size=MAX_ID_FIELD))
    if field in ("target", "from_", "anchor", "data"):
        return field, msgspec.structs.replace(env, **{field: _different(draw, any_text, getattr(env, field))})
    if field == "owner":
        other = st.one_of(any_text, st.binary(min_size=32, max_size=32).map(b64encode),
                          st.sampled_from(SIGNERS).map(lambda k: envelope.address_of(bytes(k.verify_key))))
        return field, msgspec.structs.replace(env, owner=_different(draw, other, env.owner))
    if field == "timestamp":
        return field, msgspec.structs.replace(env, timestamp=_different(draw, timestamps | ints, env.timestamp))
    if field == "signature":
        sig = b64decode(env.signature)
        other = st.one_of(
            any_text,
            st.binary(min_size=64, max_size=64).map(b64encode),
            st.integers(0, 63 * 8 + 7).map(
                lambda bit: b64encode(bytes(b ^ (1 << (bit % 8)) if i == bit // 8 else b for i, b in enumerate(sig)))
            ),
            st.sampled_from("AQgw").map(lambda c: env.signature[:-1] + c),  # re-spelling the unused trailing bits
            st.just(env.signature + "="),
            st.just(env.signature.replace("-", "+").replace("_", "/")),
        )
        return field, msgspec.structs.replace(env, signature=_different(draw, other, env.signature))
    if field == "id":
        other_ids = st.one_of(any_text, st.binary(min_size=32, max_size=32).map(b64encode))
        return field, msgspec.structs.replace(env, id=_different(draw, other_ids, env.id))
    tags_ = list(env.tags)
    if field == "tag_added":
        tags_.insert(draw(st.integers(0, len(tags_))), draw(tags))
    elif field == "tag_removed":
        del tags_[draw(st.integers(0, len(tags_) - 1))]
    elif field == "tags_reordered":
        shuffled = draw(st.permutations(tags_))
        assume(shuffled != tags_)
        tags_ = shuffled
    else:
        i = draw(st.integers(0, len(tags_) - 1))
        attr = "name" if field == "tag_name" else "value"
        new = _different(draw, texts(max_size=MAX_TAG_VALUE), getattr(tags_[i], attr))
        tags_[i] = Tag(new, tags_[i].value) if attr == "name" else Tag(tags_[i].name, new)
    return field, msgspec.structs.replace(env, tags=tags_)


@PURE
@given(mutated_envelopes())
def test_any_single_field_change_fails_verify(mutation):
    _field, env = mutation
    with pytest.raises((InvalidSignature, MalformedRequest)):
        envelope.verify(env)
    # and the same over the wire, when the changed envelope still passes decode's bounds
    try:
        decoded = envelope.decode(envelope.encode(env))
    except AodmError:
        return
    with pytest.raises((InvalidSignature, MalformedRequest)):
        envelope.verify(decoded)


@PURE
@given(st.binary(max_size=200))
def test_b64_round_trip(raw):
    text = b64encode(raw)
    assert b64decode(text) == raw
    assert b64decode(text, length=len(raw)) == raw
    with pytest.raises(MalformedRequest):
        b64decode(text, length=len(raw) + 1)


B64_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@st.composite
def near_base64(draw) -> str:
    """Canonical encodings with one edit, strings over the alphabet (and its neighbours), and anything."""
    kind = draw(st.sampled_from(["alphabet", "neighbours", "edited", "any"]))
    if kind == "alphabet":
        return draw(st.text(st.sampled_from(B64_CHARS), max_size=90))
    if kind == "neighbours":
        return draw(st.text(st.sampled_from(B64_CHARS + "+/=.\n \t\x00é٣Ａ"), max_size=90))  # noqa: RUF001 (a look-alike, on purpose)
    if kind == "any":
        return draw(texts(max_size=90))
    text = b64encode(draw(st.binary(max_size=80)))
    i = draw(st.integers(0, len(text)))
    edit = draw(st.sampled_from(["replace", "insert", "delete", "pad"]))
    c = draw(st.sampled_from(B64_CHARS + "+/="))
    if edit == "pad":
        return text + "=" * draw(st.integers(1, 3))
    if edit == "insert" or not text:
        return text[:i] + c + text[i:]
    i = min(i, len(text) - 1)
    return text[:i] + (c if edit == "replace" else "") + text[i + 1 :]


@PURE
@given(near_base64())
def test_b64decode_accepts_exactly_canonical_text(text):
    try:
        raw = b64decode(text)
    except MalformedRequest:
        canonical = all(c in B64_CHARS for c in text) and len(text) % 4 != 1
        if canonical:  # refused though over the alphabet: must be non-canonical trailing bits
            decoded = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            assert b64encode(decoded) != text
        return
    assert isinstance(raw, bytes)
    assert b64encode(raw) == text


# -- 2. each action's Data (pure) --------------------------------------------------------


def check_data(action: Action, data: str | bytes) -> msgspec.Struct | None:
    try:
        request = decode_data(action, data)
    except (InvalidArgument, MalformedRequest):
        return None
    assert isinstance(request, action.request)
    assert decode_data(action, msgspec.json.encode(request).decode()) == request
    return request


@pytest.mark.parametrize(("service", "name", "action"), ALL_ACTIONS, ids=ACTION_IDS)
def test_data_fuzzed_text_and_bytes(service, name, action):
    @PURE
    @given(fuzzed_data(action.request, texts()), st.booleans())
    def run(data, as_bytes):
        check_data(action, data.encode("utf-8", "surrogatepass") if as_bytes else data)

    run()


@pytest.mark.parametrize(("service", "name", "action"), ALL_ACTIONS, ids=ACTION_IDS)
def test_data_arbitrary_utf8_bytes(service, name, action):
    """Data reaches decode_data as a str; as bytes it must still fail typed when it is UTF-8."""

    @PURE
    @given(st.text(max_size=200))
    def run(text):
        check_data(action, text.encode())

    run()


@pytest.mark.parametrize(("service", "name", "action"), ALL_ACTIONS, ids=ACTION_IDS)
def test_type_valid_data_is_accepted(service, name, action):
    """Values of the declared types, within the declared ranges, always decode (only the
    handler's semantic checks may refuse them)."""

    @PURE
    @given(struct_objects(action.request, texts(), valid=True), st.booleans())
    def run(fields, ascii_only):
        assert check_data(action, dumps(fields, ascii_only)) is not None, fields

    run()


# -- 3. through the running stack --------------------------------------------------------

STACK_EXAMPLES = 60 * SCALE
REPLY_TIMEOUT = 20
CONCURRENCY = 16
# A validly signed, fresh envelope for an action the service has can fail for its Data or
# its semantics, never for these.
NEVER = {"internal", "invalid_signature", "stale_request", "unknown_action"}


def collect(strategy: st.SearchStrategy, n: int) -> list:
    """Draw n examples with a synchronous @given (generation only: nothing to shrink)."""
    examples: list = []

    @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def draw(example):
        examples.append(example)

    draw()
    return examples


@dataclass
class Members:
    alice: Client
    bob: Client
    session: str


@pytest.fixture
async def members(make_client) -> Members:
    alice = await make_client("fuzz-a")
    bob = await make_client("fuzz-b")
    session = (await alice.establish_session(bob.handle)).session_id
    await alice.rotate_session_key(session, bob.handle)
    return Members(alice, bob, session)


def stack_strings(m: Members) -> st.SearchStrategy[str]:
    """Fuzzed text, often a value the services know: real handles, keys, the session id."""
    known = [
        m.alice.handle, m.bob.handle, m.alice.identity.address, m.bob.identity.address, m.alice.identity.box_public,
        m.bob.identity.box_public, m.session, m.alice.handle.upper(), m.bob.handle + " ", "nobody-" + secrets.token_hex(4),
    ]
    return st.one_of(
        texts(nul=False),
        st.sampled_from(known),
        st.from_regex(r"[a-z0-9_-]{3,32}", fullmatch=True),
        st.sampled_from([32, 40, 80]).flatmap(lambda n: st.binary(min_size=n, max_size=n)).map(b64encode),
    )


def near_valid_data(m: Members, name: str, action: Action) -> st.SearchStrategy[str]:
    """Data a real client could send, or the same with one field's value fuzzed: these get
    past decoding into the handlers' semantic checks and the database (taken and unknown
    handles, a session with oneself, wrong box keys, unknown generations, cursors...)."""
    a, b = m.alice, m.bob
    strings = stack_strings(m)
    handles = st.one_of(
        st.sampled_from([a.handle, b.handle, a.handle.upper(), "ab", "a" * 33]),
        st.from_regex(r"[a-z0-9_-]{3,32}", fullmatch=True),
    )
    b64 = lambda lo, hi: st.binary(min_size=lo, max_size=hi).map(b64encode)  # noqa: E731
    entry = lambda h, box: st.fixed_dictionaries(  # noqa: E731
        {"Handle": st.just(h), "BoxKey": st.one_of(st.just(box), b64(32, 32)), "SealedKey": st.one_of(b64(80, 80), b64(0, 100))}
    )
    entries = st.lists(
        st.one_of(entry(a.handle, a.identity.box_public), entry(b.handle, b.identity.box_public)), min_size=0, max_size=3
    )
    exact = st.permutations([
        {"Handle": h, "BoxKey": c.identity.box_public, "SealedKey": b64encode(secrets.token_bytes(80))}
        for h, c in ((a.handle, a), (b.handle, b))
    ])
    valid = {
        "Register": st.fixed_dictionaries({"Handle": handles, "BoxKey": st.one_of(st.just(a.identity.box_public), b64(32, 32))}),
        "QueryHandle": st.fixed_dictionaries({"Handle": handles}),
        "GetHandles": st.fixed_dictionaries({"Owner": st.one_of(st.sampled_from([a.identity.address, b.identity.address]), b64(31, 33))}),
        "QuerySession": st.fixed_dictionaries({"HandleA": handles, "HandleB": handles}),
        "EstablishSession": st.fixed_dictionaries({"Handle": handles}),
        "GetChatList": st.just({}),
        "IssueBrokerCredentials": st.just({}),
        "AddDevice": st.fixed_dictionaries({
            "Device": st.fixed_dictionaries({"SignKey": st.one_of(st.just(b.identity.address), b64(32, 32))},
                                            optional={"BoxKey": st.one_of(st.none(), b64(32, 32)),
                                                      "Kind": st.sampled_from(["device", "recovery"])}),
            "Proof": st.one_of(b64(64, 64), strings), "Prev": st.one_of(b64(32, 32), strings)}),
        "RemoveDevice": st.fixed_dictionaries({
            "DeviceId": st.one_of(st.from_regex(r"[0-9a-f]{16}", fullmatch=True), strings),
            "Prev": st.one_of(b64(32, 32), strings)}),
        "GetDeviceLog": st.fixed_dictionaries({"Handle": handles}, optional={"After": st.integers(-1, 3)}),
        "RotateSessionKey": st.fixed_dictionaries({"Keys": st.one_of(entries, exact, exact)}),
        "ShareKeys": st.fixed_dictionaries({"Generation": st.integers(0, 3), "Keys": st.one_of(entries, exact)}),
        "GetCurrentKey": st.just({}),
        "Accept": st.just({}),
        "Block": st.just({}),
        "Unblock": st.just({}),
        "GetKeyByGeneration": st.fixed_dictionaries({"Generation": st.integers(1, 4)}),
        "SendMessage": st.fixed_dictionaries(
            {"Content": st.one_of(b64(40, 200), b64(0, 45))}, optional={"Generation": st.one_of(st.none(), st.integers(1, 4))}
        ),
        "QueryMessage": st.fixed_dictionaries({}, optional={
            "From": st.one_of(st.none(), st.integers(0, 2**53), st.just(envelope.now_ms())),
            "Until": st.one_of(st.none(), st.integers(0, 2**53), st.just(envelope.now_ms())),
            "Limit": st.one_of(st.integers(1, 3), st.sampled_from([0, -1, 500, 501])),
            "Order": st.sampled_from(["asc", "desc"]),
            "Cursor": st.one_of(st.none(), st.from_regex(r"[ad]?[0-9]{1,20}\.[0-9]{1,20}", fullmatch=True), strings),
        }),
    }[name]
    fields = {f.encode_name: f for f in msgspec.structs.fields(action.request)}

    @st.composite
    def one_fuzzed(draw) -> dict:
        obj = dict(draw(valid))
        if fields:
            key = draw(st.sampled_from(sorted(fields)))
            obj[key] = draw(st.one_of(
                typed_values(msgspec.inspect.type_info(fields[key].type), strings, False),
                json_values(nul=False, leaves=4),
            ))
        return obj

    return st.builds(dumps, st.one_of(valid, valid, one_fuzzed()), st.booleans())


async def send(m: Members, service: str, name: str, action: Action, data: str) -> tuple[bytes, Envelope, Ok | Err]:
    target = REGISTRY_TARGET if service == "registry" else m.session
    env = envelope.sign(
        m.alice.identity.signing_key,
        target=target,
        from_=m.alice.handle if action.needs_handle else None,
        action=name,
        data=data,
        anchor=b64encode(secrets.token_bytes(16)),
    )
    raw = envelope.encode(env)
    return raw, env, reply_decoder.decode(await m.alice.bus.call(topology.REQUESTS, target, raw, timeout=REPLY_TIMEOUT))


def judge(name: str, raw: bytes, env: Envelope, reply: Ok | Err) -> str | None:
    """None if the reply is acceptable, else why not."""
    try:
        envelope.decode(raw)
    except AodmError as exc:  # refused before verification (the Data text looks like a NUL): no Id to echo
        if isinstance(reply, Err) and reply.code == exc.code and reply.request_id == "":
            return None
        return f"expected a {exc.code} without Id, got {reply!r}"
    if reply.request_id != env.id:
        return f"reply for {reply.request_id!r}, not {env.id!r}"
    if isinstance(reply, Ok):
        try:
            msgspec.json.decode(reply.result, type=RESULT_TYPES[name])
        except msgspec.DecodeError as exc:
            return f"Ok result does not decode as {RESULT_TYPES[name].__name__}: {exc}"
        return None
    if reply.code not in ERROR_CODES or reply.code in NEVER:
        return f"Err {reply.code}: {reply.message}"
    return None


async def answer_all(cases: list, one) -> tuple[list[tuple[Any, Any]], dict[str, int]]:
    """Send every case (CONCURRENCY at a time, so requests also share batches); returns
    (case, (raw, env, reply) or the exception) pairs and a count of reply codes."""
    results, codes = [], {}
    for start in range(0, len(cases), CONCURRENCY):
        chunk = cases[start : start + CONCURRENCY]
        for case, result in zip(chunk, await asyncio.gather(*(one(c) for c in chunk), return_exceptions=True), strict=True):
            results.append((case, result))
            if not isinstance(result, BaseException):
                reply = result[2]
                code = "ok" if isinstance(reply, Ok) else reply.code
                codes[code] = codes.get(code, 0) + 1
    return results, codes


async def still_works(m: Members, service: str) -> None:
    if service == "registry":
        assert (await m.alice.query_handle(m.bob.handle)).box_key == m.bob.identity.box_public
    else:
        assert (await m.bob.get_current_key(m.session)).generation >= 1
        await m.bob.query_messages(m.session, limit=1)


@pytest.mark.parametrize(("service", "name", "action"), ALL_ACTIONS, ids=ACTION_IDS)
async def test_stack_answers_fuzzed_data_with_typed_replies(members, service, name, action):
    m = members
    strings = stack_strings(m)
    datas_ = collect(fuzzed_data(action.request, strings, nul=False), STACK_EXAMPLES)
    # plus Data of the declared types built from known values, and near-valid Data: these
    # get past decoding into the handlers' own checks and the database
    datas_ += collect(st.builds(dumps, struct_objects(action.request, strings, nul=False, valid=True), st.booleans()), STACK_EXAMPLES // 2)
    datas_ += collect(near_valid_data(m, name, action), STACK_EXAMPLES)
    datas_ = [d for d in datas_ if len(d.encode()) <= MAX_DATA_BYTES]

    results, codes = await answer_all(datas_, lambda data: send(m, service, name, action, data))
    failures = []
    for data, result in results:
        problem = f"no typed reply ({result!r})" if isinstance(result, BaseException) else judge(name, *result)
        if problem:
            failures.append(f"Data={data!r}: {problem}")
    print(f"{service} {name}: {codes}")  # coverage of outcomes, shown with -s
    assert not failures, f"{name}: {len(failures)} bad replies (codes seen: {codes}):\n" + "\n".join(failures[:20])
    await still_works(m, service)


def valid_data(m: Members) -> dict[str, dict]:
    """A Data each action accepts from alice (as a real client would send it)."""
    a, b = m.alice, m.bob
    return {
        "Register": {"Handle": f"fuzz-{secrets.token_hex(6)}", "BoxKey": a.identity.box_public},
        "QueryHandle": {"Handle": b.handle},
        "GetHandles": {"Owner": a.identity.address},
        "QuerySession": {"HandleA": a.handle, "HandleB": b.handle},
        "EstablishSession": {"Handle": b.handle},
        "RotateSessionKey": {"Keys": [
            {"Handle": h, "BoxKey": c.identity.box_public, "SealedKey": b64encode(secrets.token_bytes(80))}
            for h, c in sorted(((a.handle, a), (b.handle, b)))
        ]},
        "GetKeyByGeneration": {"Generation": 1},
        "SendMessage": {"Content": b64encode(secrets.token_bytes(48))},
    }


@pytest.mark.parametrize("service", ["registry", "session"])
async def test_stack_answers_fuzzed_envelope_fields(members, service):
    """Validly signed envelopes whose other fields are fuzzed: From (any text up to the cap,
    handles of others, the bare address), Anchor, Action, extra tags and Timestamp, and for
    sessions the Target (= routing key: unknown sessions, other services' routing keys)."""
    m = members
    actions = REGISTRY_ACTIONS if service == "registry" else SESSION_ACTIONS
    target = REGISTRY_TARGET if service == "registry" else m.session
    targets = st.just(target) if service == "registry" else st.one_of(
        st.just(target),
        st.just(target),
        st.text(CHARS_NO_NUL, max_size=MAX_ID_FIELD).filter(lambda t: len(t.encode()) <= 255),  # AMQP shortstr
        st.sampled_from(["", REGISTRY_TARGET, "registry.activity", "notifier.events", m.alice.handle, target[:-1] + "A"]),
    )
    now = envelope.now_ms()
    id_text = st.one_of(
        st.text(CHARS_NO_NUL, max_size=MAX_ID_FIELD),
        st.sampled_from([m.alice.handle, m.bob.handle, m.alice.identity.address, m.bob.identity.address, "", m.alice.handle.upper()]),
    )
    cases = collect(
        st.fixed_dictionaries({
            "target": targets,
            "from_": id_text,
            "anchor": st.text(CHARS_NO_NUL, max_size=MAX_ID_FIELD),
            "action": st.one_of(
                st.sampled_from(sorted(actions)),
                st.sampled_from(sorted(actions)),
                st.sampled_from(sorted(REGISTRY_ACTIONS) + sorted(SESSION_ACTIONS)),
                st.text(CHARS_NO_NUL, max_size=20),
            ),
            "timestamp": st.one_of(st.just(now), st.integers(now - 20 * 60_000, now + 5 * 60_000), st.integers(-(2**63), 2**64 - 1)),
            "extra_tags": st.one_of(st.just([]), st.lists(
                st.builds(Tag, st.text(CHARS_NO_NUL, max_size=MAX_TAG_NAME), st.text(CHARS_NO_NUL, max_size=MAX_TAG_VALUE))
                | st.just(Tag("Action", "QueryMessage")),
                max_size=3,
            )),
        }),
        STACK_EXAMPLES,
    )

    valid = valid_data(m)

    async def one(case: dict) -> tuple[bytes, Envelope, Ok | Err]:
        data = dumps(valid.get(case["action"], {}), False)
        env = envelope.sign(m.alice.identity.signing_key, data=data, **case)
        raw = envelope.encode(env)
        return raw, env, reply_decoder.decode(await m.alice.bus.call(topology.REQUESTS, env.target, raw, timeout=REPLY_TIMEOUT))

    results, codes = await answer_all(cases, one)
    failures = []
    for case, result in results:
        if isinstance(result, BaseException):
            failures.append(f"{case!r}: no typed reply ({result!r})")
            continue
        _, env, reply = result
        if isinstance(reply, Err) and (reply.code not in ERROR_CODES or reply.code in ("internal", "invalid_signature")):
            failures.append(f"{case!r}: Err {reply.code}: {reply.message}")
        elif reply.request_id != env.id:
            failures.append(f"{case!r}: reply for another request {reply.request_id!r}")
    print(f"{service} envelope fields: {codes}")
    assert not failures, f"{len(failures)} bad replies (codes seen: {codes}):\n" + "\n".join(failures[:20])
    await still_works(m, service)
