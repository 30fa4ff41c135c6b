"""Group commit across shards: what every held shard has waiting, in one transaction.

Each shard is consumed in order, one batch at a time. At a steady load a shard's own batch
is small (the load is split over the shards), so committing per shard would pay a
transaction, a commit flush, a notifier event and an activity report for a handful of
messages. Instead the shard consumers hand their batches to one `Combiner` task and wait:
it runs everything handed in so far as one batch. A shard's next batch is only taken once
its previous one is done, so the order within a shard, and so within a session, holds.
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
        self._waiting: asyncio.Queue[tuple[list[Delivery], asyncio.Future[None]]] = asyncio.Queue()

    async def submit(self, deliveries: list[Delivery]) -> None:
        """A shard consumer's handler: returns once its batch is answered and acknowledged
        (or raises what running it raised)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.put_nowait((deliveries, done))
        await done

    async def serve(self) -> None:
        """Until cancelled, which the runtime does only after the consumers have drained.
        The next batch begins as soon as this one has committed: its publishes and acks
        follow this one's, while this one waits for the broker's confirms."""
        while True:
            taken = [await self._waiting.get()]
            size = len(taken[0][0])
            while size < self._limit and not self._waiting.empty():
                taken.append(self._waiting.get_nowait())
                size += len(taken[-1][0])
            try:
                answered = await self._run([delivery for deliveries, _ in taken for delivery in deliveries])
            except Exception as exc:  # not handled here: each shard's consumer gets it, as if it ran alone
                _settle(taken, exc)
                continue
            if answered is None:
                _settle(taken, None)
            else:
                answered.add_done_callback(lambda f, taken=taken: _settle(taken, _outcome(f)))


def _outcome(answered: "asyncio.Future[None]") -> BaseException | None:
    # Cancelled only as the loop goes down: unacknowledged, like a lost connection.
    return ConnectionError("answering was cancelled") if answered.cancelled() else answered.exception()


def _settle(taken: list[tuple[list[Delivery], "asyncio.Future[None]"]], error: BaseException | None) -> None:
    for _, done in taken:
        if done.done():  # its consumer was closed meanwhile
            continue
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)
