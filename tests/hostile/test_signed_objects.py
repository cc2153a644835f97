"""Classes 6 and 7: signed objects are parsed strictly and applied once; a delivery counts only
with a delivery receipt that proves it.

Regressions: a captured role request plus one b"\\x00" was applied again (the replay key was
the hash of the CMS blob, and CMS loading ignored trailing bytes); a recipient answering 201
with a null or garbage receipt was recorded as delivered.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import subprocess
import sys
import threading
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from demo_network import free_port

from exchanged import client
from exchanged.common import canonical
from exchanged.node.config import Config
from exchanged.transport import protocol as proto
from hostile.conftest import Net, tls_context

SIGN = r'''
import base64, json, sys
from exchanged.pki.operator import Operator
from exchanged.pki.pin import PinSource
from exchanged.pki.token import Token
from exchanged.pki.uri import parse
tok = Token.open(parse("pkcs11:token=auditor"), PinSource("t", "X", "tokens/auditor.pin"))
op = Operator.from_token(tok.key(label="me"))
payload = json.loads(sys.argv[1])
payload["actor"] = op.serial
for _ in range(int(sys.argv[2])):  # the same content, signed afresh each time
    print(base64.b64encode(op.sign(payload, detached=False)[1]).decode())
tok.close()
'''


def _person(net: Net, pem_file: str) -> str:
    from exchanged.pki.names import person_of
    return person_of(x509.load_pem_x509_certificate((net.d.work / pem_file).read_bytes())
                     .subject)


def _signed(net: Net, payload: dict[str, Any], copies: int) -> list[str]:
    out = subprocess.run([sys.executable, "-c", SIGN, canonical(payload).decode(), str(copies)],
                         cwd=net.d.work, env=net.d.env, capture_output=True, text=True,
                         check=True).stdout
    return out.split()


def test_role_requests_are_strict_der_and_applied_once(healthy: Net) -> None:
    net = healthy
    sock = Config.load(net.cfg("office")).socket_path
    person = _person(net, "receiver.pem")
    at = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    payload = {"action": "person-suspend", "object": person, "at": at, "node": "office",
               "reason": "hostile test"}
    first, second = _signed(net, payload, 2)
    assert first != second  # two signatures (ECDSA is randomised) over one request
    client.request(sock, "role", request=first)
    # One byte appended: not the DER of a signature.
    padded = base64.b64encode(base64.b64decode(first) + b"\x00").decode()
    with pytest.raises(Exception, match="malformed CMS|DER"):
        client.request(sock, "role", request=padded)
    # The same request signed again: still the same request.
    with pytest.raises(Exception, match="already applied"):
        client.request(sock, "role", request=second)
    # Lifted with a request of its own (which is new, so it goes through).
    resume = dict(payload, action="person-resume",
                  at=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    client.request(sock, "role", request=_signed(net, resume, 1)[0])


# -- a recipient that answers without proof ----------------------------------------------------

class FakeRecipient:
    """Stands in for office: takes documents and answers as `mode` says."""

    def __init__(self, net: Net, port: int) -> None:
        self.net, self.port = net, port
        self.mode = "none"
        self.key = serialization.load_pem_private_key(
            (net.peers / "office.key").read_bytes(), None)
        self.cert = x509.load_pem_x509_certificate((net.peers / "office.pem").read_bytes())
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: trio.run(self._main), daemon=True)
        self.thread.start()

    def receipt(self, doc: str, sha: str) -> bytes | None:
        body = {"type": "delivery", "doc_id": doc, "sha256": sha, "sender": "finance",
                "recipient": "office", "received_at": "2026-12-01T00:00:00Z"}
        if self.mode == "none":
            return None
        if self.mode == "garbage":
            return b"\x30\x03\x02\x01\x01"
        if self.mode == "other-document":
            body["doc_id"] = "00000000-0000-4000-8000-000000000000"
        if self.mode == "other-content":
            body["sha256"] = hashlib.sha256(b"something else").hexdigest()
        return (pkcs7.PKCS7SignatureBuilder().set_data(canonical(body))
                .add_signer(self.cert, self.key, hashes.SHA256())  # type: ignore[arg-type]
                .sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary]))

    async def _main(self) -> None:
        ctx = tls_context(self.net, "office", server=True)

        async def handle(stream: trio.SocketStream) -> None:
            tls = trio.SSLStream(stream, ctx, server_side=True)
            conn = proto.ServerConnection()
            submit = None
            try:
                while True:
                    event = conn.next_event()
                    if event is proto.NEED_DATA:
                        with trio.fail_after(10):
                            conn.receive_data(await tls.receive_some(65536))
                        continue
                    if isinstance(event, proto.Ping):  # every connection begins with one
                        await tls.send_all(conn.send(proto.Pong("office", dt.datetime.now(dt.UTC))))
                    elif isinstance(event, proto.OfferCrl):  # ... and our CRL is older
                        await tls.send_all(conn.send(proto.CrlAccepted()))
                    elif isinstance(event, proto.SubmitDocument):
                        submit = event
                    elif isinstance(event, proto.BodyEnd) and submit is not None:
                        await tls.send_all(conn.send(proto.Acknowledge(
                            submit.doc_id, "stored", self.receipt(submit.doc_id,
                                                                  submit.sha256))))
                    elif not isinstance(event, proto.BodyChunk):
                        return
            except Exception:
                return
            finally:
                await trio.aclose_forcefully(tls)

        async with trio.open_nursery() as n:
            await n.start(partial(trio.serve_tcp, handle, self.port, host="127.0.0.1"))
            while not self.stop.is_set():  # noqa: ASYNC110
                await trio.sleep(0.1)
            n.cancel_scope.cancel()


@pytest.fixture
def fake_office(net: Net) -> Iterator[FakeRecipient]:
    port = free_port()
    fake = FakeRecipient(net, port)
    try:
        with net.peer_at(port):
            yield fake
    finally:
        fake.stop.set()
        fake.thread.join(10)


@pytest.mark.parametrize("mode", ["none", "garbage", "other-document", "other-content"])
def test_an_acknowledgement_without_proof_is_not_a_delivery(net: Net, fake_office, mode: str
                                                             ) -> None:  # type: ignore[no-untyped-def]
    fake_office.mode = mode
    doc = net.send(f"to a recipient that answers with {mode}")
    item = net.d.wait_for("an answer", lambda: (i := net.outbox(doc))["attempts"] and i,
                          timeout=30)
    assert item["state"] in ("queued", "sending"), item  # type: ignore[index]
    assert "delivery receipt" in item["last_error"], item  # type: ignore[index]
    assert net.sql("finance", "SELECT 1 FROM audit WHERE action = 'document-receipt-refused' "
                              "AND object = ?", (doc,))


def test_an_acknowledgement_with_its_proof_is_a_delivery(net: Net, fake_office) -> None:  # type: ignore[no-untyped-def]
    fake_office.mode = "valid"
    doc = net.send("to a recipient that proves it")
    net.delivered(doc, timeout=30)
