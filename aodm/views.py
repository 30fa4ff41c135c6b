"""A message as the command line shows it: a line for people and a JSON document for
scripts, from the same values (history, requests, listen and chat all show messages)."""

from aodm.client import Client
from aodm.crypto import DecryptionFailed
from aodm.errors import NotFound
from aodm.notifications import NewMessage
from aodm.output import Document, local_time, moment
from aodm.session_api import StoredMessage

View = tuple[Document, str]  # (JSON document, line)


def line(when: int, sender: str, text: str) -> str:
    return f"[{local_time(when)}] {sender}: {text}"


def message(session_id: str, peer: str | None, seq: int, sender: str, timestamp: int, generation: int,
            text: str | None, problem: str | None = None) -> View:
    """`text` None with a `problem`: the message could not be read (the line says why)."""
    document = {"peer": peer, "session_id": session_id, "seq": seq, "sender": sender, **moment(timestamp),
                "generation": generation, "text": text}
    if problem is not None:
        document["error"] = problem
    return document, line(timestamp, sender, text if text is not None and problem is None else f"<{problem}>")


async def opened(client: Client, session_id: str, generation: int, content: str) -> tuple[str | None, str | None]:
    """The plaintext, or why it cannot be shown (one bad message must not hide the rest)."""
    try:
        return await client.decrypt(session_id, generation, content), None
    except (DecryptionFailed, NotFound) as exc:
        return None, f"cannot decrypt (generation {generation}): {exc}"


async def stored(client: Client, session_id: str, peer: str | None, m: StoredMessage | NewMessage) -> View:
    """A StoredMessage or a NewMessage (both carry what a message shows), decrypted."""
    text, problem = await opened(client, session_id, m.generation, m.content)
    return message(session_id, peer, m.seq, m.sender, m.timestamp, m.generation, text, problem)
