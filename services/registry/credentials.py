"""Per-handle broker users, issued through the RabbitMQ management HTTP API.

With `AODM_BROKER_ADMIN_URL` set, `Register` and `IssueBrokerCredentials` (re)create the
handle's own broker user `<AODM_BROKER_USER_PREFIX><handle>` with a fresh random password
and these permissions on the deployment's vhost (docs/security.md):

    configure ^$                      declare, bind, delete nothing
    write     ^aodm\\.requests$        publish requests only
    read      ^aodm\\.inbox\\.<handle>$  consume its own notification queue only

The password goes back to the registrant sealed to its box key, so only the holder of the
handle's private box key can read it (the registry keeps no copy; the reply stored for
deduplication holds only the sealed form).

Every failure of the management API (unreachable, timeout, 5xx, refused admin credentials,
missing vhost) is an infrastructure fault, never the request's: it raises
`BrokerAdminUnavailable`, a `shared.db.DependencyUnavailable`, which the request loop
retries like a database outage, so the request waits for the API.
"""

import asyncio
import base64
import json
import secrets
import urllib.error
import urllib.parse
import urllib.request

from nacl.public import PublicKey, SealedBox

from shared.config import Settings
from shared.db import DependencyUnavailable
from shared.encoding import b64encode
from shared.logs import log
from shared.topology import REQUESTS, inbox_queue
from shared.transport import url_user

HTTP_TIMEOUT_S = 3.0  # two calls per issue, well inside the request loop's handler timeout (10 s)


class BrokerAdminUnavailable(DependencyUnavailable):
    """The management API did not do what was asked: retried, never the request's fault."""


def vhost_of(amqp_url: str) -> str:
    """The vhost of an AMQP URL: its path, percent-decoded; "/" when the path is empty."""
    path = urllib.parse.urlsplit(amqp_url).path
    return urllib.parse.unquote(path[1:]) if len(path) > 1 else "/"


def _exact(name: str) -> str:
    return "^" + name.replace(".", "\\.") + "$"


# The public bootstrap user (its password is not a secret): publish requests and get their
# replies through direct reply-to, which needs no read permission; read no queue at all.
PUBLIC_PERMISSIONS = {"configure": "^$", "write": _exact(REQUESTS), "read": "^$"}


def permissions_for(handle: str) -> dict[str, str]:
    """A handle's own user: the public user's rights plus reading its own notification
    queue. Handles are [a-z0-9_-] only, so the dots are the only characters to escape."""
    return {**PUBLIC_PERMISSIONS, "read": _exact(inbox_queue(handle))}


def seal(password: str, box_key: bytes) -> str:
    return b64encode(SealedBox(PublicKey(box_key)).encrypt(password.encode()))


class Issuer:
    """Creates or updates broker users; one per registry process."""

    def __init__(self, admin_url: str, vhost: str, prefix: str, reserved: set[str],
                 limits: dict[str, int] | None = None) -> None:
        parts = urllib.parse.urlsplit(admin_url)
        self._base = urllib.parse.urlunsplit(
            (parts.scheme, parts.hostname + (f":{parts.port}" if parts.port else ""), parts.path.rstrip("/"), "", "")
        )
        if not self._base.endswith("/api"):
            self._base += "/api"
        user, password = urllib.parse.unquote(parts.username or ""), urllib.parse.unquote(parts.password or "")
        self._auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.vhost = vhost
        self.prefix = prefix
        self._reserved = reserved  # names that must never be reissued (the services' own user)
        # RabbitMQ user limits for every issued user (max-connections, max-channels): a
        # handle's own login cannot hold the broker's sockets and channels.
        self.limits = limits or {}

    @classmethod
    def from_settings(cls, settings: Settings) -> "Issuer | None":
        if not settings.broker_admin_url:
            return None
        reserved = {url_user(settings.amqp_url), url_user(settings.broker_admin_url)}
        limits = {"max-connections": settings.broker_user_max_connections,
                  "max-channels": settings.broker_user_max_channels}
        return cls(settings.broker_admin_url, settings.broker_vhost or vhost_of(settings.amqp_url),
                   settings.broker_user_prefix, reserved, limits)

    def user_for(self, handle: str) -> str:
        return self.prefix + handle

    async def issue(self, handle: str) -> tuple[str, str]:
        """Create the handle's user, or give it a new password; set its permissions.
        Returns (user, password). Connections already open stay open (docs/security.md)."""
        user = self.user_for(handle)
        if user in self._reserved:
            raise BrokerAdminUnavailable(f"refusing to issue {user!r}: it is a service user (check AODM_BROKER_USER_PREFIX)")
        password = secrets.token_urlsafe(24)
        await asyncio.to_thread(self._issue, user, password, permissions_for(handle))
        log.info("broker user issued", user=user, vhost=self.vhost)
        return user, password

    def _issue(self, user: str, password: str, permissions: dict[str, str]) -> None:
        name = urllib.parse.quote(user, safe="")
        self._call("PUT", f"/users/{name}", {"password": password, "tags": ""})
        self._call("PUT", f"/permissions/{urllib.parse.quote(self.vhost, safe='')}/{name}", permissions)
        for limit, value in self.limits.items():
            self._call("PUT", f"/user-limits/{name}/{limit}", {"value": value})

    async def delete(self, user: str) -> None:
        """For operators and tests; a missing user is not an error."""
        await asyncio.to_thread(self._call, "DELETE", f"/users/{urllib.parse.quote(user, safe='')}", None, {404})

    def _call(self, method: str, path: str, body: dict | None, ok: set[int] = frozenset()) -> None:
        request = urllib.request.Request(
            self._base + path, method=method, data=None if body is None else json.dumps(body).encode()
        )
        request.add_header("Authorization", self._auth)
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            if exc.code in ok:
                return
            detail = exc.read()[:200].decode(errors="replace")
            raise BrokerAdminUnavailable(f"management API {method} {path}: HTTP {exc.code} {detail}") from None
        except (OSError, ValueError) as exc:  # refused, unreachable, timed out, bad URL
            raise BrokerAdminUnavailable(f"management API {method} {path}: {exc}") from None
