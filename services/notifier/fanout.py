"""Fan notifications out to one durable queue per handle.

A handle's queue is declared when the handle registers; should a notification still find
it missing (the queue was deleted by an operator), it is declared again and the
notification republished, so nothing addressed to a registered handle is dropped."""

import asyncio

import msgspec

from shared import metrics, topology
from shared.logs import log
from shared.notifications import AnyNotification, Fanout, HandleRegistered, event_decoder
from shared.transport import Bus, Delivery, Unroutable

metrics.describe("aodm_notifications_total", "counter", "Notifications published to handle queues, by kind.")

_encoder = msgspec.json.Encoder()


async def _publish(bus: Bus, note: AnyNotification) -> None:
    body = _encoder.encode(note)
    try:
        await bus.publish(topology.INBOX, note.handle, body, message_id=note.id)
    except Unroutable:
        await topology.declare_inbox(bus, note.handle)
        await bus.publish(topology.INBOX, note.handle, body, message_id=note.id)
    metrics.inc("aodm_notifications_total", kind=type(note).__name__)


async def on_event(bus: Bus, delivery: Delivery) -> None:
    """Ack only after every notification is confirmed by the broker: at-least-once.
    Events count only when the broker vouches (user_id) that the services' user sent them."""
    if delivery.user_id != bus.user:
        log.warning("notifier event from another broker user dropped", user_id=delivery.user_id)
        return await delivery.ack()
    try:
        event = event_decoder.decode(delivery.body)
    except msgspec.DecodeError as exc:
        log.warning("bad notifier event dropped", error=str(exc))
        return await delivery.ack()
    match event:
        case HandleRegistered(handle=handle):
            await topology.declare_inbox(bus, handle)
            log.info("handled", service="notifier", kind="HandleRegistered", handle=handle)
        case Fanout(notifications=notes):
            # Published together, confirmed together: the frames leave in list order, so a
            # handle still sees its notifications in order, without a confirm wait for each.
            await asyncio.gather(*(_publish(bus, note) for note in notes))
            log.info(
                "handled", service="notifier", kind="Fanout", kinds=[type(n).__name__ for n in notes],
                ids=[n.id for n in notes], redelivered=delivery.redelivered,
            )
    await delivery.ack()
