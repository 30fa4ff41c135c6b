"""A RabbitMQ node and a PostgreSQL cluster of the test's own, for the faults that would
disturb everyone else on the shared ones (restarting the broker, stopping the database).

Both live in a temporary directory, listen on free ports on 127.0.0.1, and are torn down
(stopped, then their files removed) when the context ends, whatever happened.
"""

import asyncio
import os
import secrets
import shutil
import socket
import tempfile
from contextlib import asynccontextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tool(name: str, *dirs: str) -> str:
    """Prefer the real binaries (Debian's /usr/sbin wrappers `su` to another user)."""
    for directory in dirs:
        path = Path(directory) / name
        if path.exists():
            return str(path)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found")
    return found


async def _run(args: list[str], *, env: dict | None = None, timeout: float = 120, check: bool = True) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"{' '.join(args)} took more than {timeout}s") from None
    text = out.decode(errors="replace")
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}: {text[-2000:]}")
    return proc.returncode, text


class PrivateRabbit:
    """A single RabbitMQ node (the hash exchange plugins only, no management listener)."""

    BIN = ("/usr/lib/rabbitmq/bin",)

    def __init__(self, root: Path) -> None:
        self.root = root
        self.node = f"aodm-fault-{secrets.token_hex(3)}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        home = root / "home"
        for d in (home, root / "mnesia", root / "log"):
            d.mkdir(parents=True, exist_ok=True)
        cookie = home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16))
        cookie.chmod(0o400)
        (root / "enabled_plugins").write_text("[rabbitmq_consistent_hash_exchange,rabbitmq_sharding].\n")
        (root / "rabbitmq.conf").write_text(f"listeners.tcp.default = 127.0.0.1:{self.port}\nloopback_users = none\n")
        (root / "rabbitmq-env.conf").write_text("")
        self.env = {
            **os.environ,
            "HOME": str(home),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(root / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(root / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(root / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(root / "rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": str(root / "rabbitmq.pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    async def ctl(self, *args: str, timeout: float = 120, check: bool = True) -> tuple[int, str]:
        return await _run([_tool("rabbitmqctl", *self.BIN), "-n", self.node, *args], env=self.env, timeout=timeout,
                          check=check)

    async def start(self) -> None:
        await _run([_tool("rabbitmq-server", *self.BIN), "-detached"], env=self.env)
        # -detached returns at once; the node registers with epmd a moment later.
        for _ in range(120):
            if (await self.ctl("ping", "--timeout", "5", timeout=30, check=False))[0] == 0:
                break
            await asyncio.sleep(0.5)
        await self.ctl("await_startup", "--timeout", "120", timeout=130)

    async def stop_app(self) -> None:
        await self.ctl("stop_app")

    async def start_app(self) -> None:
        await self.ctl("start_app")
        await self.ctl("await_startup", "--timeout", "60", timeout=70)

    async def shutdown(self) -> None:
        await self.ctl("shutdown", timeout=60, check=False)
        pid_file = self.root / "rabbitmq.pid"
        if pid_file.exists():  # in case it did not go quietly
            try:
                os.kill(int(pid_file.read_text().strip()), 9)
            except (ValueError, ProcessLookupError):
                pass


def _postgres_bins() -> tuple[str, ...]:
    """Debian keeps the server binaries off PATH, one directory per major version."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True) \
        if Path("/usr/lib/postgresql").is_dir() else []
    return tuple(str(v) for v in versions)


def missing(*tools: tuple[str, tuple[str, ...]]) -> str | None:
    """Why a private server cannot be started here (a tool not installed), or None."""
    for name, dirs in tools:
        try:
            _tool(name, *dirs)
        except RuntimeError as exc:
            return str(exc)
    return None


class PrivatePostgres:
    """A PostgreSQL cluster initialised in a temporary directory (trust auth, user root)."""

    BIN = _postgres_bins()

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="aodm-fault-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.url = f"postgresql://root@127.0.0.1:{self.port}/aodm"
        self._as_postgres = os.geteuid() == 0  # postgres refuses to run as root
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")

    def _cmd(self, name: str, *args: str) -> list[str]:
        command = [_tool(name, *self.BIN), *args]
        return ["runuser", "-u", "postgres", "--", *command] if self._as_postgres else command

    async def init(self) -> None:
        await _run(self._cmd("initdb", "-D", str(self.data), "-U", "root", "-A", "trust", "--no-sync"))
        await self.start()

    async def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        await _run(self._cmd("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-o", options, "-w",
                             "-t", "60", "start"))

    async def stop(self, mode: str = "fast") -> None:
        await _run(self._cmd("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop"), check=False)

    def log(self) -> str:
        path = self.root / "log"
        return path.read_text(errors="replace") if path.exists() else ""


RABBIT_TOOLS = (("rabbitmq-server", PrivateRabbit.BIN), ("rabbitmqctl", PrivateRabbit.BIN))
POSTGRES_TOOLS = (("initdb", PrivatePostgres.BIN), ("pg_ctl", PrivatePostgres.BIN))


@asynccontextmanager
async def private_rabbit():
    node = PrivateRabbit(Path(tempfile.mkdtemp(prefix="aodm-fault-rmq-")))
    try:
        await node.start()
        yield node
    finally:
        await node.shutdown()
        shutil.rmtree(node.root, ignore_errors=True)


@asynccontextmanager
async def private_postgres():
    cluster = PrivatePostgres()
    try:
        await cluster.init()
        yield cluster
    finally:
        await cluster.stop("immediate")
        shutil.rmtree(cluster.root, ignore_errors=True)
