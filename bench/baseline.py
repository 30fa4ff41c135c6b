"""The baseline: the least a message pipeline on this RabbitMQ and PostgreSQL must do, tuned
honestly, run as its own process beside the services (python -m bench.baseline). It talks
AMQP through aodm's own transport (`aodm.transport.Bus` on the services' fast path: confirms,
mandatory, a batch of publishes in one frame run, consumers on raw aiormq channels with
direct deliveries), so the comparison measures what aodm does per message, not which client
library path it takes.

Modes (BENCH_BASELINE_MODE):

- `a` — one transaction per message. Consume `bench.in` (prefetch 64, 8 handler tasks, like
  aodm's 8 shards), verify the Ed25519 signature (PyNaCl), INSERT the message (autocommit:
  its own transaction), publish a notification carrying the message to `bench.notify`
  (persistent, mandatory, publisher confirms), ack.
- `b` — group commit. Consume with prefetch 1000; take whatever is already delivered, up to
  100 messages (never waiting to fill a batch), verify each, COPY the batch in one
  transaction, publish the notifications together (`Bus.publish_all`, as the services
  publish a batch's answers) and wait for all confirms, then one ack with multiple=True.
- `rpc` — request/reply: consume `bench.rpc` (prefetch 64, 32 handler tasks), read a 50-row
  page from session.messages with aodm's own keyset query, encode it as aodm's MessagePage
  and publish the (transient) reply to reply_to, as aodm's services do.

All modes run under uvloop, as the services do. The 1 KiB message is
`verify key (32) ‖ signature (64) ‖ signed part (928)`, the signed part starting with a
16-byte message id.
"""

import asyncio
import os
import time

import aio_pika
import asyncpg
import msgspec
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from aodm.encoding import b64encode
from aodm.session_api import MessagePage, StoredMessage
from aodm.transport import Bus, Delivery, Message, Unroutable, ack_in_order
from bench.load import ReplyTarget, consume_notifications
from shared import db

IN_QUEUE = "bench.in"
NOTIFY_QUEUE = "bench.notify"
RPC_QUEUE = "bench.rpc"
MESSAGE_BYTES = 1024
SCHEMA_SQL = """
    CREATE SCHEMA IF NOT EXISTS bench;
    CREATE TABLE IF NOT EXISTS bench.messages (
        id bytea PRIMARY KEY,
        sender_key bytea NOT NULL,
        ts bigint NOT NULL,
        body bytea NOT NULL
    );
"""
_INSERT = "INSERT INTO bench.messages (id, sender_key, ts, body) VALUES ($1, $2, $3, $4)"
_PAGE = """
    SELECT seq, message_id, sender, sender_key, generation, ts, content FROM session.messages
    WHERE session_id = $1 AND ts >= $2 AND ts <= $3 AND (ts, seq) > ($4, $5)
    ORDER BY ts ASC, seq ASC LIMIT $6
"""


class PageRequest(msgspec.Struct, rename="pascal"):
    session_id: str
    from_: int = msgspec.field(name="From")
    limit: int = 50


_page_request = msgspec.json.Decoder(PageRequest)
_encoder = msgspec.json.Encoder()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _verified(body: bytes) -> tuple[bytes, bytes] | None:
    """(message id, sender key) of a correctly signed message, None otherwise."""
    if len(body) < 96 + 16:
        return None
    key, signature, signed = body[:32], body[32:96], body[96:]
    try:
        VerifyKey(key).verify(signed, signature)
    except BadSignatureError:
        return None
    return signed[:16], key


async def _notify(bus: Bus, message_id: bytes, body: bytes) -> None:
    await bus.publish("", NOTIFY_QUEUE, message_id + body, message_id=message_id.hex(),
                      content_type="application/octet-stream")


async def serve_per_message(bus: Bus, pool: asyncpg.Pool, stop: asyncio.Event) -> None:
    async def handle(delivery: Delivery) -> None:
        checked = _verified(delivery.body)
        if checked is None:
            return await delivery.reject(requeue=False)
        message_id, key = checked
        await pool.execute(_INSERT, message_id, key, now_ms(), delivery.body)
        await _notify(bus, message_id, delivery.body)
        await delivery.ack()

    consumer = await bus.consume(IN_QUEUE, handle, prefetch=64, concurrency=8)
    await stop.wait()
    await consumer.close()


async def serve_group_commit(bus: Bus, pool: asyncpg.Pool, stop: asyncio.Event) -> None:
    async def handle(batch: list[Delivery]) -> None:
        rows, good = [], []
        at = now_ms()
        for delivery in batch:
            checked = _verified(delivery.body)
            if checked is None:
                await delivery.reject(requeue=False)
                continue
            rows.append((checked[0], checked[1], at, delivery.body))
            good.append(delivery)
        if rows:
            async with pool.acquire() as conn, conn.transaction():
                await conn.copy_records_to_table(
                    "messages", schema_name="bench", records=rows, columns=["id", "sender_key", "ts", "body"]
                )
            notifications = [Message("", NOTIFY_QUEUE, row[0] + row[3], message_id=row[0].hex(),
                                     content_type="application/octet-stream") for row in rows]
            if await bus.publish_all(notifications):  # the same one write and confirm wait as the services
                raise Unroutable(NOTIFY_QUEUE)
        await ack_in_order(good)

    consumer = await bus.consume(IN_QUEUE, handle, prefetch=1000, batch=100)
    await stop.wait()
    await consumer.close()


async def serve_rpc(bus: Bus, pool: asyncpg.Pool, stop: asyncio.Event) -> None:
    async def handle(delivery: Delivery) -> None:
        request = _page_request.decode(delivery.body)
        rows = await pool.fetch(_PAGE, request.session_id, request.from_, 2**62, -1, -1, request.limit + 1)
        more = len(rows) > request.limit
        rows = rows[: request.limit]
        page = MessagePage(
            [
                StoredMessage(r["message_id"], r["seq"], r["sender"], b64encode(r["sender_key"]), r["generation"], r["ts"],
                              b64encode(r["content"]))
                for r in rows
            ],
            f"{rows[-1]['ts']}.{rows[-1]['seq']}" if more else None,
        )
        await bus.publish("", delivery.reply_to, _encoder.encode(page), correlation_id=delivery.correlation_id,
                          persistent=False)
        await delivery.ack()

    consumer = await bus.consume(RPC_QUEUE, handle, prefetch=64, concurrency=32)
    await stop.wait()
    await consumer.close()


async def serve(mode: str, amqp_url: str, database_url: str) -> None:
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    pool = await db.connect(database_url, size=10)  # the services' pool settings
    bus = await Bus.connect(amqp_url, name=f"bench-baseline-{mode}", fast=True)
    try:
        runner = {"a": serve_per_message, "b": serve_group_commit, "rpc": serve_rpc}[mode]
        await runner(bus, pool, stop)
    finally:
        await bus.close()
        await pool.close()


async def declare(bus: Bus) -> None:
    for name in (IN_QUEUE, NOTIFY_QUEUE, RPC_QUEUE):
        await bus.declare_queue(name)


# -- the load side ---------------------------------------------------------------------------


class PipelineTarget:
    """Publishes signed 1 KiB messages to bench.in; done when its notification arrives."""

    def __init__(self, buses: list[Bus], notify_connection: aio_pika.abc.AbstractConnection, timeout: float) -> None:
        self.buses = buses
        self.senders = len(buses)
        self._connection = notify_connection
        self.timeout = timeout
        self._keys = [SigningKey.generate() for _ in range(64)]
        self._filler = os.urandom(MESSAGE_BYTES - 96 - 16)
        self._waiting: dict[bytes, tuple[float, asyncio.Future]] = {}
        self.latencies: list[tuple[float, float, float]] = []  # (arrival, latency, publish time)
        self._i = 0
        self.message_bytes = MESSAGE_BYTES

    async def start(self) -> None:
        channel = await self._connection.channel()
        queue = await channel.get_queue(NOTIFY_QUEUE, ensure=False)
        await queue.purge()
        await channel.close()
        self._channel = await consume_notifications(self._connection, [NOTIFY_QUEUE], self._on_notification)

    async def stop(self) -> None:
        await self._channel.close()

    def _on_notification(self, message) -> None:  # an aiormq DeliveredMessage
        now = time.monotonic()
        entry = self._waiting.pop(message.body[:16], None)
        if entry is not None:
            sent, future = entry
            self.latencies.append((now, now - sent, sent))
            if not future.done():
                future.set_result(now)

    def pending_notifications(self, since: float) -> int:
        return sum(1 for sent, _ in self._waiting.values() if sent >= since)

    async def one(self, sender: int) -> tuple[float, float, str | None]:
        self._i += 1
        key = self._keys[self._i % len(self._keys)]
        message_id = os.urandom(16)
        signed = message_id + self._filler
        body = bytes(key.verify_key) + key.sign(signed).signature + signed
        future = asyncio.get_running_loop().create_future()
        sent = time.monotonic()
        self._waiting[message_id] = (sent, future)
        try:
            await self.buses[sender].publish("", IN_QUEUE, body, content_type="application/octet-stream")
            async with asyncio.timeout(self.timeout):
                done = await future
        except TimeoutError:
            return sent, time.monotonic(), "timeout"
        return sent, done, None


class RpcTarget(ReplyTarget):
    """The raw RPC round trip: a page request to bench.rpc, the 50-row page back."""

    def __init__(self, buses: list[Bus], pages: "callable", timeout: float) -> None:
        self.buses = buses
        self.senders = len(buses)
        self.pages = pages  # () -> (session_id, from_ts)
        self.timeout = timeout
        self.latencies: list = []
        self.short_pages = 0

    async def one(self, sender: int) -> tuple[float, float, str | None]:
        session_id, from_ts = self.pages()
        sent, done, raw = await self.timed_call(sender, "", RPC_QUEUE, _encoder.encode(PageRequest(session_id, from_ts)))
        if raw is None:
            return sent, done, "timeout"
        if len(msgspec.json.decode(raw, type=MessagePage).messages) != 50:
            self.short_pages += 1
        return sent, done, None


def main() -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(os.environ["BENCH_BASELINE_MODE"], os.environ["AODM_AMQP_URL"], os.environ["AODM_DATABASE_URL"]))


if __name__ == "__main__":
    main()
