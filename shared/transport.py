"""The only module that speaks AMQP (aio-pika). Everything else sees a `Bus`.

Publishes go through a channel with publisher confirms and mandatory routing, so a publish
returns only once the broker has taken responsibility for the message, and an unroutable
one raises instead of being silently confirmed.
"""

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
import aiormq
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from aio_pika.exceptions import PublishError

# What a broker fault looks like to callers: retry or reconnect, never treat as poison.
BrokerError: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    aio_pika.exceptions.AMQPException,
    ConnectionError,
)


# The broker refused the user name or password at connect.
LoginRefused = aiormq.exceptions.ProbableAuthenticationError


class Unroutable(Exception):
    """The broker returned a mandatory publish: no queue is bound for it."""


class ExclusiveConsumerTaken(Exception):
    """Another consumer holds the queue exclusively."""


class QueueMissing(Exception):
    """The queue to consume does not exist."""


class AccessRefused(Exception):
    """The broker user may not do this (its permissions on the vhost do not match)."""


# RabbitMQ's direct reply-to: a pseudo-queue consumed (no-ack) on the channel that publishes
# the requests. It needs no configure or read permission, so every principal can do RPC.
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"


def url_user(url: str) -> str:
    """The broker user an AMQP URL logs in as (aio-pika's default is guest)."""
    return unquote(urlsplit(url).username or "") or "guest"


class Delivery:
    """One incoming message, with the few properties the services read."""

    __slots__ = ("_message",)

    def __init__(self, message: AbstractIncomingMessage) -> None:
        self._message = message

    @property
    def body(self) -> bytes:
        return self._message.body

    @property
    def reply_to(self) -> str | None:
        return self._message.reply_to

    @property
    def correlation_id(self) -> str | None:
        return self._message.correlation_id

    @property
    def redelivered(self) -> bool:
        return bool(self._message.redelivered)

    @property
    def exchange(self) -> str:
        return self._message.exchange or ""

    @property
    def user_id(self) -> str | None:
        """The publisher's broker user. Bus sets it on every publish and RabbitMQ refuses a
        user_id that is not the publishing connection's user, so it cannot be forged."""
        return self._message.user_id

    @property
    def routing_key(self) -> str:
        return self._message.routing_key or ""

    @property
    def headers(self) -> dict[str, Any]:
        return dict(self._message.headers or {})

    async def ack(self, *, multiple: bool = False) -> None:
        """`multiple` also acknowledges every earlier delivery of the channel still open."""
        await self._message.ack(multiple=multiple)

    async def reject(self, *, requeue: bool) -> None:
        await self._message.reject(requeue=requeue)


Handler = Callable[[Delivery], Awaitable[None]]


async def _reject_quietly(message: AbstractIncomingMessage) -> None:
    try:
        await message.reject(requeue=False)
    except BrokerError:
        pass


class Consumer:
    """A subscription on its own channel, worked by `concurrency` tasks."""

    def __init__(
        self, channel: aio_pika.abc.AbstractChannel, handler: Handler, concurrency: int, batch: int | None = None
    ) -> None:
        self._channel = channel
        self._handler = handler
        self._batch = batch
        self._inbox: asyncio.Queue[AbstractIncomingMessage | None] = asyncio.Queue()
        self._stopping = False
        self._queue: Any = None
        self._tag: str | None = None
        self._exclusive = False
        # An exclusive subscription the broker dropped (connection or channel lost) that is
        # not taken back here: its owner must take it again, or learn that another has it.
        self.lost = False
        self._tasks = [asyncio.create_task(self._work()) for _ in range(concurrency)]

    async def _work(self) -> None:
        while True:
            message = await self._inbox.get()
            if message is None or self._stopping:
                return
            deliveries = [Delivery(message)] if self._batch is None else self._take_batch(message)
            try:
                await self._handler(deliveries[0] if self._batch is None else deliveries)
            except BrokerError:
                pass  # the channel is gone; the broker redelivers what was not acked
            except Exception:  # last line of defence: a handler bug must not stop the consumer
                logging.getLogger("aodm.transport").exception("consumer handler failed; messages dead-lettered")
                for delivery in deliveries:
                    await _reject_quietly(delivery._message)

    def _take_batch(self, first: AbstractIncomingMessage) -> list[Delivery]:
        """The first message and whatever else has already arrived, up to the batch size:
        under load batches grow by themselves; when idle a message waits for nothing."""
        assert self._batch is not None
        batch = [Delivery(first)]
        while len(batch) < self._batch and not self._inbox.empty():
            message = self._inbox.get_nowait()
            if message is None:
                self._inbox.put_nowait(None)  # keep the stop signal for the loop
                break
            batch.append(Delivery(message))
        return batch

    async def _start(self, queue: Any, exclusive: bool) -> None:
        self._queue = queue
        self._exclusive = exclusive
        self._tag = await queue.consume(self._inbox.put, exclusive=exclusive)
        reopened = getattr(self._channel, "reopen_callbacks", None)
        if reopened is not None:
            reopened.add(self._on_reopen)

    async def _on_reopen(self, _channel: Any) -> None:
        """The channel was reopened after a broker restart or a lost connection. aio-pika
        restores only the consumers of queues it declared itself, so this one is gone: the
        broker has requeued everything it had delivered, so the prefetched messages still
        waiting here are void (acking them would fail). A shared queue is consumed again
        right away; an exclusive one is only marked `lost`, for its owner to take back the
        usual way, since another worker may hold it by now."""
        pending = []
        while not self._inbox.empty():
            pending.append(self._inbox.get_nowait())
        for _ in range(pending.count(None)):
            self._inbox.put_nowait(None)  # keep stop signals
        if self._stopping or self.lost:
            return
        if self._exclusive:
            self.lost = True
            return
        try:
            self._tag = await self._queue.consume(self._inbox.put, exclusive=False)
        except (*BrokerError, RuntimeError) as exc:
            logging.getLogger("aodm.transport").warning("could not consume %s again: %r", self._queue.name, exc)
            self.lost = True

    async def stop(self) -> None:
        """Graceful: take no more, finish the messages being handled, then close the
        channel, which hands every prefetched but unstarted message back to the queue."""
        self._stopping = True
        for _ in self._tasks:
            self._inbox.put_nowait(None)
        if self._tag and not self._channel.is_closed:
            try:
                await self._queue.cancel(self._tag)
            except BrokerError:
                pass
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.close()

    async def close(self) -> None:
        """Abrupt: unacknowledged messages go back to the queue."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if not self._channel.is_closed:
            try:
                await self._channel.close()
            except BrokerError:
                pass


class Bus:
    def __init__(
        self, connection: AbstractRobustConnection, channel: aio_pika.abc.AbstractChannel, *, url: str = ""
    ) -> None:
        self._connection = connection
        self._channel = channel
        self._exchanges: dict[str, aio_pika.abc.AbstractExchange] = {}
        self._pending: dict[str, asyncio.Future[bytes]] = {}
        self._reply_queue: str | None = None
        self._reply_lock = asyncio.Lock()
        self.url = url
        self.user = url_user(url)  # the broker user: the user_id of everything published

    @classmethod
    async def connect(cls, url: str, *, name: str) -> "Bus":
        connection = await aio_pika.connect_robust(url, client_properties={"connection_name": name})
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        return cls(connection, channel, url=url)

    async def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        await self._connection.close()

    @property
    def is_connected(self) -> bool:
        return not self._connection.is_closed and not self._channel.is_closed

    # -- topology ---------------------------------------------------------------------

    async def declare_exchange(self, name: str, kind: str, *, arguments: dict | None = None) -> None:
        self._exchanges[name] = await self._channel.declare_exchange(
            name, kind, durable=True, arguments=arguments
        )

    async def declare_queue(self, name: str, *, arguments: dict | None = None) -> None:
        await self._channel.declare_queue(name, durable=True, arguments=arguments)

    async def bind(self, queue: str, exchange: str, routing_key: str) -> None:
        q = await self._channel.get_queue(queue, ensure=False)
        await q.bind(exchange, routing_key=routing_key)

    async def _inspect(self, queue: str):
        # Straight to the AMQP channel: aio-pika's robust channel remembers the first
        # declare of a queue, and these counts must be fresh every time.
        underlay = await self._channel.get_underlay_channel()
        return await underlay.queue_declare(queue, passive=True)

    async def consumer_count(self, queue: str) -> int:
        return (await self._inspect(queue)).consumer_count

    async def message_count(self, queue: str) -> int:
        return (await self._inspect(queue)).message_count

    # -- publishing -------------------------------------------------------------------

    async def _exchange(self, name: str) -> aio_pika.abc.AbstractExchange:
        if name == "":
            return self._channel.default_exchange
        if name not in self._exchanges:
            self._exchanges[name] = await self._channel.get_exchange(name, ensure=False)
        return self._exchanges[name]

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        reply_to: str | None = None,
        correlation_id: str | None = None,
        message_id: str | None = None,
        content_type: str = "application/json",
        persistent: bool = True,
    ) -> None:
        """Publish and wait for the broker's confirm; raise `Unroutable` if it comes back.
        Every message carries `user_id` = this connection's broker user, which the broker
        validates: receivers use it to tell the services' own messages from anyone else's."""
        message = aio_pika.Message(
            body,
            content_type=content_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT if persistent else aio_pika.DeliveryMode.NOT_PERSISTENT,
            reply_to=reply_to,
            correlation_id=correlation_id,
            message_id=message_id,
            user_id=self.user,
        )
        target = await self._exchange(exchange)
        # A reply to direct reply-to is never routed through a queue, so RabbitMQ returns it
        # as NO_ROUTE under `mandatory` even when it was delivered (rabbitmq-server#6124);
        # without `mandatory` it is delivered, or dropped if the requester has gone.
        mandatory = not (exchange == "" and routing_key.startswith(DIRECT_REPLY_TO))
        try:
            await target.publish(message, routing_key=routing_key, mandatory=mandatory)
        except PublishError as exc:  # basic.return: no queue is bound for it
            raise Unroutable(f"{exchange or '(default)'}/{routing_key}") from exc
        # A basic.nack (DeliveryError, a BrokerError) means the broker did not take the
        # message, e.g. while it stops: the caller must treat it as a broker fault and
        # retry, never as "unroutable, drop it".

    # -- RPC (aio-pika's pattern: futures keyed by correlation_id) --------------------

    async def _ensure_reply_queue(self) -> str:
        """Direct reply-to on the publishing channel: no queue is declared, so a client needs
        no configure or read permission to get replies. The robust channel consumes it again
        after a reconnect (replies to the requests in flight then are lost: they time out)."""
        async with self._reply_lock:
            if self._reply_queue is None:
                queue = await self._channel.declare_queue(DIRECT_REPLY_TO, passive=True)
                await queue.consume(self._on_reply, no_ack=True)
                self._reply_queue = DIRECT_REPLY_TO
        return self._reply_queue

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._pending.pop(message.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(message.body)

    async def request(self, exchange: str, routing_key: str, body: bytes) -> "asyncio.Future[bytes]":
        """Publish now (returns once confirmed), reply later: callers pipeline requests in
        a known publish order and await the replies afterwards."""
        reply_to = await self._ensure_reply_queue()
        correlation_id = uuid.uuid4().hex
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = future
        future.add_done_callback(lambda _: self._pending.pop(correlation_id, None))
        try:
            await self.publish(exchange, routing_key, body, reply_to=reply_to, correlation_id=correlation_id)
        except BaseException:
            future.cancel()
            raise
        return future

    async def call(self, exchange: str, routing_key: str, body: bytes, *, timeout: float) -> bytes:
        future = await self.request(exchange, routing_key, body)
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            future.cancel()

    # -- consuming --------------------------------------------------------------------

    async def consume(
        self,
        queue: str,
        handler: Handler,
        *,
        prefetch: int,
        concurrency: int = 1,
        exclusive: bool = False,
        batch: int | None = None,
    ) -> Consumer:
        """Consume on a channel of its own. With concurrency 1 messages are handled strictly
        in queue order, which is what keeps a session shard's order. With `batch`, the
        handler gets a list of the deliveries that are waiting (group commit)."""
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        consumer = Consumer(channel, handler, concurrency, batch)
        try:
            await consumer._start(await channel.get_queue(queue, ensure=False), exclusive)
        except aiormq.exceptions.ChannelAccessRefused as exc:
            await consumer.close()
            # RabbitMQ says ACCESS_REFUSED both for a queue "in exclusive use" and for a user
            # whose read permission does not cover the queue. Nothing is declared here.
            if "exclusive use" in str(exc):
                raise ExclusiveConsumerTaken(queue) from exc
            raise AccessRefused(f"broker user {self.user!r} may not read {queue!r}") from exc
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            await consumer.close()
            raise QueueMissing(queue) from exc
        return consumer
