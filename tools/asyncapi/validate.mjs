// Validate docs/asyncapi.yaml with the official AsyncAPI parser (@asyncapi/parser), then
// check that the document's JSON Schemas accept its own examples and the repository's
// test vectors (tests/vectors/), so the schemas cannot drift from the wire format.
//
//   cd tools/asyncapi && npm ci --no-audit --no-fund && node validate.mjs [asyncapi.yaml]
//
// Prints every diagnostic; exits 1 if any has severity "error" or any check fails, 2 if a
// file cannot be read.
import { readFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Parser, DiagnosticSeverity } from '@asyncapi/parser';
import Ajv from 'ajv';

const here = dirname(fileURLToPath(import.meta.url));
const root = resolve(here, '../..');
const file = resolve(process.argv[2] ?? resolve(root, 'docs/asyncapi.yaml'));

let text;
try {
  text = await readFile(file, 'utf8');
} catch (err) {
  console.error(`cannot read ${file}: ${err.message}`);
  process.exit(2);
}

const severityName = { 0: 'error', 1: 'warning', 2: 'info', 3: 'hint' };
const { document, diagnostics } = await new Parser().parse(text, { source: file });

let errors = 0;
const fail = (message) => {
  errors += 1;
  console.error(`error ${message}`);
};

for (const d of diagnostics) {
  const where = d.path && d.path.length ? d.path.join('.') : '(root)';
  const line = d.range ? `:${d.range.start.line + 1}` : '';
  const message = `${d.code} ${file}${line} at ${where}: ${d.message}`;
  if (d.severity === DiagnosticSeverity.Error) fail(message);
  else console.log(`${severityName[d.severity] ?? d.severity} ${message}`);
}
if (!document) {
  console.error(`${file}: ${errors} error(s); not a valid AsyncAPI document`);
  process.exit(1);
}

// ---- the schemas against examples and vectors ------------------------------------------
// AsyncAPI Schema is a superset of JSON Schema draft 07; the parser has dereferenced it.
const ajv = new Ajv({ strict: false, allErrors: true });
const compiled = new Map();
const validator = (schema) => {
  if (!compiled.has(schema)) compiled.set(schema, ajv.compile(schema));
  return compiled.get(schema);
};
const check = (what, schema, value, expectValid = true) => {
  const validate = validator(schema);
  const ok = validate(value);
  if (ok && !expectValid) fail(`${what}: accepted, but it must be rejected`);
  if (!ok && expectValid) fail(`${what}: ${ajv.errorsText(validate.errors)}`);
  return ok;
};
const components = document.components();
const messageById = (id) => components.messages().get(id);
const schemaById = (id) => {
  const schema = components.schemas().get(id);
  if (!schema) fail(`components.schemas.${id} is missing`);
  return schema?.json();
};
// The object schema of an <Action>Request's Data string (its contentSchema).
const dataSchemaOf = (message) =>
  message.payload().json().allOf?.[1]?.properties?.Data?.contentSchema;

let examples = 0;
for (const message of components.messages()) {
  const payload = message.payload()?.json();
  for (const [i, example] of message.examples().all().entries()) {
    examples += 1;
    const what = `components.messages.${message.id()}.examples[${i}]`;
    if (payload && example.hasPayload()) check(`${what}.payload`, payload, example.payload());
    if (message.headers() && example.hasHeaders()) check(`${what}.headers`, message.headers().json(), example.headers());
    const dataSchema = dataSchemaOf(message);
    if (dataSchema && example.hasPayload()) {
      check(`${what}.payload.Data`, dataSchema, JSON.parse(example.payload().Data));
    }
  }
}
for (const schema of components.schemas()) {
  for (const [i, example] of (schema.examples() ?? []).entries()) {
    examples += 1;
    check(`components.schemas.${schema.id()}.examples[${i}]`, schema.json(), example);
  }
}

let vectors = 0;
const vectorDir = resolve(root, 'tests/vectors');
const loadVector = async (name) => JSON.parse(await readFile(resolve(vectorDir, name), 'utf8'));
if (existsSync(vectorDir)) {
  // Each signed envelope is a valid request of its action; its Data matches the action's
  // schema, except in the case whose handle is deliberately invalid ("zoë 😀").
  const invalidData = new Set(['multi-tag-non-ascii']);
  for (const c of (await loadVector('envelope.json')).Envelopes) {
    vectors += 1;
    const action = c.Envelope.Tags.find((t) => t.name === 'Action')?.value;
    const message = messageById(`${action}Request`);
    if (!message) {
      fail(`vector ${c.Name}: no message ${action}Request`);
      continue;
    }
    check(`vector ${c.Name} as Envelope`, schemaById('Envelope'), c.Envelope);
    check(`vector ${c.Name} as ${action}Request`, message.payload().json(), c.Envelope);
    check(`vector ${c.Name} Data`, dataSchemaOf(message), JSON.parse(c.Envelope.Data), !invalidData.has(c.Name));
  }
  const sealed = await loadVector('sealed_key.json');
  vectors += 1;
  check('vector sealed_key SealedKey', schemaById('Sealed80'), sealed.SealedKey);
  check('vector sealed_key RecipientBoxPublic', schemaById('Key32'), sealed.RecipientBoxPublic);
  for (const c of (await loadVector('secretbox.json')).Cases) {
    vectors += 1;
    check(`vector secretbox ${c.Name} Content`, schemaById('Base64Url'), c.Content);
    check(`vector secretbox ${c.Name} Content as SendMessage`, schemaById('SendMessageData'), { Content: c.Content, Generation: 1 });
  }
  const b64 = await loadVector('base64url.json');
  for (const c of b64.Accepted) {
    vectors += 1;
    check(`vector base64url accepted ${JSON.stringify(c.Text)}`, schemaById('Base64Url'), c.Text);
  }
  for (const c of b64.Rejected) {
    vectors += 1;
    check(`vector base64url rejected ${JSON.stringify(c.Text)}`, schemaById('Base64Url'), c.Text, false);
  }
  for (const ident of (await loadVector('identity.json')).Identities) {
    vectors += 1;
    check(`vector identity ${ident.Name} Address`, schemaById('Key32'), ident.Address);
    check(`vector identity ${ident.Name} BoxPublic`, schemaById('Key32'), ident.BoxPublic);
  }
}

if (errors) {
  console.error(`${file}: ${errors} error(s)`);
  process.exit(1);
}
console.log(
  `${file}: valid AsyncAPI ${document.version()} (${document.channels().length} channels, ` +
    `${document.operations().length} operations, ${components.messages().length} messages); ` +
    `${examples} examples and ${vectors} test vectors match its schemas`,
);
