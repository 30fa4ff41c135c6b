"""A handle's notifications, read from its durable queue.

Notifications are at-least-once; each carries a stable `Id`, and the inbox drops any it has
already returned. A notification stays in the queue until it is handed to the caller."""

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator

from shared import topology
from shared.notifications import AnyNotification, notification_decoder
from shared.transport import Bus, Delivery


class Inbox:
    def __init__(self, bus: Bus, handle: str, *, remember: int = 10_000) -> None:
        self._bus = bus
        self._handle = handle
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._remember = remember
        self._queue: asyncio.Queue[Delivery] = asyncio.Queue()
        self._consumer = None

    async def __aenter__(self) -> "Inbox":
        await topology.declare_inbox(self._bus, self._handle)
        self._consumer = await self._bus.consume(
            topology.inbox_queue(self._handle), self._queue.put, prefetch=100
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._consumer is not None:
            await self._consumer.close()

    def _fresh(self, note: AnyNotification) -> bool:
        if note.id in self._seen:
            return False
        self._seen[note.id] = None
        if len(self._seen) > self._remember:
            self._seen.popitem(last=False)
        return True

    async def next(self, timeout: float | None = None) -> AnyNotification:
        """The next notification not seen before (acknowledged when returned)."""
        while True:
            delivery = await asyncio.wait_for(self._queue.get(), timeout)
            note = notification_decoder.decode(delivery.body)
            await delivery.ack()
            if self._fresh(note):
                return note

    async def __aiter__(self) -> AsyncIterator[AnyNotification]:
        while True:
            yield await self.next()
