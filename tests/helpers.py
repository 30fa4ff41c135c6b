"""Test helpers shared by several test modules."""

import asyncio

import msgspec

from aodm import crypto
from aodm.client import Client
from aodm.session_api import SendMessage, Sent


async def open_pair(alice: Client, bob: Client) -> tuple[str, bytes]:
    """An accepted session between the two with a first key; returns (session id, key)."""
    session = (await alice.establish_session(bob.handle)).session_id
    await bob.accept(session)
    key = crypto.new_session_key()
    await alice.rotate_session_key(session, bob.handle, key)
    return session, key


async def pipelined_send(client: Client, session: str, key: bytes, texts: list[str]) -> list:
    """Publish in list order (each publish confirmed before the next), await replies after."""
    pending = []
    for text in texts:
        env = client.sign(session, "SendMessage", SendMessage(crypto.encrypt(key, text), 1))
        pending.append((env, await client.submit(env)))
    raws = await asyncio.gather(*(client.result_of(env, reply) for env, reply in pending))
    return [msgspec.json.decode(raw, type=Sent) for raw in raws]


def decrypt_all(key: bytes, messages) -> list[tuple[str, str]]:
    return [(m.sender, crypto.decrypt(key, m.content)) for m in messages]


def check_order(received: list[tuple[str, str]], senders: dict[str, list[str]]) -> None:
    """Every sent text exactly once, and each sender's texts in its publish order."""
    assert sorted(t for _, t in received) == sorted(t for texts in senders.values() for t in texts)
    for sender, texts in senders.items():
        assert [t for s, t in received if s == sender] == texts
