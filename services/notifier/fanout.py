"""The notifier keeps one durable queue per handle, `aodm.inbox.<handle>`.

The services publish notifications straight into them through the inbox exchange
(shared/effects.py), so an offline handle finds them when it comes back. The notifier
declares a handle's queue when the handle registers (HandleRegistered), and delivers what
found its queue missing (a Fanout event: the queue is not created yet, or an operator
deleted it): it declares the queue again and publishes there, so nothing addressed to a
registered handle is dropped."""

import asyncio

import msgspec

from shared import metrics, topology
from shared.logs import log
from shared.notifications import AnyNotification, Fanout, HandleRegistered, NotifierEvent, event_decoder
from shared.transport import Bus, Delivery, Unroutable, settle_when_confirmed

_encoder = msgspec.json.Encoder()


async def _publish(bus: Bus, note: AnyNotification) -> None:
    body = _encoder.encode(note)
    try:
        await bus.publish(topology.INBOX, note.handle, body, message_id=note.id)
    except Unroutable:
        await topology.declare_inbox(bus, note.handle)
        await bus.publish(topology.INBOX, note.handle, body, message_id=note.id)
    metrics.inc("aodm_notifications_total", kind=type(note).__name__, service="notifier")


def _accepted(bus: Bus, delivery: Delivery) -> NotifierEvent | None:
    """Events count only when the broker vouches (user_id) that the services' user sent them."""
    if delivery.user_id != bus.user:
        log.warning("notifier event from another broker user dropped", user_id=delivery.user_id)
        return None
    try:
        return event_decoder.decode(delivery.body)
    except msgspec.DecodeError as exc:
        log.warning("bad notifier event dropped", error=str(exc))
        return None


class Notifier:
    """The notifier's handler. A batch's notifications are published together, and its
    acknowledgement waits for their confirms; the next batch is published meanwhile, and
    acknowledged after this one. At-least-once: a broker fault hands the events back, and
    republished notifications keep their ids."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._settled: asyncio.Future[None] | None = None  # the latest batch's acknowledgement

    async def on_events(self, deliveries: list[Delivery]) -> "asyncio.Future[None]":
        publishing: list[asyncio.Future] = []
        for delivery in deliveries:
            match _accepted(self._bus, delivery):
                case HandleRegistered(handle=handle):
                    await topology.declare_inbox(self._bus, handle)  # before any later notification for it
                    log.info("handled", service="notifier", kind="HandleRegistered", handle=handle)
                case Fanout(notifications=notes):
                    publishing += [asyncio.ensure_future(_publish(self._bus, note)) for note in notes]
                    log.info(
                        "handled", service="notifier", kind="Fanout", kinds=[type(n).__name__ for n in notes],
                        ids=[n.id for n in notes], redelivered=delivery.redelivered, batch=len(deliveries),
                    )
        self._settled = asyncio.ensure_future(settle_when_confirmed(deliveries, publishing, self._settled))
        return self._settled
