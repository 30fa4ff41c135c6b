"""The aodm session worker: runs every DM session, its key batches (RotateSessionKey,
GetCurrentKey, GetKeyByGeneration), its messages (SendMessage, QueryMessage) and its
consent (Accept, Block, Unblock); only a session's two members may call it. Session ids
are hashed onto AODM_SESSION_SHARDS shard queues, each worked by one worker at a time, in
order: start more workers to scale out. Its state is the PostgreSQL schema `session`,
created and migrated at start."""

import asyncio
import functools

import msgspec

from aodm import topology
from aodm.errors import AodmError
from aodm.session_api import (
    Accept,
    Block,
    GetCurrentKey,
    GetKeyByGeneration,
    QueryMessage,
    RotateSessionKey,
    SendMessage,
    ShareKeys,
    Unblock,
)
from aodm.transport import Delivery
from services.session import consent, keys, members, messages, store
from services.session.activity import ActivityFeed
from services.session.app import App
from services.session.batches import Combiner
from services.session.devices import Devices, store_devices
from services.session.limits import SendLimits
from services.session.shards import BATCH_SIZE, ShardOwner, fence
from shared import db, runtime
from shared.actions import Action
from shared.config import Settings
from shared.logs import log
from shared.service import Processor

COMBINED_BATCH = 4 * BATCH_SIZE  # deliveries of all held shards run as one batch

ACTIONS = {
    "RotateSessionKey": Action(RotateSessionKey, keys.rotate_session_key, "send"),
    "ShareKeys": Action(ShareKeys, keys.share_keys, "send"),
    "GetCurrentKey": Action(GetCurrentKey, keys.get_current_key, "dryrun"),
    "GetKeyByGeneration": Action(GetKeyByGeneration, keys.get_key_by_generation, "dryrun"),
    "SendMessage": Action(SendMessage, messages.send_messages, "send", batched=True, own_record=True),
    "QueryMessage": Action(QueryMessage, messages.query_message, "dryrun"),
    "Accept": Action(Accept, consent.accept, "send"),
    "Block": Action(Block, consent.block, "send"),
    "Unblock": Action(Unblock, consent.unblock, "send"),
}


def actions(limits: SendLimits) -> dict[str, Action]:
    """ACTIONS with the send limits bound in."""
    send = functools.partial(messages.send_messages, limits=limits)
    return {**ACTIONS, "SendMessage": Action(SendMessage, send, "send", batched=True, own_record=True)}


async def start(rt: runtime.Runtime) -> None:
    directory = members.MemberDirectory(Devices())
    feed = ActivityFeed(rt.bus)
    limits = SendLimits.per_second(rt.settings.send_rate, rt.settings.send_session_rate,
                                   request_messages=rt.settings.request_messages)
    processor = Processor(
        name="session", schema=store.SCHEMA, pool=rt.pool, read_pool=rt.read_pool, bus=rt.bus, actions=actions(limits),
        authenticate=directory.authenticate,
        handler_timeout=rt.settings.handler_timeout_s, stopping=rt.stop, app=App(feed, directory), fence=fence,
    )

    async def run_batch(deliveries: list[Delivery]) -> "asyncio.Future | None":
        """Requests in runs (one transaction per run), Spawns between them, all in queue order;
        returns the runs' answering under way (see Processor.begin), which fails if any run's
        does. Only services publish to the sessions exchange directly; clients' requests
        reach the shards through aodm.requests (its alternate exchange)."""
        answering = []
        run: list[Delivery] = []
        for delivery in deliveries:
            if delivery.exchange != topology.SESSIONS:
                run.append(delivery)
                continue
            if run:
                answering.append(await processor.begin(run))
                run = []
            await spawn(delivery)
        if run:
            answering.append(await processor.begin(run))
        if len(answering) > 1:
            return asyncio.gather(*answering)
        return answering[0] if answering else None

    async def spawn(delivery: Delivery) -> None:
        # A Spawn counts only when the broker vouches (user_id, which it validates) that the
        # services' own user published it: not by the exchange name alone.
        if delivery.user_id != rt.bus.user:
            log.warning("spawn from another broker user dropped", user_id=delivery.user_id)
            return await delivery.ack()
        try:
            await db.retrying(lambda: members.spawn(rt.pool, delivery.body), what="spawn", pool=rt.pool)
        except msgspec.DecodeError as exc:
            log.warning("bad spawn dropped", error=str(exc))
        await delivery.ack()

    async def on_devices(delivery: Delivery) -> None:
        """A handle's devices changed (the registry's DevicesOf): stored, and every worker told."""
        if delivery.user_id != rt.bus.user:
            log.warning("devices event from another broker user dropped", user_id=delivery.user_id)
            return await delivery.ack()
        try:
            await db.retrying(lambda: store_devices(rt.pool, delivery.body), what="devices", pool=rt.pool)
        except (msgspec.DecodeError, AodmError) as exc:
            log.warning("bad devices event dropped", error=str(exc))
        await delivery.ack()

    runtime.requests_from_zero("session", processor.actions)
    rt.background(directory.devices.listen(rt.settings.database_url, rt.stop))
    await rt.consume(topology.SESSION_DEVICES_QUEUE, on_devices, concurrency=1)
    combiner = Combiner(run_batch, limit=COMBINED_BATCH)
    rt.background(combiner.serve())
    rt.background(feed.serve(rt.pool))
    rt.background(ShardOwner(rt, combiner.submit).run())


async def run(settings: Settings, stop: asyncio.Event) -> None:
    await runtime.serve("session", settings, stop, start, schema=store.SCHEMA, migrations=store.MIGRATIONS)


if __name__ == "__main__":
    runtime.main("session", run, __doc__)
