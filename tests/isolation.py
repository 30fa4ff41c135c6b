"""A RabbitMQ vhost and a PostgreSQL database of their own, for a test run or a benchmark:
nothing they do touches a live stack, and both are dropped afterwards. (No pytest here, so
the benchmark can use it too.)"""

import base64
import json
import os
import secrets
import urllib.parse
import urllib.request
from contextlib import asynccontextmanager
from dataclasses import replace

import asyncpg

from shared import config, db

AMQP_BASE = os.environ.get("AODM_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
DATABASE_BASE = os.environ.get("AODM_TEST_DATABASE_URL", "postgresql://root@127.0.0.1:5432/postgres")
MANAGEMENT = os.environ.get("AODM_TEST_MANAGEMENT_URL", "http://guest:guest@127.0.0.1:15672")


def management(method: str, path: str, body: dict | None = None) -> bytes:
    """A call to the RabbitMQ management API."""
    parts = urllib.parse.urlsplit(MANAGEMENT)
    url = f"{parts.scheme}://{parts.hostname}:{parts.port}/api{path}"
    data = json.dumps(body).encode() if body is not None else (b"{}" if method == "PUT" else None)
    request = urllib.request.Request(url, method=method, data=data)
    token = base64.b64encode(f"{parts.username}:{parts.password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.read()


def new_vhost(prefix: str = "aodm-test") -> tuple[str, str]:
    name = f"{prefix}-{secrets.token_hex(4)}"
    management("PUT", f"/vhosts/{name}")
    user = urllib.parse.urlsplit(AMQP_BASE).username or "guest"
    management("PUT", f"/permissions/{name}/{user}", {"configure": ".*", "write": ".*", "read": ".*"})
    parts = urllib.parse.urlsplit(AMQP_BASE)
    return name, urllib.parse.urlunsplit(parts._replace(path="/" + urllib.parse.quote(name, safe="")))


def drop_vhost(name: str) -> None:
    management("DELETE", f"/vhosts/{name}")


async def new_database(prefix: str = "aodm_test") -> tuple[str, str]:
    name = f"{prefix}_{secrets.token_hex(4)}"
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
async def isolated_settings(prefix: str = "aodm-test", **overrides):
    """Settings pointing at a fresh vhost and database, both dropped afterwards."""
    vhost, amqp_url = new_vhost(prefix)
    db_name, db_url = await new_database(prefix.replace("-", "_"))
    settings = replace(config.load({}), amqp_url=amqp_url, database_url=db_url, **overrides)
    try:
        yield settings
    finally:
        try:
            drop_vhost(vhost)
        finally:
            await drop_database(db_name)


@asynccontextmanager
async def migrated_database(prefix: str, schema: str, migrations: list[str]):
    """A database of its own with one service's schema migrated in; yields its DSN."""
    name, dsn = await new_database(prefix)
    pool = await db.connect(dsn, size=1)
    try:
        await db.migrate(pool, schema, migrations)
    finally:
        await pool.close()
    try:
        yield dsn
    finally:
        await drop_database(name)
