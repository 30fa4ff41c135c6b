"""Group commit across shards: what every held shard has waiting, in one transaction.

Each shard is consumed in order. At a steady load a shard's own batch is small (the load
is split over the shards), so committing per shard would pay a transaction and a commit
flush for a handful of messages. Instead the shard consumers hand their deliveries to one
`Combiner` and go on consuming; the Combiner runs everything handed in so far as one batch,
one batch at a time, in the order handed in, so the order within a shard (and so within a
session) holds. A committed batch's publishing and acks go on while the next one runs, in
batch order (see Processor.begin).
"""

import asyncio
from collections.abc import Awaitable, Callable

from aodm.transport import Delivery, dead_letter

# Runs a batch up to its commit; returns what is still under way (publishing, acks), if anything.
Run = Callable[[list[Delivery]], Awaitable["asyncio.Future | None"]]


class Combiner:
    def __init__(self, run: Run, limit: int) -> None:
        self._run = run
        self._limit = limit  # deliveries per combined batch
        self._waiting: asyncio.Queue[tuple[list[Delivery], asyncio.Future]] = asyncio.Queue()

    async def submit(self, deliveries: list[Delivery]) -> "asyncio.Future[None]":
        """A shard consumer's handler: hands the deliveries in and returns at once; what it
        returns ends once they are answered and acknowledged."""
        answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.put_nowait((deliveries, answered))
        return answered

    async def serve(self) -> None:
        """Until cancelled, which the runtime does only after the consumers have drained."""
        while True:
            taken = [await self._waiting.get()]
            size = len(taken[0][0])
            while size < self._limit and not self._waiting.empty():
                taken.append(self._waiting.get_nowait())
                size += len(taken[-1][0])
            deliveries = [delivery for handed, _ in taken for delivery in handed]
            try:
                answering = await self._run(deliveries)
            except Exception as exc:  # a bug: settled here, before a later batch's ack could cover them
                await dead_letter(deliveries, exc)
                answering = None
            for _, answered in taken:
                _follow(answering, answered)
            # One turn of the loop before the next batch: this one's publishing starts now,
            # not after the next one has been parsed, verified and sent to the database.
            await asyncio.sleep(0)


def _follow(answering: "asyncio.Future | None", answered: asyncio.Future) -> None:
    if answering is None:
        answered.set_result(None)
        return

    def done(f: asyncio.Future) -> None:
        if answered.done():
            return
        if f.cancelled():
            answered.cancel()
        elif f.exception() is not None:
            answered.set_exception(f.exception())
        else:
            answered.set_result(None)

    answering.add_done_callback(done)
