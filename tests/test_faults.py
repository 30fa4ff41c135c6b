"""Nothing lost, nothing doubled: the checker (aodm.checker) drives load through the real
stack, its services running as real processes, while a fault is injected; every test must
see lost = duplicated = unexpected = order violations = missing notifications = 0.

Set AODM_FAULT_REPORT_DIR to keep each run's report as JSON (docs/reliability.md quotes them).
"""

import asyncio
import json
import logging
import os
import secrets
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from aodm import crypto, envelope, topology
from aodm.checker import run_check
from aodm.checker_report import Report
from aodm.client import Client
from aodm.envelope import Tag
from aodm.errors import InternalError
from aodm.session_api import SendMessage
from aodm.transport import Bus
from shared import config
from tests.conftest import drop_database, drop_vhost, new_database, new_vhost, wait_ready
from tests.helpers import open_pair
from tests.private_services import POSTGRES_TOOLS, RABBIT_TOOLS, missing, private_postgres, private_rabbit
from tests.processes import ServiceProcess

pytestmark = pytest.mark.slow

# The checker's clients reconnect on purpose here; aio-pika reports every attempt.
for _noisy in ("aio_pika", "aiormq"):
    logging.getLogger(_noisy).setLevel(logging.CRITICAL)

# A modest load: 3 sessions, both members sending, rate-limited so faults land mid-stream.
LOAD = dict(sessions=3, senders_per_session=2, messages=60, rate=30.0, duration=40.0, settle=30.0, resend_after=3.0)


@asynccontextmanager
async def isolated(amqp_url: str | None = None, database_url: str | None = None, **overrides):
    """Settings on a vhost and a database of their own, unless given a private broker or db."""
    vhost = db_name = None
    if amqp_url is None:
        vhost, amqp_url = new_vhost()
    if database_url is None:
        db_name, database_url = await new_database()
    try:
        yield replace(config.load({}), amqp_url=amqp_url, database_url=database_url, **overrides)
    finally:
        if vhost:
            drop_vhost(vhost)
        if db_name:
            await drop_database(db_name)


class Stack:
    """The services as processes; every process started is killed at the end."""

    def __init__(self, settings, log_dir: Path) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.procs: list[ServiceProcess] = []

    def start(self, name: str, **env: str) -> ServiceProcess:
        proc = ServiceProcess(name, self.settings, self.log_dir, **env).start()
        self.procs.append(proc)
        return proc

    def of(self, name: str) -> list[ServiceProcess]:
        return [p for p in self.procs if p.name == name]

    def logs(self, name: str) -> list[dict]:
        """Every JSON log line of every process of `name`."""
        lines = []
        for proc in self.of(name):
            for line in proc.log().splitlines():
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    pass
        return lines

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.alive:
                proc.kill()


@asynccontextmanager
async def services(settings, log_dir: Path, *, session: dict | None = None, sessions: int = 1):
    stack = Stack(settings, log_dir)
    try:
        stack.start("registry")
        stack.start("notifier")
        for _ in range(sessions):
            stack.start("session", **(session or {}))
        await wait_ready(settings, {}, timeout=60)
        yield stack
    finally:
        stack.kill_all()


async def checked(settings, name: str, fault=None, **load) -> Report:
    """Run the checker against `settings`, and `fault()` once the load has started."""
    sending = asyncio.Event()

    async def inject():
        await sending.wait()
        await fault()

    check = run_check(settings.amqp_url, sending=sending, **{**LOAD, **load})
    report = (await asyncio.gather(check, inject()))[0] if fault else await check
    print(f"\n[{name}]\n{report.summary()}")
    if os.environ.get("AODM_FAULT_REPORT_DIR"):
        directory = Path(os.environ["AODM_FAULT_REPORT_DIR"])
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"{name}.json").write_text(report.to_json())
    return report


def assert_clean(report: Report) -> None:
    assert report.ok, report.summary()
    assert report.unconfirmed == 0 and report.refused == 0, report.summary()
    assert report.confirmed == report.attempted, report.summary()


async def dead_letters(settings) -> int:
    bus = await Bus.connect(settings.amqp_url, name="aodm-test-dlq")
    try:
        return await bus.message_count(topology.DEAD_LETTER_QUEUE)
    finally:
        await bus.close()


async def until(predicate, timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


def holds_shards(proc: ServiceProcess) -> bool:
    return '"shard taken"' in proc.log()


# -- (1) kill -9 of the active session worker, five times, a standby taking over ---------


async def test_active_session_worker_killed_five_times_standby_takes_over(tmp_path):
    # One shard: exactly one worker is active, the other is a pure standby.
    async with isolated(session_shards=1) as settings, services(settings, tmp_path, sessions=2) as stack:
        takeovers: list[float] = []

        async def kill_active_five_times():
            for _ in range(5):
                await asyncio.sleep(1.5)
                alive = [p for p in stack.of("session") if p.alive]
                active = [p for p in alive if holds_shards(p)]
                standby = [p for p in alive if not holds_shards(p)]
                assert len(active) == 1 and len(standby) == 1, "one active worker and one standby"
                active[0].kill()
                killed_at = asyncio.get_running_loop().time()
                await until(lambda: holds_shards(standby[0]), 15, "the standby to take over")  # noqa: B023 (awaited here)
                takeovers.append(asyncio.get_running_loop().time() - killed_at)
                stack.start("session")  # the next standby

        report = await checked(settings, "kill-active-session-worker", kill_active_five_times, messages=80)
        print("takeover times (s):", [round(t, 2) for t in takeovers])
        assert len(takeovers) == 5
        assert_clean(report)


# -- (2) kill -9 between commit and ack --------------------------------------------------


async def test_crash_between_commit_and_ack_is_recognised_on_redelivery(tmp_path):
    faults = {"AODM_FAULTS": "crash-after-commit=0.05"}
    async with isolated() as settings, services(settings, tmp_path, session=faults, sessions=2) as stack:
        crashes = 0
        done = asyncio.Event()

        async def supervise():
            nonlocal crashes
            while not done.is_set():
                for proc in stack.of("session"):
                    if not proc.alive and proc.proc.returncode == 137 and not getattr(proc, "replaced", False):
                        proc.replaced = True
                        crashes += 1
                        stack.start("session", **faults)
                await asyncio.sleep(0.1)

        supervisor = asyncio.create_task(supervise())
        try:
            report = await checked(settings, "crash-after-commit", rate=25.0, rotate_every=20)
        finally:
            done.set()
            await supervisor
        assert crashes >= 1, "the fault never fired: the test proved nothing"
        redelivered = [line for line in stack.logs("session")
                       if line.get("event") == "handled" and line.get("duplicate") and line.get("redelivered")]
        assert redelivered, "no redelivery was recognised as a duplicate"
        print(f"crashes: {crashes}, redeliveries recognised: {len(redelivered)}")
        assert_clean(report)


# -- (3) RabbitMQ restarted during load ---------------------------------------------------


@pytest.mark.skipif(bool(missing(*RABBIT_TOOLS)), reason=f"no private RabbitMQ node: {missing(*RABBIT_TOOLS)}")
async def test_broker_restart_during_load(tmp_path):
    # Two session workers: after the restart they race for the shards again.
    async with private_rabbit() as rabbit, isolated(amqp_url=rabbit.url) as settings, \
            services(settings, tmp_path, sessions=2) as stack:

        async def restart_broker():
            await asyncio.sleep(1.5)
            await rabbit.stop_app()
            await asyncio.sleep(2)
            await rabbit.start_app()

        report = await checked(settings, "broker-restart", restart_broker, messages=120, rate=60.0)
        assert_clean(report)
        assert await dead_letters(settings) == 0
        assert all(p.alive for p in stack.procs), "a service died instead of reconnecting"
        lost = [line for line in stack.logs("session") if line.get("event", "").startswith("shard lost")]
        assert lost, "the restart did not reach the session workers"


# -- (4) PostgreSQL stopped for 30 s during load ----------------------------------------


@pytest.mark.skipif(bool(missing(*POSTGRES_TOOLS)), reason=f"no private PostgreSQL: {missing(*POSTGRES_TOOLS)}")
async def test_database_stopped_for_thirty_seconds(tmp_path):
    async with private_postgres() as pg, isolated(database_url=pg.url) as settings, \
            services(settings, tmp_path) as stack:

        async def stop_database():
            await asyncio.sleep(2)
            await pg.stop()
            await asyncio.sleep(30)
            await pg.start()

        report = await checked(settings, "database-down-30s", stop_database, messages=40, rate=20.0, duration=45.0)
        assert_clean(report)
        assert await dead_letters(settings) == 0, "a database outage was treated like poison"
        waited = [line for line in stack.logs("session") if line.get("event") == "database unavailable, retrying"]
        assert waited, "the outage never reached the session worker"
        assert all(p.alive for p in stack.procs)


# -- (5) notifier killed and restarted ---------------------------------------------------


async def test_notifier_killed_and_restarted(tmp_path):
    async with isolated() as settings, services(settings, tmp_path) as stack:

        async def kill_notifier():
            await asyncio.sleep(2)
            stack.of("notifier")[0].kill()
            await asyncio.sleep(2)
            stack.start("notifier")

        report = await checked(settings, "notifier-killed", kill_notifier)
        print(f"duplicate notifications (allowed, dropped by Id): {report.notifications_duplicated}")
        assert_clean(report)


# -- (6) poison ----------------------------------------------------------------------------


async def test_poison_is_dead_lettered_and_the_shard_keeps_flowing(tmp_path):
    async with isolated(session_shards=1) as settings, \
            services(settings, tmp_path, session={"AODM_FAULTS": "poison"}) as stack:
        sender = await Client.connect(settings.amqp_url, crypto.Identity.generate(), timeout=30)
        peer = await Client.connect(settings.amqp_url, crypto.Identity.generate())
        try:
            await sender.register(f"poisoner-{secrets.token_hex(4)}")
            await peer.register(f"peer-{secrets.token_hex(4)}")
            session, key = await open_pair(sender, peer)
            plain = sender.sign(session, "SendMessage", SendMessage(crypto.encrypt(key, "poison"), 1))
            poisoned = envelope.sign(
                sender.identity.signing_key, target=session, from_=sender.handle, action="SendMessage",
                data=plain.data, anchor=plain.anchor, extra_tags=[Tag("Fault", "poison")],
            )
            answer: list[BaseException] = []

            async def send_poison():
                await asyncio.sleep(1)
                try:
                    await sender.send_envelope(poisoned)
                except InternalError as exc:
                    answer.append(exc)

            report = await checked(settings, "poison", send_poison)
        finally:
            await sender.close()
            await peer.close()
        assert len(answer) == 1, "the poison request was not answered `internal`"
        assert await dead_letters(settings) == 1
        attempts = [line for line in stack.logs("session") if line.get("request_id") == poisoned.id
                    and line.get("event") in ("handler failed, retrying", "poison request dead-lettered")]
        assert [line["event"] for line in attempts] == ["handler failed, retrying"] * 2 + ["poison request dead-lettered"]
        assert_clean(report)


# -- (7) a hung handler --------------------------------------------------------------------


async def test_stalled_handler_is_retried_without_a_second_effect(tmp_path):
    # Each sender's middle message hangs past the handler timeout on its first attempt.
    faults = {"AODM_FAULTS": "stall", "AODM_HANDLER_TIMEOUT_S": "2"}
    async with isolated() as settings, services(settings, tmp_path, session=faults) as stack:
        report = await checked(settings, "stalled-handler", senders_per_session=1, messages=40, rate=15.0,
                               tag=("Fault", "stall"), tag_every=40)
        # Each stalled attempt is cut off by the handler timeout and run again: alone, or as
        # part of a batched run of SendMessages, which is then run again one by one.
        timeouts = [line for line in stack.logs("session")
                    if line.get("event") in ("handler failed, retrying", "batched handler failed, running its requests one by one")
                    and "TimeoutError" in line.get("error", "")]
        assert len(timeouts) == 3, "each stalled request should time out exactly once"
        assert_clean(report)
        assert await dead_letters(settings) == 0


# -- (8) graceful shutdown -----------------------------------------------------------------


async def test_session_worker_sigterm_during_load(tmp_path):
    async with isolated() as settings, services(settings, tmp_path) as stack:
        exit_codes = []

        async def terminate_and_restart():
            await asyncio.sleep(2)
            exit_codes.append(await asyncio.to_thread(stack.of("session")[0].terminate, 30))
            stack.start("session")

        report = await checked(settings, "session-sigterm", terminate_and_restart)
        assert exit_codes == [0], "SIGTERM should stop the worker cleanly"
        assert_clean(report)
