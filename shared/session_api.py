"""Wire types of the DM session's actions: `Data` of each request and its result."""

from typing import Annotated, Literal

import msgspec

MAX_GENERATION = 2**31 - 1
DEFAULT_PAGE = 50
MAX_PAGE = 500
# A page also ends once its messages' Content reaches this many bytes (it always holds one):
# a reply stays under about 0.8 MB, whatever the Limit, and NextCursor goes on from there.
MAX_PAGE_BYTES = 512 * 1024
SEALED_KEY_BYTES = 32 + 48  # a 32-byte SecretBox key in a SealedBox (ephemeral pk + MAC)

Generation = Annotated[int, msgspec.Meta(ge=1, le=MAX_GENERATION)]
Millis = Annotated[int, msgspec.Meta(ge=0, le=2**53)]


class Request(msgspec.Struct, forbid_unknown_fields=True, rename="pascal"):
    pass


class SealedKey(msgspec.Struct, forbid_unknown_fields=True, rename="pascal"):
    handle: str
    box_key: str
    sealed_key: str


class RotateSessionKey(Request):
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
    order: Literal["asc", "desc"] = "asc"
    cursor: str | None = None


class KeyBatch(msgspec.Struct, rename="pascal"):
    generation: int
    rotated_by: str
    created_at: int
    keys: list[SealedKey]


class Rotated(msgspec.Struct, rename="pascal"):
    generation: int


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


class Spawn(msgspec.Struct, rename="pascal"):
    """Internal, registry → session worker: create the session process with its two members."""

    session_id: str
    members: list[Member]
