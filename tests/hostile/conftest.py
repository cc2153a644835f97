"""A network under attack: the demo CA, finance's and office's daemons on loopback, and test
peers whose keys are software keys made for the test (never a node's key: those stay on their
tokens). Shared by the hostile tests; each leaves the daemons as it found them, or restarts
them."""

from __future__ import annotations

import contextlib
import io
import json
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
from demo_network import Demo, setup  # noqa: E402

# Certificates like finance's and office's node certificates (same names; or those given as a
# JSON list of [file name, CN, O] in argv[2]), issued by the demo CA's key on its token, with
# software keys: what an attacker holding a valid certificate of
# our CA (a stolen or unconfigured node, a person's card) can present.
TEST_PEERS = r'''
import datetime as dt, json, sys
from pathlib import Path
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from exchanged.pki import profiles
from exchanged.pki.pin import PinSource
from exchanged.pki.token import Token
from exchanged.pki.uri import parse

out = Path(sys.argv[1])
out.mkdir(exist_ok=True)
ca = x509.load_pem_x509_certificate(Path("ca/ca.pem").read_bytes())
tok = Token.open(parse("pkcs11:token=ca"), PinSource("CA", "X", "tokens/ca.pin"))
now = dt.datetime.now(dt.UTC).replace(microsecond=0)
names = json.loads(sys.argv[2]) if len(sys.argv) > 2 else [
    ("finance", "node-finance", "Finance Bureau"),
    ("office", "node-office", "General Office Archives")]
for name, cn, org in names:
    k = ec.generate_private_key(ec.SECP256R1())
    form = profiles.Form(name=cn, unit=org, division="Registry", ip=("127.0.0.1",))
    cert = profiles.end_entity("node", form=form, public_key=k.public_key(), ca_cert=ca,
                               serial=profiles.random_serial(), not_before=now, days=30,
                               crl_url=None, csr=None).sign(tok.key(label="ca").signer(),
                                                            hashes.SHA256())
    (out / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / f"{name}.key").write_bytes(k.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
tok.close()
'''


@dataclass
class Net:
    d: Demo
    paths: dict[str, str]
    peers: Path  # test peers' certificates and keys

    def cfg(self, unit: str) -> Path:
        return self.d.work / unit / "exchanged.toml"

    def port(self, unit: str) -> int:
        text = self.cfg(unit).read_text()
        return int(re.search(r'listen = "127.0.0.1:(\d+)"', text).group(1))  # type: ignore[union-attr]

    def quiet(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.redirect_stdout(io.StringIO())

    def alive(self, unit: str) -> bool:
        p = self.d.daemons.get(unit)
        return p is not None and p.poll() is None

    def start(self, unit: str) -> None:
        with self.quiet():
            self.d.start(unit)

    def stop(self, unit: str) -> None:
        p = self.d.daemons.get(unit)
        if p is not None and p.poll() is None:
            p.terminate()
            p.wait(30)

    def restart(self, unit: str, **limits: object) -> str:
        """Restart `unit` with `limits` changed in its configuration; returns the old text."""
        self.stop(unit)
        text = self.cfg(unit).read_text()
        new = text
        for k, v in limits.items():
            line = f"{k} = {json.dumps(v)}"
            new = re.sub(rf"(?m)^{k} = .*$", line, new) if re.search(rf"(?m)^{k} = ", new) \
                else new.replace("[limits]\n", f"[limits]\n{line}\n")
        self.cfg(unit).write_text(new)
        self.start(unit)
        return text

    def send(self, title: str = "hostile test", *, body: bytes = b"text\n",
             unit: str = "finance", to: str = "office") -> str:
        from exchanged import client
        from exchanged.node.config import Config
        pdf = self.d.work / "h.pdf"
        pdf.write_bytes(b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n"
                        b"%%EOF\n")
        txt = self.d.work / f"h-{len(body)}.txt"
        txt.write_bytes(body)
        return str(client.request(Config.load(self.cfg(unit)).socket_path, "send", to=to,
                                  title=title, pdf=str(pdf), editable=str(txt))["doc_id"])

    def outbox(self, doc: str, unit: str = "finance") -> dict[str, Any]:
        return json.loads(self.d.x("outbox", doc, "--config", str(self.cfg(unit)), "--json",
                                   quiet=True))  # type: ignore[no-any-return]

    def delivered(self, doc: str, unit: str = "finance", timeout: float = 60) -> None:
        self.d.wait_for(f"{doc} delivered", lambda: self.outbox(doc, unit)["state"] in
                        ("delivered", "signed-for"), timeout=timeout)

    def sql(self, unit: str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(self.d.work / unit / "data" / "node.db")
        try:
            return conn.execute(query, params).fetchall()
        finally:
            conn.close()

    @contextlib.contextmanager
    def peer_at(self, port: int, unit: str = "finance", peer: str = "office") -> Iterator[None]:
        """`unit`'s peer `peer` points at `port` (a stand-in) while the block runs."""
        cfg = self.cfg(unit)
        original = cfg.read_text()
        cfg.write_text(re.sub(rf'(\[peers\.{peer}\]\naddress = "127\.0\.0\.1:)\d+',
                              rf"\g<1>{port}", original))
        self.d.daemons[unit].send_signal(signal.SIGHUP)
        time.sleep(1)
        try:
            yield
        finally:
            cfg.write_text(original)
            self.d.daemons[unit].send_signal(signal.SIGHUP)
            time.sleep(1)

    def audit_count(self, unit: str) -> int:
        return int(self.sql(unit, "SELECT count(*) FROM audit")[0][0])


@pytest.fixture(scope="session")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    d = Demo(tmp_path_factory.mktemp("hostile"))
    with contextlib.redirect_stdout(io.StringIO()):
        paths = setup(d)
    for unit in ("finance", "office"):  # short timeouts: attacks should not make tests slow
        cfg = d.work / unit / "exchanged.toml"
        cfg.write_text(cfg.read_text().replace("read_timeout = 10", "read_timeout = 3")
                       .replace("[limits]\n", "[limits]\nhandshake_timeout = 5\n"))
    subprocess.run([sys.executable, "-c", TEST_PEERS, str(d.work / "peers")], cwd=d.work,
                   env=d.env, check=True)
    n = Net(d, paths, d.work / "peers")
    n.start("finance")
    n.start("office")
    yield n
    with contextlib.redirect_stdout(io.StringIO()):
        d.stop()


@pytest.fixture
def healthy(net: Net) -> Iterator[Net]:
    """Both daemons up before the test; afterwards, both still up and a document still goes
    from finance to office (what every hostile test must leave true)."""
    for unit in ("finance", "office"):
        if not net.alive(unit):
            net.start(unit)
    yield net
    assert net.alive("office") and net.alive("finance"), "a daemon died"
    net.delivered(net.send("after the attack"))


def wait(seconds: float) -> None:
    time.sleep(seconds)


# -- a peer written for the test: our own protocol over TLS with a test peer's software key ---

def tls_context(net: Any, who: str, *, server: bool) -> Any:
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(str(net.d.work / "ca" / "ca.pem"))
    ctx.load_cert_chain(str(net.peers / f"{who}.pem"), str(net.peers / f"{who}.key"))
    return ctx


def submit_raw(net: Any, unit: str, body: bytes, *, as_: str = "finance",
               doc_id: str | None = None, metadata: dict[str, Any] | None = None) -> Any:
    """Connect to `unit`'s daemon as the test peer `as_` and submit `body` as a document
    (whatever it is, with `metadata` in its header); returns the daemon's answer event.
    `net`: anything with `.d` (the Demo), `.peers` and `.port(unit)`."""
    import hashlib
    import uuid

    import trio

    from exchanged.transport import protocol as proto

    async def go() -> Any:
        stream = await trio.open_tcp_stream("127.0.0.1", net.port(unit))
        tls = trio.SSLStream(stream, tls_context(net, as_, server=False),
                             server_hostname="peer")
        conn = proto.ClientConnection("peer")
        await tls.send_all(conn.send(proto.SubmitDocument(
            doc_id or str(uuid.uuid4()), len(body), hashlib.sha256(body).hexdigest(),
            metadata or {})))
        for i in range(0, len(body), 65536):
            if conn.state is not proto.State.SEND_BODY:
                break
            await tls.send_all(conn.send_body(body[i:i + 65536]))
        while True:
            event = conn.next_event()
            if event is proto.NEED_DATA:
                conn.receive_data(await tls.receive_some(65536))
                continue
            await trio.aclose_forcefully(tls)
            return event

    return trio.run(go)
