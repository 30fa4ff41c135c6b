"""`aodm device …` and `aodm recover`: a handle's devices (protocol §10.8). Each machine's
identity is a device of its own; a copy of an identity file is the same device, and two
copies split its notifications between them."""

from aodm import devices
from aodm.commands import Context
from aodm.output import Document
from aodm.state import CliError


def _describe(log: devices.DeviceLog, mine: str) -> tuple[list[Document], str]:
    rows = [{"device_id": d.device_id, "kind": d.kind, "added_seq": d.added_seq, "this_device": d.device_id == mine}
            for d in sorted(log.devices.values(), key=lambda d: d.added_seq)]
    lines = [f"{r['device_id']}  {r['kind']:<8}  entry {r['added_seq']}" + ("  (this device)" if r["this_device"] else "")
             for r in rows]
    return rows, "\n".join([f"{log.handle}: {len(rows)} keys, device log at entry {log.seq} (verified)", *lines])


async def code(ctx: Context) -> int:
    """On the new machine: the code to carry to a device of HANDLE; HANDLE becomes the
    default handle here."""
    identity = ctx.identity
    text = devices.device_code(ctx.args.handle, identity.signing_key, identity.box_public)
    ctx.state.default_handle = ctx.args.handle
    ctx.state.save()
    ctx.out.emit({"handle": ctx.args.handle, "device_id": devices.device_id(bytes(identity.signing_key.verify_key)),
                  "code": text},
                 f"on a device of {ctx.args.handle}, run:\n  aodm device add {text}\n"
                 f"then here: aodm credentials (if the deployment issues broker users), aodm listen")
    return 0


async def add(ctx: Context) -> int:
    """Then a new key in every session, sealed to the new device too."""
    async with ctx.client() as client:
        change = await client.add_device(ctx.args.code)
        rotated = await client.rotate_all()
        shared = await client.share_history()
    ctx.out.emit({"handle": client.handle, "device_id": change.device_id, "seq": change.seq, "rotated": len(rotated),
                  "keys_shared": shared},
                 f"added device {change.device_id} to {client.handle} (device log entry {change.seq}); "
                 f"new keys in {len(rotated)} chats, and {shared} older keys shared with it: it reads the history too")
    return 0


async def remove(ctx: Context) -> int:
    """Then a new key in every session, which the removed device cannot open."""
    async with ctx.client() as client:
        change = await client.remove_device(ctx.args.device_id)
        rotated = await client.rotate_all()
    ctx.out.emit({"handle": client.handle, "device_id": change.device_id, "seq": change.seq, "rotated": len(rotated)},
                 f"removed device {change.device_id} from {client.handle}: its key is refused from now on, "
                 f"and {len(rotated)} chats have a new key it cannot open")
    return 0


async def listing(ctx: Context) -> int:
    async with ctx.client(need_handle=ctx.args.handle is None) as client:
        log = await client.device_log(ctx.args.handle or client.acting_as)
        rows, text = _describe(log, client.device_id)
    ctx.out.emit({"handle": log.handle, "seq": log.seq, "head": log.head, "devices": rows}, text)
    return 0


async def recovery_key(ctx: Context) -> int:
    async with ctx.client() as client:
        secret = await client.add_recovery_key()
    ctx.out.emit({"handle": client.handle, "recovery_secret": secret},
                 f"recovery secret of {client.handle} (write it down and keep it offline; shown once):\n  {secret}\n"
                 f"with it, `aodm recover {client.handle} SECRET` makes a new machine a device of "
                 f"{client.handle} when every device is lost. Without it, a handle whose devices are all lost is lost.")
    return 0


async def recover(ctx: Context) -> int:
    async with ctx.client(need_handle=False) as client:
        try:
            change = await client.recover(ctx.args.handle, ctx.args.secret)
        except ValueError as exc:
            raise CliError(f"not a recovery secret: {exc}", "malformed_request") from None
    ctx.state.default_handle = ctx.args.handle
    ctx.state.save()
    ctx.out.emit({"handle": ctx.args.handle, "device_id": change.device_id, "seq": change.seq},
                 f"this machine is now device {change.device_id} of {ctx.args.handle}; "
                 f"remove the lost ones with `aodm device remove ID` (`aodm device list` shows them)")
    return 0
