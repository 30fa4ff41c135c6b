"""Notifications delivered to a handle's own durable queue, and the events that carry them
from the services to the notifier.

Every notification has an `Id` derived from the request that caused it, so a redelivered
request yields the same Id and a client drops duplicates by it.
"""

import hashlib

import msgspec

from aodm.encoding import b64encode

__all__ = [
    "Notification",
    "SessionEstablished",
    "KeyRotated",
    "NewMessage",
    "RequestFailed",
    "DevicesChanged",
    "AnyNotification",
    "Fanout",
    "HandleRegistered",
    "NotifierEvent",
    "notification_decoder",
    "event_decoder",
    "notification_id",
]


class Notification(msgspec.Struct, tag_field="Kind", rename="pascal"):
    id: str
    handle: str  # the recipient
    at: int


class SessionEstablished(Notification, tag=True):
    session_id: str
    peer: str
    # "incoming": a message request to the recipient (its one notification for the
    # request); "outgoing": the recipient opened it. Absent from servers before 12-07.
    state: str = "accepted"


class KeyRotated(Notification, tag=True):
    session_id: str
    generation: int
    rotated_by: str


class NewMessage(Notification, tag=True):
    session_id: str
    message_id: str
    seq: int
    sender: str
    generation: int
    timestamp: int
    content: str


class RequestFailed(Notification, tag=True):
    """A request that had no reply address failed; this is its error."""

    request_id: str
    action: str
    code: str
    message: str


class DevicesChanged(Notification, tag=True):
    """`subject`'s device log got entry `seq`: `device_id` was added or removed. Sent to the
    subject's devices and to every handle it has a session with (verify the log before
    sealing keys to the new set: GetDeviceLog, aodm.devices.verify_log)."""

    subject: str
    seq: int
    change: str  # "added" or "removed"
    device_id: str


AnyNotification = SessionEstablished | KeyRotated | NewMessage | RequestFailed | DevicesChanged


class Fanout(msgspec.Struct, tag=True, tag_field="Event", rename="pascal"):
    notifications: list[AnyNotification]


class HandleRegistered(msgspec.Struct, tag=True, tag_field="Event", rename="pascal"):
    handle: str


NotifierEvent = Fanout | HandleRegistered

notification_decoder = msgspec.json.Decoder(AnyNotification)
event_decoder = msgspec.json.Decoder(NotifierEvent)


def notification_id(request_id: str, kind: str, handle: str) -> str:
    return b64encode(hashlib.sha256(f"{request_id}\n{kind}\n{handle}".encode()).digest())
