"""The transport against the real broker, on a vhost of its own: what a broker fault in
the middle of handling does to the messages in hand."""

import asyncio
import secrets

import pytest

from aodm.transport import BrokerError, Bus, Consumer, Delivery, ExclusiveConsumerTaken, ack_in_order
from tests.isolation import drop_vhost, new_vhost


@pytest.fixture
async def bus():
    vhost, url = new_vhost("aodm-test-transport")
    bus = await Bus.connect(url, name="aodm-test-transport")
    try:
        yield bus
    finally:
        await bus.close()
        drop_vhost(vhost)


async def fail_a_publish(bus: Bus) -> None:
    """A real channel error: the broker closes the publishing channel (404) for this."""
    with pytest.raises(BrokerError):
        await bus.publish(f"aodm-test-missing-{secrets.token_hex(3)}", "x", b"lost")


async def consume_until(bus, queue: str, handle, finished: asyncio.Event, **options) -> None:
    """Consume the queue until the test says it has seen enough (20 s at most)."""
    consumer = await bus.consume(queue, handle, **options)
    try:
        await asyncio.wait_for(finished.wait(), timeout=20)
    finally:
        await consumer.stop()


async def test_a_publish_right_after_a_channel_error_waits_for_the_channel(bus):
    queue = f"aodm-test-{secrets.token_hex(3)}"
    await bus.declare_queue(queue)
    await fail_a_publish(bus)
    # The robust channel is reopening now; a publish waits for it instead of failing.
    await bus.publish("", queue, b"after the error")
    assert await bus.message_count(queue) == 1


async def test_a_batch_its_handler_could_not_answer_is_handed_back_in_order(bus):
    """The handler's first batch meets a broker fault (as when its confirms are lost) and
    raises it. Those deliveries must come back, before everything behind them, and a later
    batch's `multiple` ack must not have counted them as done."""
    queue = f"aodm-test-{secrets.token_hex(3)}"
    await bus.declare_queue(queue)
    bodies = [f"m{i:02d}".encode() for i in range(30)]
    for body in bodies:
        await bus.publish("", queue, body)
    done: list[bytes] = []
    failed: list[bytes] = []
    redelivered: set[bytes] = set()
    finished = asyncio.Event()

    async def handle(batch: list[Delivery]) -> None:
        redelivered.update(d.body for d in batch if d.redelivered)
        if not failed:
            failed.extend(d.body for d in batch)
            await bus.publish("aodm-test-missing-exchange", "x", b"raises a broker fault")
        await ack_in_order(batch)
        done.extend(d.body for d in batch)
        if len(done) >= len(bodies):
            finished.set()

    await consume_until(bus, queue, handle, finished, prefetch=20, batch=5)
    assert failed and set(failed) <= redelivered, "the failed batch did not come back"
    assert done == bodies, "each message handled once, in queue order"
    assert await bus.message_count(queue) == 0


async def test_a_single_delivery_its_handler_could_not_answer_is_not_left_unacknowledged(bus):
    """With single deliveries and several handler tasks (the registry's consumer), a broker
    fault must not leave the delivery stuck unacknowledged on a live channel."""
    queue = f"aodm-test-{secrets.token_hex(3)}"
    await bus.declare_queue(queue)
    for i in range(10):
        await bus.publish("", queue, f"s{i}".encode())
    done: set[bytes] = set()
    attempts: dict[bytes, int] = {}
    finished = asyncio.Event()

    async def handle(delivery: Delivery) -> None:
        attempts[delivery.body] = attempts.get(delivery.body, 0) + 1
        if delivery.body == b"s3" and attempts[delivery.body] == 1:
            await bus.publish("aodm-test-missing-exchange", "x", b"raises a broker fault")
        await delivery.ack()
        done.add(delivery.body)
        if len(done) == 10:
            finished.set()

    await consume_until(bus, queue, handle, finished, prefetch=10, concurrency=4)
    assert attempts[b"s3"] >= 2
    assert await bus.message_count(queue) == 0


async def test_an_exclusive_consumer_that_stops_hands_its_queue_over_in_queue_order(bus):
    """A shard hand-over. The owner stops while answers to what it handled are still under
    way (as the session worker's are) and its prefetch holds messages it never started; a
    rival polls for the queue meanwhile. Whatever the rival gets, it must get after every
    message the owner received was handled or handed back: each message once, in queue
    order, across the two consumers."""
    queue = f"aodm-test-{secrets.token_hex(3)}"
    await bus.declare_queue(queue)
    bodies = [f"m{i:03d}".encode() for i in range(400)]
    for body in bodies:
        await bus.publish("", queue, body, persistent=False)
    handled: list[bytes] = []
    owner_started = asyncio.Event()
    finished = asyncio.Event()
    waiting: asyncio.Queue = asyncio.Queue()

    async def work_in_order() -> None:
        """Like the session worker's Combiner: the consumer hands batches in and goes on;
        they are handled here one at a time, and acknowledged once handled."""
        while True:
            batch, done = await waiting.get()
            await asyncio.sleep(0.01)  # a transaction
            handled.extend(d.body for d in batch)
            if len(handled) >= 40:
                owner_started.set()
            if len(set(handled)) >= len(bodies):
                finished.set()
            await ack_in_order(batch)
            done.set_result(None)

    async def owner(batch: list[Delivery]) -> "asyncio.Future[None]":
        done = asyncio.get_running_loop().create_future()
        waiting.put_nowait((batch, done))
        return done

    async def rival(batch: list[Delivery]) -> None:
        handled.extend(d.body for d in batch)
        await ack_in_order(batch)
        if len(set(handled)) >= len(bodies):
            finished.set()

    worker = asyncio.create_task(work_in_order())
    first = await bus.consume(queue, owner, prefetch=100, exclusive=True, batch=10)
    await asyncio.wait_for(owner_started.wait(), timeout=10)

    async def take_over() -> Consumer:
        while True:
            try:
                return await bus.consume(queue, rival, prefetch=100, exclusive=True, batch=10)
            except ExclusiveConsumerTaken:
                await asyncio.sleep(0.005)

    taking = asyncio.create_task(take_over())
    await asyncio.sleep(0.05)  # the rival is polling before the owner lets go
    await first.stop()
    second = await asyncio.wait_for(taking, timeout=10)
    try:
        await asyncio.wait_for(finished.wait(), timeout=20)
    finally:
        worker.cancel()
        await second.stop()
    assert handled == bodies, "a message the new owner took overtook one the old owner had received"
