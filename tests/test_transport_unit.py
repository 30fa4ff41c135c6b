"""aodm/transport.py without a broker: importing it changes nothing in the libraries, the
fast path's start check sees a changed aiormq and falls back saying so, and what the fast
path reads and writes on the wire (a delivery's frames, a batch's frames) is right."""

import asyncio
import itertools
import json
import logging
import subprocess
import sys
import textwrap
from typing import Any

import aiormq
import pamqp.frame
import pytest
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from aodm import transport
from aodm.transport import Bus, Message, fast_path_available, fast_path_problems

# -- importing the client changes nothing outside it ------------------------------------------

SNAPSHOT = textwrap.dedent('''
    import asyncio, importlib, inspect, json, pkgutil, sys

    def snapshot():
        """Every module-level name of asyncio, aiormq, aio-pika and pamqp, and every attribute
        of every class they define, by identity: a replaced class, function or constant shows."""
        state = {}
        for top in ("asyncio", "aiormq", "aio_pika", "pamqp"):
            package = importlib.import_module(top)
            names = [top] + [info.name for info in pkgutil.walk_packages(package.__path__, top + ".")]
            for name in names:
                try:
                    module = importlib.import_module(name)
                except ImportError:  # platform-specific modules (asyncio.windows_events)
                    continue
                for key, value in vars(module).items():
                    state[f"{name}.{key}"] = id(value)
                    if inspect.isclass(value) and value.__module__ == name:
                        for attribute, member in vars(value).items():
                            state[f"{name}.{key}.{attribute}"] = id(member)
        return state

    before = snapshot()
    import aodm.transport, aodm.client, aodm.cli, aodm.checker, aodm.inbox  # noqa: E401, F401
    after = snapshot()
    changed = sorted(key for key in before if after.get(key) != before[key])
    import aiormq.connection
    print(json.dumps({"changed": changed, "Channel": aiormq.connection.Channel is aiormq.channel.Channel,
                      "FRAME_BUFFER_SIZE": aiormq.Connection.FRAME_BUFFER_SIZE}))
''')


def test_importing_the_client_changes_nothing_in_aiormq_aio_pika_pamqp_or_asyncio() -> None:
    """Before, `import aodm.client` replaced aiormq.connection.Channel and FrameReceiver and
    aiormq.Connection.FRAME_BUFFER_SIZE for the whole process."""
    result = subprocess.run([sys.executable, "-c", SNAPSHOT], capture_output=True, text=True, timeout=60, check=True)
    found = json.loads(result.stdout)
    assert found["changed"] == [], f"importing aodm changed: {found['changed'][:20]}"
    assert found["Channel"] is True
    assert found["FRAME_BUFFER_SIZE"] == 10  # aiormq's own


# -- the fast path's start check ----------------------------------------------------------------


@pytest.fixture
def fresh_verdict():
    """fast_path_available is decided once per process: decide it again in this test, and
    forget this test's verdict afterwards."""
    fast_path_available.cache_clear()
    yield
    fast_path_available.cache_clear()


def test_the_locked_aiormq_has_everything_the_fast_path_relies_on() -> None:
    assert fast_path_problems() == []


def test_another_aiormq_series_takes_the_plain_path() -> None:
    problems = fast_path_problems(aiormq_version="7.3.0")
    assert len(problems) == 1 and "aiormq 7.3.0" in problems[0]
    assert fast_path_problems(aiormq_version="7.2.9") == []


class _Changed(aiormq.Channel):
    """aiormq's channel, as a later release might have it (each test changes one thing)."""


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"_on_deliver_frame": lambda: _deliver_with_extra}, "Channel._on_deliver_frame(self, frame) is missing or changed"),
        ({"_on_deliver_frame": lambda: _not_a_coroutine}, "Channel._on_deliver_frame(self, frame) is missing or changed"),
        ({"_reader": lambda: _reader_calling_something_else}, "Channel._reader does not call _on_deliver_frame"),
        ({"_get_frame": lambda: _get_frame_with_timeout}, "Channel._get_frame(self) is missing or changed"),
        ({"lock": lambda: asyncio.Lock()}, "Channel.lock is not a property"),
        ({"__init__": lambda: _init_without_confirmations}, "Channel.__init__ sets no confirmations"),
        ({"_on_return_frame": lambda: _return_by_tag}, "Channel._on_return_frame does not look returns up"),
    ],
    ids=["deliver-signature", "deliver-not-async", "reader", "get-frame", "lock", "init", "returns"],
)
def test_the_check_names_what_a_changed_aiormq_lacks(change: dict, expected: str) -> None:
    changed = type("Changed", (_Changed,), {name: make() for name, make in change.items()})
    problems = fast_path_problems(changed, aiormq_version="7.2.4")
    assert any(problem.startswith(expected) for problem in problems), problems


async def _deliver_with_extra(self: Any, frame: Any, header: Any) -> None: ...


def _not_a_coroutine(self: Any, frame: Any) -> None: ...


async def _reader_calling_something_else(self: Any) -> None:
    await self._on_message_frame(await self._get_frame())


async def _get_frame_with_timeout(self: Any, timeout: float) -> Any: ...


def _init_without_confirmations(self: Any, connector: Any, number: int) -> None:
    self.delivery_tag = 0
    self.pending = {}
    self.message_id_delivery_tag = {}
    self.write_queue = connector.write_queue
    self.max_content_size = 0


async def _return_by_tag(self: Any, frame: Any) -> None:
    self.returns[frame.delivery_tag] = frame


def test_a_missing_fast_path_is_said_once_and_the_plain_path_taken(fresh_verdict, monkeypatch, caplog) -> None:
    monkeypatch.setattr(transport, "fast_path_problems", lambda: ["Channel._reader does not call _on_deliver_frame"])
    with caplog.at_level(logging.WARNING, logger="aodm.transport"):
        assert fast_path_available() is False
        assert fast_path_available() is False
    lines = [record.getMessage() for record in caplog.records if record.name == "aodm.transport"]
    assert lines == ["fast AMQP path unavailable, using the plain path: Channel._reader does not call _on_deliver_frame"]


def test_the_fast_path_is_taken_silently_when_all_is_there(fresh_verdict, caplog) -> None:
    with caplog.at_level(logging.DEBUG, logger="aodm.transport"):
        assert fast_path_available() is True
    assert not [record for record in caplog.records if record.name == "aodm.transport"]


# -- direct deliveries: the frames of one delivery, as the channel's reader hands them over -----


class FakeChannel:
    """What _DirectDeliveries uses of an aiormq channel: its frames, in order."""

    def __init__(self, frames: list[Any]) -> None:
        self.frames = list(frames)
        self.consumers: dict[str, Any] = {}  # aiormq's own, of consumers subscribed without aodm
        self.tasks: list[asyncio.Task[Any]] = []

    def create_task(self, coroutine: Any) -> "asyncio.Task[Any]":
        self.tasks.append(asyncio.ensure_future(coroutine))
        return self.tasks[-1]

    async def _get_frame(self) -> Any:
        return self.frames.pop(0)

    async def _on_deliver_frame(self, frame: Any) -> None:  # aiormq's, replaced
        raise AssertionError("aiormq's own delivery path was taken")


def deliver(tag: str = "ctag", delivery_tag: int = 1) -> spec.Basic.Deliver:
    return spec.Basic.Deliver(consumer_tag=tag, delivery_tag=delivery_tag, exchange="", routing_key="q")


def header(size: int, **properties: Any) -> ContentHeader:
    return ContentHeader(body_size=size, properties=spec.Basic.Properties(**properties))


async def delivered(frames: list[Any], tag: str = "ctag") -> tuple[list[Any], FakeChannel]:
    """Run one basic.deliver through a channel with a direct consumer `tag`."""
    channel = FakeChannel(frames)
    got: list[Any] = []
    transport._DirectDeliveries.on(channel).callbacks[tag] = got.append  # type: ignore[arg-type]
    await channel._on_deliver_frame(deliver())
    return got, channel


async def test_a_delivery_in_one_body_frame() -> None:
    got, channel = await delivered([header(5, correlation_id="c1"), ContentBody(b"hello")])
    [message] = got
    assert message.body == b"hello"
    assert message.header.properties.correlation_id == "c1"
    assert message.delivery.delivery_tag == 1
    assert message.channel is channel
    assert channel.frames == []


async def test_a_delivery_across_body_frames_of_odd_sizes() -> None:
    body = bytes(range(256)) * 5
    cuts = [0, 1, 2, 99, 700, 1279, len(body)]
    pieces = [ContentBody(body[a:b]) for a, b in itertools.pairwise(cuts)]
    got, _ = await delivered([header(len(body)), *pieces])
    assert got[0].body == body


async def test_an_empty_delivery_reads_no_body_frame() -> None:
    following = ContentBody(b"not this delivery's")
    got, channel = await delivered([header(0), following])
    assert got[0].body == b""
    assert channel.frames == [following]  # left for what comes next


async def test_deliveries_back_to_back_on_one_channel_each_take_their_own_frames() -> None:
    channel = FakeChannel([header(2), ContentBody(b"ab"), header(3), ContentBody(b"c"), ContentBody(b"de")])
    got: list[Any] = []
    transport._DirectDeliveries.on(channel).callbacks["ctag"] = got.append  # type: ignore[arg-type]
    assert transport._DirectDeliveries.on(channel).callbacks == {"ctag": got.append}  # installed once
    await channel._on_deliver_frame(deliver(delivery_tag=1))
    await channel._on_deliver_frame(deliver(delivery_tag=2))
    assert [(m.delivery.delivery_tag, m.body) for m in got] == [(1, b"ab"), (2, b"cde")]


async def test_body_frames_beyond_the_header_size_fail_the_channel() -> None:
    with pytest.raises(ValueError, match="a delivery of 6 bytes where its header says 4"):
        await delivered([header(4), ContentBody(b"abc"), ContentBody(b"def")])


@pytest.mark.parametrize(
    "frames",
    [[ContentBody(b"no header"), ContentBody(b"x")], [header(3), spec.Basic.Ack(delivery_tag=1)]],
    ids=["body-instead-of-header", "method-instead-of-body"],
)
async def test_a_frame_out_of_place_fails_the_channel(frames: list[Any]) -> None:
    with pytest.raises(ValueError, match="Unexpected frame"):
        await delivered(frames)


async def test_a_delivery_for_a_consumer_gone_is_dropped() -> None:
    got, channel = await delivered([header(1), ContentBody(b"x")], tag="another")
    assert got == [] and channel.frames == []


async def test_a_delivery_for_a_consumer_subscribed_past_aodm_goes_to_aiormq_s_consumer_in_a_task() -> None:
    channel = FakeChannel([header(1), ContentBody(b"x")])
    transport._DirectDeliveries.on(channel)
    got: list[bytes] = []

    async def consumer(message: Any) -> None:
        got.append(message.body)

    channel.consumers["ctag"] = consumer
    await channel._on_deliver_frame(deliver())
    await asyncio.gather(*channel.tasks)
    assert got == [b"x"]


async def test_a_failing_callback_is_logged_and_the_channel_goes_on(caplog) -> None:
    channel = FakeChannel([header(1), ContentBody(b"x"), header(1), ContentBody(b"y")])
    got: list[bytes] = []

    def callback(message: Any) -> None:
        if message.body == b"x":
            raise RuntimeError("a bug in the consumer")
        got.append(message.body)

    transport._DirectDeliveries.on(channel).callbacks["ctag"] = callback
    with caplog.at_level(logging.ERROR, logger="aodm.transport"):
        await channel._on_deliver_frame(deliver())
        await channel._on_deliver_frame(deliver())
    assert got == [b"y"]
    assert [r.getMessage() for r in caplog.records if r.name == "aodm.transport"] == ["consumer callback failed"]


# -- a batch's frames, as the broker reads them -------------------------------------------------


class _Sizes:
    max_content_size = 1000


def unmarshal_all(data: bytes) -> list[Any]:
    frames = []
    while data:
        size = int.from_bytes(data[3:7], "big") + 8
        consumed, _channel, frame = pamqp.frame.unmarshal(data[:size])
        assert consumed == size
        frames.append(frame)
        data = data[size:]
    return frames


@pytest.mark.parametrize("size", [0, 1, 999, 1000, 1001, 2500])
def test_a_batch_of_publishes_is_method_header_and_bodies_split_at_the_frame_size(size: int) -> None:
    bus = Bus.__new__(Bus)
    bus.user = "svc"
    body = bytes(i % 251 for i in range(size))
    messages = [Message("ex", "rk", body, message_id="m1"), Message("", "amq.rabbitmq.reply-to.x", b"r", vouched=False)]
    frames = [frame for message in messages for frame in bus._frames(_Sizes(), message)]  # type: ignore[arg-type]
    data = aiormq.abc.ChannelFrame.marshall(channel_number=3, frames=frames).payload
    publish, head, *rest = unmarshal_all(data)
    bodies, (reply_publish, reply_head, reply_body) = rest[:-3], rest[-3:]
    assert (publish.exchange, publish.routing_key, publish.mandatory) == ("ex", "rk", True)
    assert head.body_size == size and head.properties.user_id == "svc" and head.properties.message_id == "m1"
    assert head.properties.delivery_mode == 2
    assert [len(b.value) for b in bodies] == [min(1000, size - start) for start in range(0, size, 1000)]
    assert b"".join(b.value for b in bodies) == body
    # a reply to direct reply-to goes unvouched and not mandatory (rabbitmq-server#6124)
    assert reply_publish.mandatory is False and reply_head.properties.user_id is None and reply_body.value == b"r"
