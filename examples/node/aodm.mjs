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
// confirm channel with direct reply-to, the inbox), a handle's devices (§10.8: the device
// log, replayed and verified here with verifyLog; device codes; getDeviceLog, addDevice,
// removeDevice), message requests (§11.6: accept, block, unblock, the State of chats and
// of SessionEstablished), session-key sealing and messages (§13).
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
const utf8 = (text) => new Uint8Array(Buffer.from(text, 'utf8'));

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
/** A member's devices changed since the key batch the message names: rotate, send under the new one (§10.8). */
export const KeyOutdated = errorClass('key_outdated', 'KeyOutdated');
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
    Forbidden, InvalidArgument, NotFound, AlreadyExists, NoSessionKey, RateLimited, NotAccepted, KeyOutdated,
    InternalError,
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

  /** This key's device id in any handle it is a device of (§10.8). */
  get deviceId() {
    return deviceId(this.signPublicKey);
  }

  /** Detached 64-byte Ed25519 signature. */
  sign(bytes) {
    return sodium.crypto_sign_detached(bytes, this._signSecret);
  }
}

// ------------------------------------------------------- §5–§6 the envelope

const DOMAIN = new TextEncoder().encode('aodm-envelope-v1');
const MAX_BODY = 96 * 1024;
const MAX_DATA = 64 * 1024;

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
 * (stale_request; not with `fresh` false, for an envelope kept in a device log).
 * Returns the signer's raw public key.
 */
export function verifyEnvelope(env, { now = Date.now(), fresh = true } = {}) {
  const owner = b64decode(env.Owner, { length: 32, field: 'Owner' });
  const signature = b64decode(env.Signature, { length: 64, field: 'Signature' });
  if (!sodium.crypto_sign_verify_detached(signature, signingBytes(env), owner)) {
    throw new InvalidSignature('signature does not match the envelope and Owner');
  }
  if (env.Id !== idOf(signature)) throw new MalformedRequest('Id is not base64url(sha256(Signature))');
  if (fresh && (env.Timestamp < now - 15 * 60 * 1000 || env.Timestamp > now + 2 * 60 * 1000)) {
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

// Strict JSON reading, as the services read a request: a missing, unknown or wrongly typed
// field is malformed_request, and so is a key twice in one object of an envelope (§5).

function parseJson(text, what) {
  try {
    return JSON.parse(text);
  } catch (error) {
    throw new MalformedRequest(`${what}: not JSON (${error.message})`);
  }
}

/** The keys some object of a (valid) JSON text holds more than once. */
export function duplicateKeys(text) {
  const found = new Set();
  const open = []; // per open container: the keys seen (an object) or null (an array)
  let expectKey = false;
  for (let i = 0; i < text.length; i += 1) {
    const c = text[i];
    if (c === '"') {
      let end = i + 1;
      while (text[end] !== '"') end += text[end] === '\\' ? 2 : 1;
      if (expectKey) {
        const key = JSON.parse(text.slice(i, end + 1));
        if (open.at(-1).has(key)) found.add(key);
        open.at(-1).add(key);
        expectKey = false;
      }
      i = end;
    } else if (c === '{' || c === '[') {
      open.push(c === '{' ? new Set() : null);
      expectKey = c === '{';
    } else if (c === '}' || c === ']') {
      open.pop();
      expectKey = false;
    } else if (c === ',') {
      expectKey = open.at(-1) instanceof Set;
    }
  }
  return [...found].sort();
}

const isString = (v) => typeof v === 'string';
const isObject = (v) => v !== null && typeof v === 'object' && !Array.isArray(v);

/**
 * `value` read as an object of exactly the fields of `spec` (field -> [check, default?]; a
 * field without a default is required). Returns the fields, defaults filled in.
 */
function strictObject(value, what, spec) {
  if (!isObject(value)) throw new MalformedRequest(`${what}: expected an object`);
  for (const key of Object.keys(value)) {
    if (!Object.hasOwn(spec, key)) throw new MalformedRequest(`${what}: unknown field ${JSON.stringify(key)}`);
  }
  const fields = {};
  for (const [key, [check, ...fallback]] of Object.entries(spec)) {
    if (!Object.hasOwn(value, key)) {
      if (!fallback.length) throw new MalformedRequest(`${what}: missing field ${key}`);
      fields[key] = fallback[0];
    } else if (!check(value[key])) {
      throw new MalformedRequest(`${what}: ${key} has the wrong type or value`);
    } else {
      fields[key] = value[key];
    }
  }
  return fields;
}

const ENVELOPE_FIELDS = {
  Id: [isString], Target: [isString], From: [isString], Owner: [isString], Anchor: [isString],
  Timestamp: [Number.isSafeInteger], Tags: [Array.isArray], Data: [isString], Signature: [isString],
};
const codePoints = (s) => [...s].length;

/**
 * Read an envelope's JSON text as a service does before checking its signature (§5.2):
 * exactly its fields (no key twice), within the limits. Returns the envelope object.
 */
export function decodeEnvelope(text) {
  const size = Buffer.byteLength(text, 'utf8');
  if (size > MAX_BODY) throw new PayloadTooLarge(`request body is ${size} bytes; the cap is ${MAX_BODY}`);
  const env = strictObject(parseJson(text, 'envelope'), 'envelope', ENVELOPE_FIELDS);
  env.Tags = env.Tags.map((tag) => strictObject(tag, 'envelope tag', { name: [isString], value: [isString] }));
  const twice = duplicateKeys(text);
  if (twice.length) throw new MalformedRequest(`envelope: a key appears twice: ${twice.join(', ')}`);
  if (Buffer.byteLength(env.Data, 'utf8') > MAX_DATA) throw new PayloadTooLarge(`Data is over the cap of ${MAX_DATA} bytes`);
  if (env.Tags.length > 16) throw new PayloadTooLarge(`${env.Tags.length} tags; the cap is 16`);
  if (env.Tags.some((t) => codePoints(t.name) > 64 || codePoints(t.value) > 256)) {
    throw new PayloadTooLarge('a tag name or value is over its cap');
  }
  const texts = [env.Target, env.From, env.Owner, env.Anchor, env.Data, ...env.Tags.flatMap((t) => [t.name, t.value])];
  if (texts.some((t) => t.includes('\0')) || env.Data.includes('\\u0000')) throw new MalformedRequest('NUL characters are not allowed');
  for (const field of ['Target', 'From', 'Anchor']) {
    if (codePoints(env[field]) > 64) throw new MalformedRequest(`${field} is over 64 characters`);
  }
  return env;
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

// ------------------------------------------------------------ §10.8 devices

// A handle has one or more devices (each its own Ed25519 and X25519 keys), and may have
// recovery keys (an Ed25519 key kept offline that can only add and remove devices). Every
// change is an entry of the handle's append-only device log:
//   - entry 1 is the registration, {"Op":"register","Handle","SignKey","BoxKey"};
//   - every later one is the signed envelope of the AddDevice or RemoveDevice that made it,
//     chained by its Prev (the hash of the entry before), signed by a device (or recovery
//     key) current at that point; an added key signs its own claim too (Proof).
// DeviceLog.apply is the rule book; verifyLog replays a whole log to learn, without trusting
// the server, which devices a handle has now.

export const CLAIM_DOMAIN = 'aodm-device-v1';

/** A device's name within its handle: the first 16 hex digits of SHA-256(raw SignKey). */
export function deviceId(signKey) {
  return Buffer.from(sha256(signKey)).toString('hex').slice(0, 16);
}

/** What a new key signs to be added to `handle` (its Proof). */
export function claimBytes(handle, { SignKey, BoxKey = null, Kind = 'device' }) {
  return utf8([CLAIM_DOMAIN, handle, SignKey, BoxKey ?? '', Kind].join('\n'));
}

/** base64url(SHA-256(entry)); an entry is its UTF-8 text (LogEntry.Entry) or its bytes. */
export function entryHash(entry) {
  return b64encode(sha256(typeof entry === 'string' ? utf8(entry) : entry));
}

/** Entry 1 of every handle's log. */
export function genesisEntry(handle, signKey, boxKey) {
  return JSON.stringify({ Op: 'register', Handle: handle, SignKey: signKey, BoxKey: boxKey });
}

/** A device's own notification queue: the first device keeps the handle's (§4.4). */
export function deviceInbox(handle, id, addedSeq) {
  return addedSeq === 1 ? inboxQueue(handle) : `${inboxQueue(handle)}.${id}`;
}

const DEVICE_KEYS = {
  SignKey: [isString],
  BoxKey: [(v) => v === null || isString(v), null],
  Kind: [(v) => v === 'device' || v === 'recovery', 'device'],
};
const readDeviceKeys = (value, what) => strictObject(value, what, DEVICE_KEYS);
const readData = (text, what, spec) => strictObject(parseJson(text, what), what, spec);

/**
 * A handle's log as replayed up to `seq`: its current devices (DeviceId -> {DeviceId, Kind,
 * SignKey, BoxKey, AddedSeq}, as GetDeviceLog's Devices), every device id it ever named (a
 * removed key is never taken back), and the hash the next entry must name as its Prev.
 * `apply` returns the log after one more entry, or throws the entry's typed error.
 */
export class DeviceLog {
  constructor(handle, { seq = 0, head = '', devices = new Map(), ever = new Set() } = {}) {
    this.handle = handle;
    this.seq = seq;
    this.head = head;
    this.devices = devices;
    this.ever = ever;
    Object.freeze(this);
  }

  /** The current device (or, to change devices, recovery key) that signed as `owner`. */
  signer(owner, action) {
    const found = this.devices.get(deviceId(b64decode(owner, { length: 32, field: 'Owner' })));
    if (!found || found.SignKey !== owner) throw new Unauthorized(`the key that signed is no current device of ${this.handle}`);
    if (found.Kind === 'recovery' && action !== 'AddDevice' && action !== 'RemoveDevice') {
      throw new Unauthorized('a recovery key may only add and remove devices');
    }
    return found;
  }

  apply(entry) {
    const text = typeof entry === 'string' ? entry : new TextDecoder('utf-8', { fatal: true }).decode(entry);
    if (this.seq === 0) return this._register(text);
    const env = decodeEnvelope(text);
    verifyEnvelope(env, { fresh: false }); // an entry keeps its old Timestamp
    if (env.From !== this.handle || env.Target !== "registry") {
      throw new InvalidArgument(`a log entry of ${env.From} to ${env.Target} in the log of ${this.handle}`);
    }
    const action = actionOf(env);
    const signer = this.signer(env.Owner, action);
    if (action === 'AddDevice') {
      const add = readData(env.Data, 'AddDevice', { Device: [isObject], Proof: [isString], Prev: [isString] });
      return this._add({ ...add, Device: readDeviceKeys(add.Device, 'AddDevice.Device') }, text);
    }
    if (action === 'RemoveDevice') {
      const remove = readData(env.Data, 'RemoveDevice', { DeviceId: [(v) => isString(v) && /^[0-9a-f]{16}$/.test(v)], Prev: [isString] });
      return this._remove(remove, signer, text);
    }
    throw new InvalidArgument(`${action} is no device log entry`);
  }

  _next(entry, prev, devices, ever) {
    if (prev !== this.head) throw new InvalidArgument(`Prev names another head of ${this.handle}'s device log (it is at entry ${this.seq})`);
    return new DeviceLog(this.handle, { seq: this.seq + 1, head: entryHash(entry), devices, ever });
  }

  _register(entry) {
    const first = readData(entry, 'device log entry 1', {
      Op: [(v) => v === 'register'], Handle: [isString], SignKey: [isString], BoxKey: [isString],
    });
    if (first.Handle !== this.handle) throw new InvalidArgument(`the log of ${this.handle} begins with ${first.Handle}`);
    const id = deviceId(b64decode(first.SignKey, { length: 32, field: 'SignKey' }));
    const device = { DeviceId: id, Kind: 'device', SignKey: first.SignKey, BoxKey: first.BoxKey, AddedSeq: 1 };
    return new DeviceLog(this.handle, { seq: 1, head: entryHash(entry), devices: new Map([[id, device]]), ever: new Set([id]) });
  }

  _add({ Device: keys, Proof, Prev }, entry) {
    const key = b64decode(keys.SignKey, { length: 32, field: 'SignKey' });
    if ((keys.Kind === 'device') !== (keys.BoxKey !== null)) throw new InvalidArgument('a device has a BoxKey and a recovery key none');
    if (keys.BoxKey !== null) b64decode(keys.BoxKey, { length: 32, field: 'BoxKey' });
    const proof = b64decode(Proof, { length: 64, field: 'Proof' });
    if (!sodium.crypto_sign_verify_detached(proof, claimBytes(this.handle, keys), key)) {
      throw new InvalidArgument("Proof is not the new key's signature of its claim"); // the envelope itself is well signed
    }
    const id = deviceId(key);
    if (this.ever.has(id)) throw new InvalidArgument(`device ${id} was a device of ${this.handle} before: a key is never taken back`);
    const device = { DeviceId: id, Kind: keys.Kind, SignKey: keys.SignKey, BoxKey: keys.BoxKey, AddedSeq: this.seq + 1 };
    return this._next(entry, Prev, new Map([...this.devices, [id, device]]), new Set([...this.ever, id]));
  }

  _remove({ DeviceId: id, Prev }, signer, entry) {
    if (!this.devices.has(id)) throw new InvalidArgument(`${this.handle} has no device ${id}`);
    if (id === signer.DeviceId) throw new Forbidden('a device is removed by another device (or a recovery key), not by itself');
    const left = new Map([...this.devices].filter(([other]) => other !== id));
    if (![...left.values()].some((d) => d.Kind === 'device')) throw new InvalidArgument(`${this.handle} would keep no device`);
    return this._next(entry, Prev, left, this.ever);
  }
}

/** Replay a handle's whole log (every entry from the first): the devices it has now. */
export function verifyLog(handle, entries) {
  let log = new DeviceLog(handle);
  for (const entry of entries) log = log.apply(entry);
  return log;
}

/**
 * What a person carries from a new device to one already added (Client.addDevice): the new
 * keys and their signed claim, as one base64url string. `boxPublic` null: a recovery key.
 */
export function deviceCode(handle, identity, boxPublic = identity.boxPublic) {
  const keys = { SignKey: identity.address, BoxKey: boxPublic ?? null, Kind: boxPublic ? 'device' : 'recovery' };
  const Proof = b64encode(identity.sign(claimBytes(handle, keys)));
  return b64encode(utf8(JSON.stringify({ Handle: handle, Device: keys, Proof })));
}

/** {Handle, Device, Proof} of a deviceCode; MalformedRequest if it is not one. */
export function readDeviceCode(code) {
  let text;
  try {
    text = new TextDecoder('utf-8', { fatal: true }).decode(b64decode(code.trim(), { field: 'device code' }));
  } catch (error) {
    if (error instanceof MalformedRequest) throw error;
    throw new MalformedRequest('not a device code: not UTF-8');
  }
  const read = readData(text, 'device code', { Handle: [isString], Device: [isObject], Proof: [isString] });
  return { ...read, Device: readDeviceKeys(read.Device, 'device code Device') };
}

// -------------------------------------------------------------- §4 transport

export const REQUESTS = 'aodm.requests';
export const REGISTRY = 'registry';
const DIRECT_REPLY_TO = 'amq.rabbitmq.reply-to';
export const inboxQueue = (handle) => `aodm.inbox.${handle}`;

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

const DEVICES_SETTLE_TRIES = 6; // ~2 s, as the Python client

/** call(), again a moment later while it is refused for a device list the session workers
 * have not caught up with (they learn of a change a moment after the registry). */
async function onceDevicesSettle(call) {
  for (let attempt = 1; attempt < DEVICES_SETTLE_TRIES; attempt += 1) {
    try {
      return await call();
    } catch (err) {
      if (!(err instanceof InvalidArgument) || !err.message.includes('current device')) throw err;
      await sleep(100 * attempt);
    }
  }
  return call();
}

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

  // ---- §10.8 devices

  /** This identity's device id (the same in every handle it is a device of). */
  get deviceId() {
    return this.identity.deviceId;
  }

  /**
   * `handle`'s device log (default: this client's), every page of it, replayed here by the
   * protocol's rules (verifyLog): a DeviceLog whose `devices` are the handle's devices now,
   * whatever the server says. Throws the typed error of an entry that may not follow, or
   * InvalidArgument when the server's own Head or Devices are not what the log says.
   */
  async getDeviceLog(handle = this.handle) {
    if (!handle) throw new Error('getDeviceLog: whose? register, pass {handle} or name one');
    const entries = [];
    let page;
    do {
      page = await this.call(REGISTRY, 'GetDeviceLog', { Handle: handle, After: entries.length }, { asHandle: false });
      entries.push(...page.Entries.map((e) => e.Entry));
    } while (entries.length < page.Seq && page.Entries.length > 0);
    const log = verifyLog(handle, entries);
    const listed = page.Devices.map((d) => d.DeviceId);
    if (log.head !== page.Head || listed.length !== log.devices.size || !listed.every((id) => log.devices.has(id))) {
      throw new InvalidArgument(`the registry's device list of ${handle} is not what its log says`);
    }
    return log;
  }

  /** Add the device whose `code` (deviceCode, made on the new device) is given, signed by this one. */
  async addDevice(code) {
    const { Handle, Device, Proof } = readDeviceCode(code);
    if (Handle !== this.handle) throw new InvalidArgument(`the code is for ${Handle}, not ${this.handle}`);
    const log = await this.getDeviceLog();
    return this.call(REGISTRY, 'AddDevice', { Device, Proof, Prev: log.head });
  }

  /** Remove another device of this handle: its queue and broker login go, its key is refused from then on. */
  async removeDevice(id) {
    const log = await this.getDeviceLog();
    return this.call(REGISTRY, 'RemoveDevice', { DeviceId: id, Prev: log.head });
  }

  /** This device's own notification queue (every device of a handle gets every notification). */
  async inboxQueue() {
    const log = await this.getDeviceLog();
    const mine = log.devices.get(this.deviceId);
    if (!mine) throw new Error(`this identity is no current device of ${this.handle}`);
    return deviceInbox(this.handle, mine.DeviceId, mine.AddedSeq);
  }

  // ---- §11 session actions

  /** Seal a session key (fresh unless given) to every current device of both members,
   * each read from the member's device log as verified here (§10.8, §11.1). */
  async rotateSessionKey(sessionId, peer, sessionKey = newSessionKey()) {
    const handles = [...new Set([this.handle, peer])].sort();
    const keys = [];
    for (const handle of handles) {
      for (const BoxKey of await this._deviceBoxes(handle)) keys.push({ Handle: handle, BoxKey, SealedKey: sealSessionKey(sessionKey, BoxKey) });
    }
    const { Generation } = await this.call(sessionId, 'RotateSessionKey', { Keys: keys });
    this._keys.set(`${sessionId}/${Generation}`, sessionKey);
    this._current.set(sessionId, Generation);
    return Generation;
  }

  /** The box keys of `handle`'s current devices, oldest first, from its log as verified here. */
  async _deviceBoxes(handle) {
    const log = await this.getDeviceLog(handle);
    return [...log.devices.values()].filter((d) => d.Kind === 'device' && d.BoxKey)
      .sort((a, b) => a.AddedSeq - b.AddedSeq).map((d) => d.BoxKey);
  }

  /**
   * Give this handle's other current devices every key of the session that this device can
   * open and they lack (a device added after those keys were sealed), so they read the
   * history too: ShareKeys for each such generation. Resolves to how many keys were added.
   */
  async shareKeys(sessionId) {
    let current;
    try {
      current = (await this.getCurrentKey(sessionId)).Generation;
    } catch (err) {
      if (err instanceof NoSessionKey) return 0;
      throw err;
    }
    let added = 0;
    const boxes = await this._deviceBoxes(this.handle);
    for (let generation = 1; generation <= current; generation += 1) {
      const batch = await this.getKeyByGeneration(sessionId, generation);
      const have = new Set(batch.Keys.filter((k) => k.Handle === this.handle).map((k) => k.BoxKey));
      const missing = boxes.filter((box) => !have.has(box));
      if (!have.has(this.identity.boxPublic) || missing.length === 0) continue; // not this device's to give, or nothing to give
      const key = this._openBatch(sessionId, batch);
      const keys = missing.map((BoxKey) => ({ Handle: this.handle, BoxKey, SealedKey: sealSessionKey(key, BoxKey) }));
      const shared = await onceDevicesSettle(() => this.call(sessionId, 'ShareKeys', { Generation: generation, Keys: keys }));
      added += shared.Added;
    }
    return added;
  }

  /** shareKeys in every session of this handle: run it on an old device after adding a
   * new one. Resolves to how many keys were added. */
  async shareHistory() {
    let added = 0;
    for (const { SessionId } of (await this.getChatList()).Chats) added += await this.shareKeys(SessionId);
    return added;
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
    const mine = batch.Keys.find((k) => k.Handle === this.handle && k.BoxKey === this.identity.boxPublic);
    if (!mine) throw new DecryptionFailed(`generation ${batch.Generation} holds no key for this device of ${this.handle}`);
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

  /** Encrypt under the current key and send; if a member's devices changed since that key
   * (KeyOutdated: nothing was stored), seal a new one to the devices of now and send under it. */
  async sendText(sessionId, text) {
    const [generation, key] = await this.sessionKey(sessionId);
    try {
      return await this.sendMessage(sessionId, encrypt(key, text), generation);
    } catch (err) {
      if (!(err instanceof KeyOutdated)) throw err;
      const batch = await this.getCurrentKey(sessionId);
      const peer = batch.Keys.map((k) => k.Handle).find((h) => h !== this.handle) ?? this.handle;
      const rotated = await this.rotateSessionKey(sessionId, peer);
      const [, fresh] = await this.sessionKey(sessionId, rotated);
      return this.sendMessage(sessionId, encrypt(fresh, text), rotated);
    }
  }

  async decrypt(sessionId, generation, content) {
    const [, key] = await this.sessionKey(sessionId, generation);
    return decrypt(key, content);
  }

  // ---- §4.4 notifications

  /**
   * Consume the handle's queue aodm.inbox.<handle>, or `queue` (a later device's own:
   * inboxQueue()) (declares nothing). Calls
   * onNotification(note) for each notification not seen before (dropping duplicates by
   * Id), with withDefaults applied, and acks it once the callback's promise resolves. The
   * queue is created by the services shortly after Register; until it exists, retry for
   * up to `wait` ms.
   */
  async consumeInbox(
    onNotification,
    { handle = this.handle, queue = inboxQueue(handle), wait = 10000, prefetch = 100, onError = (e) => console.error(e) } = {},
  ) {
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
