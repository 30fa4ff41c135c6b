"""The aodm notifier: keeps one durable notification queue per handle, so an offline
handle finds its notifications when it returns. It declares a handle's queue when the
handle registers, and delivers the notifications that found their queue missing (see
fanout.py). It uses no database."""

import asyncio

from aodm import topology
from services.notifier import fanout
from shared import inbox_bound, runtime
from shared.config import Settings

EVENT_BATCH = 64  # events handled together when they are waiting


async def start(rt: runtime.Runtime) -> None:
    inbox_bound.warn_if_unset(rt.settings)  # the keeper of the inbox queues says when nothing bounds them
    # Batches in queue order (a handle's queue is declared before anything is delivered to
    # it); a batch waits once for the confirms of all its notifications, while the next is published.
    await rt.consume(topology.NOTIFIER_QUEUE, fanout.Notifier(rt.bus).on_events, batch=EVENT_BATCH)


async def run(settings: Settings, stop: asyncio.Event) -> None:
    await runtime.serve("notifier", settings, stop, start)


if __name__ == "__main__":
    runtime.main("notifier", run, __doc__)
