"""Handle actions: Register, QueryHandle, GetHandles, IssueBrokerCredentials."""

from nacl.bindings import crypto_scalarmult

from aodm import topology
from aodm.devices import device_id, entry_hash, genesis_entry
from aodm.encoding import b64decode, b64encode
from aodm.errors import AlreadyExists, InvalidArgument, NotFound
from aodm.notifications import HandleRegistered
from aodm.registry_api import (
    BrokerCredentials,
    GetHandles,
    HandleInfo,
    HandleList,
    IssueBrokerCredentials,
    QueryHandle,
    Register,
    Registered,
    check_handle,
)
from services.registry import credentials, store
from services.registry.inboxes import Inboxes
from services.registry.limits import DAY_MS, RegistryLimits, within
from shared.actions import Context

_PROBE = bytes(range(1, 33))  # any scalar: clamped, it clears the small-order part of a point


def box_key(text: str) -> bytes:
    """A usable X25519 public key. One of low order (all zeros, say) makes every shared
    secret all zeros: libsodium refuses to seal anything to it, and nobody could."""
    key = b64decode(text, field="BoxKey", length=32)
    try:
        crypto_scalarmult(_PROBE, key)
    except RuntimeError as exc:  # libsodium's "the result is all zeros"
        raise InvalidArgument("BoxKey is a low-order X25519 point: nothing can be sealed to it") from exc
    return key


def _info(row) -> HandleInfo:
    return HandleInfo(
        handle=row["handle"],
        sign_key=b64encode(row["sign_key"]),
        box_key=b64encode(row["box_key"]),
        created_at=row["created_at"],
    )


async def _broker_credentials(issuer: credentials.Issuer | None, handle: str, box_key: bytes,
                              device_id: str = "", added_seq: int = 1) -> BrokerCredentials:
    """The device's own broker user with a new password sealed to its box key (both null
    when this deployment issues none). A management API fault raises a retried error."""
    if issuer is None:
        return BrokerCredentials()
    user, password = await issuer.issue(handle, device_id, added_seq)
    return BrokerCredentials(broker_user=user, sealed_broker_password=credentials.seal(password, box_key))


async def register(
    ctx: Context, req: Register, issuer: credentials.Issuer | None = None, limits: RegistryLimits = RegistryLimits(),
    inboxes: Inboxes | None = None,
) -> Registered:
    """The envelope's signature by Owner is the proof of possession of the signing key.
    The handle's queue is declared before the reply (inboxes.py); the notifier declares it
    too on HandleRegistered (without `inboxes`, only it does)."""
    name = check_handle(req.handle)
    sign_key = b64decode(ctx.envelope.owner, field="Owner", length=32)
    key = box_key(req.box_key)  # before anything is written or issued
    registered = await store.registered_since(ctx.conn, sign_key, ctx.now - DAY_MS)
    within(registered, limits.handles_per_day, DAY_MS, ctx.now, "handles registered by this key in a day")
    if not await store.insert_handle(ctx.conn, name, sign_key, key, ctx.now):
        raise AlreadyExists(f"handle {name!r} is taken")
    # The registering key is the handle's first device, entry 1 of its device log.
    entry = genesis_entry(name, ctx.envelope.owner, b64encode(key))
    await store.add_device(ctx.conn, name, device_id(sign_key), "device", sign_key, key, 1)
    await store.append_log(ctx.conn, name, 1, entry, entry_hash(entry), ctx.now)
    ctx.emit(topology.INTERNAL, topology.NOTIFIER_ROUTING_KEY, HandleRegistered(name))
    if inboxes is not None:  # after the insert: a refused Register makes no queue
        await inboxes.declare(name)
    # Only after the insert succeeded: a taken name must never reset its owner's password.
    issued = await _broker_credentials(issuer, name, key)
    return Registered(
        handle=name, sign_key=ctx.envelope.owner, box_key=req.box_key, created_at=ctx.now,
        broker_user=issued.broker_user, sealed_broker_password=issued.sealed_broker_password,
    )


async def issue_broker_credentials(
    ctx: Context, req: IssueBrokerCredentials, issuer: credentials.Issuer | None = None
) -> BrokerCredentials:
    """A new password for the signing device's broker user, sealed to its box key; the old
    one stops working for new connections. The caller is a handle proven by the signature
    of one of its current devices (ctx.scope)."""
    if issuer is None:
        return BrokerCredentials()
    if await store.lock_handle(ctx.conn, ctx.caller) is None:
        raise NotFound(f"no handle {ctx.caller!r}")
    device = ctx.scope
    return await _broker_credentials(issuer, ctx.caller, bytes(device["box_key"]), device["device_id"],
                                     device["added_seq"])


async def query_handle(ctx: Context, req: QueryHandle) -> HandleInfo:
    row = await store.handle(ctx.conn, check_handle(req.handle))
    if row is None:
        raise NotFound(f"no handle {req.handle!r}")
    return _info(row)


async def get_handles(ctx: Context, req: GetHandles) -> HandleList:
    rows = await store.handles_of(ctx.conn, b64decode(req.owner, field="Owner", length=32))
    return HandleList([_info(row) for row in rows])
