"""The committed test vectors agree with the Python implementation, and cannot drift from it.

Clients in other languages are written against docs/protocol.md and these files, so a change
to the wire format must show up here as a failure, not as a silent incompatibility.
"""

import importlib.util
import json
from pathlib import Path

import msgspec
import pytest
from nacl.public import PrivateKey, SealedBox
from nacl.signing import SigningKey, VerifyKey

from aodm import crypto
from aodm import envelope as envelopes
from aodm.encoding import b64decode, b64encode
from aodm.errors import InvalidSignature, MalformedRequest
from aodm.session_api import SEALED_KEY_BYTES

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "tests" / "vectors"


def load(name: str) -> dict:
    return json.loads((VECTORS / name).read_text(encoding="utf-8"))


def make_vectors():
    spec = importlib.util.spec_from_file_location("make_vectors", ROOT / "scripts" / "make_vectors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


IDENTITIES = load("identity.json")["Identities"]
ENVELOPES = load("envelope.json")["Envelopes"]
SECRETBOX = load("secretbox.json")["Cases"]
SEALED = load("sealed_key.json")
BASE64 = load("base64url.json")


def as_envelope(case: dict) -> envelopes.Envelope:
    """Through the real decoder, so the vector's JSON is also a valid wire body."""
    return envelopes.decode(json.dumps(case["Envelope"], ensure_ascii=False).encode())


@pytest.mark.parametrize("ident", IDENTITIES, ids=lambda i: i["Name"])
def test_identity(ident):
    signing = SigningKey(b64decode(ident["SigningSeed"], length=32))
    box = PrivateKey(b64decode(ident["BoxSecret"], length=32))
    assert b64encode(bytes(signing.verify_key)) == ident["SignPublic"]
    assert envelopes.address_of(bytes(signing.verify_key)) == ident["Address"] == ident["SignPublic"]
    assert crypto.Identity(signing, box).box_public == ident["BoxPublic"]


@pytest.mark.parametrize("case", ENVELOPES, ids=lambda c: c["Name"])
def test_envelope_signing_bytes_signature_and_id(case):
    env = as_envelope(case)
    expected = bytes.fromhex(case["SigningBytesHex"])
    assert envelopes.envelope_signing_bytes(env) == expected
    signature = b64decode(case["Signature"], length=64)
    VerifyKey(b64decode(env.owner, length=32)).verify(expected, signature)
    signing = SigningKey(b64decode(case["SigningSeed"], length=32))
    assert signing.sign(expected).signature == signature  # Ed25519 is deterministic
    assert envelopes.id_from_signature(signature) == case["Id"] == env.id
    assert envelopes.verify(env) == b64decode(env.owner)


@pytest.mark.parametrize("case", ENVELOPES, ids=lambda c: c["Name"])
def test_envelope_json_roundtrips(case):
    assert json.loads(envelopes.encode(as_envelope(case))) == case["Envelope"]


def _other_owner() -> str:
    return b64encode(bytes(SigningKey(b"\x07" * 32).verify_key))


TAMPERINGS = {
    "Target": lambda e: msgspec.structs.replace(e, target=e.target + "x"),
    "From": lambda e: msgspec.structs.replace(e, from_=e.from_ + "x"),
    "Action": lambda e: msgspec.structs.replace(
        e, tags=[envelopes.Tag(t.name, t.value + "x" if t.name == "Action" else t.value) for t in e.tags]
    ),
    "Data": lambda e: msgspec.structs.replace(e, data=e.data + " "),  # still JSON; "{}" has no quote to change
    "Owner": lambda e: msgspec.structs.replace(e, owner=_other_owner()),
    "Timestamp": lambda e: msgspec.structs.replace(e, timestamp=e.timestamp + 1),
}


@pytest.mark.parametrize("case", ENVELOPES, ids=lambda c: c["Name"])
@pytest.mark.parametrize("field", TAMPERINGS)
def test_tampered_envelope_is_rejected(case, field):
    env = TAMPERINGS[field](as_envelope(case))
    with pytest.raises(InvalidSignature):
        envelopes.verify(env)


@pytest.mark.parametrize("case", ENVELOPES, ids=lambda c: c["Name"])
def test_wrong_id_is_rejected(case):
    env = as_envelope(case)
    wrong = msgspec.structs.replace(env, id=envelopes.id_from_signature(b"\x00" * 64))
    with pytest.raises(MalformedRequest):
        envelopes.verify(wrong)


def test_sealed_key_opens():
    recipient = PrivateKey(b64decode(SEALED["RecipientBoxSecret"], length=32))
    assert b64encode(bytes(recipient.public_key)) == SEALED["RecipientBoxPublic"]
    assert len(b64decode(SEALED["SealedKey"])) == SEALED_KEY_BYTES
    assert b64decode(SEALED["SealedKey"]).startswith(b64decode(SEALED["EphemeralPublic"]))
    assert crypto.open_session_key(SEALED["SealedKey"], recipient) == b64decode(SEALED["SessionKey"], length=32)


def test_own_sealing_opens_with_recipient_secret():
    recipient = PrivateKey(b64decode(SEALED["RecipientBoxSecret"], length=32))
    session_key = b64decode(SEALED["SessionKey"], length=32)
    sealed = crypto.seal_session_key(session_key, SEALED["RecipientBoxPublic"])
    assert len(b64decode(sealed)) == SEALED_KEY_BYTES
    assert SealedBox(recipient).decrypt(b64decode(sealed)) == session_key


@pytest.mark.parametrize("case", SECRETBOX, ids=lambda c: c["Name"])
def test_secretbox_content(case):
    key = b64decode(case["SessionKey"], length=32)
    nonce = b64decode(case["Nonce"], length=24)
    assert crypto.decrypt(key, case["Content"]) == case["Plaintext"]
    assert crypto.encrypt(key, case["Plaintext"], nonce=nonce) == case["Content"]
    assert b64decode(case["Content"])[:24] == nonce


@pytest.mark.parametrize("case", BASE64["Accepted"], ids=lambda c: repr(c["Text"]))
def test_base64url_accepted(case):
    assert b64decode(case["Text"]) == bytes.fromhex(case["Hex"])
    assert b64encode(bytes.fromhex(case["Hex"])) == case["Text"]


@pytest.mark.parametrize("case", BASE64["Rejected"], ids=lambda c: repr(c["Text"]))
def test_base64url_rejected(case):
    with pytest.raises(MalformedRequest):
        b64decode(case["Text"])


def test_vectors_are_what_the_generator_builds():
    module = make_vectors()
    built = module.build()
    assert sorted(built) == sorted(p.name for p in VECTORS.glob("*.json"))
    for name, content in built.items():
        assert (VECTORS / name).read_text(encoding="utf-8") == module.render(content), (
            f"{name} drifted; run scripts/make_vectors.py and review the diff"
        )
