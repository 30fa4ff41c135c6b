"""The only module that speaks AMQP (aio-pika, aiormq). Everything else sees a `Bus`.

Publishes go through a channel with publisher confirms and mandatory routing, so a publish
returns only once the broker has taken responsibility for the message, and an unroutable
one raises instead of being silently confirmed.

aio-pika keeps the connection and channels robust (reconnect, re-declare, restore QoS);
messages themselves go straight through its underlying aiormq channels (aio-pika's
`get_underlay_channel`): aio-pika's `Message`/`IncomingMessage` wrappers cost more CPU than
the rest of a publish or a delivery.

Two paths, chosen per `Bus.connect`:
- the plain path (the default, what clients get): aiormq's and aio-pika's public API only;
- the fast path (`fast=True`, what the services ask for): a batch of publishes written as
  one frame run under the channel's lock, and deliveries handed straight to the consumer's
  callback instead of a task each. It leans on aiormq internals, so it is checked against
  the installed aiormq when first asked for (`fast_path_problems`), and a process whose
  aiormq lacks what it needs logs one line and takes the plain path. It only touches the
  channels a fast `Bus` opened: importing this module changes nothing in aiormq, aio-pika
  or asyncio. docs/performance.md has what each path costs.
"""

import asyncio
import functools
import inspect
import itertools
import logging
import random
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustConnection
from aio_pika.connection import make_url
from aio_pika.exceptions import MessageProcessError
from aiormq.abc import AbstractChannel as AMQPChannel
from aiormq.abc import ChannelFrame, DeliveredMessage
from aiormq.exceptions import PublishError
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

log = logging.getLogger("aodm.transport")

# What a broker fault looks like to callers: retry or reconnect, never treat as poison.
BrokerError: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    aio_pika.exceptions.AMQPException,
    ConnectionError,
)


# The broker refused the user name or password at connect.
LoginRefused = aiormq.exceptions.ProbableAuthenticationError


@dataclass(slots=True)
class Message:
    """One message to publish (see Bus.publish_all)."""

    exchange: str
    routing_key: str
    body: bytes
    reply_to: str | None = None
    correlation_id: str | None = None
    message_id: str | None = None
    content_type: str = "application/json"
    persistent: bool = True
    # Stamped with the publisher's broker user (user_id, which the broker checks), the mark
    # internal consumers trust. A reply goes without it: whatever queue it reached, it could
    # not pass for the services' own message.
    vouched: bool = True


class Unroutable(Exception):
    """The broker returned a mandatory publish: no queue is bound for it."""


class ExclusiveConsumerTaken(Exception):
    """Another consumer holds the queue exclusively."""


class QueueMissing(Exception):
    """The queue to consume does not exist."""


class AccessRefused(Exception):
    """The broker user may not do this (its permissions on the vhost do not match)."""


# -- the fast path: what it relies on ----------------------------------------------------

# The aiormq release series the fast path was written and measured against. Any other
# series takes the plain path until someone has read its channel code again: the names
# below can keep their spelling and change their meaning.
FAST_PATH_AIORMQ = "7.2"


def _code_names(function: Any) -> set[str]:
    """The global and attribute names a function's code refers to."""
    code = getattr(function, "__code__", None)
    return set(code.co_names) if code is not None else set()


def _parameters(function: Any) -> list[str] | None:
    try:
        return list(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return None


def fast_path_problems(channel_class: type = aiormq.Channel, aiormq_version: str | None = None) -> list[str]:
    """What the fast path needs from aiormq's channel and this aiormq lacks; empty when
    it has it all. Read from the class, without a broker:

    - batched publishes put one frame run on the channel's `write_queue` under its `lock`,
      numbering them from its `delivery_tag` and registering each confirm where aiormq's
      own `basic_publish` does (`confirmations`, `message_id_delivery_tag`), so that
      aiormq's confirm, return and close handling settle them;
    - direct deliveries replace the channel's `_on_deliver_frame` (per channel, on the
      channels a fast Bus consumes on), which the channel's `_reader` awaits with the
      basic.deliver frame, and read the content frames with `_get_frame`; a delivery for a
      consumer not subscribed through them goes to aiormq's `consumers` as aiormq sends it."""
    version = aiormq_version if aiormq_version is not None else metadata.version("aiormq")
    problems = []
    if version.split(".")[:2] != FAST_PATH_AIORMQ.split("."):
        problems.append(f"aiormq {version} is not the {FAST_PATH_AIORMQ} series the fast path was checked against")
    if not isinstance(inspect.getattr_static(channel_class, "lock", None), property):
        problems.append("Channel.lock is not a property")
    set_up = _code_names(inspect.getattr_static(channel_class, "__init__", None))
    for name in ("delivery_tag", "confirmations", "message_id_delivery_tag", "write_queue", "max_content_size",
                 "consumers"):
        if name not in set_up:
            problems.append(f"Channel.__init__ sets no {name}")
    if not {"confirmations"} <= _code_names(getattr(channel_class, "_confirm_delivery", None)):
        problems.append("Channel._confirm_delivery does not settle `confirmations`")
    if not {"confirmations", "message_id_delivery_tag"} <= _code_names(getattr(channel_class, "_on_return_frame", None)):
        problems.append("Channel._on_return_frame does not look returns up in `message_id_delivery_tag`")
    if not callable(getattr(channel_class, "create_future", None)):
        problems.append("Channel.create_future is missing")
    hook = getattr(channel_class, "_on_deliver_frame", None)
    if not inspect.iscoroutinefunction(hook) or _parameters(hook) != ["self", "frame"]:
        problems.append("Channel._on_deliver_frame(self, frame) is missing or changed")
    if "_on_deliver_frame" not in _code_names(getattr(channel_class, "_reader", None)):
        problems.append("Channel._reader does not call _on_deliver_frame")
    get_frame = getattr(channel_class, "_get_frame", None)
    if not inspect.iscoroutinefunction(get_frame) or _parameters(get_frame) != ["self"]:
        problems.append("Channel._get_frame(self) is missing or changed")
    return problems


@functools.cache
def fast_path_available() -> bool:
    """Whether this process's aiormq has what the fast path relies on: checked once, and
    when it has not, said once (a warning naming what is missing)."""
    problems = fast_path_problems()
    if problems:
        log.warning("fast AMQP path unavailable, using the plain path: %s", "; ".join(problems))
    return not problems


# -- the fast path: direct deliveries ----------------------------------------------------


class _DirectDeliveries:
    """A fast Bus's consumers on one aiormq channel: each delivery goes straight to its
    consumer's callback (a plain function that only queues it), where aiormq's channel
    runs every callback as a task of its own (a task and its bookkeeping per delivery:
    about 20 µs of client CPU per message here, docs/performance.md).

    Installed as this channel's `_on_deliver_frame`, the step of aiormq's channel reader
    for a basic.deliver; the content header and body frames follow it on the channel."""

    def __init__(self, amqp: AMQPChannel) -> None:
        self._amqp = amqp
        self.callbacks: dict[str, Callable[[DeliveredMessage], None]] = {}
        amqp._on_deliver_frame = self._on_deliver_frame  # type: ignore[attr-defined]

    @classmethod
    def on(cls, amqp: AMQPChannel) -> "_DirectDeliveries":
        """The channel's, installed now if it has none yet."""
        installed = getattr(vars(amqp).get("_on_deliver_frame"), "__self__", None)
        return installed if isinstance(installed, cls) else cls(amqp)

    async def _on_deliver_frame(self, frame: aiormq.spec.Basic.Deliver) -> None:
        amqp: Any = self._amqp
        header = await amqp._get_frame()
        if not isinstance(header, ContentHeader):
            raise ValueError(f"Unexpected frame {header!r} instead of ContentHeader", header)
        parts, size = [], 0
        while size < header.body_size:
            content = await amqp._get_frame()
            if not isinstance(content, ContentBody):
                raise ValueError(f"Unexpected frame {content!r}", content)
            parts.append(content.value)
            size += len(content.value)
        if size != header.body_size:  # the broker broke the frame sizes: the channel closes on this
            raise ValueError(f"a delivery of {size} bytes where its header says {header.body_size}")
        message = DeliveredMessage(delivery=frame, header=header, body=b"".join(parts), channel=amqp)
        callback = self.callbacks.get(frame.consumer_tag or "")
        if callback is not None:
            try:
                callback(message)
            except Exception:  # as aiormq does for a failed callback task: the channel goes on
                log.exception("consumer callback failed")
            return
        consumer = amqp.consumers.get(frame.consumer_tag)  # not subscribed here: run as aiormq runs it
        if consumer is not None:
            amqp.create_task(consumer(message)).add_done_callback(_log_failure)


def _log_failure(task: "asyncio.Future[Any]") -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("consumer callback failed", exc_info=task.exception())


async def subscribe(
    amqp: AMQPChannel,
    queue: str,
    callback: Callable[[DeliveredMessage], None],
    *,
    fast: bool,
    no_ack: bool = False,
    exclusive: bool = False,
    consumer_tag: str | None = None,
) -> None:
    """basic.consume on an aiormq channel, `callback` being a plain function that only
    queues what it gets. `fast` (the fast path, checked by the caller): it is called
    straight from the channel's reader; otherwise aiormq calls it in a task per delivery."""
    tag = consumer_tag or f"aodm.{uuid.uuid4().hex}"
    if fast:
        _DirectDeliveries.on(amqp).callbacks[tag] = callback

    async def deliver(message: DeliveredMessage) -> None:  # aiormq's path: a task each
        callback(message)

    await amqp.basic_consume(queue, deliver, no_ack=no_ack, exclusive=exclusive, consumer_tag=tag)


# How long a publish waits for its channel to come back after a reconnect: longer than
# aio-pika's reconnect interval (5 s), short enough that a publisher learns of an outage.
PUBLISHER_RESTORE_TIMEOUT = 15.0
# After a broker fault stopped an answer, the pause before its deliveries are handed back.
HAND_BACK_PAUSE = 0.5

# RabbitMQ's direct reply-to: a pseudo-queue consumed (no-ack) on the channel that publishes
# the requests. It needs no configure or read permission, so every principal can do RPC.
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"


def _mandatory(message: Message) -> bool:
    """Every publish is mandatory, but a reply to direct reply-to: it is never routed
    through a queue, so RabbitMQ returns it as NO_ROUTE under `mandatory` even when it was
    delivered (rabbitmq-server#6124); without, it is delivered, or dropped if the requester
    has gone."""
    return not (message.exchange == "" and message.routing_key.startswith(DIRECT_REPLY_TO))


def url_user(url: str) -> str:
    """The broker user an AMQP URL logs in as (aio-pika's default is guest)."""
    return unquote(urlsplit(url).username or "") or "guest"


class Delivery:
    """One incoming message, with the few properties the services read. It remembers the
    AMQP channel it came on: its delivery tag means nothing on any other channel."""

    __slots__ = ("_message", "_settled", "lease")

    def __init__(self, message: DeliveredMessage) -> None:
        self._message = message
        self._settled = False
        # What the consumer's owner holds the queue under, if anything (a session shard's
        # lease, which the writes for this delivery must still hold: see shards.py).
        self.lease: Any = None

    @property
    def _delivery(self) -> aiormq.spec.Basic.Deliver:
        return cast(aiormq.spec.Basic.Deliver, self._message.delivery)  # consumed: a basic.deliver

    @property
    def body(self) -> bytes:
        return self._message.body

    @property
    def reply_to(self) -> str | None:
        return self._message.header.properties.reply_to

    @property
    def correlation_id(self) -> str | None:
        return self._message.header.properties.correlation_id

    @property
    def redelivered(self) -> bool:
        return bool(self._delivery.redelivered)

    @property
    def exchange(self) -> str:
        return self._delivery.exchange or ""

    @property
    def user_id(self) -> str | None:
        """The publisher's broker user. Bus sets it on every publish and RabbitMQ refuses a
        user_id that is not the publishing connection's user, so it cannot be forged."""
        return self._message.header.properties.user_id

    @property
    def routing_key(self) -> str:
        return self._delivery.routing_key or ""

    @property
    def headers(self) -> dict[str, Any]:
        return dict(self._message.header.properties.headers or {})

    @property
    def settled(self) -> bool:
        """Acknowledged or rejected (here: on this delivery's channel)."""
        return self._settled

    def _unsettled(self) -> tuple[AMQPChannel, int]:
        if self._settled:
            raise MessageProcessError("delivery already acknowledged or rejected", self)
        return self._message.channel, self._delivery.delivery_tag or 0

    async def ack(self, *, multiple: bool = False) -> None:
        """`multiple` also acknowledges every earlier delivery of the channel still open.
        On a channel closed since (a reconnect), this raises: the broker redelivers it.
        The ack is queued, not awaited onto the socket: frames leave in order, so a later
        channel close (Consumer.stop/close) still carries it to the broker first."""
        channel, tag = self._unsettled()
        await channel.basic_ack(tag, multiple=multiple, wait=False)
        self._settled = True

    async def reject(self, *, requeue: bool) -> None:
        channel, tag = self._unsettled()
        await channel.basic_reject(tag, requeue=requeue, wait=False)
        self._settled = True


# A handler may return what is still under way for its deliveries (publishes awaiting their
# confirms, then the acks), so the consumer can take its next message meanwhile.
# It gets a Delivery, or with `batch` a list of them.
Handler = Callable[[Any], Awaitable["asyncio.Future[None] | None"]]
SETTLE_TIMEOUT = 30.0  # at a graceful stop, how long the answers under way may take


async def ack_in_order(deliveries: list[Delivery]) -> None:
    """Acknowledge deliveries that each channel handed out in this order, with nothing
    earlier on it left open (a consumer working one batch at a time): one ack per channel,
    `multiple` when it covers several."""
    last: dict[int, tuple[Delivery, int]] = {}
    for delivery in deliveries:
        key = id(delivery._message.channel)
        last[key] = (delivery, last.get(key, (None, 0))[1] + 1)
    for delivery, count in last.values():
        await delivery.ack(multiple=count > 1)


async def hand_back(deliveries: list[Delivery], error: BaseException) -> None:
    """Deliveries that cannot be settled (a broker fault kept their answer from being
    confirmed) go back to their queue, with all their channel holds behind them, in order:
    their channel is closed. Left open on a live channel they would be stuck there, and a
    later `multiple` ack would count them as done. The robust channel then reopens as after
    a channel error, and its consumer consumes again (`Consumer._on_reopen`). A channel the
    broker has closed already handed them back."""
    channels = {id(d._message.channel): d._message.channel for d in deliveries}
    open_channels = [channel for channel in channels.values() if not channel.is_closed]
    if not open_channels:
        return
    log.warning(
        "handing %d deliveries back to their queues: %r", len(deliveries), error
    )
    await asyncio.sleep(HAND_BACK_PAUSE)  # a fault that persists must not spin the messages
    for channel in open_channels:
        try:
            await channel.close()
        except BrokerError:
            pass  # the connection went with it: the broker has them back either way


async def settle_when_confirmed(
    deliveries: list[Delivery], publishing: list[Awaitable[None]], after: "asyncio.Future[None] | None"
) -> None:
    """Acknowledge a batch once the broker has confirmed what answering it published, and
    once the batch before it (`after`) is settled: a `multiple` ack must not cover
    deliveries whose answers are not confirmed yet. Deliveries settled already (rejected
    into the dead letters) are left out. On a broker fault they are handed back, and on a
    bug dead-lettered, before any later batch settles."""
    try:
        if len(publishing) == 1:
            await publishing[0]  # a coroutine runs in this task: no gather, no task of its own
        else:
            await asyncio.gather(*publishing)
        if after is not None:
            await asyncio.wait([after])  # it settles its own batch, whatever its outcome
        await ack_in_order([d for d in deliveries if not d.settled])
    except BrokerError as exc:
        await hand_back(deliveries, exc)
        raise
    except Exception as exc:  # the consumers' last line of defence, for what they left under way
        await dead_letter(deliveries, exc)
        raise


def _retrieve(future: "asyncio.Future[None]") -> None:
    if not future.cancelled():
        future.exception()  # handled where it happened (settle_when_confirmed)


async def dead_letter(deliveries: list[Delivery], error: BaseException) -> None:
    """The last line of defence: deliveries whose handler failed with a bug go to the dead
    letters instead of stopping their consumer (or coming back forever)."""
    log.error("consumer handler failed; messages dead-lettered", exc_info=error)
    for delivery in deliveries:
        try:
            await delivery.reject(requeue=False)
        except BrokerError:
            pass


_REOPEN_ERRORS: tuple[type[BaseException], ...] = (*BrokerError, RuntimeError)


class Consumer:
    """A subscription on its own channel, worked by `concurrency` tasks."""

    def __init__(
        self, channel: aio_pika.abc.AbstractRobustChannel, handler: Handler, concurrency: int,
        batch: int | None = None, tag: str | None = None, *, fast: bool = False,
    ) -> None:
        self._channel = channel
        self._tag = tag  # the consumer tag (None: one is made up)
        self._fast = fast  # deliveries straight to _on_message (the fast path, checked by the Bus)
        self._handler = handler
        self._batch = batch
        self._inbox: asyncio.Queue[DeliveredMessage | None] = asyncio.Queue()
        self._stopping = False
        self._queue = ""
        self._amqp: AMQPChannel | None = None  # the AMQP channel consumed on, under _channel
        self._exclusive = False
        # An exclusive subscription the broker dropped (connection or channel lost) that is
        # not taken back here: its owner must take it again, or learn that another has it.
        self.lost = False
        self._settling: set[asyncio.Future[None]] = set()  # what handlers returned, still under way
        self._tasks = [asyncio.create_task(self._work()) for _ in range(concurrency)]

    async def _work(self) -> None:
        while True:
            message = await self._inbox.get()
            if message is None or self._stopping:
                return
            if message.channel is not self._amqp or message.channel.is_closed:
                continue  # void: its channel was closed, and the broker has the message back
            deliveries = [Delivery(message)] if self._batch is None else self._take_batch(message)
            try:
                under_way = await self._handler(deliveries[0] if self._batch is None else deliveries)
                if under_way is not None:
                    self._settling.add(under_way)
                    under_way.add_done_callback(self._settling.discard)
                    under_way.add_done_callback(_retrieve)
            except BrokerError as exc:
                await hand_back(deliveries, exc)
            except Exception as exc:  # a handler bug must not stop the consumer
                await dead_letter(deliveries, exc)

    def _take_batch(self, first: DeliveredMessage) -> list[Delivery]:
        """The first message and whatever else has already arrived, up to the batch size:
        under load batches grow by themselves; when idle a message waits for nothing."""
        assert self._batch is not None
        batch = [Delivery(first)]
        while len(batch) < self._batch and not self._inbox.empty():
            message = self._inbox.get_nowait()
            if message is None:
                self._inbox.put_nowait(None)  # keep the stop signal for the loop
                break
            if message.channel is self._amqp and not message.channel.is_closed:
                batch.append(Delivery(message))
        return batch

    def _on_message(self, message: DeliveredMessage) -> None:
        # One from a channel since replaced is void (the broker requeued it), and must not
        # slip in after _on_reopen emptied the inbox.
        if message.channel is self._amqp:
            self._inbox.put_nowait(message)

    async def _consume(self, exclusive: bool) -> None:
        # Set before consuming: deliveries can arrive before basic.consume-ok is handed back.
        self._amqp = amqp = await self._channel.get_underlay_channel()
        await subscribe(amqp, self._queue, self._on_message, fast=self._fast, exclusive=exclusive,
                        consumer_tag=self._tag)

    async def _start(self, queue: str, exclusive: bool) -> None:
        self._queue = queue
        self._exclusive = exclusive
        await self._consume(exclusive)
        # The consumer is the AMQP channel's, which aio-pika's robust channel does not know
        # of: it is consumed again from here when the robust channel reopens.
        self._channel.reopen_callbacks.add(self._on_reopen)

    async def _on_reopen(self, _channel: Any) -> None:
        """The channel was reopened after a broker restart or a lost connection. Its
        consumer is gone with the old AMQP channel: the broker has requeued everything it
        had delivered, so the prefetched messages still waiting here are void (acking them
        would fail). A shared queue is consumed again right away; an exclusive one is only
        marked `lost`, for its owner to take back the usual way, since another worker may
        hold it by now."""
        self._amqp = None  # anything still arriving from the old AMQP channel is void too
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
            await self._consume(exclusive=False)
        except _REOPEN_ERRORS as exc:
            log.warning("could not consume %s again: %r", self._queue, exc)
            self.lost = True

    async def stop(self) -> None:
        """Graceful: start nothing more, finish what is in hand and its answers under way,
        then close the channel. The subscription stays until that close, which makes the
        broker requeue everything it delivered here unacknowledged (in queue order) and free
        the queue in one step: whoever consumes next, an exclusive consumer above all, gets
        those messages before any behind them. A basic.cancel first would free the queue
        while they were still out here, and a shard's next owner would handle later ones
        first."""
        self._stopping = True
        for _ in self._tasks:
            self._inbox.put_nowait(None)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._settling:
            await asyncio.wait(self._settling, timeout=SETTLE_TIMEOUT)
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


async def _open(url: str, name: str) -> AbstractRobustConnection:
    """aio-pika's robust connection, as aio_pika.connect_robust makes it, but closed when
    its connect fails or is cancelled: its reconnect task would go on trying alone, and
    keep the event loop from ever finishing."""
    connection = aio_pika.RobustConnection(make_url(url), client_properties={"connection_name": name})
    try:
        await connection.connect()
    except BaseException:
        await _close_after_failure(connection)
        raise
    return connection


async def _close_after_failure(connection: AbstractRobustConnection) -> None:
    """Close a connection whose setup failed, the failure being re-raised by the caller. A
    second cancel stops the wait, not the close."""
    closing = asyncio.ensure_future(connection.close())
    closing.add_done_callback(_retrieve)
    try:
        await asyncio.wait([closing])
    except asyncio.CancelledError:
        pass


class Bus:
    def __init__(
        self, connection: AbstractRobustConnection, channel: aio_pika.abc.AbstractRobustChannel, *, url: str = "",
        name: str = "aodm", fast: bool = False,
    ) -> None:
        self._connection = connection  # publishing, and the replies to its requests
        self._channel = channel
        # Consumers get a connection of their own, opened on first use: RabbitMQ throttles a
        # connection that publishes faster than its queues take (flow control), and on a
        # shared one that would hold back the consumers' deliveries and acks too.
        self._consuming: AbstractRobustConnection | None = None
        self._consuming_lock = asyncio.Lock()
        self._name = name
        self._consumers_started = itertools.count(1)  # numbers the consumer tags
        self._amqp: AMQPChannel | None = None  # the AMQP channel under _channel, see _publisher
        self._pending: dict[str, asyncio.Future[bytes]] = {}
        self._reply_channel: AMQPChannel | None = None  # the AMQP channel consuming the replies
        self._reply_lock = asyncio.Lock()
        self.url = url
        self.user = url_user(url)  # the broker user: the user_id of everything published
        self.fast = fast  # the fast path (module docstring), checked

    @classmethod
    async def connect(cls, url: str, *, name: str, fast: bool = False) -> "Bus":
        """Connect, as the broker's connection `name`. `fast` asks for the fast path (the
        services do): taken if this process's aiormq has what it relies on, otherwise the
        plain path, and the log says why once (`fast_path_available`)."""
        fast = fast and fast_path_available()
        connection = await _open(url, name)
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        except BaseException:
            await _close_after_failure(connection)
            raise
        return cls(connection, channel, url=url, name=name, fast=fast)

    async def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        if self._consuming is not None:
            await self._consuming.close()
        await self._connection.close()

    @property
    def is_connected(self) -> bool:
        consuming = self._consuming is None or not self._consuming.is_closed
        return consuming and not self._connection.is_closed and not self._channel.is_closed

    async def _consumer_connection(self) -> AbstractRobustConnection:
        async with self._consuming_lock:
            if self._consuming is None:
                self._consuming = await _open(self.url, f"{self._name} (consumers)")
        return self._consuming

    # -- topology ---------------------------------------------------------------------

    async def declare_exchange(
        self, name: str, kind: str, *, arguments: dict[str, Any] | None = None, replacing: bool = False
    ) -> None:
        """`replacing`: an exchange of this name but of another type (an older version's) is
        deleted first, with its bindings, which the caller declares again."""
        if replacing:
            await self._delete_if_other_kind(name, kind, arguments)
        await self._channel.declare_exchange(name, kind, durable=True, arguments=arguments)

    async def _delete_if_other_kind(self, name: str, kind: str, arguments: dict[str, Any] | None) -> None:
        # On throwaway channels: a declare that does not match closes its channel.
        connection = (await self._channel.get_underlay_channel()).connection
        probe = await connection.channel()
        try:
            await probe.exchange_declare(name, exchange_type=kind, durable=True, arguments=arguments)
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            log.warning("replacing exchange %s: %s", name, exc)
            probe = await connection.channel()
            await probe.exchange_delete(name)
        except aiormq.exceptions.ConnectionCommandInvalid as exc:  # "unknown exchange type"
            raise RuntimeError(f"the broker refused exchange {name!r} of type {kind!r} ({exc}): "
                               f"enable the plugin that provides it (docs/operations.md)") from exc
        finally:
            if not probe.is_closed:
                await probe.close()

    async def declare_queue(self, name: str, *, arguments: dict[str, Any] | None = None) -> None:
        await self._channel.declare_queue(name, durable=True, arguments=arguments)

    async def bind(self, queue: str, exchange: str, routing_key: str) -> None:
        q = await self._channel.get_queue(queue, ensure=False)
        await q.bind(exchange, routing_key=routing_key)

    async def declare_bound_queue(self, queue: str, exchange: str, routing_key: str) -> None:
        """A durable queue and its binding, idempotent, not remembered: the robust channel
        declares again at every reconnect what it declared robustly, which for one queue per
        handle would grow without end. Callers declare it whenever they need it."""
        declared = await self._channel.declare_queue(queue, durable=True, robust=False)
        await declared.bind(exchange, routing_key=routing_key, robust=False)

    async def delete_queue(self, queue: str) -> None:
        """Gone with whatever it held; a queue already gone is no error."""
        underlay = await self._channel.get_underlay_channel()
        await underlay.queue_delete(queue)

    async def _inspect(self, queue: str) -> aiormq.spec.Queue.DeclareOk:
        # Straight to the AMQP channel: aio-pika's robust channel remembers the first
        # declare of a queue, and these counts must be fresh every time.
        underlay = await self._channel.get_underlay_channel()
        return await underlay.queue_declare(queue, passive=True)

    async def consumer_count(self, queue: str) -> int:
        return (await self._inspect(queue)).consumer_count or 0

    async def message_count(self, queue: str) -> int:
        return (await self._inspect(queue)).message_count or 0

    # -- publishing -------------------------------------------------------------------

    async def _publisher(self) -> AMQPChannel:
        """The AMQP channel under the robust one, cached: the robust channel swaps in a new
        one when it reopens. A reconnect restores a connection's channels one at a time, so
        a consumer's may deliver again before this one is back: a publish waits for it (a
        while) rather than fail the message being answered."""
        amqp = self._amqp
        if amqp is None or amqp.is_closed:
            try:
                async with asyncio.timeout(PUBLISHER_RESTORE_TIMEOUT):
                    # Waits out a reconnect; the channel's own reopen follows it.
                    while (amqp := await self._channel.get_underlay_channel()).is_closed:
                        await asyncio.sleep(0.01)
            except TimeoutError:
                raise aiormq.exceptions.ChannelInvalidStateError(f"{self._channel!r} closed") from None
            self._amqp = amqp
        return amqp

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
        """Publish and wait for the broker's confirm; raise `Unroutable` if it comes back."""
        message = Message(exchange, routing_key, body, reply_to, correlation_id, message_id, content_type, persistent)
        if await self.publish_all([message]):
            raise Unroutable(f"{exchange or '(default)'}/{routing_key}")

    async def publish_all(self, messages: list["Message"]) -> list["Message"]:
        """Publish the messages in this order and wait for every confirm. Returns the ones
        the broker returned as unroutable (all are `mandatory`: no queue was bound for
        them). A basic.nack or a lost channel raises (a BrokerError): the broker did not
        take a message, e.g. while it stops, and the caller must treat that as a broker
        fault, never as "unroutable, drop it".

        Every message carries `user_id` = this connection's broker user, which the broker
        validates: receivers use it to tell the services' own messages from anyone else's."""
        if not messages:
            return []
        amqp = await self._publisher()
        outcomes = await (self._publish_batch if self.fast else self._publish_each)(amqp, messages)
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(outcome, PublishError):
                raise outcome
        return [message for message, outcome in zip(messages, outcomes, strict=True) if isinstance(outcome, PublishError)]

    async def _publish_each(self, amqp: AMQPChannel, messages: list["Message"]) -> list[Any]:
        """The plain path: aiormq's basic_publish for each message. Each takes the channel's
        lock in turn, in the order they were started here."""

        async def publish(message: Message) -> Any:
            return await amqp.basic_publish(
                message.body, exchange=message.exchange, routing_key=message.routing_key,
                properties=self._properties(message), mandatory=_mandatory(message),
            )

        return await asyncio.gather(*(publish(message) for message in messages), return_exceptions=True)

    async def _publish_batch(self, amqp: AMQPChannel, messages: list["Message"]) -> list[Any]:
        """The fast path: the messages' frames go onto the AMQP channel in one run, under
        its lock, numbered and awaited as aiormq's own basic_publish does for one message.
        One frame run and one confirm wait for the batch cost the client about a quarter of
        the CPU per message of a basic_publish each (docs/performance.md)."""
        channel: Any = amqp  # aiormq's Channel: the attributes fast_path_problems checked
        confirmations = []
        async with channel.lock:  # delivery tags are the broker's count of this channel's publishes
            if amqp.is_closed:
                raise aiormq.exceptions.ChannelInvalidStateError(f"{amqp!r} closed")
            first_tag = channel.delivery_tag + 1
            frames: list[Any] = []
            for message in messages:
                channel.delivery_tag += 1
                confirmations.append(self._expect_confirm(amqp, channel.delivery_tag, message))
                frames += self._frames(amqp, message)
            try:
                await channel.write_queue.put(ChannelFrame.marshall(channel_number=amqp.number, frames=frames))
            except BaseException:
                # Not queued, so the broker never sees them: the tags are free again.
                channel.delivery_tag = first_tag - 1
                for tag, confirmation in enumerate(confirmations, start=first_tag):
                    channel.confirmations.pop(tag, None)
                    confirmation.cancel()
                raise
        return await asyncio.gather(*confirmations, return_exceptions=True)

    def _properties(self, message: "Message") -> aiormq.spec.Basic.Properties:
        return aiormq.spec.Basic.Properties(
            content_type=message.content_type,
            delivery_mode=2 if message.persistent else 1,
            reply_to=message.reply_to,
            correlation_id=message.correlation_id,
            message_id=message.message_id,
            user_id=self.user if message.vouched else None,
        )

    def _frames(self, amqp: AMQPChannel, message: "Message") -> list[Any]:
        body, size = message.body, amqp.max_content_size  # type: ignore[attr-defined]
        return [
            aiormq.spec.Basic.Publish(exchange=message.exchange, routing_key=message.routing_key,
                                      mandatory=_mandatory(message)),
            ContentHeader(properties=self._properties(message), body_size=len(body)),
            *(ContentBody(body[start:start + size]) for start in range(0, len(body), size)),
        ]

    @staticmethod
    def _expect_confirm(amqp: AMQPChannel, tag: int, message: "Message") -> "asyncio.Future[Any]":
        """The future aiormq settles when the broker acks, nacks or returns publish `tag`;
        a return is matched to its publish by message_id, so every publish has one."""
        channel: Any = amqp
        if message.message_id is None:
            message.message_id = f"{random.getrandbits(128):032x}"  # as aiormq does: no syscall, unlike uuid4
        confirmation: asyncio.Future[Any] = channel.create_future()
        channel.confirmations[tag] = confirmation
        channel.message_id_delivery_tag[message.message_id] = tag

        def forget(_: "asyncio.Future[Any]", message_id: str = message.message_id) -> None:
            if channel.message_id_delivery_tag.get(message_id) == tag:
                del channel.message_id_delivery_tag[message_id]

        confirmation.add_done_callback(forget)
        return confirmation

    # -- RPC (aio-pika's pattern: futures keyed by correlation_id) --------------------

    async def _ensure_reply_queue(self) -> str:
        """Direct reply-to on the publishing channel: no queue is declared, so a client needs
        no configure or read permission to get replies. It is consumed on the AMQP channel
        the requests go out on, again whenever the robust channel has swapped that channel
        (replies to the requests in flight at a reconnect are lost: they time out)."""
        if self._reply_channel is not await self._publisher():
            async with self._reply_lock:
                amqp = await self._publisher()
                if self._reply_channel is not amqp:
                    await subscribe(amqp, DIRECT_REPLY_TO, self._on_reply, fast=self.fast, no_ack=True)
                    self._reply_channel = amqp
        return DIRECT_REPLY_TO

    def _on_reply(self, message: DeliveredMessage) -> None:
        future = self._pending.pop(message.header.properties.correlation_id or "", None)
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
            async with asyncio.timeout(timeout):
                return await future
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
        channel = await (await self._consumer_connection()).channel()
        await channel.set_qos(prefetch_count=prefetch)
        # Tagged with the connection's name, which says which process consumes (the
        # services': service, host and pid), as the management UI lists a queue's consumers.
        consumer = Consumer(channel, handler, concurrency, batch, tag=f"{self._name} #{next(self._consumers_started)}",
                            fast=self.fast)
        try:
            await consumer._start(queue, exclusive)
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
