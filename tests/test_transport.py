"""The transport against the real broker, on a vhost of its own: what a broker fault in
the middle of handling does to the messages in hand."""

import asyncio
import secrets

import pytest

from shared.transport import BrokerError, Bus, Delivery, ack_in_order
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
