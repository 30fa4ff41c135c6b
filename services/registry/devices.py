"""Device actions: AddDevice, RemoveDevice, GetDeviceLog (protocol §10.8).

A handle's device log is changed one entry at a time: the handle's row is locked, the
log replayed from the database's current state, and the new entry (the request's own
signed envelope) checked by the same rules a client replays (aodm.devices.DeviceLog). A
new device gets its own inbox queue, bound to the handle's routing key, before the reply;
a removed one loses its queue and its broker user. The handle's devices and its peers are
told (DevicesChanged)."""

from aodm import envelope as envelopes
from aodm import topology
from aodm.devices import Device, DeviceLog, device_id
from aodm.encoding import b64decode, b64encode
from aodm.errors import NotFound
from aodm.notifications import DevicesChanged
from aodm.registry_api import (
    MAX_LOG_PAGE,
    AddDevice,
    DeviceChange,
    DeviceInfo,
    DeviceLogPage,
    GetDeviceLog,
    LogEntry,
    RemoveDevice,
    check_handle,
)
from aodm.session_api import DeviceKeysOf, DevicesOf
from services.registry import credentials, store
from services.registry.inboxes import Inboxes
from services.registry.limits import DAY_MS, within
from shared.actions import Context

DEVICE_CHANGES_PER_DAY = 20


def _device(row) -> Device:  # type: ignore[no-untyped-def]
    box = row["box_key"]
    return Device(row["device_id"], row["kind"], b64encode(bytes(row["sign_key"])),
                  b64encode(bytes(box)) if box is not None else None, row["added_seq"])


async def _current_log(ctx: Context, handle: str) -> DeviceLog:
    """The handle's log as it stands, its row locked until the transaction ends (changes to
    one handle's devices take turns). Each change notifies every peer of the handle: they
    are limited per day."""
    if await store.lock_handle(ctx.conn, handle) is None:
        raise NotFound(f"no handle {handle!r}")
    within(await store.log_times_since(ctx.conn, handle, ctx.now - DAY_MS), DEVICE_CHANGES_PER_DAY, DAY_MS,
           ctx.now, "device changes of a handle in a day")
    head = await store.log_head(ctx.conn, handle)
    rows = await store.devices(ctx.conn, handle)
    current = {row["device_id"]: _device(row) for row in rows if row["removed_seq"] is None}
    return DeviceLog(handle, head["seq"], head["head"], current, frozenset(row["device_id"] for row in rows))


async def _append(ctx: Context, before: DeviceLog) -> DeviceLog:
    entry = envelopes.encode(ctx.envelope)
    after = before.apply(entry)
    await store.append_log(ctx.conn, after.handle, after.seq, entry, after.head, ctx.now)
    return after


async def _tell(ctx: Context, log: DeviceLog, change: str, changed: str) -> None:
    """The session workers (which devices may act in the handle's sessions), then the
    handle's devices and its peers."""
    current = [DeviceKeysOf(d.sign_key, d.box_key) for d in log.devices.values() if d.kind == "device" and d.box_key]
    ctx.emit(topology.INTERNAL, topology.SESSION_DEVICES_ROUTING_KEY, DevicesOf(log.handle, log.seq, current))
    recipients = [log.handle, *await store.peers_of(ctx.conn, log.handle)]
    ctx.notify(DevicesChanged, recipients, subject=log.handle, seq=log.seq, change=change, device_id=changed)


async def add_device(ctx: Context, req: AddDevice, inboxes: Inboxes | None = None) -> DeviceChange:
    after = await _append(ctx, await _current_log(ctx, ctx.caller))
    added = after.devices[device_id(b64decode(req.device.sign_key, field="SignKey", length=32))]
    await store.add_device(ctx.conn, after.handle, added.device_id, added.kind,
                           b64decode(added.sign_key, length=32),
                           b64decode(added.box_key, length=32) if added.box_key else None, after.seq)
    if inboxes is not None and added.kind == "device":  # its queue exists before the reply, as at Register
        await inboxes.declare(after.handle, topology.device_inbox(after.handle, added.device_id, added.added_seq))
    await _tell(ctx, after, "added", added.device_id)
    return DeviceChange(added.device_id, after.seq, after.head)


async def remove_device(
    ctx: Context, req: RemoveDevice, issuer: credentials.Issuer | None = None, inboxes: Inboxes | None = None
) -> DeviceChange:
    before = await _current_log(ctx, ctx.caller)
    after = await _append(ctx, before)
    removed = before.devices[req.device_id]
    await store.remove_device(ctx.conn, after.handle, removed.device_id, after.seq)
    if removed.kind == "device":  # its queue and broker login go with it
        if inboxes is not None:
            await inboxes.delete(topology.device_inbox(after.handle, removed.device_id, removed.added_seq))
        if issuer is not None:
            await issuer.delete(issuer.user_for(after.handle, removed.device_id, removed.added_seq))
    await _tell(ctx, after, "removed", removed.device_id)
    return DeviceChange(removed.device_id, after.seq, after.head)


async def get_device_log(ctx: Context, req: GetDeviceLog) -> DeviceLogPage:
    async with ctx.conn.transaction(isolation="repeatable_read", readonly=True):  # one snapshot
        return await _log_page(ctx, check_handle(req.handle), req.after)


async def _log_page(ctx: Context, handle: str, after: int) -> DeviceLogPage:
    head = await store.log_head(ctx.conn, handle)
    if head is None:
        raise NotFound(f"no handle {handle!r}")
    rows = await store.log_entries(ctx.conn, handle, after, MAX_LOG_PAGE)
    devices = [d for d in await store.devices(ctx.conn, handle) if d["removed_seq"] is None]
    return DeviceLogPage(
        handle=handle,
        entries=[LogEntry(row["seq"], bytes(row["entry"]).decode()) for row in rows],
        seq=head["seq"],
        head=head["head"],
        devices=[DeviceInfo(**_device(row).__dict__) for row in devices],
    )
