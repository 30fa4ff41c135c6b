"""A few calls to RabbitMQ's management HTTP API, for what AMQP cannot do (policies).

The API is reached with `AODM_BROKER_ADMIN_URL` (an administrator's credentials in the URL).
Calls block, so callers run them in a thread; every failure is one exception type with the
method, the path and the broker's answer, for the log."""

import base64
import json
import urllib.error
import urllib.parse
import urllib.request

TIMEOUT_S = 3.0


class ManagementUnavailable(Exception):
    """The management API did not do what was asked (unreachable, refused, 4xx, 5xx)."""


def vhost_of(amqp_url: str) -> str:
    """The vhost of an AMQP URL: its path, percent-decoded; "/" when the path is empty."""
    path = urllib.parse.urlsplit(amqp_url).path
    return urllib.parse.unquote(path[1:]) if len(path) > 1 else "/"


class ManagementApi:
    def __init__(self, admin_url: str) -> None:
        parts = urllib.parse.urlsplit(admin_url)
        port = f":{parts.port}" if parts.port else ""
        base = urllib.parse.urlunsplit((parts.scheme, f"{parts.hostname}{port}", parts.path.rstrip("/"), "", ""))
        self._base = base if base.endswith("/api") else base + "/api"
        login = f"{urllib.parse.unquote(parts.username or '')}:{urllib.parse.unquote(parts.password or '')}"
        self._auth = "Basic " + base64.b64encode(login.encode()).decode()

    def put(self, *path: str, body: dict) -> None:
        self._call("PUT", path, body)

    def get(self, *path: str) -> object:
        return json.loads(self._call("GET", path, None) or b"null")

    def delete(self, *path: str) -> None:
        """A missing object is not an error: it is deleted already."""
        self._call("DELETE", path, None, missing_ok=True)

    def _call(self, method: str, path: tuple[str, ...], body: dict | None, missing_ok: bool = False) -> bytes:
        where = "/" + "/".join(urllib.parse.quote(part, safe="") for part in path)  # a vhost may be "/"
        request = urllib.request.Request(
            self._base + where, method=method, data=None if body is None else json.dumps(body).encode()
        )
        request.add_header("Authorization", self._auth)
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            if missing_ok and exc.code == 404:
                return b""
            detail = exc.read()[:200].decode(errors="replace")
            raise ManagementUnavailable(f"{method} {where}: HTTP {exc.code} {detail}") from None
        except (OSError, ValueError) as exc:  # refused, unreachable, timed out, bad URL
            raise ManagementUnavailable(f"{method} {where}: {exc}") from None
