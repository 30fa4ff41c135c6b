"""Message actions: SendMessage, QueryMessage."""

import re

from aodm.encoding import b64decode, b64encode
from aodm.errors import AodmError, InvalidArgument, KeyOutdated, NoSessionKey, NotFound
from aodm.notifications import NewMessage
from aodm.session_api import MAX_PAGE, MAX_PAGE_BYTES, MessagePage, QueryMessage, SendMessage, Sent, StoredMessage
from services.session import activity, store
from services.session.consent import refusal, report
from services.session.limits import REQUEST_MESSAGES, SendLimits
from services.session.members import Members
from shared.actions import FENCED, Context

MIN_CONTENT_BYTES = 24 + 16  # SecretBox nonce + MAC: anything shorter cannot be a message
NO_BOUND = 2**62
# "<order><timestamp>.<seq>", as issued: the order it was issued for ("a" or "d") is part of
# it, so a cursor passed back with the other Order is refused rather than read as the
# wrong page. Servers before issued "<timestamp>.<seq>", which says neither: refused too.
_CURSOR = re.compile(r"([ad])([0-9]{1,19})\.([0-9]{1,19})")
_OLD_CURSOR = re.compile(r"[0-9]{1,19}\.[0-9]{1,19}")


def _content(req: SendMessage) -> bytes:
    content = b64decode(req.content, field="Content")
    if len(content) < MIN_CONTENT_BYTES:
        raise InvalidArgument(f"Content must be nonce ‖ SecretBox ciphertext, at least {MIN_CONTENT_BYTES} bytes")
    return content


def _unnamed(req: SendMessage) -> AodmError | None:
    """Why a new message without Generation is refused. Only its sender knows the key it
    used: the generation current when the service stores the message may be a later one (the
    peer rotated while the message waited in the queue, or before a resend), and a message
    filed under it could never be read. Servers before took the current one; a resend of a
    message one of them stored is still answered from its row."""
    if req.generation is None:
        return InvalidArgument("Generation is required: the key generation Content is encrypted under "
                               "(servers before filled in the current one, which may not be it)")
    return None


async def _outdated(ctx: Context, generation: int) -> AodmError | None:
    """A new message goes only under a batch sealed to the members' devices of now: one
    added since could not read it, one removed since could (protocol §10.8)."""
    directory = ctx.app.directory
    sealed = await directory.sealed_to(ctx.conn, ctx.envelope.target, generation)
    if sealed is None or sealed == await directory.devices_now(ctx.conn, ctx.scope):
        return None  # no such generation is the statement's to answer
    return KeyOutdated(f"generation {generation} is not sealed to the members' devices of now: "
                       "RotateSessionKey, then send under the new generation")


def _refused(asked: int | None, current: int) -> AodmError:
    """Why a message was not stored: no key yet, or no such generation."""
    if not current:
        return NoSessionKey("the session has no key yet: RotateSessionKey first")
    return NotFound(f"no key generation {asked}; the current one is {current}")


async def send_messages(
    ctxs: list[Context], reqs: list[SendMessage], limits: SendLimits | None = None
) -> list[Sent | AodmError | str]:
    """A run of SendMessages, possibly to many sessions, stored with one statement.

    SendMessage keeps its own record (Action.own_record): the statement that stores a
    message records its request's Id with it, so a request stored before is answered from
    its message's row, as the first time. The statement also checks each message's shard
    lease: one whose shard another worker has taken since is left to it (FENCED). A sender
    over its rate is refused before the statement (limits.py); a resend counts too. A
    request without Generation is looked up but never stored (_unnamed)."""
    results: list[Sent | AodmError | None] = []
    refusals: dict[int, AodmError] = {}  # why a request that names a generation is not taken
    batch = []
    for i, (ctx, req) in enumerate(zip(ctxs, reqs, strict=True)):
        try:
            content = _content(req)
        except AodmError as exc:
            results.append(exc)
            continue
        takeable = ctx.stale is None and req.generation is not None
        if takeable and (outdated := await _outdated(ctx, req.generation)):  # looked up, not taken
            takeable, refusals[i] = False, outdated
        if limits is not None and takeable and (refused := limits.take(ctx.caller, ctx.envelope.target)):
            results.append(refused)
            continue
        shard, epoch = (ctx.lease.shard, ctx.lease.epoch) if ctx.lease is not None else (None, None)
        signer = b64decode(ctx.envelope.owner, field="Owner", length=32)  # the device that sent it
        batch.append((ctx.envelope.target, req.generation, ctx.envelope.id, ctx.caller, signer, content, takeable, shard, epoch))
        results.append(None)
    request_messages = limits.request_messages if limits is not None else REQUEST_MESSAGES
    stored = await store.store_messages(ctxs[0].conn, max(ctx.now for ctx in ctxs), batch, request_messages) if batch else {}
    for i, (ctx, req) in enumerate(zip(ctxs, reqs, strict=True)):
        if results[i] is not None:
            continue
        row = stored[ctx.envelope.id]
        ctx.stored_before = row["stored_before"]
        if row["fenced"]:
            results[i] = FENCED
        elif row["seq"] is not None:
            results[i] = _sent(ctx, req, row)
        elif row["refused"] is not None:
            results[i] = refusal(row["refused"])
        else:
            results[i] = ctx.stale or _unnamed(req) or refusals.get(i) or _refused(req.generation, row["current"])
    return results


def _sent(ctx: Context, req: SendMessage, row) -> Sent:
    """Notify the other member (the notification carries the ciphertext; none for a
    request's messages, see consent.py) and answer. A send that accepted a request tells
    the registry."""
    members: Members = ctx.scope
    session_id = ctx.envelope.target
    if row["accepted"]:
        report(ctx, session_id, None, [], row["consent_version"])
    ctx.notify(
        NewMessage,
        [] if row["quiet"] else [members.other(ctx.caller)],
        at=row["ts"],  # the same whenever it is (re)published
        session_id=session_id,
        message_id=ctx.envelope.id,
        seq=row["seq"],
        sender=ctx.caller,
        generation=row["generation"],
        timestamp=row["ts"],
        content=req.content,
    )
    activity.touch(ctx, session_id, row["ts"])
    return Sent(ctx.envelope.id, row["seq"], row["ts"], row["generation"])


def _order(descending: bool) -> str:
    return "d" if descending else "a"


def _cursor(text: str | None, descending: bool) -> tuple[int, int]:
    if text is None:
        return (NO_BOUND, NO_BOUND) if descending else (-1, -1)
    match = _CURSOR.fullmatch(text)
    if match is None and _OLD_CURSOR.fullmatch(text):
        raise InvalidArgument("Cursor is from an earlier server version: query again without it, From the last Timestamp you have")
    if match is None or int(match[2]) > NO_BOUND or int(match[3]) > NO_BOUND:
        raise InvalidArgument("Cursor is not one this service issued")
    if match[1] != _order(descending):
        raise InvalidArgument(f"Cursor was issued for Order {'asc' if descending else 'desc'}: pass it with that Order")
    return int(match[2]), int(match[3])


async def query_message(ctx: Context, req: QueryMessage) -> MessagePage:
    if not 1 <= req.limit <= MAX_PAGE:
        raise InvalidArgument(f"Limit must be between 1 and {MAX_PAGE}")
    lo = 0 if req.from_ is None else req.from_
    hi = NO_BOUND if req.until is None else req.until
    if lo > hi:
        raise InvalidArgument("From is after Until")
    descending = req.order == "desc"
    after = _cursor(req.cursor, descending)
    rows = await store.message_page(ctx.conn, ctx.envelope.target, lo, hi, after, req.limit + 1, descending,
                                    MAX_PAGE_BYTES)
    # More: a message past the limit, or candidates the byte bound left out.
    more = len(rows) > req.limit or (bool(rows) and rows[0]["fetched"] > len(rows))
    rows = rows[: req.limit]
    messages = [
        StoredMessage(
            r["message_id"], r["seq"], r["sender"], b64encode(r["sender_key"]), r["generation"], r["ts"], b64encode(r["content"])
        )
        for r in rows
    ]
    next_cursor = f"{_order(descending)}{rows[-1]['ts']}.{rows[-1]['seq']}" if more else None
    return MessagePage(messages, next_cursor)
