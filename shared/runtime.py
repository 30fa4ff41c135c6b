"""What every service's `__main__` shares: settings, logging, pool, bus, topology,
health endpoint, and a graceful stop on SIGTERM (consumers drain, in-flight work finishes,
prefetched messages go back to their queues)."""

import argparse
import asyncio
import gc
import os
import signal
import socket
import sys
import textwrap
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import urlsplit

import asyncpg

from aodm import topology
from aodm.transport import BrokerError, Bus, Consumer, Handler, LoginRefused
from shared import config, db, inbox_bound, logs, metrics, process_metrics
from shared.health import HealthServer
from shared.logs import log
from shared.requests_store import prune_requests

# Waiting for the broker at start: the pause doubles from the first to the cap.
BROKER_RETRY_FIRST_S = 0.5
BROKER_RETRY_CAP_S = 10.0
BROKER_PROBE_TIMEOUT_S = 5.0
BROKER_CONNECT_TIMEOUT_S = 30.0

T = TypeVar("T")


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


class BrokerRefused(Exception):
    """The broker answers but refuses the login: a configuration error, not an outage."""


def process_name(service: str) -> str:
    """The broker connection name (and so the consumer tags): service, host and pid, so
    scaled replicas can be told apart in the management UI."""
    return f"aodm-{service}@{socket.gethostname()}[{os.getpid()}]"


def requests_from_zero(service: str, actions: Iterable[str]) -> None:
    """Every action's ok and internal series exist from the start, at zero: a rate() or an
    alert on them sees the first request, and a dashboard lists every action."""
    for action in actions:
        for outcome in ("ok", "internal"):
            metrics.inc("aodm_requests_total", 0, service=service, action=action, outcome=outcome)


async def _probe(url: str) -> None:
    """A TCP connect to the broker: cheap, and silent (a failed AMQP connect makes the
    libraries log an error and a reconnect that does not happen)."""
    parts = urlsplit(url)
    port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
    async with asyncio.timeout(BROKER_PROBE_TIMEOUT_S):
        _, writer = await asyncio.open_connection(parts.hostname or "localhost", port)
    writer.close()


async def connect_broker(url: str, name: str) -> Bus:
    """Wait for the broker (it may start after us, or be away): retried with back-off, one
    log line per attempt. A refused login is not waited out: BrokerRefused."""
    backoff = BROKER_RETRY_FIRST_S
    attempt = 1
    while True:
        try:
            await _probe(url)
            async with asyncio.timeout(BROKER_CONNECT_TIMEOUT_S):  # a broker that accepts but never answers
                return await Bus.connect(url, name=name, fast=True)  # the services' fast path (aodm/transport.py)
        except LoginRefused as exc:
            raise BrokerRefused(f"the broker refused the login of user {urlsplit(url).username or 'guest'!r}: {exc}") from None
        except (*BrokerError, OSError, TimeoutError) as exc:
            log.warning("broker not reachable yet", connection=name, attempt=attempt,
                        error=str(exc) or type(exc).__name__, retry_in_s=backoff)
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, BROKER_RETRY_CAP_S)
        attempt += 1


async def until_stopped(work: Awaitable[T], stop: asyncio.Event) -> T | None:
    """`work`'s result, or None once `stop` is set first (then `work` is cancelled)."""
    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # its clean-up runs
    return None if task.cancelled() else task.result()


async def _connect(
    name: str, settings: config.Settings, stop: asyncio.Event, schema: str | None, migrations: list[str] | None
) -> Runtime:
    """The database (waited for and migrated), the broker (waited for) and the topology."""
    pool = read_pool = bus = None
    try:
        if schema is not None:
            pool = await db.connect(settings.database_url, size=settings.db_pool_size)
            await db.migrate(pool, schema, migrations or [])
            read_pool = await db.connect(settings.database_url, size=max(2, settings.db_pool_size // 2), read_only=True)
        bus = await connect_broker(settings.amqp_url, process_name(name))
        await topology.declare_all(bus, settings.session_shards)
        return Runtime(name, settings, pool, read_pool, bus, stop)
    except BaseException:
        await _close(bus, pool, read_pool)
        raise


async def _close(bus: Bus | None, *pools: asyncpg.Pool | None) -> None:
    if bus is not None:
        await bus.close()
    for pool in pools:
        if pool is not None:
            await pool.close()


async def serve(
    name: str,
    settings: config.Settings,
    stop: asyncio.Event,
    start: Start,
    *,
    schema: str | None = None,
    migrations: list[str] | None = None,
) -> None:
    runtime: Runtime | None = None
    log.info("service starting", service=name, connection=process_name(name), version=process_metrics.VERSION)
    # Up first: /healthz answers and /readyz says "not ready" while the broker and the
    # database are waited for.
    health = HealthServer(lambda: runtime is not None and runtime.ready(), metrics.render)
    if settings.http_port:
        await health.start(settings.http_port)
    try:
        runtime = await until_stopped(_connect(name, settings, stop, schema, migrations), stop)
        if runtime is not None:
            await _run(runtime, start, schema)
    finally:
        await health.close()
    log.info("service stopped", service=name)  # a failure is main's to log


async def _run(runtime: Runtime, start: Start, schema: str | None) -> None:
    name, settings, stop = runtime.name, runtime.settings, runtime.stop
    try:
        if runtime.pool is not None and schema is not None:
            runtime.background(prune_requests(runtime.pool, schema, settings.dedup_retention_s, stop))
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
        await _close(runtime.bus, runtime.pool, runtime.read_pool)


def _help(name: str, description: str) -> argparse.ArgumentParser:
    """`python -m services.<name> --help`: what the service does and every setting it reads."""
    settings = "\n".join(
        f"  {variable}={default}\n" + textwrap.fill(meaning, 88, initial_indent=" " * 6, subsequent_indent=" " * 6)
        for variable, (default, _, meaning) in config.VARIABLES.items()
    )
    return argparse.ArgumentParser(
        prog=f"python -m services.{name}",
        description=description.strip(),
        epilog=(
            f"settings (environment variables, read once at start), with their defaults:\n{settings}\n\n"
            "SIGTERM or Ctrl-C stops the service gracefully. More: docs/operations.md."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _startup_log_format() -> str:
    """AODM_LOG_FORMAT before the settings are checked, to report what is wrong with them."""
    raw = os.environ.get("AODM_LOG_FORMAT", "auto")
    return raw if raw in ("json", "console") else "auto"


def main(name: str, run: Callable[[config.Settings, asyncio.Event], Awaitable[None]], description: str = "") -> None:
    """Process entry point: --help, settings (a bad one is a clear error), logging, signals.
    Whatever stops it at start is one log line (JSON in JSON mode) and a non-zero exit."""
    _help(name, description or f"The aodm {name} service.").parse_args()
    try:
        settings = config.load()
    except config.ConfigError as exc:
        logs.setup("info", _startup_log_format())
        log.error("configuration error", service=name, error=str(exc))
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

    try:
        asyncio.run(run_until_signalled())
    except BrokerRefused as exc:
        log.error("broker refused the connection, check AODM_AMQP_URL", service=name, error=str(exc))
        sys.exit(2)
    except Exception:
        log.exception("service failed", service=name)
        sys.exit(1)
