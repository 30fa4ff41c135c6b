"""What the broker pays per message for spreading messages over many durable queues
(python -m bench.queues).

aodm's layout is set by what it promises: requests hashed over the session shard queues
(8 by default), each notification into its recipient's own durable queue (one per handle).
The minimal pipeline it is measured against uses one queue each way. This measures, in one
run on the same broker, one persistent 1.3 KiB message published (confirms on), consumed and
acknowledged, spread round robin over 1 queue (the baseline's layout) and over 8, 64 and 1,000
(the full benchmark's recipients, each with their own queue): RabbitMQ's CPU per message, as
a ratio to the one-queue figure. The same is measured with transient messages, which no
queue writes to disk, to show how much of the cost of spreading is persistence. The likely
reason, not traced: each classic queue keeps its own index and syncs it before it confirms,
so a thousand queues that get one message each cannot share the syncs that one queue
shares across its messages."""

import argparse
import asyncio
import time

from aodm.transport import Bus, Delivery, Message, ack_in_order
from bench.env import cpu_seconds, pids_named
from bench.progress import Bar, say
from tests.isolation import drop_vhost, new_vhost

BODY = b"x" * 1300
BATCH = 50  # publishes per publish_all, as a session batch would send


def broker_cpu() -> float:
    return sum(cpu_seconds(pid) or 0.0 for pid in pids_named("beam.smp"))


LAYOUTS = (1, 8, 64, 1000)


async def measure(queues: int, messages: int, persistent: bool = True) -> dict:
    vhost, url = new_vhost("aodm-bench-queues")
    bus = await Bus.connect(url, name="bench-queues", fast=True)
    try:
        names = [f"bench.q{i:02d}" for i in range(queues)]
        for name in names:
            await bus.declare_queue(name)
        received = 0
        done = asyncio.Event()

        async def handle(batch: list[Delivery]) -> None:
            nonlocal received
            await ack_in_order(batch)
            received += len(batch)
            if received >= messages:
                done.set()

        consumers = [await bus.consume(name, handle, prefetch=200, batch=100) for name in names]
        kind = "persistent" if persistent else "transient"
        bar = Bar(f"{queues} queue{'s' if queues > 1 else ''}, {kind}", messages, unit="")
        cpu, started, sent = broker_cpu(), time.monotonic(), 0
        while sent < messages:
            await bus.publish_all([Message("", names[(sent + i) % queues], BODY, persistent=persistent)
                                   for i in range(BATCH)])
            sent += BATCH
            bar.update(sent)
        await asyncio.wait_for(done.wait(), timeout=120)
        elapsed, used = time.monotonic() - started, broker_cpu() - cpu
        bar.close(f"{received / elapsed:7.0f} msg/s")
        for consumer in consumers:
            await consumer.stop()
        return {"queues": queues, "kind": kind, "rate": received / elapsed, "broker_us": used / received * 1e6}
    finally:
        await bus.close()
        drop_vhost(vhost)


async def run(messages: int) -> list[dict]:
    # The two kinds alternate layout by layout, so a drift of the host's speed shows in both.
    return [await measure(queues, messages, persistent) for queues in LAYOUTS for persistent in (True, False)]


def table(rows: list[dict]) -> str:
    """One row per layout: each kind's rate and broker CPU, as a ratio to one queue of the
    same kind, and what persistence costs the broker on top of a transient message."""
    by = {(r["queues"], r["kind"]): r for r in rows}
    one_p, one_t = by[(1, "persistent")]["broker_us"], by[(1, "transient")]["broker_us"]
    lines = ["| durable queues | persistent msg/s | RabbitMQ CPU µs per message | ÷ one queue "
             "| transient msg/s | RabbitMQ CPU µs per message | ÷ one queue | persistence adds, µs |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for queues in LAYOUTS:
        p, t = by[(queues, "persistent")], by[(queues, "transient")]
        lines.append(f"| {queues:,} | {p['rate']:,.0f} | {p['broker_us']:.0f} | {_ratio(p['broker_us'], one_p)} "
                     f"| {t['rate']:,.0f} | {t['broker_us']:.0f} | {_ratio(t['broker_us'], one_t)} "
                     f"| {p['broker_us'] - t['broker_us']:.0f} |")
    return "\n".join(lines)


def _ratio(us: float, base: float) -> str:
    # CPU time comes in 10 ms clock ticks: a short run in one queue can read zero.
    return f"{us / base:.2f}×" if base > 0 else "–"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.queues", description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=30_000, help="per layout (default 30000)")
    args = parser.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    say(f"== broker CPU per message by queue layout, {args.messages:,} messages each")
    print(table(asyncio.run(run(args.messages))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
