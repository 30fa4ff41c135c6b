"""Fixtures: every test run gets its own RabbitMQ vhost and its own Postgres database, so
the suite runs beside a live stack and never sees another run's leftovers; tests inside a
run use fresh random handles."""

import asyncio
import os
import secrets
from contextlib import asynccontextmanager

import pytest

from aodm.client import Client
from aodm.crypto import Identity
from shared import logs
from tests.isolation import (  # noqa: F401 (the tests import them from here)
    DATABASE_BASE,
    MANAGEMENT,
    drop_database,
    drop_vhost,
    isolated_settings,
    management,
    new_database,
    new_vhost,
)

logs.setup(os.environ.get("AODM_TEST_LOG", "warning"), "console")  # AODM_TEST_LOG=info to see the services


@asynccontextmanager
async def running_services(settings, names=("registry", "session", "notifier")):
    """The services in this process, as tasks; each has its own stop event."""
    from services.notifier.__main__ import run as run_notifier
    from services.registry.__main__ import run as run_registry
    from services.session.__main__ import run as run_session

    runners = {"registry": run_registry, "session": run_session, "notifier": run_notifier}
    stops = {name: asyncio.Event() for name in names}
    tasks = {name: asyncio.create_task(runners[name](settings, stops[name])) for name in names}
    await asyncio.sleep(0)
    try:
        await wait_ready(settings, tasks)
        yield tasks
    finally:
        for stop in stops.values():
            stop.set()
        await asyncio.gather(*tasks.values(), return_exceptions=True)


async def wait_ready(settings, tasks, timeout: float = 30) -> None:
    """Ready when a throwaway client gets an answer from the registry and a session shard."""
    from aodm.errors import NotFound

    identity = Identity.generate()
    client = await Client.connect(settings.amqp_url, identity, timeout=2)
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            for name, task in tasks.items():
                if task.done():
                    task.result()
                    raise RuntimeError(f"{name} exited early")
            try:
                await client.query_handle("nobody-here")
            except NotFound:
                break
            except Exception:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.2)
    finally:
        await client.close()


@pytest.fixture(scope="session")
async def stack():
    """One running system for the tests that only need a working service. Some pipeline
    hundreds of messages a sender (tests/test_races.py): the send limits are out of their
    way here, and tests/test_rate_limits.py runs services of its own with low ones."""
    async with isolated_settings(send_rate=10**6, send_session_rate=10**6) as settings, running_services(settings):
        yield settings


@pytest.fixture
async def make_client(stack):
    """Factory: a connected client with a freshly registered random handle."""
    clients: list[Client] = []

    async def make(prefix: str = "user", register: bool = True) -> Client:
        client = await Client.connect(stack.amqp_url, Identity.generate())
        clients.append(client)
        if register:
            await client.register(f"{prefix}-{secrets.token_hex(5)}")
        return client

    yield make
    for client in clients:
        await client.close()
