"""The committed test vectors agree with the Python implementation, and cannot drift from it.

Clients in other languages are written against docs/protocol.md and these files, so a change
to the wire format must show up here as a failure, not as a silent incompatibility.
"""

import hashlib
import importlib.util
import json
from pathlib import Path

import msgspec
import pytest
from nacl.public import PrivateKey, SealedBox
from nacl.signing import SigningKey, VerifyKey

from aodm import crypto, devices
from aodm import envelope as envelopes
from aodm.encoding import b64decode, b64encode
from aodm.errors import InvalidArgument, InvalidSignature, MalformedRequest
from aodm.registry_api import AddDevice
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
DEVICE_LOG = load("device_log.json")
KEY_BATCH = load("key_batch.json")


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


def _log_entries() -> list[bytes]:
    return [e["Entry"].encode() for e in DEVICE_LOG["Entries"]]  # the entry's bytes: its text, UTF-8


@pytest.mark.parametrize("dev", DEVICE_LOG["Devices"], ids=lambda d: d["Name"])
def test_device_keys_and_id(dev):
    signing = SigningKey(b64decode(dev["SigningSeed"], length=32))
    assert b64encode(bytes(signing.verify_key)) == dev["SignPublic"]
    assert crypto.Identity(signing, PrivateKey(b64decode(dev["BoxSecret"], length=32))).box_public == dev["BoxPublic"]
    assert devices.device_id(bytes(signing.verify_key)) == dev["DeviceId"]
    assert dev["DeviceId"] == hashlib.sha256(b64decode(dev["SignPublic"])).hexdigest()[:16]


def test_device_log_genesis_entry():
    first, entry = DEVICE_LOG["Devices"][0], DEVICE_LOG["Entries"][0]
    assert devices.genesis_entry(DEVICE_LOG["Handle"], first["SignPublic"], first["BoxPublic"]) == entry["Entry"].encode()
    assert devices.entry_hash(entry["Entry"].encode()) == entry["Hash"]
    assert entry["Hash"] == b64encode(hashlib.sha256(entry["Entry"].encode()).digest())


def test_device_log_add_device_entry():
    handle = DEVICE_LOG["Handle"]
    first, second = DEVICE_LOG["Devices"]
    genesis, added = DEVICE_LOG["Entries"]
    env = envelopes.decode(added["Entry"].encode())
    assert json.loads(added["Entry"]) == added["Envelope"]
    assert (env.target, env.from_, env.owner, env.action) == ("registry", handle, first["SignPublic"], "AddDevice")
    envelopes.verify(env)
    signer = SigningKey(b64decode(first["SigningSeed"], length=32))
    rebuilt = envelopes.sign(signer, target=env.target, from_=env.from_, action="AddDevice", data=env.data,
                             anchor=env.anchor, timestamp=env.timestamp)
    assert envelopes.encode(rebuilt) == added["Entry"].encode()  # the entry is the envelope's own encoding
    add = msgspec.json.decode(env.data, type=AddDevice)
    assert json.loads(env.data) == added["Data"]
    assert (add.device.sign_key, add.device.box_key, add.device.kind) == (second["SignPublic"], second["BoxPublic"], "device")
    assert add.prev == added["Prev"] == genesis["Hash"] == devices.entry_hash(genesis["Entry"].encode())
    claim = devices.claim_bytes(handle, add.device)
    assert claim == added["Claim"].encode() == bytes.fromhex(added["ClaimHex"])
    assert claim == f"aodm-device-v1\n{handle}\n{second['SignPublic']}\n{second['BoxPublic']}\ndevice".encode()
    assert add.proof == added["Proof"]
    VerifyKey(b64decode(second["SignPublic"], length=32)).verify(claim, b64decode(added["Proof"], length=64))
    new_key = SigningKey(b64decode(second["SigningSeed"], length=32))
    assert devices.sign_claim(new_key, handle, add.device) == added["Proof"]  # Ed25519 is deterministic
    assert devices.entry_hash(added["Entry"].encode()) == added["Hash"]


def test_device_log_replays_to_both_devices():
    log = devices.verify_log(DEVICE_LOG["Handle"], _log_entries())
    assert (log.seq, log.head) == (DEVICE_LOG["Seq"], DEVICE_LOG["Head"]) == (2, DEVICE_LOG["Entries"][-1]["Hash"])
    assert sorted(log.devices) == DEVICE_LOG["DeviceIds"] == sorted(d["DeviceId"] for d in DEVICE_LOG["Devices"])
    for seq, dev in enumerate(DEVICE_LOG["Devices"], start=1):
        found = log.devices[dev["DeviceId"]]
        assert (found.kind, found.sign_key, found.box_key, found.added_seq) == ("device", dev["SignPublic"], dev["BoxPublic"], seq)


def test_device_log_refuses_a_changed_entry_or_another_order():
    genesis, added = _log_entries()
    with pytest.raises(InvalidSignature):  # a signed field changed
        devices.verify_log(DEVICE_LOG["Handle"], [genesis, added.replace(b'"Anchor":"', b'"Anchor":"x')])
    with pytest.raises(InvalidArgument):  # the log of another handle
        devices.verify_log("bob", [genesis, added])
    with pytest.raises(InvalidArgument):  # the device is there already: its key is never taken back
        devices.verify_log(DEVICE_LOG["Handle"], [genesis, added, added])
    with pytest.raises(MalformedRequest):  # entry 1 is the registration
        devices.verify_log(DEVICE_LOG["Handle"], [added])


def test_device_code_carries_the_second_device():
    second, added = DEVICE_LOG["Devices"][1], DEVICE_LOG["Entries"][1]
    handle, keys, proof = devices.read_device_code(DEVICE_LOG["DeviceCode"])
    assert (handle, keys.sign_key, keys.box_key, keys.kind, proof) == (
        DEVICE_LOG["Handle"], second["SignPublic"], second["BoxPublic"], "device", added["Proof"])
    signing = SigningKey(b64decode(second["SigningSeed"], length=32))
    assert devices.device_code(handle, signing, second["BoxPublic"]) == DEVICE_LOG["DeviceCode"]


@pytest.mark.parametrize("entry", KEY_BATCH["Entries"], ids=lambda e: e["Device"])
def test_a_batch_for_three_devices_opens_on_each(entry):
    box = PrivateKey(b64decode(entry["BoxSecret"], length=32))
    assert b64encode(bytes(box.public_key)) == entry["BoxKey"]
    assert crypto.open_session_key(entry["SealedKey"], box) == b64decode(KEY_BATCH["SessionKey"], length=32)
    ephemeral = PrivateKey(b64decode(entry["EphemeralSecret"], length=32))
    assert b64decode(entry["SealedKey"]).startswith(bytes(ephemeral.public_key))


def test_a_batch_for_three_devices_is_one_rotation_signed_by_a_device():
    env = as_envelope(KEY_BATCH["Rotation"])
    envelopes.verify(env)
    keys = json.loads(env.data)["Keys"]
    assert [(k["Handle"], k["BoxKey"]) for k in keys] == [(e["Handle"], e["BoxKey"]) for e in KEY_BATCH["Entries"]]
    assert len({k["BoxKey"] for k in keys}) == 3 and sorted({k["Handle"] for k in keys}) == ["alice", "bob"]
    assert env.owner == next(i["Address"] for i in IDENTITIES if i["Name"] == "alice")  # alice's first device


def test_vectors_are_what_the_generator_builds():
    module = make_vectors()
    built = module.build()
    assert sorted(built) == sorted(p.name for p in VECTORS.glob("*.json"))
    for name, content in built.items():
        assert (VECTORS / name).read_text(encoding="utf-8") == module.render(content), (
            f"{name} drifted; run scripts/make_vectors.py and review the diff"
        )
