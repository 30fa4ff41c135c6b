"""The notifier keeps one durable queue per handle, `aodm.inbox.<handle>`.

The services publish notifications straight into them through the inbox exchange
(shared/effects.py), so an offline handle finds them when it comes back. The notifier
declares a handle's queue when the handle registers (HandleRegistered), and delivers what
found its queue missing (a Fanout event: the queue is not created yet, or an operator
deleted it): it declares the queue again and publishes there, so nothing addressed to a
registered handle is dropped."""

import asyncio

import msgspec

from aodm import topology
from aodm.notifications import AnyNotification, Fanout, HandleRegistered, NotifierEvent, event_decoder
from aodm.transport import Bus, Delivery, Unroutable, settle_when_confirmed
from shared import effects, metrics
from shared.logs import log

# aodm_notifications_total (described in shared/service.py) counts what the notifier
# delivered, service="notifier": notifications redirected to it because their queue was missing.
metrics.describe("aodm_notifier_events_total", "counter", "Events the notifier took, by kind (HandleRegistered, Fanout).")
metrics.describe("aodm_inboxes_declared_total", "counter", "Handle inbox queues the notifier declared, by reason (registered, missing).")
metrics.describe(
    "aodm_notifier_failures_total", "counter",
    "Notifier events dropped or not delivered, by reason (foreign_user, undecodable, delivery).",
)
EVENT_KINDS = ("HandleRegistered", "Fanout")
DECLARE_REASONS = ("registered", "missing")
FAILURE_REASONS = ("foreign_user", "undecodable", "delivery")
NOTIFICATION_KINDS = tuple(kind.__name__ for kind in AnyNotification.__args__)


def _count_from_zero() -> None:
    """Every series exists from the start, so a rate() or an alert sees the first event."""
    for kind in EVENT_KINDS:
        metrics.inc("aodm_notifier_events_total", 0, kind=kind)
    for reason in DECLARE_REASONS:
        metrics.inc("aodm_inboxes_declared_total", 0, reason=reason)
    for reason in FAILURE_REASONS:
        metrics.inc("aodm_notifier_failures_total", 0, reason=reason)
    for kind in NOTIFICATION_KINDS:
        metrics.inc("aodm_notifications_total", 0, kind=kind, service="notifier")


async def _deliver(bus: Bus, notes: list[AnyNotification]) -> None:
    """Into each handle's queue; one found missing is declared again and published again."""
    try:
        missing = await bus.publish_all([effects.notification(note) for note in notes])
        for message in missing:
            await topology.declare_inbox(bus, message.routing_key)
            metrics.inc("aodm_inboxes_declared_total", reason="missing")
        if still := await bus.publish_all(missing):  # only if deleted again at once: a bug or an operator
            raise Unroutable(", ".join(f"{m.exchange}/{m.routing_key}" for m in still))
    except Exception:  # the batch goes back to its queue (settle_when_confirmed) and comes again
        metrics.inc("aodm_notifier_failures_total", reason="delivery")
        raise
    for note in notes:
        metrics.inc("aodm_notifications_total", kind=type(note).__name__, service="notifier")


async def _declare_registered(bus: Bus, handle: str) -> None:
    try:
        await topology.declare_inbox(bus, handle)
    except Exception:  # the batch goes back to its queue and comes again
        metrics.inc("aodm_notifier_failures_total", reason="delivery")
        raise
    metrics.inc("aodm_inboxes_declared_total", reason="registered")


def _accepted(bus: Bus, delivery: Delivery) -> NotifierEvent | None:
    """Events count only when the broker vouches (user_id) that the services' user sent them."""
    if delivery.user_id != bus.user:
        log.warning("notifier event from another broker user dropped", user_id=delivery.user_id)
        metrics.inc("aodm_notifier_failures_total", reason="foreign_user")
        return None
    try:
        return event_decoder.decode(delivery.body)
    except msgspec.DecodeError as exc:
        log.warning("bad notifier event dropped", error=str(exc))
        metrics.inc("aodm_notifier_failures_total", reason="undecodable")
        return None


class Notifier:
    """The notifier's handler. A batch's notifications are published together, and its
    acknowledgement waits for their confirms; the next batch is published meanwhile, and
    acknowledged after this one. At-least-once: a broker fault hands the events back, and
    republished notifications keep their ids."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._settled: asyncio.Future[None] | None = None  # the latest batch's acknowledgement
        _count_from_zero()

    async def on_events(self, deliveries: list[Delivery]) -> "asyncio.Future[None]":
        notes: list[AnyNotification] = []
        for delivery in deliveries:
            match _accepted(self._bus, delivery):
                case HandleRegistered(handle=handle):
                    metrics.inc("aodm_notifier_events_total", kind="HandleRegistered")
                    await _declare_registered(self._bus, handle)  # before anything is delivered to it
                    log.info("handled", service="notifier", kind="HandleRegistered", handle=handle)
                case Fanout(notifications=batch):
                    metrics.inc("aodm_notifier_events_total", kind="Fanout")
                    notes += batch
                    log.info(
                        "handled", service="notifier", kind="Fanout", kinds=[type(n).__name__ for n in batch],
                        ids=[n.id for n in batch], redelivered=delivery.redelivered, batch=len(deliveries),
                    )
        publishing = asyncio.ensure_future(_deliver(self._bus, notes))
        self._settled = asyncio.ensure_future(settle_when_confirmed(deliveries, [publishing], self._settled))
        return self._settled
