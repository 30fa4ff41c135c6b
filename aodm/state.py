"""The command line's files: the identity (private keys) and a small state file beside it.

The state only saves typing (the default handle, the session id of each chat); the
registry stays the source of truth, so a lost or stale state file costs nothing but a
lookup. It records the identity's address, and is ignored when the identity changes.

It keeps, per handle, where `aodm listen` got to in each chat: the newest message it
showed (`Seq` and `Timestamp`), so the next `listen` shows every message since, also those
whose notifications a full inbox dropped (aodm/catchup.py). Lost, it costs only a catch-up
of each chat's last page.

It also keeps each handle's own broker login (user and password, issued at `register` or by
`aodm credentials`; docs/security.md). That one is a secret like the identity: the file is
mode 600, and losing it costs an `aodm credentials`, which issues a new password.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from aodm.crypto import Identity


class CliError(Exception):
    """A problem the user can fix; the CLI prints its message as one line and exits 1.
    `code` names it for scripts (`--json` errors carry it)."""

    def __init__(self, message: str, code: str = "error") -> None:
        super().__init__(message)
        self.code = code


def identity_path(explicit: str | None) -> Path:
    """--identity, else $AODM_IDENTITY, else ~/.config/aodm/identity.json."""
    raw = explicit or os.environ.get("AODM_IDENTITY") or "~/.config/aodm/identity.json"
    return Path(raw).expanduser()


def state_path(identity: Path) -> Path:
    """`state.json` beside `identity.json`; `<name>.state.json` beside any other name, so
    two identities kept in one folder do not share a state."""
    name = "state.json" if identity.name == "identity.json" else f"{identity.stem}.state.json"
    return identity.with_name(name)


def create_identity(path: Path, force: bool) -> Identity:
    """Refuses to overwrite: the old file is the only copy of its private keys."""
    if path.exists() and not force:
        raise CliError(f"{path} already exists; pass --force to replace it (its handles become unusable)",
                       "identity_exists")
    identity = Identity.generate()
    identity.save(path)
    path.chmod(0o600)
    return identity


def load_identity(path: Path) -> Identity:
    if not path.exists():
        raise CliError(f"no identity at {path}; create one with `aodm identity new` (or pass --identity PATH)",
                       "no_identity")
    try:
        return Identity.from_json(path.read_bytes())
    except Exception as exc:  # any decoding problem means the same thing to the user
        raise CliError(f"{path} is not a readable aodm identity: {exc}", "bad_identity") from None


Cursors = dict[str, dict[str, dict[str, int]]]  # handle -> session id -> {"seq", "timestamp"}


@dataclass
class State:
    path: Path
    address: str
    default_handle: str | None = None
    sessions: dict[str, dict[str, str]] = field(default_factory=dict)
    brokers: dict[str, dict[str, str]] = field(default_factory=dict)  # handle -> {"user", "password"}
    cursors: Cursors = field(default_factory=dict)  # where `listen` got to in each chat

    @classmethod
    def load(cls, identity_file: Path, identity: Identity) -> "State":
        """A missing, unreadable or other identity's state starts empty rather than failing."""
        path = state_path(identity_file)
        return cls._read(path, identity.address) or cls(path, identity.address)

    @classmethod
    def _read(cls, path: Path, address: str) -> "State | None":
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(raw, dict) or raw.get("address") != address:
            return None
        brokers = raw.get("brokers")
        brokers = {
            handle: login for handle, login in (brokers.items() if isinstance(brokers, dict) else ())
            if isinstance(login, dict) and isinstance(login.get("user"), str) and isinstance(login.get("password"), str)
        }
        sessions = raw.get("sessions") or {}
        return cls(path, address, raw.get("default_handle"), sessions, brokers, _cursors(raw.get("cursors")))

    def save(self) -> None:
        """Written to a temporary file and renamed, so a crash never leaves half a file. The
        cursors merge with the file's, the newest of each chat kept: a `listen` running
        meanwhile may have taken one further than this copy knows."""
        on_disk = State._read(self.path, self.address)
        if on_disk is not None:
            _take_newer(self.cursors, on_disk.cursors)
        body = {
            "address": self.address, "default_handle": self.default_handle, "sessions": self.sessions,
            "brokers": self.brokers, "cursors": self.cursors,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(body, indent=2) + "\n")
        tmp.chmod(0o600)
        tmp.replace(self.path)

    def remember_broker(self, handle: str, user: str, password: str) -> None:
        self.brokers[handle] = {"user": user, "password": password}
        self.save()

    def remember_session(self, handle: str, peer: str, session_id: str) -> None:
        if self.sessions.get(handle, {}).get(peer) != session_id:
            self.sessions.setdefault(handle, {})[peer] = session_id
            self.save()

    def cursors_of(self, handle: str) -> dict[str, tuple[int, int]]:
        """session id -> (seq, timestamp) of the newest message `listen` showed there."""
        return {session: (c["seq"], c["timestamp"]) for session, c in self.cursors.get(handle, {}).items()}

    def remember_cursors(self, handle: str, cursors: dict[str, tuple[int, int]]) -> None:
        """Into the file as it is now: `listen` runs for long, and must not write back its
        old copy of what other commands changed meanwhile (a new broker password)."""
        on_disk = State._read(self.path, self.address)
        if on_disk is not None:
            self.default_handle, self.sessions, self.brokers = on_disk.default_handle, on_disk.sessions, on_disk.brokers
        _take_newer(self.cursors, {handle: {s: {"seq": q, "timestamp": t} for s, (q, t) in cursors.items()}})
        self.save()


def _take_newer(mine: Cursors, other: Cursors) -> None:
    for handle, chats in other.items():
        for session, cursor in chats.items():
            known = mine.setdefault(handle, {}).get(session)
            if known is None or cursor["seq"] > known["seq"]:
                mine[handle][session] = cursor


def _cursors(raw: object) -> Cursors:
    """The well-formed cursors of a state file; anything else is dropped (a catch-up of a
    chat's last page is all that costs)."""
    def fine(value: object) -> bool:
        return type(value) is int and 0 <= value < 2**63

    if not isinstance(raw, dict):
        return {}
    return {
        handle: {
            session: {"seq": c["seq"], "timestamp": c["timestamp"]}
            for session, c in chats.items()
            if isinstance(c, dict) and fine(c.get("seq")) and c["seq"] >= 1 and fine(c.get("timestamp"))
        }
        for handle, chats in raw.items() if isinstance(chats, dict)
    }
