"""Client-side cryptography. Servers never see a plaintext or a private key.

- identity: an Ed25519 signing key (signs envelopes) and an X25519 box key (receives
  sealed session keys);
- session key: 32 random bytes, sealed to each member's box key with a SealedBox;
- message: SecretBox under the session key, encoded as base64url(nonce ‖ ciphertext),
  PyNaCl's combined form.
"""

from dataclasses import dataclass
from pathlib import Path

import msgspec
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox
from nacl.secret import SecretBox
from nacl.signing import SigningKey
from nacl.utils import random

from aodm.encoding import b64decode, b64encode
from aodm.envelope import address_of
from aodm.errors import MalformedRequest

__all__ = [
    "DecryptionFailed",
    "Identity",
    "new_session_key",
    "seal_session_key",
    "open_sealed",
    "open_session_key",
    "encrypt",
    "decrypt",
    # re-exported for clients: the wire's encoding of keys and ciphertexts
    "b64decode",
    "b64encode",
]


class DecryptionFailed(Exception):
    """A sealed value or a message does not open with this key (wrong key, or tampered)."""


@dataclass(frozen=True)
class Identity:
    """A user's two private keys: Ed25519 `signing_key` (its public half is the address that
    owns handles) and X25519 `box_key` (session keys are sealed to its public half)."""

    signing_key: SigningKey
    box_key: PrivateKey

    @classmethod
    def generate(cls) -> "Identity":
        """A new identity from fresh random keys."""
        return cls(SigningKey.generate(), PrivateKey.generate())

    @property
    def address(self) -> str:
        """The signing key's public half in base64url: the Owner of every envelope."""
        return address_of(bytes(self.signing_key.verify_key))

    @property
    def sign_public(self) -> str:
        """The same as `address` (the registry's SignKey)."""
        return self.address

    @property
    def box_public(self) -> str:
        """The box key's public half in base64url (the registry's BoxKey)."""
        return b64encode(bytes(self.box_key.public_key))

    def to_json(self) -> bytes:
        """Both private keys as JSON (the identity file's form): keep it secret."""
        return msgspec.json.encode(
            {"SigningSeed": b64encode(bytes(self.signing_key)), "BoxSecret": b64encode(bytes(self.box_key))}
        )

    @classmethod
    def from_json(cls, data: bytes) -> "Identity":
        """The identity `to_json` wrote (`MalformedRequest` on a bad key encoding)."""
        raw = msgspec.json.decode(data, type=dict[str, str])
        return cls(
            SigningKey(b64decode(raw["SigningSeed"], field="SigningSeed", length=32)),
            PrivateKey(b64decode(raw["BoxSecret"], field="BoxSecret", length=32)),
        )

    def save(self, path: Path) -> None:
        """Write `to_json` to `path`; a new file is created readable by its owner only (0600)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600, exist_ok=True)
        path.write_bytes(self.to_json())

    @classmethod
    def load(cls, path: Path) -> "Identity":
        """The identity saved at `path`."""
        return cls.from_json(path.read_bytes())


def new_session_key() -> bytes:
    """32 random bytes: a SecretBox key for one generation of a session."""
    return random(SecretBox.KEY_SIZE)


def seal_session_key(session_key: bytes, box_public: str) -> str:
    """`session_key` in a SealedBox to a member's box key (base64url): only it opens it."""
    recipient = PublicKey(b64decode(box_public, field="BoxKey", length=32))
    return b64encode(SealedBox(recipient).encrypt(session_key))


def open_sealed(sealed: str, box_key: PrivateKey) -> bytes:
    """Open any SealedBox sealed to this identity (a session key, the issued broker password)."""
    try:
        return SealedBox(box_key).decrypt(b64decode(sealed, field="sealed value"))
    except (CryptoError, MalformedRequest) as exc:
        raise DecryptionFailed("the value was not sealed to this identity") from exc


def open_session_key(sealed: str, box_key: PrivateKey) -> bytes:
    """Open a sealed session key, and check that it is one (`DecryptionFailed` if not)."""
    key = open_sealed(sealed, box_key)
    if len(key) != SecretBox.KEY_SIZE:
        raise DecryptionFailed(f"a session key is {SecretBox.KEY_SIZE} bytes, this one {len(key)}")
    return key


def encrypt(session_key: bytes, plaintext: str, *, nonce: bytes | None = None) -> str:
    """A message's Content: base64url(nonce ‖ SecretBox ciphertext) of `plaintext`'s UTF-8.
    `nonce` is for test vectors only; by default a random one is drawn."""
    box = SecretBox(session_key)
    sealed = box.encrypt(plaintext.encode(), nonce) if nonce is not None else box.encrypt(plaintext.encode())
    return b64encode(bytes(sealed))


def decrypt(session_key: bytes, content: str) -> str:
    """The plaintext of an `encrypt`ed Content (`DecryptionFailed` if it does not open)."""
    try:
        return SecretBox(session_key).decrypt(b64decode(content, field="Content")).decode()
    except (CryptoError, UnicodeDecodeError, MalformedRequest) as exc:
        raise DecryptionFailed("message does not open with this session key") from exc
