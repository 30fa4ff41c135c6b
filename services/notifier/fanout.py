"""The notifier keeps one durable queue per handle, `aodm.inbox.<handle>`.

The services publish notifications straight into them through the inbox exchange
(shared/effects.py), so an offline handle finds them when it comes back. The notifier
declares a handle's queue when the handle registers (HandleRegistered), and delivers what
found its queue missing (a Fanout event: the queue is not created yet, or an operator
deleted it): it declares the queue again and publishes there, so nothing addressed to a
registered handle is dropped."""

import asyncio

import msgspec

from shared import effects, metrics, topology
from shared.logs import log
from shared.notifications import AnyNotification, Fanout, HandleRegistered, NotifierEvent, event_decoder
from shared.transport import Bus, Delivery, Unroutable, settle_when_confirmed


async def _deliver(bus: Bus, notes: list[AnyNotification]) -> None:
    """Into each handle's queue; one found missing is declared again and published again."""
    missing = await bus.publish_all([effects.notification(note) for note in notes])
    for message in missing:
        await topology.declare_inbox(bus, message.routing_key)
    if still := await bus.publish_all(missing):  # only if deleted again at once: a bug or an operator
        raise Unroutable(", ".join(f"{m.exchange}/{m.routing_key}" for m in still))
    for note in notes:
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
        notes: list[AnyNotification] = []
        for delivery in deliveries:
            match _accepted(self._bus, delivery):
                case HandleRegistered(handle=handle):
                    await topology.declare_inbox(self._bus, handle)  # before anything is delivered to it
                    log.info("handled", service="notifier", kind="HandleRegistered", handle=handle)
                case Fanout(notifications=batch):
                    notes += batch
                    log.info(
                        "handled", service="notifier", kind="Fanout", kinds=[type(n).__name__ for n in batch],
                        ids=[n.id for n in batch], redelivered=delivery.redelivered, batch=len(deliveries),
                    )
        publishing = asyncio.ensure_future(_deliver(self._bus, notes))
        self._settled = asyncio.ensure_future(settle_when_confirmed(deliveries, [publishing], self._settled))
        return self._settled
