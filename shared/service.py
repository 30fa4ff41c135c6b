"""The request loop every service runs: decode, verify, authenticate, dispatch, reply.

This is the one place where errors become replies. For a batch of deliveries (one, or as
many as a shard has waiting: group commit):

1. each envelope is decoded and its signature and Id checked, its action and Data parsed;
2. the `send`s run in one transaction that first claims every envelope Id in
   `<schema>.requests` — an Id already there is a duplicate and gets its stored reply
   instead of a second effect — then runs each handler in order and stores each reply and
   its outgoing effects with the claim; each `dryrun` runs on a connection whose session
   is read-only (PostgreSQL refuses any write on it), so it cannot change state;
3. after the commit the effects are published with confirms, then the replies, then the
   deliveries are acknowledged. A crash anywhere before the ack redelivers the requests, and
   a redelivery republishes the stored effects (notifications carry stable ids).

A request whose handler fails is taken out and the rest of the batch run again without it:
a typed error is its answer; anything else is retried and after MAX_ATTEMPTS answered with
`internal` and dead-lettered. Database faults are retried in place for the whole batch (it
keeps its place in its shard and is never dead-lettered for them).
"""

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import asyncpg
import msgspec

from shared import effects as outgoing
from shared import envelope as envelopes
from shared import faults, metrics, topology
from shared.db import DatabaseUnavailable, DependencyUnavailable
from shared.effects import Outgoing
from shared.envelope import Envelope
from shared.errors import AodmError, InternalError, InvalidArgument, MalformedRequest, UnknownAction
from shared.logs import log
from shared.notifications import AnyNotification, Fanout, RequestFailed, notification_id
from shared.replies import err, ok
from shared.transport import BrokerError, Bus, Delivery, Unroutable

metrics.describe("aodm_requests_total", "counter", "Requests handled, by service, action and outcome (ok or error code).")
metrics.describe("aodm_request_duration_seconds", "histogram", "Time from delivery to the answer being ready (its transaction committed).")
metrics.describe("aodm_dead_lettered_total", "counter", "Poison requests rejected to the dead-letter queue, by service.")
metrics.describe("aodm_batch_size", "histogram", "Requests handled per transaction.", buckets=(1, 2, 5, 10, 20, 50, 100))

MAX_ATTEMPTS = 3  # a request that fails this often in a row is poison: dead-lettered
_encoder = msgspec.json.Encoder()


@dataclass
class Context:
    """What a handler gets besides its request (arq style: `async def handler(ctx, req)`)."""

    conn: asyncpg.Connection
    envelope: Envelope
    caller: str
    scope: Any
    now: int
    effects: list[Outgoing] = field(default_factory=list)

    def emit(self, exchange: str, routing_key: str, message: object) -> None:
        self.effects.append(Outgoing(exchange, routing_key, _encoder.encode(message)))

    def notify(self, kind: type[AnyNotification], recipients: list[str], **fields: Any) -> None:
        """Queue one notification per recipient for the notifier, ids derived from the request."""
        notes = [
            kind(id=notification_id(self.envelope.id, kind.__name__, handle), handle=handle, at=self.now, **fields)
            for handle in recipients
        ]
        self.emit(topology.INTERNAL, topology.NOTIFIER_ROUTING_KEY, Fanout(notes))


Handler = Callable[[Context, Any], Awaitable[object]]
# Resolves who is calling: returns (caller, scope) or raises Unauthorized/Forbidden/NotFound.
Authenticate = Callable[[asyncpg.Connection, Envelope, "Action"], Awaitable[tuple[str, Any]]]


@dataclass(frozen=True)
class Action:
    request: type[msgspec.Struct]
    handler: Handler
    mode: Literal["send", "dryrun"]
    needs_handle: bool = True  # From must be a handle, not the bare signer address
    decoder: msgspec.json.Decoder = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "decoder", msgspec.json.Decoder(self.request))


def requests_table(schema: str) -> str:
    """The dedup table each service keeps in its own schema."""
    return f"""
        CREATE TABLE {schema}.requests (
            id text PRIMARY KEY,
            reply bytea,
            effects bytea,
            created_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX ON {schema}.requests (created_at);
    """


_RANGE_ERROR = re.compile(r"Expected `[^`]+` (>=|<=|>|<|of length)|Invalid enum value|match pattern")


def decode_data(action: Action, data: str) -> msgspec.Struct:
    try:
        return action.decoder.decode(data)
    except msgspec.ValidationError as exc:
        if _RANGE_ERROR.search(str(exc)):
            raise InvalidArgument(f"Data: {exc}") from exc
        raise MalformedRequest(f"Data: {exc}") from exc
    except (msgspec.DecodeError, UnicodeError) as exc:
        raise MalformedRequest(f"Data is not JSON: {exc}") from exc


class Abandoned(Exception):
    """Shutting down while the database is away: leave the requests in their queue."""


class DatabaseStalled(Exception):
    """A handler timed out and the database does not answer either: not the request's fault."""


class _RequestFailed(Exception):
    def __init__(self, outcome: "Outcome", error: BaseException) -> None:
        self.outcome = outcome
        self.error = error


@dataclass
class Outcome:
    delivery: Delivery
    env: Envelope | None = None
    action: Action | None = None
    request: Any = None
    action_name: str | None = None
    caller: str | None = None
    caller_is_handle: bool = False
    reply: bytes | None = None
    effects: list[Outgoing] = field(default_factory=list)
    code: str = "ok"
    duplicate: bool = False
    poison: bool = False
    failures: int = 0

    @property
    def request_id(self) -> str | None:
        return self.env.id if self.env else None


class Processor:
    def __init__(
        self,
        *,
        name: str,
        schema: str,
        pool: asyncpg.Pool,
        read_pool: asyncpg.Pool,
        bus: Bus,
        actions: dict[str, Action],
        authenticate: Authenticate,
        handler_timeout: float = 10.0,
        stopping: asyncio.Event | None = None,
    ) -> None:
        self.name = name
        self.schema = schema
        self.pool = pool
        self.read_pool = read_pool
        self.bus = bus
        self.actions = actions
        self.authenticate = authenticate
        self.handler_timeout = handler_timeout
        self.stopping = stopping or asyncio.Event()  # set: database faults abandon instead of waiting
        metrics.inc("aodm_dead_lettered_total", 0, service=name)  # a series from the start, so rates see the first

    async def __call__(self, delivery: Delivery) -> None:
        await self.handle([delivery])

    async def handle(self, deliveries: list[Delivery]) -> None:
        started = time.perf_counter()
        outcomes = [Outcome(delivery) for delivery in deliveries]
        for outcome in outcomes:
            try:
                self._parse(outcome)
            except AodmError as exc:
                self._fail(outcome, exc)
        try:
            await self._with_database(self._run_sends, [o for o in outcomes if o.code == "ok" and o.action.mode == "send"])
            for outcome in outcomes:
                if outcome.code == "ok" and outcome.action.mode == "dryrun":
                    await self._with_database(self._run_read, outcome)
        except Abandoned:
            log.info("left for redelivery", service=self.name, requests=len(outcomes))
            return  # not acked: closing the channel at shutdown hands them back to the queue
        self._record(outcomes, time.perf_counter() - started)
        await self._deliver(outcomes)

    # -- parsing (no database) ---------------------------------------------------------

    def _parse(self, outcome: Outcome) -> None:
        delivery = outcome.delivery
        env = envelopes.decode(delivery.body)
        outcome.env = env
        envelopes.verify(env)
        if delivery.routing_key != env.target:
            raise MalformedRequest(f"Target {env.target!r} does not match the routing key {delivery.routing_key!r}")
        outcome.action_name = env.action
        outcome.action = self.actions.get(env.action)
        if outcome.action is None:
            raise UnknownAction(f"{self.name} has no action {env.action!r}")
        outcome.request = decode_data(outcome.action, env.data)

    # -- running handlers --------------------------------------------------------------

    async def _with_database(self, run: Callable[[Any], Awaitable[None]], arg: Any) -> None:
        """Wait out database faults, however long they last: they are never the request's."""
        backoff = 0.1
        while True:
            try:
                return await run(arg)
            except (*DatabaseUnavailable, DatabaseStalled) as exc:
                if self.stopping.is_set():
                    raise Abandoned from exc
                what = "dependency" if isinstance(exc, DependencyUnavailable) else "database"
                log.warning(f"{what} unavailable, retrying", service=self.name, error=repr(exc), backoff=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _run_sends(self, outcomes: list[Outcome]) -> None:
        while batch := [o for o in outcomes if o.code == "ok"]:
            try:
                return await self._send_batch(batch)
            except _RequestFailed as failed:
                self._count_failure(failed.outcome, failed.error)

    async def _send_batch(self, batch: list[Outcome]) -> None:
        schema = self.schema
        async with self.pool.acquire() as conn, conn.transaction():
            claimed = {
                row["id"]
                for row in await conn.fetch(
                    f"INSERT INTO {schema}.requests (id) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING RETURNING id",
                    [o.env.id for o in batch],
                )
            }
            fresh, seen = [], []
            for outcome in batch:
                outcome.reply, outcome.effects, outcome.duplicate = None, [], False
                if outcome.env.id in claimed:
                    claimed.discard(outcome.env.id)  # the same envelope twice in one batch: the second is a duplicate
                    fresh.append(outcome)
                else:
                    seen.append(outcome)
            for outcome in fresh:
                await self._invoke(conn, outcome)
            if fresh:
                await conn.execute(
                    f"""UPDATE {schema}.requests AS r SET reply = u.reply, effects = u.effects
                        FROM unnest($1::text[], $2::bytea[], $3::bytea[]) AS u(id, reply, effects) WHERE r.id = u.id""",
                    [o.env.id for o in fresh], [o.reply for o in fresh], [outgoing.encode(o.effects) for o in fresh],
                )
            if seen:
                await self._replay(conn, seen)

    async def _replay(self, conn: asyncpg.Connection, seen: list[Outcome]) -> None:
        """A request seen before is answered as the first time. Its effects are republished
        only when the broker redelivers it (the first attempt may have died before publishing
        them); a client's replay gets the reply and causes nothing."""
        rows = await conn.fetch(
            f"SELECT id, reply, effects FROM {self.schema}.requests WHERE id = ANY($1::text[])", [o.env.id for o in seen]
        )
        stored = {row["id"]: row for row in rows}
        for outcome in seen:
            row = stored[outcome.env.id]
            outcome.duplicate = True
            outcome.reply = bytes(row["reply"])
            outcome.effects = outgoing.effects_decoder.decode(row["effects"]) if outcome.delivery.redelivered else []

    async def _run_read(self, outcome: Outcome) -> None:
        """On the read-only pool: the database itself refuses any write a dryrun attempts."""
        while outcome.code == "ok":
            try:
                async with self.read_pool.acquire() as conn:
                    return await self._invoke(conn, outcome)
            except _RequestFailed as failed:
                self._count_failure(outcome, failed.error)

    async def _invoke(self, conn: asyncpg.Connection, outcome: Outcome) -> None:
        """One handler, timed. Its failure becomes `_RequestFailed` unless it is the database's."""
        env = outcome.env
        try:
            # Freshness is judged for a first sighting only: a redelivery that waited out an
            # outage finds its stored reply instead.
            envelopes.check_fresh(env)
            caller, scope = await self.authenticate(conn, env, outcome.action)
            outcome.caller, outcome.caller_is_handle = caller, caller != env.owner
            ctx = Context(conn=conn, envelope=env, caller=caller, scope=scope, now=envelopes.now_ms())
            result = await asyncio.wait_for(self._call(ctx, outcome), self.handler_timeout)
        except TimeoutError as exc:  # before DatabaseUnavailable: TimeoutError is an OSError
            if not await self._database_answers():
                raise DatabaseStalled(f"{env.action} timed out and the database does not answer") from exc
            raise _RequestFailed(outcome, exc) from exc
        except DatabaseUnavailable:
            raise
        except Exception as exc:
            raise _RequestFailed(outcome, exc) from exc
        outcome.reply = ok(env.id, result)
        outcome.effects = ctx.effects

    async def _call(self, ctx: Context, outcome: Outcome) -> object:
        await faults.before_handler(ctx.envelope, self.handler_timeout)
        return await outcome.action.handler(ctx, outcome.request)

    async def _database_answers(self) -> bool:
        try:
            async with asyncio.timeout(2):
                return await self.pool.fetchval("SELECT 1") == 1
        except (*DatabaseUnavailable, TimeoutError):
            return False

    def _count_failure(self, outcome: Outcome, error: BaseException) -> None:
        """A typed error is the answer. Anything else (a bug, a hung handler) is retried: its
        transaction was rolled back, so a retry cannot double anything; after MAX_ATTEMPTS in
        a row it is poison."""
        if isinstance(error, AodmError):
            return self._fail(outcome, error)
        outcome.failures += 1
        if outcome.failures < MAX_ATTEMPTS:
            log.warning("handler failed, retrying", service=self.name, action=outcome.action_name,
                        request_id=outcome.request_id, attempt=outcome.failures, error=repr(error))
            return
        log.error("poison request dead-lettered", service=self.name, action=outcome.action_name,
                  request_id=outcome.request_id, exc_info=error)
        outcome.poison = True
        self._fail(outcome, InternalError(f"{type(error).__name__} while handling the request"))

    def _fail(self, outcome: Outcome, error: AodmError) -> None:
        outcome.code = error.code
        outcome.reply = err(outcome.request_id or "", error)
        outcome.effects = []
        # No reply address: the error goes to the caller's notification queue, but only when
        # the caller is a proven handle (a forged From must not write to another's queue, and
        # a bare signer address has no queue).
        if outcome.delivery.reply_to is None and outcome.caller_is_handle and outcome.request_id:
            note = RequestFailed(
                id=notification_id(outcome.request_id, "RequestFailed", outcome.caller),
                handle=outcome.caller,
                at=envelopes.now_ms(),
                request_id=outcome.request_id,
                action=outcome.action_name or "",
                code=error.code,
                message=error.message,
            )
            outcome.effects = [Outgoing(topology.INTERNAL, topology.NOTIFIER_ROUTING_KEY, _encoder.encode(Fanout([note])))]

    # -- answering ---------------------------------------------------------------------

    async def _deliver(self, outcomes: list[Outcome]) -> None:
        """Effects, then the replies, then the acks. A broker fault here leaves the requests
        unacknowledged, so they are redelivered and recognised as duplicates."""
        if any(o.effects and not o.duplicate for o in outcomes):
            faults.crash_point("crash-after-commit")
        try:
            # Published together and confirmed together; frames leave in list order, so a
            # Spawn still reaches its shard before any notification about it is sent.
            await asyncio.gather(*(
                self._publish(effect.exchange, effect.routing_key, effect.body)
                for effect in outgoing.merge([e for o in outcomes for e in o.effects])
            ))
            await asyncio.gather(*(
                self._publish("", o.delivery.reply_to, o.reply, correlation_id=o.delivery.correlation_id or o.request_id)
                for o in outcomes
                if o.delivery.reply_to and o.reply is not None
            ))
            await self._settle(outcomes)
        except BrokerError as exc:
            log.warning("broker fault while answering; the requests will be redelivered", error=repr(exc))

    async def _settle(self, outcomes: list[Outcome]) -> None:
        """Poison to the dead letters, the rest acknowledged. A batch comes from one channel
        consumed in order with nothing earlier left open, so one `multiple` ack on its last
        good delivery settles all of them."""
        for outcome in outcomes:
            if outcome.poison:
                await outcome.delivery.reject(requeue=False)
                metrics.inc("aodm_dead_lettered_total", service=self.name)
        good = [o for o in outcomes if not o.poison]
        if good:
            await good[-1].delivery.ack(multiple=len(outcomes) > 1)

    async def _publish(self, exchange: str, routing_key: str, body: bytes, correlation_id: str | None = None) -> None:
        try:
            # A reply goes to a requester's transient reply queue: persisting it buys nothing
            # and costs the broker a disk write before it confirms.
            await self.bus.publish(exchange, routing_key, body, correlation_id=correlation_id, persistent=exchange != "")
        except Unroutable as exc:
            # A reply whose client has gone, or an event nobody is bound for: nothing to retry.
            log.warning("unroutable publish dropped", service=self.name, destination=str(exc))

    def _record(self, outcomes: list[Outcome], elapsed: float) -> None:
        """One log line per handled request; metrics never take an attacker's action name."""
        metrics.observe("aodm_batch_size", len(outcomes), service=self.name)
        for outcome in outcomes:
            action = outcome.action_name if outcome.action_name in self.actions else "unknown"
            metrics.inc("aodm_requests_total", service=self.name, action=action, outcome=outcome.code)
            metrics.observe("aodm_request_duration_seconds", elapsed, service=self.name, action=action)
            log.info(
                "handled",
                service=self.name,
                action=outcome.action_name,
                outcome=outcome.code,
                request_id=outcome.request_id,
                caller=outcome.caller,
                duplicate=outcome.duplicate,
                redelivered=outcome.delivery.redelivered,
                batch=len(outcomes),
                duration_ms=round(elapsed * 1000, 2),
            )


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
