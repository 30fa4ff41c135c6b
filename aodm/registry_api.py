"""Wire types of the registry's actions: `Data` of each request and its result."""

import re
from typing import Annotated

import msgspec

from aodm.errors import InvalidArgument

__all__ = [
    "REGISTRY_TARGET",
    "HANDLE_PATTERN",
    "B64Key",
    "HandleName",
    "check_handle",
    "Request",
    "Register",
    "QueryHandle",
    "GetHandles",
    "QuerySession",
    "EstablishSession",
    "GetChatList",
    "IssueBrokerCredentials",
    "HandleInfo",
    "BrokerCredentials",
    "Registered",
    "HandleList",
    "SessionRef",
    "Established",
    "Chat",
    "ChatList",
    "Activity",
    "ConsentChange",
    "ActivityReport",
]

REGISTRY_TARGET = "registry"
HANDLE_PATTERN = re.compile(r"[a-z0-9_-]{3,32}")

# A 32-byte key in base64url. Its length and alphabet are checked by b64decode, so a key of
# the wrong size is malformed_request like any other bad encoding (not invalid_argument).
B64Key = str
HandleName = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


def check_handle(name: str) -> str:
    """Handles are ASCII only so that no two differ by a look-alike character."""
    if not HANDLE_PATTERN.fullmatch(name):
        raise InvalidArgument(f"handle {name!r} must match ^[a-z0-9_-]{{3,32}}$")
    return name


class Request(msgspec.Struct, forbid_unknown_fields=True, rename="pascal"):
    pass


class Register(Request):
    handle: HandleName
    box_key: B64Key


class QueryHandle(Request):
    handle: HandleName


class GetHandles(Request):
    owner: B64Key


class QuerySession(Request):
    handle_a: HandleName
    handle_b: HandleName


class EstablishSession(Request):
    handle: HandleName


class GetChatList(Request):
    pass


class IssueBrokerCredentials(Request):
    """A new password for the handle's own broker user (lost, or rotated)."""


class HandleInfo(msgspec.Struct, rename="pascal"):
    handle: str
    sign_key: str
    box_key: str
    created_at: int


class BrokerCredentials(msgspec.Struct, rename="pascal"):
    """The handle's own broker user and its password sealed (SealedBox, base64url) to the
    handle's box key; both null when the deployment issues no per-handle broker users."""

    broker_user: str | None = None
    sealed_broker_password: str | None = None


class Registered(msgspec.Struct, rename="pascal"):
    """Register's result: the HandleInfo fields plus the handle's broker credentials."""

    handle: str
    sign_key: str
    box_key: str
    created_at: int
    broker_user: str | None = None
    sealed_broker_password: str | None = None


class HandleList(msgspec.Struct, rename="pascal"):
    handles: list[HandleInfo]


class SessionRef(msgspec.Struct, rename="pascal"):
    session_id: str | None


class Established(msgspec.Struct, rename="pascal"):
    session_id: str
    created: bool


class Chat(msgspec.Struct, rename="pascal"):
    session_id: str
    peer: str
    created_at: int
    last_activity: int
    state: str = "accepted"  # as the caller sees it: session_api.consent_state


class ChatList(msgspec.Struct, rename="pascal"):
    chats: list[Chat]


class Activity(msgspec.Struct, rename="pascal"):
    """Internal, session worker → registry: keeps the chat list's last activity current."""

    session_id: str
    at: int


class ConsentChange(msgspec.Struct, rename="pascal"):
    """Internal, session worker → registry: a session's consent after its `version`-th change
    (the worker is its one writer; the registry keeps the highest version it has seen)."""

    session_id: str
    pending_for: str | None
    blocked_by: list[str]
    version: int


class ActivityReport(msgspec.Struct, rename="pascal"):
    """The latest activity of every session a batch touched, in one event; and consent changes."""

    sessions: list[Activity]
    consent: list[ConsentChange] = []
