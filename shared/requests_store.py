"""The SQL of the request loop's record: each service keeps `<schema>.requests`, the Ids of
the sends it took with their replies and effects, so a request seen again is answered as
the first time and changes nothing (exactly-once storage)."""

import asyncio

import asyncpg

from shared.db import DatabaseUnavailable
from shared.logs import log


def requests_table(schema: str) -> str:
    """The first migration."""
    return f"""
        CREATE TABLE {schema}.requests (
            id text PRIMARY KEY,
            reply bytea,
            effects bytea,
            created_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX ON {schema}.requests (created_at);
    """


def requests_lookup(schema: str) -> str:
    """A later migration: lock a batch's request ids and read the ones already answered, in
    one round trip. The locks come first, in a fixed order (so never a deadlock); the query
    is a statement of its own, so it sees what a transaction it waited for has committed."""
    return f"""
        CREATE FUNCTION {schema}.lock_requests(ids text[])
        RETURNS TABLE (request_id text, stored_reply bytea, stored_effects bytea)
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_advisory_xact_lock(hashtext('{schema}'), hashtext(sorted.id))
            FROM (SELECT DISTINCT unnest(ids) AS id ORDER BY 1) AS sorted;
            RETURN QUERY SELECT r.id, r.reply, r.effects FROM {schema}.requests AS r WHERE r.id = ANY(ids);
        END $$;
    """


def requests_replanned(schema: str) -> str:
    """A later migration: the lookup is planned at each call. A plan cached while the table
    was empty (a scan of the whole table) would otherwise stay as the table grows, unless an
    ANALYZE happens to replace it."""
    return f"ALTER FUNCTION {schema}.lock_requests(text[]) SET plan_cache_mode = force_custom_plan"


async def lock_and_look_up(conn: asyncpg.Connection, schema: str, ids: list[str]) -> dict[str, asyncpg.Record]:
    """A concurrent transaction holding one of these ids finishes first (see requests_lookup)."""
    rows = await conn.fetch(f"SELECT * FROM {schema}.lock_requests($1::text[])", ids)
    return {row["request_id"]: row for row in rows}


async def store_replies(conn: asyncpg.Connection, schema: str, ids: list[str], replies: list[bytes],
                        effects: list[bytes]) -> bool:
    """Record the requests as taken; False if another transaction recorded one of them
    first (only a writer that skipped the locks could)."""
    stored = await conn.fetchval(
        f"""WITH stored AS (
                INSERT INTO {schema}.requests (id, reply, effects)
                SELECT * FROM unnest($1::text[], $2::bytea[], $3::bytea[]) ON CONFLICT DO NOTHING RETURNING 1
            ) SELECT count(*) FROM stored""",
        ids, replies, effects,
    )
    return bool(stored == len(ids))


async def prune_requests(pool: asyncpg.Pool, schema: str, retention_s: int, stop: asyncio.Event) -> None:
    """Forget request ids older than the retention (far beyond the timestamp window)."""
    while not stop.is_set():
        try:
            await pool.execute(
                f"DELETE FROM {schema}.requests WHERE created_at < now() - make_interval(secs => $1)",
                float(retention_s),
            )
        except DatabaseUnavailable as exc:
            log.warning("prune skipped", schema=schema, error=str(exc))
        try:
            await asyncio.wait_for(stop.wait(), timeout=600)
        except TimeoutError:
            pass
