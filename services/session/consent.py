"""Consent actions: Accept, Block, Unblock; and what a session's consent allows.

A session opened by one member is a message request to the other until it accepts (Accept,
or sending in it). Until then the opener may store only `request_messages` messages and a
few key generations, and the other member is told of the request, not of each message:
its SessionEstablished (State "incoming"), the first key and the first message, which is
what it needs to read the request (the seed's flow), and nothing more until it accepts. A member that blocks the other
refuses its messages from then on; the blocked member is answered `not_accepted`, as for a
request not accepted yet. The session worker is the one writer of a session's consent (its
shard orders every change with the sends); each change goes to the registry's chat lists."""

from aodm import topology
from aodm.errors import Forbidden, NotAccepted
from aodm.registry_api import ActivityReport, ConsentChange
from aodm.session_api import Accept, Block, Consent, Unblock, consent_state
from services.session import store
from shared.actions import Context

REQUEST_GENERATIONS = 3  # key generations the opener of a request may create before it is accepted


def refusal(reason: str) -> NotAccepted | Forbidden:
    """The error for a send the consent refused (session.store_messages' `refused`)."""
    if reason == "you_blocked":
        return Forbidden("you blocked this session: Unblock it to send")
    return NotAccepted("the peer has not accepted this session; a message request holds only a few messages until it does")


def report(ctx: Context, session_id: str, pending_for: str | None, blocked_by: list[str], version: int) -> None:
    """Tell the registry (its chat lists), as an effect of the request: published after the
    commit, and again should the request be redelivered. The registry keeps the highest version."""
    change = ConsentChange(session_id, pending_for, list(blocked_by), version)
    ctx.emit(topology.INTERNAL, topology.ACTIVITY_ROUTING_KEY, ActivityReport([], [change]))


async def _change(ctx: Context, change: str) -> Consent:
    session_id = ctx.envelope.target
    row = await store.change_consent(ctx.conn, session_id, ctx.caller, change)
    if row is None:  # nothing to change: answer with the consent as it is
        row = await store.consent(ctx.conn, session_id)
    else:
        report(ctx, session_id, row["pending_for"], row["blocked_by"], row["consent_version"])
    return Consent(consent_state(ctx.caller, row["pending_for"], row["blocked_by"]))


async def accept(ctx: Context, req: Accept) -> Consent:
    return await _change(ctx, "accept")


async def block(ctx: Context, req: Block) -> Consent:
    return await _change(ctx, "block")


async def unblock(ctx: Context, req: Unblock) -> Consent:
    return await _change(ctx, "unblock")
