"""The reply envelopes of the wire contract, encoded once and sent as bytes.

{"ok": true, "entity": E, "id": ID, "version": N, "events": [...]}   command done
{"ok": true, "entity": E, "id": ID, "version": N, "state": {...}}    state query
{"ok": false, "error": {"code": C, "message": M}}                    any failure
"""

from __future__ import annotations

from typing import Any

import msgspec

from kaya.actors.errors import ErrorCode, KayaError


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
