"""The transport against the real broker, on a vhost of its own: what a broker fault in
the middle of handling does to the messages in hand, on the plain path and the fast one;
a fast Bus on another aiormq; connects that fail. (Without a broker: test_transport_unit.py.)"""

import asyncio
import json
import logging
import secrets
import subprocess
import sys
import textwrap
from pathlib import Path

import aiormq
import pytest

from aodm import transport
from aodm.transport import BrokerError, Bus, Consumer, Delivery, ExclusiveConsumerTaken, Message, ack_in_order
from tests.isolation import AMQP_BASE, drop_vhost, new_vhost

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=[False, True], ids=["plain", "fast"])
async def bus(request):
    """Each test on both paths: the plain one (clients) and the fast one (the services)."""
    vhost, url = new_vhost("aodm-test-transport")
    bus = await Bus.connect(url, name="aodm-test-transport", fast=request.param)
    assert bus.fast == request.param
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


# -- the fast path and the plain one ------------------------------------------------------------


async def round_trip(bus: Bus) -> None:
    """A publish, a consumed delivery and a request answered through direct reply-to."""
    queue = f"aodm-test-{secrets.token_hex(3)}"
    await bus.declare_queue(queue)
    got: asyncio.Queue = asyncio.Queue()

    async def answer(delivery: Delivery) -> None:
        got.put_nowait(delivery.body)
        if delivery.reply_to:
            await bus.publish_all([Message("", delivery.reply_to, delivery.body.upper(),
                                           correlation_id=delivery.correlation_id, vouched=False)])
        await delivery.ack()

    consumer = await bus.consume(queue, answer, prefetch=10)
    try:
        await bus.publish("", queue, b"plain publish")
        assert await asyncio.wait_for(got.get(), 10) == b"plain publish"
        assert await bus.call("", queue, b"ping", timeout=10) == b"PING"
        assert await bus.publish_all([Message("", f"{queue}-nowhere", b"x")]), "unroutable, returned"
    finally:
        await consumer.stop()


async def test_a_fast_bus_changes_only_its_own_channels():
    vhost, url = new_vhost("aodm-test-transport")
    fast, plain = await Bus.connect(url, name="aodm-test-fast", fast=True), await Bus.connect(url, name="aodm-test-plain")
    try:
        assert fast.fast and not plain.fast
        await round_trip(fast)
        await round_trip(plain)
        fast_channel = await fast._channel.get_underlay_channel()  # consumes the replies
        plain_channel = await plain._channel.get_underlay_channel()
        assert "_on_deliver_frame" in vars(fast_channel)
        assert "_on_deliver_frame" not in vars(plain_channel)
        assert aiormq.Channel._on_deliver_frame is ORIGINAL_ON_DELIVER_FRAME
    finally:
        await fast.close()
        await plain.close()
        drop_vhost(vhost)


ORIGINAL_ON_DELIVER_FRAME = aiormq.Channel._on_deliver_frame


async def test_a_bus_asking_for_the_fast_path_on_another_aiormq_says_so_and_runs_the_plain_one(monkeypatch, caplog):
    """As if aiormq had been upgraded past what the fast path was checked against: the
    services' Bus runs the plain path, and the log says why, once."""
    monkeypatch.setattr(transport, "FAST_PATH_AIORMQ", "6.9")
    transport.fast_path_available.cache_clear()
    vhost, url = new_vhost("aodm-test-transport")
    buses = []
    try:
        with caplog.at_level(logging.WARNING, logger="aodm.transport"):
            buses = [await Bus.connect(url, name=f"aodm-test-fallback-{i}", fast=True) for i in range(2)]
        assert not any(bus.fast for bus in buses)
        said = [r.getMessage() for r in caplog.records if r.name == "aodm.transport"]
        assert len(said) == 1 and said[0].startswith("fast AMQP path unavailable, using the plain path: aiormq ")
        await round_trip(buses[0])
        assert "_on_deliver_frame" not in vars(await buses[0]._channel.get_underlay_channel())
    finally:
        for bus in buses:
            await bus.close()
        drop_vhost(vhost)
        transport.fast_path_available.cache_clear()


# -- a connect that fails or is cancelled leaves nothing behind ----------------------------------

LEFT_BEHIND = textwrap.dedent('''
    import asyncio, json, sys
    from aodm.transport import Bus, LoginRefused

    async def main():
        url = sys.argv[1]
        outcomes = []
        # a broker that accepts the connection and never answers: the connect is cancelled
        server = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
        silent = f"amqp://guest:guest@127.0.0.1:{server.sockets[0].getsockname()[1]}/"
        try:
            await asyncio.wait_for(Bus.connect(silent, name="aodm-test-silent"), 0.5)
        except TimeoutError:
            outcomes.append("timed out")
        # a broker that refuses the login
        try:
            await Bus.connect(url.replace("guest:guest@", "aodm-test-nobody:wrong@"), name="aodm-test-refused")
        except LoginRefused:
            outcomes.append("refused")
        # nothing listening
        try:
            await Bus.connect("amqp://guest:guest@127.0.0.1:1/", name="aodm-test-nothing")
        except ConnectionError:
            outcomes.append("no broker")
        server.close()
        await asyncio.sleep(0.1)
        left = [repr(task.get_coro()) for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        print(json.dumps({"outcomes": outcomes, "left": left}))

    asyncio.run(main())  # waits for every task still running at the end, as the CLI's run did
''')


def test_a_connect_that_fails_or_is_cancelled_leaves_no_connection_running():
    """A cancelled Bus.connect left an aio-pika robust connection whose reconnect task
    took every cancel as "try again in 5 s": asyncio.run never returned."""
    result = subprocess.run([sys.executable, "-c", LEFT_BEHIND, AMQP_BASE], capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    found = json.loads(result.stdout)
    assert found == {"outcomes": ["timed out", "refused", "no broker"], "left": []}
