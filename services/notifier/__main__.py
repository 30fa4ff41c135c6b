"""The notifier: turns service events into notifications in each handle's own queue."""

import asyncio
import functools

from shared import runtime, topology
from shared.config import Settings

from services.notifier import fanout


async def start(rt: runtime.Runtime) -> None:
    # One at a time: a handle sees its notifications in the order they were produced.
    await rt.consume(topology.NOTIFIER_QUEUE, functools.partial(fanout.on_event, rt.bus))


async def run(settings: Settings, stop: asyncio.Event) -> None:
    await runtime.serve("notifier", settings, stop, start)


if __name__ == "__main__":
    runtime.main("notifier", run)
