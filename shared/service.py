"""The request loop every service runs: decode, verify, authenticate, dispatch, reply.

This is the one place where errors become replies. For a batch of deliveries (one, or as
many as a shard has waiting: group commit):

1. each envelope is decoded (a reply_to the services may not write to, or a key twice, is
   refused) and its signature and Id checked before anything reaches the database, its
   action and Data parsed;
2. the `send`s run in one transaction that first locks every envelope Id and looks it up
   in `<schema>.requests` — an Id already there is a duplicate: it changes nothing and gets
   its stored reply (its stored effects go out again only on the broker's redelivery,
   `_no_effects_for_replays`) — and holds the batch's shard leases (a request whose shard
   another worker has taken since is left to it, `_hold_leases`) — then runs
   the handlers in order (a `batched` action's consecutive requests in one call, so it
   can write them with one statement) and stores each reply and its outgoing effects
   under its Id; each `dryrun` runs on a connection whose session is read-only
   (PostgreSQL refuses any write on it), so it cannot change state;
3. after the commit the effects and then the replies are published, and once the broker
   has confirmed all of them the deliveries are acknowledged, batch after batch. A crash
   anywhere before the ack redelivers the requests, and the redelivery republishes the
   stored effects; a broker fault hands the batch back to its queue to the same end. Reads
   take turns per signer and places among a bounded number in flight (`_read_one`).

A request refused before its handler runs (stale, not a member…) just gets its error. One
whose handler fails is taken out and the rest of the batch run again without it: a typed
error is its answer; anything else is retried and after MAX_ATTEMPTS answered with
`internal` and dead-lettered. Database faults are retried in place for the whole batch (it
keeps its place in its shard and is never dead-lettered for them).
"""

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import asyncpg
import msgspec

from aodm import envelope as envelopes
from aodm import strict_json, topology
from aodm.envelope import Envelope
from aodm.errors import AodmError, InternalError, InvalidArgument, MalformedRequest, UnknownAction
from aodm.notifications import AnyNotification, RequestFailed, notification_id
from aodm.registry_api import Activity
from aodm.replies import err, ok
from aodm.transport import BrokerError, Bus, Delivery, Message, settle_when_confirmed
from shared import effects as outgoing
from shared import faults, metrics
from shared.db import DatabaseUnavailable, DependencyUnavailable, replace_connections
from shared.effects import Effects, Outgoing
from shared.logs import log

metrics.describe("aodm_requests_total", "counter", "Requests handled, by service, action and outcome (ok or error code).")
metrics.describe("aodm_request_duration_seconds", "histogram", "Time from delivery to the answer being ready (its transaction committed).")
metrics.describe("aodm_dead_lettered_total", "counter", "Poison requests rejected to the dead-letter queue, by service.")
metrics.describe("aodm_notifications_total", "counter", "Notifications published to handle queues, by kind and publishing service.")
metrics.describe("aodm_batch_size", "histogram", "Requests handled per transaction.", buckets=(1, 2, 5, 10, 20, 50, 100, 200, 400))

MAX_ATTEMPTS = 3  # a request that fails this often in a row is poison: dead-lettered
# Reads a worker holds at once (each up to a page: session_api.MAX_PAGE_BYTES of content),
# and of those, one signer's: its further reads wait their turn while others' pass them.
READS_IN_FLIGHT = 16
READS_PER_SIGNER = 2
_encoder = msgspec.json.Encoder()


@dataclass
class Context:
    """What a handler gets besides its request (arq style: `async def handler(ctx, req)`)."""

    conn: asyncpg.Connection
    envelope: Envelope
    caller: str
    scope: Any
    now: int
    effects: Effects = field(default_factory=Effects)
    # For an action that keeps its own record (Action.own_record): why the request may not
    # be taken if it is new (its timestamp is out of the window), and whether the handler
    # found it stored before (then it answers as the first time).
    stale: AodmError | None = None
    stored_before: bool = False
    # The lease the request was delivered under (Delivery.lease): a handler that writes with
    # one statement of its own checks it there, and answers FENCED for what it may not take.
    lease: Any = None

    def emit(self, exchange: str, routing_key: str, message: object) -> None:
        self.effects.messages.append(Outgoing(exchange, routing_key, _encoder.encode(message)))

    def notify(self, kind: type[AnyNotification], recipients: list[str], *, at: int | None = None, **fields: Any) -> None:
        """One notification per recipient, its Id derived from the request's."""
        self.effects.notifications += [
            kind(id=notification_id(self.envelope.id, kind.__name__, handle), handle=handle,
                 at=self.now if at is None else at, **fields)
            for handle in recipients
        ]

    def touch(self, session_id: str, at: int) -> None:
        """Tell the registry the session was active (its members' chat lists sort by it)."""
        self.effects.activity.append(Activity(session_id, at))


Handler = Callable[[Context, Any], Awaitable[object]]
# A batched action's handler takes a run of consecutive requests and answers each with its
# result or a typed error; it must have written nothing for a request it answers with an error.
BatchHandler = Callable[[list[Context], list[Any]], Awaitable[list[object]]]
# Resolves who is calling: returns (caller, scope) or raises Unauthorized/Forbidden/NotFound.
Authenticate = Callable[[asyncpg.Connection, Envelope, "Action"], Awaitable[tuple[str, Any]]]


# Fence: holds a batch's leases until its transaction ends, and returns those a newer owner
# of their queue holds now. Their requests are left to that owner: no answer, no ack.
Fence = Callable[[asyncpg.Connection, list[Any]], Awaitable[set[Any]]]
FENCED = "fenced"  # a handler's answer, and the outcome's code, for a request left that way


@dataclass(frozen=True)
class Action:
    request: type[msgspec.Struct]
    handler: Handler | BatchHandler
    mode: Literal["send", "dryrun"]
    needs_handle: bool = True  # From must be a handle, not the bare signer address
    batched: bool = False  # `handler` is a BatchHandler (send actions only)
    # The handler keeps the record of the requests it took, keyed by their Ids, and writes
    # with one statement: a request stored before is answered from that record (setting
    # ctx.stored_before) and a new one whose ctx.stale is set is refused with it. Such a run
    # needs no transaction, no lock and no stored reply (send actions only).
    own_record: bool = False
    decoder: msgspec.json.Decoder = field(init=False, repr=False, compare=False)
    data: strict_json.FlatObject = field(init=False, repr=False, compare=False)  # Data's keys, for duplicates

    def __post_init__(self) -> None:
        object.__setattr__(self, "decoder", msgspec.json.Decoder(self.request))
        object.__setattr__(self, "data", strict_json.FlatObject(self.request))


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


def requests_lookup(schema: str) -> str:
    """A later migration: lock a batch's request ids and read the ones already answered, in
    one round trip. The locks come first, in a fixed order (so never a deadlock); the query
    is a statement of its own, so it sees what a transaction it waited for has committed."""
    return f"""
        CREATE FUNCTION {schema}.lock_requests(ids text[])
        RETURNS TABLE (request_id text, stored_reply bytea, stored_effects bytea)
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_advisory_xact_lock(hashtext('{schema}'), hashtext(sorted.id))
            FROM (SELECT DISTINCT unnest(ids) AS id ORDER BY 1) AS sorted;
            RETURN QUERY SELECT r.id, r.reply, r.effects FROM {schema}.requests AS r WHERE r.id = ANY(ids);
        END $$;
    """


def requests_replanned(schema: str) -> str:
    """A later migration: the lookup is planned at each call. A plan cached while the table
    was empty (a scan of the whole table) would otherwise stay as the table grows, unless an
    ANALYZE happens to replace it."""
    return f"ALTER FUNCTION {schema}.lock_requests(text[]) SET plan_cache_mode = force_custom_plan"


_RANGE_ERROR = re.compile(r"Expected `[^`]+` (>=|<=|>|<|of length)|Invalid enum value|match pattern")


def decode_data(action: Action, data: str) -> msgspec.Struct:
    try:
        request = action.decoder.decode(data)
    except msgspec.ValidationError as exc:
        if _RANGE_ERROR.search(str(exc)):
            raise InvalidArgument(f"Data: {exc}") from exc
        raise MalformedRequest(f"Data: {exc}") from exc
    except (msgspec.DecodeError, UnicodeError) as exc:
        raise MalformedRequest(f"Data is not JSON: {exc}") from exc
    if duplicates := action.data.duplicates(data):
        raise MalformedRequest(f"Data: a key appears twice: {', '.join(duplicates)}")
    return request


class Abandoned(Exception):
    """Shutting down while the database is away: leave the requests in their queue."""


class DatabaseStalled(Exception):
    """A handler timed out and the database does not answer either: not the request's fault."""


class _RequestFailed(Exception):
    def __init__(self, outcome: "Outcome", error: BaseException) -> None:
        self.outcome = outcome
        self.error = error


class _RunFailed(Exception):
    """A batched handler failed for a run of several requests: run them one by one to learn which."""

    def __init__(self, run: list["Outcome"], error: BaseException) -> None:
        self.run = run
        self.error = error


class _ClaimLost(Exception):
    """Another transaction stored one of these request ids first: run the batch again."""


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
    effects: Effects = outgoing.NONE
    code: str = "ok"
    duplicate: bool = False
    # Found stored on its first try: taken before this delivery came (a replay, a resend or
    # a redelivery), not by an earlier try of this very handling (a run retried one by one).
    stored_earlier: bool = False
    tried: bool = False  # a handler has run for it (its statement may have committed)
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
        activity: Callable[[list[Activity]], None] | None = None,
        fence: Fence | None = None,
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
        self.activity = activity  # takes the batches' activity instead of a report per batch
        self.fence = fence
        self._in_flight = asyncio.Semaphore(READS_IN_FLIGHT)
        self._turns = _Turns(READS_PER_SIGNER)
        self._answered: asyncio.Future[None] | None = None  # the latest batch's publishing and acks
        self._abandoned = False  # stopping while the database was away: everything is left
        metrics.inc("aodm_dead_lettered_total", 0, service=name)  # a series from the start, so rates see the first

    async def __call__(self, delivery: Delivery) -> None:
        await self.handle([delivery])

    async def handle(self, deliveries: list[Delivery]) -> None:
        await (await self.begin(deliveries))

    async def begin(self, deliveries: list[Delivery]) -> "asyncio.Future[None]":
        """Everything up to the commit of the batch's sends. Returns the rest under way: its
        reads (they begin once the sends have committed, and change nothing, so the next
        batch need not wait for them), publishing the effects and replies, and once they are
        confirmed and every earlier batch is acknowledged, the acks. A caller may begin the
        next batch meanwhile (the session worker does): its publishes follow these, its acks
        follow these."""
        started = time.perf_counter()
        outcomes = [Outcome(delivery) for delivery in deliveries]
        if self._abandoned:  # a later batch must not commit ahead of one left for redelivery
            return _done()
        for outcome in outcomes:
            try:
                self._parse(outcome)
            except AodmError as exc:
                self._fail(outcome, exc)
        # Before anything reaches the database: a forged request costs its verification only.
        self._verify(outcomes)
        try:
            await self._run_sends(_sends(outcomes))
        except Abandoned:
            return self._abandon(outcomes)
        _no_effects_for_replays(outcomes)
        metrics.observe("aodm_batch_size", len(outcomes), service=self.name)
        reads = [o for o in outcomes if _is_read(o)]
        answered = [o for o in outcomes if not _is_read(o)]
        elapsed = time.perf_counter() - started
        self._count(answered, elapsed)
        await self._dead_letter_poison(answered)
        publishing: list[Awaitable[None]] = [self._answer(answered, len(outcomes), elapsed)] if answered else []
        if reads:
            replying = self._read_and_reply(reads, len(outcomes), started)
            # Reads alone (a lone QueryMessage, say) run in the settling task itself.
            publishing.append(asyncio.ensure_future(replying) if publishing else replying)
        self._answered = asyncio.ensure_future(self._settle(outcomes, publishing, after=self._answered))
        return self._answered

    def _abandon(self, outcomes: list[Outcome]) -> "asyncio.Future[None]":
        self._abandoned = True
        log.info("left for redelivery", service=self.name, requests=len(outcomes))
        return _done()  # not acked: closing the channel at shutdown hands them back to the queue

    # -- parsing (no database) ---------------------------------------------------------

    def _parse(self, outcome: Outcome) -> None:
        """Everything but the signature (see _verify)."""
        delivery = outcome.delivery
        if delivery.reply_to is not None and not topology.may_reply_to(delivery.reply_to):
            raise MalformedRequest("reply_to must be amq.rabbitmq.reply-to or a server-named amq.gen- queue")
        env = envelopes.decode(delivery.body)
        outcome.env = env
        if delivery.routing_key != env.target:
            raise MalformedRequest(f"Target {env.target!r} does not match the routing key {delivery.routing_key!r}")
        outcome.action_name = env.action
        outcome.action = self.actions.get(env.action)
        if outcome.action is None:
            raise UnknownAction(f"{self.name} has no action {env.action!r}")
        outcome.request = decode_data(outcome.action, env.data)

    def _verify(self, outcomes: list[Outcome]) -> None:
        self._refuse(_bad_signatures(outcomes))

    def _refuse(self, refused: list[tuple[Outcome, AodmError]]) -> None:
        """A bad signature or Id is the answer, whatever else was wrong or was done: nothing
        is taken, and no caller recognised, on a claim nobody proved."""
        for outcome, error in refused:
            outcome.caller, outcome.caller_is_handle = None, False
            self._fail(outcome, error)

    # -- running handlers --------------------------------------------------------------

    async def _with_database(self, run: Callable[[Any], Awaitable[None]], arg: Any) -> None:
        """Wait out database faults, however long they last: they are never the request's."""
        backoff = 0.1
        while True:
            try:
                return await run(arg)
            except (*DatabaseUnavailable, DatabaseStalled) as exc:
                what = "dependency" if isinstance(exc, DependencyUnavailable) else "database"
                if what == "database":
                    await replace_connections(self.pool, self.read_pool)
                if self.stopping.is_set():
                    raise Abandoned from exc
                log.warning(f"{what} unavailable, retrying", service=self.name, error=repr(exc), backoff=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _run_sends(self, outcomes: list[Outcome]) -> None:
        """In batch order: each run of an action that keeps its own record (one statement),
        and what lies between them in one transaction."""
        for segment in _segments(outcomes):
            await self._with_database(self._run_segment, segment)

    async def _run_segment(self, segment: list[Outcome]) -> None:
        batched = True
        while batch := [o for o in segment if o.code == "ok"]:
            try:
                if batch[0].action.own_record:
                    return await self._send_own(batch, batched)
                return await self._send_batch(batch, batched)
            except _RequestFailed as failed:
                self._count_failure(failed.outcome, failed.error)
            except _RunFailed as failed:
                log.warning("batched handler failed, running its requests one by one", service=self.name,
                            action=failed.run[0].action_name, requests=len(failed.run), error=repr(failed.error))
                batched = False
            except _ClaimLost:
                pass

    async def _send_batch(self, batch: list[Outcome], batched: bool) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            batch = await self._hold_leases(conn, batch)
            stored = await self._lock_and_look_up(conn, [o.env.id for o in batch]) if batch else {}
            firsts, copies = _firsts(batch)
            fresh = []
            for outcome in firsts:
                row = stored.get(outcome.env.id)
                if row is None:
                    fresh.append(outcome)
                else:
                    self._replay(outcome, row)
            for run in _runs(fresh, batched):
                await self._invoke(conn, run)
            await self._store_replies(conn, [o for o in fresh if o.code == "ok"])
        _answer_copies(copies)

    async def _send_own(self, batch: list[Outcome], batched: bool) -> None:
        """The handler's statement is atomic on its own, and recognises what it stored before."""
        firsts, copies = _firsts(batch)
        async with self.pool.acquire() as conn:
            for run in _runs(firsts, batched):
                await self._invoke(conn, run)
        _answer_copies(copies)

    async def _hold_leases(self, conn: asyncpg.Connection, batch: list[Outcome]) -> list[Outcome]:
        """The batch's requests whose queue this worker still holds; the others are left."""
        leases = list({o.delivery.lease for o in batch if o.delivery.lease is not None})
        if self.fence is None or not leases:
            return batch
        lost = await self.fence(conn, leases)
        self._leave([o for o in batch if o.delivery.lease in lost])
        return [o for o in batch if o.code == "ok"]

    def _leave(self, outcomes: list[Outcome]) -> None:
        """Another worker has taken these requests' queue since they were delivered here: the
        broker has given them back, to be handled there in their place in the queue."""
        if not outcomes:
            return
        for outcome in outcomes:
            outcome.code, outcome.reply, outcome.effects = FENCED, None, outgoing.NONE
        log.warning("left for the queue's new owner", service=self.name, requests=len(outcomes),
                    first_request_id=outcomes[0].request_id)

    async def _lock_and_look_up(self, conn: asyncpg.Connection, ids: list[str]) -> dict[str, asyncpg.Record]:
        """A concurrent transaction holding one of these ids finishes first (see requests_lookup)."""
        rows = await conn.fetch(f"SELECT * FROM {self.schema}.lock_requests($1::text[])", ids)
        return {row["request_id"]: row for row in rows}

    async def _store_replies(self, conn: asyncpg.Connection, done: list[Outcome]) -> None:
        if not done:
            return
        stored = await conn.fetchval(
            f"""WITH stored AS (
                    INSERT INTO {self.schema}.requests (id, reply, effects)
                    SELECT * FROM unnest($1::text[], $2::bytea[], $3::bytea[]) ON CONFLICT DO NOTHING RETURNING 1
                ) SELECT count(*) FROM stored""",
            [o.env.id for o in done], [o.reply for o in done], [outgoing.encode(o.effects) for o in done],
        )
        if stored != len(done):  # only a writer that skipped the locks could get here
            raise _ClaimLost()

    def _replay(self, outcome: Outcome, row: asyncpg.Record) -> None:
        """A request seen before is answered as the first time; whether its stored effects
        go out again is `_no_effects_for_replays`'s call."""
        outcome.duplicate = outcome.stored_earlier = True  # an earlier try of ours was rolled back
        outcome.reply = bytes(row["stored_reply"])
        outcome.effects = outgoing.decode(row["stored_effects"])

    async def _run_read(self, outcome: Outcome) -> None:
        """On the read-only pool: the database itself refuses any write a dryrun attempts."""
        while outcome.code == "ok":
            try:
                async with self.read_pool.acquire() as conn:
                    return await self._invoke(conn, [outcome])
            except _RequestFailed as failed:
                self._count_failure(outcome, failed.error)

    async def _invoke(self, conn: asyncpg.Connection, run: list[Outcome]) -> None:
        """The handler for one request, or for a run of a batched action's requests, timed.
        A failure becomes `_RequestFailed` (or `_RunFailed`) unless it is the database's."""
        ready: list[tuple[Outcome, Context]] = []
        for outcome in run:
            try:
                ready.append((outcome, await self._context(conn, outcome)))
            except AodmError as exc:
                self._fail(outcome, exc)  # refused before its handler: nothing of it was written
        if not ready:
            return
        action = run[0].action
        first_try = [not outcome.tried for outcome, _ in ready]
        for outcome, _ in ready:
            outcome.tried = True
        try:
            async with asyncio.timeout(self.handler_timeout):  # no extra task, unlike wait_for
                results = await self._call(action, ready)
        except TimeoutError as exc:  # before DatabaseUnavailable: TimeoutError is an OSError
            if not await self._database_answers():
                raise DatabaseStalled(f"{action.request.__name__} timed out and the database does not answer") from exc
            raise self._failure(ready, exc) from exc
        except DatabaseUnavailable:
            raise
        except asyncpg.UniqueViolationError as exc:
            if action.own_record:  # another worker stored one of them first (a shard handover)
                raise _ClaimLost() from exc
            raise self._failure(ready, exc) from exc
        except Exception as exc:
            raise self._failure(ready, exc) from exc
        self._leave([outcome for (outcome, _), result in zip(ready, results, strict=True) if result is FENCED])
        for (outcome, ctx), result, first in zip(ready, results, first_try, strict=True):
            if result is FENCED:
                continue
            if isinstance(result, AodmError):
                self._fail(outcome, result)
                continue
            outcome.reply, outcome.effects = ok(outcome.env.id, result), ctx.effects
            outcome.duplicate = ctx.stored_before
            outcome.stored_earlier = ctx.stored_before and first

    async def _context(self, conn: asyncpg.Connection, outcome: Outcome) -> Context:
        env = outcome.env
        # Freshness is judged for a first sighting only: a redelivery that waited out an
        # outage finds its stored reply instead (an action keeping its own record judges it
        # with the record at hand).
        stale = None
        try:
            envelopes.check_fresh(env)
        except AodmError as exc:
            if not outcome.action.own_record:
                raise
            stale = exc
        try:
            caller, scope = await self.authenticate(conn, env, outcome.action)
        except AodmError:
            # What authentication refuses was never stored (sessions, members and their keys
            # never change), so such a request is new: stale first, as §7 orders the checks.
            if stale is not None:
                raise stale from None
            raise
        except DatabaseUnavailable:
            raise
        except Exception as exc:
            raise _RequestFailed(outcome, exc) from exc
        outcome.caller, outcome.caller_is_handle = caller, caller != env.owner
        return Context(conn=conn, envelope=env, caller=caller, scope=scope, now=envelopes.now_ms(), stale=stale,
                       lease=outcome.delivery.lease)

    @staticmethod
    def _failure(ready: list[tuple[Outcome, Context]], error: BaseException) -> Exception:
        if len(ready) > 1:
            return _RunFailed([outcome for outcome, _ in ready], error)
        return _RequestFailed(ready[0][0], error)

    async def _call(self, action: Action, ready: list[tuple[Outcome, Context]]) -> list[object]:
        for _, ctx in ready:
            await faults.before_handler(ctx.envelope, self.handler_timeout)
        if action.batched:
            return await action.handler([ctx for _, ctx in ready], [outcome.request for outcome, _ in ready])
        [(outcome, ctx)] = ready
        return [await action.handler(ctx, outcome.request)]

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
        metrics.inc("aodm_dead_lettered_total", service=self.name)
        self._fail(outcome, InternalError(f"{type(error).__name__} while handling the request"))

    def _fail(self, outcome: Outcome, error: AodmError) -> None:
        outcome.code = error.code
        outcome.reply = err(outcome.request_id or "", error)
        outcome.effects = outgoing.NONE
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
            outcome.effects = Effects(notifications=[note])

    # -- answering ---------------------------------------------------------------------

    def _answer(self, outcomes: list[Outcome], batch: int, elapsed: float) -> "asyncio.Future[None]":
        """Publish these requests' effects and replies now (a task), to be confirmed before
        the batch is acknowledged, then log them. They are issued here, before the next
        batch can begin, so batches' messages leave in batch order (and a handle's
        notifications in the order they were produced)."""
        if any(o.effects and not o.duplicate for o in outcomes):
            faults.crash_point("crash-after-commit")
        effects = outgoing.merge([o.effects for o in outcomes], activity=self.activity is None)
        for outcome in outcomes:
            for note in outcome.effects.notifications:
                metrics.inc("aodm_notifications_total", kind=type(note).__name__, service=self.name)
        if self.activity is not None:
            self.activity([seen for o in outcomes for seen in o.effects.activity])
        # Frames leave in this order and the broker routes a channel's publishes in order, so
        # a Spawn is in its shard before the caller can read the reply and write to the session.
        return asyncio.ensure_future(self._publish_and_log(effects + _replies(outcomes), outcomes, batch, elapsed))

    async def _publish_and_log(self, messages: list[Message], outcomes: list[Outcome], batch: int, elapsed: float) -> None:
        try:
            await self._publish(messages)
        finally:
            self._log(outcomes, batch, elapsed)  # after the answers, which need not wait for it

    async def _read_and_reply(self, reads: list[Outcome], batch: int, started: float) -> None:
        """After the batch's sends (a read sees what they wrote), side by side: reads change
        nothing, so their order does not matter."""
        if len(reads) == 1:
            return await self._read_one(reads[0], batch, started)
        done = await asyncio.gather(*(self._read_one(o, batch, started) for o in reads), return_exceptions=True)
        for error in (e for e in done if isinstance(e, BaseException)):
            raise error

    async def _read_one(self, read: Outcome, batch: int, started: float) -> None:
        """A read waits for its signer's turn, then for a place among the reads in flight,
        which it keeps until its reply is confirmed: a worker holds READS_IN_FLIGHT pages at
        most, and a signer's flood of heavy reads takes READS_PER_SIGNER of those places."""
        async with self._turns.take(read.env.owner), self._in_flight:
            try:
                await self._with_database(self._run_read, read)
            except Abandoned as exc:  # stopping while the database is away: hand it back
                self._abandon([read])
                raise ConnectionError("left for redelivery") from exc
            elapsed = time.perf_counter() - started
            self._count([read], elapsed)
            await self._dead_letter_poison([read])
            await self._publish(_replies([read]))
        self._log([read], batch, elapsed)  # after the reply, which need not wait for it

    async def _settle(self, outcomes: list[Outcome], publishing: list[Awaitable[None]], after: "asyncio.Future[None] | None") -> None:
        """Acknowledged once confirmed (poison is in the dead letters by then). On a broker
        fault they are handed back to their queues; redelivered, they are recognised as
        duplicates and their stored effects published again."""
        await settle_when_confirmed([o.delivery for o in outcomes if o.code != FENCED], publishing, after)

    async def _dead_letter_poison(self, outcomes: list[Outcome]) -> None:
        """Poison goes to the dead letters before its reply says `internal` (a single reject
        covers nothing else, so it need not wait for the batch)."""
        for outcome in outcomes:
            if outcome.poison:
                try:
                    await outcome.delivery.reject(requeue=False)
                except BrokerError:
                    pass  # its channel is gone: the broker has it back, and it will fail again

    async def _publish(self, messages: list[Message]) -> None:
        unroutable = await self.bus.publish_all(messages)
        # No queue for a handle (yet): the notifier, which keeps them, creates it and delivers.
        redirected = [outgoing.for_the_notifier(m) for m in unroutable if m.exchange == topology.INBOX]
        for message in [m for m in unroutable if m.exchange != topology.INBOX] + await self.bus.publish_all(redirected):
            # A reply whose client has gone, or an event nobody is bound for: nothing to retry.
            log.warning("unroutable publish dropped", service=self.name,
                        destination=f"{message.exchange or '(default)'}/{message.routing_key}")

    def _count(self, outcomes: list[Outcome], elapsed: float) -> None:
        """Metrics never take an attacker's action name."""
        for outcome in outcomes:
            action = outcome.action_name if outcome.action_name in self.actions else "unknown"
            metrics.inc("aodm_requests_total", service=self.name, action=action, outcome=outcome.code)
            metrics.observe("aodm_request_duration_seconds", elapsed, service=self.name, action=action)

    def _log(self, outcomes: list[Outcome], batch: int, elapsed: float) -> None:
        """One log line per handled request, at the level of its outcome (_LOG_LEVELS)."""
        for outcome in outcomes:
            getattr(log, _LOG_LEVELS.get(outcome.code, "warning"))(
                "handled",
                service=self.name,
                action=outcome.action_name,
                outcome=outcome.code,
                request_id=outcome.request_id,
                caller=outcome.caller,
                duplicate=outcome.duplicate,
                redelivered=outcome.delivery.redelivered,
                batch=batch,
                duration_ms=round(elapsed * 1000, 2),
            )


# The level of a `handled` line by its outcome: a bug is an error; an ordinary answer is
# info (a lookup that finds nothing included); any other error code is a request refused
# (unauthorized, invalid_signature, forbidden, malformed_request, not_accepted,
# rate_limited...), a warning: a client that misbehaves or an attack shows at that level.
_LOG_LEVELS = {
    "ok": "info",
    FENCED: "info",  # left to the shard's new owner, who answers it
    "not_found": "info",
    "already_exists": "info",
    "no_session_key": "info",
    InternalError.code: "error",
}


def _done() -> "asyncio.Future[None]":
    future = asyncio.get_running_loop().create_future()
    future.set_result(None)
    return future


def _is_read(outcome: Outcome) -> bool:
    return outcome.code == "ok" and outcome.action.mode == "dryrun"


def _sends(outcomes: list[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if o.code == "ok" and o.action.mode == "send"]


def _bad_signatures(outcomes: list[Outcome]) -> list[tuple[Outcome, AodmError]]:
    refused = []
    for outcome in outcomes:
        if outcome.env is None:
            continue  # not even an envelope: its error stands
        try:
            envelopes.verify(outcome.env)
        except AodmError as exc:
            refused.append((outcome, exc))
    return refused


def _segments(outcomes: list[Outcome]) -> list[list[Outcome]]:
    """Consecutive sends that keep their own record, of one action, are a segment; so is
    whatever lies between them."""
    segments: list[list[Outcome]] = []
    for outcome in outcomes:
        last = segments[-1][0].action if segments else None
        if last is not None and (last is outcome.action or not (last.own_record or outcome.action.own_record)):
            segments[-1].append(outcome)
        else:
            segments.append([outcome])
    return segments


class _Turns:
    """At most `per_key` holders of each key at once; a key's other callers wait for it,
    in order, without holding anything else up."""

    def __init__(self, per_key: int) -> None:
        self._per_key = per_key
        self._keys: dict[str, tuple[asyncio.Semaphore, list[int]]] = {}  # key -> (turns, [holders + waiters])

    @contextlib.asynccontextmanager
    async def take(self, key: str) -> AsyncIterator[None]:
        turns, users = self._keys.setdefault(key, (asyncio.Semaphore(self._per_key), [0]))
        users[0] += 1
        try:
            async with turns:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._keys[key]  # nothing kept for a key nobody holds or waits for


def _no_effects_for_replays(outcomes: list[Outcome]) -> None:
    """A request found stored publishes its effects again only when the broker redelivers
    it. The services acknowledge a request once its effects are confirmed, so a request
    whose effects may not have gone out is still unacknowledged, and the broker hands that
    very delivery back flagged `redelivered` (after a crash, a lost channel or a hand-back).
    A new publish of a stored envelope (a client's resend, anyone's replay) is never flagged:
    it gets the first reply, and nobody's queue gets anything more. Per Id: a resend can
    share a batch with the redelivered original, ahead of it."""
    redelivered = {o.request_id for o in outcomes if o.delivery.redelivered}
    for outcome in outcomes:
        if outcome.stored_earlier and outcome.request_id not in redelivered:
            outcome.effects = outgoing.NONE


def _firsts(batch: list[Outcome]) -> tuple[list[Outcome], list[Outcome]]:
    """The first of each envelope, and the copies behind them (a client resent it while the
    first was still waiting in the same batch)."""
    firsts: dict[str, Outcome] = {}
    copies = []
    for outcome in batch:
        outcome.reply, outcome.effects, outcome.duplicate, outcome.stored_earlier = None, outgoing.NONE, False, False
        if outcome.env.id in firsts:
            copies.append((outcome, firsts[outcome.env.id]))
        else:
            firsts[outcome.env.id] = outcome
    return list(firsts.values()), copies


def _replies(outcomes: list[Outcome]) -> list[Message]:
    """Only where the requester itself receives (topology.may_reply_to): a request naming
    any other queue is refused, and its refusal goes nowhere. Transient (persisting a reply
    buys nothing and costs the broker a disk write before it confirms) and not vouched for."""
    return [
        Message("", o.delivery.reply_to, o.reply, correlation_id=o.delivery.correlation_id or o.request_id,
                persistent=False, vouched=False)
        for o in outcomes if o.delivery.reply_to and o.reply is not None and topology.may_reply_to(o.delivery.reply_to)
    ]


def _answer_copies(copies: list[tuple[Outcome, Outcome]]) -> None:
    for copy, first in copies:
        copy.code, copy.reply, copy.caller, copy.duplicate = first.code, first.reply, first.caller, True


def _runs(outcomes: list[Outcome], batched: bool) -> list[list[Outcome]]:
    """Consecutive requests of one batched action go to its handler together."""
    runs: list[list[Outcome]] = []
    for outcome in outcomes:
        if batched and outcome.action.batched and runs and runs[-1][0].action is outcome.action:
            runs[-1].append(outcome)
        else:
            runs.append([outcome])
    return runs


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
