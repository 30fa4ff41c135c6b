"""Write the protocol test vectors in tests/vectors/ (format: docs/protocol.md, "Test vectors").

Every input is fixed, so running this again gives the same files byte for byte; the test
suite rebuilds them and fails if the committed files drift from the code. The sealed key is
built from a fixed ephemeral key with libsodium's crypto_box_seal construction (the library
call draws a random one), so it is reproducible too and shows that construction step by step.

Usage: .venv/bin/python scripts/make_vectors.py
"""

import hashlib
import json
from pathlib import Path

import msgspec
from nacl.encoding import RawEncoder
from nacl.hash import blake2b
from nacl.public import Box, PrivateKey, PublicKey
from nacl.signing import SigningKey

from aodm import crypto, devices
from aodm.encoding import b64encode
from aodm.envelope import Tag, encode, envelope_signing_bytes, sign
from aodm.registry_api import AddDevice, DeviceKeys

OUT = Path(__file__).resolve().parent.parent / "tests" / "vectors"
TIMESTAMP = 1_700_000_000_000  # 2023-11-14T22:13:20Z


def seed(label: str) -> bytes:
    """32 fixed bytes named by a label, so each vector input says what it is."""
    return hashlib.sha256(f"aodm test vector: {label}".encode()).digest()


def identity(name: str) -> dict:
    signing, box = SigningKey(seed(f"{name} signing seed")), PrivateKey(seed(f"{name} box secret"))
    ident = crypto.Identity(signing, box)
    return {
        "Name": name,
        "SigningSeed": b64encode(bytes(signing)),
        "SignPublic": b64encode(bytes(signing.verify_key)),
        "Address": ident.address,
        "BoxSecret": b64encode(bytes(box)),
        "BoxPublic": ident.box_public,
    }


def envelope_case(name: str, signer: dict, **fields) -> dict:
    env = sign(SigningKey(seed(f"{signer['Name']} signing seed")), timestamp=TIMESTAMP, **fields)
    return {
        "Name": name,
        "Signer": signer["Name"],
        "SigningSeed": signer["SigningSeed"],
        "SigningBytesHex": envelope_signing_bytes(env).hex(),
        "Signature": env.signature,
        "Id": env.id,
        "Envelope": json.loads(encode(env)),
    }


def sealed_key(recipient: dict) -> dict:
    """crypto_box_seal by hand: epk ‖ box(m, nonce = blake2b-192(epk ‖ rpk), esk, rpk)."""
    ephemeral = PrivateKey(seed("sealed key ephemeral secret"))
    recipient_box = PrivateKey(seed(f"{recipient['Name']} box secret"))
    session_key = seed("session key generation 1")
    epk, rpk = bytes(ephemeral.public_key), bytes(recipient_box.public_key)
    nonce = blake2b(epk + rpk, digest_size=24, encoder=RawEncoder)
    sealed = epk + Box(ephemeral, recipient_box.public_key).encrypt(session_key, nonce).ciphertext
    return {
        "Recipient": recipient["Name"],
        "RecipientBoxSecret": recipient["BoxSecret"],
        "RecipientBoxPublic": recipient["BoxPublic"],
        "SessionKey": b64encode(session_key),
        "EphemeralSecret": b64encode(bytes(ephemeral)),
        "EphemeralPublic": b64encode(epk),
        "Nonce": b64encode(nonce),
        "SealedKey": b64encode(sealed),
    }


def seal_by_hand(session_key: bytes, recipient_box_public: bytes, label: str) -> tuple[bytes, bytes]:
    """crypto_box_seal with a fixed ephemeral key: (ephemeral secret, sealed)."""
    ephemeral = PrivateKey(seed(label))
    epk = bytes(ephemeral.public_key)
    nonce = blake2b(epk + recipient_box_public, digest_size=24, encoder=RawEncoder)
    sealed = epk + Box(ephemeral, PublicKey(recipient_box_public)).encrypt(session_key, nonce).ciphertext
    return bytes(ephemeral), sealed


def key_batch(session_id: str, members: dict[str, list[dict]]) -> dict:
    """A RotateSessionKey for three devices (protocol §11.1, §10.8): one sealed key per
    current device of each member, each opening to the same session key."""
    session_key = seed("session key generation 2")
    entries, keys = [], []
    for handle, its_devices in sorted(members.items()):
        for dev in its_devices:
            box_public = bytes(PrivateKey(seed(f"{dev['Name']} box secret")).public_key)
            ephemeral, sealed = seal_by_hand(session_key, box_public, f"key batch ephemeral {dev['Name']}")
            keys.append({"Handle": handle, "BoxKey": b64encode(box_public), "SealedKey": b64encode(sealed)})
            entries.append({"Device": dev["Name"], "DeviceId": device(dev)["DeviceId"], "BoxSecret": dev["BoxSecret"],
                            "EphemeralSecret": b64encode(ephemeral), **keys[-1]})
    signer = members["alice"][0]
    data = json.dumps({"Keys": keys}, separators=(",", ":"))
    rotation = envelope_case("rotate-for-three-devices", signer, target=session_id, from_="alice",
                             action="RotateSessionKey", anchor="3a9c51e07b24d8f6", data=data)
    return {"SessionId": session_id, "SessionKey": b64encode(session_key), "Entries": entries, "Rotation": rotation}


def secretbox_cases() -> list[dict]:
    key = seed("session key generation 1")
    plaintexts = {"ascii": "hello bob", "utf8": "grüße, 世界 😀", "empty": ""}
    cases = []
    for name, plaintext in plaintexts.items():
        nonce = seed(f"secretbox nonce {name}")[:24]
        cases.append({
            "Name": name,
            "SessionKey": b64encode(key),
            "Nonce": b64encode(nonce),
            "Plaintext": plaintext,
            "Content": crypto.encrypt(key, plaintext, nonce=nonce),
        })
    return cases


def device(ident: dict) -> dict:
    """An identity as a device: its keys and its device id."""
    return {**ident, "DeviceId": devices.device_id(bytes(SigningKey(seed(f"{ident['Name']} signing seed")).verify_key))}


def device_log(handle: str, first: dict, second: dict) -> dict:
    """`handle`'s log of two entries: the registration of `first`, then `first`'s AddDevice
    of `second` (its claim signed by `second`, chained to entry 1 by Prev)."""
    genesis = devices.genesis_entry(handle, first["SignPublic"], first["BoxPublic"])
    keys = DeviceKeys(second["SignPublic"], second["BoxPublic"], "device")
    claim = devices.claim_bytes(handle, keys)
    proof = devices.sign_claim(SigningKey(seed(f"{second['Name']} signing seed")), handle, keys)
    add = AddDevice(keys, proof, devices.entry_hash(genesis))
    data = msgspec.json.encode(add).decode()
    env = sign(SigningKey(seed(f"{first['Name']} signing seed")), target="registry", from_=handle, action="AddDevice",
               data=data, anchor="3f9a6c0e5b1d7284", timestamp=TIMESTAMP)
    entry = encode(env)
    log = devices.verify_log(handle, [genesis, entry])
    return {
        "Handle": handle,
        "Devices": [device(first), device(second)],
        "Entries": [
            {
                "Seq": 1,
                "Op": "register",
                "Device": first["Name"],
                "Entry": genesis.decode(),
                "Hash": devices.entry_hash(genesis),
            },
            {
                "Seq": 2,
                "Op": "AddDevice",
                "Signer": first["Name"],
                "Device": second["Name"],
                "Claim": claim.decode(),
                "ClaimHex": claim.hex(),
                "Proof": proof,
                "Prev": add.prev,
                "Data": json.loads(data),
                "Envelope": json.loads(entry),
                "Entry": entry.decode(),
                "Hash": devices.entry_hash(entry),
            },
        ],
        "Seq": log.seq,
        "Head": log.head,
        "DeviceIds": sorted(log.devices),
        "DeviceCode": devices.device_code(handle, SigningKey(seed(f"{second['Name']} signing seed")), second["BoxPublic"]),
    }


def base64url_cases() -> dict:
    accepted = [b"", b"\x00", b"\x00\x00", b"\x00\x00\x00", b"\xfb\xff", b"\xff\xff\xff\xfe", bytes(range(256))[-7:]]
    rejected = {
        "AA==": "padding",
        "AA=": "padding",
        "+/8": "standard alphabet '+' and '/'",
        "-_8=": "padding",
        "A": "length 1 mod 4 encodes no whole byte",
        "AAAAA": "length 1 mod 4 encodes no whole byte",
        "AB": "non-canonical: unused trailing bits set",
        "AAB": "non-canonical: unused trailing bits set",
        "AA AA": "whitespace",
        "AAAA\n": "newline",
        "AA.A": "character outside the alphabet",
        "ÀA": "non-ASCII",
    }
    return {
        "Accepted": [{"Text": b64encode(data), "Hex": data.hex()} for data in accepted],
        "Rejected": [{"Text": text, "Reason": reason} for text, reason in rejected.items()],
    }


def build() -> dict[str, dict]:
    """File name → content, for every vector file."""
    alice, bob = identity("alice"), identity("bob")
    session_id = b64encode(seed("example session id"))  # session ids are opaque; any ≤ 64 chars
    envelopes = [
        envelope_case(
            "register-from-address",
            alice,
            target="registry",
            from_=None,
            action="Register",
            data=json.dumps({"Handle": "alice", "BoxKey": alice["BoxPublic"]}, separators=(",", ":")),
        ),
        envelope_case(
            "send-message-from-handle",
            alice,
            target=session_id,
            from_="alice",
            action="SendMessage",
            anchor="7d1f3c2a9b8e4f60",
            data=json.dumps({"Content": secretbox_cases()[0]["Content"], "Generation": 1}, separators=(",", ":")),
        ),
        envelope_case(
            "multi-tag-non-ascii",
            bob,
            target="registry",
            from_="bob",
            action="QueryHandle",
            anchor="ünïcödé",
            extra_tags=[Tag("Client", "aodm-go/0.1"), Tag("Note", "naïve ✓ 😀"), Tag("Empty", "")],
            data='{"Handle":"zoë 😀"}',
        ),
        envelope_case(
            "accept-from-handle",
            bob,
            target=session_id,
            from_="bob",
            action="Accept",
            anchor="0c5e8a41d2b7f936",
            data="{}",
        ),
    ]
    return {
        "identity.json": {"Identities": [alice, bob]},
        "envelope.json": {"Envelopes": envelopes},
        "sealed_key.json": sealed_key(bob),
        "secretbox.json": {"Cases": secretbox_cases()},
        "base64url.json": base64url_cases(),
        "device_log.json": device_log("alice", alice, identity("alice-phone")),
        "key_batch.json": key_batch(session_id, {"alice": [alice, identity("alice-phone")], "bob": [bob]}),
    }


def render(content: dict) -> str:
    return json.dumps(content, indent=2, ensure_ascii=False) + "\n"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, content in build().items():
        (OUT / name).write_text(render(content), encoding="utf-8")
        print(f"wrote {OUT / name}")


if __name__ == "__main__":
    main()
