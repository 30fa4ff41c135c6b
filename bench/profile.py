"""Where the session worker's time goes: py-spy sampling a live worker under load.

Two py-spy recorders run side by side (both --nonblocking, so the worker is never paused):
one writes the flame graph (SVG), the other the collapsed stacks, which are summarised here
into the top functions by own time and by category."""

import asyncio
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

# A sample belongs to the category of its deepest frame that matches (nearest the leaf).
CATEGORIES = [
    ("Ed25519 verify (PyNaCl)", ("nacl/", "envelope.py:verify", "verify (aodm/envelope.py")),
    ("logging (structlog JSON)", ("structlog/", "logging/")),
    ("JSON / msgspec", ("msgspec",)),
    ("PostgreSQL client (asyncpg)", ("asyncpg/",)),
    # asyncio streams carry only the AMQP connection here (asyncpg has its own protocol)
    ("AMQP client (aio-pika/aiormq/pamqp, socket writes)", ("aio_pika/", "aiormq/", "pamqp/", "asyncio/streams.py")),
    ("metrics", ("shared/metrics.py",)),
    ("event loop (asyncio/uvloop)", ("asyncio/", "uvloop/")),
    ("aodm code", ("shared/", "services/")),
]


def py_spy() -> str | None:
    found = shutil.which("py-spy")
    if found:
        return found
    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.exists() else None


async def record(pid: int, seconds: float, svg: Path, raw: Path, rate: int = 100) -> dict:
    """Sample `pid` for `seconds`; writes the flame graph and the collapsed stacks."""
    exe = py_spy()
    if exe is None:
        return {"error": "py-spy not installed (pip install py-spy)"}
    svg.parent.mkdir(parents=True, exist_ok=True)
    common = ["record", "--pid", str(pid), "--duration", str(max(1, int(seconds))), "--rate", str(rate), "--nonblocking"]
    procs = [
        await asyncio.create_subprocess_exec(exe, *common, "--format", "flamegraph", "-o", str(svg),
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE),
        await asyncio.create_subprocess_exec(exe, *common, "--format", "raw", "-o", str(raw),
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE),
    ]
    outputs = [await p.communicate() for p in procs]
    failures = [err.decode(errors="replace")[-400:] for p, (_, err) in zip(procs, outputs, strict=True) if p.returncode != 0]
    if failures or not raw.exists():
        return {"error": "py-spy failed: " + " | ".join(failures)}
    return summarise(raw.read_text())


def _frame_key(frame: str) -> str:
    """'send_message (services/session/messages.py:27)' -> 'send_message (services/session/messages.py)'."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    path = path.replace(str(Path(__file__).resolve().parent.parent) + "/", "")
    return f"{name} ({path})"


def summarise(collapsed: str, top: int = 15) -> dict:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    categories: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_frame_key(f) for f in stack.split(";") if f]
        if not frames:
            continue
        own[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
        category = "other"
        for frame in reversed(frames):
            match = next((label for label, needles in CATEGORIES if any(x in frame for x in needles)), None)
            if match:
                category = match
                break
        categories[category] += n
    pct = lambda n: round(100.0 * n / total, 1) if total else 0.0  # noqa: E731
    roots = ("<module> (", "main (shared/runtime.py)", "run_until_signalled (")
    interesting = [f for f, _ in inclusive.most_common()
                   if any(x in f for x in ("shared/", "services/")) and not f.startswith(roots)]
    return {
        "samples": total,
        "own": [(f, pct(n)) for f, n in own.most_common(top)],
        "categories": [(c, pct(n)) for c, n in categories.most_common()],
        "aodm_inclusive": [(f, pct(inclusive[f])) for f in interesting[:top]],
    }
