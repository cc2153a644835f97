"""The node-to-node wire protocol, sans-IO: bytes in, events out; events in, bytes out.

This module contains no networking code at all (the h11 style, design decision 5). It speaks
HTTP/1.1 through h11, so that curl and ``openssl s_client`` can talk to a node, and adds our
vocabulary on top:

==============================  =====================================  ============================
request (client -> server)      on the wire                            answers (server -> client)
==============================  =====================================  ============================
``SubmitDocument`` + body       ``POST /v1/documents/{doc_id}``        ``Acknowledge`` (201 stored,
                                                                       200 duplicate) or ``Reject``
``DeliverReceipt``              ``POST /v1/receipts/{doc_id}``         ``ReceiptAccepted`` (204) or
                                                                       ``Reject``
``DeliverCheckpoint``           ``POST /v1/checkpoints/{seq}``         ``CheckpointAccepted`` (204)
                                                                       or ``Reject``
``Ping``                        ``GET /v1/ping``                       ``Pong`` (200) or ``Reject``
``FetchCrl``                    ``GET /v1/crl``                        ``CrlFile`` (200) or
                                                                       ``Reject``
``OfferCrl`` + DER body         ``POST /v1/crl``                       ``CrlAccepted`` (204) or
                                                                       ``Reject``
==============================  =====================================  ============================

A ping says the number of the CRL its sender holds (``X-Exchanged-Crl-Number``), and the pong
the answering node's: the side with the older CRL then fetches the newer one, or is offered it
(``application/pkix-crl``, DER, at most ``max_crl_size``). Revocations so travel from node to
node with every exchange, whether or not the CA's publication point is reachable.

A checkpoint is the sender's signed audit checkpoint (a JSON record, at most 4 KiB), given to
a peer that witnesses it (keeps a copy outside the sender's reach).

A document submission looks like this on the wire (curl can send it with ``--data-binary``)::

    POST /v1/documents/5f0c6f4e-0d7a-4c8e-9a51-7f5b1c1d2e3f HTTP/1.1
    Host: node-b
    Content-Type: application/vnd.exchanged.package
    Content-Length: 1048576
    X-Exchanged-Sha256: <64 lowercase hex digits: SHA-256 of the whole body>
    X-Exchanged-Metadata: {"title":"..."}      (a JSON object, ASCII-escaped; optional)
    Expect: 100-continue                        (optional)

    <exactly Content-Length bytes of the document package>

The metadata header also carries what a document travels with besides its package: a forwarded
document's custody records (``{"custody": [...]}``), or, for a relayed one (A12,
``exchanged.node.relay``), ``{"relay": {"to": UNIT, "path": [hop records]}}``.

``Content-Length`` is required and chunked uploads are refused (411): the receiver checks the
size against its limit before it reads a byte of body. The body is never buffered here: the
server yields it as ``BodyChunk`` events in the pieces it arrives in, then ``BodyEnd``. The
protocol hashes the body as it passes (SHA-256 runs at >1 GB/s, far faster than the link) and
``BodyEnd`` says whether the digest matches ``X-Exchanged-Sha256``; the caller, which streams the
chunks to disk, acts on it (``Reject("digest-mismatch")`` and delete the file).
A client hashes what it sends too, and refuses to finish a body that does not match the digest
it declared (our bug, so a ``LocalProtocolError``; the server then sees a truncated body).

Responses carry JSON (``application/json``, UTF-8): an acknowledgement is
``{"doc_id": ..., "status": "stored"|"duplicate", "receipt": <base64 CMS>|null}``, a rejection
``{"code": <one of REASON_CODES>, "message": ...}``, a pong ``{"unit": ..., "time": <ISO 8601>}``.

Errors come in two kinds, as in h11: ``RemoteProtocolError`` (the peer broke the protocol; it
carries an HTTP ``status`` and a reason ``code``) and ``LocalProtocolError`` (we misused this
API). Either moves the connection to ``State.ERROR``, after which every call raises
``LocalProtocolError`` -- except ``ServerConnection.send_error()``, which still produces the
error response for the peer, once.

There is no clock in here: the I/O layer must put a timeout on every read (and every write),
or a silent peer holds a connection, and its buffers, forever.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from http import HTTPStatus
from types import MappingProxyType
from typing import Any, Final, Literal, TypeAlias, TypeVar

import h11

from exchanged.common import UUID_RE
from exchanged.errors import ExchangedError

__all__ = [
    "DEFAULT_MAX_BODY_SIZE", "DEFAULT_MAX_HEADER_SIZE", "DEFAULT_MAX_METADATA_SIZE",
    "DEFAULT_MAX_RECEIPT_SIZE", "DEFAULT_MAX_RESPONSE_SIZE", "NEED_DATA", "PAUSED",
    "PACKAGE_TYPE", "RECEIPT_TYPE", "REASON_CODES",
    "Acknowledge", "BodyChunk", "BodyEnd", "ClientConnection", "ConnectionClosed",
    "CheckpointAccepted", "ConnectionStatistics", "Continue", "CrlAccepted", "CrlFile",
    "DeliverCheckpoint", "FetchCrl", "OfferCrl",
    "DeliverReceipt", "Event", "LocalProtocolError", "Ping",
    "Pong", "ProtocolError", "ReceiptAccepted", "Reject", "RemoteProtocolError", "Request",
    "Response", "ServerConnection", "State", "SubmitDocument",
]

DEFAULT_MAX_HEADER_SIZE: Final = 16 * 1024
"""Request/response line plus all header fields (h11's ``max_incomplete_event_size``)."""
DEFAULT_MAX_BODY_SIZE: Final = 2 * 1024**3
"""Largest document package a server accepts (declared ``Content-Length``)."""
DEFAULT_MAX_RECEIPT_SIZE: Final = 64 * 1024
"""Largest CMS receipt, delivered (``POST /v1/receipts``) or returned inside an acknowledgement."""
DEFAULT_MAX_METADATA_SIZE: Final = 8 * 1024
"""Largest ``X-Exchanged-Metadata`` header value, in bytes."""
DEFAULT_MAX_RESPONSE_SIZE: Final = 256 * 1024
"""Largest response body a client buffers (an acknowledgement holds a base64 receipt)."""

PACKAGE_TYPE: Final = "application/vnd.exchanged.package"
RECEIPT_TYPE: Final = "application/cms"  # RFC 7193
_RECEIPT_TYPES: Final = frozenset({RECEIPT_TYPE, "application/pkcs7-mime"})
_JSON_TYPE: Final = "application/json"
MAX_CHECKPOINT_SIZE: Final = 4096
DEFAULT_MAX_CRL_SIZE: Final = 64 * 1024 * 1024  # a CRL of a million entries is ~35 MB
CRL_TYPE: Final = "application/pkix-crl"  # RFC 2585
_H_CRL_NUMBER: Final = b"x-exchanged-crl-number"

REASON_CODES: Final[Mapping[str, int]] = MappingProxyType({
    # The peer's HTTP was malformed, or a header we need was missing or wrong.
    "bad-request": 400,
    # The peer closed the connection in the middle of a message.
    "truncated": 400,
    # The peer is not (or no longer) allowed to send to us.
    "unknown-sender": 403,
    "not-found": 404,
    # A receipt for a document this node never sent.
    "unknown-document": 404,
    "method-not-allowed": 405,
    # The I/O layer gave up waiting for the peer.
    "timeout": 408,
    # The same doc_id was already stored with different content: not a retry.
    "id-conflict": 409,
    # Content-Length missing, or Transfer-Encoding (chunked) used instead.
    "length-required": 411,
    "too-large": 413,
    "unsupported-media-type": 415,
    # The content was received intact but is refused.
    "bad-form": 422,
    "not-pdf": 422,
    "classified": 422,
    "digest-mismatch": 422,
    "bad-receipt": 422,
    # An offered CRL that is not our CA's, does not verify, or is older than the one held.
    "bad-crl": 422,
    # The package itself: malformed, its signature, or sent by or to the wrong unit.
    "bad-package": 422,
    "bad-signature": 422,
    "wrong-sender": 403,
    # A relay (A12) will not carry this document: not a relay for these units, or the hop limit.
    "not-relayed": 403,
    "wrong-recipient": 422,
    "headers-too-large": 431,
    "internal-error": 500,
    "not-implemented": 501,
    # Temporarily unable (disk full, shutting down): the sender should retry later.
    "busy": 503,
})
"""Every reason code a ``Reject`` may carry, with the HTTP status it is sent with by default.
Adding a code is a protocol change: a client treats an unknown code as a protocol error."""

_MAX_MESSAGE_CHARS: Final = 1000
_MAX_UNIT_CHARS: Final = 256
_H_SHA256: Final = b"x-exchanged-sha256"
_H_METADATA: Final = b"x-exchanged-metadata"


# ---------------------------------------------------------------------------------------------
# Errors


class ProtocolError(ExchangedError):
    """Either kind of protocol error."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol.

    ``code`` is one of ``REASON_CODES`` and ``status`` the HTTP status to answer with (a server
    passes the exception to ``ServerConnection.send_error()``); ``allow`` lists the methods for a
    405. On a client the status is only a hint.
    """

    code = "bad-request"

    def __init__(self, message: str, *, code: str = "bad-request", status: int | None = None,
                 allow: tuple[str, ...] = ()) -> None:
        if code not in REASON_CODES:
            raise ValueError(f"unknown reason code {code!r}")
        super().__init__(message, code=code)
        self.status: int = REASON_CODES[code] if status is None else status
        self.allow = allow


class LocalProtocolError(ProtocolError):
    """We misused the protocol API (or built an invalid event): a bug on this side."""

    code = "protocol-misuse"


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------
# Events: frozen, validated when built. Invalid values raise LocalProtocolError; when the value
# came off the wire, the connection re-raises it as a RemoteProtocolError.

_SHA256_RE: Final = re.compile(r"[0-9a-fA-F]{64}")


def _doc_id(value: object) -> str:
    if not isinstance(value, str) or not UUID_RE.fullmatch(value):
        raise LocalProtocolError(
            f"doc_id must be a UUID in 8-4-4-4-12 hex form, not {_short(value)}")
    return value.lower()


def _sha256(value: object) -> str:
    if not isinstance(value, str) or not _SHA256_RE.fullmatch(value):
        raise LocalProtocolError(f"sha256 must be 64 hex digits, not {_short(value)}")
    return value.lower()


def _length(value: object, what: str) -> int:
    if type(value) is not int or value < 0:
        raise LocalProtocolError(f"{what} must be a non-negative int, not {_short(value)}")
    return value


def _bytes(value: object, what: str) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise LocalProtocolError(f"{what} must be bytes, not {type(value).__name__}")
    data = bytes(value)
    if not data:
        raise LocalProtocolError(f"{what} must not be empty")
    return data


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _json_text(value: object) -> str:
    """Compact, key-sorted, ASCII-only JSON: safe inside an HTTP header field."""
    try:
        return json.dumps(value, ensure_ascii=True, allow_nan=False, sort_keys=True,
                          separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as e:
        raise LocalProtocolError(f"not representable as JSON: {e}") from None


class Event:
    """Base class of every protocol event."""

    __slots__ = ()


@dataclass(frozen=True)
class SubmitDocument(Event):
    """Start of a document submission; the client then sends ``length`` bytes of body.

    A server yields it when the request head has arrived and passed the limits; ``BodyChunk``
    events and one ``BodyEnd`` follow. ``doc_id`` is normalised to lower case, ``metadata`` to a
    read-only mapping of what its JSON says. ``expect_continue`` asks the server for
    ``100 Continue`` before the body (worth it for large packages: a refusal then costs no
    upload).
    """

    doc_id: str
    length: int
    sha256: str
    metadata: Mapping[str, Any] = field(default_factory=dict, hash=False)
    expect_continue: bool = False
    metadata_json: str = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "doc_id", _doc_id(self.doc_id))
        _length(self.length, "length")
        object.__setattr__(self, "sha256", _sha256(self.sha256))
        if not isinstance(self.metadata, Mapping) or not all(
                isinstance(k, str) for k in self.metadata):
            raise LocalProtocolError("metadata must be a mapping with str keys")
        text = _json_text(dict(self.metadata))
        object.__setattr__(self, "metadata_json", text)
        object.__setattr__(self, "metadata", MappingProxyType(json.loads(text)))
        if not isinstance(self.expect_continue, bool):
            raise LocalProtocolError("expect_continue must be a bool")


@dataclass(frozen=True)
class BodyChunk(Event):
    """A piece of a submitted document's body, in the size it arrived (server side)."""

    data: bytes

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", _bytes(self.data, "BodyChunk.data"))

    def __repr__(self) -> str:  # a chunk can be megabytes: never print it whole
        return f"BodyChunk(<{len(self.data)} bytes>)"


@dataclass(frozen=True)
class BodyEnd(Event):
    """The whole body has arrived (server side): its length, SHA-256, and whether the SHA-256
    equals the one the client declared. Only now may the server acknowledge."""

    length: int
    sha256: str
    digest_ok: bool

    def __post_init__(self) -> None:
        _length(self.length, "length")
        object.__setattr__(self, "sha256", _sha256(self.sha256))
        if not isinstance(self.digest_ok, bool):
            raise LocalProtocolError("digest_ok must be a bool")


@dataclass(frozen=True)
class DeliverReceipt(Event):
    """A signed-for receipt (a CMS blob) for document ``doc_id``, travelling back to its
    sender. A server yields it once the whole (size-limited) body has arrived."""

    doc_id: str
    receipt: bytes = field(repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "doc_id", _doc_id(self.doc_id))
        object.__setattr__(self, "receipt", _bytes(self.receipt, "receipt"))


@dataclass(frozen=True)
class DeliverCheckpoint(Event):
    """A signed audit checkpoint of the sender's log (``record``: its JSON), given to a
    witness. A server yields it once the whole (size-limited) body has arrived."""

    seq: int
    record: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.seq, bool) or not isinstance(self.seq, int) or \
                not 0 < self.seq < 10**18:
            raise LocalProtocolError(f"seq must be a positive int, not {_short(self.seq)}")
        object.__setattr__(self, "record", _bytes(self.record, "record"))
        if len(self.record) > MAX_CHECKPOINT_SIZE:
            raise LocalProtocolError(f"a checkpoint record of {len(self.record)} bytes is over "
                                     f"{MAX_CHECKPOINT_SIZE}")


def _crl_number(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**159:
        raise LocalProtocolError(f"a CRL number is a non-negative int, not {_short(value)}")
    return value


@dataclass(frozen=True)
class Ping(Event):
    """Are you there, and what time is it? `crl_number`: the CRL the asker holds."""

    crl_number: int | None = None

    def __post_init__(self) -> None:
        _crl_number(self.crl_number)


@dataclass(frozen=True)
class FetchCrl(Event):
    """Send me the CRL you hold (it is newer than mine)."""


@dataclass(frozen=True)
class OfferCrl(Event):
    """Here is the CRL I hold (it is newer than yours): DER."""

    crl: bytes = field(repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "crl", _bytes(self.crl, "crl"))


@dataclass(frozen=True)
class CrlFile(Event):
    """The answer to ``FetchCrl``: the CRL, DER (200)."""

    crl: bytes = field(repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "crl", _bytes(self.crl, "crl"))


@dataclass(frozen=True)
class CrlAccepted(Event):
    """The offered CRL was taken (or was no news) (204)."""


@dataclass(frozen=True)
class Acknowledge(Event):
    """The document is on stable storage: ``stored`` now (201) or a ``duplicate`` of one
    already held under the same doc_id (200). ``receipt`` is an optional CMS blob."""

    doc_id: str
    status: Literal["stored", "duplicate"]
    receipt: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "doc_id", _doc_id(self.doc_id))
        if self.status not in ("stored", "duplicate"):
            raise LocalProtocolError(
                f"Acknowledge.status must be 'stored' or 'duplicate', not {_short(self.status)}")
        if self.receipt is not None:
            object.__setattr__(self, "receipt", _bytes(self.receipt, "receipt"))

    @property
    def http_status(self) -> int:
        return 201 if self.status == "stored" else 200


@dataclass(frozen=True)
class Reject(Event):
    """A refusal with a reason code from ``REASON_CODES``; ``status`` defaults to the code's."""

    code: str
    message: str = ""
    status: int = None  # type: ignore[assignment]  # None means the code's default

    def __post_init__(self) -> None:
        if self.code not in REASON_CODES:
            raise LocalProtocolError(f"unknown reason code {_short(self.code)}")
        if not isinstance(self.message, str) or len(self.message) > _MAX_MESSAGE_CHARS:
            raise LocalProtocolError(
                f"Reject.message must be a str of at most {_MAX_MESSAGE_CHARS} characters")
        if self.status is None:
            object.__setattr__(self, "status", REASON_CODES[self.code])
        elif type(self.status) is not int or not 400 <= self.status <= 599:
            raise LocalProtocolError(f"Reject.status must be 400-599, not {_short(self.status)}")


@dataclass(frozen=True)
class ReceiptAccepted(Event):
    """The receipt for ``doc_id`` was taken (204)."""

    doc_id: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "doc_id", _doc_id(self.doc_id))


@dataclass(frozen=True)
class CheckpointAccepted(Event):
    """The witness keeps checkpoint ``seq`` (204)."""

    seq: int

    def __post_init__(self) -> None:
        if isinstance(self.seq, bool) or not isinstance(self.seq, int) or self.seq <= 0:
            raise LocalProtocolError(f"seq must be a positive int, not {_short(self.seq)}")


@dataclass(frozen=True)
class Pong(Event):
    """The answer to ``Ping``: who answered, and its clock (timezone-aware)."""

    unit: str
    time: datetime
    crl_number: int | None = None  # the CRL the answering node holds

    def __post_init__(self) -> None:
        _crl_number(self.crl_number)
        if not isinstance(self.unit, str) or not 0 < len(self.unit) <= _MAX_UNIT_CHARS:
            raise LocalProtocolError(
                f"Pong.unit must be a non-empty str of at most {_MAX_UNIT_CHARS} characters")
        if not isinstance(self.time, datetime) or self.time.utcoffset() is None:
            raise LocalProtocolError("Pong.time must be a timezone-aware datetime")


@dataclass(frozen=True)
class Continue(Event):
    """The server said ``100 Continue``: send the body (client side, after ``expect_continue``)."""


@dataclass(frozen=True)
class ConnectionClosed(Event):
    """The peer closed the connection cleanly, between messages."""


_E = TypeVar("_E", bound=Event)
Request: TypeAlias = (SubmitDocument | DeliverReceipt | DeliverCheckpoint | Ping | FetchCrl
                      | OfferCrl)
Response: TypeAlias = (Acknowledge | Reject | ReceiptAccepted | CheckpointAccepted | Pong
                       | CrlFile | CrlAccepted)


class _Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA: Final = _Sentinel("NEED_DATA")
"""``next_event()``: feed more bytes with ``receive_data()`` first."""
PAUSED: Final = _Sentinel("PAUSED")
"""``ServerConnection.next_event()``: a whole request is in; answer it before reading on."""


# ---------------------------------------------------------------------------------------------
# States. Everything that moves a connection from one state to another is checked against
# these two tables.


class State(Enum):
    IDLE = "idle"                      # between requests (both roles)
    RECV_BODY = "recv-body"            # server: a request head is in, its body is arriving
    SEND_RESPONSE = "send-response"    # server: a whole request is in; answer it with send()
    SEND_BODY = "send-body"            # client: streaming a document body with send_body()
    AWAIT_RESPONSE = "await-response"  # client: the request is out; read the answer
    MUST_CLOSE = "must-close"          # the last response ended the connection: close it
    CLOSED = "closed"                  # the peer closed the connection cleanly
    ERROR = "error"                    # a protocol error; only send_error() still works


_S = State
_SERVER_MOVES: Final[Mapping[State, frozenset[State]]] = {
    _S.IDLE: frozenset({_S.RECV_BODY, _S.CLOSED, _S.MUST_CLOSE, _S.ERROR}),
    _S.RECV_BODY: frozenset({_S.SEND_RESPONSE, _S.MUST_CLOSE, _S.ERROR}),  # MUST_CLOSE: early no
    _S.SEND_RESPONSE: frozenset({_S.IDLE, _S.MUST_CLOSE, _S.ERROR}),
    _S.MUST_CLOSE: frozenset({_S.ERROR}),
    _S.CLOSED: frozenset({_S.ERROR}),
    _S.ERROR: frozenset(),
}
_CLIENT_MOVES: Final[Mapping[State, frozenset[State]]] = {
    _S.IDLE: frozenset({_S.SEND_BODY, _S.AWAIT_RESPONSE, _S.CLOSED, _S.ERROR}),
    _S.SEND_BODY: frozenset({_S.AWAIT_RESPONSE, _S.MUST_CLOSE, _S.ERROR}),  # early refusal
    _S.AWAIT_RESPONSE: frozenset({_S.IDLE, _S.MUST_CLOSE, _S.ERROR}),
    _S.MUST_CLOSE: frozenset({_S.ERROR}),
    _S.CLOSED: frozenset({_S.ERROR}),
    _S.ERROR: frozenset(),
}


@dataclass(frozen=True)
class ConnectionStatistics:
    """What a connection holds and has done. ``buffered_bytes`` counts every received byte not
    yet handed out as an event (h11's buffer plus a receipt or response being collected)."""

    state: State
    buffered_bytes: int
    bytes_received: int
    bytes_sent: int
    requests_completed: int


# ---------------------------------------------------------------------------------------------
# Shared machinery


def _check_limit(value: object, name: str) -> int:
    if type(value) is not int or value <= 0:
        raise ValueError(f"{name} must be a positive int, not {_short(value)}")
    return value


def _headers(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for n, v in headers if n == name]


def _one_header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    values = _headers(headers, name)
    if len(values) > 1:
        raise RemoteProtocolError(f"more than one {name.decode()} header")
    return values[0] if values else None


def _media_type(value: bytes | None) -> str | None:
    if value is None:
        return None
    return value.split(b";", 1)[0].strip().lower().decode("ascii", "replace")


def _phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


def _decode_json_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise RemoteProtocolError(f"{what} is not valid JSON: {_short(str(e), 120)}") from None
    if not isinstance(value, dict):
        raise RemoteProtocolError(f"{what} is not a JSON object")
    return value


def _json_body(value: object) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class _Connection:
    """What both roles share: the h11 connection, the state table, errors, statistics."""

    _moves: Mapping[State, frozenset[State]]

    def __init__(self, role: Any, max_header_size: int) -> None:
        self._max_header_size = _check_limit(max_header_size, "max_header_size")
        self._h11 = h11.Connection(role, max_incomplete_event_size=self._max_header_size)
        self._state = State.IDLE
        self._eof = False
        self._bytes_received = 0
        self._bytes_sent = 0
        self._completed = 0
        self._error: ProtocolError | None = None

    @property
    def state(self) -> State:
        return self._state

    @property
    def must_close(self) -> bool:
        """True once this connection cannot carry another request: close it."""
        return self._state in (State.MUST_CLOSE, State.CLOSED, State.ERROR)

    def _goto(self, new: State) -> None:
        if new is not self._state and new not in self._moves[self._state]:
            raise AssertionError(f"bug: no transition {self._state.name} -> {new.name}")
        self._state = new

    def _fail(self, error: ProtocolError) -> ProtocolError:
        if self._state is not State.ERROR:
            self._goto(State.ERROR)
            self._error = error
        return error

    def _misuse(self, message: str) -> LocalProtocolError:
        error = LocalProtocolError(message)
        self._fail(error)
        return error

    def _check_usable(self) -> None:
        if self._state is State.ERROR:
            raise LocalProtocolError(f"the connection failed earlier ({self._error}); close it")

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes from the peer; ``b""`` means the peer closed its side (EOF).

        Call it after ``next_event()`` returned ``NEED_DATA``, with what one bounded read
        returned: what is fed here is held until ``next_event()`` consumes it.
        """
        self._check_usable()
        if not isinstance(data, bytes | bytearray | memoryview):
            raise self._misuse(f"receive_data() takes bytes, not {type(data).__name__}")
        if self._state in (State.MUST_CLOSE, State.CLOSED):
            return  # nobody will read it: don't hold it
        if not data:
            self._eof = True
        elif self._eof:
            raise self._misuse("receive_data() got bytes after EOF")
        else:
            self._bytes_received += len(data)
        self._h11.receive_data(bytes(data))

    def _remote_from_h11(self, e: h11.RemoteProtocolError) -> RemoteProtocolError:
        text = str(e)
        if self._eof and (text.startswith(("peer closed connection", "peer unexpectedly closed"))
                          or text.startswith("can't handle event type ConnectionClosed")):
            return RemoteProtocolError(f"truncated: the peer closed the connection mid-message "
                                       f"({_short(text, 200)})", code="truncated")
        if e.error_status_hint == 431:
            return RemoteProtocolError(f"the header section is larger than the limit of "
                                       f"{self._max_header_size} bytes", code="headers-too-large")
        if e.error_status_hint == 501:
            return RemoteProtocolError(_short(text, 200), code="not-implemented")
        return RemoteProtocolError(f"malformed HTTP: {_short(text, 200)}")

    def _check_head_size(self, first_line: int, headers: Sequence[tuple[bytes, bytes]]) -> None:
        # h11 bounds only an *incomplete* head; one that arrives whole in a single read can be
        # any size, so measure it again (as written: "name: value\r\n" per field).
        size = first_line + sum(len(n) + len(v) + 4 for n, v in headers) + 2
        if size > self._max_header_size:
            raise RemoteProtocolError(f"the header section ({size} bytes) is larger than the "
                                      f"limit of {self._max_header_size}",
                                      code="headers-too-large")

    def _h11_event(self) -> Any:
        try:
            return self._h11.next_event()
        except h11.RemoteProtocolError as e:
            raise self._remote_from_h11(e) from None

    def _h11_send(self, *events: Any) -> bytes:
        try:
            out = b"".join(self._h11.send(ev) or b"" for ev in events)
        except h11.LocalProtocolError as e:
            raise self._misuse(f"h11 refused to send: {e}") from None
        self._bytes_sent += len(out)
        return out

    def _buffered(self) -> int:
        return len(self._h11.trailing_data[0])

    def statistics(self) -> ConnectionStatistics:
        return ConnectionStatistics(self._state, self._buffered(), self._bytes_received,
                                    self._bytes_sent, self._completed)


# ---------------------------------------------------------------------------------------------
# Server


_ROUTE_RE: Final = re.compile(rb"/v1/(documents|receipts)/([^/?#]+)")
_CHECKPOINT_RE: Final = re.compile(rb"/v1/checkpoints/([1-9][0-9]{0,17})")


def _check_upload(what: str, transfer_encoding: Any, length: int | None, limit: int,
                  content_type: str | None, wanted: str) -> None:
    """A CRL or a checkpoint offered in a request body: sized, within `limit`, of its type."""
    if transfer_encoding or length is None:
        raise RemoteProtocolError("Content-Length is required (chunked uploads are refused)",
                                  code="length-required")
    if length > limit:
        raise RemoteProtocolError(f"a {what} of {length} bytes is over the limit of {limit}",
                                  code="too-large")
    if content_type != wanted:
        raise RemoteProtocolError(f"a {what} must be {wanted}, not {_short(content_type)}",
                                  code="unsupported-media-type")
    if length == 0:
        raise RemoteProtocolError(f"an empty {what}")


class ServerConnection(_Connection):
    """The receiving side of one connection. Limits (bytes):

    - ``max_header_size`` (16 KiB): request line plus headers; more gives 431.
    - ``max_body_size`` (2 GiB): declared ``Content-Length`` of a document; more gives 413.
    - ``max_receipt_size`` (64 KiB): a delivered receipt; more gives 413.
    - ``max_metadata_size`` (8 KiB): the ``X-Exchanged-Metadata`` value; more gives 431.

    Loop: ``next_event()``; on ``NEED_DATA`` send ``send_continue()``'s bytes if any, read with
    a timeout and ``receive_data()``; on ``PAUSED`` answer with ``send()``. On a
    ``RemoteProtocolError`` send ``send_error(exc)``'s bytes and close.
    """

    _moves = _SERVER_MOVES

    def __init__(self, *, max_header_size: int = DEFAULT_MAX_HEADER_SIZE,
                 max_body_size: int = DEFAULT_MAX_BODY_SIZE,
                 max_receipt_size: int = DEFAULT_MAX_RECEIPT_SIZE,
                 max_metadata_size: int = DEFAULT_MAX_METADATA_SIZE,
                 max_crl_size: int = DEFAULT_MAX_CRL_SIZE) -> None:
        super().__init__(h11.SERVER, max_header_size)
        self.max_body_size = _check_limit(max_body_size, "max_body_size")
        self.max_receipt_size = _check_limit(max_receipt_size, "max_receipt_size")
        self.max_metadata_size = _check_limit(max_metadata_size, "max_metadata_size")
        self._request: Request | None = None
        self._receipt_doc_id = ""
        self._checkpoint_seq = 0
        self._crl_offered = False
        self.max_crl_size = _check_limit(max_crl_size, "max_crl_size")
        self._receipt = bytearray()  # a receipt's or a checkpoint's body, as it arrives
        self._hasher = hashlib.sha256()
        self._body_received = 0
        self._answered = False  # a response (or error response) went out in this cycle

    @property
    def current_request(self) -> Request | None:
        """The request being received or answered (``None`` between requests)."""
        return self._request

    @property
    def they_are_waiting_for_100_continue(self) -> bool:
        return self._state is State.RECV_BODY and self._h11.they_are_waiting_for_100_continue

    def _buffered(self) -> int:
        return super()._buffered() + len(self._receipt)

    # -- receiving

    def next_event(self) -> Event | _Sentinel:
        """The next request event: ``SubmitDocument`` then ``BodyChunk``... ``BodyEnd``;
        ``DeliverReceipt``; ``Ping``; ``ConnectionClosed``; or ``NEED_DATA`` / ``PAUSED``.

        Raises ``RemoteProtocolError`` if the peer broke the protocol.
        """
        self._check_usable()
        if self._state is State.SEND_RESPONSE:
            return PAUSED
        if self._state is State.CLOSED:
            return ConnectionClosed()
        if self._state is State.MUST_CLOSE:
            raise self._misuse("next_event() after the connection was answered for the last "
                               "time; close it")
        try:
            return self._next_event()
        except RemoteProtocolError as e:
            self._fail(e)
            raise

    def _next_event(self) -> Event | _Sentinel:
        # Each pass consumes bytes or moves h11 on, so the loop ends (at NEED_DATA at the
        # latest); it only repeats for events the caller never sees (receipt and ping bodies).
        while True:
            ev = self._h11_event()
            if ev is h11.NEED_DATA:
                return NEED_DATA
            if ev is h11.PAUSED:  # not reached: we stop at SEND_RESPONSE before h11 does
                return PAUSED
            if isinstance(ev, h11.ConnectionClosed):
                self._goto(State.CLOSED)
                return ConnectionClosed()
            if isinstance(ev, h11.Request):
                started = self._start_request(ev)
                if started is not None:
                    return started
            elif isinstance(ev, h11.Data):
                chunk = self._body_data(bytes(ev.data))
                if chunk is not None:
                    return chunk
            elif isinstance(ev, h11.EndOfMessage):
                return self._end_of_request()
            else:  # InformationalResponse/Response cannot come from a client: h11 refuses them
                raise RemoteProtocolError(f"unexpected {type(ev).__name__}")

    def _start_request(self, req: h11.Request) -> Event | None:
        target = req.target
        self._check_head_size(len(req.method) + len(target) + 11, req.headers)
        method = req.method.decode("ascii", "replace")
        route = _ROUTE_RE.fullmatch(target)
        checkpoint = _CHECKPOINT_RE.fullmatch(target)
        allowed: tuple[str, ...]
        if target == b"/v1/ping":
            kind, allowed = "ping", ("GET",)
        elif target == b"/v1/crl":
            kind, allowed = "crl", ("GET", "POST")
        elif checkpoint is not None:
            kind, allowed = "checkpoints", ("POST",)
        elif route is not None:
            kind, allowed = route.group(1).decode(), ("POST",)
        else:
            shown = _short(target.decode("ascii", "replace"))
            raise RemoteProtocolError(f"no such resource: {shown}", code="not-found")
        if method not in allowed:
            raise RemoteProtocolError(f"{_short(method)} is not allowed here",
                                      code="method-not-allowed", allow=allowed)
        transfer_encoding = _headers(req.headers, b"transfer-encoding")
        length_header = _one_header(req.headers, b"content-length")
        length = int(length_header) if length_header is not None else None  # h11 checked it
        content_type = _media_type(_one_header(req.headers, b"content-type"))

        if kind == "ping":
            if transfer_encoding or length:
                raise RemoteProtocolError("a ping has no body")
            raw = _one_header(req.headers, _H_CRL_NUMBER)
            if raw is not None and (not raw.isdigit() or len(raw) > 48):
                raise RemoteProtocolError("X-Exchanged-Crl-Number is not a number")
            self._request = Ping(int(raw) if raw is not None else None)
            self._goto(State.RECV_BODY)
            return None

        if kind == "crl" and method == "GET":
            if transfer_encoding or length:
                raise RemoteProtocolError("a CRL fetch has no body")
            self._request = FetchCrl()
            self._goto(State.RECV_BODY)
            return None
        if kind == "crl":
            _check_upload("CRL", transfer_encoding, length, self.max_crl_size, content_type,
                          CRL_TYPE)
            self._crl_offered = True
            self._request = None
            self._goto(State.RECV_BODY)
            return None

        if checkpoint is not None:
            _check_upload("checkpoint", transfer_encoding, length, MAX_CHECKPOINT_SIZE,
                          content_type, _JSON_TYPE)
            self._checkpoint_seq = int(checkpoint.group(1))
            self._request = None
            self._goto(State.RECV_BODY)
            return None

        assert route is not None
        doc_id = route.group(2).decode("ascii", "replace")
        if not UUID_RE.fullmatch(doc_id):
            raise RemoteProtocolError(f"document id {_short(doc_id)} is not a UUID")
        if transfer_encoding or length is None:
            raise RemoteProtocolError("Content-Length is required (chunked uploads are refused)",
                                      code="length-required")
        if kind == "receipts":
            if length > self.max_receipt_size:
                raise RemoteProtocolError(f"a receipt of {length} bytes is over the limit of "
                                          f"{self.max_receipt_size}", code="too-large")
            if content_type not in _RECEIPT_TYPES:
                raise RemoteProtocolError(f"a receipt must be {RECEIPT_TYPE}, not "
                                          f"{_short(content_type)}", code="unsupported-media-type")
            if length == 0:
                raise RemoteProtocolError("an empty receipt")
            self._receipt_doc_id = doc_id.lower()
            self._request = None
            self._goto(State.RECV_BODY)
            return None

        if length > self.max_body_size:
            raise RemoteProtocolError(f"a document of {length} bytes is over the limit of "
                                      f"{self.max_body_size}", code="too-large")
        if content_type != PACKAGE_TYPE:
            raise RemoteProtocolError(f"a document must be {PACKAGE_TYPE}, not "
                                      f"{_short(content_type)}", code="unsupported-media-type")
        sha = _one_header(req.headers, _H_SHA256)
        if sha is None:
            raise RemoteProtocolError("X-Exchanged-Sha256 is required")
        metadata = self._metadata(_one_header(req.headers, _H_METADATA))
        try:
            submit = SubmitDocument(doc_id, length, sha.decode("ascii", "replace"), metadata,
                                    expect_continue=self._h11.they_are_waiting_for_100_continue)
        except LocalProtocolError as e:
            raise RemoteProtocolError(str(e)) from None
        self._request = submit
        self._hasher = hashlib.sha256()
        self._body_received = 0
        self._goto(State.RECV_BODY)
        return submit

    def _metadata(self, raw: bytes | None) -> dict[str, Any]:
        if raw is None:
            return {}
        if len(raw) > self.max_metadata_size:
            raise RemoteProtocolError(f"X-Exchanged-Metadata is over the limit of "
                                      f"{self.max_metadata_size} bytes", code="headers-too-large")
        return _decode_json_object(raw, "X-Exchanged-Metadata")

    def _body_data(self, data: bytes) -> Event | None:
        if isinstance(self._request, SubmitDocument):
            self._hasher.update(data)
            self._body_received += len(data)
            return BodyChunk(data)
        if self._receipt_doc_id or self._checkpoint_seq or self._crl_offered:
            self._receipt += data  # h11 stops at Content-Length, which we capped
            return None
        raise RemoteProtocolError("a body where none belongs")  # not reached: length 0

    def _end_of_request(self) -> Event:
        self._goto(State.SEND_RESPONSE)
        if isinstance(self._request, SubmitDocument):
            digest = self._hasher.hexdigest()
            return BodyEnd(self._body_received, digest, digest == self._request.sha256)
        if self._receipt_doc_id:
            receipt = DeliverReceipt(self._receipt_doc_id, bytes(self._receipt))
            self._request = receipt
            self._receipt_doc_id = ""
            self._receipt = bytearray()
            return receipt
        if self._checkpoint_seq:
            checkpoint = DeliverCheckpoint(self._checkpoint_seq, bytes(self._receipt))
            self._request = checkpoint
            self._checkpoint_seq = 0
            self._receipt = bytearray()
            return checkpoint
        if self._crl_offered:
            offer = OfferCrl(bytes(self._receipt))
            self._request = offer
            self._crl_offered = False
            self._receipt = bytearray()
            return offer
        assert isinstance(self._request, Ping | FetchCrl)
        return self._request

    # -- answering

    def send_continue(self) -> bytes:
        """``100 Continue`` if the client is waiting for it before sending the body, else
        ``b""``. Send it when you mean to read the body (i.e. on ``NEED_DATA``)."""
        self._check_usable()
        if not self.they_are_waiting_for_100_continue:
            return b""
        return self._h11_send(h11.InformationalResponse(status_code=100, headers=[],
                                                        reason=b"Continue"))

    def send(self, event: Response) -> bytes:
        """The bytes of the response to the current request.

        ``Acknowledge`` only after ``BodyEnd`` (nothing is acknowledged before it is all
        received) and ``ReceiptAccepted`` only after ``DeliverReceipt``, each for that request's
        doc_id; ``Pong`` only for a ``Ping``. ``Reject`` may also go while a body is still
        arriving: the response then says ``Connection: close`` and the connection must close.
        Afterwards ``state`` is ``IDLE`` (read the next request) or ``MUST_CLOSE``.
        """
        self._check_usable()
        if self._state not in (State.RECV_BODY, State.SEND_RESPONSE):
            raise self._misuse(f"send() with no request to answer (state {self._state.name})")
        request = self._request
        complete = self._state is State.SEND_RESPONSE
        if isinstance(event, Reject):
            pass
        elif isinstance(event, Acknowledge):
            if not complete or not isinstance(request, SubmitDocument):
                raise self._misuse("Acknowledge answers a document whose body has all arrived")
            if event.doc_id != request.doc_id:
                raise self._misuse(f"Acknowledge for {event.doc_id}, but the request is for "
                                   f"{request.doc_id}")
        elif isinstance(event, ReceiptAccepted):
            if not complete or not isinstance(request, DeliverReceipt):
                raise self._misuse("ReceiptAccepted answers a delivered receipt")
            if event.doc_id != request.doc_id:
                raise self._misuse(f"ReceiptAccepted for {event.doc_id}, but the receipt is for "
                                   f"{request.doc_id}")
        elif isinstance(event, CheckpointAccepted):
            if not complete or not isinstance(request, DeliverCheckpoint):
                raise self._misuse("CheckpointAccepted answers a delivered checkpoint")
            if event.seq != request.seq:
                raise self._misuse(f"CheckpointAccepted for {event.seq}, but the checkpoint is "
                                   f"{request.seq}")
        elif isinstance(event, Pong):
            if not complete or not isinstance(request, Ping):
                raise self._misuse("Pong answers a Ping")
        elif isinstance(event, CrlFile):
            if not complete or not isinstance(request, FetchCrl):
                raise self._misuse("CrlFile answers a FetchCrl")
        elif isinstance(event, CrlAccepted):
            if not complete or not isinstance(request, OfferCrl):
                raise self._misuse("CrlAccepted answers an OfferCrl")
        else:
            raise self._misuse(f"a server cannot send {type(event).__name__}")
        status, headers, body = _encode_response(event)
        if not complete:
            headers.append((b"Connection", b"close"))
        events: list[Any] = [h11.Response(status_code=status, headers=headers,
                                          reason=_phrase(status))]
        if body:
            events.append(h11.Data(data=body))
        events.append(h11.EndOfMessage())
        out = self._h11_send(*events)
        self._answered = True
        self._end_cycle()
        return out

    def _end_cycle(self) -> None:
        if self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
            self._h11.start_next_cycle()
            self._completed += 1
            self._request = None
            self._answered = False
            self._goto(State.IDLE)
        else:
            self._goto(State.MUST_CLOSE)

    def send_error(self, error: BaseException | Reject) -> bytes:
        """The bytes of an error response that ends the connection (``Connection: close``).

        Takes the ``RemoteProtocolError`` that ``next_event()`` raised (its status and code),
        a ``Reject`` (e.g. ``Reject("timeout")`` or ``Reject("busy")``), or any other exception
        (answered as a bare 500 ``internal-error``: no details leak to the peer). Works in the
        ERROR state too. Returns ``b""`` when there is nobody to answer: a response already went
        out in this cycle, or the peer closed cleanly. Afterwards the connection must close.
        """
        if self._answered or self._state in (State.MUST_CLOSE, State.CLOSED):
            return b""
        allow: tuple[str, ...] = ()
        if isinstance(error, Reject):
            reject = error
        elif isinstance(error, RemoteProtocolError):
            message = str(error)
            if len(message) > _MAX_MESSAGE_CHARS:
                message = message[: _MAX_MESSAGE_CHARS - 3] + "..."
            reject, allow = Reject(error.code, message), error.allow
            if 400 <= error.status <= 599:
                reject = Reject(error.code, message, error.status)
        else:
            reject = Reject("internal-error", "internal error")
        status, headers, body = _encode_response(reject)
        if allow:
            headers.append((b"Allow", ", ".join(allow).encode("ascii")))
        headers.append((b"Connection", b"close"))
        # Written by hand: h11 cannot send a response before it has parsed a request (e.g. a
        # garbled request line, or a timeout waiting for one), and the connection ends here.
        out = b"".join([b"HTTP/1.1 %d %s\r\n" % (status, _phrase(status)),
                        *(b"%s: %s\r\n" % (n, v) for n, v in headers), b"\r\n", body])
        self._answered = True
        self._bytes_sent += len(out)
        if self._state is not State.ERROR:
            self._goto(State.MUST_CLOSE)
        return out


def _encode_response(event: Response) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    if isinstance(event, Acknowledge):
        receipt = None if event.receipt is None else base64.b64encode(event.receipt).decode()
        status = event.http_status
        body = _json_body({"doc_id": event.doc_id, "status": event.status, "receipt": receipt})
    elif isinstance(event, Reject):
        status, body = event.status, _json_body({"code": event.code, "message": event.message})
    elif isinstance(event, Pong):
        status = 200
        pong: dict[str, Any] = {"unit": event.unit,
                                "time": event.time.astimezone(UTC).isoformat()}
        if event.crl_number is not None:
            pong["crl_number"] = event.crl_number
        body = _json_body(pong)
    elif isinstance(event, CrlFile):
        return 200, [(b"Content-Type", CRL_TYPE.encode()),
                     (b"Content-Length", str(len(event.crl)).encode())], event.crl
    else:
        return 204, [], b""
    return status, [(b"Content-Type", _JSON_TYPE.encode()),
                    (b"Content-Length", str(len(body)).encode())], body


# ---------------------------------------------------------------------------------------------
# Client


class ClientConnection(_Connection):
    """The sending side of one connection to the node at ``host`` (the ``Host`` header).

    Limits (bytes): ``max_header_size`` (16 KiB) on the response head, ``max_response_size``
    (256 KiB) on a response body, ``max_receipt_size`` (64 KiB) on a receipt sent or received,
    ``max_metadata_size`` (8 KiB) on the metadata we send (the server's limit: keep them equal).

    ``send(SubmitDocument(...))``, then ``send_body(chunk)`` until ``length`` bytes are out (the
    last one completes the request); ``send(DeliverReceipt(...))`` and ``send(Ping())`` are
    complete requests. Then ``next_event()`` until the answer: ``Acknowledge``, ``Reject``,
    ``ReceiptAccepted`` or ``Pong`` (and ``Continue`` first if asked for). A ``Reject`` may come
    while the body is still going out: stop sending; ``state`` is then ``MUST_CLOSE``.
    """

    _moves = _CLIENT_MOVES

    def __init__(self, host: str, *, max_header_size: int = DEFAULT_MAX_HEADER_SIZE,
                 max_response_size: int = DEFAULT_MAX_RESPONSE_SIZE,
                 max_receipt_size: int = DEFAULT_MAX_RECEIPT_SIZE,
                 max_metadata_size: int = DEFAULT_MAX_METADATA_SIZE,
                 max_crl_size: int = DEFAULT_MAX_CRL_SIZE,
                 user_agent: str = "exchanged") -> None:
        super().__init__(h11.CLIENT, max_header_size)
        if not isinstance(host, str) or not host or not host.isascii():
            raise ValueError("host must be a non-empty ASCII str (the Host header)")
        self.host = host
        self.user_agent = user_agent
        self.max_response_size = _check_limit(max_response_size, "max_response_size")
        self.max_receipt_size = _check_limit(max_receipt_size, "max_receipt_size")
        self.max_metadata_size = _check_limit(max_metadata_size, "max_metadata_size")
        self.max_crl_size = _check_limit(max_crl_size, "max_crl_size")
        self._request: Request | None = None
        self._remaining = 0
        self._hasher = hashlib.sha256()
        self._continue_seen = False
        self._response: h11.Response | None = None
        self._body = bytearray()

    @property
    def current_request(self) -> Request | None:
        return self._request

    @property
    def body_remaining(self) -> int:
        """Bytes of the document body still to pass to ``send_body()``."""
        return self._remaining if self._state is State.SEND_BODY else 0

    def _buffered(self) -> int:
        return super()._buffered() + len(self._body)

    # -- sending

    def send(self, event: Request) -> bytes:
        """The bytes of a request (for a document: its head only; the body follows through
        ``send_body()``). Only between requests (``state`` IDLE)."""
        self._check_usable()
        if self._state in (State.MUST_CLOSE, State.CLOSED):
            raise self._misuse("send() on a connection that is ending; open a new one")
        if self._state is not State.IDLE:
            raise self._misuse(f"send() while a request is under way (state {self._state.name})")
        headers: list[tuple[bytes, bytes]] = [(b"Host", self.host.encode("ascii")),
                                              (b"User-Agent", self.user_agent.encode())]
        if isinstance(event, SubmitDocument):
            if len(event.metadata_json) > self.max_metadata_size:
                raise self._misuse(f"metadata of {len(event.metadata_json)} bytes is over the "
                                   f"limit of {self.max_metadata_size}")
            headers += [(b"Content-Type", PACKAGE_TYPE.encode()),
                        (b"Content-Length", str(event.length).encode()),
                        (b"X-Exchanged-Sha256", event.sha256.encode())]
            if event.metadata:
                headers.append((b"X-Exchanged-Metadata", event.metadata_json.encode()))
            if event.expect_continue and event.length:
                headers.append((b"Expect", b"100-continue"))
            out = self._h11_send(h11.Request(method=b"POST", target=_target(event),
                                             headers=headers))
            self._begin(event)
            self._remaining = event.length
            self._hasher = hashlib.sha256()
            self._goto(State.SEND_BODY)
            if event.length == 0:
                out += self._finish_body()
            return out
        if isinstance(event, DeliverReceipt):
            if len(event.receipt) > self.max_receipt_size:
                raise self._misuse(f"a receipt of {len(event.receipt)} bytes is over the limit "
                                   f"of {self.max_receipt_size}")
            headers += [(b"Content-Type", RECEIPT_TYPE.encode()),
                        (b"Content-Length", str(len(event.receipt)).encode())]
            out = self._h11_send(h11.Request(method=b"POST", target=_target(event),
                                             headers=headers),
                                 h11.Data(data=event.receipt), h11.EndOfMessage())
        elif isinstance(event, DeliverCheckpoint):
            headers += [(b"Content-Type", _JSON_TYPE.encode()),
                        (b"Content-Length", str(len(event.record)).encode())]
            out = self._h11_send(h11.Request(method=b"POST",
                                             target=f"/v1/checkpoints/{event.seq}".encode(),
                                             headers=headers),
                                 h11.Data(data=event.record), h11.EndOfMessage())
        elif isinstance(event, Ping):
            if event.crl_number is not None:
                headers.append((b"X-Exchanged-Crl-Number", str(event.crl_number).encode()))
            out = self._h11_send(h11.Request(method=b"GET", target=b"/v1/ping", headers=headers),
                                 h11.EndOfMessage())
        elif isinstance(event, FetchCrl):
            out = self._h11_send(h11.Request(method=b"GET", target=b"/v1/crl", headers=headers),
                                 h11.EndOfMessage())
        elif isinstance(event, OfferCrl):
            if len(event.crl) > self.max_crl_size:
                raise self._misuse(f"a CRL of {len(event.crl)} bytes is over the limit of "
                                   f"{self.max_crl_size}")
            headers += [(b"Content-Type", CRL_TYPE.encode()),
                        (b"Content-Length", str(len(event.crl)).encode())]
            out = self._h11_send(h11.Request(method=b"POST", target=b"/v1/crl", headers=headers),
                                 h11.Data(data=event.crl), h11.EndOfMessage())
        else:
            raise self._misuse(f"a client cannot send {type(event).__name__}")
        self._begin(event)
        self._goto(State.AWAIT_RESPONSE)
        return out

    def _begin(self, event: Request) -> None:
        self._request = event
        self._continue_seen = False
        self._response = None
        self._body = bytearray()

    def send_body(self, data: bytes) -> bytes:
        """The bytes for the next piece of the document body. The piece that reaches the
        declared length completes the request, after checking the declared SHA-256."""
        self._check_usable()
        if self._state is not State.SEND_BODY:
            raise self._misuse(f"send_body() with no document body to send (state "
                               f"{self._state.name})")
        if not isinstance(data, bytes | bytearray | memoryview):
            raise self._misuse(f"send_body() takes bytes, not {type(data).__name__}")
        if len(data) > self._remaining:
            raise self._misuse(f"{len(data)} bytes of body, but only {self._remaining} remain "
                               f"of the declared length")
        if not data:
            return b""
        self._hasher.update(data)
        self._remaining -= len(data)
        out = self._h11_send(h11.Data(data=data))
        if self._remaining == 0:
            out += self._finish_body()
        return out

    def _finish_body(self) -> bytes:
        assert isinstance(self._request, SubmitDocument)
        if self._hasher.hexdigest() != self._request.sha256:
            raise self._misuse("the body sent does not match its declared X-Exchanged-Sha256")
        out = self._h11_send(h11.EndOfMessage())
        self._goto(State.AWAIT_RESPONSE)
        return out

    # -- receiving

    def next_event(self) -> Event | _Sentinel:
        """The answer to the current request (``Acknowledge``, ``Reject``, ``ReceiptAccepted``,
        ``Pong``), ``Continue``, ``ConnectionClosed`` (the server closed an idle connection),
        or ``NEED_DATA``. Raises ``RemoteProtocolError`` if the server broke the protocol."""
        self._check_usable()
        if self._state is State.CLOSED:
            return ConnectionClosed()
        if self._state is State.MUST_CLOSE:
            raise self._misuse("next_event() after the last response on this connection; "
                               "close it")
        try:
            return self._next_event()
        except RemoteProtocolError as e:
            self._fail(e)
            raise

    def _next_event(self) -> Event | _Sentinel:
        # Each pass consumes bytes or moves h11 on; it ends at NEED_DATA at the latest.
        while True:
            ev = self._h11_event()
            if ev is h11.NEED_DATA:
                return NEED_DATA
            if ev is h11.PAUSED:  # not reached: responses end at EndOfMessage, before pausing
                return NEED_DATA
            if isinstance(ev, h11.ConnectionClosed):
                # h11 accepts this only between requests.
                self._goto(State.CLOSED)
                return ConnectionClosed()
            if self._state is State.IDLE:
                # h11 lets a server answer before any request (a 408 on an idle connection):
                # for us it is the end of this connection.
                status = getattr(ev, "status_code", "?")
                raise RemoteProtocolError(f"the server sent {type(ev).__name__} {status} with "
                                          f"no request outstanding")
            if isinstance(ev, h11.InformationalResponse | h11.Response):
                self._check_head_size(len(ev.reason) + 15, ev.headers)
            if isinstance(ev, h11.InformationalResponse):
                if (ev.status_code == 100 and not self._continue_seen
                        and isinstance(self._request, SubmitDocument)
                        and self._request.expect_continue and self._state is State.SEND_BODY):
                    self._continue_seen = True
                    return Continue()
                continue  # other 1xx (and repeats) carry nothing for us
            if isinstance(ev, h11.Response):
                if self._state is State.SEND_BODY and ev.status_code < 400:
                    raise RemoteProtocolError(f"the server answered {ev.status_code} before the "
                                              f"whole body was sent")
                self._response = ev
            elif isinstance(ev, h11.Data):
                limit = self.max_crl_size if isinstance(self._request, FetchCrl) \
                    else self.max_response_size
                if len(self._body) + len(ev.data) > limit:
                    raise RemoteProtocolError(f"a response body over the limit of {limit} "
                                              "bytes", code="too-large")
                self._body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                answer = self._interpret()
                self._end_cycle()
                return answer
            else:
                raise RemoteProtocolError(f"unexpected {type(ev).__name__}")

    def _end_cycle(self) -> None:
        self._body = bytearray()
        self._response = None
        if self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
            self._h11.start_next_cycle()
            self._completed += 1
            self._request = None
            self._goto(State.IDLE)
        else:  # the server said close, or refused before the whole body was out
            self._goto(State.MUST_CLOSE)

    def _interpret(self) -> Response:
        response, request, body = self._response, self._request, bytes(self._body)
        assert response is not None and request is not None
        status = response.status_code
        if status >= 400:
            return self._reject(status, body)
        if isinstance(request, SubmitDocument) and status in (200, 201):
            data = self._json(response, body)
            receipt = data.get("receipt")
            if receipt is not None:
                if not isinstance(receipt, str):
                    raise RemoteProtocolError("the acknowledgement's receipt is not a string")
                if len(receipt) > (self.max_receipt_size + 2) // 3 * 4:
                    raise RemoteProtocolError("the acknowledgement's receipt is over the limit",
                                              code="too-large")
                try:
                    receipt = base64.b64decode(receipt, validate=True)
                except (binascii.Error, ValueError):
                    raise RemoteProtocolError("the acknowledgement's receipt is not base64") \
                        from None
            ack = self._build(Acknowledge, data.get("doc_id"), data.get("status"), receipt)
            if ack.doc_id != request.doc_id:
                raise RemoteProtocolError(f"acknowledgement for {ack.doc_id}, but we sent "
                                          f"{request.doc_id}")
            if ack.http_status != status:
                raise RemoteProtocolError(f"a {ack.status!r} acknowledgement with status {status}")
            return ack
        if isinstance(request, DeliverReceipt) and status == 204:
            return ReceiptAccepted(request.doc_id)
        if isinstance(request, DeliverCheckpoint) and status == 204:
            return CheckpointAccepted(request.seq)
        if isinstance(request, OfferCrl) and status == 204:
            return CrlAccepted()
        if isinstance(request, FetchCrl) and status == 200:
            ctype = _media_type(_one_header(response.headers, b"content-type"))
            if ctype != CRL_TYPE or not body:
                raise RemoteProtocolError(f"a CRL must come as {CRL_TYPE}, not {_short(ctype)}")
            return CrlFile(body)
        if isinstance(request, Ping) and status == 200:
            data = self._json(response, body)
            when = data.get("time")
            if not isinstance(when, str):
                raise RemoteProtocolError("the pong has no time")
            try:
                parsed = datetime.fromisoformat(when)
            except ValueError:
                raise RemoteProtocolError(f"the pong's time {_short(when)} is not ISO 8601") \
                    from None
            return self._build(Pong, data.get("unit"), parsed, data.get("crl_number"))
        raise RemoteProtocolError(f"unexpected status {status} for {type(request).__name__}")

    def _reject(self, status: int, body: bytes) -> Reject:
        assert self._response is not None
        data = self._json(self._response, body)
        if status > 599:
            raise RemoteProtocolError(f"status {status} is not an HTTP error status")
        message = data.get("message", "")
        if isinstance(message, str) and len(message) > _MAX_MESSAGE_CHARS:
            message = message[: _MAX_MESSAGE_CHARS - 3] + "..."
        return self._build(Reject, data.get("code"), message, status)

    def _json(self, response: h11.Response, body: bytes) -> dict[str, Any]:
        content_type = _media_type(_one_header(response.headers, b"content-type"))
        if content_type != _JSON_TYPE:
            raise RemoteProtocolError(f"a {response.status_code} response must be {_JSON_TYPE}, "
                                      f"not {_short(content_type)}")
        return _decode_json_object(body, f"the {response.status_code} response")

    @staticmethod
    def _build(cls: type[_E], *args: Any) -> _E:
        try:
            return cls(*args)
        except LocalProtocolError as e:  # the value came from the peer
            raise RemoteProtocolError(f"invalid {cls.__name__} from the server: {e}") from None


def _target(event: SubmitDocument | DeliverReceipt) -> bytes:
    kind = "documents" if isinstance(event, SubmitDocument) else "receipts"
    return f"/v1/{kind}/{event.doc_id}".encode("ascii")
