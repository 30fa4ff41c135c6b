"""The benchmark's own world: a RabbitMQ vhost and a PostgreSQL database made for the run and
dropped after it, the services as real processes (tests/processes.py), and /proc readings
(CPU time, VmRSS) of every process that matters.

The vhost and database come from tests/isolation.py, which the test suite uses too."""

import asyncio
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from aodm import topology
from aodm.transport import BrokerError, Bus
from shared import config
from tests import isolation
from tests.isolation import DATABASE_BASE, MANAGEMENT, management  # noqa: F401 (used by bench.run)
from tests.processes import ROOT, ServiceProcess

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@asynccontextmanager
async def isolated_settings(**overrides):
    """The benchmark's own vhost and database (aodm-bench-*), dropped afterwards."""
    async with isolation.isolated_settings("aodm-bench", **overrides) as settings:
        yield settings


# -- /proc ----------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process, in seconds (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    return (total - idle) / CLOCK_TICKS, total / CLOCK_TICKS


def pids_named(comm: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().strip() == comm:
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


@dataclass
class CpuSnapshot:
    at: float
    machine_busy: float
    machine_total: float
    processes: dict[str, float]


class CpuMeter:
    """CPU seconds of named process groups between two snapshots. `broker` and `postgres`
    are shared with everyone else on the machine, so they count other people's work too."""

    def __init__(self, groups: "callable") -> None:
        self._groups = groups  # () -> {label: [pid, ...]}

    def snapshot(self) -> CpuSnapshot:
        busy, total = machine_cpu()
        processes = {}
        for label, pids in self._groups().items():
            processes[label] = {pid: cpu_seconds(pid) for pid in pids}
        return CpuSnapshot(time.monotonic(), busy, total, processes)

    @staticmethod
    def between(a: CpuSnapshot, b: CpuSnapshot) -> dict:
        """Cores used on average by each group (only pids alive at both ends count)."""
        wall = max(b.at - a.at, 1e-9)
        used = {}
        for label, after in b.processes.items():
            before = a.processes.get(label, {})
            seconds = sum(after[p] - before[p] for p in after if after[p] is not None and before.get(p) is not None)
            used[label] = seconds / wall
        cores = os.cpu_count() or 1
        used["machine"] = (b.machine_busy - a.machine_busy) / max(b.machine_total - a.machine_total, 1e-9) * cores
        return used


# -- services as processes -------------------------------------------------------------------


@dataclass
class Stack:
    """The three services (N session workers) as real processes in an isolated world."""

    settings: config.Settings
    log_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, ServiceProcess] = field(default_factory=dict)

    def spawn(self, name: str, key: str | None = None) -> ServiceProcess:
        proc = ServiceProcess(name, self.settings, self.log_dir, **self.env).start()
        self.procs[key or name] = proc
        return proc

    def sessions(self) -> list[ServiceProcess]:
        return [p for k, p in sorted(self.procs.items()) if k.startswith("session") and p.alive]

    def pids(self) -> dict[str, int]:
        return {key: p.proc.pid for key, p in self.procs.items() if p.alive}

    def check_alive(self) -> None:
        for key, proc in self.procs.items():
            if not proc.alive:
                raise RuntimeError(f"service {key} exited ({proc.proc.returncode}):\n{proc.log()[-3000:]}")

    async def set_session_workers(self, n: int, bus: Bus, timeout: float = 60) -> None:
        for key in [k for k in self.procs if k.startswith("session")]:
            proc = self.procs.pop(key)
            if proc.alive:
                proc.terminate()
        for i in range(n):
            self.spawn("session", f"session-{i + 1}")
        await self.wait_balanced(bus, timeout)

    async def wait_balanced(self, bus: Bus, timeout: float = 60) -> None:
        """Every shard consumed, and the live workers' latest holdings add up to a fair split."""
        shards = self.settings.session_shards
        workers = self.sessions()
        share = math.ceil(shards / max(1, len(workers)))
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            held = [_latest_held(w.log_path) for w in workers]
            counts = [await bus.consumer_count(topology.shard_queue(s)) for s in range(shards)]
            if all(c == 1 for c in counts) and all(h is not None and len(h) <= share for h in held) \
                    and sum(len(h) for h in held) == shards:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"session shards not balanced: consumers {counts}, held {held}")
            await asyncio.sleep(0.3)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.alive:
                try:
                    proc.terminate(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()


def _latest_held(path: Path) -> list[int] | None:
    """The shards a worker holds according to its own log (the last 'shard ...' line)."""
    held = None
    try:
        with path.open("rb") as f:
            for line in f:
                if b'"shard ' in line:
                    try:
                        held = json.loads(line).get("held", held)
                    except ValueError:
                        pass
    except FileNotFoundError:
        return None
    return held


async def wait_ready(settings: config.Settings, stack: Stack | None, timeout: float = 60) -> None:
    """Ready when the registry answers and every shard and the notifier queue have a consumer."""
    from aodm.client import Client
    from aodm.crypto import Identity
    from aodm.errors import NotFound

    client = await Client.connect(settings.amqp_url, Identity.generate(), timeout=2)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if stack is not None:
                stack.check_alive()
            try:
                await client.query_handle("nobody-here")
            except NotFound:
                queues = [topology.shard_queue(s) for s in range(settings.session_shards)] + [topology.NOTIFIER_QUEUE]
                if all([await client.bus.consumer_count(q) >= 1 for q in queues]):
                    return
            except Exception:
                if time.monotonic() > deadline:
                    raise
            if time.monotonic() > deadline:
                raise TimeoutError("services not ready")
            await asyncio.sleep(0.2)
    finally:
        await client.close()


async def wait_empty(bus: Bus, queues: list[str], timeout: float) -> bool:
    """Wait for a backlog to drain; False if it did not within the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            counts = [await bus.message_count(q) for q in queues]
        except BrokerError:  # the connection is being re-established (a missed heartbeat under load)
            counts = [1]
        if not any(counts):
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.2)


class LogDir:
    """Service logs for the run, in a temporary directory kept only when asked."""

    def __init__(self, keep: Path | None) -> None:
        self.keep = keep
        self.path = Path(tempfile.mkdtemp(prefix="aodm-bench-"))

    def close(self) -> None:
        if self.keep is not None:
            self.keep.mkdir(parents=True, exist_ok=True)
            for item in self.path.iterdir():
                shutil.copy2(item, self.keep / item.name)
        shutil.rmtree(self.path, ignore_errors=True)


def start_python(module: str, env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """A helper process of the benchmark (the baseline), run from the repository root."""
    log = log_path.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", module], cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT
    )
