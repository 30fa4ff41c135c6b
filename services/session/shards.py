"""Which worker runs which shard.

Session ids are hashed onto a fixed set of shard queues. Each shard is consumed by exactly
one worker at a time through an *exclusive* consumer, one batch at a time, so a session's
requests are handled in queue order. Workers announce themselves by consuming the presence
queue; each takes its fair share (shards / live workers, rounded up) and hands back any
excess, so `--scale session=N` spreads the shards and a dead worker's shards are taken over
within one tick. Handover is safe for order and exactly-once: a released shard's unacked
messages are redelivered, and the request-id claim in Postgres makes any message the old
owner still commits wait for, or be recognised by, the new owner.
"""

import asyncio
import math
import random

from shared import topology
from shared.logs import log
from shared.runtime import Runtime
from shared.transport import Consumer, Delivery, ExclusiveConsumerTaken, Handler

TICK_SECONDS = 1.0
BATCH_SIZE = 100  # requests of one shard committed together when they are waiting


async def _ignore(delivery: Delivery) -> None:  # the presence queue never holds messages
    await delivery.ack()


class ShardOwner:
    def __init__(self, rt: Runtime, handler: Handler) -> None:
        self._rt = rt
        self._handler = handler
        self._shards = rt.settings.session_shards
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
            try:
                consumer = await self._rt.consume(
                    topology.shard_queue(shard), self._handler, exclusive=True, batch=BATCH_SIZE
                )
            except ExclusiveConsumerTaken:
                continue
            self.held[shard] = consumer
            log.info("shard taken", shard=shard, held=sorted(self.held), workers=workers)

    async def _drop(self, shard: int) -> None:
        """The broker dropped our exclusive consumer (connection lost, broker restarted): its
        unacked messages are back in the queue; whoever takes the shard next runs them."""
        consumer = self.held.pop(shard)
        self._rt.consumers.remove(consumer)
        await consumer.close()
        log.warning("shard lost with the broker connection; taking shards again", shard=shard)

    async def _release(self, shard: int) -> None:
        consumer = self.held.pop(shard)
        self._rt.consumers.remove(consumer)
        await consumer.stop()
        log.info("shard released", shard=shard, held=sorted(self.held))
