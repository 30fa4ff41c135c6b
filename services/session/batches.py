"""Group commit across shards: what every held shard has waiting, in one transaction.

Each shard is consumed in order, one batch at a time. At a steady load a shard's own batch
is small (the load is split over the shards), so committing per shard would pay a
transaction, a commit flush and a notifier event for a handful of messages. Instead the
shard consumers hand their batches to one `Combiner` task, which runs everything handed in
so far as one batch. A shard hands in its next batch once its previous one has committed,
so the order within a shard, and so within a session, holds; the publishing and the acks
of a committed batch go on meanwhile, in batch order (see Processor.begin).
"""

import asyncio
from collections.abc import Awaitable, Callable

from shared.transport import Delivery

# Runs a batch up to its commit; returns what is still under way (publishing, acks), if anything.
Run = Callable[[list[Delivery]], Awaitable["asyncio.Future[None] | None"]]


class Combiner:
    def __init__(self, run: Run, limit: int) -> None:
        self._run = run
        self._limit = limit  # deliveries per combined batch
        self._waiting: asyncio.Queue[tuple[list[Delivery], asyncio.Future]] = asyncio.Queue()

    async def submit(self, deliveries: list[Delivery]) -> "asyncio.Future[None] | None":
        """A shard consumer's handler: returns once its batch has committed (or raises what
        running it raised), with the batch's answering under way."""
        committed: asyncio.Future = asyncio.get_running_loop().create_future()
        self._waiting.put_nowait((deliveries, committed))
        return await committed

    async def serve(self) -> None:
        """Until cancelled, which the runtime does only after the consumers have drained."""
        while True:
            taken = [await self._waiting.get()]
            size = len(taken[0][0])
            while size < self._limit and not self._waiting.empty():
                taken.append(self._waiting.get_nowait())
                size += len(taken[-1][0])
            try:
                answering = await self._run([delivery for deliveries, _ in taken for delivery in deliveries])
            except Exception as exc:  # not handled here: each shard's consumer gets it, as if it ran alone
                _settle(taken, exc=exc)
            else:
                _settle(taken, answering=answering)


def _settle(taken: list[tuple[list[Delivery], asyncio.Future]], *, answering=None, exc=None) -> None:
    for _, committed in taken:
        if committed.done():  # its consumer was closed meanwhile
            continue
        if exc is None:
            committed.set_result(answering)
        else:
            committed.set_exception(exc)
