#!/usr/bin/env node
// Message requests (docs/protocol.md §11.6–§11.7) from Node.js, against a running aodm, with
// any other client (the Python one, in tests/test_node_client.py) as the peer. Node opens
// the session, so it is Node's request to the peer:
//
//   AODM_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/ node requests.mjs --peer bob [--handle alice]
//       [--timeout SECONDS]
//
// The peer handle must be registered already. Progress goes to stdout as JSON lines:
//   {"event":"registered", "handle", "address"}
//   {"event":"request", "session", "established", "chatState", "seqs", "texts", "refused",
//    "refusedAs", "generations", "rotationRefused", "ownAccept"}
//     Node opened the session (SessionEstablished State "outgoing"), rotated a key in and
//     sent 3 messages; the 4th was refused not_accepted (NotAccepted), and so was a 4th key
//     generation. Its own Accept changes nothing. The peer reads the request and accepts.
//   {"event":"accepted", "seqs", "texts", "waitedMs"}
//     Node saw its chat turn "accepted" (GetChatList, which follows a moment later) and
//     sent two more messages.
//   {"event":"blocked", "states", "ownSend"}
//     Node blocked the peer (twice: no change), and its own message was refused forbidden.
//     The peer tries to send (refused not_accepted) and writes one line to Node's stdin.
//   {"event":"unblocked", "states", "seq", "text"}
//     Node lifted its block with Accept, blocked again, unblocked, and sent a message.
//   {"event":"read", "text", "sender", "seq", "notifications"}
//     the peer's reply, from Node's inbox; then exits 0.
// On any failure: {"event":"error", "error", "code"} on stdout, exit 1.
import { randomBytes } from 'node:crypto';
import { createInterface } from 'node:readline';
import { parseArgs } from 'node:util';
import { ready, Client, Identity, NotAccepted, Forbidden } from './aodm.mjs';
import { emit, run } from './script.mjs';

const { values: args } = parseArgs({
  options: {
    peer: { type: 'string' },
    handle: { type: 'string' },
    timeout: { type: 'string', default: '60' },
  },
});
const url = process.env.AODM_AMQP_URL ?? 'amqp://guest:guest@127.0.0.1:5672/';
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const stdinLines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();

/** The code of the error `promise` rejects with, checked to be of class `cls`. */
async function refusal(promise, cls) {
  try {
    await promise;
  } catch (error) {
    if (!(error instanceof cls)) throw error;
    return error.code;
  }
  throw new Error(`expected ${cls.name}, the request succeeded`);
}

async function chatState(client, session) {
  const { Chats } = await client.getChatList();
  return Chats.find((c) => c.SessionId === session)?.State;
}

async function main() {
  if (!args.peer) throw new Error('--peer HANDLE is required (a registered handle)');
  await ready;
  const peer = args.peer;
  const handle = args.handle ?? `node-${randomBytes(4).toString('hex')}`;
  const identity = Identity.generate();
  const client = await Client.connect(url, identity);
  try {
    await client.register(handle);
    emit('registered', { handle, address: identity.address });

    const notifications = [];
    let established;
    let onPeerMessage;
    const peerMessage = new Promise((resolve) => { onPeerMessage = resolve; });
    const inbox = await client.consumeInbox(async (note) => {
      notifications.push(note.Kind);
      if (note.Kind === 'SessionEstablished') established = note;
      if (note.Kind === 'NewMessage' && note.Sender === peer) onPeerMessage(note);
    });

    // Node's request to the peer: a key, then as many messages as it holds.
    const { SessionId: session } = await client.establishSession(peer);
    const first = await client.rotateSessionKey(session, peer);
    const texts = [1, 2, 3].map((i) => `request ${i} from ${handle}`);
    const seqs = [];
    for (const text of texts) seqs.push((await client.sendText(session, text)).Seq);
    const refused = await refusal(client.sendText(session, 'one too many'), NotAccepted);
    const generations = [first, await client.rotateSessionKey(session, peer), await client.rotateSessionKey(session, peer)];
    const rotationRefused = await refusal(client.rotateSessionKey(session, peer), NotAccepted);
    const ownAccept = await client.accept(session); // only the peer can accept it
    for (let i = 0; i < 50 && !established; i += 1) await sleep(100);
    emit('request', {
      session, established: established?.State ?? null, chatState: await chatState(client, session),
      seqs, texts, refused, refusedAs: 'NotAccepted', generations, rotationRefused, ownAccept,
    });

    // The peer accepts; the chat list follows the session a moment later.
    const started = Date.now();
    while ((await chatState(client, session)) !== 'accepted') {
      if (Date.now() - started > 20000) throw new Error('the chat did not turn accepted within 20 s');
      await sleep(100);
    }
    const waitedMs = Date.now() - started;
    const more = [`accepted, so ${handle} goes on`, 'and on'];
    const moreSeqs = [];
    for (const text of more) moreSeqs.push((await client.sendText(session, text)).Seq);
    emit('accepted', { seqs: moreSeqs, texts: more, waitedMs });

    // Node blocks the peer: its own messages are refused too, until it unblocks.
    const states = { block: await client.block(session), blockAgain: await client.block(session) };
    const ownSend = await refusal(client.sendText(session, 'while blocking'), Forbidden);
    emit('blocked', { states, ownSend });
    const line = await stdinLines.next(); // the peer has tried to send
    if (line.done) throw new Error('stdin closed before the peer went on');

    const after = {
      accept: await client.accept(session), // lifts Node's own block
      block: await client.block(session),
      unblock: await client.unblock(session),
    };
    const text = `unblocked, ${peer}`;
    const { Seq: seq } = await client.sendText(session, text);
    emit('unblocked', { states: after, seq, text });

    const note = await peerMessage;
    const reply = await client.decrypt(session, note.Generation, note.Content);
    await inbox.cancel();
    emit('read', { text: reply, sender: note.Sender, seq: note.Seq, notifications });
  } finally {
    await client.close();
  }
}

run(main, args.timeout);
