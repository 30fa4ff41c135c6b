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
} from './aodm.mjs';

const load = (name) => JSON.parse(readFileSync(new URL(`../../tests/vectors/${name}`, import.meta.url), 'utf8'));
const IDENTITIES = load('identity.json').Identities;
const ENVELOPES = load('envelope.json').Envelopes;
const SEALED = load('sealed_key.json');
const SECRETBOX = load('secretbox.json').Cases;
const BASE64 = load('base64url.json');
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
