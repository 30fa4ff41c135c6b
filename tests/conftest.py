"""Fixtures: every test run gets its own RabbitMQ vhost and its own Postgres database, so
the suite runs beside a live stack and never sees another run's leftovers; tests inside a
run use fresh random handles."""

import asyncio
import base64
import json
import os
import secrets
import urllib.parse
import urllib.request
from contextlib import asynccontextmanager
from dataclasses import replace

import asyncpg
import pytest

from aodm.client import Client
from aodm.crypto import Identity
from shared import config, logs

AMQP_BASE = os.environ.get("AODM_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
DATABASE_BASE = os.environ.get("AODM_TEST_DATABASE_URL", "postgresql://root@127.0.0.1:5432/postgres")
MANAGEMENT = os.environ.get("AODM_TEST_MANAGEMENT_URL", "http://guest:guest@127.0.0.1:15672")

logs.setup(os.environ.get("AODM_TEST_LOG", "warning"), "console")  # AODM_TEST_LOG=info to see the services


def _management(method: str, path: str, body: dict | None = None) -> None:
    parts = urllib.parse.urlsplit(MANAGEMENT)
    url = f"{parts.scheme}://{parts.hostname}:{parts.port}/api{path}"
    request = urllib.request.Request(url, method=method, data=json.dumps(body or {}).encode())
    token = base64.b64encode(f"{parts.username}:{parts.password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    request.add_header("Content-Type", "application/json")
    urllib.request.urlopen(request, timeout=30).read()


def new_vhost() -> tuple[str, str]:
    name = f"aodm-test-{secrets.token_hex(4)}"
    _management("PUT", f"/vhosts/{name}")
    user = urllib.parse.urlsplit(AMQP_BASE).username or "guest"
    _management("PUT", f"/permissions/{name}/{user}", {"configure": ".*", "write": ".*", "read": ".*"})
    parts = urllib.parse.urlsplit(AMQP_BASE)
    return name, urllib.parse.urlunsplit(parts._replace(path="/" + urllib.parse.quote(name, safe="")))


def drop_vhost(name: str) -> None:
    _management("DELETE", f"/vhosts/{name}")


async def new_database() -> tuple[str, str]:
    name = f"aodm_test_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(DATABASE_BASE)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    parts = urllib.parse.urlsplit(DATABASE_BASE)
    return name, urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))


async def drop_database(name: str) -> None:
    conn = await asyncpg.connect(DATABASE_BASE)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@asynccontextmanager
async def isolated_settings(**overrides):
    """A vhost and a database of their own, dropped afterwards."""
    vhost, amqp_url = new_vhost()
    db_name, db_url = await new_database()
    settings = replace(config.load({}), amqp_url=amqp_url, database_url=db_url, **overrides)
    try:
        yield settings
    finally:
        drop_vhost(vhost)
        await drop_database(db_name)


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
    from shared.errors import NotFound

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
    """One running system for the tests that only need a working service."""
    async with isolated_settings() as settings, running_services(settings):
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
