"""The request loop every service runs: decode, verify, authenticate, dispatch, reply.

This is the one place where errors become replies. Per delivery:

1. the envelope is decoded and its signature, Id and timestamp checked;
2. a `send` runs in a transaction that first claims the envelope Id in `<schema>.requests`
   (a duplicate finds the claim and gets the stored reply instead of a second effect), then
   authenticates `From`, runs the handler, and stores the reply and outgoing effects with it;
   a `dryrun` runs in a read-only transaction that is always rolled back;
3. after the commit the effects are published with confirms, then the reply, then the
   delivery is acknowledged. A crash anywhere before the ack redelivers the request, and the
   redelivery republishes the stored effects (notifications carry stable ids).

Database faults are retried in place (the message keeps its place in its shard, and is never
dead-lettered for them); a bug is answered with `internal` and the request dead-lettered.
"""

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import asyncpg
import msgspec

from shared import envelope as envelopes
from shared import faults, metrics, topology
from shared.db import DatabaseUnavailable
from shared.envelope import Envelope
from shared.errors import AodmError, InternalError, InvalidArgument, MalformedRequest, UnknownAction
from shared.logs import log
from shared.notifications import AnyNotification, Fanout, RequestFailed, notification_id
from shared.replies import err, ok
from shared.transport import BrokerError, Bus, Delivery, Unroutable


metrics.describe("aodm_requests_total", "counter", "Requests handled, by service, action and outcome (ok or error code).")
metrics.describe("aodm_request_duration_seconds", "histogram", "Time from delivery to acknowledgement.")


class Outgoing(msgspec.Struct, array_like=True):
    """A message to publish once the transaction that produced it has committed."""

    exchange: str
    routing_key: str
    body: bytes


MAX_ATTEMPTS = 3  # a request that fails this often in a row is poison: dead-lettered
_effects_codec = msgspec.json.Decoder(list[Outgoing])
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
    except msgspec.DecodeError as exc:
        raise MalformedRequest(f"Data is not JSON: {exc}") from exc


class Abandoned(Exception):
    """Shutting down while the database is away: leave the request in its queue."""


@dataclass
class Outcome:
    request_id: str | None = None
    action: str | None = None
    caller: str | None = None
    caller_is_handle: bool = False
    reply: bytes | None = None
    effects: list[Outgoing] = field(default_factory=list)
    code: str = "ok"
    duplicate: bool = False
    poison: bool = False


class Processor:
    def __init__(
        self,
        *,
        name: str,
        schema: str,
        pool: asyncpg.Pool,
        bus: Bus,
        actions: dict[str, Action],
        authenticate: Authenticate,
        handler_timeout: float = 10.0,
    ) -> None:
        self.name = name
        self.schema = schema
        self.pool = pool
        self.bus = bus
        self.actions = actions
        self.authenticate = authenticate
        self.handler_timeout = handler_timeout
        self.stopping = asyncio.Event()

    async def __call__(self, delivery: Delivery) -> None:
        started = time.perf_counter()
        outcome = Outcome()
        try:
            await self._decide(delivery, outcome)
        except Abandoned:
            log.info("left for redelivery", service=self.name, request_id=outcome.request_id)
            return  # not acked: closing the channel at shutdown hands it back to its queue
        except AodmError as exc:
            self._fail(delivery, outcome, exc)
        except Exception as exc:  # a bug: answer, dead-letter, keep the service alive
            log.exception("handler failed", service=self.name, action=outcome.action, request_id=outcome.request_id)
            outcome.poison = True
            self._fail(delivery, outcome, InternalError(f"{type(exc).__name__} while handling the request"))
        await self._deliver(delivery, outcome)
        elapsed = time.perf_counter() - started
        action = outcome.action if outcome.action in self.actions else "unknown"
        metrics.inc("aodm_requests_total", service=self.name, action=action, outcome=outcome.code)
        metrics.observe("aodm_request_duration_seconds", elapsed, service=self.name, action=action)
        log.info(
            "handled",
            service=self.name,
            action=outcome.action,
            outcome=outcome.code,
            request_id=outcome.request_id,
            caller=outcome.caller,
            duplicate=outcome.duplicate,
            redelivered=delivery.redelivered,
            duration_ms=round(elapsed * 1000, 2),
        )

    async def _decide(self, delivery: Delivery, outcome: Outcome) -> None:
        env = envelopes.decode(delivery.body)
        outcome.request_id = env.id
        envelopes.verify(env)
        if delivery.routing_key != env.target:
            raise MalformedRequest(f"Target {env.target!r} does not match the routing key {delivery.routing_key!r}")
        outcome.action = env.action
        action = self.actions.get(env.action)
        if action is None:
            raise UnknownAction(f"{self.name} has no action {env.action!r}")
        request = decode_data(action, env.data)
        backoff, failures = 0.1, 0
        while True:
            try:
                run = self._send(env, action, request, delivery.redelivered, outcome) if action.mode == "send" \
                    else self._dryrun(env, action, request, outcome)
                return await asyncio.wait_for(run, self.handler_timeout)
            except AodmError:
                raise
            except (*DatabaseUnavailable, TimeoutError) as exc:
                # Not the request's fault: wait for the database, however long it takes. A
                # timeout counts as the database's only if the database is not answering.
                if isinstance(exc, TimeoutError) and await self._database_answers():
                    failures += 1
                    if failures >= MAX_ATTEMPTS:
                        raise
                    log.warning("handler timed out, retrying", service=self.name, action=env.action,
                                request_id=env.id, attempt=failures)
                    continue
                if self.stopping.is_set():
                    raise Abandoned from exc
                log.warning("database unavailable, retrying", service=self.name, error=str(exc), backoff=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception as exc:
                # A bug: its transaction was rolled back, so a retry cannot double anything;
                # after MAX_ATTEMPTS in a row it is poison.
                failures += 1
                if failures >= MAX_ATTEMPTS:
                    raise
                log.warning("handler failed, retrying", service=self.name, action=env.action,
                            request_id=env.id, attempt=failures, error=repr(exc))

    async def _database_answers(self) -> bool:
        try:
            async with asyncio.timeout(2):
                return await self.pool.fetchval("SELECT 1") == 1
        except (*DatabaseUnavailable, TimeoutError):
            return False

    async def _send(self, env: Envelope, action: Action, request: Any, redelivered: bool, outcome: Outcome) -> None:
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                claimed = await conn.fetchval(
                    f"INSERT INTO {self.schema}.requests (id) VALUES ($1) ON CONFLICT DO NOTHING RETURNING true",
                    env.id,
                )
                if claimed:
                    # Freshness is judged only for a first sighting: a redelivery that waited
                    # out an outage still finds its stored reply and effects below.
                    envelopes.check_fresh(env)
                    ctx = await self._context(conn, env, action, outcome)
                    await faults.before_handler(env, self.handler_timeout)
                    result = await action.handler(ctx, request)
                    outcome.reply = ok(env.id, result)
                    outcome.effects = ctx.effects
                    await conn.execute(
                        f"UPDATE {self.schema}.requests SET reply = $2, effects = $3 WHERE id = $1",
                        env.id,
                        outcome.reply,
                        _encoder.encode(ctx.effects),
                    )
                    return
            # Seen before: answer as the first time. Republish its effects only when this is
            # the broker redelivering (the first attempt may have died before publishing them);
            # a client's replay gets the reply and causes nothing.
            row = await conn.fetchrow(f"SELECT reply, effects FROM {self.schema}.requests WHERE id = $1", env.id)
        outcome.duplicate = True
        outcome.reply = bytes(row["reply"])
        outcome.effects = _effects_codec.decode(row["effects"]) if redelivered else []

    async def _dryrun(self, env: Envelope, action: Action, request: Any, outcome: Outcome) -> None:
        envelopes.check_fresh(env)
        async with self.pool.acquire() as conn:
            transaction = conn.transaction(readonly=True)
            await transaction.start()
            try:
                ctx = await self._context(conn, env, action, outcome)
                outcome.reply = ok(env.id, await action.handler(ctx, request))
            finally:
                await transaction.rollback()

    async def _context(self, conn: asyncpg.Connection, env: Envelope, action: Action, outcome: Outcome) -> Context:
        caller, scope = await self.authenticate(conn, env, action)
        outcome.caller = caller
        outcome.caller_is_handle = caller != env.owner
        return Context(conn=conn, envelope=env, caller=caller, scope=scope, now=envelopes.now_ms())

    def _fail(self, delivery: Delivery, outcome: Outcome, error: AodmError) -> None:
        outcome.code = error.code
        outcome.reply = err(outcome.request_id or "", error)
        outcome.effects = []
        # No reply address: the error goes to the caller's notification queue, but only when
        # the caller is a proven handle (a forged From must not write to another's queue, and
        # a bare signer address has no queue).
        if delivery.reply_to is None and outcome.caller_is_handle and outcome.request_id:
            note = RequestFailed(
                id=notification_id(outcome.request_id, "RequestFailed", outcome.caller),
                handle=outcome.caller,
                at=envelopes.now_ms(),
                request_id=outcome.request_id,
                action=outcome.action or "",
                code=error.code,
                message=error.message,
            )
            outcome.effects = [
                Outgoing(topology.INTERNAL, topology.NOTIFIER_ROUTING_KEY, _encoder.encode(Fanout([note])))
            ]

    async def _deliver(self, delivery: Delivery, outcome: Outcome) -> None:
        """Effects, then the reply, then the ack. A broker fault here leaves the request
        unacknowledged, so it is redelivered and recognised as a duplicate."""
        if outcome.effects and not outcome.duplicate:
            faults.crash_point("crash-after-commit")
        try:
            for effect in outcome.effects:
                await self._publish(effect.exchange, effect.routing_key, effect.body)
            if delivery.reply_to and outcome.reply is not None:
                await self._publish(
                    "", delivery.reply_to, outcome.reply, correlation_id=delivery.correlation_id or outcome.request_id
                )
            if outcome.poison:
                await delivery.reject(requeue=False)
            else:
                await delivery.ack()
        except BrokerError as exc:
            log.warning("broker fault while answering; the request will be redelivered", error=str(exc))

    async def _publish(self, exchange: str, routing_key: str, body: bytes, correlation_id: str | None = None) -> None:
        try:
            await self.bus.publish(exchange, routing_key, body, correlation_id=correlation_id)
        except Unroutable as exc:
            # A reply whose client has gone, or an event nobody is bound for: nothing to retry.
            log.warning("unroutable publish dropped", service=self.name, destination=str(exc))


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
