"""A tiny HTTP endpoint per service: /healthz (alive), /readyz (broker and database
connected and consuming) and /metrics (Prometheus text). Run as a module it is the
container healthcheck probe: `python -m shared.health http://127.0.0.1:8080/readyz`."""

import asyncio
import sys
import urllib.request
from collections.abc import Callable


class HealthServer:
    def __init__(self, ready: Callable[[], bool], metrics: Callable[[], str]) -> None:
        self._ready = ready
        self._metrics = metrics
        self._server: asyncio.Server | None = None

    async def start(self, port: int, host: str = "0.0.0.0") -> int:
        self._server = await asyncio.start_server(self._serve, host, port)
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), timeout=5)
            path = request.split()[1].decode() if len(request.split()) > 1 else "/"
            status, body, kind = self._route(path)
            head = f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, IndexError):
            pass
        finally:
            writer.close()

    def _route(self, path: str) -> tuple[str, bytes, str]:
        if path == "/healthz":
            return "200 OK", b"ok\n", "text/plain"
        if path == "/readyz":
            return ("200 OK", b"ready\n", "text/plain") if self._ready() else ("503 Service Unavailable", b"not ready\n", "text/plain")
        if path == "/metrics":
            return "200 OK", self._metrics().encode(), "text/plain; version=0.0.4"
        return "404 Not Found", b"not found\n", "text/plain"


def probe(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return 0 if response.status == 200 else 1
    except OSError:
        return 1


if __name__ == "__main__":
    sys.exit(probe(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080/readyz"))
