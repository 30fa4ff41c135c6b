// The test vectors of tests/vectors/ (docs/protocol.md §15) pass in Node.js.
//
//   node --test examples/node/
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { describe, test, before } from 'node:test';
import sodium from 'libsodium-wrappers';
import {
  ready, b64encode, b64decode, Identity, signingBytes, signEnvelope, verifyEnvelope, idOf, actionOf,
  sealSessionKey, openSessionKey, encrypt, decrypt, notificationId,
  MalformedRequest, InvalidSignature, StaleRequest, DecryptionFailed, errorFor, NotFound, InternalError,
  NotAccepted, RateLimited, ERRORS, Client, CONSENT_STATES, withDefaults,
  deviceId, claimBytes, entryHash, genesisEntry, verifyLog, deviceCode, readDeviceCode, decodeEnvelope, deviceInbox,
  InvalidArgument, Unauthorized, Forbidden, PayloadTooLarge, NoSessionKey, newSessionKey,
} from './aodm.mjs';

const load = (name) => JSON.parse(readFileSync(new URL(`../../tests/vectors/${name}`, import.meta.url), 'utf8'));
const IDENTITIES = load('identity.json').Identities;
const ENVELOPES = load('envelope.json').Envelopes;
const SEALED = load('sealed_key.json');
const KEY_BATCH = load('key_batch.json');
const SECRETBOX = load('secretbox.json').Cases;
const BASE64 = load('base64url.json');
const DEVICE_LOG = load('device_log.json');
const hex = (bytes) => Buffer.from(bytes).toString('hex');

before(async () => {
  await ready;
});

describe('identity.json', () => {
  for (const v of IDENTITIES) {
    test(v.Name, () => {
      const me = new Identity(b64decode(v.SigningSeed, { length: 32 }), b64decode(v.BoxSecret, { length: 32 }));
      assert.equal(b64encode(me.signPublicKey), v.SignPublic);
      assert.equal(me.address, v.Address);
      assert.equal(v.Address, v.SignPublic);
      assert.equal(me.boxPublic, v.BoxPublic);
      assert.deepEqual(Identity.fromJSON(me.toJSON()).address, v.Address);
    });
  }
});

describe('envelope.json', () => {
  const boxSecretOf = (name) => IDENTITIES.find((i) => i.Name === name).BoxSecret;
  for (const v of ENVELOPES) {
    const env = v.Envelope;
    const signer = () => new Identity(b64decode(v.SigningSeed, { length: 32 }), b64decode(boxSecretOf(v.Signer), { length: 32 }));

    test(`${v.Name}: signing bytes`, () => {
      assert.equal(hex(signingBytes(env)), v.SigningBytesHex);
    });

    test(`${v.Name}: signature verifies and is deterministic; Id`, () => {
      const bytes = signingBytes(env);
      const signature = b64decode(v.Signature, { length: 64 });
      assert.ok(sodium.crypto_sign_verify_detached(signature, bytes, b64decode(env.Owner, { length: 32 })));
      assert.equal(b64encode(signer().sign(bytes)), v.Signature);
      assert.equal(idOf(signature), v.Id);
      assert.equal(env.Id, v.Id);
    });

    test(`${v.Name}: signEnvelope rebuilds the whole envelope`, () => {
      const [actionTag, ...extra] = env.Tags;
      assert.equal(actionTag.name, 'Action');
      const rebuilt = signEnvelope(signer(), {
        target: env.Target, from: env.From, action: actionTag.value, data: env.Data,
        anchor: env.Anchor, timestamp: env.Timestamp, tags: extra,
      });
      assert.deepEqual(rebuilt, env);
      assert.deepEqual(JSON.parse(JSON.stringify(rebuilt)), env); // the wire form round-trips
      assert.equal(actionOf(env), actionTag.value);
    });

    test(`${v.Name}: verifier accepts it, rejects every tampering`, () => {
      verifyEnvelope(env, { now: env.Timestamp });
      const other = IDENTITIES.find((i) => i.Address !== env.Owner).Address;
      const tampered = {
        Target: { ...env, Target: `${env.Target}x` },
        From: { ...env, From: `${env.From}x` },
        Action: { ...env, Tags: env.Tags.map((t, i) => (i === 0 ? { ...t, value: `${t.value}x` } : t)) },
        Data: { ...env, Data: `${env.Data} ` },
        Owner: { ...env, Owner: other },
        Timestamp: { ...env, Timestamp: env.Timestamp + 1 },
      };
      for (const [field, bad] of Object.entries(tampered)) {
        assert.throws(() => verifyEnvelope(bad, { now: env.Timestamp }), InvalidSignature, `changed ${field}`);
      }
      const badId = { ...env, Id: b64encode(new Uint8Array(32)) };
      assert.throws(() => verifyEnvelope(badId, { now: env.Timestamp }), MalformedRequest);
      assert.throws(() => verifyEnvelope({ ...env, Owner: 'AA' }, { now: env.Timestamp }), MalformedRequest);
      assert.throws(() => verifyEnvelope(env, { now: env.Timestamp + 15 * 60 * 1000 + 1 }), StaleRequest);
      assert.throws(() => verifyEnvelope(env, { now: env.Timestamp - 2 * 60 * 1000 - 1 }), StaleRequest);
      verifyEnvelope(env, { now: env.Timestamp + 15 * 60 * 1000 }); // both ends inclusive
      verifyEnvelope(env, { now: env.Timestamp - 2 * 60 * 1000 });
    });
  }

  test('multi-tag-non-ascii: the length prefix counts UTF-8 bytes (§6.2)', () => {
    const v = ENVELOPES.find((e) => e.Name === 'multi-tag-non-ascii');
    const note = v.Envelope.Tags.find((t) => t.name === 'Note').value;
    assert.equal([...note].length, 9);
    assert.equal(note.length, 10);
    assert.equal(Buffer.byteLength(note, 'utf8'), 15);
    assert.ok(v.SigningBytesHex.includes(`0000000f${Buffer.from(note, 'utf8').toString('hex')}`));
  });

  test('register-from-address: 246 signing bytes (§6.2)', () => {
    assert.equal(signingBytes(ENVELOPES[0].Envelope).length, 246);
  });
});

describe('key_batch.json', () => {
  test('a batch for three devices: each device opens its own entry to the same session key', () => {
    assert.equal(KEY_BATCH.Entries.length, 3);
    for (const entry of KEY_BATCH.Entries) {
      const device = new Identity(new Uint8Array(32), b64decode(entry.BoxSecret, { length: 32 }));
      assert.equal(device.boxPublic, entry.BoxKey, entry.Device);
      assert.equal(b64encode(openSessionKey(entry.SealedKey, device)), KEY_BATCH.SessionKey, entry.Device);
    }
    const keys = JSON.parse(KEY_BATCH.Rotation.Envelope.Data).Keys;
    assert.deepEqual(keys.map((k) => [k.Handle, k.BoxKey]), KEY_BATCH.Entries.map((e) => [e.Handle, e.BoxKey]));
  });
});

describe('sealed_key.json', () => {
  let recipient;
  before(() => {
    recipient = new Identity(new Uint8Array(32), b64decode(SEALED.RecipientBoxSecret, { length: 32 }));
  });

  test('the recipient key pair', () => {
    assert.equal(recipient.boxPublic, SEALED.RecipientBoxPublic);
  });

  test('opens to the session key', () => {
    assert.equal(b64encode(openSessionKey(SEALED.SealedKey, recipient)), SEALED.SessionKey);
  });

  test('epk ‖ crypto_box(key, BLAKE2b-192(epk ‖ pk), pk, esk), byte for byte', () => {
    const sealed = b64decode(SEALED.SealedKey, { length: 80 });
    const esk = b64decode(SEALED.EphemeralSecret, { length: 32 });
    const epk = sodium.crypto_scalarmult_base(esk);
    assert.equal(b64encode(epk), SEALED.EphemeralPublic);
    assert.equal(b64encode(sealed.subarray(0, 32)), SEALED.EphemeralPublic);
    const pk = b64decode(SEALED.RecipientBoxPublic, { length: 32 });
    const nonce = sodium.crypto_generichash(24, Buffer.concat([epk, pk]));
    assert.equal(b64encode(nonce), SEALED.Nonce);
    const boxed = sodium.crypto_box_easy(b64decode(SEALED.SessionKey, { length: 32 }), nonce, pk, esk);
    assert.equal(b64encode(Buffer.concat([epk, boxed])), SEALED.SealedKey);
  });

  test('our own seal opens with the recipient key, and not with another', () => {
    const key = b64decode(SEALED.SessionKey, { length: 32 });
    const mine = sealSessionKey(key, SEALED.RecipientBoxPublic);
    assert.equal(mine.length, 107);
    assert.notEqual(mine, SEALED.SealedKey); // a fresh ephemeral key every time
    assert.deepEqual(openSessionKey(mine, recipient), key);
    assert.throws(() => openSessionKey(mine, Identity.generate()), DecryptionFailed);
  });
});

describe('secretbox.json', () => {
  for (const c of SECRETBOX) {
    test(c.Name, () => {
      const key = b64decode(c.SessionKey, { length: 32 });
      const nonce = b64decode(c.Nonce, { length: 24 });
      assert.equal(decrypt(key, c.Content), c.Plaintext);
      assert.equal(encrypt(key, c.Plaintext, nonce), c.Content);
      assert.deepEqual(b64decode(c.Content).subarray(0, 24), nonce);
      assert.equal(c.SessionKey, SEALED.SessionKey);
      const wrong = new Uint8Array(32);
      assert.throws(() => decrypt(wrong, c.Content), DecryptionFailed);
    });
  }

  test('the ascii Content is the one in send-message-from-handle', () => {
    const ascii = SECRETBOX.find((c) => c.Name === 'ascii');
    const env = ENVELOPES.find((e) => e.Name === 'send-message-from-handle').Envelope;
    assert.equal(JSON.parse(env.Data).Content, ascii.Content);
  });
});

describe('base64url.json', () => {
  for (const c of BASE64.Accepted) {
    test(`accepts ${JSON.stringify(c.Text)}`, () => {
      assert.equal(hex(b64decode(c.Text)), c.Hex);
      assert.equal(b64encode(Buffer.from(c.Hex, 'hex')), c.Text);
    });
  }
  for (const c of BASE64.Rejected) {
    test(`rejects ${JSON.stringify(c.Text)} (${c.Reason})`, () => {
      assert.throws(() => b64decode(c.Text), MalformedRequest);
    });
  }
});

describe('protocol examples', () => {
  test('notification Id (§12)', () => {
    // The NewMessage example in docs/protocol.md §12 is caused by send-message-from-handle.
    assert.equal(
      notificationId('Bh2WqMzi_NWOAO72N9VkegqYEs3SPYjuBxgpf5iBNi4', 'NewMessage', 'bob'),
      'p6fNuuWtv1-MtzQmXGhe8_gMD9xn54oMOD6k3vOQEJg',
    );
  });

  test('typed errors; an unknown code is treated like internal (§8)', () => {
    const e = errorFor('not_found', 'no handle', 'rid');
    assert.ok(e instanceof NotFound);
    assert.equal(e.code, 'not_found');
    assert.equal(e.requestId, 'rid');
    const unknown = errorFor('brand_new_code', 'x');
    assert.ok(unknown instanceof InternalError);
    assert.equal(unknown.unknownCode, 'brand_new_code');
    const refused = errorFor('not_accepted', 'the peer has not accepted this session', 'rid');
    assert.ok(refused instanceof NotAccepted);
    assert.equal(refused.name, 'NotAccepted');
    assert.equal(refused.code, 'not_accepted');
    assert.equal(errorFor('rate_limited', 'slow down', 'rid', 250).retryAfter, 250);
    assert.ok(!(refused instanceof RateLimited));
  });

  test('a typed error for every code of docs/asyncapi.yaml (§14)', () => {
    const doc = readFileSync(new URL('../../docs/asyncapi.yaml', import.meta.url), 'utf8');
    const block = doc.split('\n    ErrorCode:\n')[1].split('\n      x-aodm-client-codes:')[0];
    const codes = [...block.matchAll(/^ {8}- ([a-z_]+)$/gm)].map((m) => m[1]);
    assert.ok(codes.includes('not_accepted'));
    assert.deepEqual(Object.keys(ERRORS).sort(), codes.sort());
  });

  test('consent states (§11.6) are those of docs/asyncapi.yaml', () => {
    const doc = readFileSync(new URL('../../docs/asyncapi.yaml', import.meta.url), 'utf8');
    const block = doc.split('\n    ConsentState:\n')[1].split('\n    Consent:\n')[0];
    assert.deepEqual(block.match(/^ {6}enum: \[(.*)\]$/m)[1].split(', '), [...CONSENT_STATES]);
  });
});

describe('message requests (§11.6), without a broker', () => {
  // A Client whose requests are answered here: what it signs, and what it makes of the reply.
  const offline = (answer) => {
    const client = new Client({ on() {} }, Identity.generate(), { handle: 'bob', timeout: 1000 });
    const sent = [];
    client.request = async (env) => {
      sent.push(env);
      return answer(env);
    };
    return { client, sent };
  };
  const session = 'wL33keTQCHWI7d3UVb-WDl3Wqm3KiIC6b0IYZWZsRt4';

  test('accept, block and unblock send their action with Data {} and resolve to the State', async () => {
    const { client, sent } = offline((env) => ({ State: { Accept: 'accepted', Block: 'blocked', Unblock: 'outgoing' }[actionOf(env)] }));
    assert.equal(await client.accept(session), 'accepted');
    assert.equal(await client.block(session), 'blocked');
    assert.equal(await client.unblock(session), 'outgoing');
    assert.deepEqual(sent.map(actionOf), ['Accept', 'Block', 'Unblock']);
    for (const env of sent) {
      assert.equal(env.Target, session);
      assert.equal(env.From, 'bob');
      assert.equal(env.Data, '{}');
      verifyEnvelope(env);
    }
  });

  test('a chat without State (a server before message requests) is accepted', async () => {
    const { client } = offline(() => ({
      Chats: [
        { SessionId: 'a', Peer: 'alice', CreatedAt: 1, LastActivity: 2, State: 'incoming' },
        { SessionId: 'b', Peer: 'carol', CreatedAt: 1, LastActivity: 2 },
      ],
    }));
    const { Chats } = await client.getChatList();
    assert.deepEqual(Chats.map((c) => c.State), ['incoming', 'accepted']);
  });

  test('SessionEstablished without State is accepted; other notifications are untouched', () => {
    const old = { Kind: 'SessionEstablished', Id: 'x', Handle: 'bob', At: 1, SessionId: session, Peer: 'alice' };
    assert.equal(withDefaults(old).State, 'accepted');
    assert.equal(old.State, undefined); // a copy, not changed in place
    assert.equal(withDefaults({ ...old, State: 'incoming' }).State, 'incoming');
    const note = { Kind: 'NewMessage', Id: 'y' };
    assert.equal(withDefaults(note), note);
  });
});

describe('device_log.json (§10.8)', () => {
  const { Handle: handle, Devices, Entries } = DEVICE_LOG;
  const [genesis, added] = Entries;
  const identityOf = (d) => new Identity(b64decode(d.SigningSeed, { length: 32 }), b64decode(d.BoxSecret, { length: 32 }));
  let first;
  let phone;
  before(() => {
    [first, phone] = Devices.map(identityOf);
  });

  // An entry signed here, as a client signs its request: `signer` changes `handle`'s devices.
  const entry = (signer, action, data, from = handle) => JSON.stringify(signEnvelope(signer, {
    target: 'registry', from, action, data, timestamp: 1700000000000, anchor: `${action}-${Math.random()}`,
  }));
  const add = (log, signer, who, { prev = log.head, proofBy = who, box = who.boxPublic } = {}) => {
    const keys = { SignKey: who.address, BoxKey: box, Kind: box ? 'device' : 'recovery' };
    return entry(signer, 'AddDevice', { Device: keys, Proof: b64encode(proofBy.sign(claimBytes(handle, keys))), Prev: prev });
  };
  const remove = (log, signer, id) => entry(signer, 'RemoveDevice', { DeviceId: id, Prev: log.head });

  test('the device ids', () => {
    for (const [i, d] of Devices.entries()) {
      const me = [first, phone][i];
      assert.equal(me.address, d.SignPublic);
      assert.equal(me.boxPublic, d.BoxPublic);
      assert.equal(me.deviceId, d.DeviceId);
      assert.equal(deviceId(b64decode(d.SignPublic, { length: 32 })), d.DeviceId);
    }
  });

  test('entry 1: the registration, and its hash', () => {
    assert.equal(genesisEntry(handle, first.address, first.boxPublic), genesis.Entry);
    assert.equal(entryHash(genesis.Entry), genesis.Hash);
    assert.equal(entryHash(Buffer.from(genesis.Entry, 'utf8')), genesis.Hash);
  });

  test('entry 2: the claim, its Proof, Prev and the whole entry, byte for byte', () => {
    const keys = { SignKey: phone.address, BoxKey: phone.boxPublic, Kind: 'device' };
    const claim = claimBytes(handle, keys);
    assert.equal(Buffer.from(claim).toString('utf8'), added.Claim);
    assert.equal(hex(claim), added.ClaimHex);
    assert.ok(sodium.crypto_sign_verify_detached(b64decode(added.Proof, { length: 64 }), claim, phone.signPublicKey));
    assert.equal(b64encode(phone.sign(claim)), added.Proof); // Ed25519 is deterministic
    assert.equal(added.Prev, genesis.Hash);
    const data = JSON.stringify({ Device: keys, Proof: added.Proof, Prev: added.Prev });
    assert.deepEqual(JSON.parse(data), added.Data);
    const env = signEnvelope(first, {
      target: 'registry', from: handle, action: 'AddDevice', data, anchor: added.Envelope.Anchor, timestamp: added.Envelope.Timestamp,
    });
    assert.equal(JSON.stringify(env), added.Entry); // what addDevice sends is the entry the log keeps
    assert.deepEqual(decodeEnvelope(added.Entry), added.Envelope);
    assert.equal(entryHash(added.Entry), added.Hash);
  });

  test('verifyLog replays it to both devices', () => {
    const log = verifyLog(handle, Entries.map((e) => e.Entry));
    assert.equal(log.seq, DEVICE_LOG.Seq);
    assert.equal(log.head, DEVICE_LOG.Head);
    assert.deepEqual([...log.devices.keys()].sort(), DEVICE_LOG.DeviceIds);
    assert.deepEqual(log.devices.get(phone.deviceId), {
      DeviceId: phone.deviceId, Kind: 'device', SignKey: phone.address, BoxKey: phone.boxPublic, AddedSeq: 2,
    });
    assert.equal(log.devices.get(first.deviceId).AddedSeq, 1);
  });

  test('the device code', () => {
    assert.deepEqual(readDeviceCode(DEVICE_LOG.DeviceCode), {
      Handle: handle, Device: { SignKey: phone.address, BoxKey: phone.boxPublic, Kind: 'device' }, Proof: added.Proof,
    });
    assert.equal(deviceCode(handle, phone), DEVICE_LOG.DeviceCode);
    assert.equal(readDeviceCode(deviceCode(handle, phone, null)).Device.Kind, 'recovery');
    assert.throws(() => readDeviceCode('not a code'), MalformedRequest);
    assert.throws(() => readDeviceCode(b64encode(Buffer.from('{"Handle":"alice","Proof":"x"}'))), MalformedRequest);
  });

  test('a changed or misplaced entry is refused with the error a service gives', () => {
    const [one, two] = Entries.map((e) => e.Entry);
    assert.throws(() => verifyLog(handle, [one, two.replace('"Anchor":"', '"Anchor":"x')]), InvalidSignature);
    assert.throws(() => verifyLog('bob', [one, two]), InvalidArgument); // another handle's log
    assert.throws(() => verifyLog(handle, [two]), MalformedRequest); // entry 1 is the registration
    assert.throws(() => verifyLog(handle, [one, two, two]), InvalidArgument); // a key is never taken back
    assert.throws(() => verifyLog(handle, [one, two.replace('{"Id"', '{"Id":"x","Id"')]), MalformedRequest); // a key twice
    assert.throws(() => verifyLog(handle, [one, two.replace('"Signature"', '"Extra":1,"Signature"')]), MalformedRequest); // an unknown field
    assert.throws(() => decodeEnvelope(JSON.stringify({ ...added.Envelope, Data: 'x'.repeat(64 * 1024 + 1) })), PayloadTooLarge);
  });

  test('every rule of the log (the same as aodm/devices.py DeviceLog.apply)', () => {
    const two = verifyLog(handle, Entries.map((e) => e.Entry));
    const stranger = Identity.generate();
    const tablet = Identity.generate();
    assert.throws(() => two.apply(add(two, stranger, tablet)), Unauthorized); // not a device of the handle
    assert.throws(() => two.apply(add(two, first, tablet, { proofBy: stranger })), InvalidArgument); // claim not signed by the new key
    assert.throws(() => two.apply(add(two, first, tablet, { prev: genesis.Hash })), InvalidArgument); // not the head
    const keys = (Kind, BoxKey) => ({ Device: { SignKey: tablet.address, BoxKey, Kind }, Proof: '', Prev: two.head });
    assert.throws(() => two.apply(entry(first, 'AddDevice', keys('recovery', tablet.boxPublic))), InvalidArgument); // a recovery key has no BoxKey
    assert.throws(() => two.apply(entry(first, 'AddDevice', keys('device', null))), InvalidArgument); // a device has one
    assert.throws(() => two.apply(entry(first, 'AddDevice', keys('phone', null))), MalformedRequest);
    assert.throws(() => two.apply(entry(first, 'SendMessage', { Content: '', Generation: 1 })), InvalidArgument); // no log entry
    assert.throws(() => two.apply(entry(first, 'AddDevice', {}, 'bob')), InvalidArgument); // From is another handle
    assert.throws(() => two.apply(remove(two, phone, phone.deviceId)), Forbidden); // not by itself
    assert.throws(() => two.apply(remove(two, first, '0123456789abcdef')), InvalidArgument); // no such device
    assert.throws(() => two.apply(remove(two, first, 'not-an-id')), MalformedRequest);

    const three = two.apply(add(two, phone, tablet)); // any current device adds
    assert.equal(three.seq, 3);
    assert.equal(three.devices.get(tablet.deviceId).AddedSeq, 3);
    const four = three.apply(remove(three, first, phone.deviceId));
    assert.deepEqual([...four.devices.keys()].sort(), [first.deviceId, tablet.deviceId].sort());
    assert.throws(() => four.apply(remove(four, phone, tablet.deviceId)), Unauthorized); // a removed key is refused
    assert.throws(() => four.apply(add(four, first, phone)), InvalidArgument); // and never taken back

    const recovery = Identity.generate();
    const five = four.apply(add(four, first, recovery, { box: null }));
    assert.equal(five.devices.get(recovery.deviceId).Kind, 'recovery');
    assert.throws(() => five.signer(recovery.address, 'GetChatList'), Unauthorized); // it signs device changes only
    assert.throws(() => five.apply(entry(recovery, 'SendMessage', {})), Unauthorized);
    const six = five.apply(remove(five, recovery, tablet.deviceId));
    assert.throws(() => six.apply(remove(six, recovery, first.deviceId)), InvalidArgument); // never zero devices
    const seven = six.apply(add(six, recovery, Identity.generate())); // a recovery key adds a device
    assert.equal(seven.devices.size, 3);
    assert.equal(seven.apply(remove(seven, recovery, first.deviceId)).devices.size, 2); // a device is left
  });

  test('the queue of a device added later', () => {
    assert.equal(deviceInbox(handle, first.deviceId, 1), 'aodm.inbox.alice');
    assert.equal(deviceInbox(handle, phone.deviceId, 2), `aodm.inbox.alice.${phone.deviceId}`);
  });
});

describe('devices (§10.8), without a broker', () => {
  const [genesis, added] = DEVICE_LOG.Entries;
  const page = (entries, overrides = {}) => ({
    Handle: 'alice', Entries: entries, Seq: 2, Head: DEVICE_LOG.Head,
    Devices: DEVICE_LOG.Devices.map((d, i) => ({ DeviceId: d.DeviceId, Kind: 'device', SignKey: d.SignPublic, BoxKey: d.BoxPublic, AddedSeq: i + 1 })),
    ...overrides,
  });
  const offline = (pages, identity = Identity.generate(), answer = (env, data) => ({ DeviceId: data.DeviceId ?? 'x', Seq: 3, Head: 'h' })) => {
    const client = new Client({ on() {} }, identity, { handle: 'alice', timeout: 1000 });
    const sent = [];
    client.request = async (env) => {
      sent.push(env);
      const data = JSON.parse(env.Data);
      if (actionOf(env) === 'GetDeviceLog') return pages(data.After);
      return answer(env, data);
    };
    return { client, sent };
  };

  test('getDeviceLog reads every page, as the signer itself, and verifies the log', async () => {
    const { client, sent } = offline((after) => page(after === 0 ? [{ Seq: 1, Entry: genesis.Entry }] : [{ Seq: 2, Entry: added.Entry }]));
    const log = await client.getDeviceLog();
    assert.deepEqual([...log.devices.keys()].sort(), DEVICE_LOG.DeviceIds);
    assert.deepEqual(sent.map((env) => JSON.parse(env.Data)), [{ Handle: 'alice', After: 0 }, { Handle: 'alice', After: 1 }]);
    assert.ok(sent.every((env) => env.From === env.Owner && env.Target === 'registry'));
  });

  test("getDeviceLog refuses a server whose Head or Devices are not the log's", async () => {
    const entries = DEVICE_LOG.Entries.map((e) => ({ Seq: e.Seq, Entry: e.Entry }));
    const wrongHead = offline(() => page(entries, { Head: genesis.Hash }));
    await assert.rejects(wrongHead.client.getDeviceLog(), InvalidArgument);
    const oneDevice = offline(() => page(entries, { Devices: page([]).Devices.slice(0, 1) }));
    await assert.rejects(oneDevice.client.getDeviceLog(), InvalidArgument);
    const tampered = offline(() => page([entries[0], { Seq: 2, Entry: added.Entry.replace('"From":"alice"', '"From":"alicf"') }]));
    await assert.rejects(tampered.client.getDeviceLog(), InvalidSignature);
  });

  test('addDevice sends the code with the log head as Prev; removeDevice the id', async () => {
    const entries = DEVICE_LOG.Entries.map((e) => ({ Seq: e.Seq, Entry: e.Entry }));
    const { client, sent } = offline(() => page(entries));
    const tablet = Identity.generate();
    await client.addDevice(deviceCode('alice', tablet));
    const addition = sent.find((env) => actionOf(env) === 'AddDevice');
    assert.equal(addition.From, 'alice');
    assert.deepEqual(JSON.parse(addition.Data), {
      Device: { SignKey: tablet.address, BoxKey: tablet.boxPublic, Kind: 'device' },
      Proof: readDeviceCode(deviceCode('alice', tablet)).Proof,
      Prev: DEVICE_LOG.Head,
    });
    await client.removeDevice(DEVICE_LOG.Devices[1].DeviceId);
    assert.deepEqual(JSON.parse(sent.at(-1).Data), { DeviceId: DEVICE_LOG.Devices[1].DeviceId, Prev: DEVICE_LOG.Head });
    await assert.rejects(client.addDevice(deviceCode('bob', tablet)), InvalidArgument); // a code for another handle
  });

  describe('shareKeys: the keys of generations sealed before a device was added', () => {
    const entries = DEVICE_LOG.Entries.map((e) => ({ Seq: e.Seq, Entry: e.Entry }));
    const session = 'wL33keTQCHWI7d3UVb-WDl3Wqm3KiIC6b0IYZWZsRt4';
    const sealed = (key, to, handle = 'alice') => ({ Handle: handle, BoxKey: to.boxPublic, SealedKey: sealSessionKey(key, to.boxPublic) });
    let first;
    let phone;
    let keys;
    let batches;
    before(() => {
      [first, phone] = DEVICE_LOG.Devices.map((d) => new Identity(b64decode(d.SigningSeed, { length: 32 }), b64decode(d.BoxSecret, { length: 32 })));
      const bob = Identity.generate();
      keys = [newSessionKey(), newSessionKey()];
      // Generation 1 was sealed before alice added her phone, generation 2 after.
      batches = {
        1: { Generation: 1, RotatedBy: 'alice', CreatedAt: 1, Keys: [sealed(keys[0], first), sealed(keys[0], bob, 'bob')] },
        2: { Generation: 2, RotatedBy: 'bob', CreatedAt: 2, Keys: [sealed(keys[1], first), sealed(keys[1], phone), sealed(keys[1], bob, 'bob')] },
      };
    });
    const server = ({ refuseFirst = false } = {}) => {
      let refused = !refuseFirst;
      return (env, data) => {
        switch (actionOf(env)) {
          case 'GetCurrentKey': return batches[2];
          case 'GetKeyByGeneration': return batches[data.Generation];
          case 'GetChatList': return { Chats: [{ SessionId: session, Peer: 'bob', CreatedAt: 1, LastActivity: 2 }] };
          case 'ShareKeys':
            if (!refused) {
              refused = true; // the session workers have not heard of the phone yet
              throw new InvalidArgument("ShareKeys seals only to the caller's own current devices (GetDeviceLog lists them)");
            }
            return { Generation: data.Generation, Added: data.Keys.length };
          default: throw new Error(`unexpected ${actionOf(env)}`);
        }
      };
    };

    test('the old device seals what only it holds to the new one, once per generation', async () => {
      const { client, sent } = offline(() => page(entries), first, server());
      assert.equal(await client.shareKeys(session), 1);
      const shares = sent.filter((env) => actionOf(env) === 'ShareKeys');
      assert.equal(shares.length, 1);
      assert.equal(shares[0].Target, session);
      assert.equal(shares[0].From, 'alice');
      verifyEnvelope(shares[0]);
      const data = JSON.parse(shares[0].Data);
      assert.equal(data.Generation, 1);
      assert.deepEqual(data.Keys.map((k) => [k.Handle, k.BoxKey]), [['alice', phone.boxPublic]]);
      assert.deepEqual(openSessionKey(data.Keys[0].SealedKey, phone), keys[0]);
    });

    test('shareHistory does it in every chat, again while the session has not heard of the device', async () => {
      const { client, sent } = offline(() => page(entries), first, server({ refuseFirst: true }));
      assert.equal(await client.shareHistory(), 1);
      assert.equal(sent.filter((env) => actionOf(env) === 'ShareKeys').length, 2);
    });

    test('nothing to give: the new device itself, or a session without a key', async () => {
      const fromPhone = offline(() => page(entries), phone, server());
      assert.equal(await fromPhone.client.shareKeys(session), 0);
      assert.ok(!fromPhone.sent.some((env) => actionOf(env) === 'ShareKeys'));
      const keyless = offline(() => page(entries), first, (env) => {
        throw new NoSessionKey('the session has no key yet: RotateSessionKey first');
      });
      assert.equal(await keyless.client.shareKeys(session), 0);
    });
  });
});
