"""One reader asking for as much as it can must not swell a session worker or stall other
readers (docs/security.md): pages are bounded in bytes, a worker holds a bounded number of
reads at once, and one signer's reads take a bounded share of those. Real processes, with
the worker's memory read from /proc and the other reader's latency before and during."""

import asyncio
import statistics
import subprocess
import sys
import time

import asyncpg
import pytest

from aodm import crypto
from aodm.client import Client
from tests.helpers import open_pair
from tests.test_faults import isolated, services

pytestmark = pytest.mark.slow

HEAVY_READS = 30  # at once, each asking for a full page of the largest messages
WAVES = 4  # of them, one after the other
MESSAGES, SIZE = 500, 45_000  # a 22 MB history: an unbounded page would hold all of it

# The heavy reader runs in a process of its own: decoding its replies must not slow the
# light reader's client, which is what is measured.
FLOOD = """
import asyncio, sys
from aodm.client import Client
from aodm.crypto import Identity

async def main(url, identity, handle, session, reads, waves):
    client = await Client.connect(url, Identity.from_json(identity.encode()), handle, timeout=120)
    try:
        print("ready", flush=True)
        for _ in range(int(waves)):
            await asyncio.gather(*(client.query_messages(session, limit=500) for _ in range(int(reads))))
    finally:
        await client.close()

asyncio.run(main(*sys.argv[1:]))
"""


def kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise LookupError(field)


async def light_reads(client: Client, session: str, n: int) -> list[float]:
    took = []
    for _ in range(n):
        started = time.perf_counter()
        await client.query_messages(session, limit=20)
        took.append(time.perf_counter() - started)
    return took


async def test_a_flood_of_heavy_reads_neither_swells_the_worker_nor_stalls_another_reader(tmp_path):
    async with isolated() as settings, services(settings, tmp_path) as stack:
        clients = [await Client.connect(settings.amqp_url, crypto.Identity.generate(), timeout=60) for _ in range(4)]
        try:
            for i, client in enumerate(clients):
                await client.register(f"reader-{i}-{time.time_ns() % 10**8}")
            heavy, peer, light, other = clients
            big, _ = await open_pair(heavy, peer)
            small, _ = await open_pair(light, other)
            for _ in range(5):
                await other.send_text(small, "a short one")
            conn = await asyncpg.connect(settings.database_url)
            try:
                await conn.execute(
                    """INSERT INTO session.messages (session_id, seq, message_id, sender, sender_key, generation, ts, content)
                       SELECT $1, g, 'big-' || g, $2, $3, 1, 1700000000000 + g, $4 FROM generate_series(1, $5) AS g""",
                    big, heavy.handle, bytes(32), bytes(SIZE), MESSAGES)
                await conn.execute("UPDATE session.sessions SET message_seq = $2 WHERE session_id = $1", big, MESSAGES)
            finally:
                await conn.close()

            worker = stack.of("session")[0].proc.pid
            before = statistics.median(await light_reads(light, small, 30))
            peak_before = kib(worker, "VmHWM")

            flood = subprocess.Popen(
                [sys.executable, "-c", FLOOD, settings.amqp_url, heavy.identity.to_json().decode(), heavy.handle, big,
                 str(HEAVY_READS), str(WAVES)], stdout=subprocess.PIPE, text=True)
            assert flood.stdout.readline().strip() == "ready"
            started = time.perf_counter()
            during = []
            while flood.poll() is None:
                during += await light_reads(light, small, 1)
            flood_s = time.perf_counter() - started
            assert flood.returncode == 0
            grew_mib = (kib(worker, "VmHWM") - peak_before) / 1024
        finally:
            await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        slowdown = statistics.median(during) / before
        print(f"\nlight read p50 {before * 1000:.1f} ms alone, {statistics.median(during) * 1000:.1f} ms during "
              f"{WAVES} waves of {HEAVY_READS} heavy reads ({len(during)} reads over {flood_s:.1f} s, {slowdown:.1f}x; "
              f"p90 {statistics.quantiles(during, n=10)[-1] * 1000:.1f} ms); "
              f"worker peak memory +{grew_mib:.0f} MiB")
        assert len(during) >= 10, "the flood was over too soon to measure anything"
        assert grew_mib < 100, "the worker held the heavy pages at once"
        assert slowdown < 10, "the heavy reader held the other one up"
