"""All of the session worker's SQL. It owns the `session` schema; every table is keyed
by session_id first, so the schema can be distributed by session (see docs/scaling.md)."""

import asyncpg

from shared.requests_store import requests_lookup, requests_replanned, requests_table

SCHEMA = "session"
# The advisory lock class of the shard leases (the lock's second key is the shard).
LEASE_LOCK = "hashtext('session.shard_leases')"
LEASE_WAIT_S = 5.0  # how long a take waits for the old owner's writes before ending them

MIGRATIONS = [
    requests_table(SCHEMA)
    + """
    CREATE TABLE session.sessions (
        session_id text PRIMARY KEY,
        created_at bigint NOT NULL,
        key_generation int NOT NULL DEFAULT 0,
        message_seq bigint NOT NULL DEFAULT 0,
        last_timestamp bigint NOT NULL DEFAULT 0
    );
    CREATE TABLE session.members (
        session_id text NOT NULL REFERENCES session.sessions,
        handle text NOT NULL,
        sign_key bytea NOT NULL,
        box_key bytea NOT NULL,
        PRIMARY KEY (session_id, handle)
    );
    CREATE TABLE session.keys (
        session_id text NOT NULL,
        generation int NOT NULL,
        handle text NOT NULL,
        box_key bytea NOT NULL,
        sealed_key bytea NOT NULL,
        rotated_by text NOT NULL,
        created_at bigint NOT NULL,
        PRIMARY KEY (session_id, generation, handle)
    );
    CREATE TABLE session.messages (
        session_id text NOT NULL,
        seq bigint NOT NULL,
        message_id text NOT NULL,
        sender text NOT NULL,
        sender_key bytea NOT NULL,
        generation int NOT NULL,
        ts bigint NOT NULL,
        content bytea NOT NULL,
        PRIMARY KEY (session_id, seq)
    );
    CREATE INDEX messages_by_time ON session.messages (session_id, ts, seq);
    """,
    requests_lookup(SCHEMA),
    # SendMessage keeps its record in the same table, written by the statement that stores
    # the message: the request id with the message it stored, which answers for it (no
    # stored reply). The lookup is a function of its own so that it is planned at each call:
    # a plan cached while the table was empty would scan the whole table ever after.
    """
    ALTER TABLE session.requests ADD COLUMN session_id text, ADD COLUMN seq bigint;
    CREATE FUNCTION session.stored_messages(ids text[])
    RETURNS TABLE (message_id text, seq bigint, ts bigint, generation int)
    LANGUAGE sql STABLE SET plan_cache_mode = force_custom_plan AS $$
        SELECT r.id, m.seq, m.ts, m.generation
        FROM session.requests AS r JOIN session.messages AS m ON m.session_id = r.session_id AND m.seq = r.seq
        WHERE r.id = ANY(ids)
    $$;
    """,
    requests_replanned(SCHEMA),
    # SendMessage's one statement, as a function whose plan is made once per connection
    # (generic) rather than at every call: at a steady load most batches hold one to a few
    # messages, and planning this statement at each call took as much CPU as running it
    # (`python -m bench.statement`: 592 → 245 µs of PostgreSQL CPU per one-message call,
    # 730 → 360 at four; docs/performance.md). A plan made once must not depend on how big the tables were
    # when it was made (it may be made on empty ones): with seq scans off, every table is
    # reached through its primary key, which is the right plan at any size.
    # (session.stored_messages stays: workers of the previous version call it until they are replaced.)
    """
    CREATE FUNCTION session.append_messages(
        now bigint, session_ids text[], generations int[], message_ids text[], senders text[],
        sender_keys bytea[], contents bytea[], fresh bool[]
    ) RETURNS TABLE (message_id text, stored_before bool, current int, seq bigint, ts bigint, generation int)
    LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $fn$
    #variable_conflict use_column
    BEGIN
        -- A message stored before (the same request again) is left as it is. A new one is
        -- taken when it is fresh, its session has a key and the generation named (none: the
        -- current one) exists; each session's next sequence numbers go in list order, with
        -- a timestamp that never goes backwards within the session (so (timestamp, seq)
        -- order is arrival order). Each stored message is recorded in session.requests
        -- under its request id by the same statement: two workers storing the same message
        -- at once (a shard handover) meet its primary key, and the later one's statement
        -- fails whole. The record lives in that small table, pruned like the others, rather
        -- than as a unique index over every message ever stored: probing and inserting at
        -- random places of an index that size costs a disk read and a full-page WAL write.
        RETURN QUERY
        WITH batch AS (
            SELECT * FROM unnest(session_ids, generations, message_ids, senders, sender_keys, contents, fresh)
                WITH ORDINALITY AS b(session_id, generation, message_id, sender, sender_key, content, fresh, position)
        ), earlier AS (
            SELECT r.id AS message_id, m.seq, m.ts, m.generation
            FROM session.requests AS r JOIN session.messages AS m ON m.session_id = r.session_id AND m.seq = r.seq
            WHERE r.id = ANY(message_ids)
        ), current AS (
            SELECT s.session_id, s.key_generation FROM session.sessions AS s WHERE s.session_id = ANY(session_ids)
        ), accepted AS (
            SELECT b.* FROM batch AS b JOIN current AS c USING (session_id)
            WHERE b.fresh AND b.message_id NOT IN (SELECT e.message_id FROM earlier AS e)
              AND c.key_generation >= 1 AND (b.generation IS NULL OR b.generation BETWEEN 1 AND c.key_generation)
        ), counts AS (
            SELECT a.session_id, count(*) AS n FROM accepted AS a GROUP BY a.session_id
        ), advanced AS (
            UPDATE session.sessions AS s
            SET message_seq = s.message_seq + c.n, last_timestamp = greatest(s.last_timestamp, now)
            FROM counts AS c WHERE s.session_id = c.session_id
            RETURNING s.session_id, s.message_seq - c.n AS base, s.last_timestamp, s.key_generation
        ), stored AS (
            INSERT INTO session.messages (session_id, seq, message_id, sender, sender_key, generation, ts, content)
            SELECT a.session_id, v.base + row_number() OVER (PARTITION BY a.session_id ORDER BY a.position),
                   a.message_id, a.sender, a.sender_key, coalesce(a.generation, v.key_generation), v.last_timestamp, a.content
            FROM accepted AS a JOIN advanced AS v USING (session_id)
            RETURNING session_id, message_id, seq, ts, generation
        ), recorded AS (
            INSERT INTO session.requests (id, session_id, seq) SELECT s.message_id, s.session_id, s.seq FROM stored AS s
        )
        SELECT b.message_id, e.message_id IS NOT NULL, coalesce(c.key_generation, 0),
               coalesce(e.seq, s.seq), coalesce(e.ts, s.ts), coalesce(e.generation, s.generation)
        FROM batch AS b LEFT JOIN current AS c USING (session_id)
             LEFT JOIN earlier AS e USING (message_id) LEFT JOIN stored AS s USING (message_id);
    END $fn$;
    """,
    # Shard leases: the fence that keeps a worker which lost a shard (frozen, cut off from
    # the broker, or too slow to finish before another took it) from writing for it ever
    # again. Taking a shard raises its epoch under the shard's advisory lock, held
    # exclusively; every write of a shard's requests holds that lock shared and names the
    # epoch it was delivered under, and writes nothing when the epoch has moved. So a take
    # waits for the writes under way, and none of the old owner's commits after it.
    # (append_messages gains its lease arguments as an overload: workers of the previous
    # version call the old one until they are replaced.)
    f"""
    CREATE TABLE session.shard_leases (
        shard int PRIMARY KEY,
        epoch bigint NOT NULL,
        owner text NOT NULL,
        taken_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE FUNCTION session.take_shard(shard int, owner text) RETURNS bigint
    LANGUAGE plpgsql AS $fn$
    #variable_conflict use_column
    DECLARE taken bigint;
    BEGIN
        PERFORM pg_advisory_xact_lock({LEASE_LOCK}, take_shard.shard);
        INSERT INTO session.shard_leases AS l (shard, epoch, owner) VALUES (take_shard.shard, 1, take_shard.owner)
        ON CONFLICT (shard) DO UPDATE SET epoch = l.epoch + 1, owner = excluded.owner, taken_at = now()
        RETURNING l.epoch INTO taken;
        RETURN taken;
    END $fn$;
    CREATE FUNCTION session.lost_leases(shards int[], epochs bigint[]) RETURNS TABLE (shard int, epoch bigint)
    LANGUAGE plpgsql SET enable_seqscan = off AS $fn$
    #variable_conflict use_column
    BEGIN
        -- Shared, in a fixed order: the owner's writes run side by side; a take waits for them.
        PERFORM pg_advisory_xact_lock_shared({LEASE_LOCK}, held.shard)
        FROM (SELECT DISTINCT s AS shard FROM unnest(shards) AS s WHERE s IS NOT NULL ORDER BY 1) AS held;
        -- A statement of its own, so it sees a take that this one waited for.
        RETURN QUERY
        SELECT DISTINCT h.shard, h.epoch FROM unnest(shards, epochs) AS h(shard, epoch)
        JOIN session.shard_leases AS l ON l.shard = h.shard WHERE l.epoch <> h.epoch;
    END $fn$;
    """
    + """
    CREATE FUNCTION session.append_messages(
        now bigint, session_ids text[], generations int[], message_ids text[], senders text[],
        sender_keys bytea[], contents bytea[], fresh bool[], shards int[], epochs bigint[]
    ) RETURNS TABLE (message_id text, stored_before bool, current int, seq bigint, ts bigint, generation int, fenced bool)
    LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $fn$
    #variable_conflict use_column
    BEGIN
        -- As the version before, but a message whose shard another worker has taken since it
        -- was delivered (its epoch moved) is neither stored nor looked up: `fenced`.
        PERFORM * FROM session.lost_leases(shards, epochs);  -- the leases, held until the commit
        RETURN QUERY
        WITH batch AS (
            SELECT b.*, coalesce(l.epoch <> b.epoch, false) AS fenced
            FROM unnest(session_ids, generations, message_ids, senders, sender_keys, contents, fresh, shards, epochs)
                WITH ORDINALITY AS b(session_id, generation, message_id, sender, sender_key, content, fresh, shard, epoch, position)
            LEFT JOIN session.shard_leases AS l ON l.shard = b.shard
        ), earlier AS (
            SELECT r.id AS message_id, m.seq, m.ts, m.generation
            FROM session.requests AS r JOIN session.messages AS m ON m.session_id = r.session_id AND m.seq = r.seq
            WHERE r.id = ANY(message_ids)
        ), current AS (
            SELECT s.session_id, s.key_generation FROM session.sessions AS s WHERE s.session_id = ANY(session_ids)
        ), accepted AS (
            SELECT b.* FROM batch AS b JOIN current AS c USING (session_id)
            WHERE b.fresh AND NOT b.fenced AND b.message_id NOT IN (SELECT e.message_id FROM earlier AS e)
              AND c.key_generation >= 1 AND (b.generation IS NULL OR b.generation BETWEEN 1 AND c.key_generation)
        ), counts AS (
            SELECT a.session_id, count(*) AS n FROM accepted AS a GROUP BY a.session_id
        ), advanced AS (
            UPDATE session.sessions AS s
            SET message_seq = s.message_seq + c.n, last_timestamp = greatest(s.last_timestamp, now)
            FROM counts AS c WHERE s.session_id = c.session_id
            RETURNING s.session_id, s.message_seq - c.n AS base, s.last_timestamp, s.key_generation
        ), stored AS (
            INSERT INTO session.messages (session_id, seq, message_id, sender, sender_key, generation, ts, content)
            SELECT a.session_id, v.base + row_number() OVER (PARTITION BY a.session_id ORDER BY a.position),
                   a.message_id, a.sender, a.sender_key, coalesce(a.generation, v.key_generation), v.last_timestamp, a.content
            FROM accepted AS a JOIN advanced AS v USING (session_id)
            RETURNING session_id, message_id, seq, ts, generation
        ), recorded AS (
            INSERT INTO session.requests (id, session_id, seq) SELECT s.message_id, s.session_id, s.seq FROM stored AS s
        )
        SELECT b.message_id, e.message_id IS NOT NULL AND NOT b.fenced, coalesce(c.key_generation, 0),
               coalesce(e.seq, s.seq), coalesce(e.ts, s.ts), coalesce(e.generation, s.generation), b.fenced
        FROM batch AS b LEFT JOIN current AS c USING (session_id)
             LEFT JOIN earlier AS e ON e.message_id = b.message_id AND NOT b.fenced
             LEFT JOIN stored AS s ON s.message_id = b.message_id;
    END $fn$;
    """,
    # Message requests: a session opened by one member is a request to the other
    # (pending_for) until it accepts, by Accept or by sending; until then the opener may
    # store only a few messages (pending_sent counts them). A member that blocks the other
    # is in blocked_by. consent_version counts the changes (the registry's chat lists keep
    # the latest). Sessions from before are accepted. The send statement becomes
    # store_messages, which also applies consent; append_messages stays for workers of the
    # previous version until they are replaced.
    """
    ALTER TABLE session.sessions
        ADD COLUMN pending_for text,
        ADD COLUMN blocked_by text[] NOT NULL DEFAULT '{}',
        ADD COLUMN pending_sent int NOT NULL DEFAULT 0,
        ADD COLUMN consent_version int NOT NULL DEFAULT 0;
    CREATE FUNCTION session.store_messages(
        now bigint, session_ids text[], generations int[], message_ids text[], senders text[],
        sender_keys bytea[], contents bytea[], fresh bool[], shards int[], epochs bigint[], request_messages int
    ) RETURNS TABLE (message_id text, stored_before bool, current int, seq bigint, ts bigint, generation int,
                     fenced bool, refused text, quiet bool, accepted bool, consent_version int)
    LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $fn$
    #variable_conflict use_column
    BEGIN
        -- As append_messages, and a message is taken only if the session's consent lets its
        -- sender send: accepted; or the sender is the member a request waits for (its send
        -- accepts the request, for the messages after it in the batch too); or the opener
        -- of a pending request with fewer than request_messages stored. `refused` says why
        -- not (not_accepted, you_blocked); `quiet`: the recipient gets no notification (a
        -- request's messages after its first).
        PERFORM * FROM session.lost_leases(shards, epochs);  -- the leases, held until the commit
        RETURN QUERY
        WITH batch AS (
            SELECT b.*, coalesce(l.epoch <> b.epoch, false) AS fenced
            FROM unnest(session_ids, generations, message_ids, senders, sender_keys, contents, fresh, shards, epochs)
                WITH ORDINALITY AS b(session_id, generation, message_id, sender, sender_key, content, fresh, shard, epoch, position)
            LEFT JOIN session.shard_leases AS l ON l.shard = b.shard
        ), earlier AS (
            SELECT r.id AS message_id, m.seq, m.ts, m.generation
            FROM session.requests AS r JOIN session.messages AS m ON m.session_id = r.session_id AND m.seq = r.seq
            WHERE r.id = ANY(message_ids)
        ), current AS (
            SELECT s.session_id, s.key_generation, s.pending_for, s.blocked_by, s.pending_sent
            FROM session.sessions AS s WHERE s.session_id = ANY(session_ids)
        ), storable AS (
            SELECT b.*, c.pending_for, c.blocked_by, c.pending_sent,
                   coalesce(b.sender = c.pending_for, false) AS accepts
            FROM batch AS b JOIN current AS c USING (session_id)
            WHERE b.fresh AND NOT b.fenced AND b.message_id NOT IN (SELECT e.message_id FROM earlier AS e)
              AND c.key_generation >= 1 AND (b.generation IS NULL OR b.generation BETWEEN 1 AND c.key_generation)
        ), ordered AS (
            SELECT s.*,
                   coalesce(bool_or(s.accepts) OVER (PARTITION BY s.session_id ORDER BY s.position
                       ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), false) AS accepted_before,
                   count(*) FILTER (WHERE s.pending_for IS NOT NULL AND NOT s.accepts)
                       OVER (PARTITION BY s.session_id ORDER BY s.position ROWS UNBOUNDED PRECEDING) AS asked
            FROM storable AS s
        ), judged AS (
            SELECT o.*, CASE
                WHEN cardinality(o.blocked_by) > 0 THEN NULL
                WHEN o.pending_for IS NULL OR o.accepts OR o.accepted_before THEN true
                ELSE o.pending_sent + o.asked <= request_messages
            END AS allowed
            FROM ordered AS o
        ), accepted AS (
            SELECT j.* FROM judged AS j WHERE j.allowed
        ), counts AS (
            SELECT a.session_id, count(*) AS n, bool_or(a.accepts) AS accepts,
                   count(*) FILTER (WHERE a.pending_for IS NOT NULL AND NOT a.accepts AND NOT a.accepted_before) AS asked
            FROM accepted AS a GROUP BY a.session_id
        ), advanced AS (
            UPDATE session.sessions AS s
            SET message_seq = s.message_seq + c.n, last_timestamp = greatest(s.last_timestamp, now),
                pending_sent = s.pending_sent + c.asked,
                pending_for = CASE WHEN c.accepts THEN NULL ELSE s.pending_for END,
                consent_version = s.consent_version + c.accepts::int
            FROM counts AS c WHERE s.session_id = c.session_id
            RETURNING s.session_id, s.message_seq - c.n AS base, s.last_timestamp, s.key_generation, s.consent_version
        ), stored AS (
            INSERT INTO session.messages (session_id, seq, message_id, sender, sender_key, generation, ts, content)
            SELECT a.session_id, v.base + row_number() OVER (PARTITION BY a.session_id ORDER BY a.position),
                   a.message_id, a.sender, a.sender_key, coalesce(a.generation, v.key_generation), v.last_timestamp, a.content
            FROM accepted AS a JOIN advanced AS v USING (session_id)
            RETURNING session_id, message_id, seq, ts, generation
        ), recorded AS (
            INSERT INTO session.requests (id, session_id, seq) SELECT s.message_id, s.session_id, s.seq FROM stored AS s
        )
        SELECT b.message_id, e.message_id IS NOT NULL AND NOT b.fenced, coalesce(c.key_generation, 0),
               coalesce(e.seq, s.seq), coalesce(e.ts, s.ts), coalesce(e.generation, s.generation), b.fenced,
               CASE WHEN j.allowed IS NOT TRUE AND j.message_id IS NOT NULL THEN
                   CASE WHEN b.sender = ANY(j.blocked_by) THEN 'you_blocked' ELSE 'not_accepted' END END,
               -- A request's first message is notified (with the session and its first key,
               -- what the recipient needs to read the request), the rest are not. Stored
               -- before: judged by the consent now (the opener's messages are seq 1, 2, ...).
               CASE WHEN j.message_id IS NOT NULL
                   THEN j.pending_for IS NOT NULL AND NOT j.accepts AND NOT j.accepted_before AND j.pending_sent + j.asked > 1
                   ELSE coalesce((c.pending_for IS NOT NULL AND c.pending_for IS DISTINCT FROM b.sender AND e.seq > 1)
                                 OR cardinality(c.blocked_by) > 0, false) END,
               coalesce(j.accepts AND s.seq IS NOT NULL, false), v.consent_version
        FROM batch AS b LEFT JOIN current AS c USING (session_id)
             LEFT JOIN earlier AS e ON e.message_id = b.message_id AND NOT b.fenced
             LEFT JOIN stored AS s ON s.message_id = b.message_id
             LEFT JOIN judged AS j ON j.message_id = b.message_id
             LEFT JOIN advanced AS v ON v.session_id = b.session_id;
    END $fn$;
    """,
    # Devices (protocol §10.8): each handle's current devices as the registry last told
    # (none: the first device, from Spawn), and key batches with one sealed key per device.
    """
    CREATE TABLE session.handle_devices (
        handle text PRIMARY KEY,
        seq int NOT NULL,
        sign_keys bytea[] NOT NULL,
        box_keys bytea[] NOT NULL
    );
    ALTER TABLE session.keys DROP CONSTRAINT keys_pkey, ADD PRIMARY KEY (session_id, generation, handle, box_key);
    """,
]


async def create_session(
    conn: asyncpg.Connection, session_id: str, at: int, members: list[tuple[str, bytes, bytes]], pending_for: str | None
) -> None:
    """Idempotent: a repeated Spawn changes nothing, and never adds members to a session."""
    async with conn.transaction():
        created = await conn.fetchval(
            """INSERT INTO session.sessions (session_id, created_at, pending_for) VALUES ($1, $2, $3)
               ON CONFLICT DO NOTHING RETURNING true""",
            session_id, at, pending_for,
        )
        if not created:
            return
        await conn.executemany(
            """INSERT INTO session.members (session_id, handle, sign_key, box_key) VALUES ($1, $2, $3, $4)
               ON CONFLICT DO NOTHING""",
            [(session_id, *member) for member in members],
        )


async def handle_devices(conn: asyncpg.Connection, handle: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT sign_keys, box_keys FROM session.handle_devices WHERE handle = $1", handle)


async def set_handle_devices(conn: asyncpg.Connection, handle: str, seq: int, sign_keys: list[bytes],
                             box_keys: list[bytes]) -> bool:
    """Keep `handle`'s devices as of its log's entry `seq`, unless a later entry's are here."""
    return bool(await conn.fetchval(
        """INSERT INTO session.handle_devices AS d (handle, seq, sign_keys, box_keys) VALUES ($1, $2, $3, $4)
           ON CONFLICT (handle) DO UPDATE SET seq = excluded.seq, sign_keys = excluded.sign_keys,
                                              box_keys = excluded.box_keys
           WHERE d.seq < excluded.seq RETURNING true""",
        handle, seq, sign_keys, box_keys,
    ))


async def members(conn: asyncpg.Connection, session_id: str) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT handle, sign_key, box_key FROM session.members WHERE session_id = $1", session_id
    )


async def next_generation(
    conn: asyncpg.Connection, session_id: str, caller: str, request_generations: int
) -> asyncpg.Record | None:
    """The new `generation`, and whom the session still waits on (`pending_for`). The row
    lock serialises rotations of one session: generations stay consecutive. None: the
    session's consent does not let the caller rotate (a blocked session, or the opener of a
    request that already has `request_generations`)."""
    return await conn.fetchrow(
        """UPDATE session.sessions SET key_generation = key_generation + 1
           WHERE session_id = $1 AND cardinality(blocked_by) = 0
             AND (pending_for IS NULL OR pending_for = $2 OR key_generation < $3)
           RETURNING key_generation AS generation, pending_for""",
        session_id, caller, request_generations,
    )


async def consent(conn: asyncpg.Connection, session_id: str) -> asyncpg.Record:
    return await conn.fetchrow(
        "SELECT pending_for, blocked_by, consent_version FROM session.sessions WHERE session_id = $1", session_id
    )


# Each consent change moves consent_version on; a request that changes nothing leaves it.
_CONSENT_CHANGES = {
    "accept": """UPDATE session.sessions
        SET pending_for = nullif(pending_for, $2), blocked_by = array_remove(blocked_by, $2),
            consent_version = consent_version + 1
        WHERE session_id = $1 AND (pending_for = $2 OR $2 = ANY(blocked_by))""",
    "block": """UPDATE session.sessions
        SET pending_for = nullif(pending_for, $2), blocked_by = blocked_by || $2, consent_version = consent_version + 1
        WHERE session_id = $1 AND NOT $2 = ANY(blocked_by)""",
    "unblock": """UPDATE session.sessions
        SET blocked_by = array_remove(blocked_by, $2), consent_version = consent_version + 1
        WHERE session_id = $1 AND $2 = ANY(blocked_by)""",
}


async def change_consent(conn: asyncpg.Connection, session_id: str, caller: str, change: str) -> asyncpg.Record | None:
    """The session's consent after `change` by `caller`; None when it changed nothing."""
    return await conn.fetchrow(
        _CONSENT_CHANGES[change] + " RETURNING pending_for, blocked_by, consent_version", session_id, caller
    )


async def insert_key_batch(
    conn: asyncpg.Connection, session_id: str, generation: int, rotated_by: str, at: int, entries: list[tuple[str, bytes, bytes]]
) -> None:
    await conn.executemany(
        """INSERT INTO session.keys (session_id, generation, handle, box_key, sealed_key, rotated_by, created_at)
           VALUES ($1, $2, $3, $4, $5, $6, $7)""",
        [(session_id, generation, handle, box, sealed, rotated_by, at) for handle, box, sealed in entries],
    )


async def share_keys(conn: asyncpg.Connection, session_id: str, generation: int,
                     entries: list[tuple[str, bytes, bytes]]) -> int:
    """Add keys to an existing batch (same rotator and time); a device that has one keeps
    it. Returns how many were added."""
    return await conn.fetchval(
        """WITH batch AS (SELECT rotated_by, created_at FROM session.keys WHERE session_id = $1 AND generation = $2 LIMIT 1),
                added AS (
                    INSERT INTO session.keys (session_id, generation, handle, box_key, sealed_key, rotated_by, created_at)
                    SELECT $1, $2, e.handle, e.box_key, e.sealed_key, b.rotated_by, b.created_at
                    FROM unnest($3::text[], $4::bytea[], $5::bytea[]) AS e(handle, box_key, sealed_key), batch AS b
                    ON CONFLICT DO NOTHING RETURNING 1)
           SELECT count(*) FROM added""",
        session_id, generation, [e[0] for e in entries], [e[1] for e in entries], [e[2] for e in entries],
    )


async def sealed_to(conn: asyncpg.Connection, session_id: str, generation: int) -> list[asyncpg.Record]:
    """(handle, box_key) of each key in a batch; none for a generation that does not exist."""
    return await conn.fetch(
        "SELECT handle, box_key FROM session.keys WHERE session_id = $1 AND generation = $2", session_id, generation
    )


async def current_generation(conn: asyncpg.Connection, session_id: str) -> int:
    return await conn.fetchval("SELECT key_generation FROM session.sessions WHERE session_id = $1", session_id)


async def key_batch(conn: asyncpg.Connection, session_id: str, generation: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        """SELECT handle, box_key, sealed_key, rotated_by, created_at FROM session.keys
           WHERE session_id = $1 AND generation = $2 ORDER BY handle, box_key""",
        session_id, generation,
    )


async def store_messages(
    conn: asyncpg.Connection, now: int,
    messages: list[tuple[str, int | None, str, str, bytes, bytes, bool, int | None, int | None]],
    request_messages: int,
) -> dict[str, asyncpg.Record]:
    """Store a batch of (session_id, generation, message_id, sender, sender_key, content,
    fresh, shard, epoch) in one statement (session.store_messages, above), atomic without
    a transaction around it. By message_id: `stored_before`, the `current` generation, seq,
    ts and generation of the stored message (NULL when it was not taken), `fenced`, and
    the consent's say: `refused`, `quiet`, `accepted` (with the `consent_version` then)."""
    rows = await conn.fetch(
        "SELECT * FROM session.store_messages($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        now, *map(list, zip(*messages, strict=True)), request_messages,
    )
    return {row["message_id"]: row for row in rows}


async def take_shard(conn: asyncpg.Connection, shard: int, owner: str, *, wait_s: float = LEASE_WAIT_S) -> int:
    """The shard's next epoch, once no write under an earlier one is under way. A write
    that holds the shard longer than `wait_s` belongs to an owner that lost it while in the
    middle of a transaction (frozen, say): its connection is ended, which rolls it back."""
    while True:
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = {int(wait_s * 1000)}")
                return await conn.fetchval("SELECT session.take_shard($1, $2)", shard, owner)
        except asyncpg.LockNotAvailableError:
            await conn.fetchval(_END_HOLDERS, shard)


# The backends holding the shard's lease lock shared (advisory locks with two int4 keys show
# the first as classid, an oid, and the second as objid, with objsubid 2).
_END_HOLDERS = f"""
    SELECT count(pg_terminate_backend(l.pid)) FROM pg_locks AS l
    WHERE l.locktype = 'advisory' AND l.objsubid = 2 AND l.granted AND l.mode = 'ShareLock'
      AND l.classid::bigint = ({LEASE_LOCK}::bigint & 4294967295) AND l.objid::bigint = $1
      AND l.pid <> pg_backend_pid()
"""


async def lost_leases(conn: asyncpg.Connection, leases: list[tuple[int, int]]) -> set[tuple[int, int]]:
    """Within a transaction: hold these (shard, epoch) leases until it ends, and name those
    whose shard has moved on to a later epoch (another worker holds it now)."""
    shards, epochs = zip(*leases, strict=True)
    rows = await conn.fetch("SELECT shard, epoch FROM session.lost_leases($1, $2)", list(shards), list(epochs))
    return {(row["shard"], row["epoch"]) for row in rows}


# A page of at most $6 messages, cut once the content before a message reaches $7 bytes
# (so never empty). The sizes are read from the rows' headers (octet_length of a stored value
# does not fetch it), over the $6 candidates only; `fetched` says how many there were.
_PAGE = """
    SELECT seq, message_id, sender, sender_key, generation, ts, content, fetched FROM (
        SELECT candidates.*, count(*) OVER () AS fetched,
               sum(octet_length(content)) OVER (ORDER BY ts {dir}, seq {dir} ROWS UNBOUNDED PRECEDING)
                   - octet_length(content) AS before
        FROM (
            SELECT seq, message_id, sender, sender_key, generation, ts, content FROM session.messages
            WHERE session_id = $1 AND ts >= $2 AND ts <= $3 AND (ts, seq) {cmp} ($4, $5)
            ORDER BY ts {dir}, seq {dir} LIMIT $6
        ) AS candidates
    ) AS sized
    WHERE before < $7
    ORDER BY ts {dir}, seq {dir}
"""
_PAGE_ASC = _PAGE.format(cmp=">", dir="ASC")
_PAGE_DESC = _PAGE.format(cmp="<", dir="DESC")


async def message_page(
    conn: asyncpg.Connection, session_id: str, lo: int, hi: int, after: tuple[int, int], limit: int, descending: bool,
    max_bytes: int,
) -> list[asyncpg.Record]:
    """Keyset paging on (ts, seq): stable under concurrent inserts, no gap, no duplicate."""
    return await conn.fetch(_PAGE_DESC if descending else _PAGE_ASC, session_id, lo, hi, *after, limit, max_bytes)
