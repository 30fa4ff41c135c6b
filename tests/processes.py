"""Real service processes for the tests that kill and restart them."""

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class ServiceProcess:
    def __init__(self, name: str, settings, log_dir: Path, **env: str) -> None:
        self.name = name
        self.settings = settings
        self.log_path = log_dir / f"{name}-{id(self)}.log"
        self.env = env
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ServiceProcess":
        env = {
            **os.environ,
            "AODM_AMQP_URL": self.settings.amqp_url,
            "AODM_DATABASE_URL": self.settings.database_url,
            "AODM_SESSION_SHARDS": str(self.settings.session_shards),
            "AODM_LOG_FORMAT": "json",
            **self.env,
        }
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", f"services.{self.name}"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        return self

    def kill(self) -> None:
        """kill -9: no chance to finish, ack or close anything."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def freeze(self) -> None:
        """SIGSTOP: the process holds what it has, answers nothing, sends no heartbeat."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")
