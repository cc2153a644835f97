"""The sans-IO wire protocol: a client and a server over an in-memory link, no sockets."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import random
import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exchanged.errors import ExchangedError
from exchanged.transport import protocol
from exchanged.transport.protocol import (
    DEFAULT_MAX_HEADER_SIZE,
    NEED_DATA,
    PAUSED,
    REASON_CODES,
    Acknowledge,
    BodyChunk,
    BodyEnd,
    CheckpointAccepted,
    ClientConnection,
    ConnectionClosed,
    Continue,
    CrlAccepted,
    CrlFile,
    DeliverCheckpoint,
    DeliverReceipt,
    Event,
    FetchCrl,
    LocalProtocolError,
    OfferCrl,
    Ping,
    Pong,
    ReceiptAccepted,
    Reject,
    RemoteProtocolError,
    ServerConnection,
    State,
    SubmitDocument,
)

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2025, 3, 14, 9, 26, 53, tzinfo=UTC)
MAX_STEPS = 10_000  # no loop below may spin longer: a protocol that hangs fails instead


def doc_id() -> str:
    return str(uuid.uuid4())


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def drain(conn: ServerConnection | ClientConnection) -> list[Any]:
    """Events until the connection needs bytes, pauses or sees the peer close."""
    out: list[Any] = []
    for _ in range(MAX_STEPS):
        ev = conn.next_event()
        out.append(ev)
        if ev is NEED_DATA or ev is PAUSED or isinstance(ev, ConnectionClosed):
            return out
        if conn.state is State.MUST_CLOSE:  # that was the last event this connection gives
            return out
    raise AssertionError("next_event() never stopped")


def events(conn: ServerConnection | ClientConnection) -> list[Any]:
    return [e for e in drain(conn) if e is not NEED_DATA and e is not PAUSED]


def submit(client: ClientConnection, server: ServerConnection, body: bytes, *,
           did: str | None = None, metadata: dict[str, Any] | None = None) -> list[Any]:
    """A whole submission through the link; the server's events."""
    ev = SubmitDocument(did or doc_id(), len(body), sha(body), metadata or {})
    server.receive_data(client.send(ev))
    if body:
        server.receive_data(client.send_body(body))
    return events(server)


def answer(server: ServerConnection, client: ClientConnection, response: Any) -> Any:
    data = server.send(response)
    client.receive_data(data)
    got = events(client)
    assert len(got) == 1, got
    return got[0]


def request_bytes(*requests: Any, host: str = "node-b") -> bytes:
    """Requests as a client writes them, each from a fresh client (so they can be joined)."""
    out = b""
    for req in requests:
        client = ClientConnection(host)
        if isinstance(req, tuple):
            sub, body = req
            out += client.send(sub) + (client.send_body(body) if body else b"")
        else:
            out += client.send(req)
    return out


def expect_remote(server: ServerConnection, data: bytes, code: str, status: int) -> bytes:
    """Feed a bad request; the error and the response the server sends for it."""
    server.receive_data(data)
    with pytest.raises(RemoteProtocolError) as info:
        drain(server)
    assert (info.value.code, info.value.status) == (code, status), str(info.value)
    assert server.state is State.ERROR
    response = server.send_error(info.value)
    assert response.startswith(b"HTTP/1.1 %d " % status)
    response_head, _, body = response.partition(b"\r\n\r\n")
    assert b"\r\nConnection: close" in response_head
    assert json.loads(body)["code"] == code
    return response


# ---------------------------------------------------------------------------------------------
# Each message end to end


def test_submit_document_end_to_end() -> None:
    client, server = ClientConnection("node-b"), ServerConnection()
    did = "5F0C6F4E-0D7A-4C8E-9A51-7F5B1C1D2E3F"  # upper case: normalised
    body = b"%PDF-1.7\n" + bytes(range(256)) * 40
    sent_head = client.send(SubmitDocument(did, len(body), sha(body).upper(), {"title": "通知"}))
    assert sent_head == (
        b"POST /v1/documents/5f0c6f4e-0d7a-4c8e-9a51-7f5b1c1d2e3f HTTP/1.1\r\n"
        b"Host: node-b\r\n"
        b"User-Agent: exchanged\r\n"
        b"Content-Type: application/vnd.exchanged.package\r\n"
        b"Content-Length: 10249\r\n"
        b"X-Exchanged-Sha256: " + sha(body).encode() + b"\r\n"
        b'X-Exchanged-Metadata: {"title":"\\u901a\\u77e5"}\r\n'
        b"\r\n")
    assert client.state is State.SEND_BODY and client.body_remaining == len(body)
    server.receive_data(sent_head)
    [started] = events(server)
    assert started == SubmitDocument(did.lower(), len(body), sha(body), {"title": "通知"})
    assert server.state is State.RECV_BODY and server.current_request == started

    got = b""
    for i in range(0, len(body), 1000):
        server.receive_data(client.send_body(body[i:i + 1000]))
        for ev in events(server):
            assert isinstance(ev, BodyChunk | BodyEnd)
            if isinstance(ev, BodyChunk):
                got += ev.data
            else:
                assert ev == BodyEnd(len(body), sha(body), True)
    assert got == body
    assert client.state is State.AWAIT_RESPONSE and server.state is State.SEND_RESPONSE
    assert server.next_event() is PAUSED
    assert client.next_event() is NEED_DATA

    response = server.send(Acknowledge(did, "stored", b"\x30\x82cms"))
    json_body = (b'{"doc_id":"5f0c6f4e-0d7a-4c8e-9a51-7f5b1c1d2e3f","status":"stored",'
                 b'"receipt":"MIJjbXM="}')
    assert response == (b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(json_body), json_body))
    client.receive_data(response)
    assert events(client) == [Acknowledge(did, "stored", b"\x30\x82cms")]
    assert client.state is State.IDLE and server.state is State.IDLE


def test_duplicate_is_200_without_receipt() -> None:
    client, server = ClientConnection("node-b"), ServerConnection()
    did = doc_id()
    submit(client, server, b"x", did=did)
    data = server.send(Acknowledge(did, "duplicate"))
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert data.endswith(b'{"doc_id":"%s","status":"duplicate","receipt":null}' % did.encode())
    client.receive_data(data)
    assert events(client) == [Acknowledge(did, "duplicate", None)]


def test_reject_after_whole_body_keeps_the_connection() -> None:
    client, server = ClientConnection("node-b"), ServerConnection()
    body = b"not what was declared"
    ev = SubmitDocument(doc_id(), len(body), sha(b"something else"))
    client.send(ev)
    # The client refuses to finish a body that does not match its own declaration...
    with pytest.raises(LocalProtocolError, match="X-Exchanged-Sha256"):
        client.send_body(body)
    assert client.state is State.ERROR
    # ...so forge the wire bytes as a broken peer would.
    server.receive_data(head(b"/v1/documents/" + ev.doc_id.encode(), length=len(body),
                             digest=ev.sha256) + body)
    *_, end = events(server)
    assert end == BodyEnd(len(body), sha(body), False)
    data = server.send(Reject("digest-mismatch", "the body's SHA-256 differs"))
    json_body = b'{"code":"digest-mismatch","message":"the body\'s SHA-256 differs"}'
    assert data == (b"HTTP/1.1 422 Unprocessable Entity\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(json_body), json_body))
    assert server.state is State.IDLE  # the whole request was read: keep-alive holds
    client, _ = client_awaiting("submit")
    client.receive_data(data)
    assert events(client) == [Reject("digest-mismatch", "the body's SHA-256 differs", 422)]
    assert client.state is State.IDLE


def test_deliver_receipt_end_to_end() -> None:
    client, server = ClientConnection("node-a"), ServerConnection()
    did, cms = doc_id(), b"\x30\x80" + b"\x01" * 300
    data = client.send(DeliverReceipt(did, cms))
    assert data == (b"POST /v1/receipts/%s HTTP/1.1\r\nHost: node-a\r\nUser-Agent: exchanged\r\n"
                    b"Content-Type: application/cms\r\nContent-Length: 302\r\n\r\n"
                    % did.encode() + cms)
    # In pieces: the receipt comes out once, whole.
    seen = []
    for i in range(0, len(data), 37):
        server.receive_data(data[i:i + 37])
        seen += events(server)
    assert seen == [DeliverReceipt(did, cms)]
    assert server.statistics().buffered_bytes == 0
    response = server.send(ReceiptAccepted(did))
    assert response == b"HTTP/1.1 204 No Content\r\n\r\n"
    client.receive_data(response)
    assert events(client) == [ReceiptAccepted(did)]


def test_deliver_checkpoint_end_to_end() -> None:
    client, server = ClientConnection("node-a"), ServerConnection()
    record = b'{"at":"t","hash":"h","head":"p","seq":42,"signature":"c2ln"}'
    data = client.send(DeliverCheckpoint(42, record))
    assert data == (b"POST /v1/checkpoints/42 HTTP/1.1\r\nHost: node-a\r\nUser-Agent: "
                    b"exchanged\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                    b"\r\n" % len(record) + record)
    seen = []
    for i in range(0, len(data), 29):
        server.receive_data(data[i:i + 29])
        seen += events(server)
    assert seen == [DeliverCheckpoint(42, record)]
    client.receive_data(server.send(CheckpointAccepted(42)))
    assert events(client) == [CheckpointAccepted(42)]
    assert client.state is State.IDLE and server.state is State.IDLE


def test_a_checkpoint_is_accepted_by_its_own_number_only() -> None:
    client, server = ClientConnection("node-a"), ServerConnection()
    server.receive_data(client.send(DeliverCheckpoint(42, b"{}")))
    events(server)
    with pytest.raises(LocalProtocolError, match="the checkpoint is 42"):
        server.send(CheckpointAccepted(43))


@pytest.mark.parametrize("head, code", [
    (b"POST /v1/checkpoints/0 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
     b"Content-Length: 2\r\n\r\n", "not-found"),
    (b"POST /v1/checkpoints/7 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
     b"Content-Length: 5000\r\n\r\n", "too-large"),
    (b"POST /v1/checkpoints/7 HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
     b"Content-Length: 2\r\n\r\n", "unsupported-media-type"),
    (b"GET /v1/checkpoints/7 HTTP/1.1\r\nHost: x\r\n\r\n", "method-not-allowed"),
])
def test_a_bad_checkpoint_request_is_refused(head: bytes, code: str) -> None:
    server = ServerConnection()
    server.receive_data(head)
    with pytest.raises(RemoteProtocolError) as e:
        drain(server)
    assert e.value.code == code


def test_receipt_rejected() -> None:
    client, server = ClientConnection("node-a"), ServerConnection()
    server.receive_data(client.send(DeliverReceipt(doc_id(), b"junk")))
    events(server)
    got = answer(server, client, Reject("bad-receipt", "signature does not verify"))
    assert got == Reject("bad-receipt", "signature does not verify", 422)


def test_ping_pong() -> None:
    client, server = ClientConnection("node-b"), ServerConnection()
    data = client.send(Ping())
    assert data == b"GET /v1/ping HTTP/1.1\r\nHost: node-b\r\nUser-Agent: exchanged\r\n\r\n"
    server.receive_data(data)
    assert drain(server) == [Ping(), PAUSED]
    local = NOW.astimezone(timezone(timedelta(hours=8)))
    response = server.send(Pong("财政局", local))
    assert response.endswith(b'{"unit":"\xe8\xb4\xa2\xe6\x94\xbf\xe5\xb1\x80",'
                             b'"time":"2025-03-14T09:26:53+00:00"}')
    client.receive_data(response)
    [pong] = events(client)
    assert pong == Pong("财政局", NOW) and pong.time.utcoffset() == timedelta(0)


def test_ping_carries_the_crl_numbers_both_ways() -> None:
    client, server = ClientConnection("node-b"), ServerConnection()
    data = client.send(Ping(crl_number=41))
    assert b"\r\nX-Exchanged-Crl-Number: 41\r\n" in data
    server.receive_data(data)
    assert events(server) == [Ping(41)]
    assert answer(server, client, Pong("u", NOW, 42)) == Pong("u", NOW, 42)
    # A node without a CRL says nothing; an old peer's pong without the field is read as None.
    server.receive_data(client.send(Ping()))
    assert events(server) == [Ping(None)]
    assert answer(server, client, Pong("u", NOW)) == Pong("u", NOW, None)


@pytest.mark.parametrize("value", [b"-1", b"0x10", b"1 2", b"9" * 49, b""])
def test_a_bad_crl_number_in_a_ping_is_refused(value: bytes) -> None:
    data = b"GET /v1/ping HTTP/1.1\r\nHost: b\r\nX-Exchanged-Crl-Number: " + value + \
        b"\r\n\r\n"
    expect_remote(ServerConnection(), data, "bad-request", 400)


def test_fetch_and_offer_a_crl() -> None:
    der = b"\x30\x82" + bytes(range(256)) * 4
    client, server = ClientConnection("node-b"), ServerConnection()
    server.receive_data(client.send(FetchCrl()))
    assert events(server) == [FetchCrl()]
    got = answer(server, client, CrlFile(der))
    assert got == CrlFile(der)
    server.receive_data(client.send(OfferCrl(der)))  # same connection: keep-alive
    assert events(server) == [OfferCrl(der)]
    assert answer(server, client, CrlAccepted()) == CrlAccepted()
    server.receive_data(client.send(OfferCrl(der)))
    assert events(server) == [OfferCrl(der)]
    assert answer(server, client, Reject("bad-crl", "not signed by our CA")) == \
        Reject("bad-crl", "not signed by our CA", 422)


@pytest.mark.parametrize("extra,length,ctype,code,status", [
    (b"", None, b"application/pkix-crl", "length-required", 411),
    (b"Transfer-Encoding: chunked", None, b"application/pkix-crl", "length-required", 411),
    (b"", 2000, b"application/pkix-crl", "too-large", 413),
    (b"", 10, b"application/octet-stream", "unsupported-media-type", 415),
    (b"", 0, b"application/pkix-crl", "bad-request", 400),
])
def test_a_bad_crl_offer_is_refused(extra: bytes, length: int | None, ctype: bytes,
                                    code: str, status: int) -> None:
    data = head(b"/v1/crl", b"POST", *([extra] if extra else []), ctype=ctype, length=length)
    expect_remote(ServerConnection(max_crl_size=1000), data, code, status)


def test_crl_fetch_has_no_body_and_other_methods_are_405() -> None:
    expect_remote(ServerConnection(), head(b"/v1/crl", b"GET", length=5) + b"hello",
                  "bad-request", 400)
    response = expect_remote(ServerConnection(), head(b"/v1/crl", b"PUT", length=0),
                             "method-not-allowed", 405)
    assert b"\r\nAllow: GET, POST" in response


def test_client_limits_a_fetched_crl_and_checks_its_type() -> None:
    client = ClientConnection("b", max_crl_size=100)
    client.send(FetchCrl())
    client.receive_data(b"HTTP/1.1 200 OK\r\nContent-Type: application/pkix-crl\r\n"
                        b"Content-Length: 200\r\n\r\n" + b"x" * 200)
    with pytest.raises(RemoteProtocolError, match="over the limit"):
        drain(client)
    client = ClientConnection("b")
    client.send(FetchCrl())
    client.receive_data(json_response(200, {"crl": "x"}))
    with pytest.raises(RemoteProtocolError, match="application/pkix-crl"):
        drain(client)
    with pytest.raises(LocalProtocolError, match="over the limit"):
        ClientConnection("b", max_crl_size=10).send(OfferCrl(b"x" * 11))
    # A CRL bigger than any ordinary response still arrives when the CRL limit allows it.
    client = ClientConnection("b", max_response_size=100)
    client.send(FetchCrl())
    client.receive_data(b"HTTP/1.1 200 OK\r\nContent-Type: application/pkix-crl\r\n"
                        b"Content-Length: 500\r\n\r\n" + b"c" * 500)
    assert events(client) == [CrlFile(b"c" * 500)]


def test_curl_style_request_with_expect_continue() -> None:
    """What `curl --data-binary @f -H ...` sends: other header order, Accept, Expect."""
    server = ServerConnection()
    did, body = doc_id(), b"%PDF" * 100
    server.receive_data(
        b"POST /v1/documents/" + did.encode() + b" HTTP/1.1\r\nHost: 10.0.0.2:8443\r\n"
        b"User-Agent: curl/8.5.0\r\nAccept: */*\r\n"
        b"X-Exchanged-Sha256: " + sha(body).encode() + b"\r\n"
        b"Content-Type: application/vnd.exchanged.package; charset=binary\r\n"
        b"Content-Length: 400\r\nExpect: 100-continue\r\n\r\n")
    [started] = events(server)
    assert started == SubmitDocument(did, 400, sha(body), expect_continue=True)
    assert server.they_are_waiting_for_100_continue
    assert server.send_continue() == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert server.send_continue() == b""  # once
    server.receive_data(body)
    assert events(server)[-1] == BodyEnd(400, sha(body), True)


def test_client_expect_continue() -> None:
    client, server = ClientConnection("node-b"), ServerConnection()
    body = b"a" * 5000
    sent_head = client.send(SubmitDocument(doc_id(), len(body), sha(body), expect_continue=True))
    assert sent_head.endswith(b"Expect: 100-continue\r\n\r\n")
    server.receive_data(sent_head)
    events(server)
    client.receive_data(server.send_continue())
    assert events(client) == [Continue()]
    server.receive_data(client.send_body(body))
    assert events(server)[-1].digest_ok


def test_early_reject_closes_the_connection() -> None:
    """A refusal before the body is all in says Connection: close; both sides must close."""
    client, server = ClientConnection("node-b"), ServerConnection()
    body = b"z" * 100_000
    did = doc_id()
    server.receive_data(client.send(SubmitDocument(did, len(body), sha(body))))
    server.receive_data(client.send_body(body[:1000]))
    events(server)
    data = server.send(Reject("unknown-sender", "your certificate is revoked"))
    assert data.startswith(b"HTTP/1.1 403 Forbidden\r\n") and b"\r\nConnection: close\r\n" in data
    assert server.state is State.MUST_CLOSE and server.must_close
    assert server.send_error(Reject("internal-error")) == b""  # already answered
    with pytest.raises(LocalProtocolError):
        server.next_event()
    client.receive_data(data)
    assert events(client) == [Reject("unknown-sender", "your certificate is revoked", 403)]
    assert client.state is State.MUST_CLOSE and client.body_remaining == 0
    with pytest.raises(LocalProtocolError, match="no document body"):
        client.send_body(body[1000:2000])


def test_keep_alive_many_requests_on_one_connection() -> None:
    client, server = ClientConnection("node-b"), ServerConnection()
    for i in range(5):
        did = doc_id()
        body = bytes([i]) * (1000 * i + 1)
        *_, end = submit(client, server, body, did=did, metadata={"n": i})
        assert end == BodyEnd(len(body), sha(body), True)
        assert answer(server, client, Acknowledge(did, "stored")) == Acknowledge(did, "stored")
        server.receive_data(client.send(DeliverReceipt(did, b"r" * (i + 1))))
        assert events(server) == [DeliverReceipt(did, b"r" * (i + 1))]
        assert answer(server, client, ReceiptAccepted(did)) == ReceiptAccepted(did)
        server.receive_data(client.send(Ping()))
        assert events(server) == [Ping()]
        assert answer(server, client, Pong("unit-b", NOW)) == Pong("unit-b", NOW)
    for conn in (client, server):
        stats = conn.statistics()
        assert stats.state is State.IDLE and stats.requests_completed == 15
        assert stats.buffered_bytes == 0
    assert server.statistics().bytes_received == client.statistics().bytes_sent
    assert client.statistics().bytes_received == server.statistics().bytes_sent
    # The client hangs up between requests: a clean end on both sides.
    server.receive_data(b"")
    assert drain(server) == [ConnectionClosed()]
    assert server.next_event() == ConnectionClosed() and server.must_close
    client.receive_data(b"")
    assert drain(client) == [ConnectionClosed()]


@pytest.mark.parametrize("request_head", [b"GET /v1/ping HTTP/1.0\r\n\r\n",
                                          b"GET /v1/ping HTTP/1.1\r\nHost: b\r\n"
                                          b"Connection: close\r\n\r\n"])
def test_peer_asking_to_close(request_head: bytes) -> None:
    server = ServerConnection()
    server.receive_data(request_head)
    assert events(server) == [Ping()]
    data = server.send(Pong("u", NOW))
    assert b"\r\nConnection: close\r\n" in data
    assert server.state is State.MUST_CLOSE and server.must_close
    client, _ = client_awaiting()
    client.receive_data(data)
    assert events(client) == [Pong("u", NOW)]
    assert client.state is State.MUST_CLOSE
    with pytest.raises(LocalProtocolError, match="open a new one"):
        client.send(Ping())


def test_pipelined_requests_are_answered_in_order() -> None:
    server = ServerConnection()
    a, b = doc_id(), doc_id()
    server.receive_data(request_bytes(Ping(), (SubmitDocument(a, 2, sha(b"hi")), b"hi"),
                                      DeliverReceipt(b, b"cms")))
    assert drain(server) == [Ping(), PAUSED]
    server.send(Pong("u", NOW))
    assert [type(e) for e in events(server)] == [SubmitDocument, BodyChunk, BodyEnd]
    server.send(Acknowledge(a, "stored"))
    assert events(server) == [DeliverReceipt(b, b"cms")]


# ---------------------------------------------------------------------------------------------
# Streaming: bounded memory


def test_streaming_50_mb_in_odd_pieces() -> None:
    """50 MB in 64 KiB chunks, fed in odd-sized pieces: the server holds at most one piece (plus
    a header's worth) at any time and the digest of what it handed out matches."""
    rng = random.Random(7)
    size, chunk = 50 * 1024 * 1024, 64 * 1024
    block = rng.randbytes(1024 * 1024 + 17)
    declared = hashlib.sha256()
    for pos in range(0, size, chunk):
        declared.update(block[pos % 1000:][:min(chunk, size - pos)])
    client, server = ClientConnection("node-b"), ServerConnection()
    did = doc_id()
    link = bytearray(client.send(SubmitDocument(did, size, declared.hexdigest())))
    pieces = [1, 13, 4099, 65537, 7919, 100_003, 31, 65536]
    got, received, most_held, turn = hashlib.sha256(), 0, 0, 0
    ends = []
    sent = 0
    while sent < size or link:
        while sent < size and len(link) < 200_000:
            piece_of_body = block[sent % 1000:][:min(chunk, size - sent)]
            link += client.send_body(piece_of_body)
            sent += len(piece_of_body)
        n = pieces[turn % len(pieces)]
        turn += 1
        server.receive_data(bytes(link[:n]))
        del link[:n]
        most_held = max(most_held, server.statistics().buffered_bytes)
        for ev in events(server):
            if isinstance(ev, BodyChunk):
                got.update(ev.data)
                received += len(ev.data)
            elif isinstance(ev, BodyEnd):
                ends.append(ev)
        if server.state is State.RECV_BODY:
            assert server.statistics().buffered_bytes == 0  # every body byte handed out
    assert received == size
    assert ends == [BodyEnd(size, declared.hexdigest(), True)]
    assert got.hexdigest() == declared.hexdigest()
    assert most_held <= max(pieces) + DEFAULT_MAX_HEADER_SIZE
    assert client.state is State.AWAIT_RESPONSE and server.state is State.SEND_RESPONSE


# ---------------------------------------------------------------------------------------------
# Limits and refusals


def head(target: bytes = b"", method: bytes = b"POST", *extra: bytes, body: bytes = b"",
         ctype: bytes = b"application/vnd.exchanged.package",
         length: int | None = None, digest: str | None = None) -> bytes:
    target = target or b"/v1/documents/" + doc_id().encode()
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: node-b"]
    if ctype:
        lines.append(b"Content-Type: " + ctype)
    if length is not None:
        lines.append(b"Content-Length: %d" % length)
    lines.append(b"X-Exchanged-Sha256: " + (digest or sha(body)).encode())
    return b"\r\n".join([*lines, *extra, b"", b""])


def test_oversized_headers_431() -> None:
    server = ServerConnection(max_header_size=4096)
    data = head(b"", b"POST", b"X-Padding: " + b"p" * 5000, length=0)
    response = expect_remote(server, data, "headers-too-large", 431)
    assert b"Request Header Fields Too Large" in response
    # Fed in small pieces, the server gives up as soon as the limit is crossed.
    server = ServerConnection(max_header_size=4096)
    with pytest.raises(RemoteProtocolError) as info:
        for i in range(0, len(data), 100):
            server.receive_data(data[i:i + 100])
            drain(server)
            assert server.statistics().buffered_bytes <= 4096
    assert info.value.status == 431


def test_oversized_metadata_431() -> None:
    server = ServerConnection(max_metadata_size=100)
    meta = json.dumps({"t": "x" * 100}).encode()
    expect_remote(server, head(b"", b"POST", b"X-Exchanged-Metadata: " + meta, length=0),
                  "headers-too-large", 431)
    client = ClientConnection("node-b", max_metadata_size=100)
    with pytest.raises(LocalProtocolError, match="metadata"):
        client.send(SubmitDocument(doc_id(), 0, sha(b""), {"t": "x" * 100}))


@pytest.mark.parametrize("meta", [b"[1,2]", b"{bad json", b'{"a":NaN}', b'{"a":1e999}',
                                  b"\xff\xfe", b"[" * 5000, b'{"a":' + b"9" * 5000 + b"}"])
def test_bad_metadata_400(meta: bytes) -> None:
    server = ServerConnection()
    expect_remote(server, head(b"", b"POST", b"X-Exchanged-Metadata: " + meta, length=0),
                  "bad-request", 400)


def test_declared_length_at_and_over_the_limit() -> None:
    server = ServerConnection(max_body_size=1000)
    server.receive_data(head(length=1000, body=b"q" * 1000))
    assert isinstance(events(server)[0], SubmitDocument)
    server = ServerConnection(max_body_size=1000)
    response = expect_remote(server, head(length=1001), "too-large", 413)
    assert response.startswith(b"HTTP/1.1 413 Content Too Large\r\n") or \
        response.startswith(b"HTTP/1.1 413 Request Entity Too Large\r\n")


def test_default_limit_is_2_gib() -> None:
    server = ServerConnection()
    server.receive_data(head(length=2 * 1024**3))
    assert events(server)[0].length == 2 * 1024**3
    expect_remote(ServerConnection(), head(length=2 * 1024**3 + 1), "too-large", 413)


def test_body_longer_than_declared() -> None:
    """The surplus is the start of the next request, which is garbage: 400 after the answer."""
    server = ServerConnection()
    did = doc_id()
    server.receive_data(head(b"/v1/documents/" + did.encode(), length=5, body=b"12345")
                        + b"12345EXTRA BYTES\r\n\r\n")
    *_, end = drain(server)
    assert end is PAUSED
    server.send(Acknowledge(did, "stored"))
    expect_remote(server, b"", "bad-request", 400)


def test_truncated_body() -> None:
    server = ServerConnection()
    server.receive_data(head(length=1000) + b"only a part")
    assert [type(e) for e in events(server)] == [SubmitDocument, BodyChunk]
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="truncated") as info:
        server.next_event()
    assert info.value.code == "truncated"
    with pytest.raises(LocalProtocolError, match="failed earlier"):
        server.next_event()


def test_truncated_head() -> None:
    server = ServerConnection()
    server.receive_data(b"POST /v1/documents/x HTTP/1.1\r\nHost: a\r\n")
    assert drain(server) == [NEED_DATA]
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="truncated"):
        server.next_event()


def test_missing_content_length_411() -> None:
    expect_remote(ServerConnection(), head(), "length-required", 411)


def test_chunked_upload_refused_411() -> None:
    data = head(b"", b"POST", b"Transfer-Encoding: chunked") + b"5\r\nhello\r\n0\r\n\r\n"
    expect_remote(ServerConnection(), data, "length-required", 411)


def test_other_transfer_coding_501() -> None:
    expect_remote(ServerConnection(), head(b"", b"POST", b"Transfer-Encoding: gzip"),
                  "not-implemented", 501)


@pytest.mark.parametrize("bad", [b"not-a-uuid", b"5f0c6f4e0d7a4c8e9a517f5b1c1d2e3f",
                                 b"{5f0c6f4e-0d7a-4c8e-9a51-7f5b1c1d2e3f}",
                                 b"5f0c6f4e-0d7a-4c8e-9a51-7f5b1c1d2e3g"])
def test_bad_uuid_400(bad: bytes) -> None:
    expect_remote(ServerConnection(), head(b"/v1/documents/" + bad, length=0), "bad-request", 400)
    expect_remote(ServerConnection(), head(b"/v1/receipts/" + bad, length=1,
                                           ctype=b"application/cms"), "bad-request", 400)


@pytest.mark.parametrize("ctype", [b"application/pdf", b"text/plain", b""])
def test_wrong_content_type_415(ctype: bytes) -> None:
    expect_remote(ServerConnection(), head(length=0, ctype=ctype), "unsupported-media-type", 415)


def test_missing_or_bad_digest_400() -> None:
    data = b"POST /v1/documents/%s HTTP/1.1\r\nHost: b\r\nContent-Length: 0\r\n" \
           b"Content-Type: application/vnd.exchanged.package\r\n\r\n" % doc_id().encode()
    expect_remote(ServerConnection(), data, "bad-request", 400)
    expect_remote(ServerConnection(), head(length=0, digest="ab" * 31), "bad-request", 400)


@pytest.mark.parametrize("target", [b"/", b"/v1/documents", b"/v1/documents/", b"/v2/ping",
                                    b"/v1/ping?x=1", b"/v1/documents/a/b", b"*"])
def test_unknown_path_404(target: bytes) -> None:
    expect_remote(ServerConnection(), b"GET %s HTTP/1.1\r\nHost: b\r\n\r\n" % target,
                  "not-found", 404)


def test_wrong_method_405_with_allow() -> None:
    response = expect_remote(ServerConnection(), b"POST /v1/ping HTTP/1.1\r\nHost: b\r\n"
                             b"Content-Length: 0\r\n\r\n", "method-not-allowed", 405)
    assert b"\r\nAllow: GET\r\n" in response
    response = expect_remote(ServerConnection(), b"GET /v1/documents/%s HTTP/1.1\r\nHost: b"
                             b"\r\n\r\n" % doc_id().encode(), "method-not-allowed", 405)
    assert b"\r\nAllow: POST\r\n" in response


def test_ping_with_body_400() -> None:
    expect_remote(ServerConnection(), b"GET /v1/ping HTTP/1.1\r\nHost: b\r\nContent-Length: 3"
                  b"\r\n\r\nabc", "bad-request", 400)


@pytest.mark.parametrize("data", [b"HELLO\r\n\r\n", b"GET /v1/ping HTTP/1.1\r\n\r\n",
                                  b"GET /v1/ping HTTP/1.1\r\nHost: b\r\nBad Header\r\n\r\n",
                                  b"POST /v1/documents/x HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
                                  b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"])
def test_malformed_http_400(data: bytes) -> None:
    expect_remote(ServerConnection(), data, "bad-request", 400)


def test_receipt_size_limit() -> None:
    did = doc_id()
    server = ServerConnection(max_receipt_size=1024)
    server.receive_data(request_bytes(DeliverReceipt(did, b"r" * 1024)))
    assert events(server) == [DeliverReceipt(did, b"r" * 1024)]
    server = ServerConnection(max_receipt_size=1024)
    expect_remote(server, request_bytes(DeliverReceipt(did, b"r" * 1025)), "too-large", 413)
    expect_remote(ServerConnection(), head(b"/v1/receipts/" + did.encode(), length=65537,
                                           ctype=b"application/cms"), "too-large", 413)
    expect_remote(ServerConnection(), head(b"/v1/receipts/" + did.encode(), length=3,
                                           ctype=b"text/plain"), "unsupported-media-type", 415)
    expect_remote(ServerConnection(), head(b"/v1/receipts/" + did.encode(), length=0,
                                           ctype=b"application/cms"), "bad-request", 400)
    client = ClientConnection("b", max_receipt_size=1024)
    with pytest.raises(LocalProtocolError, match="over the limit"):
        client.send(DeliverReceipt(did, b"r" * 1025))


def test_send_error_before_any_request_and_for_internal_errors() -> None:
    server = ServerConnection()
    data = server.send_error(Reject("timeout", "no request within 30 s"))
    assert data.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert server.state is State.MUST_CLOSE
    assert server.send_error(Reject("timeout")) == b""
    server = ServerConnection()
    server.receive_data(request_bytes(Ping()))
    events(server)
    data = server.send_error(KeyError("secret internal detail"))
    assert data.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
    assert b"secret" not in data
    assert ServerConnection().send_error(Reject("busy")).startswith(b"HTTP/1.1 503 ")


# ---------------------------------------------------------------------------------------------
# Local misuse and the error state


def test_server_misuse_is_local_and_final() -> None:
    server = ServerConnection()
    did = doc_id()
    server.receive_data(head(b"/v1/documents/" + did.encode(), length=10, body=b"0123456789"))
    events(server)
    with pytest.raises(LocalProtocolError, match="all arrived"):
        server.send(Acknowledge(did, "stored"))  # the body is not all in yet
    assert server.state is State.ERROR
    for call in (server.next_event, lambda: server.send(Reject("busy")),
                 lambda: server.receive_data(b"0123456789"), server.send_continue):
        with pytest.raises(LocalProtocolError, match="failed earlier"):
            call()
    # The peer still gets an answer, once.
    assert server.send_error(Reject("internal-error")).startswith(b"HTTP/1.1 500 ")
    assert server.send_error(Reject("internal-error")) == b""


@pytest.mark.parametrize("wrong", ["doc", "kind", "early", "idle", "type"])
def test_server_answers_must_fit_the_request(wrong: str) -> None:
    server = ServerConnection()
    did = doc_id()
    if wrong == "idle":
        bad: Any = Pong("u", NOW)
    else:
        server.receive_data(request_bytes(DeliverReceipt(did, b"x")))
        events(server)
        bad = {"doc": ReceiptAccepted(doc_id()), "kind": Acknowledge(did, "stored"),
               "early": Pong("u", NOW), "type": Ping()}.get(wrong)
    with pytest.raises(LocalProtocolError):
        server.send(bad)
    assert server.state is State.ERROR


def test_client_misuse() -> None:
    client = ClientConnection("b")
    with pytest.raises(LocalProtocolError, match="no document body"):
        client.send_body(b"x")
    client = ClientConnection("b")
    client.send(SubmitDocument(doc_id(), 3, sha(b"abc")))
    with pytest.raises(LocalProtocolError, match="under way"):
        ClientConnection.send(client, Ping())
    client = ClientConnection("b")
    client.send(SubmitDocument(doc_id(), 3, sha(b"abc")))
    with pytest.raises(LocalProtocolError, match="only 3 remain"):
        client.send_body(b"abcd")
    client = ClientConnection("b")
    with pytest.raises(LocalProtocolError, match="cannot send"):
        client.send(Pong("u", NOW))  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="failed earlier"):
        client.send(Ping())
    client = ClientConnection("b")
    client.receive_data(b"")
    with pytest.raises(LocalProtocolError, match="after EOF"):
        client.receive_data(b"x")
    with pytest.raises(ValueError):
        ClientConnection("")
    with pytest.raises(ValueError):
        ServerConnection(max_body_size=0)


def test_zero_length_document() -> None:
    client, server = ClientConnection("b"), ServerConnection()
    did = doc_id()
    server.receive_data(client.send(SubmitDocument(did, 0, sha(b""))))
    assert client.state is State.AWAIT_RESPONSE
    assert events(server) == [SubmitDocument(did, 0, sha(b"")), BodyEnd(0, sha(b""), True)]


# ---------------------------------------------------------------------------------------------
# The client facing a broken server


def client_awaiting(kind: str = "ping") -> tuple[ClientConnection, str]:
    client, did = ClientConnection("b"), doc_id()
    if kind == "ping":
        client.send(Ping())
    elif kind == "receipt":
        client.send(DeliverReceipt(did, b"cms"))
    else:
        client.send(SubmitDocument(did, 1, sha(b"x")))
        client.send_body(b"x")
    return client, did


def json_response(status: int, obj: Any, ctype: bytes = b"application/json") -> bytes:
    body = json.dumps(obj).encode()
    return b"HTTP/1.1 %d X\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (
        status, ctype, len(body), body)


@pytest.mark.parametrize("kind,response", [
    ("submit", lambda d: json_response(201, {"doc_id": str(uuid.uuid4()), "status": "stored"})),
    ("submit", lambda d: json_response(200, {"doc_id": d, "status": "stored"})),
    ("submit", lambda d: json_response(201, {"doc_id": d, "status": "kept"})),
    ("submit", lambda d: json_response(201, {"doc_id": d, "status": "stored", "receipt": "%%"})),
    ("submit", lambda d: json_response(201, {"doc_id": d, "status": "stored", "receipt": 5})),
    ("submit", lambda d: json_response(201, [d])),
    ("submit", lambda d: json_response(201, {"doc_id": d, "status": "stored"}, b"text/html")),
    ("submit", lambda d: json_response(302, {})),
    ("receipt", lambda d: b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
    ("ping", lambda d: json_response(200, {"unit": "", "time": NOW.isoformat()})),
    ("ping", lambda d: json_response(200, {"unit": "u", "time": "yesterday"})),
    ("ping", lambda d: json_response(200, {"unit": "u", "time": "2025-03-14T09:26:53"})),
    ("ping", lambda d: json_response(400, {"code": "no-such-code", "message": ""})),
    ("ping", lambda d: b"HTTP/1.1 400 Bad Request\r\nContent-Length: 5\r\n\r\noops!"),
    ("ping", lambda d: b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n"),
    ("ping", lambda d: b"SSH-2.0-OpenSSH_9.6\r\n\r\n"),
    ("ping", lambda d: b"HTTP/1.1 200 OK\r\nX-Pad: " + b"p" * 20000 + b"\r\n\r\n"),
])
def test_client_refuses_bad_responses(kind: str, response: Any) -> None:
    client, did = client_awaiting(kind)
    client.receive_data(response(did))
    with pytest.raises(RemoteProtocolError):
        drain(client)
    assert client.state is State.ERROR


def test_client_response_size_limit() -> None:
    client, _ = client_awaiting()
    client.receive_data(json_response(400, {"code": "busy", "message": "x" * 2000}))
    assert events(client) == [Reject("busy", "x" * 997 + "...", 400)]  # message clipped
    client = ClientConnection("b", max_response_size=100)
    client.send(Ping())
    client.receive_data(json_response(503, {"code": "busy", "message": "x" * 200}))
    with pytest.raises(RemoteProtocolError, match="over the limit") as info:
        drain(client)
    assert info.value.code == "too-large"


def test_client_truncated_response_and_idle_close() -> None:
    client, _ = client_awaiting()
    client.receive_data(json_response(200, {"unit": "u", "time": NOW.isoformat()})[:-3])
    assert drain(client) == [NEED_DATA]
    client.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="truncated") as info:
        client.next_event()
    assert info.value.code == "truncated"
    client, _ = client_awaiting()
    client.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="truncated"):
        client.next_event()


def test_client_refuses_success_before_the_body_is_sent() -> None:
    client = ClientConnection("b")
    did = doc_id()
    client.send(SubmitDocument(did, 10, sha(b"0123456789")))
    client.receive_data(json_response(201, {"doc_id": did, "status": "stored"}))
    with pytest.raises(RemoteProtocolError, match="before the whole body"):
        drain(client)


def test_unsolicited_data_is_a_remote_error() -> None:
    client = ClientConnection("b")
    client.receive_data(json_response(200, {}))
    with pytest.raises(RemoteProtocolError):
        drain(client)


# ---------------------------------------------------------------------------------------------
# Events are validated when built


@pytest.mark.parametrize("build", [
    lambda: SubmitDocument("nope", 1, "a" * 64),
    lambda: SubmitDocument(str(uuid.uuid4()), -1, "a" * 64),
    lambda: SubmitDocument(str(uuid.uuid4()), True, "a" * 64),
    lambda: SubmitDocument(str(uuid.uuid4()), 1, "a" * 63),
    lambda: SubmitDocument(str(uuid.uuid4()), 1, "g" * 64),
    lambda: SubmitDocument(str(uuid.uuid4()), 1, "a" * 64, {1: "x"}),
    lambda: SubmitDocument(str(uuid.uuid4()), 1, "a" * 64, {"x": float("nan")}),
    lambda: SubmitDocument(str(uuid.uuid4()), 1, "a" * 64, {"x": object()}),
    lambda: SubmitDocument(str(uuid.uuid4()), 1, "a" * 64, [("x", 1)]),
    lambda: BodyChunk(b""),
    lambda: BodyChunk("text"),
    lambda: BodyEnd(1, "a" * 64, 1),
    lambda: DeliverReceipt(str(uuid.uuid4()), b""),
    lambda: Acknowledge(str(uuid.uuid4()), "ok"),
    lambda: Reject("because"),
    lambda: Reject("busy", status=302),
    lambda: Reject("busy", "x" * 1001),
    lambda: ReceiptAccepted(uuid.uuid4()),
    lambda: Pong("", NOW),
    lambda: Pong("u", datetime(2025, 1, 1)),
])
def test_invalid_events_are_refused(build: Any) -> None:
    with pytest.raises(LocalProtocolError):
        build()


def test_events_are_frozen_and_normalised() -> None:
    did = str(uuid.uuid4()).upper()
    ev = SubmitDocument(did, 1, "A" * 64, {"b": 1, "a": [1, {"c": None}]})
    assert ev.doc_id == did.lower() and ev.sha256 == "a" * 64
    assert ev.metadata_json == '{"a":[1,{"c":null}],"b":1}'
    with pytest.raises(dataclasses.FrozenInstanceError):
        ev.doc_id = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        ev.metadata["b"] = 2  # type: ignore[index]
    assert Reject("too-large").status == 413
    assert repr(BodyChunk(b"x" * 10**6)) == "BodyChunk(<1000000 bytes>)"
    assert issubclass(RemoteProtocolError, ExchangedError)
    assert issubclass(LocalProtocolError, ExchangedError)
    assert all(400 <= s <= 599 for s in REASON_CODES.values())


# ---------------------------------------------------------------------------------------------
# Property-based: whatever arrives, only valid events or RemoteProtocolError, bounded memory

FUZZ_LIMITS = {"max_header_size": 1024, "max_body_size": 4096, "max_receipt_size": 512,
               "max_metadata_size": 256}
FUZZ_SETTINGS = settings(max_examples=500, deadline=None, database=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

SERVER_EVENTS = (SubmitDocument, BodyChunk, BodyEnd, DeliverReceipt, Ping, ConnectionClosed)
CLIENT_EVENTS = (Acknowledge, Reject, ReceiptAccepted, Pong, Continue, ConnectionClosed)


def revalidate(ev: Event) -> None:
    """An event out of a connection must pass its own validation again."""
    assert dataclasses.replace(ev) == ev  # type: ignore[type-var]


FRAGMENTS = [b"\r\n", b"\r\n\r\n", b":", b" ", b"\x00", b"\n", b"0\r\n\r\n",
             b"Transfer-Encoding: chunked\r\n", b"Transfer-Encoding: gzip\r\n",
             b"Content-Length: 99999\r\n", b"Content-Length: 3\r\n", b"Content-Length: 0\r\n",
             b"Expect: 100-continue\r\n", b"Connection: close\r\n",
             b"Content-Type: text/plain\r\n", b"Content-Type: application/json\r\n",
             b"X-Exchanged-Metadata: [1]\r\n", b"X-Exchanged-Sha256: 00\r\n",
             b"X-Pad: " + b"p" * 1100 + b"\r\n",
             b"GET /v1/ping HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 100 Continue\r\n\r\n",
             b"HTTP/1.0 ", b"POST /v1/receipts/", b"/v1/documents/", b"-0000-", b"\xff\xfe"]


@st.composite
def mutated(draw: st.DrawFn, valid: bytes) -> bytes:
    """Bit flips, truncations, insertions (random or of telling fragments), duplicated and
    deleted segments; positions lean towards the head, where the parsing is."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "fragment", "duplicate",
                                   "delete"]))
        end = max(len(data) - 1, 0)
        at = draw(st.integers(0, min(end, 300)) | st.integers(0, end))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=40))
        elif op == "fragment":
            data[at:at] = draw(st.sampled_from(FRAGMENTS))
        elif op == "duplicate":
            n = draw(st.integers(1, 200))
            data[at:at] = data[at:at + n]
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 50))]
    return bytes(data)


@st.composite
def valid_requests(draw: st.DrawFn) -> bytes:
    out = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["submit", "receipt", "ping"]))
        did = str(uuid.UUID(int=draw(st.integers(0, 2**128 - 1))))
        if kind == "submit":
            body = draw(st.binary(max_size=300))
            meta = draw(st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=8),
                                        max_size=3))
            out.append((SubmitDocument(did, len(body), sha(body), meta,
                                       expect_continue=draw(st.booleans())), body))
        elif kind == "receipt":
            out.append(DeliverReceipt(did, draw(st.binary(min_size=1, max_size=300))))
        else:
            out.append(Ping())
    return request_bytes(*out)


def respond(server: ServerConnection) -> Any:
    """A fitting answer to whatever the server holds."""
    req = server.current_request
    if isinstance(req, SubmitDocument):
        return Acknowledge(req.doc_id, "stored", b"receipt")
    if isinstance(req, DeliverReceipt):
        return ReceiptAccepted(req.doc_id)
    return Pong("unit", NOW)


def run_server(data: bytes, pieces: list[int], eof: bool, reject_early: bool = False) -> None:
    server = ServerConnection(**FUZZ_LIMITS)
    limit = FUZZ_LIMITS["max_header_size"] + FUZZ_LIMITS["max_receipt_size"] + max(pieces)
    pos, turn, body_left, at_eof = 0, 0, 0, False
    try:
        for _ in range(MAX_STEPS):
            ev = server.next_event()
            if ev is NEED_DATA:
                assert not at_eof, "NEED_DATA after EOF would wait forever"
                assert server.send_continue() in (b"", b"HTTP/1.1 100 Continue\r\n\r\n")
                if pos >= len(data):
                    if not eof:
                        return
                    server.receive_data(b"")
                    at_eof = True
                    continue
                n = pieces[turn % len(pieces)]
                turn += 1
                server.receive_data(data[pos:pos + n])
                pos += n
                assert server.statistics().buffered_bytes <= limit
            elif ev is PAUSED:
                assert server.state is State.SEND_RESPONSE
                server.send(respond(server))
                if server.state is State.MUST_CLOSE:
                    return
                assert server.state is State.IDLE
            else:
                assert isinstance(ev, SERVER_EVENTS), ev
                revalidate(ev)
                if isinstance(ev, SubmitDocument):
                    assert ev.length <= FUZZ_LIMITS["max_body_size"]
                    assert len(ev.metadata_json) <= 2 * FUZZ_LIMITS["max_metadata_size"]
                    body_left = ev.length
                    if reject_early:
                        assert server.send(Reject("busy")).startswith(b"HTTP/1.1 503 ")
                        assert server.state is State.MUST_CLOSE
                        assert server.send_error(Reject("busy")) == b""
                        return
                elif isinstance(ev, BodyChunk):
                    body_left -= len(ev.data)
                    assert body_left >= 0
                elif isinstance(ev, BodyEnd):
                    assert body_left == 0
                elif isinstance(ev, DeliverReceipt):
                    assert len(ev.receipt) <= FUZZ_LIMITS["max_receipt_size"]
                elif isinstance(ev, ConnectionClosed):
                    assert server.next_event() == ConnectionClosed()
                    return
        raise AssertionError("the server never stopped producing events")
    except RemoteProtocolError as e:
        assert e.code in REASON_CODES and 400 <= e.status <= 599
        assert server.state is State.ERROR
        response = server.send_error(e)
        assert response == b"" or response.startswith(b"HTTP/1.1 %d " % e.status)


pieces_st = st.lists(st.integers(1, 700), min_size=1, max_size=8)


@FUZZ_SETTINGS
@given(st.binary(max_size=3000), pieces_st, st.booleans())
def test_server_fuzz_random_bytes(data: bytes, pieces: list[int], eof: bool) -> None:
    run_server(data, pieces, eof)


@FUZZ_SETTINGS
@given(valid_requests().flatmap(lambda v: st.tuples(st.just(v), mutated(v))),
       pieces_st, st.booleans(), st.booleans())
def test_server_fuzz_mutated_requests(pair: tuple[bytes, bytes], pieces: list[int],
                                      eof: bool, reject_early: bool) -> None:
    valid, data = pair
    if data == valid:  # unmutated: must go through without any error
        server_ok = ServerConnection(**FUZZ_LIMITS)
        server_ok.receive_data(valid)
        for _ in range(MAX_STEPS):
            ev = server_ok.next_event()
            if ev is NEED_DATA:
                break
            if ev is PAUSED:
                server_ok.send(respond(server_ok))
        assert server_ok.state is State.IDLE
    run_server(data, pieces, eof, reject_early)


@st.composite
def exchange(draw: st.DrawFn) -> tuple[list[Any], bytes]:
    """Requests and the valid bytes of the server's answers to them."""
    requests, answers = [], b""
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["submit", "receipt", "ping"]))
        did = str(uuid.UUID(int=draw(st.integers(0, 2**128 - 1))))
        server = ServerConnection()
        if kind == "submit":
            body = draw(st.binary(max_size=50))
            req: Any = (SubmitDocument(did, len(body), sha(body),
                                       expect_continue=draw(st.booleans())), body)
        elif kind == "receipt":
            req = DeliverReceipt(did, b"cms")
        else:
            req = Ping()
        if isinstance(req, tuple):  # the head first: the server may say 100 Continue
            client = ClientConnection("b")
            server.receive_data(client.send(req[0]))
            drain(server)
            answers += server.send_continue()
            server.receive_data(client.send_body(req[1]) if req[1] else b"")
        else:
            server.receive_data(request_bytes(req))
        drain(server)
        if draw(st.booleans()):
            code = draw(st.sampled_from(sorted(REASON_CODES)))
            answers += server.send(Reject(code, draw(st.text(max_size=20))))
        elif kind == "submit":
            answers += server.send(Acknowledge(did, draw(st.sampled_from(["stored", "duplicate"])),
                                               draw(st.none() | st.binary(min_size=1,
                                                                          max_size=40))))
        elif kind == "receipt":
            answers += server.send(ReceiptAccepted(did))
        else:
            answers += server.send(Pong(draw(st.text(min_size=1, max_size=10)), NOW))
        requests.append(req)
    return requests, answers


def run_client(requests: list[Any], data: bytes, pieces: list[int], eof: bool,
               body_first: bool) -> None:
    client = ClientConnection("b", max_header_size=1024, max_response_size=512,
                              max_receipt_size=64)
    limit = 1024 + 512 + max(pieces)
    queue = list(requests)
    pos, turn, at_eof = 0, 0, False
    current: list[Any] = []

    def send_next() -> None:
        req = queue.pop(0)
        current[:] = [req]
        if isinstance(req, tuple):
            client.send(req[0])
            if body_first and req[1]:
                client.send_body(req[1])
        else:
            client.send(req)

    try:
        send_next()
        for _ in range(MAX_STEPS):
            ev = client.next_event()
            if ev is NEED_DATA:
                assert not at_eof, "NEED_DATA after EOF would wait forever"
                if client.state is State.SEND_BODY and client.body_remaining:
                    req = client.current_request
                    assert isinstance(req, SubmitDocument)
                    body = [r for r in requests if isinstance(r, tuple) and r[0] is req][0][1]
                    client.send_body(body[req.length - client.body_remaining:])
                    continue
                if pos >= len(data):
                    if not eof:
                        return
                    client.receive_data(b"")
                    at_eof = True
                    continue
                n = pieces[turn % len(pieces)]
                turn += 1
                client.receive_data(data[pos:pos + n])
                pos += n
                assert client.statistics().buffered_bytes <= limit
                continue
            assert isinstance(ev, CLIENT_EVENTS), ev
            revalidate(ev)
            if isinstance(ev, ConnectionClosed):
                assert client.state is State.CLOSED
                return
            if isinstance(ev, Continue):
                continue
            if isinstance(ev, Acknowledge):
                assert ev.doc_id == current[0][0].doc_id
            elif isinstance(ev, ReceiptAccepted):
                assert ev.doc_id == current[0].doc_id
            elif isinstance(ev, Pong):
                assert isinstance(current[0], Ping)
            if client.state is State.MUST_CLOSE:
                return
            assert client.state is State.IDLE
            if queue:
                send_next()
        raise AssertionError("the client never stopped producing events")
    except RemoteProtocolError as e:
        assert e.code in REASON_CODES
        assert client.state is State.ERROR


@FUZZ_SETTINGS
@given(exchange().flatmap(lambda x: st.tuples(st.just(x[0]), st.just(x[1]), mutated(x[1]))),
       pieces_st, st.booleans(), st.booleans())
def test_client_fuzz_mutated_responses(case: tuple[list[Any], bytes, bytes], pieces: list[int],
                                       eof: bool, body_first: bool) -> None:
    requests, _, data = case
    run_client(requests, data, pieces, eof, body_first)


@FUZZ_SETTINGS
@given(st.binary(max_size=2000), pieces_st, st.booleans(), st.booleans())
def test_client_fuzz_random_bytes(data: bytes, pieces: list[int], eof: bool,
                                  body_first: bool) -> None:
    run_client([(SubmitDocument(str(uuid.UUID(int=1)), 2, sha(b"hi")), b"hi"), Ping()], data,
               pieces, eof, body_first)


def test_client_valid_exchange_goes_through() -> None:
    """The fuzzers' baseline: unmutated answers give exactly one answer per request."""
    @settings(max_examples=50, deadline=None, database=None)
    @given(exchange())
    def check(case: tuple[list[Any], bytes]) -> None:
        requests, data = case
        client = ClientConnection("b")
        client.receive_data(data)
        answers = []
        for req in requests:
            if isinstance(req, tuple):
                client.send(req[0])
                if req[1]:
                    client.send_body(req[1])
            else:
                client.send(req)
            for _ in range(MAX_STEPS):
                ev = client.next_event()
                if isinstance(ev, Continue):
                    continue
                assert ev is not NEED_DATA
                answers.append(ev)
                break
        assert len(answers) == len(requests)
        assert client.state is State.IDLE and client.statistics().buffered_bytes == 0

    check()


# ---------------------------------------------------------------------------------------------
# The contract: no I/O in the protocol module


def test_protocol_module_imports_no_io() -> None:
    path = Path(protocol.__file__)
    assert path == ROOT / "exchanged" / "transport" / "protocol.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    banned = {"trio", "ssl", "socket", "asyncio", "selectors", "anyio", "OpenSSL", "select"}
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "__import__":
            raise AssertionError("dynamic import in the protocol module")
    assert imported, "the walk found no imports at all: the test is broken"
    assert not imported & banned, imported & banned
