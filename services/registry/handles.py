"""Handle actions: Register, QueryHandle, GetHandles."""

from shared import topology
from shared.encoding import b64decode, b64encode
from shared.errors import AlreadyExists, NotFound
from shared.notifications import HandleRegistered
from shared.registry_api import GetHandles, HandleInfo, HandleList, QueryHandle, Register, check_handle
from shared.service import Context

from services.registry import store


def _info(row) -> HandleInfo:
    return HandleInfo(
        handle=row["handle"],
        sign_key=b64encode(row["sign_key"]),
        box_key=b64encode(row["box_key"]),
        created_at=row["created_at"],
    )


async def register(ctx: Context, req: Register) -> HandleInfo:
    """The envelope's signature by Owner is the proof of possession of the signing key."""
    name = check_handle(req.handle)
    sign_key = b64decode(ctx.envelope.owner, field="Owner", length=32)
    box_key = b64decode(req.box_key, field="BoxKey", length=32)
    if not await store.insert_handle(ctx.conn, name, sign_key, box_key, ctx.now):
        raise AlreadyExists(f"handle {name!r} is taken")
    ctx.emit(topology.INTERNAL, topology.NOTIFIER_ROUTING_KEY, HandleRegistered(name))
    return HandleInfo(handle=name, sign_key=ctx.envelope.owner, box_key=req.box_key, created_at=ctx.now)


async def query_handle(ctx: Context, req: QueryHandle) -> HandleInfo:
    row = await store.handle(ctx.conn, check_handle(req.handle))
    if row is None:
        raise NotFound(f"no handle {req.handle!r}")
    return _info(row)


async def get_handles(ctx: Context, req: GetHandles) -> HandleList:
    rows = await store.handles_of(ctx.conn, b64decode(req.owner, field="Owner", length=32))
    return HandleList([_info(row) for row in rows])
