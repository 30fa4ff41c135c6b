"""Key actions: RotateSessionKey, GetCurrentKey, GetKeyByGeneration."""

from aodm.encoding import b64decode, b64encode
from aodm.errors import InvalidArgument, NoSessionKey, NotFound
from aodm.notifications import KeyRotated
from aodm.session_api import (
    SEALED_KEY_BYTES,
    GetCurrentKey,
    GetKeyByGeneration,
    KeyBatch,
    Rotated,
    RotateSessionKey,
    SealedKey,
    Shared,
    ShareKeys,
)
from services.session import activity, store
from services.session.consent import REQUEST_GENERATIONS, refusal
from services.session.members import Members
from shared.actions import Context


async def _checked_entries(ctx: Context, members: Members, req: RotateSessionKey) -> list[tuple[str, bytes, bytes]]:
    """Exactly one entry per current device of each member, sealed to that device's box key."""
    expected = await ctx.app.directory.devices_now(ctx.conn, members)
    entries = [(entry.handle, b64decode(entry.box_key, field="BoxKey", length=32),
                b64decode(entry.sealed_key, field="SealedKey", length=SEALED_KEY_BYTES)) for entry in req.keys]
    named = [(handle, box) for handle, box, _ in entries]
    if len(set(named)) != len(named) or set(named) != expected:
        counts = ", ".join(f"{h}: {sum(1 for eh, _ in expected if eh == h)}" for h in members.handles)
        raise InvalidArgument(f"Keys must hold exactly one entry for each current device of each member, "
                              f"sealed to its box key (devices: {counts}; GetDeviceLog lists them)")
    return entries


async def rotate_session_key(ctx: Context, req: RotateSessionKey) -> Rotated:
    members: Members = ctx.scope
    entries = await _checked_entries(ctx, members, req)
    session_id = ctx.envelope.target
    rotated = await store.next_generation(ctx.conn, session_id, ctx.caller, REQUEST_GENERATIONS)
    if rotated is None:
        row = await store.consent(ctx.conn, session_id)
        raise refusal("you_blocked" if ctx.caller in row["blocked_by"] else "not_accepted")
    generation, pending_for = rotated["generation"], rotated["pending_for"]
    await store.insert_key_batch(ctx.conn, session_id, generation, ctx.caller, ctx.now, entries)
    # A request's recipient is told of its first key (it needs it to read the request),
    # not of the opener's later rotations.
    told = [h for h in members.handles if h == ctx.caller or pending_for in (None, ctx.caller) or generation == 1]
    ctx.notify(KeyRotated, told, session_id=session_id, generation=generation, rotated_by=ctx.caller)
    activity.touch(ctx, session_id, ctx.now)
    return Rotated(generation)


async def share_keys(ctx: Context, req: ShareKeys) -> Shared:
    """A member gives its own current devices the key of a generation it can read: each
    entry is the caller's, sealed to one of its current devices' box keys. Only the
    caller's own devices: it cannot give anyone else a key. The server cannot see what is
    sealed; a device that gets a wrong key is its own other device's doing."""
    members: Members = ctx.scope
    mine = set((await ctx.app.directory.device_keys(ctx.conn, members, ctx.caller)).values())
    entries = []
    for entry in req.keys:
        box = b64decode(entry.box_key, field="BoxKey", length=32)
        if entry.handle != ctx.caller or box not in mine:
            raise InvalidArgument("ShareKeys seals only to the caller's own current devices (GetDeviceLog lists them)")
        entries.append((entry.handle, box, b64decode(entry.sealed_key, field="SealedKey", length=SEALED_KEY_BYTES)))
    if len({box for _, box, _ in entries}) != len(entries):
        raise InvalidArgument("one entry per device")
    if not await store.key_batch(ctx.conn, ctx.envelope.target, req.generation):
        raise NotFound(f"no key generation {req.generation}")
    added = await store.share_keys(ctx.conn, ctx.envelope.target, req.generation, entries)
    directory, key = ctx.app.directory, (ctx.envelope.target, req.generation)
    ctx.on_commit(lambda: directory.forget_batch(*key))  # it seals to more devices now
    return Shared(req.generation, added)


async def _batch(ctx: Context, generation: int) -> KeyBatch:
    rows = await store.key_batch(ctx.conn, ctx.envelope.target, generation)
    if not rows:
        raise NotFound(f"no key generation {generation}")
    keys = [SealedKey(r["handle"], b64encode(r["box_key"]), b64encode(r["sealed_key"])) for r in rows]
    return KeyBatch(generation, rows[0]["rotated_by"], rows[0]["created_at"], keys)


async def get_current_key(ctx: Context, req: GetCurrentKey) -> KeyBatch:
    generation = await store.current_generation(ctx.conn, ctx.envelope.target)
    if not generation:
        raise NoSessionKey("the session has no key yet: RotateSessionKey first")
    return await _batch(ctx, generation)


async def get_key_by_generation(ctx: Context, req: GetKeyByGeneration) -> KeyBatch:
    return await _batch(ctx, req.generation)
