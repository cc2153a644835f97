"""Relay (A12) through real daemons on SoftHSM tokens: finance's direct path to office is cut
(a TCP proxy on each direction of the link, closed), so finance's documents for office go
through district, which relays for both; the original package arrives intact, verified against
finance's certificate; office's delivery receipt comes back through district. Then the direct
path comes back while district still holds a copy: office stores the document once.

The tests run in file order on one network."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
import socket
import sqlite3
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from demo_network import Demo  # noqa: E402
from demo_pki import setup  # noqa: E402  (demo_network.setup, its PKI made once per run)
from hostile.conftest import TEST_PEERS, submit_raw  # noqa: E402

from exchanged import receipts  # noqa: E402
from exchanged.transport import protocol as proto  # noqa: E402

UNITS = ("finance", "office", "district")
AFTER = 2  # relay.after, seconds


class Link:
    """A TCP proxy on 127.0.0.1 standing for one direction of a link: `cut()` closes what it
    carries and refuses new connections until `restore()`."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = True
        self.open: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self.lock:
                self.open += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.up = False
        with self.lock:
            for s in self.open:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self.open = []

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self.cut()
        self.listener.close()


class RelayNet:
    def __init__(self, d: Demo) -> None:
        self.d = d
        self.links: dict[tuple[str, str], Link] = {}
        self.peers = d.work / "peers"  # software-key certificates like the nodes' (attacks)
        self.office_serial = ""

    def cfg(self, unit: str) -> Path:
        return self.d.work / unit / "exchanged.toml"

    def port(self, unit: str) -> int:
        text = self.cfg(unit).read_text()
        return int(re.search(r'listen = "127.0.0.1:(\d+)"', text).group(1))  # type: ignore[union-attr]

    def through_link(self, unit: str, peer: str) -> None:
        """`unit` reaches `peer` through a Link of its own."""
        link = Link(self.port(peer))
        self.links[(unit, peer)] = link
        cfg = self.cfg(unit)
        cfg.write_text(re.sub(rf'(\[peers\.{peer}\]\naddress = "127\.0\.0\.1:)\d+',
                              rf"\g<1>{link.port}", cfg.read_text()))

    def send(self, unit: str, to: str, title: str) -> str:
        pdf = self.d.work / "r.pdf"
        pdf.write_bytes(b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n"
                        b"%%EOF\n")
        txt = self.d.work / "r.txt"
        txt.write_text(f"{title}\n")
        out = self.d.x("send", "--config", str(self.cfg(unit)), "--to", to, "--title", title,
                       "--pdf", str(pdf), "--editable", str(txt), "--json", quiet=True)
        return str(json.loads(out)["doc_id"])

    def rows(self, unit: str, query: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        conn = sqlite3.connect(self.d.work / unit / "data" / "node.db")
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute(query, params)]
        finally:
            conn.close()

    def outbox(self, unit: str, doc: str) -> dict[str, Any]:
        [row] = self.rows(unit, "SELECT * FROM outbox WHERE doc_id = ?", (doc,))
        return row

    def wait(self, what: str, check: Any, timeout: float = 60) -> Any:
        with contextlib.redirect_stdout(io.StringIO()):
            return self.d.wait_for(what, check, timeout=timeout)

    def audit(self, unit: str, action: str, doc: str) -> list[dict[str, Any]]:
        return [{**r, "details": json.loads(r["details"])} for r in self.rows(
            unit, "SELECT * FROM audit WHERE action = ? AND object = ?", (action, doc))]


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayNet]:
    d = Demo(tmp_path_factory.mktemp("relay"))
    with contextlib.redirect_stdout(io.StringIO()):
        office_serial = setup(d, box=True)["office_serial"]
    n = RelayNet(d)
    n.office_serial = office_serial
    n.through_link("finance", "office")
    n.through_link("office", "finance")
    n.through_link("district", "office")
    relay = {"finance": f'[relay]\nthrough = ["district"]\nafter = {AFTER}\n',
             "office": f'[relay]\nthrough = ["district"]\nafter = {AFTER}\n',
             "district": '[relay]\nfor = ["finance", "office"]\n'}
    for unit in UNITS:
        cfg = n.cfg(unit)
        cfg.write_text(cfg.read_text().replace("[limits]\n", "[limits]\nkeepalive = 1\n")
                       + "\n" + relay[unit])
    subprocess.run([sys.executable, "-c", TEST_PEERS, str(n.peers), json.dumps([
        ("finance", "node-finance", "Finance Bureau"), ("district", "district",
                                                        "District Office"),
        ("office", "node-office", "General Office Archives")])],
        cwd=d.work, env=d.env, check=True)
    with contextlib.redirect_stdout(io.StringIO()):
        for unit in UNITS:
            d.start(unit)
    yield n
    with contextlib.redirect_stdout(io.StringIO()):
        d.stop()
    for link in n.links.values():
        link.close()


def openssl_verify(d: Demo, cms: bytes, *extra: str) -> bytes:
    p = subprocess.run(["openssl", "cms", "-verify", "-inform", "DER", "-CAfile",
                        str(d.work / "ca" / "ca.pem"), "-purpose", "any", *extra],
                       input=cms, capture_output=True)
    assert p.returncode == 0, p.stderr.decode()
    return p.stdout


def test_cut_off_documents_go_through_the_relay_and_the_receipt_comes_back(
        net: RelayNet) -> None:
    net.links[("finance", "office")].cut()
    net.links[("office", "finance")].cut()
    doc = net.send("finance", "office", "through the neighbouring box")
    row = net.wait("delivered through district", lambda: (
        r := net.outbox("finance", doc))["state"] == "delivered" and r, timeout=90)
    assert row["relay"] == "district"
    # The relay's hop record: district's node says it took this document from finance.
    hop = json.loads(openssl_verify(net.d, row["relay_receipt"]))
    assert (hop["type"], hop["doc_id"], hop["from"], hop["node"], hop["recipient"]) == (
        "relay", doc, "finance", "district", "office")
    assert hop["sha256"] == row["package_sha256"]
    # Office's delivery receipt, signed by office's node, carried back by district.
    receipt = json.loads(openssl_verify(net.d, row["delivery_receipt"]))
    assert (receipt["type"], receipt["sender"], receipt["recipient"], receipt["sha256"]) == (
        "delivery", "finance", "office", row["package_sha256"])
    [got] = net.rows("office", "SELECT * FROM inbox WHERE doc_id = ?", (doc,))
    assert got["sender"] == "finance" and got["package_sha256"] == row["package_sha256"]
    [path] = json.loads(got["relay_path"])
    assert json.loads(openssl_verify(net.d, base64.b64decode(path))) == hop
    # End to end: the package office holds is finance's, signed on finance's token, as sent.
    blob = net.d.work / "office" / "data" / "blobs" / got["package_sha256"][:2] / \
        got["package_sha256"]
    with tarfile.open(blob) as tar:
        manifest = tar.extractfile("manifest.json").read()  # type: ignore[union-attr]
        signature = tar.extractfile("manifest.cms").read()  # type: ignore[union-attr]
    signed = net.d.work / "manifest.json"
    signed.write_bytes(manifest)
    openssl_verify(net.d, signature, "-binary", "-content", str(signed))
    assert json.loads(manifest)["metadata"]["sender"] == "finance"
    # Each part is in each node's audit log.
    assert net.audit("finance", "document-relayed", doc)[0]["details"]["relay"] == "district"
    assert net.audit("district", "document-relay-taken", doc)
    assert net.audit("district", "document-relay-delivered", doc)
    [received] = net.audit("office", "document-received", doc)
    assert received["details"]["relayed_by"] == "district"
    [relayed] = net.rows("district", "SELECT * FROM relay WHERE doc_id = ?", (doc,))
    assert relayed["state"] == "delivered" and relayed["sender"] == "finance"
    # What office exports for the record carries the relay's part, for openssl to check.
    out = net.d.work / f"export-{doc}"
    net.d.x("inbox", "export", doc, str(out), "--config", str(net.cfg("office")), quiet=True)
    assert json.loads(openssl_verify(net.d, (out / "relay-1.cms").read_bytes())) == hop


def test_a_signed_for_receipt_comes_back_through_the_relay(net: RelayNet) -> None:
    """Office cannot reach finance either: the receipt its registrar signs goes through
    district, which carries it without being able to make or alter one."""
    d, office = net.d, str(net.cfg("office"))
    [doc] = [r["doc_id"] for r in net.rows("office", "SELECT doc_id FROM inbox")]
    grant = json.loads(d.x("role", "grant", "--config", office, "receiver.pem", "--role",
                           "registrar", *d.op("admin"), "--json", quiet=True))["id"]
    d.x("role", "review", "--config", office, str(grant), "--approve", *d.op("auditor"),
        quiet=True)
    d.x("inbox", "sign-for", doc, "--config", office, *d.op("receiver"), quiet=True)
    row = net.wait("signed for, through district", lambda: (
        r := net.outbox("finance", doc))["state"] == "signed-for" and r, timeout=60)
    signed = json.loads(openssl_verify(d, row["signed_for_receipt"]))
    assert (signed["type"], signed["sender"], signed["recipient"]) == ("signed-for", "finance",
                                                                       "office")
    [carried] = net.audit("district", "receipt-relay-taken", doc)
    assert carried["details"] == {"from": "office", "to": "finance", "kind": "signed-for"}
    assert net.audit("finance", "document-signed-for", doc)


def test_the_direct_path_coming_back_while_the_relay_holds_a_copy_stores_it_once(
        net: RelayNet) -> None:
    net.links[("district", "office")].cut()  # district holds what it takes
    doc = net.send("finance", "office", "both ways")
    net.wait("district holding it", lambda: net.rows(
        "district", "SELECT 1 FROM relay WHERE doc_id = ?", (doc,)), timeout=60)
    assert net.outbox("finance", doc)["relay"] == "district"
    net.links[("finance", "office")].restore()  # the direct path first
    net.links[("office", "finance")].restore()
    net.wait("delivered directly", lambda: net.outbox("finance", doc)["state"] == "delivered",
             timeout=60)
    net.links[("district", "office")].restore()  # then district's copy arrives: a duplicate
    net.wait("district passed it on", lambda: net.rows(
        "district", "SELECT 1 FROM relay WHERE doc_id = ? AND state = 'delivered'", (doc,)),
        timeout=60)
    assert len(net.rows("office", "SELECT * FROM inbox WHERE doc_id = ?", (doc,))) == 1
    assert net.audit("office", "document-duplicate", doc)
    assert len(net.audit("finance", "document-delivered", doc)) == 1
    net.wait("district's receipt taken by finance", lambda: all(r["returned_at"] for r in net.rows(
        "district", "SELECT * FROM receipts_out WHERE doc_id = ?", (doc,))), timeout=30)
    assert net.outbox("finance", doc)["state"] == "delivered"


def test_with_the_direct_path_up_nothing_goes_through_the_relay(net: RelayNet) -> None:
    doc = net.send("finance", "office", "direct")
    net.wait("delivered", lambda: net.outbox("finance", doc)["state"] == "delivered")
    assert net.outbox("finance", doc)["relay"] == ""
    assert not net.rows("district", "SELECT 1 FROM relay WHERE doc_id = ?", (doc,))



def test_a_relay_that_will_not_carry_is_asked_again_only_after_a_while(net: RelayNet) -> None:
    """District stops relaying for office (reload): finance's document for office, cut off,
    is refused by district before its body; finance keeps it queued for the direct path and
    does not knock again at once (no tight loop of connections)."""
    import signal
    import time
    cfg = net.cfg("district")
    original = cfg.read_text()
    cfg.write_text(original.replace('for = ["finance", "office"]', 'for = ["finance"]'))
    net.d.daemons["district"].send_signal(signal.SIGHUP)
    net.links[("finance", "office")].cut()
    try:
        time.sleep(1)
        doc = net.send("finance", "office", "not carried")
        net.wait("district refusing it", lambda: net.audit("district", "document-rejected", doc),
                 timeout=30)
        time.sleep(3 * AFTER)
        refusals = net.audit("district", "document-rejected", doc)
        assert len(refusals) == 1 and refusals[0]["details"]["code"] == "not-relayed", refusals
        row = net.outbox("finance", doc)
        assert (row["state"], row["relay"]) == ("queued", "")
        assert net.audit("finance", "document-relay-refused", doc)
    finally:
        cfg.write_text(original)
        net.d.daemons["district"].send_signal(signal.SIGHUP)
        net.links[("finance", "office")].restore()
    net.wait("delivered directly", lambda: net.outbox("finance", doc)["state"] == "delivered",
             timeout=60)


# -- what a hostile peer may try (a certificate of our CA with the name of a node, and its key) --

class SoftSigner:
    """Signs hop records with a test peer's software key (as `Operator.sign` does on a token)."""

    def __init__(self, net: RelayNet, who: str) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        self.cert = x509.load_pem_x509_certificate((net.peers / f"{who}.pem").read_bytes())
        self.key = serialization.load_pem_private_key((net.peers / f"{who}.key").read_bytes(),
                                                      None)

    def sign(self, payload: dict[str, Any], *, detached: bool = True) -> tuple[bytes, bytes]:
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.serialization import pkcs7

        from exchanged.common import canonical
        data = canonical(payload)
        cms = (pkcs7.PKCS7SignatureBuilder().set_data(data)
               .add_signer(self.cert, self.key, hashes.SHA256())  # type: ignore[arg-type]
               .sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary]))
        return data, cms


def genuine(net: RelayNet, to: str, sender: str = "finance") -> tuple[str, bytes]:
    """A package `sender`'s node signed (on its token) for `to`, delivered: (doc id, bytes)."""
    doc = net.send(sender, to, f"genuine, for {to}")
    net.wait("delivered", lambda: net.outbox(sender, doc)["state"] == "delivered")
    sha = net.outbox(sender, doc)["package_sha256"]
    return doc, (net.d.work / sender / "data" / "blobs" / sha[:2] / sha).read_bytes()


def hop(net: RelayNet, doc: str, body: bytes, *, relay: str = "district",
        sender: str = "finance", **changes: str) -> str:
    import hashlib
    fields = {"doc_id": doc, "sha256": hashlib.sha256(body).hexdigest(), "sender": sender,
              "recipient": "office", "from_unit": sender, "relay_unit": relay, **changes}
    return base64.b64encode(receipts.relay_hop(SoftSigner(net, relay),  # type: ignore[arg-type]
                                               **fields)).decode()


def test_a_relay_refuses_what_it_does_not_carry(net: RelayNet) -> None:
    doc, body = genuine(net, "office")
    for relay, code in (({"to": "nowhere", "path": []}, "not-relayed"),  # not a unit it serves
                        ({"to": "office", "path": [hop(net, doc, body)]}, "not-relayed"),  # hops
                        ({"to": "office"}, "bad-request")):
        answer = submit_raw(net, "district", body, as_="finance", doc_id=doc,
                            metadata={"relay": relay})
        assert isinstance(answer, proto.Reject) and answer.code == code, (relay, answer)
    assert not net.rows("district", "SELECT 1 FROM relay WHERE doc_id = ?", (doc,))


def test_the_recipient_takes_a_relayed_document_only_as_its_sender_signed_it(
        net: RelayNet) -> None:
    doc, body = genuine(net, "office")
    other, for_district = genuine(net, "district")  # finance's, but addressed to district
    tampered = bytearray(body)
    tampered[-2000] ^= 1  # a byte of the files, after the signed manifest
    cases = [
        ("finance", body, doc, [hop(net, doc, body)], "unknown-sender"),  # not office's relay
        ("district", body, doc, [], "bad-form"),  # no hop records
        ("district", body, doc, [hop(net, doc, body, doc_id=other)], "bad-form"),
        ("district", body, doc, [hop(net, doc, body, from_unit="office")], "bad-form"),
        ("district", body, doc, [hop(net, doc, body, relay_unit="finance")], "bad-form"),
        ("district", for_district, other, [hop(net, other, for_district)], "wrong-recipient"),
        ("district", bytes(tampered), doc, [hop(net, doc, bytes(tampered))], None),
    ]
    for who, package, doc_id, path, code in cases:
        answer = submit_raw(net, "office", package, as_=who, doc_id=doc_id,
                            metadata={"relay": {"to": "office", "path": path}})
        assert isinstance(answer, proto.Reject), (who, doc_id, code, answer)
        if code is not None:
            assert answer.code == code, (code, answer)
        else:
            assert answer.code in ("digest-mismatch", "bad-signature", "bad-package"), answer
    assert not net.rows("office", "SELECT 1 FROM inbox WHERE doc_id = ?", (other,))
    # The control: the same package with a good hop record is taken (a repeat of the one
    # finance delivered directly: acknowledged, stored once).
    answer = submit_raw(net, "office", body, as_="district", doc_id=doc,
                        metadata={"relay": {"to": "office", "path": [hop(net, doc, body)]}})
    assert isinstance(answer, proto.Acknowledge) and answer.status == "duplicate", answer
    assert len(net.rows("office", "SELECT 1 FROM inbox WHERE doc_id = ?", (doc,))) == 1



def receipt_raw(net: RelayNet, unit: str, doc: str, cms: bytes, *, as_: str) -> Any:
    """Give `unit`'s daemon a receipt as the test peer `as_`; its answer."""
    import trio
    from hostile.conftest import tls_context

    async def go() -> Any:
        stream = await trio.open_tcp_stream("127.0.0.1", net.port(unit))
        tls = trio.SSLStream(stream, tls_context(net, as_, server=False),
                             server_hostname="peer")
        conn = proto.ClientConnection("peer")
        await tls.send_all(conn.send(proto.DeliverReceipt(doc, cms)))
        while (event := conn.next_event()) is proto.NEED_DATA:
            conn.receive_data(await tls.receive_some(65536))
        await trio.aclose_forcefully(tls)
        return event

    return trio.run(go)


def test_a_relay_carries_receipts_but_drops_one_the_sender_refuses(net: RelayNet) -> None:
    """Office's name and a key of its own can sign any number of receipts: the relay carries
    them, the sender refuses one for a document it never sent, and the relay lets it go
    instead of trying it again for ever."""
    import uuid

    from exchanged.common import stamp
    doc = str(uuid.uuid4())
    cms = receipts.delivery(SoftSigner(net, "office"), doc_id=doc,  # type: ignore[arg-type]
                            sha256="0" * 64, sender="finance", recipient="office",
                            received_at=stamp())
    answer = receipt_raw(net, "district", doc, cms, as_="office")
    assert isinstance(answer, proto.ReceiptAccepted), answer
    [refused] = net.wait("finance refusing it", lambda: net.audit(
        "district", "receipt-relay-refused", doc))
    assert refused["details"]["code"] == "unknown-document"
    [row] = net.rows("district", "SELECT * FROM receipts_out WHERE doc_id = ?", (doc,))
    assert row["returned_at"] and row["error"].startswith("unknown-document")
    # A receipt not for the units district relays for, or not the peer's own, is not carried.
    other = receipts.delivery(SoftSigner(net, "office"), doc_id=doc,  # type: ignore[arg-type]
                              sha256="0" * 64, sender="finance", recipient="district",
                              received_at=stamp())
    answer = receipt_raw(net, "district", doc, other, as_="office")
    assert isinstance(answer, proto.Reject) and answer.code == "bad-receipt", answer


# -- the configuration: both sides approve, each unit named is a peer -------------------------

BASE = {"node": {"unit": "finance", "listen": "127.0.0.1:0", "data_dir": "d"},
        "pkcs11": {"key": "pkcs11:token=t;object=k", "cert": "c.pem"},
        "trust": {"ca": ["ca.pem"]},
        "peers": {u: {"address": "127.0.0.1:1", "name": u, "org": u}
                  for u in ("office", "district")}}


@pytest.mark.parametrize("relay,words", [
    ({"through": ["elsewhere"]}, "'elsewhere', which is not a configured peer"),
    ({"for": ["finance"]}, "names this unit (finance) itself"),
    ({"through": "district"}, "must be a list of unit ids"),
    ({"after": 0}, "relay.after must be positive"),
    ({"via": ["district"]}, "[relay] has no setting via"),
])
def test_a_relay_setting_that_cannot_hold_is_refused(relay: dict[str, Any], words: str) -> None:
    from exchanged.node.config import Config, ConfigError
    with pytest.raises(ConfigError) as e:
        Config.from_dict({**BASE, "relay": relay}, base=Path("/etc/exchanged"))
    assert words in str(e.value), str(e.value)


def test_relay_settings_are_read() -> None:
    from exchanged.node.config import Config
    c = Config.from_dict({**BASE, "relay": {"through": ["district"], "for": ["office"],
                                            "after": 30}}, base=Path("/etc/exchanged"))
    assert (c.relay.through, c.relay.serves, c.relay.after) == (("district",), ("office",), 30)
    assert Config.from_dict(BASE, base=Path("/etc/exchanged")).relay.serves == ()



def test_a_relay_is_known_by_the_peer_table_not_by_its_common_name(net: RelayNet) -> None:
    """Regression: the recipient took a hop record's signer for the unit its CN names, so a
    relay whose node certificate is not named after its unit (finance's is node-finance) was
    refused. Office, told to take relayed documents from finance too, takes district's
    document relayed by finance (here a repeat: acknowledged, stored once)."""
    import signal
    import time
    cfg = net.cfg("office")
    original = cfg.read_text()
    doc, body = genuine(net, "office", sender="district")
    cfg.write_text(original.replace('through = ["district"]', 'through = ["district", '
                                                               '"finance"]'))
    net.d.daemons["office"].send_signal(signal.SIGHUP)
    try:
        time.sleep(1)
        answer = submit_raw(net, "office", body, as_="finance", doc_id=doc, metadata={
            "relay": {"to": "office", "path": [hop(net, doc, body, relay="finance",
                                                   sender="district")]}})
        assert isinstance(answer, proto.Acknowledge) and answer.status == "duplicate", answer
    finally:
        cfg.write_text(original)
        net.d.daemons["office"].send_signal(signal.SIGHUP)
    assert len(net.rows("office", "SELECT 1 FROM inbox WHERE doc_id = ?", (doc,))) == 1


def test_a_refused_peer_is_not_relayed_around(net: RelayNet) -> None:
    """Last (it revokes office): a peer refused is not a path that failed. Finance refuses the
    revoked office and keeps its document; it never hands it to district."""
    import time
    d = net.d
    d.x("ca", "revoke", "--dir", "ca", net.office_serial, "--reason", "keyCompromise",
        *d.op("officer"), quiet=True)
    out = d.x("ca", "crl", "--dir", "ca", "--ca-pin-file", d.pin("ca"), quiet=True)
    number = int(re.search(r"CRL number (\d+)", out).group(1))  # type: ignore[union-attr]
    d.publish_crl("finance", "district")

    def holds(unit: str) -> bool:
        st = subprocess.run([sys.executable, "-m", "exchanged", "status", "--config",
                             str(net.cfg(unit)), "--json"], env=d.env, capture_output=True,
                            text=True).stdout
        return bool(st) and json.loads(st)["crls"][0]["number"] == number

    net.wait("finance and district holding the new CRL", lambda: holds("finance")
             and holds("district"), timeout=60)
    doc = net.send("finance", "office", "to a revoked unit")
    net.wait("finance refusing office", lambda: [
        r for r in net.rows("finance", "SELECT * FROM audit WHERE action = 'peer-refused' AND "
                                       "object = 'office'") if "revoked" in r["details"]],
             timeout=60)
    time.sleep(3 * AFTER)
    row = net.outbox("finance", doc)
    assert row["state"] == "queued" and row["relay"] == "", row
    assert not net.rows("district", "SELECT 1 FROM relay WHERE doc_id = ?", (doc,))
