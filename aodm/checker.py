"""`python -m aodm.checker`: is anything lost, doubled or reordered? (after RabbitMQ's Jepsen
total-queue checker)

It registers fresh handles, opens sessions with keys, and drives several senders at once
through the real stack: each publishes its SendMessages in a known order (pipelined, each
publish confirmed by the broker before the next), and when a reply does not come in time it
publishes the *same* signed envelope again, so broker restarts and dead workers are survived
and the services' envelope-Id claim keeps a resend from doubling anything. Every Ok reply is
a confirmed send. Then it reads everything back (QueryMessage, and the NewMessage
notifications in the recipients' queues) and `checker_report.judge` gives the verdict.

    report = await run_check("amqp://guest:guest@127.0.0.1:5672/", sessions=4, messages=100)
    assert report.ok, report.summary()
"""

import argparse
import asyncio
import logging
import os
import secrets
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TextIO, TypeVar

import msgspec

from aodm import crypto, envelope, topology
from aodm.checker_report import Keys, Note, Report, Sent, Stored, judge
from aodm.client import Client
from aodm.encoding import b64encode
from aodm.envelope import Tag
from aodm.errors import NoSessionKey, NotFound, Timeout, error_for
from aodm.notifications import NewMessage, notification_decoder
from aodm.registry_api import REGISTRY_TARGET, Established, EstablishSession, Register
from aodm.replies import Err, Ok, reply_decoder
from aodm.session_api import (
    Accept,
    Consent,
    GetCurrentKey,
    GetKeyByGeneration,
    KeyBatch,
    MessagePage,
    QueryMessage,
    Rotated,
    RotateSessionKey,
    SealedKey,
    SendMessage,
)
from aodm.session_api import Sent as SentReply
from aodm.transport import BrokerError, Delivery, QueueMissing

_encoder = msgspec.json.Encoder()
_now = time.monotonic
T = TypeVar("T")
# Faults after which a publish or a consume is simply tried again.
_TRANSIENT: tuple[type[BaseException], ...] = (*BrokerError, TimeoutError, RuntimeError)
_NOT_CONSUMED_YET: tuple[type[BaseException], ...] = (QueueMissing, *_TRANSIENT)


class CheckerError(Exception):
    """The check itself could not be carried out (setup or read-back did not get answers)."""


class _GaveUp(Exception):
    pass


@dataclass
class Options:
    sessions: int = 4
    senders_per_session: int = 2  # 1: only the first member sends; 2: both do
    messages: int = 100  # per sender
    rate: float | None = None  # messages per second, all senders together
    burst: int = 0  # each sender's first N messages go out at once (a backlog), the rest at `rate`
    duration: float = 60.0  # no new message is published after this many seconds
    settle: float = 30.0  # then at most this long for missing replies, and for read-back
    window: int = 16  # unanswered messages per sender
    resend_after: float = 5.0  # first resend of an unanswered envelope (doubling up to 30 s)
    rotate_every: int = 0  # the first member rotates the key every N of its messages (0: never)
    tag: tuple[str, str] | None = None  # an extra tag on every `tag_every`-th message
    tag_every: int = 0


@dataclass
class _Pair:
    index: int
    members: list[Client]
    session_id: str = ""
    keys: dict[int, bytes] = field(default_factory=dict)  # generation -> key, confirmed rotations
    pending_keys: list[bytes] = field(default_factory=list)  # rotations never answered
    current: int = 0


class Progress:
    """A one-line progress bar on stderr (a line every few seconds when it is not a terminal)."""

    def __init__(self, total: int, enabled: bool, stream: TextIO = sys.stderr) -> None:
        self.total, self.enabled, self.stream = total, enabled, stream
        self.phase = "setup"
        self.confirmed = self.refused = self.resends = 0
        self.started = _now()
        self._tty = enabled and stream.isatty()
        self._task = asyncio.ensure_future(self._run()) if enabled else None

    def _line(self) -> str:
        done = self.confirmed + self.refused
        filled = int(30 * done / max(1, self.total))
        return (f"{self.phase:<8} [{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total} ok {self.confirmed} "
                f"err {self.refused} resends {self.resends} {_now() - self.started:6.1f}s")

    async def _run(self) -> None:
        while True:
            self.stream.write(f"\r{self._line()}" if self._tty else f"{self._line()}\n")
            self.stream.flush()
            await asyncio.sleep(0.25 if self._tty else 5.0)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self.stream.write(f"\r{self._line()}\n" if self._tty else f"{self._line()}\n")
            self.stream.flush()


# -- one request, resent until answered --------------------------------------------------


def _sign(
    client: Client, target: str, data: msgspec.Struct, *, as_handle: bool = True, tags: Iterable[Tag] = ()
) -> envelope.Envelope:
    return envelope.sign(
        client.identity.signing_key,
        target=target,
        from_=client.handle if as_handle else None,
        action=type(data).__name__,
        data=_encoder.encode(data).decode(),
        anchor=b64encode(secrets.token_bytes(16)),
        extra_tags=list(tags),
    )


async def _publish(client: Client, env: envelope.Envelope, give_up: float) -> "asyncio.Future[bytes]":
    """Publish until the broker confirms it; a broker fault means: the same envelope again."""
    while True:
        try:
            return await asyncio.wait_for(client.submit(env), timeout=max(0.1, min(5.0, give_up - _now())))
        except _TRANSIENT as exc:
            if _now() >= give_up:
                raise _GaveUp from exc
            await asyncio.sleep(0.5)


async def _roundtrip(client: Client, env: envelope.Envelope, opts: Options, give_up: float,
                     progress: Progress | None = None,
                     first: "asyncio.Future[bytes] | None" = None) -> tuple[Ok | Err | None, int]:
    """The reply to `env` (None if none came before `give_up`) and how often it was resent."""
    futures = [first] if first is not None else []
    published, resends, wait = first is not None, 0, opts.resend_after
    try:
        while True:
            if not futures:
                futures.append(await _publish(client, env, give_up))
                resends += published
                if published and progress:
                    progress.resends += 1
                published = True
            done, _ = await asyncio.wait(futures, timeout=max(0.0, min(wait, give_up - _now())),
                                         return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                if not future.cancelled() and future.exception() is None:
                    return reply_decoder.decode(future.result()), resends
            if _now() >= give_up:
                return None, resends
            futures = [f for f in futures if not f.done()]
            if not done:  # nothing in time: the same envelope again
                futures.append(await _publish(client, env, give_up))
                resends += 1
                if progress:
                    progress.resends += 1
                wait = min(wait * 2, 30.0)
    except _GaveUp:
        return None, resends
    finally:
        for future in futures:
            future.cancel()


async def _call(client: Client, target: str, data: msgspec.Struct, result: type[T], opts: Options, give_up: float,
                *, as_handle: bool = True) -> T:
    reply, _ = await _roundtrip(client, _sign(client, target, data, as_handle=as_handle), opts, give_up)
    if reply is None:
        raise Timeout(f"no reply to {type(data).__name__} before the checker's deadline")
    if isinstance(reply, Err):
        raise error_for(reply.code, reply.message, reply.retry_after)
    return msgspec.json.decode(reply.result, type=result)


# -- the run -------------------------------------------------------------------------------


async def _rotate(pair: _Pair, opts: Options, give_up: float) -> None:
    key = crypto.new_session_key()
    entries = [SealedKey(c.acting_as, c.identity.box_public, crypto.seal_session_key(key, c.identity.box_public))
               for c in sorted(pair.members, key=lambda c: c.acting_as)]
    rotator = pair.members[0]
    reply, _ = await _roundtrip(rotator, _sign(rotator, pair.session_id, RotateSessionKey(entries)), opts, give_up)
    if reply is None:
        pair.pending_keys.append(key)
    elif isinstance(reply, Err):
        raise error_for(reply.code, reply.message, reply.retry_after)
    else:
        generation = msgspec.json.decode(reply.result, type=Rotated).generation
        pair.keys[generation] = key
        pair.current = generation


async def _setup(url: str, run: str, opts: Options, give_up: float) -> list[_Pair]:
    pairs: list[_Pair] = []
    for index in range(opts.sessions):
        members = [await Client.connect(url, crypto.Identity.generate()) for _ in range(2)]
        pairs.append(_Pair(index, members))

    async def register(client: Client, handle: str) -> None:
        await _call(client, REGISTRY_TARGET, Register(handle, client.identity.box_public), object, opts, give_up,
                    as_handle=False)
        client.handle = handle

    async def open_session(pair: _Pair) -> None:
        await asyncio.gather(*(register(c, f"chk-{run}-{pair.index}{'ab'[i]}") for i, c in enumerate(pair.members)))
        a, b = pair.members
        pair.session_id = (await _call(a, REGISTRY_TARGET, EstablishSession(b.acting_as), Established, opts, give_up)).session_id
        await _call(b, pair.session_id, Accept(), Consent, opts, give_up)  # both send more than a request holds
        await _rotate(pair, opts, give_up)
        if not pair.current:
            raise Timeout("the first key rotation was not answered")

    await asyncio.gather(*(open_session(p) for p in pairs))
    return pairs


async def _send_all(pair: _Pair, who: int, run: str, opts: Options, progress: Progress,
                    send_until: float, give_up: float) -> list[Sent]:
    """One sender: pipelined publishes in index order, each answered (or given up) later."""
    client, peer = pair.members[who], pair.members[1 - who]
    records: list[Sent] = []
    waiting: set[asyncio.Task[None]] = set()
    window = asyncio.Semaphore(opts.window)
    interval = opts.sessions * opts.senders_per_session / opts.rate if opts.rate else 0.0
    next_at = _now()

    async def settle(env: envelope.Envelope, first: "asyncio.Future[bytes]", record: Sent) -> None:
        try:
            reply, record.resends = await _roundtrip(client, env, opts, give_up, progress, first)
            if isinstance(reply, Err):
                record.outcome = reply.code
                progress.refused += 1
            elif reply is not None:
                record.outcome, record.seq = "ok", msgspec.json.decode(reply.result, type=SentReply).seq
                progress.confirmed += 1
        finally:
            window.release()

    for i in range(opts.messages):
        if who == 0 and opts.rotate_every and i and i % opts.rotate_every == 0:
            await asyncio.gather(*waiting)  # rotate once everything before it is answered
            await _rotate(pair, opts, give_up)
        if interval and i >= opts.burst:
            await asyncio.sleep(max(0.0, next_at - _now()))
            next_at += interval
        elif interval:
            next_at = _now() + interval
        await window.acquire()
        if _now() >= send_until:
            window.release()
            break
        tags = [Tag(*opts.tag)] if opts.tag and opts.tag_every and i % opts.tag_every == opts.tag_every // 2 else []
        text = f"{run}.{pair.index}.{who}.{i}"
        generation = pair.current
        env = _sign(client, pair.session_id, SendMessage(crypto.encrypt(pair.keys[generation], text), generation),
                    tags=tags)
        record = Sent(pair.index, client.acting_as, peer.acting_as, i, text, env.id)
        records.append(record)
        try:
            first = await _publish(client, env, give_up)
        except _GaveUp:
            window.release()
            break  # the broker never took it back: stop here, it stays pending
        task = asyncio.create_task(settle(env, first, record))
        waiting.add(task)
        task.add_done_callback(waiting.discard)
    await asyncio.gather(*waiting)
    return records


def _open_batch(reader: Client, batch: KeyBatch) -> bytes | None:
    mine = next((k for k in batch.keys if k.handle == reader.handle), None)
    try:
        return crypto.open_session_key(mine.sealed_key, reader.identity.box_key) if mine else None
    except Exception:
        return None


async def _read_back(pair: _Pair, opts: Options, give_up: float) -> tuple[list[Stored], Keys]:
    reader, sid = pair.members[0], pair.session_id
    try:
        current = (await _call(reader, sid, GetCurrentKey(), KeyBatch, opts, give_up)).generation
    except NoSessionKey:
        current = 0
    opened: dict[int, bytes | None] = {}
    mismatched = 0
    for generation in range(1, current + 1):
        try:
            opened[generation] = _open_batch(reader, await _call(reader, sid, GetKeyByGeneration(generation), KeyBatch,
                                                                 opts, give_up))
        except NotFound:
            continue
        wanted = pair.keys.get(generation)
        if opened[generation] != wanted and (wanted is not None or opened[generation] not in pair.pending_keys):
            mismatched += 1
    stored, cursor = [], None
    while True:
        page = await _call(reader, sid, QueryMessage(None, None, 500, "asc", cursor), MessagePage, opts, give_up)
        for m in page.messages:
            key = opened.get(m.generation) or pair.keys.get(m.generation)
            try:
                text = crypto.decrypt(key, m.content) if key else None
            except Exception:
                text = None
            stored.append(Stored(pair.index, m.seq, m.sender, m.generation, m.message_id, text))
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    keys = Keys(pair.index, current, sorted(opened), len(pair.keys), len(pair.pending_keys), mismatched)
    return stored, keys


async def _collect_notes(pairs: list[_Pair], expected: set[tuple[str, str]], until: float) -> list[Note]:
    """Every NewMessage in the members' queues until each expected one has come (or `until`)."""
    notes: list[Note] = []
    missing = set(expected)
    complete = asyncio.Event()
    if not missing:
        complete.set()

    async def on_note(delivery: Delivery) -> None:
        try:
            note = notification_decoder.decode(delivery.body)
        except msgspec.DecodeError:
            note = None
        if isinstance(note, NewMessage):
            notes.append(Note(note.handle, note.id, note.message_id))
            missing.discard((note.handle, note.message_id))
            if not missing:
                complete.set()
        await delivery.ack()

    consumers = []
    try:
        for client in (c for p in pairs for c in p.members):
            while True:  # the registry created the queue at Register (servers before: a moment after); the broker may be away
                try:
                    consume = client.bus.consume(topology.inbox_queue(client.acting_as), on_note, prefetch=256)
                    consumers.append(await asyncio.wait_for(consume, max(0.1, until - _now())))
                    break
                except _NOT_CONSUMED_YET:
                    if _now() >= until:
                        break
                    await asyncio.sleep(0.5)
        try:
            await asyncio.wait_for(complete.wait(), timeout=max(0.1, until - _now()))
        except TimeoutError:
            pass
        await asyncio.sleep(0.3)  # a moment for duplicates right behind the last one
    finally:
        await asyncio.gather(*(c.close() for c in consumers), return_exceptions=True)
    return notes


async def run_check(
    amqp_url: str,
    *,
    sessions: int = 4,
    senders_per_session: int = 2,
    messages: int = 100,
    rate: float | None = None,
    burst: int = 0,
    duration: float = 60.0,
    settle: float = 30.0,
    window: int = 16,
    resend_after: float = 5.0,
    rotate_every: int = 0,
    tag: tuple[str, str] | None = None,
    tag_every: int = 0,
    progress: bool = False,
    sending: asyncio.Event | None = None,
) -> Report:
    """Drive the load, read it all back, judge. Bounded: about duration + 2 × settle.
    `sending` (optional) is set when the load starts: the moment to inject faults."""
    if senders_per_session not in (1, 2) or min(sessions, messages, window) < 1 or burst < 0:
        raise ValueError("sessions, messages and window must be positive, burst not negative; "
                         "senders_per_session 1 or 2")
    opts = Options(sessions, senders_per_session, messages, rate, burst, duration, settle, window, resend_after,
                   rotate_every, tag, tag_every)
    started, run = _now(), secrets.token_hex(3)
    send_until = started + duration
    bar = Progress(sessions * senders_per_session * messages, progress)
    pairs: list[_Pair] = []
    try:
        try:
            pairs = await _setup(amqp_url, run, opts, send_until)
        except Timeout as exc:
            raise CheckerError(f"setup got no answer: {exc}") from exc
        bar.phase = "sending"
        if sending is not None:
            sending.set()
        give_up = send_until + settle
        batches = await asyncio.gather(*(
            _send_all(p, who, run, opts, bar, send_until, give_up) for p in pairs for who in range(senders_per_session)
        ))
        sent = [s for batch in batches for s in batch]
        bar.phase = "reading"
        read_until = _now() + settle
        try:
            read = await asyncio.gather(*(_read_back(p, opts, read_until) for p in pairs))
        except Timeout as exc:
            raise CheckerError(f"read-back got no answer: {exc}") from exc
        expected = {(s.recipient, s.message_id) for s in sent if s.outcome == "ok"}
        notes = await _collect_notes(pairs, expected, read_until)
    finally:
        bar.close()
        await asyncio.gather(*(c.close() for p in pairs for c in p.members), return_exceptions=True)
    stored = [m for batch, _ in read for m in batch]
    return judge(sent, stored, [k for _, k in read], notes, sessions=sessions,
                 senders=sessions * senders_per_session, elapsed_s=_now() - started)


# -- command line --------------------------------------------------------------------------


def _tag(raw: str) -> tuple[str, str]:
    name, sep, value = raw.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError("expected NAME=VALUE, e.g. Fault=stall")
    return name, value


# Why a run may not get as far as a report (exit status 2).
_CANNOT_CHECK: tuple[type[BaseException], ...] = (CheckerError, ValueError, ConnectionError, *BrokerError)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m aodm.checker",
        description="Drive concurrent senders through the running aodm stack, resending unanswered "
        "envelopes, then read everything back and report what was lost, duplicated, unexpected, "
        "reordered, or left without its notification. Exit status 0: nothing wrong; 1: a problem "
        "was found; 2: the check could not be run.",
    )
    parser.add_argument("--amqp-url", default=os.environ.get("AODM_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
                        help="broker URL with vhost (default: $AODM_AMQP_URL or the local broker)")
    parser.add_argument("--sessions", type=int, default=4, help="sessions, each between two fresh handles (4)")
    parser.add_argument("--senders-per-session", type=int, choices=(1, 2), default=2,
                        help="1: one member sends; 2: both send at once (2)")
    parser.add_argument("--messages", type=int, default=100, help="messages per sender (100)")
    parser.add_argument("--rate", type=float, default=None, help="messages per second, all senders together (no limit)")
    parser.add_argument("--burst", type=int, default=0,
                        help="each sender publishes its first N messages at once, then goes on at --rate: a "
                        "backlog in every shard (raise --window to match) (0)")
    parser.add_argument("--duration", type=float, default=60.0, help="stop publishing new messages after S seconds (60)")
    parser.add_argument("--settle", type=float, default=30.0,
                        help="then wait at most S seconds for replies, and again for read-back (30)")
    parser.add_argument("--window", type=int, default=16, help="unanswered messages per sender (16)")
    parser.add_argument("--resend-after", type=float, default=5.0,
                        help="resend the same envelope after S seconds without a reply, doubling (5)")
    parser.add_argument("--rotate-every", type=int, default=0, help="rotate the session key every N messages (0: never)")
    parser.add_argument("--tag", type=_tag, default=None, help="an extra signed tag NAME=VALUE, e.g. Fault=stall")
    parser.add_argument("--tag-every", type=int, default=0, help="put --tag on one message in every N")
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("aio_pika", "aiormq"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        report = asyncio.run(run_check(
            args.amqp_url, sessions=args.sessions, senders_per_session=args.senders_per_session,
            messages=args.messages, rate=args.rate, burst=args.burst, duration=args.duration, settle=args.settle,
            window=args.window, resend_after=args.resend_after, rotate_every=args.rotate_every,
            tag=args.tag, tag_every=args.tag_every, progress=not args.no_progress,
        ))
    except _CANNOT_CHECK as exc:
        print(f"checker: {exc}", file=sys.stderr)
        return 2
    print(report.to_json() if args.json else report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
