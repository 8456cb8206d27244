"""`kaya.Client`: how another Python service sends commands to Kaya nodes, over NATS.

    async with kaya.Client.connect("nats://127.0.0.1:4222") as client:
        reply = await client.send("account", "acc-1", Deposit(amount=5))
        state = await client.get("account", "acc-1", state_type=AccountState)
        totals = await client.view("analytics", {"currency": "EUR"})

It speaks the wire contract (v1) and nothing else, so it needs no node's code: a command
is a `kaya.Command` or a plain dict with a `"type"`. A failure reply raises the exception
of its contract code (`Rejected`, `Conflict`, ...) with the node's message.

Transient failures are retried with backoff: a reply `overloaded` or `unavailable`, no
reply in time, no node serving the subject. A command is retried with the same
`Kaya-Command-Id`, so the node applies it at most once however many tries reached it.
"""

from __future__ import annotations

import logging
import ssl
import uuid
from collections.abc import Awaitable, Callable, Generator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import anyio
import msgspec
import nats
import nats.errors
from nats.aio.client import Client as NATS

from kaya.actors.entity import Command
from kaya.actors.errors import (
    BadRequest,
    Forbidden,
    Internal,
    KayaError,
    Timeout,
    Unavailable,
    error_for,
)
from kaya.actors.retry import Backoff
from kaya.actors.wire import (
    HEADER_AUTHORIZATION,
    HEADER_COMMAND_ID,
    TOKEN,
    AnyReply,
    ErrorBody,
    check_command_id,
    check_entity_id,
    check_entity_name,
    command_subject,
    decode_reply,
    query_subject,
    view_subject,
)
from kaya.app.security.tls import Credentials, Violations, read_context, why_refused

__all__ = ["Client", "Reply", "StateReply"]

log = logging.getLogger("kaya.client")

RETRIED_CODES: Final = frozenset({"overloaded", "unavailable"})
"""Reply codes that mean "not now", never "no": the request is tried again."""

DEFAULT_BACKOFF_INITIAL: Final = 0.1
DEFAULT_BACKOFF_CAP: Final = 2.0


class _Outcome(msgspec.Struct):
    """The part of any reply (command, state, view) that says whether it failed."""

    ok: bool
    error: ErrorBody | None = None


_encoder = msgspec.json.Encoder()
_outcome_decoder = msgspec.json.Decoder(_Outcome)
_view_decoder = msgspec.json.Decoder(dict[str, Any])


class Reply(msgspec.Struct, frozen=True, kw_only=True):
    """A command done: the entity's `version` after it and the `events` it recorded.

    `events` are the JSON objects of the events (each with its `"type"`), empty when the
    command changed nothing. `command_id` is the `Kaya-Command-Id` it was sent with (the
    caller's or a generated one): sending it again returns this reply, not a second effect.
    """

    entity: str
    id: str
    version: int
    events: list[dict[str, Any]]
    command_id: str


class StateReply(msgspec.Struct, frozen=True, kw_only=True):
    """An entity's current `state` at `version` (0 and the initial state if it has no events).

    `state` is the JSON object, or an instance of the `state_type` given to `Client.get`.
    """

    entity: str
    id: str
    version: int
    state: Any


class Client:
    """Commands, queries and views over one NATS connection; safe to share between tasks.

    Every call waits `timeout` seconds for each try and makes at most `attempts` tries;
    between tries it waits `backoff` (exponential with full jitter). Retried: replies
    `overloaded` and `unavailable`, no reply in time, nothing serving the subject. The
    last try's failure is raised: `Overloaded` or `Unavailable` as the node said,
    `Timeout` when no reply came in time, `Unavailable` when no node serves the subject.
    Any other failure reply (`Rejected`, `BadRequest`, `Conflict`, `UnknownEntity`, the
    `timeout` code, which is the node's remembered definite answer, ...) is raised at once.

    Use `Client.connect(...)`; `Client(nc)` wraps a connection you keep and close yourself.
    """

    def __init__(
        self,
        nc: NATS,
        *,
        timeout: float = 5.0,
        attempts: int = 5,
        backoff: Backoff | None = None,
        token: str | None = None,
    ) -> None:
        _check_settings(timeout, attempts)
        self._nc = nc
        self._auth = {HEADER_AUTHORIZATION: f"Bearer {token}"} if token else None
        self._timeout = timeout
        self._attempts = attempts
        self._backoff = backoff or Backoff(initial=DEFAULT_BACKOFF_INITIAL, cap=DEFAULT_BACKOFF_CAP)
        self._owns_connection = False
        self._violations = Violations()
        """Fed by the error callback of a connection `connect` made (see Violations)."""

    @classmethod
    def connect(
        cls,
        servers: str | Sequence[str] = "nats://127.0.0.1:4222",
        *,
        name: str = "kaya-client",
        timeout: float = 5.0,
        attempts: int = 5,
        backoff: Backoff | None = None,
        tls: ssl.SSLContext | str | None = None,
        token: str | None = None,
    ) -> _Connecting:
        """Connect to NATS (one URL or several of one cluster); use with `async with`, or await.

            async with Client.connect(url) as client: ...      # closed at the end
            client = await Client.connect(url)                  # then `await client.aclose()`

        With security on, `tls` is the client's `ssl.SSLContext`, or the path of its NATS
        context file (`<data_dir>/security/contexts/kaya-client.json`: its certificate, key
        and CA are used; its url too when `servers` is left at the default). `token`: a
        JWT sent as `Authorization: Bearer <token>` with every request, where the node
        checks callers (`[security.jwt]`).
        Connecting gives up after `timeout` seconds with `Unavailable`. Once connected, the
        connection is re-established after any loss for as long as the client is open;
        requests made meanwhile are retried as above.
        """
        _check_settings(timeout, attempts)
        if isinstance(servers, str):  # one URL, or a cluster's as "nats://a:4222,nats://b:4222"
            urls = [u.strip() for u in servers.split(",") if u.strip()]
        else:
            urls = list(servers)
            if not urls:
                raise ValueError("connect needs at least one server URL")

        context = None
        credentials = None
        if isinstance(tls, str):
            named, credentials = read_context(Path(tls))
            context = credentials.ssl_context() if credentials is not None else None
            if servers == "nats://127.0.0.1:4222" and named:
                urls = [u.strip() for u in named.split(",") if u.strip()]
        else:
            context = tls

        async def open_client() -> Client:
            violations = Violations()
            nc = await _connect_nats(
                urls,
                name=name,
                timeout=timeout,
                tls=context,
                violations=violations,
                credentials=credentials,
            )
            client = cls(nc, timeout=timeout, attempts=attempts, backoff=backoff, token=token)
            client._violations = violations
            client._owns_connection = True
            return client

        return _Connecting(open_client)

    async def aclose(self) -> None:
        """Close the connection if `connect` opened it (draining nothing: calls in flight
        fail). Closing twice is harmless."""
        if self._owns_connection and not self._nc.is_closed:
            await self._nc.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    # ---- the contract ------------------------------------------------------------------

    async def send(
        self,
        entity: str,
        entity_id: str,
        command: Command | Mapping[str, Any],
        *,
        command_id: str | None = None,
    ) -> Reply:
        """Send a command to `entity` `entity_id`; its `Reply` once the node has applied it.

        `command` is a `kaya.Command` or a JSON object with a string `"type"`. The command
        carries `command_id` as its `Kaya-Command-Id` (a fresh uuid4 hex if None), on every
        try: the node applies one command id once and answers repeats with the first
        reply. Reusing a command id with another body raises `Conflict`. A bad entity name,
        id, command id or command raises `BadRequest` here, and nothing is sent.
        """
        subject = command_subject(check_entity_name(entity), check_entity_id(entity_id))
        command_id = check_command_id(command_id) if command_id is not None else uuid.uuid4().hex
        body = _encode_command(command)
        reply = _decode(
            subject, await self._request(subject, body, headers={HEADER_COMMAND_ID: command_id})
        )
        if (
            reply.entity is None
            or reply.id is None
            or reply.version is None
            or reply.events is None
        ):
            raise Internal(f"reply on {subject} is not a command reply: {reply!r}")
        return Reply(
            entity=reply.entity,
            id=reply.id,
            version=reply.version,
            events=reply.events,
            command_id=command_id,
        )

    async def get(
        self, entity: str, entity_id: str, *, state_type: type[Any] | None = None
    ) -> StateReply:
        """The current state of `entity` `entity_id`.

        `state` is the JSON object, or, with `state_type` (the entity's msgspec Struct),
        that type decoded from it (msgspec.ValidationError if it does not fit).
        """
        subject = query_subject(check_entity_name(entity), check_entity_id(entity_id))
        reply = _decode(subject, await self._request(subject, b"", headers=None))
        if reply.entity is None or reply.id is None or reply.version is None or reply.state is None:
            raise Internal(f"reply on {subject} is not a state reply: {reply!r}")
        state: Any = reply.state
        if state_type is not None:
            state = msgspec.convert(state, state_type)
        return StateReply(entity=reply.entity, id=reply.id, version=reply.version, state=state)

    async def view(self, name: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The read model `name`'s answer to `params` (a JSON object; None for none).

        The result is the view's JSON object, without the reply's own `ok` and `view` keys.
        """
        if not TOKEN.fullmatch(name):
            raise BadRequest(f"view name {name!r} must be 1-64 characters of [A-Za-z0-9_-]")
        body = _encode_json(dict(params), "view parameters") if params is not None else b""
        subject = view_subject(name)
        data = await self._request(subject, body, headers=None)
        result = _view_decoder.decode(data)  # a JSON object: _request decoded its `ok`
        result.pop("ok", None)
        result.pop("view", None)
        return result

    # ---- tries -------------------------------------------------------------------------

    async def _request(self, subject: str, body: bytes, headers: dict[str, str] | None) -> bytes:
        """An ok reply's bytes, after at most `attempts` tries; else the failure as raised.

        Only the reply's `ok` and `error` are decoded here: the caller decodes the rest.
        """
        if self._auth is not None:
            headers = {**headers, **self._auth} if headers else self._auth
        attempt = 1
        while True:
            try:
                msg = await self._violations.request(
                    self._nc, subject, body, timeout=self._timeout, headers=headers
                )
            except PermissionError as exc:  # the server refused the publish: never retried
                raise Forbidden(str(exc)) from None
            except nats.errors.NoRespondersError:
                error: KayaError = Unavailable(f"no Kaya node is serving {subject}")
            except nats.errors.TimeoutError:
                error = Timeout(f"no reply on {subject} within {self._timeout}s")
            else:
                data = bytes(msg.data)
                try:
                    outcome = _outcome_decoder.decode(data)
                except msgspec.DecodeError as exc:
                    raise Internal(f"reply on {subject} is not a contract reply: {exc}") from None
                if outcome.ok:
                    return data
                if outcome.error is None:
                    raise Internal(f"the node refused the request on {subject} without a reason")
                error = error_for(outcome.error.code, outcome.error.message)
                if outcome.error.code not in RETRIED_CODES:
                    raise error
            if attempt >= self._attempts:
                raise error
            waited = await self._backoff.sleep(attempt)
            log.debug(
                "%s: %s, try %d of %d after %.3fs",
                subject,
                error.code,
                attempt + 1,
                self._attempts,
                waited,
            )
            attempt += 1


class _Connecting:
    """What `Client.connect` returns: an async context manager, or an awaitable Client."""

    __slots__ = ("_client", "_open")

    def __init__(self, open_client: Callable[[], Awaitable[Client]]) -> None:
        self._open = open_client
        self._client: Client | None = None

    def __await__(self) -> Generator[Any, None, Client]:
        return self._open().__await__()

    async def __aenter__(self) -> Client:
        self._client = await self._open()
        return self._client

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            with anyio.CancelScope(shield=True):
                await client.aclose()


async def _connect_nats(
    urls: list[str],
    *,
    name: str,
    timeout: float,
    tls: ssl.SSLContext | None = None,
    violations: Violations | None = None,
    credentials: Credentials | None = None,
) -> NATS:
    """A connection that reconnects forever once made; the first one within `timeout`."""
    errors: list[BaseException] = []
    connected = False
    nc = NATS()

    async def on_error(exc: Exception) -> None:
        if violations is not None and violations.seen(exc):
            return  # told to the request it refused
        if connected:
            log.warning("NATS: %s", exc)
        else:  # said once, in the Unavailable raised if no server answers in time
            errors.append(exc)

    async def on_disconnect() -> None:
        log.info("disconnected from NATS")

    async def on_reconnect() -> None:
        log.info("reconnected to NATS at %s", nc.connected_url)

    try:
        with anyio.move_on_after(timeout):
            await nc.connect(
                urls,
                name=name,
                connect_timeout=max(1, int(timeout)),
                max_reconnect_attempts=-1,
                reconnect_time_wait=1,
                error_cb=on_error,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
                tls=tls,
            )
            connected = True
    except (OSError, nats.errors.Error) as exc:
        errors.append(exc)
    finally:
        if not connected:
            with anyio.CancelScope(shield=True):
                await nc.close()
    if not connected:
        refused = why_refused(errors, credentials)
        reason = f": {refused or errors[-1]}" if refused or errors else ""
        raise Unavailable(f"cannot connect to NATS at {', '.join(urls)} in {timeout}s{reason}")
    return nc


def _check_settings(timeout: float, attempts: int) -> None:
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, not {timeout}")
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, not {attempts}")


def _decode(subject: str, data: bytes) -> AnyReply:
    try:
        return decode_reply(data)
    except msgspec.DecodeError as exc:
        raise Internal(f"reply on {subject} does not follow the contract: {exc}") from None


def _encode_command(command: Command | Mapping[str, Any]) -> bytes:
    if isinstance(command, Command):
        return _encoder.encode(command)
    if not isinstance(command, Mapping):
        raise BadRequest(
            f"a command is a kaya.Command or a dict with a 'type', not {type(command).__name__}"
        )
    kind = command.get("type")
    if not isinstance(kind, str) or not kind:
        raise BadRequest(f"a command dict needs a string 'type', got {kind!r}")
    return _encode_json(dict(command), f"command {kind}")


def _encode_json(value: dict[str, Any], what: str) -> bytes:
    try:
        return _encoder.encode(value)
    except (TypeError, msgspec.EncodeError) as exc:
        raise BadRequest(f"{what} is not JSON: {exc}") from None
