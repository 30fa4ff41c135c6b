"""A handle's devices and the signed log that lists them (protocol §10.8).

A handle has one or more devices, each with its own Ed25519 signing key and X25519 box
key, and may have recovery keys (a signing key kept offline that can only add and remove
devices). Every change is an entry of the handle's append-only device log:

- entry 1 is the registration, `{"Op":"register","Handle":…,"SignKey":…,"BoxKey":…}`,
  made by the registry (a client trusts it as it trusts QueryHandle: on first use);
- every later entry is the signed envelope of the `AddDevice` or `RemoveDevice` that made
  it, chained to the entry before by its `Prev` (SHA-256 of that entry's bytes), signed by
  a device (or recovery key) current at that point; an added key also signs its own claim
  (`Proof`), so nobody is added without holding the key.

`DeviceLog.apply` is the one rule book: the registry applies it to each new entry, and a
client replays a whole log with `verify_log` to learn, without trusting the server, which
devices a handle has now."""

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import msgspec
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from aodm import envelope as envelopes
from aodm.encoding import b64decode, b64encode
from aodm.errors import Forbidden, InvalidArgument, MalformedRequest, Unauthorized
from aodm.registry_api import REGISTRY_TARGET, AddDevice, DeviceKeys, RemoveDevice

__all__ = [
    "CLAIM_DOMAIN",
    "Device",
    "DeviceLog",
    "device_id",
    "claim_bytes",
    "sign_claim",
    "entry_hash",
    "genesis_entry",
    "verify_log",
    "device_code",
    "read_device_code",
]

CLAIM_DOMAIN = "aodm-device-v1"
Kind = Literal["device", "recovery"]


def device_id(sign_key: bytes) -> str:
    """A device's name within its handle: the first 16 hex digits of SHA-256(SignKey)."""
    return hashlib.sha256(sign_key).hexdigest()[:16]


def claim_bytes(handle: str, keys: DeviceKeys) -> bytes:
    """What a new key signs to be added to `handle` (its `Proof`)."""
    return "\n".join([CLAIM_DOMAIN, handle, keys.sign_key, keys.box_key or "", keys.kind]).encode()


def sign_claim(signing_key: SigningKey, handle: str, keys: DeviceKeys) -> str:
    return b64encode(signing_key.sign(claim_bytes(handle, keys)).signature)


def entry_hash(entry: bytes) -> str:
    return b64encode(hashlib.sha256(entry).digest())


class _Genesis(msgspec.Struct, forbid_unknown_fields=True, rename="pascal"):
    op: Literal["register"]
    handle: str
    sign_key: str
    box_key: str


def genesis_entry(handle: str, sign_key: str, box_key: str) -> bytes:
    """Entry 1 of every handle's log (the registry migrates handles from before the same way)."""
    return msgspec.json.encode(_Genesis("register", handle, sign_key, box_key))


@dataclass(frozen=True)
class Device:
    device_id: str
    kind: Kind
    sign_key: str  # base64url
    box_key: str | None  # base64url; None for a recovery key
    added_seq: int


@dataclass(frozen=True)
class DeviceLog:
    """A handle's log as replayed up to `seq`: its current devices, every key it ever
    named (a removed key is never taken back), and the hash the next entry must name."""

    handle: str
    seq: int = 0
    head: str = ""
    devices: dict[str, Device] = field(default_factory=dict)
    ever: frozenset[str] = frozenset()

    def signer(self, owner: str, action: str) -> Device:
        """The current device (or, to change devices, recovery key) that signed as `owner`."""
        found = self.devices.get(device_id(b64decode(owner, field="Owner", length=32)))
        if found is None or found.sign_key != owner:
            raise Unauthorized(f"the key that signed is no current device of {self.handle!r}")
        if found.kind == "recovery" and action not in ("AddDevice", "RemoveDevice"):
            raise Unauthorized("a recovery key may only add and remove devices")
        return found

    def apply(self, entry: bytes) -> "DeviceLog":
        """The log after `entry`; a typed error, and no change, if the entry may not follow."""
        if self.seq == 0:
            return self._register(entry)
        env = envelopes.decode(entry)
        envelopes.verify(env)
        if env.from_ != self.handle or env.target != REGISTRY_TARGET:
            raise InvalidArgument(f"a log entry of {env.from_!r} to {env.target!r} in the log of {self.handle!r}")
        signer = self.signer(env.owner, env.action)
        if env.action == "AddDevice":
            return self._add(_decode(env.data, AddDevice), entry)
        if env.action == "RemoveDevice":
            return self._remove(_decode(env.data, RemoveDevice), signer, entry)
        raise InvalidArgument(f"{env.action} is no device log entry")

    def _next(self, entry: bytes, prev: str, devices: dict[str, Device], ever: frozenset[str]) -> "DeviceLog":
        if prev != self.head:
            raise InvalidArgument(f"Prev names another head of {self.handle!r}'s device log (it is at entry {self.seq})")
        return replace(self, seq=self.seq + 1, head=entry_hash(entry), devices=devices, ever=ever)

    def _register(self, entry: bytes) -> "DeviceLog":
        first = _decode(entry, _Genesis)
        if first.handle != self.handle:
            raise InvalidArgument(f"the log of {self.handle!r} begins with {first.handle!r}")
        key = b64decode(first.sign_key, field="SignKey", length=32)
        device = Device(device_id(key), "device", first.sign_key, first.box_key, 1)
        return replace(self, seq=1, head=entry_hash(entry), devices={device.device_id: device},
                       ever=frozenset({device.device_id}))

    def _add(self, req: AddDevice, entry: bytes) -> "DeviceLog":
        keys = req.device
        key = b64decode(keys.sign_key, field="SignKey", length=32)
        if (keys.kind == "device") != (keys.box_key is not None):
            raise InvalidArgument("a device has a BoxKey and a recovery key none")
        if keys.box_key is not None:
            b64decode(keys.box_key, field="BoxKey", length=32)
        try:
            VerifyKey(key).verify(claim_bytes(self.handle, keys), b64decode(req.proof, field="Proof", length=64))
        except BadSignatureError:
            # invalid_argument, not invalid_signature: the envelope itself is well signed
            raise InvalidArgument("Proof is not the new key's signature of its claim") from None
        new = device_id(key)
        if new in self.ever:
            raise InvalidArgument(f"device {new} was a device of {self.handle!r} before: a key is never taken back")
        device = Device(new, keys.kind, keys.sign_key, keys.box_key, self.seq + 1)
        return self._next(entry, req.prev, {**self.devices, new: device}, self.ever | {new})

    def _remove(self, req: RemoveDevice, signer: Device, entry: bytes) -> "DeviceLog":
        if req.device_id not in self.devices:
            raise InvalidArgument(f"{self.handle!r} has no device {req.device_id!r}")
        if req.device_id == signer.device_id:
            raise Forbidden("a device is removed by another device (or a recovery key), not by itself")
        left = {k: v for k, v in self.devices.items() if k != req.device_id}
        if not any(d.kind == "device" for d in left.values()):
            raise InvalidArgument(f"{self.handle!r} would keep no device")
        return self._next(entry, req.prev, left, self.ever)


def _decode(data: str | bytes, kind: type[msgspec.Struct]) -> Any:
    try:
        return msgspec.json.decode(data, type=kind)
    except msgspec.DecodeError as exc:
        raise MalformedRequest(f"a device log entry: {exc}") from None


def verify_log(handle: str, entries: list[bytes]) -> DeviceLog:
    """Replay a handle's whole log (every entry from the first): the devices it has now.
    Raises the typed error of the first entry that may not follow."""
    log = DeviceLog(handle)
    for entry in entries:
        log = log.apply(entry)
    return log


class _Code(msgspec.Struct, forbid_unknown_fields=True, rename="pascal"):
    handle: str
    device: DeviceKeys
    proof: str


def device_code(handle: str, signing_key: SigningKey, box_public: str | None) -> str:
    """What a person carries from a new device to one already added (`aodm device add`):
    the new keys and their signed claim, as one base64url string."""
    keys = DeviceKeys(b64encode(bytes(signing_key.verify_key)), box_public, "device" if box_public else "recovery")
    return b64encode(msgspec.json.encode(_Code(handle, keys, sign_claim(signing_key, handle, keys))))


def read_device_code(code: str) -> tuple[str, DeviceKeys, str]:
    """(handle, keys, proof) of a `device_code`; MalformedRequest if it is not one."""
    try:
        decoded = msgspec.json.decode(b64decode(code.strip(), field="device code"), type=_Code)
    except msgspec.DecodeError as exc:
        raise MalformedRequest(f"not a device code: {exc}") from None
    return decoded.handle, decoded.device, decoded.proof
