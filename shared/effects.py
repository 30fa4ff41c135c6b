"""Outgoing effects: messages a request publishes once its transaction has committed.

A request's effects stay objects until its batch is published: `merge` folds a batch into
few publishes (one ordered Fanout for the notifier, one activity report for the registry)
and encodes each message once. They are stored with the request's claim as MessagePack,
so a redelivery can publish them again."""

import msgspec

from shared import topology
from shared.notifications import AnyNotification, Fanout
from shared.registry_api import Activity, ActivityReport


class Outgoing(msgspec.Struct, array_like=True):
    exchange: str
    routing_key: str
    body: bytes


class Effects(msgspec.Struct, array_like=True):
    messages: list[Outgoing] = []  # published as they are, before the rest, in order
    notifications: list[AnyNotification] = []  # for the notifier, in order
    activity: list[Activity] = []  # for the registry's chat lists

    def __bool__(self) -> bool:
        return bool(self.messages or self.notifications or self.activity)


NONE = Effects()
MAX_FANOUT = 256

_encoder = msgspec.json.Encoder()
_packer = msgspec.msgpack.Encoder()
_unpacker = msgspec.msgpack.Decoder(Effects)
_legacy = msgspec.json.Decoder(list[Outgoing])  # stored by versions before MessagePack


def encode(effects: Effects) -> bytes:
    return _packer.encode(effects)


def decode(stored: bytes) -> Effects:
    if stored[:1] == b"[":  # a JSON array: stored by an older version, within the retention
        return Effects(messages=_legacy.decode(stored))
    return _unpacker.decode(stored)


def merge(batch: list[Effects], *, activity: bool = True) -> list[Outgoing]:
    """Same messages, fewer publishes: the plain messages first in their order (a Spawn or a
    HandleRegistered must precede notifications about it), then the notifications in their
    order, then (unless `activity` is False) one report of the latest activity per session."""
    merged = [message for effects in batch for message in effects.messages]
    notifications = [note for effects in batch for note in effects.notifications]
    for start in range(0, len(notifications), MAX_FANOUT):
        chunk = Fanout(notifications[start : start + MAX_FANOUT])
        merged.append(Outgoing(topology.INTERNAL, topology.NOTIFIER_ROUTING_KEY, _encoder.encode(chunk)))
    latest: dict[str, int] = {}
    for effects in batch if activity else []:
        for seen in effects.activity:
            latest[seen.session_id] = max(latest.get(seen.session_id, 0), seen.at)
    if latest:
        report = ActivityReport([Activity(session_id, at) for session_id, at in latest.items()])
        merged.append(Outgoing(topology.INTERNAL, topology.ACTIVITY_ROUTING_KEY, _encoder.encode(report)))
    return merged
