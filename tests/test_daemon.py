"""The daemon through its real parts: SoftHSM keys on both sides, TLS on loopback sockets,
SQLite on disk, openssl s_client as an independent peer, SIGKILL at random moments."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from demo_network import Demo  # noqa: E402
from demo_pki import setup  # noqa: E402  (demo_network.setup, its PKI made once per run)


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    d = Demo(tmp_path_factory.mktemp("net"))
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        paths = setup(d)
    for unit in ("finance", "office"):  # tests want short timeouts
        cfg = d.work / unit / "exchanged.toml"
        cfg.write_text(cfg.read_text().replace("read_timeout = 10", "read_timeout = 2"))
    yield d, paths
    d.stop()


@pytest.fixture
def demo(net):  # type: ignore[no-untyped-def]
    d, paths = net
    yield d, paths
    with __import__("contextlib").redirect_stdout(__import__("io").StringIO()):
        d.stop()
    d.daemons.clear()


def port_of(d: Demo, unit: str) -> int:
    text = (d.work / unit / "exchanged.toml").read_text()
    return int(re.search(r'listen = "127.0.0.1:(\d+)"', text).group(1))  # type: ignore[union-attr]


def s_client(d: Demo, unit: str, data: bytes, *, as_token: str = "finance-node",
             timeout: float = 20) -> str:
    """openssl s_client with a key on a token (the pkcs11 engine), as an independent peer."""
    from exchanged.transport.tlskey import openssl_cli_engine
    conf, pin = openssl_cli_engine(d.work / f"engine-{as_token}", d.tok / f"{as_token}.pin")
    env = {**d.env, "OPENSSL_CONF": str(conf)}
    p = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port_of(d, unit)}",
                        "-engine", "pkcs11", "-keyform", "engine", "-key",
                        f"pkcs11:token={as_token};object=me;type=private?pin-source={pin}",
                        "-cert", str(d.work / f"{as_token}.pem"), "-CAfile",
                        str(d.work / "ca" / "ca.pem"), "-quiet"],
                       input=data, env=env, capture_output=True, timeout=timeout)
    return p.stdout.decode(errors="replace") + p.stderr.decode(errors="replace")


def audit_rows(d: Demo, unit: str, action: str) -> list[tuple]:  # type: ignore[type-arg]
    conn = sqlite3.connect(d.work / unit / "data" / "node.db")
    try:
        return conn.execute("SELECT action, object, outcome, details FROM audit WHERE action = ?",
                            [action]).fetchall()
    finally:
        conn.close()


def test_sd_notify_ready_watchdog_and_stopping(demo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d, _ = demo
    sock_path = tmp_path / "notify.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(sock_path))
    s.settimeout(30)
    d.env.update(NOTIFY_SOCKET=str(sock_path), WATCHDOG_USEC="2000000")
    try:
        with __import__("contextlib").redirect_stdout(__import__("io").StringIO()):
            d.start("office")
        seen: list[str] = []
        deadline = time.monotonic() + 30
        while not ("READY=1" in seen and "WATCHDOG=1" in seen) and time.monotonic() < deadline:
            seen += s.recv(4096).decode().splitlines()
        assert "READY=1" in seen and "WATCHDOG=1" in seen, seen
        assert any(line.startswith("STATUS=unit office listening") for line in seen), seen
        d.daemons["office"].send_signal(signal.SIGTERM)
        while "STOPPING=1" not in seen and time.monotonic() < deadline:
            seen += s.recv(4096).decode().splitlines()
        assert "STOPPING=1" in seen
        assert d.daemons["office"].wait(20) == 0
    finally:
        del d.env["NOTIFY_SOCKET"], d.env["WATCHDOG_USEC"]
        s.close()


def test_openssl_s_client_as_an_independent_peer(demo) -> None:  # type: ignore[no-untyped-def]
    d, _ = demo
    with __import__("contextlib").redirect_stdout(__import__("io").StringIO()):
        d.start("office")
    out = s_client(d, "office", b"GET /v1/ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert "HTTP/1.1 200" in out and '"unit": "office"' in out.replace('":"', '": "'), out


def test_malformed_and_oversized_requests_get_clear_errors(demo) -> None:  # type: ignore[no-untyped-def]
    d, _ = demo
    with __import__("contextlib").redirect_stdout(__import__("io").StringIO()):
        d.start("office")
    assert "HTTP/1.1 400" in s_client(d, "office", b"\x00\x01garbage\r\n\r\n")
    doc = "0b1e8a9e-7d4c-4c83-9a55-6d0a4b1d2e3f"
    big = (f"POST /v1/documents/{doc} HTTP/1.1\r\nHost: x\r\n"
           "Content-Type: application/vnd.exchanged.package\r\n"
           f"Content-Length: {10**13}\r\nX-Exchanged-Sha256: {'0' * 64}\r\n\r\n").encode()
    out = s_client(d, "office", big)
    assert "HTTP/1.1 413" in out and "too-large" in out
    truncated = big.replace(str(10**13).encode(), b"1000") + b"x" * 10
    out = s_client(d, "office", truncated)
    assert "HTTP/1.1 408" in out or "HTTP/1.1 400" in out, out  # silent after 10 of 1000 bytes
    import hashlib
    not_a_package = big.replace(str(10**13).encode(), b"4").replace(
        b"0" * 64, hashlib.sha256(b"abcd").hexdigest().encode()) + b"abcd"
    out = s_client(d, "office", not_a_package)
    assert "HTTP/1.1 422" in out and "bad-package" in out, out
    # Nothing of that reached the exchange box.
    conn = sqlite3.connect(d.work / "office" / "data" / "node.db")
    assert conn.execute("SELECT count(*) FROM inbox WHERE doc_id = ?", [doc]).fetchone()[0] == 0
    conn.close()
    assert audit_rows(d, "office", "document-rejected")


def test_a_person_certificate_is_refused_and_audited(demo) -> None:  # type: ignore[no-untyped-def]
    d, _ = demo
    with __import__("contextlib").redirect_stdout(__import__("io").StringIO()):
        d.start("office")
    out = s_client(d, "office", b"GET /v1/ping HTTP/1.1\r\nHost: x\r\n\r\n", as_token="receiver")
    assert "HTTP/1.1 200" not in out
    time.sleep(0.5)
    rows = audit_rows(d, "office", "peer-refused")
    assert any("peer-wrong-key-usage" in r[3] for r in rows), rows


def _send_many(d: Demo, cfg: str, n: int, **extra: str) -> list[str]:
    (d.work / "m.pdf").write_bytes(b"%PDF-1.4\n" + os.urandom(100_000) + b"\n%%EOF\n")
    (d.work / "m.txt").write_text("body\n")
    from exchanged import client
    from exchanged.node.config import Config
    sock = Config.load(cfg).socket_path
    return [client.request(sock, "send", to="office", title=f"doc {i}",
                            pdf=str(d.work / "m.pdf"), editable=str(d.work / "m.txt"),
                            **extra)["doc_id"]
            for i in range(n)]


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["office", "finance"])
def test_nothing_is_lost_when_a_daemon_is_killed(demo, victim: str) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL the receiver (or the sender) at random moments while documents are in flight;
    after restarts every document arrives exactly once, its digest intact."""
    d, paths = demo
    quiet = __import__("contextlib").redirect_stdout(__import__("io").StringIO())
    with quiet:
        d.start("finance")
        d.start("office")
    before = subprocess.run([sys.executable, "-m", "exchanged", "inbox", "--config",
                             paths["office"], "--json"], env=d.env, capture_output=True,
                            text=True, check=True)
    known = {i["doc_id"] for i in json.loads(before.stdout)}
    ids = _send_many(d, paths["finance"], 200)
    rng = random.Random(42 if victim == "office" else 7)
    for k in range(4):
        # The first kill soon after the last document is queued, while most are in flight.
        time.sleep(rng.uniform(0.05, 0.4) if k == 0 else rng.uniform(0.2, 1.5))
        if k == 0:  # the first kill lands while documents are still in flight
            conn = sqlite3.connect(d.work / "finance" / "data" / "node.db")
            marks = ",".join("?" * len(ids))
            delivered = conn.execute("SELECT count(*) FROM outbox WHERE state = 'delivered' "
                                     f"AND doc_id IN ({marks})", ids).fetchone()[0]
            conn.close()
            assert delivered < len(ids)
        d.daemons[victim].kill()
        d.daemons[victim].wait()
        with quiet:
            d.start(victim)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        out = json.loads(subprocess.run(
            [sys.executable, "-m", "exchanged", "outbox", "--config", paths["finance"],
             "--json"], env=d.env, capture_output=True, text=True, check=True).stdout)
        states = {i["doc_id"]: i["state"] for i in out if i["doc_id"] in ids}
        if all(s == "delivered" for s in states.values()) and len(states) == len(ids):
            break
        time.sleep(0.5)
    assert all(s == "delivered" for s in states.values()), states
    inbox = json.loads(subprocess.run(
        [sys.executable, "-m", "exchanged", "inbox", "--config", paths["office"], "--json"],
        env=d.env, capture_output=True, text=True, check=True).stdout)
    got = [i for i in inbox if i["doc_id"] not in known]
    assert sorted(i["doc_id"] for i in got) == sorted(ids)  # each exactly once
    sent = {i["doc_id"]: i["package_sha256"] for i in out}
    from exchanged.store.nodedb import NodeStore
    with NodeStore.open(d.work / "office" / "data", create=False) as store:
        for i in got:
            assert i["package_sha256"] == sent[i["doc_id"]]
            store.check_blob(i["package_sha256"])  # the bytes on disk still hash right


@pytest.mark.slow
def test_nothing_is_lost_when_the_receiver_is_killed_during_group_commits(demo) -> None:  # type: ignore[no-untyped-def]
    """finance sends on four connections at once, so office stores documents arriving
    together in shared COMMITs; office is SIGKILLed once those are seen, and twice more; every
    document still arrives exactly once (an acknowledgement only ever follows its COMMIT)."""
    d, paths = demo
    cfg = Path(paths["finance"])
    original = cfg.read_text()
    cfg.write_text(original.replace("[limits]\n", "[limits]\nconnections_per_peer = 4\n"))
    quiet = __import__("contextlib").redirect_stdout(__import__("io").StringIO())
    try:
        with quiet:
            d.start("finance")
            d.start("office")
        known = {i["doc_id"] for i in json.loads(d.x("inbox", "--config", paths["office"],
                                                     "--json", quiet=True))}
        ids = _send_many(d, paths["finance"], 150)

        def shared_commits() -> bool:
            g = json.loads(d.x("status", "--config", paths["office"], "--json", quiet=True,
                               ok=None))["group_commit"]
            return bool(g["changes"] > g["commits"])
        d.wait_for("office to share a COMMIT between documents", shared_commits, timeout=60)
        rng = random.Random(11)
        for k in range(3):
            if k:
                time.sleep(rng.uniform(0.3, 1.2))
            d.daemons["office"].kill()
            d.daemons["office"].wait()
            with quiet:
                d.start("office")

        def outbox() -> dict[str, str]:
            out = json.loads(d.x("outbox", "--config", paths["finance"], "--json", quiet=True))
            return {i["doc_id"]: i["state"] for i in out if i["doc_id"] in ids}
        states = d.wait_for("every document delivered", lambda: (
            s := outbox()) and all(v == "delivered" for v in s.values()) and s, timeout=120)
        assert len(states) == len(ids)  # type: ignore[arg-type]
        inbox = json.loads(d.x("inbox", "--config", paths["office"], "--json", quiet=True))
        got = sorted(i["doc_id"] for i in inbox if i["doc_id"] not in known)
        assert got == sorted(ids)  # each exactly once
    finally:
        cfg.write_text(original)


def test_alert_reload_and_the_nodes_audit_log(demo, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An arriving document runs the alert command (N3); SIGHUP reloads the peer table, after
    which finance is refused (A13); the node's audit log records it all and verifies."""
    d, paths = demo
    cfg = d.work / "office" / "exchanged.toml"
    original = cfg.read_text()
    marker = tmp_path / "alert.txt"
    cfg.write_text(original.replace(
        "[pkcs11]", f'alert_command = ["sh", "-c", "echo $EXCHANGED_TITLE >> {marker}"]\n\n'
                    "[pkcs11]", 1))
    quiet = __import__("contextlib").redirect_stdout(__import__("io").StringIO())
    try:
        with quiet:
            d.start("finance")
            d.start("office")
        _send_many(d, paths["finance"], 1)
        d.wait_for("the alert", lambda: marker.exists() and "doc 0" in marker.read_text())
        # Drop finance from office's peers (and so from its witnessing) and reload: finance
        # is refused from now on.
        cfg.write_text("\n".join(line for line in cfg.read_text().split("[peers.finance]")[0]
                                 .splitlines() if not line.startswith("witness")) + "\n")
        d.daemons["office"].send_signal(signal.SIGHUP)
        d.wait_for("the reload", lambda: audit_rows(d, "office", "config-reload"))
        _send_many(d, paths["finance"], 1)
        d.wait_for("office to refuse finance", lambda: any(
            "not a configured peer" in r[3] for r in audit_rows(d, "office", "peer-refused")))
        # Put finance back and reload again: the queued document goes through.
        cfg.write_text(original)
        d.daemons["office"].send_signal(signal.SIGHUP)
        [again] = _send_many(d, paths["finance"], 1)
        d.wait_for("delivery after the peer came back", lambda: d.item(
            "finance", "outbox", again).get("state") == "delivered", timeout=60)
    finally:
        cfg.write_text(original)
    with quiet:
        d.stop()
    d.daemons.clear()
    for unit in ("office", "finance"):  # stopping signs a checkpoint on the node token
        r = subprocess.run([sys.executable, "-m", "exchanged", "audit", "verify",
                            "--node-config", str(d.work / unit / "exchanged.toml")],
                           env=d.env, capture_output=True, text=True)
        assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
    assert audit_rows(d, "office", "document-received")
    assert audit_rows(d, "finance", "document-sent")
    conn = sqlite3.connect(d.work / "office" / "data" / "node.db")
    conn.execute("UPDATE audit SET outcome = 'ok' WHERE action = 'peer-refused'")
    conn.commit()
    conn.close()
    r = subprocess.run([sys.executable, "-m", "exchanged", "audit", "verify", "--node-config",
                        str(d.work / "office" / "exchanged.toml")], env=d.env,
                       capture_output=True, text=True)
    assert r.returncode == 1 and "tampered" in r.stderr


def test_roles_at_a_node_follow_the_same_rules(demo) -> None:  # type: ignore[no-untyped-def]
    """Role changes at a node are signed by the operator's token in the CLI and checked by the
    daemon with exchanged.roles: separation, no self-grant, auditor review, suspension."""
    d, paths = demo
    quiet = __import__("contextlib").redirect_stdout(__import__("io").StringIO())
    with quiet:
        d.start("finance")
        d.start("office")
    cfg = paths["office"]

    def role(*args: str, ok: bool = True) -> str:
        return d.x("role", *args, "--config", cfg, ok=ok, quiet=True)

    admin, auditor, receiver = d.op("admin"), d.op("auditor"), d.op("receiver")
    listed = json.loads(d.x("ca", "list", "--dir", "ca", "--json", quiet=True))
    for name, file in (("Zhang Wei", "admin.pem"), ("Chen Jing", "auditor.pem")):
        serial = next(c["serial"] for c in listed if f"CN={name}," in c["subject"])
        d.x("ca", "show", "--dir", "ca", serial, "-o", file, quiet=True)
    # The administrator cannot make himself anything; nor the auditor an administrator (A5).
    assert "cannot grant a role to themselves" in role(
        "grant", "admin.pem", "--role", "liaison", *admin, ok=False)
    assert "may never be held with it" in role(
        "grant", "auditor.pem", "--role", "administrator", *admin, ok=False)
    # Someone who is not an administrator cannot grant at all.
    assert "not an active administrator" in role(
        "grant", "receiver.pem", "--role", "receiver", "--division", "Secretariat", *receiver,
        ok=False)
    # A grant is pending until the auditor approves it; the administrator cannot approve it.
    grant = json.loads(role("grant", "receiver.pem", "--role", "deputy-receiver", "--division",
                            "Secretariat", *admin, "--json"))["id"]
    assert "not an active auditor" in role("review", str(grant), "--approve", *admin, ok=False)
    role("review", str(grant), "--approve", *auditor)
    # Liu Yang can sign for documents in her division's box; suspended (A39), she cannot, at
    # once.
    [doc] = _send_many(d, paths["finance"], 1, division="Secretariat")
    d.wait_for("the document at office", lambda: d.item("office", "inbox", doc))
    role("suspend", "receiver.pem", "--reason", "key reported lost", *auditor)
    out = d.x("inbox", "sign-for", doc, "--config", cfg, *receiver, ok=False, quiet=True)
    assert "suspended" in out
    role("resume", "receiver.pem", "--reason", "key found", *auditor)
    d.x("inbox", "sign-for", doc, "--config", cfg, *receiver, quiet=True)
    # Every one of those acts is in office's audit log, signed by whoever did it.
    for action in ("role-grant", "role-approve", "person-suspend", "person-resume",
                   "document-signed-for"):
        assert audit_rows(d, "office", action), action
    # Regression: she signed for as the deputy she is; the log said "receiver".
    conn = sqlite3.connect(d.work / "office" / "data" / "node.db")
    try:
        [(role_recorded,)] = conn.execute("SELECT role FROM audit WHERE action = "
                                          "'document-signed-for' AND object = ?", [doc])
    finally:
        conn.close()
    assert role_recorded == "deputy-receiver"


def test_send_refuses_a_pdf_that_is_not_a_pdf_and_classified_documents(demo) -> None:  # type: ignore[no-untyped-def]
    d, paths = demo
    with __import__("contextlib").redirect_stdout(__import__("io").StringIO()):
        d.start("finance")
    (d.work / "fake.pdf").write_text("I am a text file with a .pdf name\n")
    (d.work / "ok.txt").write_text("text\n")
    (d.work / "real.pdf").write_bytes(b"%PDF-1.4\n%%EOF\n")
    base = ["send", "--config", paths["finance"], "--to", "office", "--title", "t",
            "--editable", "ok.txt"]
    out = d.x(*base, "--pdf", "fake.pdf", ok=False, quiet=True)
    assert out.startswith("exchanged: error:") and out.count("\n") == 0 and "not a PDF" in out
    out = d.x(*base, "--pdf", "real.pdf", "--classification", "secret", ok=False, quiet=True)
    assert "A38" in out and out.count("\n") == 0
    outbox = json.loads(d.x("outbox", "--config", paths["finance"], "--json", quiet=True))
    assert not [i for i in outbox if i["metadata"]["title"] == "t"]  # nothing was queued
    assert len(audit_rows(d, "finance", "document-send")) >= 2  # both refusals on record


SIGN_REQUEST = r'''
import base64, datetime as dt, json, sys
from exchanged.pki.operator import Operator
from exchanged.pki.pin import PinSource
from exchanged.pki.token import Token
from exchanged.pki.uri import parse
tok = Token.open(parse("pkcs11:token=auditor"), PinSource("t", "X", "tokens/auditor.pin"))
op = Operator.from_token(tok.key(label="me"))
payload = json.loads(sys.argv[1])
payload.update(actor=op.serial, at=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
print(base64.b64encode(op.sign(payload, detached=False)[1]).decode())
tok.close()
'''


def test_local_clients_and_replayed_requests_cannot_hurt_the_daemon(demo) -> None:  # type: ignore[no-untyped-def]
    """Regressions: a local client that hangs up before its answer, or sends a request too
    deeply nested to parse, ended the daemon; a signed role request could be applied twice."""
    d, paths = demo
    with __import__("contextlib").redirect_stdout(__import__("io").StringIO()):
        d.start("office")
    from exchanged import client
    from exchanged.node.config import Config
    sock = Config.load(paths["office"]).socket_path
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(sock))
    s.sendall(b'{"cmd": "status"}\n' * 200)  # then hang up without reading the answers
    s.close()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(sock))
    s.sendall(b"[" * 100000 + b"\n")
    assert b'"ok": false' in s.recv(4096)
    s.close()
    assert client.request(sock, "status")["unit"] == "office"  # still serving
    # A suspension by the administrator, lifted by the auditor's signed request once...
    receiver = d.work / "receiver.pem"
    from cryptography import x509 as _x509

    from exchanged.pki.names import person_of
    person = person_of(_x509.load_pem_x509_certificate(receiver.read_bytes()).subject)
    d.x("role", "suspend", "--config", paths["office"], str(receiver), "--reason", "first",
        *d.op("admin"), quiet=True)
    signed = subprocess.run([sys.executable, "-c", SIGN_REQUEST, json.dumps(
        {"action": "person-resume", "object": person, "node": "office", "reason": "ok"})],
        cwd=d.work, env=d.env, capture_output=True, text=True, check=True).stdout.strip()
    client.request(sock, "role", request=signed)
    d.x("role", "suspend", "--config", paths["office"], str(receiver), "--reason", "again",
        *d.op("admin"), quiet=True)
    # ...cannot be replayed to lift the new suspension.
    with pytest.raises(Exception, match="already applied"):
        client.request(sock, "role", request=signed)
    d.x("role", "resume", "--config", paths["office"], str(receiver), "--reason", "cleared",
        *d.op("auditor"), quiet=True)
    assert d.daemons["office"].poll() is None
