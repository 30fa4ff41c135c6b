"""All of the registry's SQL. The registry owns the `registry` schema."""

import asyncpg

from shared.requests_store import requests_lookup, requests_replanned, requests_table

SCHEMA = "registry"

MIGRATIONS = [
    requests_table(SCHEMA)
    + """
    CREATE TABLE registry.handles (
        handle text PRIMARY KEY,
        sign_key bytea NOT NULL,
        box_key bytea NOT NULL,
        created_at bigint NOT NULL
    );
    CREATE INDEX handles_by_sign_key ON registry.handles (sign_key);
    CREATE TABLE registry.sessions (
        session_id text PRIMARY KEY,
        handle_lo text NOT NULL REFERENCES registry.handles,
        handle_hi text NOT NULL REFERENCES registry.handles,
        created_at bigint NOT NULL,
        last_activity bigint NOT NULL,
        UNIQUE (handle_lo, handle_hi),
        CHECK (handle_lo < handle_hi)
    );
    CREATE INDEX sessions_by_hi ON registry.sessions (handle_hi);
    """,
    # The pair is ordered in Python (code points); the CHECK must compare the same way
    # whatever the database's default collation is.
    """
    ALTER TABLE registry.sessions
        ALTER COLUMN handle_lo TYPE text COLLATE "C",
        ALTER COLUMN handle_hi TYPE text COLLATE "C";
    """,
    requests_lookup(SCHEMA),
    requests_replanned(SCHEMA),
    # Who opened each session, for the limit on sessions opened per handle (sessions from
    # before have none and count for nobody); handles by key and time, for the limit on
    # handles registered per signing key.
    """
    ALTER TABLE registry.sessions ADD COLUMN opened_by text COLLATE "C";
    CREATE INDEX sessions_opened ON registry.sessions (opened_by, created_at) WHERE opened_by IS NOT NULL;
    CREATE INDEX handles_by_sign_key_and_time ON registry.handles (sign_key, created_at);
    """,
    # Each session's consent as the chat lists show it: a copy of the session worker's
    # (its one writer), kept at the highest consent_version reported. A new session is a
    # request to the member that did not open it; sessions from before are accepted.
    """
    ALTER TABLE registry.sessions
        ADD COLUMN pending_for text COLLATE "C",
        ADD COLUMN blocked_by text[] NOT NULL DEFAULT '{}',
        ADD COLUMN consent_version int NOT NULL DEFAULT 0;
    """,
]


async def insert_handle(conn: asyncpg.Connection, handle: str, sign_key: bytes, box_key: bytes, at: int) -> bool:
    return bool(
        await conn.fetchval(
            """INSERT INTO registry.handles (handle, sign_key, box_key, created_at) VALUES ($1, $2, $3, $4)
               ON CONFLICT DO NOTHING RETURNING true""",
            handle, sign_key, box_key, at,
        )
    )


async def handle(conn: asyncpg.Connection, name: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT handle, sign_key, box_key, created_at FROM registry.handles WHERE handle = $1", name)


async def lock_handle(conn: asyncpg.Connection, name: str) -> asyncpg.Record | None:
    """The handle's row, locked until the transaction ends (re-issues of one handle's broker
    password take turns, so the last one committed is the one the broker holds)."""
    return await conn.fetchrow(
        "SELECT handle, sign_key, box_key, created_at FROM registry.handles WHERE handle = $1 FOR UPDATE", name
    )


async def handles_of(conn: asyncpg.Connection, sign_key: bytes) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT handle, sign_key, box_key, created_at FROM registry.handles WHERE sign_key = $1 ORDER BY handle",
        sign_key,
    )


def _pair(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a < b else (b, a)


async def session_of(conn: asyncpg.Connection, a: str, b: str) -> str | None:
    return await conn.fetchval(
        "SELECT session_id FROM registry.sessions WHERE handle_lo = $1 AND handle_hi = $2", *_pair(a, b)
    )


async def opener_of(conn: asyncpg.Connection, session_id: str) -> str | None:
    """Who opened the session (None: it was opened before the registry recorded it)."""
    return await conn.fetchval("SELECT opened_by FROM registry.sessions WHERE session_id = $1", session_id)


async def insert_session(conn: asyncpg.Connection, session_id: str, opener: str, peer: str, at: int) -> bool:
    """Exactly one session per pair: the unique (lo, hi) key settles concurrent inserts."""
    return bool(
        await conn.fetchval(
            """INSERT INTO registry.sessions (session_id, handle_lo, handle_hi, created_at, last_activity, opened_by,
                                                pending_for)
               VALUES ($1, $2, $3, $4, $4, $5, $6) ON CONFLICT (handle_lo, handle_hi) DO NOTHING RETURNING true""",
            session_id, *_pair(opener, peer), at, opener, peer,
        )
    )


async def opened_since(conn: asyncpg.Connection, handle: str, since: int) -> list[int]:
    """When `handle` opened each session it opened at or after `since`, oldest first. Within a
    transaction, other openings by the same handle wait for it: the count holds until its end."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('registry.opened_by'), hashtext($1))", handle)
    return [row[0] for row in await conn.fetch(
        "SELECT created_at FROM registry.sessions WHERE opened_by = $1 AND created_at >= $2 ORDER BY created_at",
        handle, since)]


async def registered_since(conn: asyncpg.Connection, sign_key: bytes, since: int) -> list[int]:
    """When each handle of `sign_key` registered at or after `since` was, oldest first (locked
    per key until the transaction ends, like opened_since)."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('registry.sign_key'), hashtext(encode($1, 'hex')))", sign_key)
    return [row[0] for row in await conn.fetch(
        "SELECT created_at FROM registry.handles WHERE sign_key = $1 AND created_at >= $2 ORDER BY created_at",
        sign_key, since)]


async def chats_of(conn: asyncpg.Connection, name: str) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT session_id, CASE WHEN handle_lo = $1 THEN handle_hi ELSE handle_lo END AS peer,
                  created_at, last_activity, pending_for, blocked_by
           FROM registry.sessions WHERE handle_lo = $1 OR handle_hi = $1
           ORDER BY last_activity DESC, session_id""",
        name,
    )


async def touch_sessions(conn: asyncpg.Connection | asyncpg.Pool, activity: list[tuple[str, int]]) -> None:
    await conn.execute(
        """UPDATE registry.sessions AS s SET last_activity = greatest(s.last_activity, a.at)
           FROM unnest($1::text[], $2::bigint[]) AS a(session_id, at) WHERE s.session_id = a.session_id""",
        [session_id for session_id, _ in activity], [at for _, at in activity],
    )


async def set_consent(conn: asyncpg.Connection | asyncpg.Pool, changes: list[tuple[str, str | None, list[str], int]]) -> None:
    """(session_id, pending_for, blocked_by, version): each applied unless a later version is
    already here (reports may arrive out of order or twice)."""
    await conn.executemany(
        """UPDATE registry.sessions SET pending_for = $2, blocked_by = $3, consent_version = $4
           WHERE session_id = $1 AND consent_version < $4""",
        changes,
    )
