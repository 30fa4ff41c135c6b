"""A handle's notifications, read from its durable queue.

Notifications are at-least-once; each carries a stable `Id`, and the inbox drops any it has
already returned. A notification stays in the queue until it is handed to the caller.

The inbox declares nothing: the registry creates the queue before it answers the handle's
Register, and a handle's own broker user may only read it (docs/security.md)."""

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator

import msgspec

from aodm import topology
from aodm.notifications import AnyNotification, notification_decoder
from aodm.transport import AccessRefused, BrokerError, Bus, Consumer, Delivery, QueueMissing

__all__ = ["InboxUnavailable", "Inbox"]


class InboxUnavailable(Exception):
    """The handle's notification queue cannot be consumed: it does not exist, or this
    connection's broker user may not read it. The message says which, and what to do."""


class Inbox:
    """A handle's notifications, without duplicates: `async with Inbox(client.bus, handle) as
    inbox:` then `await inbox.next()` or `async for note in inbox:`.

    Each notification is acknowledged as it is returned, so one that was taken from the queue
    but not returned (the connection lost first) is delivered again."""

    def __init__(
        self, bus: Bus, handle: str, *, queue: str | None = None, remember: int = 10_000, wait: float = 5.0
    ) -> None:
        """`queue`: this device's queue (`Client.inbox_queue`; default: the handle's, which is
        its first device's); `remember`: how many notification ids to keep for dropping
        duplicates; `wait`: seconds a missing queue may take to appear when entered."""
        self._bus = bus
        self._handle = handle
        self._name = queue or topology.inbox_queue(handle)
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._remember = remember
        self._wait = wait  # how long a missing queue may take to appear (servers before declared it after Register answered)
        self._queue: asyncio.Queue[Delivery] = asyncio.Queue()
        self._consumer: Consumer | None = None
        self.dropped = 0  # messages in the queue that were no notification (dropped, not returned)

    async def __aenter__(self) -> "Inbox":
        """Start consuming the handle's queue (`InboxUnavailable` if it cannot be read)."""
        name = self._name
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait
        while True:
            try:
                self._consumer = await self._bus.consume(name, self._queue.put, prefetch=100)
                return self
            except AccessRefused:
                raise InboxUnavailable(
                    f"broker user {self._bus.user!r} may not read {name}: connect with {self._handle}'s own "
                    f"broker credentials (issued at Register, or again with IssueBrokerCredentials)"
                ) from None
            except QueueMissing:
                if loop.time() >= deadline:
                    raise InboxUnavailable(
                        f"{name} does not exist: the registry creates it when {self._handle} registers "
                        f"(is {self._handle} registered?)"
                    ) from None
                await asyncio.sleep(0.2)

    async def __aexit__(self, *exc: object) -> None:
        """Stop consuming; notifications not returned yet stay in the queue."""
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
            try:
                note = notification_decoder.decode(delivery.body)
            except (msgspec.DecodeError, UnicodeDecodeError) as exc:
                note = None  # not a notification (anyone who can write to the queue may have put it there)
                self.dropped += 1
                logging.getLogger("aodm.inbox").warning("dropped a message that is no notification: %s", exc)
            try:
                await delivery.ack()
            except BrokerError:
                continue  # from a channel lost since: the broker delivers it again
            if note is not None and self._fresh(note):
                return note

    async def __aiter__(self) -> AsyncIterator[AnyNotification]:
        """Every notification not seen before, as `next` returns them, without end."""
        while True:
            yield await self.next()
