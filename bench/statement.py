"""What PostgreSQL pays per SendMessage statement, with its plan made once per connection
against planned at every call (python -m bench.statement).

SendMessage stores a batch with one statement, `session.store_messages` (services/session/
store.py), whose plan is generic and made once per connection. The comparisons, in the same
run and database: the same function with PostgreSQL's own choice for it, which for this
statement is a fresh (custom) plan at every call; and the version before message requests
(`session.append_messages`, the same statement without the consent rules), to show what
those cost. At a steady load most batches hold one to
a few messages, so what a call costs beyond its rows decides the database's share. Measured:
the server backend's CPU (`/proc/<pid>/stat`, so PostgreSQL must run on this machine) and
the wall time per call, at batches of 1, 4, 20 and 100 messages over 1,000 keyed sessions."""

import argparse
import asyncio
import os
import re
import secrets
import time

import asyncpg

from bench.env import cpu_seconds
from bench.progress import say
from services.session import store
from shared import db
from tests.isolation import drop_database, new_database

SESSIONS = 1000
CONTENT = secrets.token_bytes(700)  # about what a 1 KiB SendMessage envelope carries


# The version the services call (the one before it stays for workers not yet replaced), and
# the lease its messages are written under: all on shard 0, taken once.
CURRENT = ("session.store_messages(bigint, text[], int[], text[], text[], bytea[], bytea[], bool[], int[], bigint[], "
           "int)")
BEFORE_CONSENT = "append_messages"
REQUEST_MESSAGES = 3
EPOCH = 1


async def prepare(dsn: str) -> None:
    pool = await db.connect(dsn, size=1)
    try:
        await db.migrate(pool, store.SCHEMA, store.MIGRATIONS)
        await pool.executemany(
            "INSERT INTO session.sessions (session_id, created_at, key_generation) VALUES ($1, 0, 1)",
            [(f"s{i}",) for i in range(SESSIONS)],
        )
        # The comparison: the same function without its SET clauses (plan choice left to
        # PostgreSQL, seq scans allowed), under another name.
        definition = await pool.fetchval(f"SELECT pg_get_functiondef('{CURRENT}'::regprocedure)")
        replanned = re.sub(r"(?m)^ SET .*\n", "", definition).replace(
            "session.store_messages(", "session.store_messages_replanned(", 1)
        await pool.execute(replanned)
        async with pool.acquire() as conn:
            assert await store.take_shard(conn, 0, "bench") == EPOCH
        await pool.execute("ANALYZE")
    finally:
        await pool.close()


# The backend's CPU is read in clock ticks (10 ms here): a measurement goes on until it has
# spanned this much, so that one tick more or less is a few per cent, never the whole figure.
MIN_CPU_S = 0.25


async def calls(conn: asyncpg.Connection, function: str, batch: int, count: int,
                min_cpu: float = MIN_CPU_S) -> tuple[float, float]:
    """(backend CPU µs, wall µs) per call, over `count` calls or more (see MIN_CPU_S)."""
    backend = conn.get_server_pid()
    consent = function != BEFORE_CONSENT  # the current statement takes the request bound too
    statement = f"SELECT * FROM session.{function}($1, $2, $3, $4, $5, $6, $7, $8, $9, $10{', $11' * consent})"
    cpu, started, k = cpu_seconds(backend), time.perf_counter(), 0
    while k < count or cpu_seconds(backend) - cpu < min_cpu:
        sessions = [f"s{(k * batch + j) % SESSIONS}" for j in range(batch)]
        rows = await conn.fetch(statement, int(time.time() * 1000), sessions, [None] * batch,
                                [secrets.token_hex(16) for _ in range(batch)], ["alice"] * batch,
                                [b"k" * 32] * batch, [CONTENT] * batch, [True] * batch, [0] * batch, [EPOCH] * batch,
                                *([REQUEST_MESSAGES] if consent else []))
        assert len(rows) == batch and all(row["seq"] for row in rows)  # every one stored
        k += 1
    return (cpu_seconds(backend) - cpu) / k * 1e6, (time.perf_counter() - started) / k * 1e6


async def run(messages: int) -> list[dict]:
    name, dsn = await new_database("aodm_bench_statement")
    try:
        await prepare(dsn)
        rows = []
        for batch in (1, 4, 20, 100):
            count = max(20, messages // batch)
            figures: dict[str, list[tuple[float, float]]] = {
                "store_messages": [], "store_messages_replanned": [], BEFORE_CONSENT: []}
            for _ in range(2):  # interleaved, each on a fresh connection (its own plan), the better of two
                for function in figures:
                    conn = await asyncpg.connect(dsn)
                    try:
                        await calls(conn, function, batch, 10, min_cpu=0)  # the plan made, caches warm
                        figures[function].append(await calls(conn, function, batch, count))
                    finally:
                        await conn.close()
            once, every, before = (min(figures[f]) for f in figures)
            say(f"batch {batch}: {once[0]:.0f} against {every[0]:.0f} µs of PostgreSQL CPU per call "
                f"({before[0]:.0f} before message requests)")
            rows.append({"batch": batch, "once_cpu": once[0], "once_wall": once[1],
                         "every_cpu": every[0], "every_wall": every[1], "before_cpu": before[0], "before_wall": before[1]})
        return rows
    finally:
        await drop_database(name)


def table(rows: list[dict]) -> str:
    lines = [
        "| messages per statement | PostgreSQL CPU µs per call, planned once | planned at every call | ÷ | "
        "before message requests (planned once) | ÷ | wall µs per call, planned once | planned at every call |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['batch']} | {r['once_cpu']:.0f} | {r['every_cpu']:.0f} | {r['once_cpu'] / r['every_cpu']:.2f}× | "
        f"{r['before_cpu']:.0f} | {r['once_cpu'] / r['before_cpu']:.2f}× | {r['once_wall']:.0f} | {r['every_wall']:.0f} |"
        for r in rows
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.statement", description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=4000, help="stored per batch size and variant (default 4000)")
    args = parser.parse_args(argv)
    say(f"== PostgreSQL per SendMessage statement, {os.cpu_count()} cores")
    print(table(asyncio.run(run(args.messages))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
