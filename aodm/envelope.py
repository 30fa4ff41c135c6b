"""The AO-style request envelope: its wire form, canonical signing bytes, signing and checks.

The signing bytes are defined byte for byte in docs/protocol.md so that any language can
produce them; nothing here depends on how Python serialises an object.
"""

import hashlib
import struct
import time
from typing import TypedDict

import msgspec
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from aodm import strict_json
from aodm.encoding import b64decode, b64encode
from aodm.errors import InvalidSignature, MalformedRequest, PayloadTooLarge, StaleRequest

__all__ = [
    "SIGNING_DOMAIN",
    "MAX_BODY_BYTES",
    "MAX_DATA_BYTES",
    "MAX_TAGS",
    "MAX_TAG_NAME",
    "MAX_TAG_VALUE",
    "MAX_ID_FIELD",
    "MAX_AGE_MS",
    "MAX_FUTURE_MS",
    "Tag",
    "Envelope",
    "signing_bytes",
    "envelope_signing_bytes",
    "id_from_signature",
    "address_of",
    "now_ms",
    "sign",
    "encode",
    "decode",
    "verify",
    "check_fresh",
]

SIGNING_DOMAIN = b"aodm-envelope-v1"
MAX_BODY_BYTES = 96 * 1024
MAX_DATA_BYTES = 64 * 1024
MAX_TAGS = 16
MAX_TAG_NAME = 64
MAX_TAG_VALUE = 256
MAX_ID_FIELD = 64  # Target, From, Anchor
MAX_AGE_MS = 15 * 60 * 1000
MAX_FUTURE_MS = 2 * 60 * 1000


class Tag(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    value: str


class Envelope(msgspec.Struct, forbid_unknown_fields=True, rename="pascal"):
    """A signed request. `owner` is the signer's Ed25519 key; `from_` the handle it acts as
    (or the owner address itself, for actions that need no handle)."""

    id: str
    target: str
    from_: str = msgspec.field(name="From")
    owner: str
    anchor: str
    timestamp: int
    tags: list[Tag]
    data: str
    signature: str

    def tag(self, name: str) -> str | None:
        values = [t.value for t in self.tags if t.name == name]
        if len(values) > 1:
            raise MalformedRequest(f"tag {name!r} appears more than once")
        return values[0] if values else None

    @property
    def action(self) -> str:
        action = self.tag("Action")
        if action is None:
            raise MalformedRequest("missing tag 'Action'")
        return action


_decoder = msgspec.json.Decoder(Envelope)
_encoder = msgspec.json.Encoder()


def _field(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def signing_bytes(
    *, target: str, from_: str, owner: str, anchor: str, timestamp: int, tags: list[Tag], data: str
) -> bytes:
    """Domain ‖ u32be-length-prefixed fields, in this order, tags as a count then pairs."""
    parts = [SIGNING_DOMAIN]
    for text in (target, from_, owner, anchor, str(timestamp)):
        parts.append(_field(text.encode()))
    parts.append(struct.pack(">I", len(tags)))
    for tag in tags:
        parts.append(_field(tag.name.encode()))
        parts.append(_field(tag.value.encode()))
    parts.append(_field(data.encode()))
    return b"".join(parts)


def envelope_signing_bytes(env: Envelope) -> bytes:
    return signing_bytes(
        target=env.target,
        from_=env.from_,
        owner=env.owner,
        anchor=env.anchor,
        timestamp=env.timestamp,
        tags=env.tags,
        data=env.data,
    )


def id_from_signature(signature: bytes) -> str:
    """As in ANS-104: the id is the SHA-256 of the raw signature."""
    return b64encode(hashlib.sha256(signature).digest())


def address_of(verify_key: bytes) -> str:
    """A signer's address is its raw Ed25519 public key in base64url."""
    return b64encode(verify_key)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class _SignedFields(TypedDict):
    """The fields the signature covers (the keyword arguments of `signing_bytes`)."""

    target: str
    from_: str
    owner: str
    anchor: str
    timestamp: int
    tags: list[Tag]
    data: str


def sign(
    signing_key: SigningKey,
    *,
    target: str,
    from_: str | None,
    action: str,
    data: str,
    anchor: str = "",
    timestamp: int | None = None,
    extra_tags: list[Tag] | None = None,
) -> Envelope:
    """An envelope signed by `signing_key`, acting as `from_` (None: the signer's own
    address), with `action` as its Action tag; `timestamp` defaults to now."""
    owner = address_of(bytes(signing_key.verify_key))
    tags = [Tag("Action", action), *(extra_tags or [])]
    fields = _SignedFields(
        target=target,
        from_=owner if from_ is None else from_,
        owner=owner,
        anchor=anchor,
        timestamp=now_ms() if timestamp is None else timestamp,
        tags=tags,
        data=data,
    )
    signature = signing_key.sign(signing_bytes(**fields)).signature
    return Envelope(id=id_from_signature(signature), signature=b64encode(signature), **fields)


def encode(env: Envelope) -> bytes:
    return _encoder.encode(env)


_ENVELOPE_KEYS = strict_json.top_level_keys(Envelope)
_TAG_KEYS = strict_json.top_level_keys(Tag)
_LITERALS = strict_json.RequiredKeys([*_ENVELOPE_KEYS, *_TAG_KEYS])


def _duplicates(body: bytes, tags: int) -> bool:
    """Each Tag holds its two keys, the envelope its nine: more literals than that, or an
    escape that could spell one, and the body is parsed again to be sure."""
    expected = len(_ENVELOPE_KEYS) + tags * len(_TAG_KEYS)
    return _LITERALS.may_hold_duplicates(body, expected) and bool(strict_json.duplicate_keys(body))


def decode(body: bytes) -> Envelope:
    """Parse and bound-check an envelope. Signature checks are `verify`'s job."""
    if len(body) > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"request body is {len(body)} bytes; the cap is {MAX_BODY_BYTES}")
    try:
        env = _decoder.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # bad UTF-8 inside a string is the latter
        raise MalformedRequest(f"envelope: {exc}") from exc
    if _duplicates(body, len(env.tags)):
        raise MalformedRequest(f"envelope: a key appears twice: {', '.join(strict_json.duplicate_keys(body))}")
    if len(env.data.encode()) > MAX_DATA_BYTES:
        raise PayloadTooLarge(f"Data is over the cap of {MAX_DATA_BYTES} bytes")
    if len(env.tags) > MAX_TAGS:
        raise PayloadTooLarge(f"{len(env.tags)} tags; the cap is {MAX_TAGS}")
    for tag in env.tags:
        if len(tag.name) > MAX_TAG_NAME or len(tag.value) > MAX_TAG_VALUE:
            raise PayloadTooLarge("a tag name or value is over its cap")
    # PostgreSQL text cannot hold NUL, and no field has a use for it: refuse it up front
    # (in Data also as the JSON escape a decoded field would turn into one).
    if any("\x00" in text for text in (env.target, env.from_, env.owner, env.anchor, env.data)) or "\\u0000" in env.data:
        raise MalformedRequest("NUL characters are not allowed")
    if any("\x00" in tag.name or "\x00" in tag.value for tag in env.tags):
        raise MalformedRequest("NUL characters are not allowed")
    for name in ("target", "from_", "anchor"):
        if len(getattr(env, name)) > MAX_ID_FIELD:
            raise MalformedRequest(f"{name.rstrip('_').capitalize()} is over {MAX_ID_FIELD} characters")
    return env


def verify(env: Envelope) -> bytes:
    """Check signature and Id; return the signer's raw public key."""
    owner = b64decode(env.owner, field="Owner", length=32)
    signature = b64decode(env.signature, field="Signature", length=64)
    try:
        VerifyKey(owner).verify(envelope_signing_bytes(env), signature)
    except BadSignatureError as exc:
        raise InvalidSignature("signature does not match the envelope and Owner") from exc
    if env.id != id_from_signature(signature):
        raise MalformedRequest("Id is not base64url(sha256(Signature))")
    return owner


def check_fresh(env: Envelope, *, now: int | None = None) -> None:
    """Refuse timestamps outside the window. Replays inside it are caught by the request-id
    claim, which is remembered for longer than the window is wide."""
    now = now_ms() if now is None else now
    if env.timestamp < now - MAX_AGE_MS or env.timestamp > now + MAX_FUTURE_MS:
        raise StaleRequest(
            f"Timestamp {env.timestamp} is outside [{now - MAX_AGE_MS}, {now + MAX_FUTURE_MS}]"
        )
