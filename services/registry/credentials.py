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
import secrets
from collections.abc import Callable

from nacl.public import PublicKey, SealedBox

from aodm.encoding import b64encode
from aodm.topology import REQUESTS, device_inbox
from aodm.transport import url_user
from shared.config import Settings
from shared.db import DependencyUnavailable
from shared.logs import log
from shared.management import ManagementApi, ManagementUnavailable, vhost_of


class BrokerAdminUnavailable(DependencyUnavailable):
    """The management API did not do what was asked: retried, never the request's fault."""


def _exact(name: str) -> str:
    return "^" + name.replace(".", "\\.") + "$"


# The public bootstrap user (its password is not a secret): publish requests and get their
# replies through direct reply-to, which needs no read permission; read no queue at all.
PUBLIC_PERMISSIONS = {"configure": "^$", "write": _exact(REQUESTS), "read": "^$"}


def permissions_for(queue: str) -> dict[str, str]:
    """A device's own user: the public user's rights plus reading its own notification
    queue. Handles are [a-z0-9_-] and device ids hex only, so the dots are the only
    characters to escape."""
    return {**PUBLIC_PERMISSIONS, "read": _exact(queue)}


def seal(password: str, box_key: bytes) -> str:
    return b64encode(SealedBox(PublicKey(box_key)).encrypt(password.encode()))


class Issuer:
    """Creates or updates broker users; one per registry process."""

    def __init__(self, admin_url: str, vhost: str, prefix: str, reserved: set[str],
                 limits: dict[str, int] | None = None) -> None:
        self._api = ManagementApi(admin_url)  # calls block: each runs in a thread
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

    def user_for(self, handle: str, device_id: str = "", added_seq: int = 1) -> str:
        """The first device's user is the handle's (as before devices existed); every later
        device has its own."""
        return self.prefix + handle + ("" if added_seq == 1 else f".{device_id}")

    async def issue(self, handle: str, device_id: str = "", added_seq: int = 1) -> tuple[str, str]:
        """Create the device's user, or give it a new password; let it read its own queue.
        Returns (user, password). Connections already open stay open (docs/security.md)."""
        user = self.user_for(handle, device_id, added_seq)
        if user in self._reserved:
            raise BrokerAdminUnavailable(f"refusing to issue {user!r}: it is a service user (check AODM_BROKER_USER_PREFIX)")
        password = secrets.token_urlsafe(24)
        queue = device_inbox(handle, device_id, added_seq)
        await asyncio.to_thread(self._issue, user, password, permissions_for(queue))
        log.info("broker user issued", user=user, vhost=self.vhost)
        return user, password

    def _issue(self, user: str, password: str, permissions: dict[str, str]) -> None:
        _unavailable_as_dependency(lambda: self._put_user(user, password, permissions))

    def _put_user(self, user: str, password: str, permissions: dict[str, str]) -> None:
        self._api.put("users", user, body={"password": password, "tags": ""})
        self._api.put("permissions", self.vhost, user, body=permissions)
        for limit, value in self.limits.items():
            self._api.put("user-limits", user, limit, body={"value": value})

    async def delete(self, user: str) -> None:
        """For operators and tests; a missing user is not an error."""
        await asyncio.to_thread(_unavailable_as_dependency, lambda: self._api.delete("users", user))


def _unavailable_as_dependency(call: Callable[[], None]) -> None:
    """The request loop retries a dependency's outage; the API's failure is never the request's."""
    try:
        call()
    except ManagementUnavailable as exc:
        raise BrokerAdminUnavailable(f"management API {exc}") from None
