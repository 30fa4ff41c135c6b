"""PostgreSQL pool and migrations. Each service owns one schema and migrates it at start."""

import asyncio
import urllib.parse

import asyncpg

from shared.logs import log


class DependencyUnavailable(ConnectionError):
    """Another system a handler relies on (the broker's management API) does not answer:
    like a database outage, waited out and never the request's fault."""


# Faults of the database itself (not of a request): retried, never dead-lettered.
DatabaseUnavailable: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    # A rotated password or a revoked login is an operator's fault, not the request's.
    asyncpg.InvalidPasswordError,
    asyncpg.InvalidAuthorizationSpecificationError,
    # A connection a fault left in the middle of an operation ("cannot switch to state …;
    # another operation is in progress"): replaced, see `replace_connections`.
    asyncpg.InternalClientError,
    OSError,
)


async def replace_connections(*pools: asyncpg.Pool) -> None:
    """After a database fault, every pooled connection is replaced on its next use: one the
    fault left half-way through an operation would otherwise go back to the pool looking
    idle (aodm's pools skip asyncpg's reset query, which would have caught it)."""
    for pool in pools:
        await pool.expire_connections()


async def _create_database(dsn: str) -> None:
    parts = urllib.parse.urlsplit(dsn)
    name = parts.path.lstrip("/")
    admin = urllib.parse.urlunsplit(parts._replace(path="/postgres"))
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
        pass  # another service created it first
    finally:
        await conn.close()


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Returning a connection to the pool: nothing to undo. asyncpg still rolls back an open
    transaction; its default reset (advisory unlock, CLOSE ALL, UNLISTEN, RESET ALL) would
    cost a round trip per use, and aodm never sets a session-level lock, cursor, listener or
    setting."""


async def connect(dsn: str, *, size: int, read_only: bool = False, attempts: int = 60) -> asyncpg.Pool:
    """Wait for the database (it may start after us), creating it on first use. A read-only
    pool's sessions refuse every write, so a dryrun cannot change state even by mistake."""
    settings = {"default_transaction_read_only": "on"} if read_only else None
    for attempt in range(attempts):
        try:
            return await asyncpg.create_pool(
                dsn, min_size=min(2, size), max_size=size, server_settings=settings, reset=_keep_session
            )
        except asyncpg.InvalidCatalogNameError:
            await _create_database(dsn)
        except DatabaseUnavailable as exc:
            log.warning("database not reachable yet", attempt=attempt, error=str(exc))
            await asyncio.sleep(min(0.2 * 2**attempt, 2.0))
    raise ConnectionError(f"database not reachable after {attempts} attempts")


async def migrate(pool: asyncpg.Pool, schema: str, migrations: list[str]) -> None:
    """Apply the not yet applied migrations, in order, under a lock so replicas can race."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", schema)
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {schema}.migrations (version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = await conn.fetchval(f"SELECT coalesce(max(version), 0) FROM {schema}.migrations")
        for version, sql in enumerate(migrations, start=1):
            if version > done:
                await conn.execute(sql)
                await conn.execute(f"INSERT INTO {schema}.migrations(version) VALUES ($1)", version)
                log.info("migration applied", schema=schema, version=version)


async def retrying(operation, *, what: str, pool: asyncpg.Pool):
    """Run a database operation on `pool` until the database answers: faults of the
    database are waited out, never turned into a lost message."""
    backoff = 0.1
    while True:
        try:
            return await operation()
        except DatabaseUnavailable as exc:
            await replace_connections(pool)
            log.warning("database unavailable, retrying", what=what, error=str(exc), backoff=backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
