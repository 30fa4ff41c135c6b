// aodm client for Node.js, written from docs/protocol.md and tests/vectors/ alone.
//
//   import { Identity, Client, ready } from './aodm.mjs';
//   await ready;
//   const me = Identity.generate();
//   const client = await Client.connect('amqp://guest:guest@127.0.0.1:5672/', me);
//   await client.register('alice');
//   const { SessionId } = await client.establishSession('bob');
//   await client.rotateSessionKey(SessionId, 'bob');
//   await client.sendText(SessionId, 'hello bob');   // a message request until bob accepts
//
// Pieces, each usable alone: strict base64url (§2), Identity (§3), signingBytes and
// signEnvelope (§5–§6), verifyEnvelope, typed errors (§8, §14), Client (§4: requests on a
// confirm channel with direct reply-to, the inbox), message requests (§11.6: accept, block,
// unblock, the State of chats and of SessionEstablished), session-key sealing and
// messages (§13).
import { createHash, randomBytes, randomUUID } from 'node:crypto';
import amqp from 'amqplib';
import sodium from 'libsodium-wrappers';

/** Resolves once libsodium is initialised; await it before any crypto. */
/** A notification as docs/protocol.md §12 has it: an object with a string Id and Kind. */
function isNotification(note) {
  return note !== null && typeof note === 'object' && !Array.isArray(note)
    && typeof note.Id === 'string' && typeof note.Kind === 'string';
}

export const ready = sodium.ready;

// ------------------------------------------------------------------ §2 base64url

const B64URL = /^[A-Za-z0-9_-]*$/;

export function b64encode(bytes) {
  return Buffer.from(bytes).toString('base64url'); // unpadded
}

/**
 * Strict, canonical base64url (no padding, URL alphabet only, length mod 4 never 1,
 * unused trailing bits zero). Throws MalformedRequest, as a service would answer.
 */
export function b64decode(text, { length, field = 'value' } = {}) {
  if (typeof text !== 'string' || !B64URL.test(text) || text.length % 4 === 1) {
    throw new MalformedRequest(`${field}: not unpadded base64url`);
  }
  const bytes = new Uint8Array(Buffer.from(text, 'base64url'));
  if (b64encode(bytes) !== text) throw new MalformedRequest(`${field}: non-canonical base64url`);
  if (length !== undefined && bytes.length !== length) {
    throw new MalformedRequest(`${field}: expected ${length} bytes, got ${bytes.length}`);
  }
  return bytes;
}

const sha256 = (bytes) => new Uint8Array(createHash('sha256').update(bytes).digest());

// ----------------------------------------------------------------- §14 errors

export class AodmError extends Error {
  constructor(code, message = code, requestId = undefined) {
    super(message || code);
    this.name = 'AodmError';
    this.code = code;
    this.requestId = requestId;
  }
}

const errorClass = (code, name) => {
  const cls = class extends AodmError {
    constructor(message, requestId) {
      super(code, message, requestId);
      this.name = name;
    }
  };
  Object.defineProperty(cls, 'name', { value: name });
  cls.code = code;
  return cls;
};

export const MalformedRequest = errorClass('malformed_request', 'MalformedRequest');
export const PayloadTooLarge = errorClass('payload_too_large', 'PayloadTooLarge');
export const InvalidSignature = errorClass('invalid_signature', 'InvalidSignature');
export const StaleRequest = errorClass('stale_request', 'StaleRequest');
export const UnknownAction = errorClass('unknown_action', 'UnknownAction');
export const Unauthorized = errorClass('unauthorized', 'Unauthorized');
export const Forbidden = errorClass('forbidden', 'Forbidden');
export const InvalidArgument = errorClass('invalid_argument', 'InvalidArgument');
export const NotFound = errorClass('not_found', 'NotFound');
export const AlreadyExists = errorClass('already_exists', 'AlreadyExists');
export const NoSessionKey = errorClass('no_session_key', 'NoSessionKey');
/** Over a rate limit; `retryAfter` (ms, from the reply's RetryAfter) says when to try again. */
export const RateLimited = errorClass('rate_limited', 'RateLimited');
/**
 * The peer has not accepted the session: a message request holds only a few messages (and
 * key generations) until it does. Also the answer when the peer blocked you: the two look
 * the same on purpose (§11.6).
 */
export const NotAccepted = errorClass('not_accepted', 'NotAccepted');
export const InternalError = errorClass('internal', 'InternalError');
/** Client side only: no reply within the deadline. Resend the same envelope (§9.2). */
export const TimeoutError = errorClass('timeout', 'TimeoutError');
/** A message or session key that does not open: show it as undecryptable (§13.3). */
export class DecryptionFailed extends Error {
  constructor(message) {
    super(message);
    this.name = 'DecryptionFailed';
  }
}

export const ERRORS = Object.fromEntries(
  [
    MalformedRequest, PayloadTooLarge, InvalidSignature, StaleRequest, UnknownAction, Unauthorized,
    Forbidden, InvalidArgument, NotFound, AlreadyExists, NoSessionKey, RateLimited, NotAccepted, InternalError,
  ].map((cls) => [cls.code, cls]),
);

/** The typed error of an Err reply; an unknown code is treated like `internal` (§8). */
export function errorFor(code, message, requestId, retryAfter = undefined) {
  const cls = ERRORS[code];
  if (cls) {
    const error = new cls(message, requestId);
    if (retryAfter !== undefined) error.retryAfter = retryAfter;
    return error;
  }
  const error = new InternalError(`${code}: ${message}`, requestId);
  error.unknownCode = code;
  return error;
}

// --------------------------------------------------- §11.6 message requests

/**
 * A session's consent as one member sees it (§11.6), in GetChatList's Chat.State, in
 * SessionEstablished.State and in the reply to Accept, Block and Unblock:
 * accepted; incoming (a message request to you); outgoing (your request, not accepted
 * yet, or the peer blocked you: the two look the same); blocked (you blocked the peer).
 */
export const CONSENT_STATES = Object.freeze(['accepted', 'incoming', 'outgoing', 'blocked']);

/**
 * A notification with the defaults of fields that servers of an earlier version do not
 * send: a SessionEstablished without State is of an accepted session (§11.6).
 */
export function withDefaults(note) {
  if (note.Kind === 'SessionEstablished' && note.State === undefined) return { ...note, State: 'accepted' };
  return note;
}

// ------------------------------------------------------------ §3 identities

export class Identity {
  /** @param {Uint8Array} signingSeed 32 bytes @param {Uint8Array} boxSecret 32 bytes */
  constructor(signingSeed, boxSecret) {
    if (signingSeed.length !== 32 || boxSecret.length !== 32) throw new Error('seeds are 32 bytes');
    const pair = sodium.crypto_sign_seed_keypair(signingSeed);
    this.signingSeed = Uint8Array.from(signingSeed);
    this.signPublicKey = pair.publicKey;
    this._signSecret = pair.privateKey; // libsodium's seed ‖ public key
    this.boxSecretKey = Uint8Array.from(boxSecret);
    this.boxPublicKey = sodium.crypto_scalarmult_base(this.boxSecretKey); // X25519(secret, 9)
  }

  static generate() {
    return new Identity(randomBytes(32), randomBytes(32));
  }

  static fromJSON({ SigningSeed, BoxSecret }) {
    return new Identity(b64decode(SigningSeed, { length: 32 }), b64decode(BoxSecret, { length: 32 }));
  }

  toJSON() {
    return { SigningSeed: b64encode(this.signingSeed), BoxSecret: b64encode(this.boxSecretKey) };
  }

  /** The signer's address: base64url of the Ed25519 public key (the envelope's Owner). */
  get address() {
    return b64encode(this.signPublicKey);
  }

  /** The X25519 public key as it goes on the wire (BoxKey). */
  get boxPublic() {
    return b64encode(this.boxPublicKey);
  }

  /** Detached 64-byte Ed25519 signature. */
  sign(bytes) {
    return sodium.crypto_sign_detached(bytes, this._signSecret);
  }
}

// ------------------------------------------------------- §5–§6 the envelope

const DOMAIN = new TextEncoder().encode('aodm-envelope-v1');
const MAX_BODY = 96 * 1024;

function u32be(n) {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n);
  return b;
}

function str(s) {
  if (typeof s !== 'string') throw new TypeError(`expected a string, got ${typeof s}`);
  if (/\p{Surrogate}/u.test(s)) throw new TypeError('lone surrogate: not encodable as UTF-8');
  const bytes = Buffer.from(s, 'utf8');
  return [u32be(bytes.length), bytes];
}

/** The exact bytes that are signed (§6.1). Nothing is normalised. */
export function signingBytes({ Target, From, Owner, Anchor, Timestamp, Tags, Data }) {
  if (!Number.isSafeInteger(Timestamp) || Timestamp < 0) throw new TypeError('Timestamp: a non-negative integer');
  const parts = [DOMAIN];
  for (const s of [Target, From, Owner, Anchor, String(Timestamp)]) parts.push(...str(s));
  parts.push(u32be(Tags.length));
  for (const tag of Tags) parts.push(...str(tag.name), ...str(tag.value));
  parts.push(...str(Data));
  return new Uint8Array(Buffer.concat(parts));
}

/** Id = base64url(SHA-256(raw signature)) (§6.3). */
export function idOf(signature) {
  return b64encode(sha256(signature));
}

/**
 * Sign a request. `data` is the action's argument object (serialised here) or an already
 * serialised JSON string. `from` defaults to the signer's address. A random Anchor keeps
 * two otherwise identical requests distinct (§5.1).
 */
export function signEnvelope(identity, { target, from, action, data = {}, anchor, timestamp, tags = [] }) {
  const unsigned = {
    Target: target,
    From: from ?? identity.address,
    Owner: identity.address,
    Anchor: anchor ?? b64encode(randomBytes(16)),
    Timestamp: timestamp ?? Date.now(),
    Tags: [{ name: 'Action', value: action }, ...tags],
    Data: typeof data === 'string' ? data : JSON.stringify(data),
  };
  const signature = identity.sign(signingBytes(unsigned));
  return {
    Id: idOf(signature),
    ...unsigned,
    Signature: b64encode(signature),
  };
}

/**
 * Check an envelope as a service does (§6.3): Owner/Signature sizes (malformed_request),
 * the signature (invalid_signature), the Id (malformed_request), the time window
 * (stale_request). Returns the signer's raw public key.
 */
export function verifyEnvelope(env, { now = Date.now() } = {}) {
  const owner = b64decode(env.Owner, { length: 32, field: 'Owner' });
  const signature = b64decode(env.Signature, { length: 64, field: 'Signature' });
  if (!sodium.crypto_sign_verify_detached(signature, signingBytes(env), owner)) {
    throw new InvalidSignature('signature does not match the envelope and Owner');
  }
  if (env.Id !== idOf(signature)) throw new MalformedRequest('Id is not base64url(sha256(Signature))');
  if (env.Timestamp < now - 15 * 60 * 1000 || env.Timestamp > now + 2 * 60 * 1000) {
    throw new StaleRequest(`Timestamp ${env.Timestamp} is outside the window`);
  }
  return owner;
}

/** The action of an envelope: its one `Action` tag. */
export function actionOf(env) {
  const values = env.Tags.filter((t) => t.name === 'Action').map((t) => t.value);
  if (values.length !== 1) throw new MalformedRequest(`${values.length} 'Action' tags; exactly one is required`);
  return values[0];
}

// ------------------------------------------------------------------ §13 crypto

export function newSessionKey() {
  return new Uint8Array(randomBytes(32));
}

/** crypto_box_seal of a 32-byte session key to a member's BoxKey: SealedKey (80 bytes). */
export function sealSessionKey(sessionKey, boxPublic) {
  if (sessionKey.length !== 32) throw new Error('a session key is 32 bytes');
  return b64encode(sodium.crypto_box_seal(sessionKey, b64decode(boxPublic, { length: 32, field: 'BoxKey' })));
}

export function openSessionKey(sealedKey, identity) {
  let key;
  try {
    key = sodium.crypto_box_seal_open(
      b64decode(sealedKey, { length: 80, field: 'SealedKey' }),
      identity.boxPublicKey,
      identity.boxSecretKey,
    );
  } catch {
    throw new DecryptionFailed('the session key was not sealed to this identity');
  }
  if (key.length !== 32) throw new DecryptionFailed(`a session key is 32 bytes, this one ${key.length}`);
  return key;
}

/**
 * Where the deployment issues each handle its own broker user (Register's and
 * IssueBrokerCredentials' BrokerUser / SealedBrokerPassword), the AMQP URL to reconnect
 * with: `url` with that user and the password opened with our box key. null when none.
 */
export function brokerUrl(url, { BrokerUser, SealedBrokerPassword }, identity) {
  if (!BrokerUser) return null;
  let password;
  try {
    password = sodium.crypto_box_seal_open(
      b64decode(SealedBrokerPassword, { field: 'SealedBrokerPassword' }),
      identity.boxPublicKey,
      identity.boxSecretKey,
    );
  } catch {
    throw new DecryptionFailed('the broker password was not sealed to this identity');
  }
  const own = new URL(url);
  own.username = encodeURIComponent(BrokerUser);
  own.password = encodeURIComponent(new TextDecoder().decode(password));
  return own.toString();
}

/** Content = base64url(nonce ‖ crypto_secretbox_easy(utf8(text), nonce, key)). */
export function encrypt(sessionKey, text, nonce = randomBytes(24)) {
  const ct = sodium.crypto_secretbox_easy(Buffer.from(text, 'utf8'), nonce, sessionKey);
  return b64encode(Buffer.concat([nonce, ct]));
}

export function decrypt(sessionKey, content) {
  let bytes;
  try {
    bytes = b64decode(content, { field: 'Content' });
  } catch {
    throw new DecryptionFailed('Content is not base64url');
  }
  if (bytes.length < 24 + 16) throw new DecryptionFailed('Content is too short');
  let plain;
  try {
    plain = sodium.crypto_secretbox_open_easy(bytes.subarray(24), bytes.subarray(0, 24), sessionKey);
  } catch {
    throw new DecryptionFailed('message does not open with this session key');
  }
  try {
    return new TextDecoder('utf-8', { fatal: true }).decode(plain);
  } catch {
    throw new DecryptionFailed('plaintext is not UTF-8');
  }
}

/** base64url(SHA-256(utf8(RequestId + "\n" + Kind + "\n" + Handle))) (§12). */
export function notificationId(requestId, kind, handle) {
  return b64encode(sha256(Buffer.from(`${requestId}\n${kind}\n${handle}`, 'utf8')));
}

// -------------------------------------------------------------- §4 transport

export const REQUESTS = 'aodm.requests';
export const REGISTRY = 'registry';
const DIRECT_REPLY_TO = 'amq.rabbitmq.reply-to';
export const inboxQueue = (handle) => `aodm.inbox.${handle}`;

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

export class Client {
  /**
   * @param {string} url amqp://user:password@host:port/vhost
   * @param {Identity} identity
   * @param {{handle?: string, timeout?: number, replyQueue?: 'direct'|'exclusive'}} options
   *   timeout in ms (default 15 s); replyQueue: RabbitMQ direct reply-to (default; needs
   *   no configure permission) or an exclusive server-named queue.
   */
  static async connect(url, identity, { handle, timeout = 15000, replyQueue = 'direct' } = {}) {
    const connection = await amqp.connect(url, { clientProperties: { connection_name: `aodm-node-${handle ?? identity.address.slice(0, 8)}` } });
    try {
      const client = new Client(connection, identity, { handle, timeout });
      await client._open(replyQueue);
      return client;
    } catch (error) {
      await connection.close().catch(() => {});
      throw error;
    }
  }

  constructor(connection, identity, { handle, timeout }) {
    this.connection = connection;
    this.identity = identity;
    this.handle = handle;
    this.timeout = timeout;
    this._pending = new Map(); // correlation_id -> {resolve, reject, timer}
    this._keys = new Map(); // `${session}/${generation}` -> session key
    this._current = new Map(); // session -> current generation
    this._closed = false;
    connection.on('error', () => {}); // surfaced through 'close'
    connection.on('close', (error) => this._failAll(error ?? new Error('connection closed')));
  }

  async _open(replyQueue) {
    // Publisher confirms: a request is sent once the broker has confirmed it (§4.2).
    this.channel = await this.connection.createConfirmChannel();
    this.channel.on('error', () => {});
    this.channel.on('close', () => this._failAll(new Error('channel closed')));
    // mandatory publishes that found no queue come back here (a missing topology).
    this.channel.on('return', (message) => {
      const id = message.properties.correlationId;
      this._settle(id, (p) => p.reject(new Error(`request returned by the broker (unroutable): ${message.fields.replyText}`)));
    });
    if (replyQueue === 'direct') {
      // Direct reply-to: consume with no-ack on the publishing channel before publishing.
      this.replyTo = DIRECT_REPLY_TO;
      await this.channel.consume(DIRECT_REPLY_TO, (message) => this._onReply(message), { noAck: true });
    } else {
      const { queue } = await this.channel.assertQueue('', { exclusive: true, autoDelete: true, durable: false });
      this.replyTo = queue;
      await this.channel.consume(queue, (message) => this._onReply(message), { noAck: true });
    }
  }

  async close() {
    this._closed = true;
    this._failAll(new Error('client closed'));
    await this.connection.close().catch(() => {});
  }

  _settle(correlationId, action) {
    const pending = this._pending.get(correlationId);
    if (!pending) return;
    this._pending.delete(correlationId);
    clearTimeout(pending.timer);
    action(pending);
  }

  _failAll(error) {
    for (const id of [...this._pending.keys()]) this._settle(id, (p) => p.reject(error));
  }

  _onReply(message) {
    if (!message) return;
    const id = message.properties.correlationId;
    this._settle(id, (pending) => {
      let reply;
      try {
        reply = JSON.parse(message.content.toString('utf8'));
      } catch (error) {
        return pending.reject(new Error(`reply is not JSON: ${error.message}`));
      }
      if (reply.RequestId !== pending.env.Id && reply.RequestId !== '') {
        return pending.reject(new Error(`reply RequestId ${reply.RequestId} is not the request's Id ${pending.env.Id}`));
      }
      if (reply.Status === 'ok') return pending.resolve(reply.Result);
      if (reply.Status === 'error') return pending.reject(errorFor(reply.Code, reply.Message, reply.RequestId, reply.RetryAfter));
      return pending.reject(new Error(`reply with unknown Status ${JSON.stringify(reply.Status)}`));
    });
  }

  /**
   * Publish a signed envelope (confirmed) and return a promise of its result. The returned
   * promise rejects with the typed error of an Err reply, or TimeoutError: then resend the
   * *same* envelope with submit(env) to learn the outcome (§9.2).
   */
  async submit(env) {
    if (this._closed) throw new Error('client closed');
    const body = Buffer.from(JSON.stringify(env), 'utf8');
    if (body.length > MAX_BODY) throw new PayloadTooLarge(`request body is ${body.length} bytes`);
    const correlationId = randomUUID();
    const result = new Promise((resolve, reject) => {
      const timer = setTimeout(
        () => this._settle(correlationId, (p) => p.reject(new TimeoutError(`no reply to ${actionOf(env)} within ${this.timeout} ms`, env.Id))),
        this.timeout,
      );
      this._pending.set(correlationId, { resolve, reject, timer, env });
    });
    result.catch(() => {}); // the caller may await it later; never an unhandled rejection
    await new Promise((resolve, reject) => {
      this.channel.publish(
        REQUESTS,
        env.Target,
        body,
        {
          contentType: 'application/json',
          replyTo: this.replyTo,
          correlationId,
          deliveryMode: 2,
          mandatory: true,
        },
        (error) => {
          if (!error) return resolve();
          this._settle(correlationId, (p) => p.reject(error));
          reject(new Error('the broker did not confirm the request (nack): resend the same envelope'));
        },
      );
    });
    return { id: env.Id, result };
  }

  async request(env) {
    const { result } = await this.submit(env);
    return result;
  }

  sign(target, action, data = {}, { asHandle = true } = {}) {
    if (asHandle && !this.handle) throw new Error(`${action} acts as a handle: register or pass {handle}`);
    return signEnvelope(this.identity, { target, action, data, from: asHandle ? this.handle : this.identity.address });
  }

  call(target, action, data = {}, options = {}) {
    return this.request(this.sign(target, action, data, options));
  }

  // ---- §10 registry actions

  async register(handle) {
    const result = await this.call(REGISTRY, 'Register', { Handle: handle, BoxKey: this.identity.boxPublic }, { asHandle: false });
    this.handle = handle;
    return result;
  }

  queryHandle(handle) {
    return this.call(REGISTRY, 'QueryHandle', { Handle: handle }, { asHandle: false });
  }

  getHandles(owner = this.identity.address) {
    return this.call(REGISTRY, 'GetHandles', { Owner: owner }, { asHandle: false });
  }

  querySession(handleA, handleB) {
    return this.call(REGISTRY, 'QuerySession', { HandleA: handleA, HandleB: handleB }, { asHandle: false });
  }

  establishSession(peer) {
    return this.call(REGISTRY, 'EstablishSession', { Handle: peer });
  }

  /** Each Chat has its State (CONSENT_STATES; 'accepted' from a server that sends none). */
  async getChatList() {
    const list = await this.call(REGISTRY, 'GetChatList', {});
    return { ...list, Chats: list.Chats.map((chat) => ({ ...chat, State: chat.State ?? 'accepted' })) };
  }

  issueBrokerCredentials() {
    return this.call(REGISTRY, 'IssueBrokerCredentials', {});
  }

  // ---- §11 session actions

  /** Seal a session key (fresh unless given) to both members' registered box keys. */
  async rotateSessionKey(sessionId, peer, sessionKey = newSessionKey()) {
    const handles = [...new Set([this.handle, peer])].sort();
    const keys = [];
    for (const handle of handles) {
      const boxKey = handle === this.handle ? this.identity.boxPublic : (await this.queryHandle(handle)).BoxKey;
      keys.push({ Handle: handle, BoxKey: boxKey, SealedKey: sealSessionKey(sessionKey, boxKey) });
    }
    const { Generation } = await this.call(sessionId, 'RotateSessionKey', { Keys: keys });
    this._keys.set(`${sessionId}/${Generation}`, sessionKey);
    this._current.set(sessionId, Generation);
    return Generation;
  }

  getCurrentKey(sessionId) {
    return this.call(sessionId, 'GetCurrentKey', {});
  }

  getKeyByGeneration(sessionId, generation) {
    return this.call(sessionId, 'GetKeyByGeneration', { Generation: generation });
  }

  /** generation: the key batch content is encrypted under (required: only the sender knows it, §11.4). */
  sendMessage(sessionId, content, generation) {
    if (!Number.isInteger(generation)) throw new TypeError('sendMessage: generation (the key batch of content) is required');
    return this.call(sessionId, 'SendMessage', { Content: content, Generation: generation });
  }

  /** One page; query = {From, Until, Limit, Order, Cursor} (all optional). */
  queryMessage(sessionId, query = {}) {
    return this.call(sessionId, 'QueryMessage', query);
  }

  /** Every message matching the query, following NextCursor to the end. */
  async history(sessionId, query = {}) {
    const messages = [];
    let cursor = null;
    do {
      const page = await this.queryMessage(sessionId, cursor === null ? query : { ...query, Cursor: cursor });
      messages.push(...page.Messages);
      cursor = page.NextCursor;
    } while (cursor !== null);
    return messages;
  }

  // ---- §11.6 message requests: each resolves to the session's State as the caller sees it

  /** Accept the peer's message request, or lift your own block. */
  async accept(sessionId) {
    return (await this.call(sessionId, 'Accept', {})).State;
  }

  /** Refuse the peer's messages from now on (it is answered not_accepted, and not told why). */
  async block(sessionId) {
    return (await this.call(sessionId, 'Block', {})).State;
  }

  /** Lift your block: then accepted (outgoing if it was your own request, still unanswered). */
  async unblock(sessionId) {
    return (await this.call(sessionId, 'Unblock', {})).State;
  }

  // ---- plaintext on top

  _openBatch(sessionId, batch) {
    const mine = batch.Keys.find((k) => k.Handle === this.handle);
    if (!mine) throw new DecryptionFailed(`generation ${batch.Generation} holds no key for ${this.handle}`);
    const key = openSessionKey(mine.SealedKey, this.identity);
    this._keys.set(`${sessionId}/${batch.Generation}`, key);
    return key;
  }

  /** [generation, key] of a generation (default: current), fetched and opened once. */
  async sessionKey(sessionId, generation = null) {
    if (generation === null) {
      generation = this._current.get(sessionId) ?? null;
      if (generation === null) {
        const batch = await this.getCurrentKey(sessionId);
        this._current.set(sessionId, batch.Generation);
        return [batch.Generation, this._openBatch(sessionId, batch)];
      }
    }
    const cached = this._keys.get(`${sessionId}/${generation}`);
    if (cached) return [generation, cached];
    return [generation, this._openBatch(sessionId, await this.getKeyByGeneration(sessionId, generation))];
  }

  async sendText(sessionId, text) {
    const [generation, key] = await this.sessionKey(sessionId);
    return this.sendMessage(sessionId, encrypt(key, text), generation);
  }

  async decrypt(sessionId, generation, content) {
    const [, key] = await this.sessionKey(sessionId, generation);
    return decrypt(key, content);
  }

  // ---- §4.4 notifications

  /**
   * Consume the handle's queue aodm.inbox.<handle> (declares nothing). Calls
   * onNotification(note) for each notification not seen before (dropping duplicates by
   * Id), with withDefaults applied, and acks it once the callback's promise resolves. The
   * queue is created by the services shortly after Register; until it exists, retry for
   * up to `wait` ms.
   */
  async consumeInbox(
    onNotification,
    { handle = this.handle, wait = 10000, prefetch = 100, onError = (e) => console.error(e) } = {},
  ) {
    const queue = inboxQueue(handle);
    const seen = new Set();
    const inbox = { dropped: 0, cancel: async () => {} };
    const deadline = Date.now() + wait;
    for (;;) {
      const channel = await this.connection.createChannel();
      channel.on('error', () => {});
      try {
        await channel.prefetch(prefetch);
        const { consumerTag } = await channel.consume(queue, async (message) => {
          if (!message) return;
          let note;
          try {
            note = JSON.parse(message.content.toString('utf8'));
          } catch {
            note = null;
          }
          if (!isNotification(note)) {
            // Not a notification (anyone who can write to the queue may have put it there):
            // dropped and counted, never handed on, never left to come back.
            inbox.dropped += 1;
            return channel.ack(message);
          }
          if (!seen.has(note.Id)) {
            try {
              await onNotification(withDefaults(note));
            } catch (error) {
              onError(error);
              return channel.nack(message, false, true); // not processed: back to the queue
            }
            seen.add(note.Id);
          }
          channel.ack(message);
        });
        inbox.cancel = async () => { await channel.cancel(consumerTag).catch(() => {}); await channel.close().catch(() => {}); };
        return inbox;
      } catch (error) {
        await channel.close().catch(() => {});
        if (error.code !== 404 || Date.now() >= deadline) throw error;
        await sleep(100); // 404 NOT_FOUND: servers before created the queue just after Register answered (§4.4)
      }
    }
  }
}
