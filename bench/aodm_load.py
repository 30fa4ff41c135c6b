"""Load against aodm through its public API: handles registered and sessions established and
keyed by real signed requests (their rates are measured on the way), a bulk store of
messages COPYed straight into session.messages for those real sessions, and the targets
that the load engine drives (SendMessage, QueryMessage)."""

import asyncio
import itertools
import os
import random
import secrets
import time
from dataclasses import dataclass

import aio_pika
import asyncpg
import msgspec

from aodm import crypto, envelope, topology
from aodm.client import Client
from aodm.crypto import Identity
from aodm.encoding import b64encode
from aodm.notifications import notification_id
from aodm.registry_api import REGISTRY_TARGET, EstablishSession, Register
from aodm.replies import Err, reply_decoder
from aodm.session_api import MessagePage, QueryMessage, RotateSessionKey, SealedKey, SendMessage
from aodm.transport import Bus
from bench import load
from bench.progress import Bar
from bench.stats import summary

_encoder = msgspec.json.Encoder()
MESSAGE_STEP_MS = 1000  # seeded messages are one second apart


@dataclass
class Session:
    session_id: str
    a: str  # sends in the SendMessage runs
    b: str  # receives the NewMessage notifications
    key: bytes
    seeded: int = 0  # messages COPYed in
    first_ts: int = 0


@dataclass
class World:
    identities: dict[str, Identity]
    sessions: list[Session]

    def client(self, bus: Bus, handle: str) -> Client:
        return Client(bus, self.identities[handle], handle)


async def pipelined(
    buses: list[Bus], envelopes: list[envelope.Envelope], concurrency: int, timeout: float, label: str
) -> dict:
    """Send pre-signed requests with `concurrency` in flight; rate, round trips and errors."""
    todo = iter(enumerate(envelopes))
    rtts: list[float] = []
    errors: dict[str, int] = {}
    results: list[bytes | None] = [None] * len(envelopes)
    bar = Bar(label, len(envelopes), unit="")

    async def lane(lane_no: int) -> None:
        bus = buses[lane_no % len(buses)]
        for i, env in todo:
            sent = time.monotonic()
            try:
                body = await bus.call(topology.REQUESTS, env.target, envelope.encode(env), timeout=timeout)
            except TimeoutError:
                errors["timeout"] = errors.get("timeout", 0) + 1
                continue
            rtts.append(time.monotonic() - sent)
            reply = reply_decoder.decode(body)
            if isinstance(reply, Err):
                errors[reply.code] = errors.get(reply.code, 0) + 1
            else:
                results[i] = bytes(reply.result)
            bar.update(len(rtts), f"{len(rtts) / max(time.monotonic() - started, 1e-9):7.0f}/s")

    started = time.monotonic()
    await asyncio.gather(*(lane(i) for i in range(concurrency)))
    elapsed = time.monotonic() - started
    rate = len(envelopes) / elapsed
    bar.close(f"{rate:7.0f}/s")
    stats = summary([r * 1000 for r in rtts])
    return {"count": len(envelopes), "seconds": elapsed, "rate": rate, "rtt_ms": stats, "errors": errors,
            "results": results, "concurrency": concurrency}


async def seed(buses: list[Bus], n_handles: int, n_sessions: int, concurrency: int, timeout: float) -> tuple[World, dict]:
    """Handles, sessions between pairs of them, and a first key for each: all through the API."""
    tag = secrets.token_hex(3)
    handles = [f"b{i:04d}-{tag}" for i in range(n_handles)]
    identities = {h: Identity.generate() for h in handles}
    registers = [
        envelope.sign(identities[h].signing_key, target=REGISTRY_TARGET, from_=None, action="Register",
                      data=_encoder.encode(Register(h, identities[h].box_public)).decode())
        for h in handles
    ]
    measured = {"Register": await pipelined(buses, registers, concurrency, timeout, "Register (seed)")}
    pairs = list(itertools.combinations(handles, 2))
    if len(pairs) < n_sessions:
        raise ValueError(f"{n_handles} handles make only {len(pairs)} pairs; {n_sessions} sessions asked")
    random.Random(7).shuffle(pairs)
    pairs = pairs[:n_sessions]
    establishes = [
        envelope.sign(identities[a].signing_key, target=REGISTRY_TARGET, from_=a, action="EstablishSession",
                      data=_encoder.encode(EstablishSession(b)).decode(), anchor=b64encode(os.urandom(12)))
        for a, b in pairs
    ]
    measured["EstablishSession"] = await pipelined(buses, establishes, concurrency, timeout, "EstablishSession")
    sessions = []
    for (a, b), result in zip(pairs, measured["EstablishSession"].pop("results"), strict=True):
        if result is None:
            raise RuntimeError(f"EstablishSession {a} -> {b} failed: {measured['EstablishSession']['errors']}")
        sessions.append(Session(msgspec.json.decode(result)["SessionId"], a, b, crypto.new_session_key()))
    accepts = [  # both members send far more than a message request holds
        envelope.sign(identities[s.b].signing_key, target=s.session_id, from_=s.b, action="Accept", data="{}",
                      anchor=b64encode(os.urandom(12)))
        for s in sessions
    ]
    measured["Accept"] = await pipelined(buses, accepts, concurrency, timeout, "Accept")
    rotations = []
    for s in sessions:
        keys = [SealedKey(h, identities[h].box_public, crypto.seal_session_key(s.key, identities[h].box_public))
                for h in sorted((s.a, s.b))]
        rotations.append(envelope.sign(identities[s.a].signing_key, target=s.session_id, from_=s.a,
                                       action="RotateSessionKey", data=_encoder.encode(RotateSessionKey(keys)).decode(),
                                       anchor=b64encode(os.urandom(12))))
    measured["RotateSessionKey"] = await pipelined(buses, rotations, concurrency, timeout, "RotateSessionKey")
    for item in measured.values():
        item.pop("results", None)
        if item["errors"]:
            raise RuntimeError(f"seeding failed: {item['errors']}")
    return World(identities, sessions), measured


async def bulk_store(database_url: str, world: World, total: int, content_bytes: int = 120) -> dict:
    """COPY `total` messages into session.messages, spread evenly over the world's sessions,
    then move each session's sequence and clock past them (as SendMessage would have)."""
    per_session = max(1, total // len(world.sessions))
    base = envelope.now_ms() - 40 * 86_400_000
    contents = [os.urandom(content_bytes) for _ in range(512)]
    keys = {h: bytes(i.signing_key.verify_key) for h, i in world.identities.items()}
    columns = ["session_id", "seq", "message_id", "sender", "sender_key", "generation", "ts", "content"]
    conn = await asyncpg.connect(database_url)
    bar = Bar(f"COPY {per_session * len(world.sessions):,} messages", per_session * len(world.sessions), unit="")
    started = time.monotonic()
    done = 0
    try:
        chunk: list[tuple] = []
        for s in world.sessions:
            s.seeded, s.first_ts = per_session, base + MESSAGE_STEP_MS
            senders = (s.a, s.b)
            for seq in range(1, per_session + 1):
                sender = senders[seq & 1]
                chunk.append((s.session_id, seq, secrets.token_urlsafe(32)[:43], sender, keys[sender], 1,
                              base + seq * MESSAGE_STEP_MS, contents[seq % 512]))
            if len(chunk) >= 50_000:
                await conn.copy_records_to_table("messages", schema_name="session", records=chunk, columns=columns)
                done += len(chunk)
                chunk = []
                bar.update(done, f"{done / (time.monotonic() - started):9.0f} rows/s")
        if chunk:
            await conn.copy_records_to_table("messages", schema_name="session", records=chunk, columns=columns)
            done += len(chunk)
        await conn.execute(
            """UPDATE session.sessions SET message_seq = $2, last_timestamp = $3 WHERE session_id = any($1::text[])""",
            [s.session_id for s in world.sessions], per_session, base + per_session * MESSAGE_STEP_MS,
        )
        # Vacuumed (no autovacuum of the fresh rows later), analysed, and a checkpoint taken
        # now rather than one forced by the WAL volume in the middle of a measured run.
        await conn.execute("VACUUM ANALYZE session.messages")
        try:
            await conn.execute("CHECKPOINT")
        except asyncpg.InsufficientPrivilegeError:
            pass  # not a superuser: PostgreSQL takes it when it will
        rows = await conn.fetchval("SELECT count(*) FROM session.messages")
        size = await conn.fetchval("SELECT pg_total_relation_size('session.messages')")
    finally:
        await conn.close()
    elapsed = time.monotonic() - started
    bar.update(done)
    bar.close(f"{done / elapsed:9.0f} rows/s")
    return {"rows": rows, "sessions": len(world.sessions), "per_session": per_session, "seconds": elapsed,
            "table_bytes": size}


def page_picker(world: World, rng: random.Random):
    """A random seeded session and a From that leaves at least 50 messages after it."""
    sessions = [s for s in world.sessions if s.seeded >= 50]

    def pick() -> tuple[Session, int]:
        s = rng.choice(sessions)
        return s, s.first_ts + rng.randrange(0, s.seeded - 50 + 1) * MESSAGE_STEP_MS

    return pick


class SendTarget:
    """SendMessage from member a of many sessions; done at the Ok. Latency is publish →
    NewMessage arriving in member b's queue aodm.inbox.<b> (consumed here)."""

    def __init__(self, world: World, buses: list[Bus], inbox_connection: aio_pika.abc.AbstractConnection,
                 timeout: float, plaintext_bytes: int) -> None:
        self.world = world
        self.buses = buses
        self.senders = len(buses)
        self.timeout = timeout
        self._connection = inbox_connection
        self._plaintext = "x" * plaintext_bytes
        # each sender works its own slice of the sessions, round robin
        self._slices = [itertools.cycle([(world.client(bus, s.a), s) for s in world.sessions[i::len(buses)]])
                        for i, bus in enumerate(buses)]
        self._waiting: dict[str, float] = {}
        self.latencies: list[tuple[float, float, float]] = []
        self._channel = None
        s = world.sessions[0]
        self.message_bytes = len(envelope.encode(self._envelope(world.client(buses[0], s.a), s)))

    def _envelope(self, client: Client, s: Session) -> envelope.Envelope:
        return client.sign(s.session_id, "SendMessage", SendMessage(crypto.encrypt(s.key, self._plaintext), 1))

    async def start(self) -> None:
        queues = [topology.inbox_queue(handle) for handle in sorted({s.b for s in self.world.sessions})]
        self._channel = await load.consume_notifications(self._connection, queues, self._on_notification)

    async def stop(self) -> None:
        await self._channel.close()

    def _on_notification(self, message) -> None:  # an aiormq DeliveredMessage
        now = time.monotonic()
        sent = self._waiting.pop(message.header.properties.message_id or "", None)
        if sent is not None:
            self.latencies.append((now, now - sent, sent))

    def pending_notifications(self, since: float) -> int:
        return sum(1 for sent in self._waiting.values() if sent >= since)

    async def one(self, sender: int) -> tuple[float, float, str | None]:
        client, s = next(self._slices[sender])
        env = self._envelope(client, s)
        sent = time.monotonic()
        self._waiting[notification_id(env.id, "NewMessage", s.b)] = sent
        try:
            reply = await self.buses[sender].request(topology.REQUESTS, env.target, envelope.encode(env))
            async with asyncio.timeout(self.timeout):
                body = await reply
        except TimeoutError:
            return sent, time.monotonic(), "timeout"
        done = time.monotonic()
        decoded = reply_decoder.decode(body)
        return sent, done, decoded.code if isinstance(decoded, Err) else None


class QueryTarget(load.ReplyTarget):
    """QueryMessage, 50 messages from a random point of a random seeded session, as one of
    its members; done at the reply."""

    def __init__(self, world: World, buses: list[Bus], timeout: float, seed: int = 11) -> None:
        self.world = world
        self.buses = buses
        self.senders = len(buses)
        self.timeout = timeout
        self.latencies: list = []
        self.short_pages = 0
        rng = random.Random(seed)
        self._pick = page_picker(world, rng)
        self._rng = rng

    async def one(self, sender: int) -> tuple[float, float, str | None]:
        s, from_ts = self._pick()
        client = self.world.client(self.buses[sender], s.a if self._rng.random() < 0.5 else s.b)
        env = client.sign(s.session_id, "QueryMessage", QueryMessage(from_=from_ts, limit=50))
        sent, done, body = await self.timed_call(sender, topology.REQUESTS, env.target, envelope.encode(env))
        if body is None:
            return sent, done, "timeout"
        decoded = reply_decoder.decode(body)
        if isinstance(decoded, Err):
            return sent, done, decoded.code
        if len(msgspec.json.decode(decoded.result, type=MessagePage).messages) != 50:
            self.short_pages += 1
        return sent, done, None
