"""Each handle's notification queue exists before its Register is answered (protocol §4.4).

The registry declares `aodm.inbox.<handle>` and its binding itself, after the handle's row
is written and before the reply, so a client may consume the queue as soon as it has the
reply. The notifier still declares it on the HandleRegistered event, and again for a
notification that finds it missing (an operator deleted it): the declare is idempotent,
and the queue has no arguments (its bound is a policy, aodm/topology.py), so any of them
may come first. A handle's own broker user may read it whoever declared it: permissions go
by queue name (services/registry/credentials.py).

A broker that does not answer is not the request's fault: like the management API, it
raises a DependencyUnavailable, and the request waits in its place.
"""

import asyncio

from aodm import topology
from aodm.transport import BrokerError, Bus
from shared.db import DependencyUnavailable

DECLARE_TIMEOUT_S = 5.0  # well within a handler's time: a broker this slow counts as away


class BrokerUnavailable(DependencyUnavailable):
    """The broker did not declare the queue: retried, never the request's fault."""


class Inboxes:
    def __init__(self, bus: Bus) -> None:
        self._bus = bus

    async def declare(self, handle: str, queue: str | None = None) -> None:
        """The handle's queue (or, named, one of its devices') and its binding."""
        try:
            async with asyncio.timeout(DECLARE_TIMEOUT_S):
                await topology.declare_new_inbox(self._bus, handle, queue)
        except (TimeoutError, *BrokerError) as exc:
            raise BrokerUnavailable(f"declaring {queue or topology.inbox_queue(handle)}: {exc!r}") from exc

    async def delete(self, queue: str) -> None:
        """A removed device's queue, with what it held."""
        try:
            async with asyncio.timeout(DECLARE_TIMEOUT_S):
                await self._bus.delete_queue(queue)
        except (TimeoutError, *BrokerError) as exc:
            raise BrokerUnavailable(f"deleting {queue}: {exc!r}") from exc
