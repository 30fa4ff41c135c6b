"""The load engine, the same for aodm and the baseline.

A target has `senders` (each its own AMQP connection) and `one(sender)`, which publishes one
request with publisher confirms, waits for its completion and returns
(publish time, completion time, error code or None). Targets that produce notifications
record (arrival, latency, publish time) in `latencies`.

- closed loop: `inflight` lanes, each sending its next request as soon as the previous one
  completed: the sustained maximum (counted at completion, after a warm-up);
- open loop: requests started on a fixed schedule (rate/s) whatever the system does, each in
  its own task (at most `max_inflight` waiting, two seconds' worth by default; a publish
  due beyond that is skipped and counted): latency at a given offered load.
"""

import asyncio
import time

import aio_pika

from aodm.transport import fast_path_available, subscribe
from bench.env import CpuMeter
from bench.progress import Bar
from bench.stats import RunResult, latency_series, rate_series, summary


async def consume_notifications(connection: aio_pika.abc.AbstractConnection, queues: list[str], callback) -> aio_pika.abc.AbstractChannel:
    """No-ack consumers on a raw aiormq channel (no aio-pika message wrapper per delivery;
    `callback` called directly, not as a task, on the transport's fast path, as the services'
    consumers): the load side's own cost, the same for aodm's and the baseline's notifications."""
    channel = await connection.channel()
    amqp = await channel.get_underlay_channel()
    await amqp.basic_qos(prefetch_count=2000)
    for queue in queues:
        await subscribe(amqp, queue, callback, fast=fast_path_available(), no_ack=True)
    return channel


class ReplyTarget:
    """A target done at its reply (a read): nothing to start or stop, no notifications."""

    buses: list
    timeout: float

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def pending_notifications(self, since: float) -> int:
        return 0

    async def timed_call(self, sender: int, exchange: str, routing_key: str, body: bytes) -> tuple[float, float, bytes | None]:
        """(sent, done, reply body — None on a timeout)."""
        sent = time.monotonic()
        try:
            reply = await self.buses[sender].call(exchange, routing_key, body, timeout=self.timeout)
        except TimeoutError:
            return sent, time.monotonic(), None
        return sent, time.monotonic(), reply


async def _drain_notifications(target, since: float, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        missing = target.pending_notifications(since)
        if missing == 0 or time.monotonic() > deadline:
            return missing
        await asyncio.sleep(0.1)


def _overloaded(result: RunResult, rtts: list, completions: list[float], window_start: float, stop_at: float) -> bool:
    """Fell behind the offered load: fewer completions than publishes over the window (shifted
    by the median round trip, so a short run is not penalised for its pipeline delay), or a
    queue that grows — round trips in the last quarter of the window far above the first's."""
    if not rtts:
        return True
    shift = result.rtt_ms.get("p50", 0) / 1000
    done = sum(1 for t in completions if window_start + shift <= t <= stop_at + shift)
    behind = done < 0.95 * result.achieved_offered_rate * (stop_at - window_start)
    quarter = (stop_at - window_start) / 4
    first = sorted(r for s, r in rtts if window_start <= s < window_start + quarter)
    last = sorted(r for s, r in rtts if stop_at - quarter <= s < stop_at)
    growing = bool(first and last) and last[len(last) // 2] > 2 * first[len(first) // 2] + 0.05
    result.extra["kept_up"] = {"completions_shifted": done, "rtt_first_quarter_p50_ms": first[len(first) // 2] * 1000 if first else None,
                               "rtt_last_quarter_p50_ms": last[len(last) // 2] * 1000 if last else None}
    return behind or growing


async def run(
    target,
    name: str,
    *,
    duration: float,
    warmup: float,
    inflight: int | None = None,
    rate: float | None = None,
    max_inflight: int | None = None,
    meter: CpuMeter | None = None,
    bucket: float = 1.0,
    notification_timeout: float = 30.0,
    kind: str | None = None,
) -> RunResult:
    assert (inflight is None) != (rate is None)
    closed = inflight is not None
    if max_inflight is None and rate is not None:
        # at most two seconds of the offered load waiting: an overloaded run stays bounded
        max_inflight = max(200, int(2 * rate))
    result = RunResult(name=name, kind=kind or ("closed" if closed else "open"), duration=duration, warmup=warmup,
                       offered_rate=rate)
    loop = asyncio.get_running_loop()
    start = time.monotonic()
    window_start, stop_at = start + warmup, start + duration
    completions: list[float] = []
    rtts: list[tuple[float, float]] = []  # (publish, rtt)
    publishes: list[float] = []
    errors: dict[str, int] = {}
    first_latency = len(target.latencies)
    cpu: dict[str, object] = {}

    def record(outcome: tuple[float, float, str | None]) -> None:
        sent, done, error = outcome
        publishes.append(sent)
        if error is None:
            completions.append(done)
            rtts.append((sent, done - sent))
        else:
            errors[error] = errors.get(error, 0) + 1

    def failed(exc: BaseException) -> None:
        key = type(exc).__name__
        errors[key] = errors.get(key, 0) + 1

    async def lane(i: int) -> None:
        sender = i % target.senders
        while time.monotonic() < stop_at:
            try:
                record(await target.one(sender))
            except Exception as exc:  # a broker fault: counted, the run goes on
                failed(exc)

    def finished(task: asyncio.Task, tasks: set) -> None:
        tasks.discard(task)
        if task.cancelled():
            return
        if task.exception() is not None:
            failed(task.exception())
        else:
            record(task.result())

    async def scheduler() -> None:
        tasks: set[asyncio.Task] = set()
        interval = 1.0 / rate
        i = 0
        skipped = 0
        while True:
            due = start + i * interval
            if due >= stop_at:
                break
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(tasks) >= max_inflight:
                skipped += 1
            else:
                task = loop.create_task(target.one(i % target.senders))
                task.add_done_callback(lambda t: finished(t, tasks))
                tasks.add(task)
            i += 1
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        result.extra["skipped_publishes"] = skipped

    async def cpu_window() -> None:
        if meter is None:
            return
        await asyncio.sleep(max(0.0, window_start - time.monotonic()))
        cpu["a"] = meter.snapshot()
        cpu["count_a"] = len(completions)
        await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
        cpu["b"] = meter.snapshot()
        cpu["count_b"] = len(completions)

    bar = Bar(name, duration)

    async def progress() -> None:
        while True:
            elapsed = time.monotonic() - start
            recent = sum(1 for t in completions[-5000:] if t > time.monotonic() - 1.0)
            bar.update(min(elapsed, duration), f"{len(completions):8d} done {recent:6d}/s"
                       + (f" {sum(errors.values())} err" if errors else ""))
            await asyncio.sleep(0.2)

    progress_task = loop.create_task(progress())
    cpu_task = loop.create_task(cpu_window())
    try:
        if closed:
            await asyncio.gather(*(lane(i) for i in range(inflight)))
        else:
            await scheduler()
        await cpu_task
        missing = await _drain_notifications(target, window_start, notification_timeout)
    finally:
        progress_task.cancel()
        cpu_task.cancel()
    end = time.monotonic()
    window = stop_at - window_start
    in_window = [t for t in completions if window_start <= t <= stop_at]
    result.completed = len(completions)
    result.throughput = len(in_window) / window
    result.errors = errors
    sent_in_window = [s for s in publishes if window_start <= s < stop_at]
    result.achieved_offered_rate = len(sent_in_window) / window
    rtt_window = [r * 1000 for s, r in rtts if window_start <= s < stop_at]
    result.rtt_ms = summary(rtt_window)
    notes = [(a, lat, sent) for a, lat, sent in target.latencies[first_latency:] if window_start <= sent < stop_at]
    if notes or target.pending_notifications(window_start):
        result.latency_ms = summary([lat * 1000 for _, lat, _ in notes])
        result.missing_notifications = missing
        result.series_latency = [(t, p50 * 1000, p95 * 1000, p99 * 1000)
                                 for t, p50, p95, p99 in latency_series([(a, lat) for a, lat, _ in notes], start, end, bucket)]
    result.series_rate = rate_series(completions, start, end, bucket)
    if rate is not None:
        result.overloaded = (_overloaded(result, rtts, completions, window_start, stop_at) or missing > 0
                             or result.extra.get("skipped_publishes", 0) > 0)
    if "b" in cpu:
        used = CpuMeter.between(cpu["a"], cpu["b"])
        result.cpu_cores = used
        n = max(1, cpu["count_b"] - cpu["count_a"])
        result.extra["cpu_us_per_op"] = {k: v * window / n * 1e6 for k, v in used.items()}
    bar.close(f"{result.throughput:8.0f}/s" + (f"  p50 {result.latency_ms['p50']:.1f} ms p99 {result.latency_ms['p99']:.1f} ms"
                                               if result.latency_ms else f"  rtt p50 {result.rtt_ms['p50']:.1f} ms"))
    return result
