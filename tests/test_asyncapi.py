"""docs/asyncapi.yaml: valid for the official AsyncAPI tooling, and in step with the code.

The document is the machine-readable contract for clients in other languages, so it must
name exactly the actions, modes, Data fields, results, error codes and notification kinds
the services implement. The validator (tools/asyncapi, the official @asyncapi/parser) also
checks that the document's schemas accept its examples and tests/vectors/.
"""

import inspect
import shutil
import subprocess
import typing
from pathlib import Path

import msgspec
import pytest
import yaml

from aodm import envelope, notifications, replies
from aodm.errors import ERROR_CODES, AodmError
from aodm.session_api import ConsentState
from services.registry.__main__ import ACTIONS as REGISTRY_ACTIONS
from services.session.__main__ import ACTIONS as SESSION_ACTIONS

ROOT = Path(__file__).resolve().parent.parent
DOC_PATH = ROOT / "docs" / "asyncapi.yaml"
TOOL = ROOT / "tools" / "asyncapi"
DOC = yaml.safe_load(DOC_PATH.read_text(encoding="utf-8"))
SCHEMAS = DOC["components"]["schemas"]
MESSAGES = DOC["components"]["messages"]
CODE_ACTIONS = {
    **{name: ("registry", action) for name, action in REGISTRY_ACTIONS.items()},
    **{name: ("session", action) for name, action in SESSION_ACTIONS.items()},
}
DOC_ACTIONS = DOC["x-aodm-actions"]
KINDS = {t.__struct_config__.tag: t for t in typing.get_args(notifications.AnyNotification)}
CLIENT_ONLY_CODES = {"timeout"}
# Data fields the contract requires that the decoder takes as optional: the action itself
# refuses a request without one (invalid_argument, naming it), so that a client written
# before the field was required hears why, and a resend of what such a client stored is
# still answered (tests/test_session.py checks both).
REQUIRED_BY_THE_ACTION = {"SendMessageData": {"Generation"}}


# -------------------------------------------------------------------- official tooling


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(
            f"`{tool}` is not installed: the AsyncAPI document is validated with the official "
            "Node.js tooling (tools/asyncapi). Install Node.js 18+ and npm (scripts/test.sh does, "
            "with apt-get: nodejs npm)."
        )
    return path


def npm_ci(directory: Path) -> None:
    """`npm ci` when the dependencies are not installed yet (scripts/test.sh keeps them current)."""
    if (directory / "node_modules").is_dir():
        return
    done = subprocess.run(
        [_require("npm"), "ci", "--no-audit", "--no-fund"], cwd=directory, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"npm ci in {directory} failed:\n{done.stdout}\n{done.stderr}"


def test_official_asyncapi_parser_accepts_the_document():
    node = _require("node")
    npm_ci(TOOL)
    done = subprocess.run(
        [node, "validate.mjs", str(DOC_PATH)], cwd=TOOL, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"docs/asyncapi.yaml is not valid:\n{done.stdout}\n{done.stderr}"
    assert "valid AsyncAPI 3." in done.stdout


# --------------------------------------------------------------------- helpers


def resolve(schema: dict) -> dict:
    """Follow local `$ref`s (and a single-element allOf wrapper) to the schema itself."""
    while True:
        if "$ref" in schema:
            ref = schema["$ref"]
            assert ref.startswith("#/"), ref
            node = DOC
            for part in ref[2:].split("/"):
                node = node[part]
            schema = node
        elif set(schema) <= {"allOf", "description", "minLength"} and len(schema.get("allOf", [])) == 1:
            schema = schema["allOf"][0]
        else:
            return schema


def ref_name(schema: dict) -> str:
    return schema["$ref"].rsplit("/", 1)[-1]


def allows_null(schema: dict) -> bool:
    schema = resolve(schema)
    kinds = schema.get("type")
    if kinds == "null" or (isinstance(kinds, list) and "null" in kinds):
        return True
    return any(allows_null(s) for s in schema.get("oneOf", []) + schema.get("anyOf", []))


def is_optional(info: msgspec.inspect.Type) -> bool:
    return isinstance(info, msgspec.inspect.UnionType) and any(
        isinstance(t, msgspec.inspect.NoneType) for t in info.types
    )


def struct_types(info: msgspec.inspect.Type):
    """The Struct types a field refers to (directly, in a list, or in an optional)."""
    if isinstance(info, msgspec.inspect.StructType):
        yield info.cls
    for child in (getattr(info, "item_type", None), *getattr(info, "types", ())):
        if child is not None:
            yield from struct_types(child)


def check_struct(name: str, cls: type[msgspec.Struct], *, output: bool, seen: set[str] | None = None) -> None:
    """The component schema `name` has exactly the struct's wire fields; required, null and
    defaults agree. `output`: the services encode it (every field is always present)."""
    seen = set() if seen is None else seen
    if name in seen:
        return
    seen.add(name)
    assert name in SCHEMAS, f"components.schemas.{name} is missing (for {cls.__module__}.{cls.__qualname__})"
    schema = resolve(SCHEMAS[name])
    info = msgspec.inspect.type_info(cls)
    fields = {f.encode_name: f for f in info.fields}
    properties = schema.get("properties", {})
    tag_field = cls.__struct_config__.tag_field
    expected = set(fields) | ({tag_field} if tag_field else set())
    assert set(properties) == expected, f"{name}: properties {sorted(properties)} != fields of {cls.__name__} {sorted(expected)}"
    if tag_field:
        assert resolve(properties[tag_field]).get("const") == cls.__struct_config__.tag, f"{name}.{tag_field}"
    required = set(schema.get("required", []))
    if output and not cls.__struct_config__.omit_defaults:
        assert required == expected, f"{name}: every field of {cls.__name__} is always encoded, so all are required"
    else:
        wanted = {n for n, f in fields.items() if f.required} | ({tag_field} if tag_field else set())
        wanted |= REQUIRED_BY_THE_ACTION.get(name, set())
        assert required == wanted, f"{name}: required {sorted(required)} != {sorted(wanted)} of {cls.__name__}"
    if cls.__struct_config__.forbid_unknown_fields:
        assert schema.get("additionalProperties") is False, f"{name}: {cls.__name__} forbids unknown fields"
    for field_name, field in fields.items():
        prop = properties[field_name]
        nullable = is_optional(field.type) and field_name not in REQUIRED_BY_THE_ACTION.get(name, set())
        assert allows_null(prop) == nullable, f"{name}.{field_name}: null allowed in one, not the other"
        if not field.required and field.default not in (None, msgspec.NODEFAULT):
            assert resolve(prop).get("default", prop.get("default")) == field.default, f"{name}.{field_name}: default"
        for nested in struct_types(field.type):
            items = resolve(prop).get("items", prop)
            nested_name = ref_name(items) if "$ref" in items else nested.__name__
            check_struct(nested_name, nested, output=output, seen=seen)


def result_type(action) -> type:
    """What the handler answers with: a batched handler answers a list of them (or errors)."""
    result = typing.get_type_hints(inspect.unwrap(action.handler))["return"]
    if action.batched:
        item = typing.get_args(result)[0]  # list[Sent | AodmError]
        result = next(t for t in typing.get_args(item) if t is not AodmError)
    return result


# ------------------------------------------------------------------ actions


def test_the_document_lists_exactly_the_actions_of_the_code():
    assert set(DOC_ACTIONS) == set(CODE_ACTIONS), (
        f"only in the code: {sorted(set(CODE_ACTIONS) - set(DOC_ACTIONS))}; "
        f"only in docs/asyncapi.yaml: {sorted(set(DOC_ACTIONS) - set(CODE_ACTIONS))}"
    )


@pytest.mark.parametrize("name", sorted(CODE_ACTIONS))
def test_action_service_mode_and_handle_rule(name):
    service, action = CODE_ACTIONS[name]
    doc = DOC_ACTIONS.get(name)
    assert doc is not None, f"{name} is not in x-aodm-actions"
    assert doc["service"] == service
    assert doc["mode"] == action.mode
    assert doc["handle"] == ("required" if action.needs_handle else "optional")
    assert doc["target"] == ("registry" if service == "registry" else "session id")
    assert set(doc["errors"]) <= set(ERROR_CODES), f"{name}: unknown error codes {doc['errors']}"
    assert set(doc["notifications"]) <= set(KINDS)


@pytest.mark.parametrize("name", sorted(CODE_ACTIONS))
def test_action_messages_channels_and_operation(name):
    service, _ = CODE_ACTIONS[name]
    doc = DOC_ACTIONS[name]
    request, reply = doc["request"], doc["reply"]
    assert request == f"{name}Request" and reply == f"{name}Ok"
    message = MESSAGES[request]
    assert message["name"] == request and message["x-aodm-action"] == name
    envelope_ref, specific = message["payload"]["allOf"]
    assert ref_name(envelope_ref) == "Envelope"
    props = specific["properties"]
    assert props["Tags"]["contains"]["properties"]["value"]["const"] == name
    assert ref_name(props["Data"]["contentSchema"]) == doc["data"] == f"{name}Data"
    if service == "registry":
        assert props["Target"] == {"const": "registry"}
    else:
        assert ref_name(props["Target"]) == "SessionId"
    if doc["handle"] == "required":
        assert ref_name(props["From"]) == "Handle"

    ok = MESSAGES[reply]
    assert ok["x-aodm-action"] == name
    ok_ref, ok_specific = ok["payload"]["allOf"]
    assert ref_name(ok_ref) == "OkReply"
    assert ref_name(ok_specific["properties"]["Result"]) == doc["result"]

    channels = DOC["channels"]
    assert request in channels["requests"]["messages"]
    service_channels = ["registryRequests"] if service == "registry" else ["sessions", "sessionShard"]
    for channel in service_channels:
        assert request in channels[channel]["messages"], f"{request} missing from channel {channel}"
    assert reply in channels["reply"]["messages"]

    operation = DOC["operations"][f"send{name}"]
    assert operation["action"] == "send" and operation["channel"]["$ref"] == "#/channels/requests"
    assert [m["$ref"] for m in operation["messages"]] == [f"#/channels/requests/messages/{request}"]
    assert [m["$ref"] for m in operation["reply"]["messages"]] == [
        f"#/channels/reply/messages/{reply}",
        "#/channels/reply/messages/Error",
    ]


@pytest.mark.parametrize("name", sorted(CODE_ACTIONS))
def test_action_data_schema_matches_the_request_struct(name):
    _, action = CODE_ACTIONS[name]
    check_struct(DOC_ACTIONS[name]["data"], action.request, output=False)
    # The same required set as msgspec's own JSON Schema of the struct says.
    generated = msgspec.json.schema(action.request)
    own = generated["$defs"][generated["$ref"].rsplit("/", 1)[-1]]
    required_by_the_action = REQUIRED_BY_THE_ACTION.get(DOC_ACTIONS[name]["data"], set())
    assert set(resolve(SCHEMAS[DOC_ACTIONS[name]["data"]]).get("required", [])) == set(own.get("required", [])) | required_by_the_action


@pytest.mark.parametrize("name", sorted(CODE_ACTIONS))
def test_action_result_schema_matches_the_handler_result(name):
    _, action = CODE_ACTIONS[name]
    cls = result_type(action)
    assert DOC_ACTIONS[name]["result"] == cls.__name__, f"{name} returns {cls.__name__}"
    check_struct(cls.__name__, cls, output=True)


def test_no_request_or_reply_message_for_an_action_the_code_lacks():
    for message_name, message in MESSAGES.items():
        if "x-aodm-action" in message:
            assert message["x-aodm-action"] in CODE_ACTIONS, f"{message_name} is for an unknown action"
    for op_name in DOC["operations"]:
        if op_name.startswith("send"):
            assert op_name[len("send"):] in CODE_ACTIONS, f"operation {op_name} is for an unknown action"
    for schema_name in SCHEMAS:
        if schema_name.endswith("Data"):
            assert schema_name[: -len("Data")] in CODE_ACTIONS, f"schema {schema_name} is for an unknown action"


# ---------------------------------------------------------------- envelope, replies


def test_envelope_and_reply_schemas_match_the_structs():
    check_struct("Envelope", envelope.Envelope, output=False)
    check_struct("Tag", envelope.Tag, output=False)
    check_struct("OkReply", replies.Ok, output=True)
    check_struct("ErrReply", replies.Err, output=True)
    limits = resolve(SCHEMAS["Envelope"])["properties"]
    assert limits["Tags"]["maxItems"] == envelope.MAX_TAGS
    for field in ("Target", "From", "Anchor"):
        assert limits[field]["maxLength"] == envelope.MAX_ID_FIELD
    tag = resolve(SCHEMAS["Tag"])["properties"]
    assert tag["name"]["maxLength"] == envelope.MAX_TAG_NAME
    assert tag["value"]["maxLength"] == envelope.MAX_TAG_VALUE


def test_error_codes_are_exactly_the_codes_of_the_code():
    enum = SCHEMAS["ErrorCode"]["enum"]
    assert len(enum) == len(set(enum))
    assert set(enum) == set(ERROR_CODES), (
        f"only in aodm/errors.py: {sorted(set(ERROR_CODES) - set(enum))}; "
        f"only in docs/asyncapi.yaml: {sorted(set(enum) - set(ERROR_CODES))}"
    )
    assert set(SCHEMAS["ErrorCode"].get("x-aodm-client-codes", [])) <= CLIENT_ONLY_CODES
    assert ref_name(SCHEMAS["ErrReply"]["properties"]["Code"]) == "ErrorCode"


# ------------------------------------------------------------------ consent


def test_consent_states_are_the_code_s_wherever_a_state_is_given():
    """Chat.State, SessionEstablished.State and the Consent reply are typed as the enum of
    the code's ConsentState (the structs type the first two as plain strings)."""
    assert SCHEMAS["ConsentState"]["enum"] == list(typing.get_args(ConsentState))
    assert ref_name(SCHEMAS["Consent"]["properties"]["State"]) == "ConsentState"
    for schema in ("Chat", "SessionEstablishedNotification"):
        state = SCHEMAS[schema]["properties"]["State"]
        assert [ref_name(s) for s in state["allOf"]] == ["ConsentState"], schema
        assert state["default"] == "accepted", f"{schema}: servers before message requests send no State"
    for name in ("Accept", "Block", "Unblock"):
        assert DOC_ACTIONS[name]["result"] == "Consent"
    for name in ("SendMessage", "RotateSessionKey"):
        assert "not_accepted" in DOC_ACTIONS[name]["errors"], f"{name} is refused while a request is open"


# ----------------------------------------------------------------- notifications


def test_notification_kinds_are_exactly_the_kinds_of_the_code():
    documented = DOC["x-aodm-notifications"]
    assert set(documented) == set(KINDS)
    assert set(SCHEMAS["NotificationKind"]["enum"]) == set(KINDS)
    assert set(DOC["channels"]["handleInbox"]["messages"]) == set(KINDS)
    assert [m["$ref"].rsplit("/", 1)[-1] for m in DOC["operations"]["receiveNotifications"]["messages"]] == list(KINDS)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_notification_schema_matches_the_struct(kind):
    entry = DOC["x-aodm-notifications"][kind]
    message = MESSAGES[entry["message"]]
    assert message["x-aodm-kind"] == kind
    assert ref_name(message["payload"]) == entry["schema"]
    check_struct(entry["schema"], KINDS[kind], output=True)


# ------------------------------------------------------- what the schemas promise


def array_bounds(schema: dict, path: str, root: dict = DOC, seen: set[int] | None = None):
    """(path, keyword) of every minItems/maxItems in a schema, following its local $refs
    (into `root`: the document, or a schema of msgspec's with its $defs)."""
    seen = set() if seen is None else seen
    while "$ref" in schema:
        node = root
        for part in schema["$ref"][2:].split("/"):
            node = node[part]
        schema = node
    if id(schema) in seen:
        return
    seen.add(id(schema))
    for keyword in ("minItems", "maxItems"):
        if keyword in schema:
            yield path, keyword
    for sub in schema.get("allOf", []) + schema.get("oneOf", []) + schema.get("anyOf", []):
        yield from array_bounds(sub, path, root, seen)
    for name, prop in schema.get("properties", {}).items():
        yield from array_bounds(prop, f"{path}.{name}", root, seen)
    if "items" in schema:
        yield from array_bounds(schema["items"], f"{path}[]", root, seen)


@pytest.mark.parametrize("name", sorted(CODE_ACTIONS))
def test_no_data_schema_bounds_an_array_the_decoder_does_not(name):
    """A bound in a Data schema reads as a schema error. No action decodes an array with a
    length bound: RotateSessionKey's Keys (one per member) is the action's check, answered
    invalid_argument after authentication, so its schema states no minItems/maxItems."""
    _, action = CODE_ACTIONS[name]
    decoder = msgspec.json.schema(action.request)
    assert list(array_bounds(SCHEMAS[DOC_ACTIONS[name]["data"]], name)) == list(array_bounds(decoder, name, decoder))


def test_the_shard_channel_says_what_protocol_9_1_says():
    """A shard's worker runs what has arrived in batches, committed together (§9.1)."""
    text = " ".join(DOC["channels"]["sessionShard"]["description"].split())
    assert "one message at a time" not in text
    assert "in batches" in text and "committed together" in text
