"""The request loop every service runs. `Processor.begin` takes a batch of deliveries (one,
or as many as a shard has waiting: group commit) through its stages, in this order:

1. **decode**: a reply_to the services may not write to, a key twice, an unknown action or
   a Data that is not the action's are refused; nothing reaches the database yet;
2. **verify**: every signature and Id; a forged request costs its verification only;
3. **authenticate, run, store** (the sends, in batch order): a run of an action that
   keeps its own record is one statement (`own_record`); what lies between runs in one
   transaction that holds the batch's shard leases (a request whose shard another worker
   has taken since is left to it), locks every envelope Id and looks it up in
   `<schema>.requests` (one seen before changes nothing and gets its stored reply), runs
   the handlers, and stores each reply and its effects under its Id. Database faults are
   waited out for the whole batch, which keeps its place in its shard;
4. **publish**: after the commit, the effects and then the replies (a stored request's
   effects only on the broker's redelivery: `outcomes.no_effects_for_replays`). Reads
   (`dryrun`s) run now, on read-only connections, side by side, taking turns per signer;
5. **settle**: `_settle`, the one place deliveries are acknowledged, rejected or left,
   as `outcomes.settlement` decides, once the broker has confirmed the batch's publishes
   and every earlier batch is settled.

A crash anywhere before the acknowledgement makes the broker deliver the batch again; it is
then found stored, answered as the first time and its effects published again. A typed
error is a request's answer (`_fail`, the one place errors become replies); a handler that
fails otherwise is taken out and the rest run again without it, and after MAX_ATTEMPTS it
is poison: dead-lettered and answered `internal`. Each step returns what went wrong as a
value (`Trouble`); exceptions are left to the libraries' faults.
"""

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from aodm import envelope as envelopes
from aodm import topology
from aodm.errors import AodmError, InternalError, MalformedRequest, UnknownAction
from aodm.notifications import RequestFailed, notification_id
from aodm.replies import err, ok
from aodm.transport import BrokerError, Bus, Delivery, Message, ack_in_order, dead_letter, hand_back
from shared import effects as outgoing
from shared import faults, metrics, requests_store
from shared.actions import FENCED, Action, Authenticate, Context, decode_data
from shared.db import DatabaseUnavailable, DependencyUnavailable, replace_connections
from shared.effects import Effects
from shared.logs import log
from shared.outcomes import (
    Outcome,
    Settle,
    answer_copies,
    firsts,
    is_read,
    no_effects_for_replays,
    replies,
    runs,
    segments,
    sends,
    settlement,
)

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

# Fence: holds a batch's leases until its transaction ends, and returns those a newer owner
# of their queue holds now. Their requests are left to that owner: no answer, no ack.
Fence = Callable[[asyncpg.Connection, list[Any]], Awaitable[set[Any]]]


# -- what can go wrong in a step, as values ------------------------------------------------

@dataclass
class HandlerFailed:
    """A handler (or authentication) failed with something other than a typed error. For a
    run of several requests, they are run one by one to learn which."""

    outcomes: list[Outcome]
    error: BaseException


@dataclass
class ClaimLost:
    """Another transaction stored one of these request ids first: run the batch again."""


@dataclass
class Unavailable:
    """The database (or a dependency) does not answer: never the request's fault, waited out."""

    error: BaseException


Trouble = HandlerFailed | ClaimLost | Unavailable | None


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
        app: Any = None,
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
        self.app = app  # handed to every handler as ctx.app
        self.fence = fence
        self._in_flight = asyncio.Semaphore(READS_IN_FLIGHT)
        self._turns = _Turns(READS_PER_SIGNER)
        self._answered: asyncio.Future[None] | None = None  # the latest batch's publishing and settling
        self._abandoned = False  # stopping while the database was away: everything is left
        metrics.inc("aodm_dead_lettered_total", 0, service=name)  # a series from the start, so rates see the first

    async def __call__(self, delivery: Delivery) -> None:
        await self.handle([delivery])

    async def handle(self, deliveries: list[Delivery]) -> None:
        await (await self.begin(deliveries))

    async def begin(self, deliveries: list[Delivery]) -> "asyncio.Future[None]":
        """Stages 1–3, then stages 4–5 under way (returned): a caller may begin the next
        batch meanwhile (the session worker does); its publishes follow these, and so does
        its settling."""
        started = time.perf_counter()
        outcomes = [Outcome(delivery) for delivery in deliveries]
        if self._abandoned:  # a later batch must not commit ahead of one left for redelivery
            return self._leave_all(outcomes)
        for outcome in outcomes:
            self._decode(outcome)
        self._verify(outcomes)
        if not await self._run_sends(sends(outcomes)):
            return self._leave_all(outcomes)
        for outcome in outcomes:
            for committed in outcome.committed if outcome.code == "ok" else []:
                committed()
        no_effects_for_replays(outcomes)
        metrics.observe("aodm_batch_size", len(outcomes), service=self.name)
        reads = [o for o in outcomes if is_read(o)]
        answered = [o for o in outcomes if not is_read(o)]
        elapsed = time.perf_counter() - started
        self._count(answered, elapsed)
        publishing: list[Awaitable[None]] = [self._answer(answered, len(outcomes), elapsed)] if answered else []
        if reads:
            reading = self._read_and_reply(reads, len(outcomes), started)
            # Reads alone (a lone QueryMessage, say) run in the settling task itself.
            publishing.append(asyncio.ensure_future(reading) if publishing else reading)
        return self._settle_later(outcomes, publishing)

    def _leave_all(self, outcomes: list[Outcome]) -> "asyncio.Future[None]":
        """Stopping while the database is away: nothing is taken or answered, and the broker
        gives the requests back (to this service's next run, or another worker)."""
        self._abandoned = True
        for outcome in outcomes:
            outcome.left = True
        log.info("left for redelivery", service=self.name, requests=len(outcomes))
        return self._settle_later(outcomes, [])

    # -- 1. decode, 2. verify (no database) ------------------------------------------------

    def _decode(self, outcome: Outcome) -> None:
        try:
            self._parse(outcome)
        except AodmError as exc:
            self._fail(outcome, exc)

    def _parse(self, outcome: Outcome) -> None:
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
        """A bad signature or Id is the answer, whatever else was wrong: nothing is taken,
        and no caller recognised, on a claim nobody proved."""
        for outcome in outcomes:
            if outcome.env is None:
                continue  # not even an envelope: its error stands
            try:
                envelopes.verify(outcome.env)
            except AodmError as exc:
                outcome.caller, outcome.caller_is_handle = None, False
                self._fail(outcome, exc)

    # -- 3. authenticate, run, store -------------------------------------------------------

    async def _run_sends(self, outcomes: list[Outcome]) -> bool:
        """In batch order, segment by segment (`outcomes.segments`). False: stopping while
        the database was away, nothing of the rest taken."""
        for segment in segments(outcomes):
            if not await self._with_database(functools.partial(self._run_segment, segment)):
                return False
        return True

    async def _with_database(self, attempt: Callable[[], Awaitable[Trouble]]) -> bool:
        """Wait out database faults, however long they last: they are never the request's.
        False if the service stops meanwhile."""
        backoff = 0.1
        while True:
            try:
                trouble = await attempt()
            except DatabaseUnavailable as exc:
                trouble = Unavailable(exc)
            if not isinstance(trouble, Unavailable):
                return True
            what = "dependency" if isinstance(trouble.error, DependencyUnavailable) else "database"
            if what == "database":
                await replace_connections(self.pool, self.read_pool)
            if self.stopping.is_set():
                return False
            log.warning(f"{what} unavailable, retrying", service=self.name, error=repr(trouble.error), backoff=backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _run_segment(self, segment: list[Outcome]) -> Trouble:
        """Until each request has its answer: a failing one is retried (and at last taken
        out), a failing run is split into single requests, a lost claim runs it again."""
        batched = True
        while batch := [o for o in segment if o.code == "ok"]:
            first, copies = firsts(batch)
            take = self._take_own if first[0].action.own_record else self._take_in_transaction
            match await take(first, batched):
                case None:
                    answer_copies(copies)
                    return None
                case Unavailable() as away:
                    return away
                case HandlerFailed(outcomes=[one], error=error):
                    self._count_failure(one, error)
                case HandlerFailed(outcomes=several, error=error):
                    log.warning("batched handler failed, running its requests one by one", service=self.name,
                                action=several[0].action_name, requests=len(several), error=repr(error))
                    batched = False
                case ClaimLost():
                    pass
        return None

    async def _take_own(self, batch: list[Outcome], batched: bool) -> Trouble:
        """The handler's statement is atomic on its own, and recognises what it stored before."""
        async with self.pool.acquire() as conn:
            for run in runs(batch, batched):
                if trouble := await self._invoke(conn, run):
                    return trouble
        return None

    async def _take_in_transaction(self, batch: list[Outcome], batched: bool) -> Trouble:
        """Committed only if nothing went wrong (a fault that raises leaves the transaction
        open: the pool rolls it back as it takes the connection back)."""
        async with self.pool.acquire() as conn:
            transaction = conn.transaction()
            await transaction.start()
            trouble = await self._take(conn, batch, batched)
            await (transaction.rollback() if trouble else transaction.commit())
        return trouble

    async def _take(self, conn: asyncpg.Connection, batch: list[Outcome], batched: bool) -> Trouble:
        batch = await self._hold_leases(conn, batch)
        stored = await requests_store.lock_and_look_up(conn, self.schema, [o.env.id for o in batch]) if batch else {}
        fresh = []
        for outcome in batch:
            if row := stored.get(outcome.env.id):
                self._replay(outcome, row)
            else:
                fresh.append(outcome)
        for run in runs(fresh, batched):
            if trouble := await self._invoke(conn, run):
                return trouble
        done = [o for o in fresh if o.code == "ok"]
        if done and not await requests_store.store_replies(
            conn, self.schema, [o.env.id for o in done], [o.reply for o in done],
            [outgoing.encode(o.effects) for o in done],
        ):
            return ClaimLost()
        return None

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

    def _replay(self, outcome: Outcome, row: asyncpg.Record) -> None:
        """A request seen before is answered as the first time; whether its stored effects
        go out again is `no_effects_for_replays`'s call."""
        outcome.duplicate = outcome.stored_earlier = True  # an earlier try of ours was rolled back
        outcome.reply = bytes(row["stored_reply"])
        outcome.effects = outgoing.decode(row["stored_effects"])

    async def _invoke(self, conn: asyncpg.Connection, run: list[Outcome]) -> Trouble:
        """Authenticate each request, then its handler (one call for a batched action's
        run), timed; each request gets its result or its typed error."""
        ready: list[tuple[Outcome, Context]] = []
        for outcome in run:
            match await self._authenticate(conn, outcome):
                case Context() as ctx:
                    ready.append((outcome, ctx))
                case AodmError() as refused:
                    self._fail(outcome, refused)  # refused before its handler: nothing of it was written
                case HandlerFailed() as failed:
                    return failed
        if not ready:
            return None
        first_try = [not outcome.tried for outcome, _ in ready]
        for outcome, _ in ready:
            outcome.tried = True
        results = await self._call(run[0].action, ready)
        if not isinstance(results, list):
            return results
        self._leave([outcome for (outcome, _), result in zip(ready, results, strict=True) if result is FENCED])
        for (outcome, ctx), result, first in zip(ready, results, first_try, strict=True):
            if result is FENCED:
                continue
            if isinstance(result, AodmError):
                self._fail(outcome, result)
                continue
            outcome.reply, outcome.effects, outcome.committed = ok(outcome.env.id, result), ctx.effects, ctx.committed
            outcome.duplicate = ctx.stored_before
            outcome.stored_earlier = ctx.stored_before and first
        return None

    async def _authenticate(self, conn: asyncpg.Connection, outcome: Outcome) -> Context | AodmError | HandlerFailed:
        env, action = outcome.env, outcome.action
        # Freshness is judged for a first sighting only: a redelivery that waited out an
        # outage finds its stored reply instead (an action keeping its own record judges it
        # with the record at hand).
        stale = _staleness(env)
        if stale is not None and not action.own_record:
            return stale
        try:
            caller, scope = await self.authenticate(conn, env, action)
        except AodmError as refused:
            # What authentication refuses was never stored (sessions, members and their keys
            # never change), so such a request is new: stale first, as §7 orders the checks.
            return stale or refused
        except DatabaseUnavailable:
            raise
        except Exception as exc:
            return HandlerFailed([outcome], exc)
        outcome.caller, outcome.caller_is_handle = caller, caller != env.owner
        return Context(conn=conn, envelope=env, caller=caller, scope=scope, now=envelopes.now_ms(), app=self.app,
                       stale=stale, lease=outcome.delivery.lease)

    async def _call(self, action: Action, ready: list[tuple[Outcome, Context]]) -> list[object] | Trouble:
        """The handler's results, one per request; what went wrong otherwise. A database
        fault is left to raise (`_with_database` waits it out)."""
        try:
            async with asyncio.timeout(self.handler_timeout):  # no extra task, unlike wait_for
                for _, ctx in ready:
                    await faults.before_handler(ctx.envelope, self.handler_timeout)
                if action.batched:
                    return await action.handler([ctx for _, ctx in ready], [outcome.request for outcome, _ in ready])
                [(outcome, ctx)] = ready
                return [await action.handler(ctx, outcome.request)]
        except TimeoutError as exc:  # before DatabaseUnavailable: TimeoutError is an OSError
            if not await self._database_answers():
                return Unavailable(exc)
            return HandlerFailed([outcome for outcome, _ in ready], exc)
        except DatabaseUnavailable:
            raise
        except asyncpg.UniqueViolationError as exc:
            if action.own_record:  # another worker stored one of them first (a shard handover)
                return ClaimLost()
            return HandlerFailed([outcome for outcome, _ in ready], exc)
        except Exception as exc:
            return HandlerFailed([outcome for outcome, _ in ready], exc)

    async def _database_answers(self) -> bool:
        try:
            async with asyncio.timeout(2):
                return await self.pool.fetchval("SELECT 1") == 1
        except (*DatabaseUnavailable, TimeoutError):
            return False

    # -- errors become replies (the one place) ---------------------------------------------

    def _count_failure(self, outcome: Outcome, error: BaseException) -> None:
        """A handler that raised: a typed error is its answer (what it wrote was rolled
        back). Anything else (a bug, a hung handler) is retried, and its transaction was
        rolled back too, so a retry cannot double anything; after MAX_ATTEMPTS in a row it
        is poison."""
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

    # -- 4. publish ------------------------------------------------------------------------

    def _answer(self, outcomes: list[Outcome], batch: int, elapsed: float) -> "asyncio.Future[None]":
        """Publish these requests' effects and replies now (a task), to be confirmed before
        the batch is settled, then log them. They are issued here, before the next batch can
        begin, so batches' messages leave in batch order (and a handle's notifications in
        the order they were produced). Poison is answered when it is dead-lettered."""
        if any(o.effects and not o.duplicate for o in outcomes):
            faults.crash_point("crash-after-commit")
        answered = [o for o in outcomes if not o.poison]
        for outcome in answered:
            for note in outcome.effects.notifications:
                metrics.inc("aodm_notifications_total", kind=type(note).__name__, service=self.name)
        # Frames leave in this order and the broker routes a channel's publishes in order, so
        # a Spawn is in its shard before the caller can read the reply and write to the session.
        messages = outgoing.merge([o.effects for o in answered]) + replies(answered)
        return asyncio.ensure_future(self._publish_and_log(messages, outcomes, batch, elapsed))

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
            if not await self._with_database(functools.partial(self._run_read, read)):
                self._abandoned = read.left = True  # stopping while the database is away
                return
            elapsed = time.perf_counter() - started
            self._count([read], elapsed)
            if not read.poison:
                await self._publish(replies([read]))
        self._log([read], batch, elapsed)  # after the reply, which need not wait for it

    async def _run_read(self, outcome: Outcome) -> Trouble:
        """On the read-only pool: the database itself refuses any write a dryrun attempts."""
        while outcome.code == "ok":
            async with self.read_pool.acquire() as conn:
                trouble = await self._invoke(conn, [outcome])
            match trouble:
                case HandlerFailed(error=error):
                    self._count_failure(outcome, error)
                case _:
                    return trouble
        return None

    async def _publish(self, messages: list[Message]) -> None:
        unroutable = await self.bus.publish_all(messages)
        # No queue for a handle (yet): the notifier, which keeps them, creates it and delivers.
        redirected = [outgoing.for_the_notifier(m) for m in unroutable if m.exchange == topology.INBOX]
        for message in [m for m in unroutable if m.exchange != topology.INBOX] + await self.bus.publish_all(redirected):
            # A reply whose client has gone, or an event nobody is bound for: nothing to retry.
            log.warning("unroutable publish dropped", service=self.name,
                        destination=f"{message.exchange or '(default)'}/{message.routing_key}")

    # -- 5. settle (the one place) ---------------------------------------------------------

    def _settle_later(self, outcomes: list[Outcome], publishing: list[Awaitable[None]]) -> "asyncio.Future[None]":
        self._answered = asyncio.ensure_future(self._settle(outcomes, publishing, after=self._answered))
        return self._answered

    async def _settle(self, outcomes: list[Outcome], publishing: list[Awaitable[None]],
                      after: "asyncio.Future[None] | None") -> None:
        """Each delivery as `settlement` decides, once the broker has confirmed what
        answering the batch published and the batch before is settled (a `multiple` ack
        must not cover deliveries whose answers are not confirmed yet):
        - ACK: acknowledged;
        - DEAD_LETTER: rejected into the dead letters, then answered `internal`;
        - LEAVE: handed back (its channel closed, if the broker has not closed it already),
          so no later ack on that channel can count it as done.
        On a broker fault the whole batch is handed back, and redelivered it is found stored
        and answered as the first time; on a bug it is dead-lettered."""
        deliveries = [o.delivery for o in outcomes]
        try:
            await _all(publishing)
            poison = [o for o in outcomes if settlement(o) is Settle.DEAD_LETTER]
            for outcome in poison:
                await outcome.delivery.reject(requeue=False)
            if poison:
                await self._publish(outgoing.merge([o.effects for o in poison]) + replies(poison))
            if after is not None:
                await asyncio.wait([after])  # it settles its own batch, whatever its outcome
            acks = [o.delivery for o in outcomes if settlement(o) is Settle.ACK]
            left = [o.delivery for o in outcomes if settlement(o) is Settle.LEAVE]
            if not left:
                return await ack_in_order(acks)
            for delivery in acks:
                await delivery.ack()  # one by one: a `multiple` ack would cover what is left
            await hand_back(left, ConnectionError("left for redelivery"))
        except BrokerError as exc:
            await hand_back(deliveries, exc)
            raise
        except Exception as exc:  # the last line of defence, for what a bug left under way
            await dead_letter([d for d in deliveries if not d.settled], exc)
            raise

    # -- what is seen of it ----------------------------------------------------------------

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


def _staleness(env: envelopes.Envelope) -> AodmError | None:
    try:
        envelopes.check_fresh(env)
    except AodmError as exc:
        return exc
    return None


async def _all(publishing: list[Awaitable[None]]) -> None:
    if len(publishing) == 1:
        await publishing[0]  # a coroutine runs in this task: no gather, no task of its own
    elif publishing:
        await asyncio.gather(*publishing)


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
