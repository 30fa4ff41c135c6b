"""Wire types of the registry's actions: `Data` of each request and its result."""

import re
from typing import Annotated, Literal

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
    "DeviceKeys",
    "AddDevice",
    "RemoveDevice",
    "GetDeviceLog",
    "DeviceInfo",
    "DeviceChange",
    "LogEntry",
    "DeviceLogPage",
    "MAX_LOG_PAGE",
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


class DeviceKeys(msgspec.Struct, forbid_unknown_fields=True, rename="pascal"):
    """A device's public keys, or a recovery key's (a SignKey and no BoxKey)."""

    sign_key: B64Key
    box_key: B64Key | None = None
    kind: Literal["device", "recovery"] = "device"


class AddDevice(Request):
    """Signed by a current device (or a recovery key) of From: add `device`. `proof` is the
    new key's signature of its claim (aodm.devices.claim_bytes); `prev` the hash of the
    log's last entry (DeviceLogPage.head), so two changes made at once cannot both land."""

    device: DeviceKeys
    proof: str
    prev: str


class RemoveDevice(Request):
    """Signed by another current device (or a recovery key) of From: remove `device_id`."""

    device_id: str  # 16 hex digits (aodm.devices.device_id)
    prev: str


MAX_LOG_PAGE = 100


class GetDeviceLog(Request):
    """Any handle's device log, after entry `after` (0: from the first)."""

    handle: HandleName
    after: Annotated[int, msgspec.Meta(ge=0)] = 0


class DeviceInfo(msgspec.Struct, rename="pascal"):
    device_id: str
    kind: str
    sign_key: str
    box_key: str | None
    added_seq: int


class DeviceChange(msgspec.Struct, rename="pascal"):
    """AddDevice's and RemoveDevice's result: the log's new head."""

    device_id: str
    seq: int
    head: str


class LogEntry(msgspec.Struct, rename="pascal"):
    seq: int
    entry: str  # the entry's bytes as UTF-8 text (JSON): hash and replay it as it is


class DeviceLogPage(msgspec.Struct, rename="pascal"):
    """Up to MAX_LOG_PAGE entries after `after`; `seq` and `head` are the whole log's last
    entry and its hash, `devices` the devices current at `seq` (as the server sees them:
    verify_log tells a client the same without trusting it)."""

    handle: str
    entries: list[LogEntry]
    seq: int
    head: str
    devices: list[DeviceInfo]


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
