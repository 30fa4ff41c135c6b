"""The whole benchmark, stage by stage, in one isolated world (own vhost, own database, the
services as real processes). See docs/performance.md for what each figure means."""

import argparse
import asyncio
import gc
import importlib.metadata
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import aio_pika
import asyncpg

from aodm import topology
from aodm.transport import Bus
from bench import aodm_load, baseline, load, profile, report
from bench.env import (
    DATABASE_BASE,
    CpuMeter,
    LogDir,
    Stack,
    isolated_settings,
    management,
    pids_named,
    rss_kib,
    start_python,
    wait_empty,
    wait_ready,
)
from bench.progress import say
from tests.processes import ROOT

FIXED_RATE = 500.0


@dataclass(frozen=True)
class Config:
    name: str
    handles: int  # registered through the API
    sessions: int  # established and keyed through the API
    store: int  # messages COPYed in for QueryMessage
    senders: int  # SendMessage senders, each its own connection
    inflight: int  # requests in flight in the closed-loop runs
    seed_concurrency: int
    max_seconds: float
    max_warmup: float
    latency_seconds: float
    latency_warmup: float
    query_seconds: float
    query_warmup: float
    soak_seconds: float
    soak_fraction: float  # of the measured maximum
    profile_seconds: float
    bucket: float  # time-series resolution
    timeout: float  # per request
    drain_timeout: float  # for a backlog to clear between runs
    rounds: int = 1  # max-throughput runs of a, b and aodm, interleaved; the median counts
    envelope_bytes: int = 1024  # aim for a SendMessage body of this size


FULL = Config("full", handles=64, sessions=1000, store=1_000_000, senders=4, inflight=512, seed_concurrency=32,
              max_seconds=30, max_warmup=6, latency_seconds=30, latency_warmup=5, query_seconds=20, query_warmup=3,
              soak_seconds=600, soak_fraction=0.4, profile_seconds=30, bucket=1.0, timeout=120, drain_timeout=180,
              rounds=3)
SMOKE = Config("smoke", handles=8, sessions=20, store=20_000, senders=2, inflight=128, seed_concurrency=16,
               max_seconds=3, max_warmup=1, latency_seconds=2.5, latency_warmup=0.5, query_seconds=2, query_warmup=0.5,
               soak_seconds=5, soak_fraction=0.4, profile_seconds=3, bucket=0.25, timeout=60, drain_timeout=60)


# -- machine -------------------------------------------------------------------------------


def _first(path: str, prefix: str) -> str:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def _loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


async def machine_meta(command: str) -> dict:
    libs = []
    for dist in ("aio-pika", "aiormq", "asyncpg", "msgspec", "PyNaCl", "uvloop", "structlog"):
        try:
            libs.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    meta = {
        "command": command,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "nproc": os.cpu_count(),
        "cpu": _first("/proc/cpuinfo", "model name"),
        "memory_gib": round(int(_first("/proc/meminfo", "MemTotal").split()[0]) / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "libraries": ", ".join(libs),
        "loadavg_start": _loadavg(),
    }
    try:
        overview = json.loads(management("GET", "/overview"))
        meta["rabbitmq"], meta["erlang"] = overview.get("rabbitmq_version"), overview.get("erlang_version")
    except Exception as exc:  # the management API is needed anyway; this is only the label
        meta["rabbitmq"] = f"? ({exc})"
    conn = await asyncpg.connect(DATABASE_BASE)
    try:
        meta["postgres"] = (await conn.fetchval("SHOW server_version")).split()[0]
        rows = await conn.fetch("""SELECT name, setting, unit FROM pg_settings WHERE name IN
                                   ('synchronous_commit', 'fsync', 'shared_buffers', 'max_connections')""")
        meta["pg_settings"] = ", ".join(f"{r['name']}={r['setting']}{r['unit'] or ''}" for r in rows)
    finally:
        await conn.close()
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        meta["git"] = f"{head}{' + uncommitted changes' if dirty else ''}"
    except OSError:
        meta["git"] = "?"
    return meta


# -- the baseline process ------------------------------------------------------------------


class BaselineProcess:
    def __init__(self, settings, log_dir: Path) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.proc: subprocess.Popen | None = None
        self.mode = None
        self.peak_rss_kib = 0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    async def start(self, mode: str, control: Bus) -> None:
        self.stop()
        self.mode = mode
        self.proc = start_python("bench.baseline", {
            "BENCH_BASELINE_MODE": mode, "AODM_AMQP_URL": self.settings.amqp_url,
            "AODM_DATABASE_URL": self.settings.database_url,
        }, self.log_dir / f"baseline-{mode}.log")
        queue = baseline.RPC_QUEUE if mode == "rpc" else baseline.IN_QUEUE
        deadline = time.monotonic() + 30
        while await control.consumer_count(queue) < 1:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"baseline {mode} did not start:\n"
                                   + (self.log_dir / f"baseline-{mode}.log").read_text()[-3000:])
            await asyncio.sleep(0.1)

    def sample_rss(self) -> None:
        if self.pid:
            self.peak_rss_kib = max(self.peak_rss_kib, rss_kib(self.pid) or 0)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.sample_rss()
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None


# -- the benchmark -------------------------------------------------------------------------


class Bench:
    def __init__(self, cfg: Config, args: argparse.Namespace) -> None:
        self.cfg = cfg
        self.args = args
        self.results: dict = {"mode": "workers" if args.workers else cfg.name, "config": asdict(cfg), "runs": {}}
        self.notes: list[str] = []

    def groups(self) -> dict[str, list[int]]:
        pids = {key: [pid] for key, pid in self.stack.pids().items()}
        if self.baseline.pid:
            pids["baseline"] = [self.baseline.pid]
        pids["bench"] = [os.getpid()]
        pids["broker"] = pids_named("beam.smp")
        pids["postgres"] = pids_named("postgres")
        return pids

    async def settle(self) -> None:
        """Let any backlog clear, so one run's queue does not count in the next."""
        queues = [topology.shard_queue(s) for s in range(self.settings.session_shards)] + [
            topology.NOTIFIER_QUEUE, topology.ACTIVITY_QUEUE, topology.REGISTRY_QUEUE, baseline.IN_QUEUE]
        if not await wait_empty(self.control, queues, self.cfg.drain_timeout):
            self.notes.append("a backlog had not cleared before the next run")
            say("warning: backlog not cleared within the drain timeout")

    async def _queue_depths(self, into: dict) -> None:
        """Ready messages per queue group, once a second: where a backlog waits."""
        groups = {
            "session shards": [topology.shard_queue(s) for s in range(self.settings.session_shards)],
            "notifier": [topology.NOTIFIER_QUEUE], "registry activity": [topology.ACTIVITY_QUEUE],
            "registry requests": [topology.REGISTRY_QUEUE], "baseline in": [baseline.IN_QUEUE],
        }
        while True:
            for label, queues in groups.items():
                into.setdefault(label, []).append(sum([await self.control.message_count(q) for q in queues]))
            await asyncio.sleep(1.0)

    async def measure(self, name: str, target, **kw) -> dict:
        await target.start()
        depths: dict[str, list[int]] = {}
        sampler = asyncio.create_task(self._queue_depths(depths))
        # This process holds every latency sample of the whole benchmark: a full garbage
        # collection over them mid-run would stall its clocks and show as a latency spike.
        gc.collect()
        gc.disable()
        try:
            result = await load.run(target, name, meter=self.meter, bucket=self.cfg.bucket,
                                    notification_timeout=min(60.0, self.cfg.timeout), **kw)
        finally:
            gc.enable()
            sampler.cancel()
            await target.stop()
        result.extra["queue_ready"] = {k: {"mean": sum(v) / len(v), "max": max(v)} for k, v in depths.items() if v and max(v)}
        self.baseline.sample_rss()
        if getattr(target, "short_pages", 0):
            result.extra["short_pages"] = target.short_pages
        self.stack.check_alive()
        await self.settle()
        self.results["runs"][name] = result.as_dict()
        return self.results["runs"][name]

    def send_target(self) -> aodm_load.SendTarget:
        return aodm_load.SendTarget(self.world, self.senders, self.notify, self.cfg.timeout, self.plaintext)

    def pipeline_target(self) -> baseline.PipelineTarget:
        return baseline.PipelineTarget(self.senders, self.notify, self.cfg.timeout)

    def _fit_plaintext(self) -> int:
        """The plaintext length that makes a SendMessage body about `envelope_bytes`."""
        plaintext = 300
        for _ in range(3):
            size = aodm_load.SendTarget(self.world, self.senders[:1], self.notify, 1, plaintext).message_bytes
            plaintext = max(1, plaintext + (self.cfg.envelope_bytes - size) * 3 // 4)
        return plaintext

    async def run(self) -> dict:
        cfg, args = self.cfg, self.args
        started = time.monotonic()
        self.results["meta"] = await machine_meta(" ".join(["python -m bench", *sys.argv[1:]]))
        async with isolated_settings() as settings:
            self.settings = settings
            self.results["world"] = {"vhost": settings.amqp_url.rsplit("/", 1)[1],
                                     "database": settings.database_url.rsplit("/", 1)[1]}
            logs = LogDir(Path(args.keep_logs) if args.keep_logs else None)
            # The load generator sends far faster per sender than a person: the send limits
            # are still checked for every message, and never reached.
            self.stack = Stack(settings, logs.path, env={"AODM_LOG_LEVEL": args.service_log_level,
                                                         "AODM_SEND_RATE": "1000000", "AODM_SEND_SESSION_RATE": "1000000"})
            self.baseline = BaselineProcess(settings, logs.path)
            self.meter = CpuMeter(self.groups)
            connections: list = []
            try:
                say(f"world: vhost {settings.amqp_url.rsplit('/', 1)[1]}, database {settings.database_url.rsplit('/', 1)[1]}; "
                    f"service logs in {logs.path}")
                self.stack.spawn("registry")
                self.stack.spawn("session", "session-1")
                self.stack.spawn("notifier")
                self.control = await Bus.connect(settings.amqp_url, name="bench-control", fast=True)
                connections.append(self.control)
                await wait_ready(settings, self.stack)
                await self.stack.wait_balanced(self.control)
                await baseline.declare(self.control)
                conn = await asyncpg.connect(settings.database_url)
                try:
                    await conn.execute(baseline.SCHEMA_SQL)
                finally:
                    await conn.close()
                self.senders = [await Bus.connect(settings.amqp_url, name=f"bench-sender-{i}", fast=True) for i in range(cfg.senders)]
                connections += self.senders
                self.notify = await aio_pika.connect(settings.amqp_url, client_properties={"connection_name": "bench-inbox"})
                connections.append(self.notify)

                say("== seeding through the API (the rates are measured)")
                self.world, self.results["seed"] = await aodm_load.seed(
                    self.senders, cfg.handles, cfg.sessions, cfg.seed_concurrency, cfg.timeout)
                self.plaintext = self._fit_plaintext()
                self.results["message_bytes"] = {"aodm": self.send_target().message_bytes,
                                                 "baseline": baseline.MESSAGE_BYTES}
                await self.settle()
                if args.workers:
                    await self.workers_mode([int(n) for n in args.workers.split(",")])
                else:
                    await self.standard(connections)
            finally:
                self.baseline.stop()
                for c in connections:
                    try:
                        await c.close()
                    except Exception:
                        pass
                self.stack.stop()
                logs.close()
        m = self.results["meta"]
        m["loadavg_end"] = _loadavg()
        m["elapsed_s"] = time.monotonic() - started
        self.results["notes"] = self.notes
        return self.results

    async def interleaved(self, title: str, runs: dict, key) -> dict[str, dict]:
        """Each of `runs` ({name: (baseline mode or None, () -> (target, measure options))})
        once per round over `rounds` rounds, the order rotating, so a drift in the machine's
        other load hits all alike. The median round of each, by `key`, is its figure (saved
        under its name); every round is kept in the results."""
        cfg, names = self.cfg, list(runs)
        rounds: dict[str, list[dict]] = {name: [] for name in names}
        for r in range(cfg.rounds):
            say(f"== {title}, round {r + 1}/{cfg.rounds}")
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                mode, make = runs[name]
                if mode is not None:
                    await self.baseline.start(mode, self.control)
                try:
                    target, options = make()
                    rounds[name].append(await self.measure(f"{name}_r{r + 1}", target, **options))
                finally:
                    self.baseline.stop()
        medians = {}
        for name, done in rounds.items():
            median = dict(sorted(done, key=key)[(len(done) - 1) // 2])
            median["extra"] = {**median["extra"], "rounds": [key(run) for run in done]}
            self.results["runs"][name] = medians[name] = median
        return medians

    async def max_rounds(self) -> dict[str, float]:
        """Closed-loop maximum of (a), (b) and aodm; the median round counts."""
        cfg = self.cfg
        closed = dict(inflight=cfg.inflight, duration=cfg.max_seconds, warmup=cfg.max_warmup)
        runs = {
            f"{who}_max": (mode, lambda target=target: (target(), closed))
            for who, mode, target in (("baseline_a", "a", self.pipeline_target), ("baseline_b", "b", self.pipeline_target),
                                      ("aodm", None, self.send_target))
        }
        medians = await self.interleaved("maximum throughput", runs, key=lambda run: run["throughput"])
        return {name.removesuffix("_max"): run["throughput"] for name, run in medians.items()}

    async def latency_rounds(self, best: dict[str, float]) -> None:
        """Open loop at 500 msg/s and at 70 % of each one's own maximum; the median round by
        p99 counts (a single stall of the shared machine decides a single run's p99)."""
        cfg = self.cfg
        for pace, rate_of in (("500", lambda who: FIXED_RATE), ("70", lambda who: 0.7 * best[who])):
            # The defaults bind each run's own target and rate (a closure would see the last).
            runs = {
                f"{who}_{pace}": (mode, lambda target=target, rate=rate_of(who): (  # noqa: B008
                    target(), dict(rate=rate, duration=cfg.latency_seconds, warmup=cfg.latency_warmup)))
                for who, mode, target in (("baseline_a", "a", self.pipeline_target),
                                          ("baseline_b", "b", self.pipeline_target), ("aodm", None, self.send_target))
            }
            await self.interleaved(f"latency at {'500 msg/s' if pace == '500' else '70% of own max'}", runs,
                                   key=lambda run: run["latency_ms"].get("p99") or 0.0)

    async def standard(self, connections: list) -> None:
        cfg, args = self.cfg, self.args
        say(f"== bulk store: {cfg.store:,} messages COPYed into session.messages")
        self.results["store"] = await aodm_load.bulk_store(self.settings.database_url, self.world, cfg.store)

        best = await self.max_rounds()
        await self.latency_rounds(best)

        readers = [await Bus.connect(self.settings.amqp_url, name=f"bench-reader-{i}", fast=True) for i in range(32)]
        connections += readers
        for c in (1, 32):
            closed = dict(inflight=c, duration=cfg.query_seconds, warmup=cfg.query_warmup, kind="rpc")

            # One picker per round, made once (a default) and drawn from at every call.
            def pages(pick=aodm_load.page_picker(self.world, random.Random(5))) -> tuple[str, int]:  # noqa: B008
                session, from_ts = pick()
                return session.session_id, from_ts

            # B023: the runs are made and awaited within this iteration, with its own c.
            runs = {
                f"rpc_{c}": ("rpc", lambda: (baseline.RpcTarget(readers[:c], pages, cfg.timeout), closed)),  # noqa: B023
                f"query_{c}": (None, lambda: (aodm_load.QueryTarget(self.world, readers[:c], cfg.timeout), closed)),  # noqa: B023
            }
            await self.interleaved(f"QueryMessage vs raw RPC, 50-message pages, {c} client{'s' if c > 1 else ''}",
                                   runs, key=lambda run: run["throughput"])

        await self.soak(best["aodm"])
        if args.profile:
            await self.profile()

    async def soak(self, max_rate: float) -> None:
        cfg = self.cfg
        rate = max(10.0, cfg.soak_fraction * max_rate)
        say(f"== memory soak: {cfg.soak_seconds:.0f} s at {rate:.0f} msg/s")
        samples: dict[str, list[tuple[float, float]]] = {}
        start = time.monotonic()
        interval = max(0.25, min(5.0, cfg.soak_seconds / 120))

        async def sample() -> None:
            while True:
                for key, pid in self.stack.pids().items():
                    kib = rss_kib(pid)
                    if kib:
                        samples.setdefault(key, []).append((round(time.monotonic() - start, 2), round(kib / 1024, 2)))
                await asyncio.sleep(interval)

        sampler = asyncio.create_task(sample())
        try:
            await self.measure("soak", self.send_target(), rate=rate, duration=cfg.soak_seconds,
                               warmup=min(10.0, cfg.soak_seconds / 5))
        finally:
            sampler.cancel()
        memory: dict = {}
        for key, series in samples.items():
            values = [v for _, v in series]
            first, last = values[0], values[-1]
            memory[key] = {
                "start_mib": first, "end_mib": last, "max_mib": max(values), "min_mib": min(values),
                "drift_pct": (last - first) / first * 100,
                "flat": all(abs(v - first) <= 0.10 * first for v in values),
                "samples": series,
            }
        memory["baseline_mib"] = round(self.baseline.peak_rss_kib / 1024, 2) or None
        self.results["memory"] = memory

    async def profile(self) -> None:
        cfg, out = self.cfg, Path(self.args.out)
        worker = self.stack.sessions()[0]
        say(f"== profile: py-spy on the session worker (pid {worker.proc.pid}) under closed-loop load")
        raw = Path(tempfile.mkdtemp(prefix="aodm-bench-pyspy-")) / "session.collapsed"
        rate = 100

        async def sampled() -> dict:
            await asyncio.sleep(1.5)
            return await profile.record(worker.proc.pid, cfg.profile_seconds, out / "profile-session.svg", raw, rate)

        task = asyncio.create_task(sampled())
        run = await self.measure("profile_load", self.send_target(), inflight=cfg.inflight,
                                 duration=cfg.profile_seconds + 3, warmup=1.5)
        summary = await task
        shutil.rmtree(raw.parent, ignore_errors=True)
        self.results["profile"] = {**summary, "seconds": cfg.profile_seconds, "rate": rate, "pid": worker.proc.pid,
                                   "throughput": run["throughput"]}
        if summary.get("error"):
            say(f"warning: {summary['error']}")

    async def workers_mode(self, counts: list[int]) -> None:
        cfg = self.cfg
        await self.baseline.start("b", self.control)
        try:
            await self.measure("baseline_b_max", self.pipeline_target(), inflight=cfg.inflight,
                               duration=cfg.max_seconds, warmup=cfg.max_warmup)
        finally:
            self.baseline.stop()
        rows = []
        for n in counts:
            say(f"== {n} session worker process{'es' if n > 1 else ''}")
            await self.stack.set_session_workers(n, self.control)
            best = await self.measure(f"aodm_max_w{n}", self.send_target(), inflight=cfg.inflight,
                                      duration=cfg.max_seconds, warmup=cfg.max_warmup)
            fixed = await self.measure(f"aodm_500_w{n}", self.send_target(), rate=FIXED_RATE,
                                       duration=cfg.latency_seconds, warmup=cfg.latency_warmup)
            cores = best.get("cpu_cores", {})
            rows.append({
                "workers": n, "throughput": best["throughput"],
                "p50_500": fixed["latency_ms"].get("p50"), "p99_500": fixed["latency_ms"].get("p99"),
                "overloaded_500": fixed["overloaded"],
                "session_cores": sum(v for k, v in cores.items() if k.startswith("session")),
                "machine_cores": cores.get("machine"),
            })
        self.results["workers"] = rows


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure aodm against the minimal pipeline on the same RabbitMQ and PostgreSQL, in an isolated "
                    "vhost and database with the services as real processes. Progress on stderr, tables on stdout.",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="the full run (default): 1M-message store, 10-minute soak; ~25-30 min")
    size.add_argument("--smoke", action="store_true", help="a seconds-long version of every stage (CI)")
    parser.add_argument("--workers", metavar="N,N,...", help="instead: compare session worker counts, e.g. 1,2,4")
    parser.add_argument("--out", default=str(ROOT / "docs"), help="where performance.md/.png and the profile go (default docs/)")
    parser.add_argument("--json", metavar="PATH", help="also write every result (with time series) as JSON")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                        help="py-spy the session worker (default: on for --full when py-spy is installed)")
    parser.add_argument("--soak-seconds", type=float, help="override the soak length")
    parser.add_argument("--store", type=int, help="override the number of messages COPYed in")
    parser.add_argument("--rounds", type=int, help="override the interleaved max-throughput rounds (full: 3)")
    parser.add_argument("--service-log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="the services' AODM_LOG_LEVEL (default info, as deployed)")
    parser.add_argument("--keep-logs", metavar="DIR", help="copy the service and baseline logs here")
    args = parser.parse_args(argv)
    if args.workers:
        try:
            counts = [int(n) for n in args.workers.split(",")]
        except ValueError:
            parser.error("--workers takes a comma-separated list of counts, e.g. 1,2,4")
        if not counts or min(counts) < 1:
            parser.error("--workers counts must be >= 1")
    if args.profile is None:
        args.profile = not args.smoke and not args.workers and profile.py_spy() is not None
    return args


async def _until_terminated(run):
    """SIGTERM cancels the run like Ctrl-C, so its finally blocks stop the services and drop
    the isolated world rather than leave them running."""
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
    return await run


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    cfg = SMOKE if args.smoke else FULL
    if args.soak_seconds:
        cfg = replace(cfg, soak_seconds=args.soak_seconds)
    if args.store is not None:
        cfg = replace(cfg, store=args.store)
    if args.rounds:
        cfg = replace(cfg, rounds=args.rounds)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    bench = Bench(cfg, args)
    try:
        results = asyncio.run(_until_terminated(bench.run()))
    except asyncio.CancelledError:
        say("terminated: services stopped, isolated vhost and database dropped")
        return 128 + signal.SIGTERM
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(report.text(results))
    report.write_markdown(out / "performance.md", results)
    if results["mode"] != "workers" and not report.plot(out / "performance.png", results):
        say("matplotlib not installed (pip install -e '.[bench]'): no plot")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    say(f"written: {out / 'performance.md'}" + ("" if results["mode"] == "workers" else f", {out / 'performance.png'}"))
    return 0
