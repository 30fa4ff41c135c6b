#!/usr/bin/env node
// The eight seed steps from Node.js, against a running aodm, with any other client (the
// Python one, in tests/test_node_client.py) as the peer; then the peer's reply, read back.
//
//   AODM_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/ node seed.mjs --peer bob [--handle alice]
//       [--text TEXT] [--timeout SECONDS] [--reply-queue direct|exclusive]
//
// The peer handle must be registered already. Progress goes to stdout as JSON lines:
//   {"event":"registered", "handle", "address", "boxKey", "brokerUser"}
//   {"event":"sent", "handle", "peer", "session", "generation", "seq", "messageId", "text"}
//     (steps 1–6: session key made, sealed to both box keys, rotated in, message sent;
//      the peer does steps 7–8 and answers with a message of its own)
//   {"event":"read", "text", "sender", "seq", "notifications", "history", "checks"}
// then exits 0. On any failure: {"event":"error", "error", "code"} on stdout, exit 1.
//
// The new session is a message request to the peer (docs/protocol.md §11.6): it holds only
// a few messages from us (3 by default) until the peer accepts it. We send one; the peer's
// reply accepts the request. A variant that sends more before the peer answers must wait
// for the peer's Accept first (getChatList: State "accepted").
import { randomBytes } from 'node:crypto';
import { parseArgs } from 'node:util';
import {
  ready, Client, Identity, AlreadyExists, NotFound, newSessionKey, sealSessionKey, openSessionKey,
  encrypt, decrypt, brokerUrl,
} from './aodm.mjs';
import { emit, run } from './script.mjs';

const { values: args } = parseArgs({
  options: {
    peer: { type: 'string' },
    handle: { type: 'string' },
    text: { type: 'string' },
    timeout: { type: 'string', default: '60' },
    'reply-queue': { type: 'string', default: 'direct' },
  },
});
const url = process.env.AODM_AMQP_URL ?? 'amqp://guest:guest@127.0.0.1:5672/';
const log = (...parts) => process.stderr.write(`seed.mjs: ${parts.join(' ')}\n`);
const check = (ok, what) => {
  if (!ok) throw new Error(`check failed: ${what}`);
  return true;
};

async function main() {
  if (!args.peer) throw new Error('--peer HANDLE is required (a registered handle)');
  await ready;
  const peer = args.peer;
  const handle = args.handle ?? `node-${randomBytes(4).toString('hex')}`;
  const text = args.text ?? `hello ${peer}, from Node.js ${process.version} ✓ 😀`;
  const identity = Identity.generate();
  const replyQueue = args['reply-queue'];
  let client = await Client.connect(url, identity, { replyQueue });
  const checks = {};
  try {
    // Setup: register; where the deployment issues per-handle broker users, reconnect as ours.
    const registered = await client.register(handle);
    checks.registered = check(registered.Handle === handle && registered.SignKey === identity.address
      && registered.BoxKey === identity.boxPublic, 'Register result');
    emit('registered', { handle, address: identity.address, boxKey: identity.boxPublic, brokerUser: registered.BrokerUser ?? null });
    const own = brokerUrl(url, registered, identity);
    if (own) {
      await client.close();
      client = await Client.connect(own, identity, { handle }); // direct reply-to: it may declare nothing
      log(`reconnected as broker user ${registered.BrokerUser}`);
    }
    checks.duplicateRegister = await client.register(handle).then(() => false, (e) => e instanceof AlreadyExists);
    checks.unknownHandle = await client.queryHandle(`nobody-${randomBytes(4).toString('hex')}`)
      .then(() => false, (e) => e instanceof NotFound && e.code === 'not_found');
    const mine = await client.getHandles();
    checks.getHandles = check(mine.Handles.map((h) => h.Handle).includes(handle), 'GetHandles lists the handle');

    // Our notifications, from now on (the queue appears shortly after Register).
    const notifications = [];
    let established = null;
    let onPeerMessage;
    const peerMessage = new Promise((resolve) => { onPeerMessage = resolve; });
    const inbox = await client.consumeInbox(async (note) => {
      notifications.push(note.Kind);
      if (note.Kind === 'SessionEstablished') established = note;
      if (note.Kind === 'NewMessage' && note.Sender === peer) onPeerMessage(note);
    });

    const { SessionId: session, Created } = await client.establishSession(peer);
    checks.established = check(Created === true, 'EstablishSession created the session');
    checks.establishedAgain = check((await client.establishSession(peer)).SessionId === session, 'same session again');
    checks.querySession = check((await client.querySession(peer, handle)).SessionId === session, 'QuerySession');

    // 1. A random 32-byte session key.
    const sk = newSessionKey();
    // 2. Sealed to our own box key.
    const skA = sealSessionKey(sk, identity.boxPublic);
    // 3. The peer's box key from the registry; sealed to it.
    const peerBox = (await client.queryHandle(peer)).BoxKey;
    const skB = sealSessionKey(sk, peerBox);
    // 4. Both sealed keys to the session: a new key batch.
    const keys = [
      { Handle: handle, BoxKey: identity.boxPublic, SealedKey: skA },
      { Handle: peer, BoxKey: peerBox, SealedKey: skB },
    ].sort((a, b) => (a.Handle < b.Handle ? -1 : 1));
    const { Generation: generation } = await client.call(session, 'RotateSessionKey', { Keys: keys });
    const current = await client.getCurrentKey(session);
    checks.currentKey = check(current.Generation === generation && current.RotatedBy === handle, 'GetCurrentKey');
    checks.ownSealedKeyOpens = check(
      Buffer.compare(openSessionKey(current.Keys.find((k) => k.Handle === handle).SealedKey, identity), sk) === 0,
      'our stored sealed key opens to SK',
    );
    // 5. Encrypt with the session key; 6. send.
    const sent = await client.sendMessage(session, encrypt(sk, text), generation);
    emit('sent', { handle, peer, session, generation, seq: sent.Seq, messageId: sent.MessageId, text });

    // The peer (7) finds the notifications, (8) opens its sealed key, decrypts, and replies.
    const note = await peerMessage;
    const [, key] = await client.sessionKey(session, note.Generation); // GetKeyByGeneration, opened
    const reply = decrypt(key, note.Content);
    const history = [];
    for (const m of await client.history(session, { Order: 'asc', Limit: 1 })) {
      history.push({ Seq: m.Seq, Sender: m.Sender, Generation: m.Generation, Text: await client.decrypt(session, m.Generation, m.Content) });
    }
    checks.historyStartsWithOurs = check(history[0]?.Text === text && history[0]?.Sender === handle, 'history[0] is ours');
    checks.requestOutgoing = check(established?.SessionId === session && established.State === 'outgoing',
      'our SessionEstablished: State outgoing (our request to the peer)');
    const chats = await client.getChatList();
    const chat = chats.Chats.find((c) => c.SessionId === session && c.Peer === peer);
    // The peer's reply accepted it; the chat list follows a moment later.
    checks.chatList = check(chat && ['outgoing', 'accepted'].includes(chat.State), 'GetChatList');
    const credentials = await client.issueBrokerCredentials();
    checks.issueBrokerCredentials = check('BrokerUser' in credentials && 'SealedBrokerPassword' in credentials, 'IssueBrokerCredentials');
    await inbox.cancel();
    emit('read', { text: reply, sender: note.Sender, seq: note.Seq, notifications, history, checks });
  } finally {
    await client.close();
  }
}

run(main, args.timeout);
