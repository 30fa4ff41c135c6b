"""What every service's `__main__` shares: settings, logging, pool, bus, topology,
health endpoint, and a graceful stop on SIGTERM (consumers drain, in-flight work finishes,
prefetched messages go back to their queues)."""

import asyncio
import gc
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import asyncpg

from shared import config, db, inbox_bound, logs, metrics, topology
from shared.health import HealthServer
from shared.logs import log
from shared.service import prune_requests
from shared.transport import Bus, Consumer, Handler


@dataclass
class Runtime:
    name: str
    settings: config.Settings
    pool: asyncpg.Pool | None
    read_pool: asyncpg.Pool | None
    bus: Bus
    stop: asyncio.Event
    consumers: list[Consumer] = field(default_factory=list)
    tasks: list[asyncio.Task] = field(default_factory=list)
    consuming: bool = False

    async def consume(
        self, queue: str, handler: Handler, *, concurrency: int = 1, exclusive: bool = False, batch: int | None = None
    ) -> Consumer:
        # A batch can only be as large as what is prefetched: keep two batches in flight.
        prefetch = max(self.settings.prefetch, 2 * batch) if batch else self.settings.prefetch
        consumer = await self.bus.consume(
            queue, handler, prefetch=prefetch, concurrency=concurrency, exclusive=exclusive, batch=batch
        )
        self.consumers.append(consumer)
        return consumer

    def background(self, coro: Awaitable[None]) -> None:
        self.tasks.append(asyncio.ensure_future(coro))

    def ready(self) -> bool:
        return self.consuming and self.bus.is_connected and (self.pool is None or not self.pool._closed)



Start = Callable[[Runtime], Awaitable[None]]


async def serve(
    name: str,
    settings: config.Settings,
    stop: asyncio.Event,
    start: Start,
    *,
    schema: str | None = None,
    migrations: list[str] | None = None,
) -> None:
    pool = read_pool = None
    if schema is not None:
        pool = await db.connect(settings.database_url, size=settings.db_pool_size)
        await db.migrate(pool, schema, migrations or [])
        read_pool = await db.connect(settings.database_url, size=max(2, settings.db_pool_size // 2), read_only=True)
    bus = await Bus.connect(settings.amqp_url, name=f"aodm-{name}")
    await topology.declare_all(bus, settings.session_shards)
    runtime = Runtime(name, settings, pool, read_pool, bus, stop)
    health = HealthServer(runtime.ready, metrics.render)
    if settings.http_port:
        await health.start(settings.http_port)
    try:
        if pool is not None and schema is not None:
            runtime.background(prune_requests(pool, schema, settings.dedup_retention_s, stop))
        # Whichever service has the admin URL bounds the inboxes (shared/inbox_bound.py).
        runtime.background(inbox_bound.keep(settings, stop))
        await start(runtime)
        gc.freeze()  # what start-up built lives on: full collections need not walk it again
        runtime.consuming = True
        log.info("service started", service=name)
        await stop.wait()
    finally:
        runtime.consuming = False
        log.info("service stopping", service=name)
        # Consumers first: the messages in hand finish, and a background task may be what
        # finishes them (the session worker's Combiner); then the background tasks.
        await asyncio.gather(*(c.stop() for c in list(runtime.consumers)), return_exceptions=True)
        for task in runtime.tasks:
            task.cancel()
        await asyncio.gather(*runtime.tasks, return_exceptions=True)
        await health.close()
        await bus.close()
        for open_pool in (pool, read_pool):
            if open_pool is not None:
                await open_pool.close()
        log.info("service stopped", service=name)


def main(name: str, run: Callable[[config.Settings, asyncio.Event], Awaitable[None]]) -> None:
    """Process entry point: settings (a bad one is a clear error), logging, signals."""
    try:
        settings = config.load()
    except config.ConfigError as exc:
        print(f"aodm-{name}: configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
    logs.setup(settings.log_level, settings.log_format)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    async def run_until_signalled() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run(settings, stop)

    asyncio.run(run_until_signalled())
