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
    # Devices (protocol §13): every handle has the device that registered it, entry 1 of its
    # device log, made here for handles from before exactly as Register makes it now
    # (aodm.devices.genesis_entry); a device's keys are never taken back (removed_seq).
    """
    CREATE FUNCTION registry.b64url(data bytea) RETURNS text LANGUAGE sql IMMUTABLE AS
        $$ SELECT rtrim(translate(encode(data, 'base64'), E'+/\n', '-_'), '=') $$;
    CREATE TABLE registry.devices (
        handle text NOT NULL REFERENCES registry.handles,
        device_id text NOT NULL,
        kind text NOT NULL CHECK (kind IN ('device', 'recovery')),
        sign_key bytea NOT NULL,
        box_key bytea,
        added_seq int NOT NULL,
        removed_seq int,
        PRIMARY KEY (handle, device_id)
    );
    CREATE INDEX devices_by_sign_key ON registry.devices (sign_key) WHERE removed_seq IS NULL;
    CREATE TABLE registry.device_log (
        handle text NOT NULL REFERENCES registry.handles,
        seq int NOT NULL,
        entry bytea NOT NULL,
        head text NOT NULL,
        at bigint NOT NULL,
        PRIMARY KEY (handle, seq)
    );
    INSERT INTO registry.devices (handle, device_id, kind, sign_key, box_key, added_seq)
        SELECT handle, substr(encode(sha256(sign_key), 'hex'), 1, 16), 'device', sign_key, box_key, 1
        FROM registry.handles;
    INSERT INTO registry.device_log (handle, seq, entry, head, at)
        SELECT handle, 1, genesis.entry, registry.b64url(sha256(genesis.entry)), created_at
        FROM registry.handles, LATERAL (SELECT convert_to(
            '{"Op":"register","Handle":"' || handle || '","SignKey":"' || registry.b64url(sign_key)
            || '","BoxKey":"' || registry.b64url(box_key) || '"}', 'UTF8') AS entry) AS genesis;
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
    """The handles `sign_key` is a current device of."""
    return await conn.fetch(
        """SELECT h.handle, h.sign_key, h.box_key, h.created_at FROM registry.handles AS h
           JOIN registry.devices AS d ON d.handle = h.handle
           WHERE d.sign_key = $1 AND d.removed_seq IS NULL AND d.kind = 'device' ORDER BY h.handle""",
        sign_key,
    )


# -- devices --------------------------------------------------------------------------------

_DEVICE = "device_id, kind, sign_key, box_key, added_seq"


async def device_of(conn: asyncpg.Connection, handle: str, sign_key: bytes) -> asyncpg.Record | None:
    """The current device (or recovery key) of `handle` with this signing key."""
    return await conn.fetchrow(
        f"SELECT {_DEVICE} FROM registry.devices WHERE handle = $1 AND sign_key = $2 AND removed_seq IS NULL",
        handle, sign_key,
    )


async def devices(conn: asyncpg.Connection, handle: str) -> list[asyncpg.Record]:
    """Every device `handle` ever had (removed_seq set for those removed), oldest first."""
    return await conn.fetch(
        f"SELECT {_DEVICE}, removed_seq FROM registry.devices WHERE handle = $1 ORDER BY added_seq", handle
    )


async def log_head(conn: asyncpg.Connection, handle: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT seq, head FROM registry.device_log WHERE handle = $1 ORDER BY seq DESC LIMIT 1", handle
    )


async def log_entries(conn: asyncpg.Connection, handle: str, after: int, limit: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT seq, entry FROM registry.device_log WHERE handle = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        handle, after, limit,
    )


async def log_times_since(conn: asyncpg.Connection, handle: str, since: int) -> list[int]:
    """When each entry after the first made at or after `since` was, oldest first."""
    return [row[0] for row in await conn.fetch(
        "SELECT at FROM registry.device_log WHERE handle = $1 AND seq > 1 AND at >= $2 ORDER BY seq", handle, since)]


async def append_log(conn: asyncpg.Connection, handle: str, seq: int, entry: bytes, head: str, at: int) -> None:
    await conn.execute(
        "INSERT INTO registry.device_log (handle, seq, entry, head, at) VALUES ($1, $2, $3, $4, $5)",
        handle, seq, entry, head, at,
    )


async def add_device(conn: asyncpg.Connection, handle: str, device_id: str, kind: str, sign_key: bytes,
                     box_key: bytes | None, seq: int) -> None:
    await conn.execute(
        """INSERT INTO registry.devices (handle, device_id, kind, sign_key, box_key, added_seq)
           VALUES ($1, $2, $3, $4, $5, $6)""",
        handle, device_id, kind, sign_key, box_key, seq,
    )


async def remove_device(conn: asyncpg.Connection, handle: str, device_id: str, seq: int) -> None:
    await conn.execute(
        "UPDATE registry.devices SET removed_seq = $3 WHERE handle = $1 AND device_id = $2 AND removed_seq IS NULL",
        handle, device_id, seq,
    )


async def peers_of(conn: asyncpg.Connection, handle: str) -> list[str]:
    """Every handle `handle` has a session with."""
    return [row[0] for row in await conn.fetch(
        """SELECT CASE WHEN handle_lo = $1 THEN handle_hi ELSE handle_lo END FROM registry.sessions
           WHERE handle_lo = $1 OR handle_hi = $1""",
        handle,
    )]


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
