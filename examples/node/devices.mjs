#!/usr/bin/env node
// A handle's devices (docs/protocol.md §10.8) from Node.js, against a running aodm, with any
// other client (the Python one, in tests/test_node_client.py) on the other side:
//
//   AODM_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/ node devices.mjs --peer bob [--handle alice]
//       [--timeout SECONDS]
//
// The peer handle must be registered already. Progress goes to stdout as JSON lines:
//   {"event":"peerLog", "handle", "seq", "head", "devices"}
//     the peer's device log, every page read (as a bare address: no handle needed) and
//     replayed here; devices as DeviceInfo ({DeviceId, Kind, SignKey, BoxKey, AddedSeq}).
//   {"event":"registered", "handle", "address", "deviceId"}
//   {"event":"added", "deviceId", "seq", "head", "devices", "queue", "chats"}
//     a second identity's device code, added by the first device; the second device acts
//     as the handle (GetChatList: "chats" of them) and has its own queue.
//   {"event":"removed", "deviceId", "seq", "head", "devices", "selfRemoval"}
//     the second device tried to remove itself (refused: "forbidden"), then the first
//     removed it; then exits 0. The peer may replay this handle's log of 3 entries.
// On any failure: {"event":"error", "error", "code"} on stdout, exit 1.
import { randomBytes } from 'node:crypto';
import { parseArgs } from 'node:util';
import { ready, Client, Identity, Forbidden, deviceCode } from './aodm.mjs';
import { emit, run } from './script.mjs';

const { values: args } = parseArgs({
  options: {
    peer: { type: 'string' },
    handle: { type: 'string' },
    timeout: { type: 'string', default: '60' },
  },
});
const url = process.env.AODM_AMQP_URL ?? 'amqp://guest:guest@127.0.0.1:5672/';
const summary = (log) => ({ seq: log.seq, head: log.head });

async function main() {
  if (!args.peer) throw new Error('--peer HANDLE is required (a registered handle)');
  await ready;
  const handle = args.handle ?? `node-${randomBytes(4).toString('hex')}`;
  const identity = Identity.generate();
  const client = await Client.connect(url, identity);
  let second;
  try {
    const peerLog = await client.getDeviceLog(args.peer);
    emit('peerLog', { handle: args.peer, ...summary(peerLog), devices: [...peerLog.devices.values()] });

    await client.register(handle);
    emit('registered', { handle, address: identity.address, deviceId: client.deviceId });

    const phone = Identity.generate();
    const change = await client.addDevice(deviceCode(handle, phone));
    if (change.DeviceId !== phone.deviceId) throw new Error(`added ${change.DeviceId}, not ${phone.deviceId}`);
    second = await Client.connect(url, phone, { handle });
    const { Chats } = await second.getChatList();
    const added = await second.getDeviceLog();
    emit('added', {
      deviceId: phone.deviceId, ...summary(added), devices: [...added.devices.keys()],
      queue: await second.inboxQueue(), chats: Chats.length,
    });

    let selfRemoval = null;
    try {
      await second.removeDevice(phone.deviceId);
    } catch (error) {
      if (!(error instanceof Forbidden)) throw error;
      selfRemoval = error.code;
    }
    await client.removeDevice(phone.deviceId);
    const removed = await client.getDeviceLog();
    emit('removed', { deviceId: phone.deviceId, ...summary(removed), devices: [...removed.devices.keys()], selfRemoval });
  } finally {
    await second?.close();
    await client.close();
  }
}

run(main, args.timeout);
