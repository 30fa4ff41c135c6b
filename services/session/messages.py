"""Message actions: SendMessage, QueryMessage."""

import re

from shared import topology
from shared.encoding import b64decode, b64encode
from shared.errors import InvalidArgument, NoSessionKey, NotFound
from shared.notifications import NewMessage
from shared.registry_api import Activity
from shared.service import Context
from shared.session_api import MAX_PAGE, MessagePage, QueryMessage, SendMessage, Sent, StoredMessage

from services.session import store
from services.session.members import Members

MIN_CONTENT_BYTES = 24 + 16  # SecretBox nonce + MAC: anything shorter cannot be a message
NO_BOUND = 2**62
_CURSOR = re.compile(r"([0-9]{1,19})\.([0-9]{1,19})")  # "<timestamp>.<seq>", as issued


async def send_message(ctx: Context, req: SendMessage) -> Sent:
    members: Members = ctx.scope
    content = b64decode(req.content, field="Content")
    if len(content) < MIN_CONTENT_BYTES:
        raise InvalidArgument(f"Content must be nonce ‖ SecretBox ciphertext, at least {MIN_CONTENT_BYTES} bytes")
    session_id = ctx.envelope.target
    sender_key = members.sign_keys[ctx.caller]
    stored = await store.append_message(
        ctx.conn, session_id, ctx.now, req.generation, ctx.envelope.id, ctx.caller, sender_key, content
    )
    if stored is None:
        current = await store.current_generation(ctx.conn, session_id)
        if not current:
            raise NoSessionKey("the session has no key yet: RotateSessionKey first")
        raise NotFound(f"no key generation {req.generation}; the current one is {current}")
    seq, ts, generation = stored["seq"], stored["ts"], stored["generation"]
    ctx.notify(
        NewMessage,
        [members.other(ctx.caller)],
        session_id=session_id,
        message_id=ctx.envelope.id,
        seq=seq,
        sender=ctx.caller,
        generation=generation,
        timestamp=ts,
        content=req.content,
    )
    ctx.emit(topology.INTERNAL, topology.ACTIVITY_ROUTING_KEY, Activity(session_id, ts))
    return Sent(ctx.envelope.id, seq, ts, generation)


def _cursor(text: str | None, descending: bool) -> tuple[int, int]:
    if text is None:
        return (NO_BOUND, NO_BOUND) if descending else (-1, -1)
    match = _CURSOR.fullmatch(text)
    if match is None or int(match[1]) > NO_BOUND or int(match[2]) > NO_BOUND:
        raise InvalidArgument("Cursor is not one this service issued")
    return int(match[1]), int(match[2])


async def query_message(ctx: Context, req: QueryMessage) -> MessagePage:
    if not 1 <= req.limit <= MAX_PAGE:
        raise InvalidArgument(f"Limit must be between 1 and {MAX_PAGE}")
    lo = 0 if req.from_ is None else req.from_
    hi = NO_BOUND if req.until is None else req.until
    if lo > hi:
        raise InvalidArgument("From is after Until")
    descending = req.order == "desc"
    after = _cursor(req.cursor, descending)
    rows = await store.message_page(ctx.conn, ctx.envelope.target, lo, hi, after, req.limit + 1, descending)
    more = len(rows) > req.limit
    rows = rows[: req.limit]
    messages = [
        StoredMessage(
            r["message_id"], r["seq"], r["sender"], b64encode(r["sender_key"]), r["generation"], r["ts"], b64encode(r["content"])
        )
        for r in rows
    ]
    next_cursor = f"{rows[-1]['ts']}.{rows[-1]['seq']}" if more else None
    return MessagePage(messages, next_cursor)
