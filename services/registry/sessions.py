"""Pair actions: QuerySession, EstablishSession, GetChatList, and the activity feed."""

import secrets

import msgspec

from aodm import topology
from aodm.encoding import b64encode
from aodm.errors import Forbidden, NotFound
from aodm.notifications import SessionEstablished
from aodm.registry_api import (
    ActivityReport,
    Chat,
    ChatList,
    Established,
    EstablishSession,
    GetChatList,
    QuerySession,
    SessionRef,
    check_handle,
)
from aodm.session_api import Member, Spawn, consent_state
from services.registry import store
from services.registry.limits import HOUR_MS, RegistryLimits, within
from shared.actions import Context


async def query_session(ctx: Context, req: QuerySession) -> SessionRef:
    return SessionRef(await store.session_of(ctx.conn, check_handle(req.handle_a), check_handle(req.handle_b)))


async def establish_session(ctx: Context, req: EstablishSession, limits: RegistryLimits = RegistryLimits()) -> Established:
    """Spawn the pair's session once; a repeat, or the loser of a race, gets the same id."""
    peer = check_handle(req.handle)
    if peer == ctx.caller:
        raise Forbidden("a session needs two different handles")
    peer_row = await store.handle(ctx.conn, peer)
    if peer_row is None:
        raise NotFound(f"no handle {peer!r}")
    session_id = await store.session_of(ctx.conn, ctx.caller, peer)
    created = False
    if session_id is None:  # only a new session counts against the opener's limit
        opened = await store.opened_since(ctx.conn, ctx.caller, ctx.now - HOUR_MS)
        within(opened, limits.sessions_per_hour, HOUR_MS, ctx.now, f"sessions {ctx.caller} opened in an hour")
        session_id = b64encode(secrets.token_bytes(32))
        created = await store.insert_session(ctx.conn, session_id, ctx.caller, peer, ctx.now)
        if not created:  # the peer opened it at the same moment
            session_id = await store.session_of(ctx.conn, ctx.caller, peer)
    me_row = await store.handle(ctx.conn, ctx.caller)
    members = [Member(r["handle"], b64encode(r["sign_key"]), b64encode(r["box_key"])) for r in (me_row, peer_row)]
    # Spawn goes straight into the session's shard ahead of anything a client can send it.
    # A repeat spawns again (a no-op for the worker): should the first call have died after
    # its commit but before publishing, the session still comes to exist, as a request
    # from the member that opened it.
    opener = ctx.caller if created else await store.opener_of(ctx.conn, session_id)
    ctx.emit(topology.SESSIONS, session_id, Spawn(session_id, members, opened_by=opener))
    if not created:
        return Established(session_id, created=False)
    # The peer's one notification for the request (none for the messages it holds).
    ctx.notify(SessionEstablished, [ctx.caller], session_id=session_id, peer=peer, state="outgoing")
    ctx.notify(SessionEstablished, [peer], session_id=session_id, peer=ctx.caller, state="incoming")
    return Established(session_id, created=True)


async def get_chat_list(ctx: Context, req: GetChatList) -> ChatList:
    rows = await store.chats_of(ctx.conn, ctx.caller)
    return ChatList([
        Chat(r["session_id"], r["peer"], r["created_at"], r["last_activity"],
             consent_state(ctx.caller, r["pending_for"], r["blocked_by"]))
        for r in rows
    ])


activity_decoder = msgspec.json.Decoder(ActivityReport)


async def record_activity(pool, body: bytes) -> None:
    """Internal feed from the session workers; last activity only moves forward, and so
    does each session's consent version."""
    report = activity_decoder.decode(body)
    if report.sessions:
        await store.touch_sessions(pool, [(a.session_id, a.at) for a in report.sessions])
    if report.consent:
        await store.set_consent(pool, [(c.session_id, c.pending_for, c.blocked_by, c.version) for c in report.consent])
