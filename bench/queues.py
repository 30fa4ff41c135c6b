"""What the broker pays per message for spreading messages over many durable queues
(python -m bench.queues).

aodm's layout is set by what it promises: requests hashed over the session shard queues
(8 by default), each notification into its recipient's own durable queue (one per handle).
The minimal pipeline it is measured against uses one queue each way. This measures, in one
run on the same broker, one persistent 1.3 KiB message published (confirms on), consumed and
acknowledged, spread round robin over 1 queue (the baseline's layout) and over 8 and 64:
RabbitMQ's CPU per message, as a ratio to the one-queue figure."""

import argparse
import asyncio
import time

from bench.env import cpu_seconds, pids_named
from bench.progress import Bar, say
from shared.transport import Bus, Delivery, Message, ack_in_order
from tests.isolation import drop_vhost, new_vhost

BODY = b"x" * 1300
BATCH = 50  # publishes per publish_all, as a session batch would send


def broker_cpu() -> float:
    return sum(cpu_seconds(pid) or 0.0 for pid in pids_named("beam.smp"))


async def measure(queues: int, messages: int) -> dict:
    vhost, url = new_vhost("aodm-bench-queues")
    bus = await Bus.connect(url, name="bench-queues")
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
        bar = Bar(f"{queues} queue{'s' if queues > 1 else ''}", messages, unit="")
        cpu, started, sent = broker_cpu(), time.monotonic(), 0
        while sent < messages:
            await bus.publish_all([Message("", names[(sent + i) % queues], BODY) for i in range(BATCH)])
            sent += BATCH
            bar.update(sent)
        await asyncio.wait_for(done.wait(), timeout=120)
        elapsed, used = time.monotonic() - started, broker_cpu() - cpu
        bar.close(f"{received / elapsed:7.0f} msg/s")
        for consumer in consumers:
            await consumer.stop()
        return {"queues": queues, "rate": received / elapsed, "broker_us": used / received * 1e6}
    finally:
        await bus.close()
        drop_vhost(vhost)


async def run(messages: int) -> list[dict]:
    return [await measure(queues, messages) for queues in (1, 8, 64)]


def table(rows: list[dict]) -> str:
    base = rows[0]["broker_us"]
    lines = ["| durable queues | msg/s | RabbitMQ CPU µs per message | ÷ one queue |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['queues']} | {r['rate']:,.0f} | {r['broker_us']:.0f} | {r['broker_us'] / base:.2f}× |" for r in rows]
    return "\n".join(lines)


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
