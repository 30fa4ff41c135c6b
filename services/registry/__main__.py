"""The aodm registry: handles and their owners' keys (Register, QueryHandle, GetHandles),
each handle's devices and their signed log (AddDevice, RemoveDevice, GetDeviceLog), the
one DM session of each pair of handles (EstablishSession, QuerySession) and each handle's
chat list (GetChatList). Its state is the PostgreSQL schema `registry`, created and
migrated at start. With AODM_BROKER_ADMIN_URL set it issues each device its own broker
user (IssueBrokerCredentials)."""

import asyncio
import functools

import asyncpg
import msgspec

from aodm import topology
from aodm.encoding import b64decode
from aodm.envelope import Envelope
from aodm.errors import Unauthorized
from aodm.registry_api import (
    AddDevice,
    EstablishSession,
    GetChatList,
    GetDeviceLog,
    GetHandles,
    IssueBrokerCredentials,
    QueryHandle,
    QuerySession,
    Register,
    RemoveDevice,
)
from aodm.transport import Delivery
from services.registry import credentials, devices, handles, sessions, store
from services.registry.inboxes import Inboxes
from services.registry.limits import RegistryLimits
from shared import db, runtime
from shared.actions import Action
from shared.config import Settings
from shared.logs import log
from shared.service import Processor

ACTIONS = {
    "Register": Action(Register, handles.register, "send", needs_handle=False),
    "QueryHandle": Action(QueryHandle, handles.query_handle, "dryrun", needs_handle=False),
    "GetHandles": Action(GetHandles, handles.get_handles, "dryrun", needs_handle=False),
    "QuerySession": Action(QuerySession, sessions.query_session, "dryrun", needs_handle=False),
    "EstablishSession": Action(EstablishSession, sessions.establish_session, "send"),
    "GetChatList": Action(GetChatList, sessions.get_chat_list, "dryrun"),
    "IssueBrokerCredentials": Action(IssueBrokerCredentials, handles.issue_broker_credentials, "send"),
    "AddDevice": Action(AddDevice, devices.add_device, "send"),
    "RemoveDevice": Action(RemoveDevice, devices.remove_device, "send"),
    "GetDeviceLog": Action(GetDeviceLog, devices.get_device_log, "dryrun", needs_handle=False),
}


def actions(
    issuer: credentials.Issuer | None, limits: RegistryLimits = RegistryLimits(), inboxes: Inboxes | None = None
) -> dict[str, Action]:
    """ACTIONS with the broker-credential issuer (None: issuance off), the limits and the
    inbox declarer (None: the notifier alone declares the queues) bound in."""
    bound = {
        "Register": functools.partial(handles.register, issuer=issuer, limits=limits, inboxes=inboxes),
        "IssueBrokerCredentials": functools.partial(handles.issue_broker_credentials, issuer=issuer),
        "EstablishSession": functools.partial(sessions.establish_session, limits=limits),
        "AddDevice": functools.partial(devices.add_device, inboxes=inboxes),
        "RemoveDevice": functools.partial(devices.remove_device, issuer=issuer, inboxes=inboxes),
    }
    return {
        name: Action(a.request, bound[name], a.mode, a.needs_handle) if name in bound else a
        for name, a in ACTIONS.items()
    }


# What a recovery key may sign: changes to its handle's devices, nothing else.
RECOVERY_ACTIONS = {"AddDevice", "RemoveDevice"}


async def authenticate(conn: asyncpg.Connection, env: Envelope, action: Action) -> tuple[str, asyncpg.Record | None]:
    """From is the signer's own address, or a handle one of whose current devices signed
    (scope: that device's row)."""
    if env.from_ == env.owner:
        if action.needs_handle:
            raise Unauthorized("From must be a handle registered to Owner for this action")
        return env.from_, None
    device = await store.device_of(conn, env.from_, b64decode(env.owner, field="Owner", length=32))
    if device is None:
        if await store.handle(conn, env.from_) is None:
            raise Unauthorized(f"From {env.from_!r} is not a registered handle")
        raise Unauthorized(f"handle {env.from_!r} is not owned by the key that signed (no current device of it)")
    if device["kind"] == "recovery" and env.action not in RECOVERY_ACTIONS:
        raise Unauthorized("a recovery key may only add and remove devices")
    return env.from_, device


async def start(rt: runtime.Runtime) -> None:
    processor = Processor(
        name="registry", schema=store.SCHEMA, pool=rt.pool, read_pool=rt.read_pool, bus=rt.bus,
        actions=actions(credentials.Issuer.from_settings(rt.settings),
                        RegistryLimits(rt.settings.sessions_per_hour, rt.settings.handles_per_day), Inboxes(rt.bus)),
        authenticate=authenticate,
        handler_timeout=rt.settings.handler_timeout_s, stopping=rt.stop,
    )

    runtime.requests_from_zero("registry", processor.actions)

    async def on_activity(delivery: Delivery) -> None:
        if delivery.user_id != rt.bus.user:  # only the services' own broker user publishes events
            log.warning("activity event from another broker user dropped", user_id=delivery.user_id)
            return await delivery.ack()
        try:
            await db.retrying(lambda: sessions.record_activity(rt.pool, delivery.body), what="activity", pool=rt.pool)
        except msgspec.DecodeError as exc:  # internal traffic: log and drop
            log.warning("bad activity event dropped", error=str(exc))
        await delivery.ack()

    await rt.consume(topology.REGISTRY_QUEUE, processor, concurrency=16)
    await rt.consume(topology.ACTIVITY_QUEUE, on_activity, concurrency=4)


async def run(settings: Settings, stop: asyncio.Event) -> None:
    await runtime.serve("registry", settings, stop, start, schema=store.SCHEMA, migrations=store.MIGRATIONS)


if __name__ == "__main__":
    runtime.main("registry", run, __doc__)
