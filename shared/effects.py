"""Outgoing effects: messages a request publishes once its transaction has committed.

A request's effects stay objects until its batch is published: `merge` turns a batch into
its publishes (each notification straight into its handle's queue) and encodes each
message once. They are stored with the request's reply as
MessagePack, so a redelivery can publish them again."""

from typing import Any

import msgspec

from aodm import topology
from aodm.notifications import AnyNotification, Fanout, notification_decoder
from aodm.transport import Message


class Outgoing(msgspec.Struct, array_like=True):
    exchange: str
    routing_key: str
    body: bytes


class Effects(msgspec.Struct, array_like=True):
    messages: list[Outgoing] = []  # published as they are, before the rest, in order
    notifications: list[AnyNotification] = []  # for the notifier, in order
    # Activity reports, stored by versions before the session's ActivityFeed took them over:
    # read (stored effects are positional) and never published again.
    legacy_activity: list[Any] = []

    def __bool__(self) -> bool:
        return bool(self.messages or self.notifications)


NONE = Effects()

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


def notification(note: AnyNotification) -> Message:
    """Through the inbox exchange into `aodm.inbox.<handle>`: RabbitMQ does the fan-out to
    the handle's durable queue, which the notifier created when the handle registered. Its
    message_id is the notification's Id, by which clients drop duplicates."""
    return Message(topology.INBOX, note.handle, _encoder.encode(note), message_id=note.id)


def for_the_notifier(undeliverable: Message) -> Message:
    """A notification its handle's queue was not there for (not created yet, or deleted by
    an operator): the notifier creates the queue and delivers it."""
    note = notification_decoder.decode(undeliverable.body)
    return Message(topology.INTERNAL, topology.NOTIFIER_ROUTING_KEY, _encoder.encode(Fanout([note])))


def merge(batch: list[Effects]) -> list[Message]:
    """The batch's publishes in order: the plain messages first (a Spawn or a
    HandleRegistered must precede notifications about it), then the notifications."""
    merged = [Message(m.exchange, m.routing_key, m.body) for effects in batch for m in effects.messages]
    merged += [notification(note) for effects in batch for note in effects.notifications]
    return merged
