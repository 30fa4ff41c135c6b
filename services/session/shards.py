"""Which worker runs which shard, and how a shard changes owner without breaking its order.

Session ids are hashed onto a fixed set of shard queues. Each shard is consumed by exactly
one worker at a time through an *exclusive* consumer, in queue order, so a session's
requests are handled in the order they were published. Workers announce themselves by
consuming the presence queue; each takes its fair share (shards / live workers, rounded up)
and hands back any excess, so `--scale session=N` spreads the shards and a dead worker's
shards are taken over within one tick.

A hand-over keeps the order (docs/reliability.md, "When a shard changes owner"):
- the broker's side: an owner lets a shard go only by closing its consumer's channel
  (`Consumer.stop` keeps the subscription until what it started is acknowledged; a lost
  connection closes it by itself). The queue then requeues everything the owner held
  unacknowledged, in place, before the queue is free for the next owner;
- the database's side: each shard has a lease whose epoch the next owner raises once the
  broker has granted it the queue (`store.take_shard`), and every write of a shard's
  requests holds the lease shared and names the epoch its request came under (`fence`, and
  the SendMessage statement). The take waits for the old owner's writes under way; any
  later write of the old owner is refused, and its requests are left to the new owner.
"""

import asyncio
import math
import os
import random
import socket
from dataclasses import dataclass, field

import asyncpg

from aodm import topology
from aodm.transport import Consumer, Delivery, ExclusiveConsumerTaken, Handler
from services.session import store
from shared.db import DatabaseUnavailable
from shared.logs import log
from shared.runtime import Runtime

TICK_SECONDS = 1.0
BATCH_SIZE = 100  # requests of one shard committed together when they are waiting


async def _ignore(delivery: Delivery) -> None:  # the presence queue never holds messages
    await delivery.ack()


@dataclass(eq=False)
class Lease:
    """A held shard's epoch in session.shard_leases; its deliveries carry it (Delivery.lease)."""

    shard: int
    epoch: int = 0
    taken: asyncio.Event = field(default_factory=asyncio.Event)


async def fence(conn: asyncpg.Connection, leases: list[Lease]) -> set[Lease]:
    """The Processor's fence: hold these leases to the end of the transaction; which are lost."""
    lost = await store.lost_leases(conn, [(lease.shard, lease.epoch) for lease in leases])
    return {lease for lease in leases if (lease.shard, lease.epoch) in lost}


class ShardOwner:
    def __init__(self, rt: Runtime, handler: Handler) -> None:
        self._rt = rt
        self._handler = handler
        self._shards = rt.settings.session_shards
        self._name = f"{socket.gethostname()}:{os.getpid()}"
        self.held: dict[int, Consumer] = {}

    async def run(self) -> None:
        await self._rt.consume(topology.WORKERS_QUEUE, _ignore)
        while not self._rt.stop.is_set():
            try:
                await self._balance()
            except Exception as exc:  # a broker fault (or anything else) must not end the loop
                log.warning("shard balancing failed; retrying", error=repr(exc))
            try:
                await asyncio.wait_for(self._rt.stop.wait(), timeout=TICK_SECONDS)
            except TimeoutError:
                pass

    async def _balance(self) -> None:
        for shard in [s for s, consumer in self.held.items() if consumer.lost]:
            await self._drop(shard)
        workers = max(1, await self._rt.bus.consumer_count(topology.WORKERS_QUEUE))
        share = math.ceil(self._shards / workers)
        if len(self.held) > share:
            for shard in sorted(self.held)[share:]:
                await self._release(shard)
            return
        free = [s for s in range(self._shards) if s not in self.held]
        random.shuffle(free)  # replicas starting together do not all race for shard 0
        for shard in free:
            if len(self.held) >= share or self._rt.stop.is_set():
                break
            lease = Lease(shard)
            try:
                consumer = await self._rt.consume(
                    topology.shard_queue(shard), self._leased(lease), exclusive=True, batch=BATCH_SIZE
                )
            except ExclusiveConsumerTaken:
                continue
            self.held[shard] = consumer
            # Only now, with the broker's queue ours: any earlier owner's writes finish first.
            try:
                async with self._rt.pool.acquire() as conn:
                    lease.epoch = await store.take_shard(conn, shard, self._name)
            except DatabaseUnavailable as exc:
                await self._forget(shard)  # its deliveries never started: back to the queue
                log.warning("shard not taken: the database does not answer", shard=shard, error=repr(exc))
                continue
            lease.taken.set()
            log.info("shard taken", shard=shard, epoch=lease.epoch, held=sorted(self.held), workers=workers)

    def _leased(self, lease: Lease) -> Handler:
        """The shard's deliveries wait for its lease, then go on under it."""

        async def handle(deliveries: list[Delivery]) -> "asyncio.Future[None] | None":
            await lease.taken.wait()
            for delivery in deliveries:
                delivery.lease = lease
            return await self._handler(deliveries)

        return handle

    async def _forget(self, shard: int) -> None:
        """Abrupt: whatever its consumer holds unacknowledged goes back to the queue."""
        consumer = self.held.pop(shard)
        self._rt.consumers.remove(consumer)
        await consumer.close()

    async def _drop(self, shard: int) -> None:
        """The broker dropped our exclusive consumer (connection lost, broker restarted): its
        unacked messages are back in the queue; whoever takes the shard next runs them."""
        await self._forget(shard)
        log.warning("shard lost with the broker connection; taking shards again", shard=shard)

    async def _release(self, shard: int) -> None:
        consumer = self.held.pop(shard)
        self._rt.consumers.remove(consumer)
        await consumer.stop()
        log.info("shard released", shard=shard, held=sorted(self.held))
