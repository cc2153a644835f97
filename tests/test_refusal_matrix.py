"""The refusal matrix through real TLS, on both sides of a connection.

Certificates for a peer named like office's node (so that only the property under test
differs) are issued by the demo CA's key on its token: revoked, held, released from a hold,
expired, not yet valid, from another CA, with the wrong key usage, and a valid one of a unit
that is not configured. Their keys are software keys made for the test (test peers only; no
node key leaves a token). As a client, each connects to office's daemon with openssl s_client;
as a server, each stands in for office (openssl s_server) when finance's daemon connects.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from demo_network import Demo, free_port  # noqa: E402
from demo_pki import setup  # noqa: E402  (demo_network.setup, its PKI made once per run)

MAKE_CERTS = r'''
import datetime as dt, sys
from pathlib import Path
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from exchanged.pki import crl, profiles
from exchanged.pki.pin import PinSource
from exchanged.pki.token import Token
from exchanged.pki.uri import parse

out = Path(sys.argv[1])
ca = x509.load_pem_x509_certificate(Path("ca/ca.pem").read_bytes())
tok = Token.open(parse("pkcs11:token=ca"), PinSource("CA", "X", "tokens/ca.pin"))
key = tok.key(label="ca")
now = dt.datetime.now(dt.UTC).replace(microsecond=0)
other_key = ec.generate_private_key(ec.SECP256R1())
other = profiles.ca_root(name=ca.subject, public_key=other_key.public_key(), not_before=now,
                         days=10).sign(other_key, hashes.SHA256())  # same name, other key
cases = {  # name: (profile, start offset days, days, signer)
    "good": ("node", -1, 30, "ca"), "revoked": ("node", -1, 30, "ca"),
    "held": ("node", -1, 30, "ca"), "released": ("node", -1, 30, "ca"),
    "expired": ("node", -10, 2, "ca"), "not-yet-valid": ("node", 2, 30, "ca"),
    "another-ca": ("node", -1, 30, "other"), "wrong-usage": ("person", -1, 30, "ca"),
    "unconfigured": ("node", -1, 30, "ca"),
}
# Each case twice: named as finance's node (to connect to office) and as office's node (to be
# connected to by finance): only the property under test differs from the real peer.
who = {"finance": ("node-finance", "Finance Bureau"),
       "office": ("node-office", "General Office Archives")}
serials = {}
for (name, (profile, start, days, signer)), as_ in [(c, a) for c in cases.items()
                                                     for a in who]:
    cn, org = who[as_] if name != "unconfigured" else ("node-elsewhere", "Elsewhere Bureau")
    k = ec.generate_private_key(ec.SECP256R1())
    issuer, sign = (ca, key.signer()) if signer == "ca" else (other, other_key)
    form = profiles.Form(name=cn, unit=org, division="Registry")
    cert = profiles.end_entity(profile, form=form, public_key=k.public_key(), ca_cert=issuer,
                               serial=profiles.random_serial(),
                               not_before=now + dt.timedelta(days=start), days=days,
                               crl_url=None, csr=None).sign(sign, hashes.SHA256())
    serials[f"{name}-{as_}"] = cert.serial_number
    (out / f"{name}-{as_}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / f"{name}-{as_}.key").write_bytes(k.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
def crl_with(number, entries):
    return crl.build(key=key, issuer=ca, entries=[crl.Entry(serials[f"{n}-{a}"], now, r)
                                                  for n, r in entries for a in who],
                     number=number,
                     this_update=now - dt.timedelta(minutes=1),
                     next_update=now + dt.timedelta(days=1))
(out / "held.crl").write_bytes(crl_with(1000, [("revoked", "keyCompromise"),
                                               ("held", "certificateHold"),
                                               ("released", "certificateHold")]))
(out / "released.crl").write_bytes(crl_with(1001, [("revoked", "keyCompromise"),
                                                   ("held", "certificateHold")]))
tok.close()
'''

EXPECT = {  # case: (accepted?, the refusal's code; OpenSSL's own check may refuse first)
    "good": (True, None),
    "revoked": (False, "peer-revoked"),
    "held": (False, "peer-suspended"),
    "released": (True, None),
    "expired": (False, "peer-expired"),
    "not-yet-valid": (False, "peer-not-yet-valid"),
    "another-ca": (False, "peer-bad-signature"),
    "wrong-usage": (False, "peer-wrong-key-usage"),
    "unconfigured": (False, "peer-unknown"),
}
# Refused by OpenSSL during the handshake (chain or validity), before our own check runs.
OPENSSL_FIRST = {"expired", "not-yet-valid", "another-ca"}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    d = Demo(tmp_path_factory.mktemp("matrix"))
    with contextlib.redirect_stdout(io.StringIO()):
        paths = setup(d)
    certs = d.work / "cases"
    certs.mkdir()
    subprocess.run([sys.executable, "-c", MAKE_CERTS, str(certs)], cwd=d.work, env=d.env,
                   check=True)
    # The published CRL: a hold on "released" first; the release comes later, per case.
    for unit in ("finance", "office"):
        shutil.copyfile(certs / "held.crl", d.work / unit / "ca.crl")
    yield d, paths, certs
    with contextlib.redirect_stdout(io.StringIO()):
        d.stop()


def publish(d: Demo, crl: Path, unit: str) -> None:
    tmp = d.work / unit / ".crl.tmp"
    shutil.copyfile(crl, tmp)
    tmp.replace(d.work / unit / "ca.crl")
    d.daemons[unit].send_signal(signal.SIGHUP)  # reload now, not at the next poll
    time.sleep(1.0)


def port_of(d: Demo, unit: str) -> int:
    text = (d.work / unit / "exchanged.toml").read_text()
    return int(re.search(r'listen = "127.0.0.1:(\d+)"', text).group(1))  # type: ignore[union-attr]


@pytest.mark.parametrize("case", list(EXPECT))
def test_as_a_client_to_the_daemon(matrix, case: str) -> None:  # type: ignore[no-untyped-def]
    d, paths, certs = matrix
    if "office" not in d.daemons or d.daemons["office"].poll() is not None:
        with contextlib.redirect_stdout(io.StringIO()):
            d.start("office")
    if case == "released":
        publish(d, certs / "released.crl", "office")
    ok, code = EXPECT[case]
    mark = _audit_high(d, "office")
    p = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port_of(d, 'office')}",
                        "-cert", str(certs / f"{case}-finance.pem"), "-key",
                        str(certs / f"{case}-finance.key"), "-CAfile",
                        str(d.work / "ca" / "ca.pem"), "-quiet"],
                       input=b"GET /v1/ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                       capture_output=True, timeout=30, env=d.env)
    answered = b"HTTP/1.1 200" in p.stdout
    assert answered == ok, (case, p.stdout[-500:], p.stderr[-500:])
    if not ok:
        time.sleep(0.3)
        refusals = _audit_since(d, "office", mark)
        assert refusals, "the refusal was not audited"
        action, details = refusals[-1]
        if case in OPENSSL_FIRST and action == "tls-failed":
            return
        assert action == "peer-refused" and json.loads(details)["code"] == code, refusals


def _listening(port: int) -> bool:
    import socket
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _audit_high(d: Demo, unit: str) -> int:
    if not (d.work / unit / "data" / "node.db").exists():
        return 0
    conn = sqlite3.connect(d.work / unit / "data" / "node.db")
    try:
        return int(conn.execute("SELECT coalesce(max(seq), 0) FROM audit").fetchone()[0])
    finally:
        conn.close()


def _audit_since(d: Demo, unit: str, seq: int) -> list[tuple[str, str]]:
    conn = sqlite3.connect(d.work / unit / "data" / "node.db")
    try:
        return conn.execute("SELECT action, details FROM audit WHERE seq > ? AND action IN "
                            "('peer-refused', 'tls-failed') ORDER BY seq", [seq]).fetchall()
    finally:
        conn.close()


@pytest.mark.parametrize("case", list(EXPECT))
def test_as_a_server_the_daemon_connects_to(matrix, case: str) -> None:  # type: ignore[no-untyped-def]
    """finance's daemon connects to a stand-in for office presenting the case's certificate."""
    d, paths, certs = matrix
    quiet = contextlib.redirect_stdout(io.StringIO())
    port = free_port()
    cfg = d.work / "finance" / "exchanged.toml"
    original = cfg.read_text()
    cfg.write_text(re.sub(r'(\[peers\.office\]\naddress = "127\.0\.0\.1:)\d+',
                          rf"\g<1>{port}", original))
    if case == "released":
        shutil.copyfile(certs / "released.crl", d.work / "finance" / "ca.crl")
    server = subprocess.Popen(["openssl", "s_server", "-accept", str(port), "-cert",
                               str(certs / f"{case}-office.pem"), "-key",
                               str(certs / f"{case}-office.key"),
                               "-CAfile", str(d.work / "ca" / "ca.pem"), "-Verify", "1",
                               "-www", "-quiet"], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=d.env)
    try:
        d.wait_for("s_server", lambda: _listening(port))
        with quiet:
            if "finance" in d.daemons and d.daemons["finance"].poll() is None:
                d.daemons["finance"].terminate()
                d.daemons["finance"].wait(20)
            # A fresh store: documents of earlier cases would be retried first, and s_server
            # (one connection at a time, no exchanged protocol) would hold them up.
            shutil.rmtree(d.work / "finance" / "data", ignore_errors=True)
            d.start("finance")
        mark = _audit_high(d, "finance")
        from exchanged import client
        from exchanged.node.config import Config
        (d.work / "m.pdf").write_bytes(b"%PDF-1.4\n%%EOF\n")
        (d.work / "m.txt").write_text("x\n")
        doc = client.request(Config.load(cfg).socket_path, "send", to="office",
                              title=f"matrix {case}", pdf=str(d.work / "m.pdf"),
                              editable=str(d.work / "m.txt"))["doc_id"]

        def last_error() -> str:
            out = json.loads(d.x("outbox", doc, "--config", str(cfg), "--json", quiet=True))
            return str(out.get("last_error") or "")

        err = str(d.wait_for("an attempt", last_error, timeout=30))
        ok, code = EXPECT[case]
        refusals = _audit_since(d, "finance", mark)
        if ok:
            # Identity and status passed; s_server -www is no exchanged node, so the attempt
            # then fails on the protocol, not on the certificate.
            assert not refusals and "refused" not in err, (err, refusals)
        elif case in OPENSSL_FIRST | {"wrong-usage"} and not refusals:
            # As a client, OpenSSL also checks the server's purpose (serverAuth) itself.
            assert "certificate" in err.lower() or "ssl" in err.lower(), err
        else:
            assert refusals and json.loads(refusals[-1][1])["code"] == code, (err, refusals)
    finally:
        server.kill()
        server.wait()
        assert server.stdin is not None
        server.stdin.close()  # kept open until now: s_server drops connections at stdin EOF
        cfg.write_text(original)
        shutil.copyfile(certs / "held.crl", d.work / "finance" / "ca.crl")
