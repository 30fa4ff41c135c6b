"""Wire types of the DM session's actions: `Data` of each request and its result."""

from typing import Annotated, Literal

import msgspec

__all__ = [
    "DeviceKeysOf",
    "DevicesOf",
    "MAX_GENERATION",
    "DEFAULT_PAGE",
    "MAX_PAGE",
    "MAX_PAGE_BYTES",
    "SEALED_KEY_BYTES",
    "Generation",
    "Millis",
    "Order",
    "Request",
    "SealedKey",
    "RotateSessionKey",
    "ShareKeys",
    "GetCurrentKey",
    "GetKeyByGeneration",
    "SendMessage",
    "QueryMessage",
    "Accept",
    "Block",
    "Unblock",
    "ConsentState",
    "consent_state",
    "Consent",
    "KeyBatch",
    "Rotated",
    "Shared",
    "Sent",
    "StoredMessage",
    "MessagePage",
    "Member",
    "Spawn",
]

MAX_GENERATION = 2**31 - 1
DEFAULT_PAGE = 50
MAX_PAGE = 500
# A page also ends once its messages' Content reaches this many bytes (it always holds one):
# a reply stays under about 0.8 MB, whatever the Limit, and NextCursor goes on from there.
MAX_PAGE_BYTES = 512 * 1024
SEALED_KEY_BYTES = 32 + 48  # a 32-byte SecretBox key in a SealedBox (ephemeral pk + MAC)

Generation = Annotated[int, msgspec.Meta(ge=1, le=MAX_GENERATION)]
Millis = Annotated[int, msgspec.Meta(ge=0, le=2**53)]
Order = Literal["asc", "desc"]


class Request(msgspec.Struct, forbid_unknown_fields=True, rename="pascal"):
    pass


class SealedKey(msgspec.Struct, forbid_unknown_fields=True, rename="pascal"):
    handle: str
    box_key: str
    sealed_key: str


class RotateSessionKey(Request):
    keys: list[SealedKey]


class ShareKeys(Request):
    """Give your own other devices the key of an older generation you can read (a device
    added after it was sealed): one entry per device, each sealed to its box key."""

    generation: Generation
    keys: list[SealedKey]


class GetCurrentKey(Request):
    pass


class GetKeyByGeneration(Request):
    generation: Generation


class SendMessage(Request):
    content: str
    generation: Generation | None = None


class QueryMessage(Request):
    from_: Millis | None = msgspec.field(default=None, name="From")
    until: Millis | None = None
    limit: int = DEFAULT_PAGE
    order: Order = "asc"
    cursor: str | None = None


class Accept(Request):
    """Accept the peer's message request (or lift your own block)."""


class Block(Request):
    """Refuse the peer's messages from now on."""


class Unblock(Request):
    """Lift your block: the session is accepted again."""


# A session's consent as one member sees it (the chat list's State, the Consent reply):
ConsentState = Literal["accepted", "incoming", "outgoing", "blocked"]


def consent_state(viewer: str, pending_for: str | None, blocked_by: list[str]) -> ConsentState:
    """`incoming`: a request to the viewer; `outgoing`: the viewer's request, not accepted
    yet, or the peer blocked it (the two look the same to the viewer, on purpose);
    `blocked`: the viewer blocked the peer."""
    if viewer in blocked_by:
        return "blocked"
    if blocked_by or (pending_for is not None and pending_for != viewer):
        return "outgoing"
    return "incoming" if pending_for == viewer else "accepted"


class Consent(msgspec.Struct, rename="pascal"):
    state: ConsentState


class KeyBatch(msgspec.Struct, rename="pascal"):
    generation: int
    rotated_by: str
    created_at: int
    keys: list[SealedKey]


class Rotated(msgspec.Struct, rename="pascal"):
    generation: int


class Shared(msgspec.Struct, rename="pascal"):
    """ShareKeys' result: how many of its keys the batch did not hold yet."""

    generation: int
    added: int


class Sent(msgspec.Struct, rename="pascal"):
    message_id: str
    seq: int
    timestamp: int
    generation: int


class StoredMessage(msgspec.Struct, rename="pascal"):
    message_id: str
    seq: int
    sender: str
    sender_key: str
    generation: int
    timestamp: int
    content: str


class MessagePage(msgspec.Struct, rename="pascal"):
    messages: list[StoredMessage]
    next_cursor: str | None


class Member(msgspec.Struct, rename="pascal"):
    handle: str
    sign_key: str
    box_key: str


class DeviceKeysOf(msgspec.Struct, rename="pascal"):
    sign_key: str
    box_key: str


class DevicesOf(msgspec.Struct, rename="pascal"):
    """Internal, registry → session workers: `handle`'s devices (not its recovery keys) as
    its device log stands after entry `seq`; an older `seq` never replaces a newer one."""

    handle: str
    seq: int
    devices: list[DeviceKeysOf]


class Spawn(msgspec.Struct, rename="pascal"):
    """Internal, registry → session worker: create the session process with its two members."""

    session_id: str
    members: list[Member]
    # The member that opened it: the session is a message request to the other until it
    # accepts. None (a registry of an earlier version): accepted from the start.
    opened_by: str | None = None
