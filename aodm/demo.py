"""`aodm demo`: the eight steps of the seed workflow between two fresh in-memory identities,
narrated. Steps 1-4 are done by hand here (rather than by `Client.rotate_session_key`) so
the sealed keys printed are exactly the ones sent."""

import asyncio
import hashlib
import secrets
from datetime import datetime

from aodm import crypto
from aodm.client import Client
from aodm.commands import Context, safe_url
from aodm.encoding import b64decode
from aodm.errors import NotFound
from aodm.inbox import Inbox
from aodm.notifications import NewMessage
from aodm.output import local_time
from aodm.session_api import Rotated, RotateSessionKey, SealedKey
from aodm.state import CliError


def short(text: str) -> str:
    return text if len(text) <= 20 else text[:16] + "..."


def fingerprint(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:16]


async def run(ctx: Context) -> int:
    url, timeout = ctx.args.amqp_url, ctx.args.timeout
    print(f"Waiting for the aodm services at {safe_url(url)} ...", flush=True)
    await wait_for_services(url, ctx.args.wait)
    print("They answer.\n", flush=True)
    async with (
        Client.connect(url, crypto.Identity.generate(), timeout=timeout) as alice,
        Client.connect(url, crypto.Identity.generate(), timeout=timeout) as bob,
    ):
        await narrate(alice, bob, timeout)
    return 0


async def wait_for_services(url: str, wait: float) -> None:
    """Ready when the registry answers a lookup of a random name with not_found; until
    then any failure (no broker, no exchanges yet, no reply) just means "not yet"."""
    loop = asyncio.get_running_loop()
    deadline, last = loop.time() + wait, None
    while True:
        try:
            return await probe(url)
        except Exception as exc:  # every kind of failure is retried the same way
            last = exc
        if loop.time() >= deadline:
            raise CliError(f"the aodm services at {safe_url(url)} did not answer within {wait:g}s "
                           f"(last error: {type(last).__name__}: {last})")
        await asyncio.sleep(0.5)


async def probe(url: str) -> None:
    client = await asyncio.wait_for(Client.connect(url, crypto.Identity.generate(), timeout=2), 5)
    try:
        await client.query_handle(f"probe-{secrets.token_hex(4)}")
    except NotFound:
        return
    finally:
        await client.close()


async def narrate(alice: Client, bob: Client, timeout: float) -> None:
    a, b = await setup(alice, bob)
    clients = [alice, bob]
    try:
        for i, client in enumerate(clients):
            clients[i] = await own_login(client, timeout)
        if clients != [alice, bob]:
            print()
        await workflow(clients[0], clients[1], a, b, timeout)
    finally:
        for original, client in zip((alice, bob), clients, strict=True):
            if client is not original:
                await client.close()


async def own_login(client: Client, timeout: float) -> Client:
    """Where the deployment issued the handle its own broker user, go on with it: a new
    connection that may publish requests and read only this handle's notifications."""
    if client.broker_url is None:
        return client
    own = await Client.connect(client.broker_url, client.identity, client.handle, timeout=timeout)
    print(f"   {client.handle} reconnects as its own broker user {client.broker_user} "
          f"(it can read only {client.handle}'s queue).")
    return own


async def workflow(alice: Client, bob: Client, a: str, b: str, timeout: float) -> None:
    session = (await alice.establish_session(b)).session_id
    print(f"   {a} establishes a session with {b}: {session}\n")
    sk, generation = await share_key(alice, session, b)
    text = f"Hello from {a}! Sent at {datetime.now():%H:%M:%S}, readable only by the two of us."
    await send(alice, session, sk, generation, text)
    note = await receive(bob, timeout)
    plaintext = await open_and_read(bob, session, note, sk, a)
    if plaintext != text:
        raise CliError(f"demo failed: {b} decrypted {plaintext!r}, but {a} sent {text!r}")


async def setup(alice: Client, bob: Client) -> tuple[str, str]:
    a, b = f"alice-{secrets.token_hex(2)}", f"bob-{secrets.token_hex(2)}"
    await alice.register(a)
    await bob.register(b)
    print("Setup: two fresh identities, each a signing key and a box key, kept in memory.")
    print(f"   {a} registers (box key {short(alice.identity.box_public)}).")
    print(f"   {b} registers (box key {short(bob.identity.box_public)}) and goes offline:")
    print("   nothing reads his notification queue until step 7.")
    return a, b


async def share_key(alice: Client, session: str, b: str) -> tuple[bytes, int]:
    a, a_box = alice.acting_as, alice.identity.box_public
    sk = crypto.new_session_key()
    print(f"1. {a} generates a random 32-byte session key SK (fingerprint {fingerprint(sk)}).")
    sk_ea = crypto.seal_session_key(sk, a_box)
    print(f"2. {a} seals SK to her own box key -> SK_EA ({short(sk_ea)}).")
    b_box = (await alice.query_handle(b)).box_key
    sk_eb = crypto.seal_session_key(sk, b_box)
    print(f"3. {a} looks up {b}'s box key in the registry ({short(b_box)}) and seals SK to it -> SK_EB ({short(sk_eb)}).")
    keys = sorted([SealedKey(a, a_box, sk_ea), SealedKey(b, b_box, sk_eb)], key=lambda k: k.handle)
    generation = (await alice.call(session, RotateSessionKey(keys), Rotated)).generation
    print(f"4. {a} sends SK_EA and SK_EB to the session process (RotateSessionKey): key generation {generation}.")
    return sk, generation


async def send(alice: Client, session: str, sk: bytes, generation: int, text: str) -> None:
    ciphertext = crypto.encrypt(sk, text)
    size = len(b64decode(ciphertext, field="Content"))
    print(f'5. {alice.handle} encrypts "{text}" with SK -> {size} bytes of nonce+ciphertext ({short(ciphertext)}).')
    sent = await alice.send_message(session, ciphertext, generation)
    when = local_time(sent.timestamp)
    print(f"6. {alice.handle} sends the ciphertext (SendMessage): stored as message #{sent.seq} at {when}.")


async def receive(bob: Client, timeout: float) -> NewMessage:
    """Bob's first consumer on his durable queue: everything sent while he was away waits there."""
    kinds = []
    async with Inbox(bob.bus, bob.acting_as) as inbox:
        while True:
            try:
                note = await inbox.next(timeout)
            except TimeoutError:
                late = f"{bob.handle}'s notification did not arrive within {timeout:g}s"
                raise CliError(f"{late}: is the notifier service running?") from None
            kinds.append(type(note).__name__)
            if isinstance(note, NewMessage):
                break
    print(f"7. {bob.handle} was offline all along. He comes online and finds waiting in his queue: {', '.join(kinds)}")
    print(f"   (the NewMessage: from {note.sender}, generation {note.generation}, content {short(note.content)}).")
    return note


async def open_and_read(bob: Client, session: str, note: NewMessage, sk: bytes, a: str) -> str:
    batch = await bob.get_key_by_generation(session, note.generation)
    mine = next(k for k in batch.keys if k.handle == bob.handle)
    key = crypto.open_session_key(mine.sealed_key, bob.identity.box_key)
    same = "the same key" if key == sk else "NOT the key"
    print(f"8. {bob.handle} fetches SK_EB for generation {note.generation} (GetKeyByGeneration),")
    print(f"   opens it with his box secret key -> SK {fingerprint(key)} ({same} {a} generated),")
    print("   and decrypts the ciphertext with it.")
    plaintext = crypto.decrypt(key, note.content)
    print(f'   {bob.handle} read: "{plaintext}"')
    return plaintext
