"""The wire contract (v1) as code: names, subjects, headers, the event envelope and replies.

Every place that builds or parses something another client can see uses this module,
so the contract is written down once. It is pure: strings and bytes, no NATS client.

    kaya.cmd.<entity>.<id>     command, request/reply   (kaya.shard.<n>.cmd.… once mapped)
    kaya.qry.<entity>.<id>     state query              (kaya.shard.<n>.qry.… once mapped)
    kaya.view.<name>           read model
    kaya.evt.<entity>.<id>     event, stream KAYA_EVENTS, headers below
    kaya.dlq.<consumer>        dead letter, stream KAYA_DLQ

Replies:

    {"ok": true, "entity": E, "id": ID, "version": N, "events": [...]}   command done
    {"ok": true, "entity": E, "id": ID, "version": N, "state": {...}}    state query
    {"ok": false, "error": {"code": C, "message": M}}                    any failure

An error reply also carries NATS micro's `Nats-Service-Error: M` and
`Nats-Service-Error-Code: C` headers (micro tooling counts it); its body stays the above.
What a request may carry (JSON depth, 64-bit integers) is checked here too, so commands
and views refuse the same things the same way.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, NamedTuple

import msgspec

from kaya.actors.errors import BadRequest, ErrorCode, KayaError
from kaya.store import StoredEvent

# ---- names ---------------------------------------------------------------------------

ENTITY_NAME = re.compile(r"[a-z][a-z0-9]{0,31}")
"""`<entity>`: the registry and the ingress use this one rule."""
ENTITY_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
COMMAND_ID = re.compile(r"[\x21-\x7e]{1,128}")
TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""A consumer's or a view's name: one subject token."""


def check_entity_name(name: str) -> str:
    if not ENTITY_NAME.fullmatch(name):
        raise BadRequest(
            f"entity name {name!r} must be a lowercase letter then up to 31 lowercase"
            " letters or digits"
        )
    return name


def check_entity_id(entity_id: str) -> str:
    if not ENTITY_ID.fullmatch(entity_id):
        raise BadRequest(f"id {entity_id!r} must be 1-64 characters of [A-Za-z0-9_-]")
    return entity_id


def check_command_id(command_id: str) -> str:
    if not COMMAND_ID.fullmatch(command_id):
        raise BadRequest(
            f"{HEADER_COMMAND_ID} must be 1-128 printable ASCII characters without spaces"
        )
    return command_id


# ---- subjects ------------------------------------------------------------------------

EVENTS_STREAM = "KAYA_EVENTS"
DLQ_STREAM = "KAYA_DLQ"
EVENT_SUBJECTS = "kaya.evt.>"
EPOCH_SUBJECTS = "kaya.epoch.>"
"""Shard epoch markers in KAYA_EVENTS (cluster): a new owner serves once its store passed one."""
DLQ_SUBJECTS = "kaya.dlq.>"
VIEW_PREFIX = "kaya.view."
HEALTH_SUBJECT = "kaya.health"


def command_subject(entity: str, entity_id: str) -> str:
    return f"kaya.cmd.{entity}.{entity_id}"


def query_subject(entity: str, entity_id: str) -> str:
    return f"kaya.qry.{entity}.{entity_id}"


def view_subject(name: str) -> str:
    return f"{VIEW_PREFIX}{name}"


def event_subject(entity: str, entity_id: str) -> str:
    return f"kaya.evt.{entity}.{entity_id}"


def dlq_subject(consumer: str) -> str:
    return f"kaya.dlq.{consumer}"


def shard_of(shards: int, entity: str, entity_id: str) -> int:
    """The shard nats-server's `partition(shards,1,2)` mapping routes `<entity>.<id>` to.

    The server hashes the two tokens, concatenated, with 32-bit FNV-1a: the node needs the
    same answer for what does not come through the mapping (a saga's own turn, an actor
    to passivate when its shard leaves, a lease's epoch for a write). Tested against a
    real server's mapping.
    """
    value = 2166136261
    for byte in (entity + entity_id).encode():
        value = ((value ^ byte) * 16777619) & 0xFFFFFFFF
    return value % shards


def parse_shard(subject: str) -> int | None:
    """N of a mapped `kaya.shard.N.…` subject; None for an unmapped one."""
    if subject.startswith("kaya.shard."):
        token = subject.split(".", 3)[2]
        if token.isdigit() and token.isascii():
            return int(token)
    return None


def parse_subject(subject: str, kind: str, shards: int) -> tuple[str, str]:
    """(entity, id) from `kaya.<kind>.E.I` or `kaya.shard.N.<kind>.E.I` with 0 <= N < shards.

    BadRequest names what is wrong; a shard token the server's mapping cannot have
    produced (not a number, or out of range) is refused like any malformed subject.
    """
    tokens = subject.split(".")
    if len(tokens) == 6 and tokens[1] == "shard":
        shard = tokens[2]
        if not (shard.isdigit() and shard.isascii() and int(shard) < shards):
            raise BadRequest(f"subject {subject!r}: shard {shard!r} is not one of 0..{shards - 1}")
        tokens = tokens[:1] + tokens[3:]
    if len(tokens) != 4 or tokens[0] != "kaya" or tokens[1] != kind:
        raise BadRequest(f"subject {subject!r} is not kaya.{kind}.<entity>.<id>")
    return check_entity_name(tokens[2]), check_entity_id(tokens[3])


def subscribes(filter_subject: str, subject: str) -> bool:
    """Whether a NATS filter subject (with `*` and `>`) matches a subject."""
    pattern, tokens = filter_subject.split("."), subject.split(".")
    for i, token in enumerate(pattern):
        if token == ">":
            return len(tokens) > i
        if i >= len(tokens) or token not in ("*", tokens[i]):
            return False
    return len(pattern) == len(tokens)


# ---- headers -------------------------------------------------------------------------

HEADER_COMMAND_ID = "Kaya-Command-Id"
HEADER_TRACEPARENT = "traceparent"
HEADER_DEADLINE = "Kaya-Deadline"
HEADER_AUTHORIZATION = "Authorization"
"""`Bearer <JWT>` on commands, queries and views where `[security.jwt]` is on."""
"""On `kaya.step.*` only (node to node): the unix time after which a saga's step must not
be applied (it is answered `timeout`, remembered like any reply)."""
HEADER_MSG_ID = "Nats-Msg-Id"
HEADER_EVENT_TYPE = "Kaya-Event-Type"
HEADER_SCHEMA_VERSION = "Kaya-Schema-Version"
HEADER_ENTITY_VERSION = "Kaya-Entity-Version"
HEADER_POSITION = "Kaya-Position"
# dead letters
HEADER_EVENT_ID = "Kaya-Event-Id"
HEADER_CONSUMER = "Kaya-Consumer"
HEADER_ORIGINAL_SUBJECT = "Kaya-Original-Subject"
HEADER_ORIGINAL_SEQUENCE = "Kaya-Original-Sequence"
HEADER_ATTEMPTS = "Kaya-Attempts"
HEADER_LAST_ERROR = "Kaya-Last-Error"
# error replies: the NATS micro service convention (nats.micro.request.ERROR_HEADER, ...),
# which `nats micro stats` and other micro clients read
HEADER_SERVICE_ERROR = "Nats-Service-Error"
HEADER_SERVICE_ERROR_CODE = "Nats-Service-Error-Code"


# ---- the event envelope --------------------------------------------------------------


class Delivered(msgspec.Struct, frozen=True):
    """An event as a consumer sees it: the body and the contract's headers, decoded.

    `data` is the event's JSON (with its `"type"`); `position` orders the producing
    node's store, `entity_version` the entity's stream; `event_id` is unique and is
    what an idempotent external effect keys on.
    """

    subject: str
    entity: str
    entity_id: str
    type: str
    schema_version: int
    entity_version: int
    position: int
    event_id: str
    data: bytes
    traceparent: str | None = None
    stream_seq: int = 0
    headers: dict[str, str] = {}

    def decode(self) -> dict[str, Any]:
        """The event's JSON object."""
        body: dict[str, Any] = msgspec.json.decode(self.data)
        return body


class MalformedEvent(Exception):
    """A message on KAYA_EVENTS without the contract's subject or headers."""


def event_headers(event: StoredEvent) -> dict[str, str]:
    headers = {
        HEADER_MSG_ID: event.event_id,
        HEADER_EVENT_TYPE: event.type,
        HEADER_SCHEMA_VERSION: str(event.schema_version),
        HEADER_ENTITY_VERSION: str(event.version),
        HEADER_POSITION: str(event.position),
    }
    if event.traceparent:
        headers[HEADER_TRACEPARENT] = event.traceparent
    if event.command_id:
        headers[HEADER_COMMAND_ID] = event.command_id
    return headers


_NEWLINES = str.maketrans({"\r": " ", "\n": " "})


def _header_value(value: str) -> str:
    return value.strip().translate(_NEWLINES)  # as nats-py does: no header injection


def event_header_block(event: StoredEvent) -> bytes:
    """`event_headers(event)` as the NATS header block nats-py's publish would write.

    Built in one go because nats-py's header encoding is most of a publish's cost (the
    relay's fast path); tests compare it byte for byte with nats-py's own.
    """
    block = (
        f"NATS/1.0\r\n{HEADER_MSG_ID}: {_header_value(event.event_id)}\r\n"
        f"{HEADER_EVENT_TYPE}: {_header_value(event.type)}\r\n"
        f"{HEADER_SCHEMA_VERSION}: {event.schema_version}\r\n"
        f"{HEADER_ENTITY_VERSION}: {event.version}\r\n"
        f"{HEADER_POSITION}: {event.position}\r\n"
    )
    if event.traceparent:
        block += f"{HEADER_TRACEPARENT}: {_header_value(event.traceparent)}\r\n"
    if event.command_id:
        block += f"{HEADER_COMMAND_ID}: {_header_value(event.command_id)}\r\n"
    return (block + "\r\n").encode()


def header_block(headers: Mapping[str, str]) -> bytes:
    """Any `headers` (valid keys) as the NATS header block nats-py's publish would write:
    for replies published on the adapter's fast path (error replies; see the ingress)."""
    lines = "".join(f"{key}: {_header_value(value)}\r\n" for key, value in headers.items())
    return f"NATS/1.0\r\n{lines}\r\n".encode()


def parse_event(
    subject: str, headers: Mapping[str, str] | None, data: bytes, *, stream_seq: int = 0
) -> Delivered:
    """The envelope of an event read from KAYA_EVENTS (or a dead letter's copy of it)."""
    headers = dict(headers or {})
    tokens = subject.split(".")
    if len(tokens) != 4 or tokens[:2] != ["kaya", "evt"]:
        raise MalformedEvent(f"{subject}: not kaya.evt.<entity>.<id>")
    try:
        return Delivered(
            subject=subject,
            entity=tokens[2],
            entity_id=tokens[3],
            type=headers[HEADER_EVENT_TYPE],
            schema_version=int(headers[HEADER_SCHEMA_VERSION]),
            entity_version=int(headers[HEADER_ENTITY_VERSION]),
            # a cluster's events (replicated) have no store position but their stream
            # sequence, which is where every node's follower stores them
            position=int(headers.get(HEADER_POSITION) or stream_seq or headers[HEADER_POSITION]),
            event_id=headers.get(HEADER_EVENT_ID) or headers[HEADER_MSG_ID],
            data=data,
            traceparent=headers.get(HEADER_TRACEPARENT),
            stream_seq=stream_seq,
            headers=headers,
        )
    except (KeyError, ValueError) as exc:
        raise MalformedEvent(f"{subject}: missing or bad header {exc}") from None


def delivered_from_stored(stored: StoredEvent) -> Delivered:
    """The event as a consumer would receive it, straight from the store (rebuilds, replays)."""
    return Delivered(
        subject=event_subject(stored.entity, stored.entity_id),
        entity=stored.entity,
        entity_id=stored.entity_id,
        type=stored.type,
        schema_version=stored.schema_version,
        entity_version=stored.version,
        position=stored.position,
        event_id=stored.event_id,
        data=stored.data,
        traceparent=stored.traceparent,
        headers=event_headers(stored),
    )


# ---- replies -------------------------------------------------------------------------


class CommandDone(msgspec.Struct, kw_only=True):
    ok: bool = True
    entity: str
    id: str
    version: int
    events: list[Any]


class StateReply(msgspec.Struct, kw_only=True):
    ok: bool = True
    entity: str
    id: str
    version: int
    state: Any


class ErrorBody(msgspec.Struct):
    code: str
    message: str


class ErrorReply(msgspec.Struct, kw_only=True):
    ok: bool = False
    error: ErrorBody


class AnyReply(msgspec.Struct):
    """What a client decodes a reply into before looking at `ok`."""

    ok: bool
    entity: str | None = None
    id: str | None = None
    version: int | None = None
    events: list[dict[str, Any]] | None = None
    state: dict[str, Any] | None = None
    error: ErrorBody | None = None

    @property
    def outcome(self) -> str:
        """`ok`, or the error code."""
        if self.ok:
            return "ok"
        return self.error.code if self.error is not None else "internal"


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(AnyReply)


def command_done(entity: str, entity_id: str, version: int, events: list[Any]) -> bytes:
    return _encoder.encode(CommandDone(entity=entity, id=entity_id, version=version, events=events))


def state_reply(entity: str, entity_id: str, version: int, state: Any) -> bytes:
    return _encoder.encode(StateReply(entity=entity, id=entity_id, version=version, state=state))


def error_reply(code: ErrorCode, message: str) -> bytes:
    return _encoder.encode(ErrorReply(error=ErrorBody(code=code, message=message)))


def error_from(exc: KayaError) -> bytes:
    return error_reply(exc.code, exc.message)


def decode_reply(data: bytes) -> AnyReply:
    return _decoder.decode(data)


_error_decoder = msgspec.json.Decoder(ErrorReply)
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")
SERVICE_ERROR_MAX = 256
"""Longest `Nats-Service-Error` value: the body has the whole message; a header only names it."""


def error_message(body: bytes) -> str:
    """The message of an encoded error reply ("" if `body` is not one): replies made by the
    runtime reach the ingress encoded, and only error replies are ever read back."""
    try:
        return _error_decoder.decode(body).error.message
    except msgspec.DecodeError:
        return ""


def service_error_headers(
    code: str, message: str, traceparent: str | None = None
) -> dict[str, str]:
    """The headers of an error reply: `Nats-Service-Error(-Code)`, as nats.micro's
    `Request.respond_error` sets them, so micro tooling sees an error; the body stays the
    contract's. The message is made printable ASCII and bounded: a header is one line."""
    text = _UNPRINTABLE.sub(lambda m: ascii(m.group())[1:-1], message.strip())
    if len(text) > SERVICE_ERROR_MAX:
        text = text[: SERVICE_ERROR_MAX - 3] + "..."
    headers = {HEADER_SERVICE_ERROR: text or code, HEADER_SERVICE_ERROR_CODE: code}
    if traceparent:
        headers[HEADER_TRACEPARENT] = traceparent
    return headers


class Answer(NamedTuple):
    """An encoded reply and its outcome (`ok` or the error code), made together where the
    reply is made, so metrics and tracing never parse a reply back."""

    body: bytes
    outcome: str


def ok_answer(body: bytes) -> Answer:
    return Answer(body, "ok")


def error_answer(exc: KayaError) -> Answer:
    return Answer(error_from(exc), exc.code)


def remembered_answer(body: bytes) -> Answer:
    """A reply remembered in the store, whose outcome was not stored beside it: read off
    its fixed prefix (only repeats of an idempotent command take this path)."""
    if body.startswith(b'{"ok":true'):
        return Answer(body, "ok")
    start = body.find(b'"code":"')
    if start < 0:
        return Answer(body, "internal")
    start += 8
    return Answer(body, body[start : body.find(b'"', start)].decode(errors="replace"))


# ---- JSON a request may carry ------------------------------------------------------------

INT_MIN, INT_MAX = -(2**63), 2**63 - 1
"""Integers a request may hold: what every JSON reader, SQLite included, can store exactly."""
TOO_DEEP = "is nested too deeply"
"""The decoders refuse JSON nested about 1,000 levels deep (the interpreter's recursion
limit); said as a `bad_request`, never as the RecursionError it is."""
LONG_NUMBER = 19
"""Any integer outside INT_MIN..INT_MAX has 19 digits or more (JSON has no leading zeros)."""
DIGITS = b"0123456789"
_DIGIT_RUNS = bytes(0x31 if 0x30 <= i <= 0x39 else 0x20 for i in range(256))
_LONG_RUN = b"1" * LONG_NUMBER


def _may_hold_long_number(data: bytes) -> bool:
    """Two linear scans in C: fewer than 19 digits in all (~0.1 us for a typical command),
    else no run of 19 once digits are `1` and the rest spaces. A regex took ~8 ns a byte
    (0.5 ms for a 64 KiB body); decoding again is only for the few bodies that pass."""
    if len(data) - len(data.translate(None, DIGITS)) < LONG_NUMBER:
        return False
    return _LONG_RUN in data.translate(_DIGIT_RUNS)


_any_decoder = msgspec.json.Decoder()
_DECODE: Any = object()


def integer_out_of_range(data: bytes, decoded: Any = _DECODE) -> str | None:
    """Where (`$.a.b[1]`) the first integer outside 64 bits is in the JSON `data`, or None.

    msgspec decodes integers of any size, which no other reader (nor SQLite) can hold:
    refused as out of range, like 1e400 is. Nearly free unless `data` has 19 digits in a
    row (a long number, or a string of digits); then it is decoded again (unless `decoded`
    is given: `data` as plain JSON values) and walked without recursion, since it may be as
    deep as the decoder allows.
    """
    if not _may_hold_long_number(data):
        return None
    value = _any_decoder.decode(data) if decoded is _DECODE else decoded
    stack: list[tuple[str, Any]] = [("$", value)]
    while stack:
        path, value = stack.pop()
        if type(value) is int:
            if not INT_MIN <= value <= INT_MAX:
                return path
        elif type(value) is dict:
            stack.extend((f"{path}.{key}", item) for key, item in reversed(value.items()))
        elif type(value) is list:
            stack.extend((f"{path}[{i}]", value[i]) for i in range(len(value) - 1, -1, -1))
    return None


def decode_json_object(data: bytes, what: str) -> dict[str, Any]:
    """A JSON object from a request (a view's parameters); blank means `{}`.

    Every way it can be wrong is a BadRequest naming it: not JSON, not UTF-8, nested too
    deeply, a number out of range, not an object.
    """
    if not data.strip():
        return {}
    try:
        value = _any_decoder.decode(data)
    except msgspec.ValidationError as exc:  # e.g. "Number out of range - at `$.n`"
        raise BadRequest(f"invalid {what}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"{what} are not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest(f"{what} JSON {TOO_DEEP}") from None
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object")
    path = integer_out_of_range(data, value)
    if path is not None:
        raise BadRequest(f"invalid {what}: integer out of range (64 bits) - at `{path}`")
    return value


def iso_utc(unix: float) -> str:
    """A unix time as ISO 8601 UTC to the millisecond, `2026-12-05T02:40:46.123Z`: how
    times are shown to people and HTTP clients (`kaya history`, the gateway's history)."""
    moment = datetime.fromtimestamp(unix, tz=UTC)
    return moment.isoformat(timespec="milliseconds").removesuffix("+00:00") + "Z"
