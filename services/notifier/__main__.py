"""The notifier: turns service events into notifications in each handle's own queue."""

import asyncio

from shared import runtime, topology
from shared.config import Settings

from services.notifier import fanout

EVENT_BATCH = 64  # events handled together when they are waiting


async def start(rt: runtime.Runtime) -> None:
    # Batches in queue order: a handle sees its notifications in the order they were produced;
    # a batch waits once for the confirms of all its notifications, while the next is published.
    await rt.consume(topology.NOTIFIER_QUEUE, fanout.Notifier(rt.bus).on_events, batch=EVENT_BATCH)


async def run(settings: Settings, stop: asyncio.Event) -> None:
    await runtime.serve("notifier", settings, stop, start)


if __name__ == "__main__":
    runtime.main("notifier", run)
