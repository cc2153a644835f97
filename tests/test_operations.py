"""Operating a node, through three real daemons on SoftHSM tokens and the CA's real publication
point (`exchanged ca serve`): status, SIGHUP, renewal with a transfer in progress, expiry
warnings, stale CRLs under both policies, and a revocation that reaches every node by itself
while the CA's host is down.

The tests run in file order on one network (the last one revokes a node)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from demo_network import Demo  # noqa: E402
from demo_pki import setup  # noqa: E402  (demo_network.setup, its PKI made once per run)

UNITS = ("finance", "office", "district")


class Ops:
    def __init__(self, d: Demo) -> None:
        self.d = d

    def cfg(self, unit: str) -> str:
        return str(self.d.work / unit / "exchanged.toml")

    def status(self, unit: str) -> tuple[int, dict[str, Any]]:
        p = subprocess.run([sys.executable, "-m", "exchanged", "status", "--config",
                            self.cfg(unit), "--json"], cwd=self.d.work, env=self.d.env,
                           capture_output=True, text=True)
        return p.returncode, json.loads(p.stdout)

    def crl_number(self, unit: str) -> int | None:
        return self.status(unit)[1]["crls"][0]["number"]  # type: ignore[no-any-return]

    def send(self, unit: str, to: str, title: str, size: int = 100) -> str:
        pdf = self.d.work / "ops.pdf"
        pdf.write_bytes(b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n"
                        b"%%EOF\n")
        txt = self.d.work / f"ops-{size}.txt"
        if not txt.exists():
            txt.write_bytes(b"x" * size)
        out = self.d.x("send", "--config", self.cfg(unit), "--to", to, "--title", title,
                       "--pdf", str(pdf), "--editable", str(txt), "--json", quiet=True)
        return str(json.loads(out)["doc_id"])

    def outbox(self, unit: str, doc: str) -> dict[str, Any]:
        return self.d.item(unit, "outbox", doc)

    def delivered(self, unit: str, doc: str, timeout: float = 60) -> dict[str, Any]:
        return self.d.wait_for(f"{doc} delivered", lambda: (
            i := self.outbox(unit, doc))["state"] in ("delivered", "signed-for") and i,
            timeout=timeout)  # type: ignore[return-value]

    def log(self, unit: str) -> str:
        return (self.d.work / unit / "daemon.log").read_text()

    def alerts(self, unit: str) -> str:
        path = self.d.work / unit / "alerts.txt"
        return path.read_text() if path.exists() else ""

    def edit(self, unit: str, old: str, new: str) -> None:
        path = Path(self.cfg(unit))
        text = path.read_text()
        assert old in text, old
        path.write_text(text.replace(old, new, 1))

    def ca_crl(self, *extra: str) -> int:
        out = self.d.x("ca", "crl", "--dir", "ca", "--ca-pin-file", self.d.pin("ca"), *extra,
                       quiet=True)
        return int(re.search(r"CRL number (\d+)", out).group(1))  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ops]:
    d = Demo(tmp_path_factory.mktemp("ops"))
    with contextlib.redirect_stdout(io.StringIO()):
        setup(d, box=True)
        for unit in UNITS:  # alerts into a file; a quick CRL round between peers
            cfg = d.work / unit / "exchanged.toml"
            cfg.write_text(cfg.read_text().replace(
                "[pkcs11]", f'alert_command = ["sh", "-c", "echo $EXCHANGED_EVENT '
                            f'$EXCHANGED_DETAIL >> {d.work / unit / "alerts.txt"}"]\n\n[pkcs11]')
                .replace("[trust]\n", "[trust]\ncrl_gossip = 5\n"))
        d.serve_ca()
        for unit in UNITS:
            d.start(unit)
    o = Ops(d)
    for unit in UNITS:  # every peer reached once (the first CRL comparison)
        d.wait_for(f"{unit} to reach its peers", lambda unit=unit: all(
            p["last_success"] for p in o.status(unit)[1]["peers"]))
    yield o
    with contextlib.redirect_stdout(io.StringIO()):
        d.stop()


def test_status_says_what_a_watcher_needs(ops: Ops) -> None:
    code, s = ops.status("finance")
    assert code == 0, s["problems"]
    assert s["up"] and s["unit"] == "finance" and s["token"]["present"]
    assert [p["unit"] for p in s["peers"]] == ["district", "office"]
    assert all(p["last_success"] and p["queued"] == 0 for p in s["peers"])
    [crl] = s["crls"]
    assert crl["number"] >= 1 and not crl["stale"] and crl["age_seconds"] >= 0
    assert s["crl_url"] == f"http://127.0.0.1:{ops.d.ca_port}/ca.crl"
    assert s["crl_fetch"]["ok"]
    assert 729 < s["certificate"]["days_left"] <= 730 and s["certificate"]["warning_days"] is None
    assert s["disk"]["free_bytes"] > 0 and s["audit"]["seq"] > 0
    text = ops.d.x("status", "--config", ops.cfg("finance"), quiet=True)
    assert "no problems" in text and "district" in text and "CRL          number" in text
    # A stopped node: exit 3, said plainly.
    ops.d.daemons["district"].terminate()
    ops.d.daemons["district"].wait(30)
    code, s = ops.status("district")
    assert code == 3 and not s["up"] and "exchanged serve" in s["error"]
    # A peer that cannot be reached is a problem at its peers, with the reason.
    doc = ops.send("finance", "district", "while district is down")
    ops.d.wait_for("the failed attempt", lambda: ops.outbox("finance", doc)["attempts"])
    code, s = ops.status("finance")
    assert code == 1 and any(p.startswith("peer district: cannot reach district")
                             for p in s["problems"]), s["problems"]
    district = next(p for p in s["peers"] if p["unit"] == "district")
    assert district["queued"] == 1 and district["oldest_queued_doc"] == doc
    assert s["oldest_queued"]["doc_id"] == doc
    with contextlib.redirect_stdout(io.StringIO()):
        ops.d.start("district")
    ops.delivered("finance", doc)


def test_sighup_applies_what_may_change_and_refuses_the_rest(ops: Ops) -> None:
    cfg = Path(ops.cfg("finance"))
    original = cfg.read_text()
    port = int(re.search(r'listen = "127.0.0.1:(\d+)"', original).group(1))  # type: ignore[union-attr]
    try:
        ops.edit("finance", "read_timeout = 10", "read_timeout = 11\nmax_connections = 7")
        ops.edit("finance", 'divisions = ["Secretariat"', 'divisions = ["Audit Division", '
                                                          '"Secretariat"')
        ops.edit("finance", f'listen = "127.0.0.1:{port}"', 'listen = "127.0.0.1:1"')
        p = subprocess.run([sys.executable, "-m", "exchanged", "reload", "--config", str(cfg),
                            "--json"], cwd=ops.d.work, env=ops.d.env, capture_output=True,
                           text=True)
        answer = json.loads(p.stdout)
        assert p.returncode == 1  # something was refused
        assert set(answer["changed"]) == {"limits", "box"}, answer
        [refused] = answer["refused"]
        assert refused.startswith("listen_port (needs a restart")
        assert f"127.0.0.1:{port}" == ops.status("finance")[1]["listen"]  # still there
        log = ops.log("finance")
        assert "reload: limits changed" in log and "reload: box changed" in log
        assert "listen_port changed but is not applied" in log
        # The new division exists now: a document for it is accepted.
        sent = json.loads(ops.d.x("send", "--config", ops.cfg("office"), "--to", "finance",
                                  "--title", "audit", "--division", "Audit Division", "--pdf",
                                  "ops.pdf", "--editable", "ops-100.txt", "--json", quiet=True))
        ops.delivered("office", sent["doc_id"])
    finally:
        cfg.write_text(original)
    # SIGHUP does the same, and says so in the log.
    before = ops.log("finance").count("configuration reloaded")
    ops.d.daemons["finance"].send_signal(signal.SIGHUP)
    ops.d.wait_for("the reload", lambda: ops.log("finance").count("configuration reloaded")
                   > before)
    assert "reload: limits changed" in ops.log("finance").split("configuration reloaded")[-2]


class SlowProxy:
    """A TCP relay to `port` that passes the client's bytes at `rate` bytes a second: a
    transfer through it stays in progress long enough to renew under it."""

    def __init__(self, port: int, rate: int) -> None:
        self.port, self.rate = port, rate
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.port))
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, slow: bool) -> None:
        try:
            while data := src.recv(16384):
                dst.sendall(data)
                if slow:
                    time.sleep(len(data) / self.rate)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self.listener.close()


def served_serial(port: int) -> str:
    """The serial of the certificate a node presents (openssl, no client key needed: the
    server's certificate comes before it asks for ours)."""
    p = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-showcerts"],
                       input=b"", capture_output=True, timeout=20)
    pem = re.search(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", p.stdout,
                    re.DOTALL)
    assert pem, p.stdout[-500:]
    out = subprocess.run(["openssl", "x509", "-noout", "-serial"], input=pem.group(0),
                         capture_output=True, check=True).stdout.decode()
    return out.strip().split("=")[1].lower()


def test_renewal_takes_effect_without_dropping_a_transfer(ops: Ops) -> None:
    d = ops.d
    cfg = ops.cfg("finance")
    port = int(re.search(r'listen = "127.0.0.1:(\d+)"', Path(cfg).read_text()).group(1))  # type: ignore[union-attr]
    old_serial = served_serial(port)
    auditor = ["--operator", "pkcs11:token=auditor;object=me", "--operator-pin-file",
               d.pin("auditor")]
    # An export now makes a checkpoint signed with the key the node has before its renewal.
    d.x("audit", "export", "--config", cfg, "--action", "config-reload", "--out",
        str(d.work / "bundle-before"), *auditor, quiet=True)
    # The administrator makes the new key and the CSR; the CA issues (for 5 days only, to see
    # the expiry warning too).
    d.x("renew", "--config", cfg, "--operator", "pkcs11:token=admin;object=me",
        "--operator-pin-file", d.pin("admin"), "-o", "renew.csr", quiet=True)
    assert b"BEGIN CERTIFICATE REQUEST" in (d.work / "renew.csr").read_bytes()
    ca_toml = d.work / "ca" / "ca.toml"
    ca_toml.write_text(re.sub(r"(?m)^cert_days = \d+", "cert_days = 5", ca_toml.read_text()))
    rid = json.loads(d.x("ca", "request", "submit", "--dir", "ca", "--csr", "renew.csr",
                         "--profile", "node", "--name", "node-finance", "--unit",
                         "Finance Bureau", "--ip", "127.0.0.1", "--json", quiet=True))["id"]
    d.x("ca", "request", "approve", "--dir", "ca", str(rid), *d.op("officer"), quiet=True)
    d.x("ca", "issue", "--dir", "ca", str(rid), *d.op("officer"), "--ca-pin-file",
        d.pin("ca"), "-o", "finance-renewed.pem", quiet=True)
    # A 24 MB document from finance to office, through a relay passing 4 MB/s.
    office_port = int(re.search(r'\[peers\.office\]\naddress = "127\.0\.0\.1:(\d+)"',
                                Path(cfg).read_text()).group(1))  # type: ignore[union-attr]
    proxy = SlowProxy(office_port, 4 * 1024 * 1024)
    try:
        ops.edit("finance", f'address = "127.0.0.1:{office_port}"',
                 f'address = "127.0.0.1:{proxy.address}"')
        d.x("reload", "--config", cfg, quiet=True)
        doc = ops.send("finance", "office", "sent across a renewal", size=24 * 1024 * 1024)
        d.wait_for("the transfer under way", lambda: ops.status("office")[1][
            "active_transfers"] > 0, timeout=60)
        out = d.x("renew", "--config", cfg, "--install", "finance-renewed.pem", quiet=True)
        assert "node certificate" in out or "certificate" in out, out
        assert ops.status("office")[1]["active_transfers"] > 0, "too late: the transfer ended"
        item = ops.delivered("finance", doc, timeout=120)
        assert item["attempts"] == 0 and not item["last_error"], item  # not cut off, not resent
    finally:
        ops.edit("finance", f'address = "127.0.0.1:{proxy.address}"',
                 f'address = "127.0.0.1:{office_port}"')
        d.x("reload", "--config", cfg, quiet=True)
        proxy.close()
    new_serial = served_serial(port)
    assert new_serial != old_serial
    assert new_serial == subprocess.run(
        ["openssl", "x509", "-noout", "-serial", "-in", str(d.work / "finance-renewed.pem")],
        capture_output=True, text=True, check=True).stdout.strip().split("=")[1].lower()
    # The log holds checkpoints of both keys: it verifies, and so does an evidence bundle that
    # spans the renewal (openssl checks each checkpoint with the key that signed it).
    d.x("audit", "verify", "--node-config", cfg, quiet=True)
    bundle = d.work / "bundle-across"
    d.x("audit", "export", "--config", cfg, "--action", "config-reload", "--out", str(bundle),
        *auditor, quiet=True)
    d.x("audit", "verify", str(bundle), quiet=True)
    keys = set()
    for sig in (bundle / "openssl").glob("cp-*.sig"):
        seq = sig.name[3:-4]
        pub = bundle / "openssl" / f"cp-{seq}.pubkey.pem"
        keys.add(pub.read_bytes())
        subprocess.run(["openssl", "dgst", "-sha256", "-verify", str(pub), "-signature",
                        str(sig), str(bundle / "openssl" / f"cp-{seq}.msg")], check=True,
                       capture_output=True)
    assert len(keys) == 2, "the bundle should span checkpoints of both keys"
    # Peers take the renewed certificate with no change to their configuration, both ways.
    ops.delivered("finance", ops.send("finance", "office", "after the renewal"))
    ops.delivered("office", ops.send("office", "finance", "to the renewed node"))
    ops.delivered("district", ops.send("district", "finance", "to the renewed node"))
    # The new certificate expires within 7 days: status, log and alert say so.
    code, s = ops.status("finance")
    # (openssl prints a serial with an even number of digits: 0f11..., status as a number)
    assert s["certificate"]["warning_days"] == 7
    assert int(s["certificate"]["serial"], 16) == int(new_serial, 16)
    assert code == 1 and any("expires" in p and "renew" in p for p in s["problems"])
    d.wait_for("the expiry alert", lambda: "cert-expiring" in ops.alerts("finance"))
    assert "within 7 day(s)" in ops.log("finance")
    assert (d.work / f"finance-node.pem.{old_serial}.old").exists() or any(
        p.name.endswith(".old") for p in d.work.iterdir())
    # A certificate for another node is refused, and the file is left as it was.
    before = Path(cfg).read_text()
    p = subprocess.run([sys.executable, "-m", "exchanged", "renew", "--config", cfg,
                        "--install", str(d.work / "office-node.pem")], cwd=d.work, env=d.env,
                       capture_output=True, text=True)
    assert p.returncode == 1 and "not for this node" in p.stderr
    assert Path(cfg).read_text() == before


STALE_CRL = r'''
import datetime as dt, sys
from pathlib import Path
from cryptography import x509
from exchanged.pki import crl
from exchanged.pki.pin import PinSource
from exchanged.pki.token import Token
from exchanged.pki.uri import parse

number, out = int(sys.argv[1]), Path(sys.argv[2])
ca = x509.load_pem_x509_certificate(Path("ca/ca.pem").read_bytes())
now = dt.datetime.now(dt.UTC).replace(microsecond=0)
with Token.open(parse("pkcs11:token=ca"), PinSource("CA", "X", "tokens/ca.pin")) as tok:
    out.write_bytes(crl.build(key=tok.key(label="ca"), issuer=ca, entries=[], number=number,
                              this_update=now - dt.timedelta(days=2),
                              next_update=now - dt.timedelta(days=1)))
'''


def stale_crl(ops: Ops) -> tuple[Path, int]:
    """A CRL the CA signed two days ago, due yesterday, numbered above every one so far (the
    CA's own next number will equal it: `ops.ca_crl()` twice goes past it)."""
    number = max(ops.crl_number(u) or 0 for u in UNITS) + 1
    path = ops.d.work / f"stale-{number}.crl"
    subprocess.run([sys.executable, "-c", STALE_CRL, str(number), str(path)], cwd=ops.d.work,
                   env=ops.d.env, check=True)
    return path, number


def test_a_stale_crl_stops_documents_under_refuse_and_not_under_warn(ops: Ops) -> None:
    d = ops.d
    path, number = stale_crl(ops)
    d.x("crl", "install", str(path), "--config", ops.cfg("district"), quiet=True)
    # The newest CRL there is spreads (it is the CA's latest word), and everyone is stale.
    for unit in UNITS:
        d.wait_for(f"{unit} to hold the stale CRL", lambda unit=unit: ops.crl_number(unit)
                   == number)
    code, s = ops.status("finance")
    assert code == 1 and any("is stale since" in p for p in s["problems"]), s["problems"]
    assert s["crls"][0]["stale"]
    d.wait_for("the crl-stale alert", lambda: "crl-stale" in ops.alerts("finance"))
    doc = ops.send("finance", "office", "while the CRL is stale")
    d.wait_for("the refusal", lambda: "no current CRL" in (
        ops.outbox("finance", doc).get("last_error") or ""))
    assert ops.outbox("finance", doc)["state"] == "queued"  # waiting, not failed
    # The CA publishes again; finance fetches; the fresh CRL crosses to every node through
    # connections admitted for CRLs only, and the waiting document goes.
    ops.ca_crl()
    fresh = ops.ca_crl()
    assert fresh > number
    d.x("crl", "fetch", "--config", ops.cfg("finance"), quiet=True)
    for unit in UNITS:
        d.wait_for(f"{unit} to hold the fresh CRL", lambda unit=unit: ops.crl_number(unit)
                   == fresh)
    ops.delivered("finance", doc, timeout=90)

    # Under "warn" the newest revocations still apply and documents go on, with the alert.
    for unit in UNITS:
        ops.edit(unit, 'crl_gossip = 5', 'crl_gossip = 5\nstale_crl = "warn"')
        d.x("reload", "--config", ops.cfg(unit), quiet=True)
    path, number = stale_crl(ops)
    d.x("crl", "install", str(path), "--config", ops.cfg("finance"), quiet=True)
    doc = ops.send("finance", "office", "stale, but warned")
    ops.delivered("finance", doc)
    code, s = ops.status("finance")
    assert code == 1 and any("stale_crl = warn" in p for p in s["problems"])
    for unit in UNITS:
        ops.edit(unit, '\nstale_crl = "warn"', "")
        d.x("reload", "--config", ops.cfg(unit), quiet=True)
    ops.ca_crl()
    fresh = ops.ca_crl()
    d.x("crl", "fetch", "--config", ops.cfg("office"), quiet=True)
    for unit in UNITS:
        d.wait_for(f"{unit} fresh again", lambda unit=unit: ops.crl_number(unit) == fresh)


def test_metrics_and_json_logs(ops: Ops) -> None:
    """Off by default; on a local address when configured (a restart). Read by
    prometheus_client's own parser, and the log lines are JSON with the unit and peer."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families
    d = ops.d
    assert "metrics at" not in ops.log("finance")
    port = __import__("demo_network").free_port()
    d.daemons["finance"].terminate()
    d.daemons["finance"].wait(30)
    ops.edit("finance", "[node]\n", '[node]\nlog_format = "json"\n')
    ops.edit("finance", "[pkcs11]", f'[metrics]\nlisten = "127.0.0.1:{port}"\n\n[pkcs11]')
    mark = len(ops.log("finance"))
    with contextlib.redirect_stdout(io.StringIO()):
        d.start("finance")
    ops.delivered("finance", ops.send("finance", "office", "counted"))
    with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert samples[("exchanged_documents_sent_total", (("peer", "office"),))] >= 1
    assert samples[("exchanged_token_present", ())] == 1
    assert samples[("exchanged_crl_number", (("ca", "CN=Demo Root CA"),))] == \
        ops.crl_number("finance")
    assert any(name == "exchanged_certificate_expiry_seconds" and value > 0
               for (name, _), value in samples.items())
    assert ("exchanged_queue_documents", (("peer", "district"),)) in samples
    assert samples[("exchanged_audit_entries", ())] > 0
    with pytest.raises(Exception, match="404"):
        urlopen(f"http://127.0.0.1:{port}/other", timeout=10)
    lines = [json.loads(line) for line in ops.log("finance")[mark:].splitlines()
             if line.startswith("{")]
    assert lines and all(line["unit"] == "finance" and line["level"] for line in lines)
    assert any("listening on" in line["message"] for line in lines)


def test_a_new_connection_resumes_the_tls_session(ops: Ops) -> None:
    """Connections to a peer are kept between rounds and closed after idle_timeout; the next
    one resumes the TLS session of an earlier one (a TLS 1.3 ticket): no certificate is sent
    and neither token signs. finance's status counts its handshakes to office."""
    d = ops.d

    def handshakes() -> dict[str, int]:
        peer = next(p for p in ops.status("finance")[1]["peers"] if p["unit"] == "office")
        return {"full": 0, "resumed": 0, **peer["tls_handshakes"]}

    def closed() -> bool:
        return next(p["connections"] for p in ops.status("finance")[1]["peers"]
                    if p["unit"] == "office") == 0

    ops.edit("finance", "read_timeout = 10", "read_timeout = 10\nidle_timeout = 1")
    d.x("reload", "--config", ops.cfg("finance"), quiet=True)
    try:
        ops.delivered("finance", ops.send("finance", "office", "a session to resume"))
        before = handshakes()
        for i in range(3):
            d.wait_for("finance to close its idle connection to office", closed, timeout=30)
            ops.delivered("finance", ops.send("finance", "office", f"on a resumed session {i}"))
        after = handshakes()
        assert after["resumed"] - before["resumed"] >= 3, (before, after)
        assert after["full"] == before["full"], (before, after)
    finally:
        ops.edit("finance", "read_timeout = 10\nidle_timeout = 1", "read_timeout = 10")
        d.x("reload", "--config", ops.cfg("finance"), quiet=True)


def test_a_revocation_reaches_every_node_with_the_ca_down(ops: Ops) -> None:
    """Last: district's node is revoked. The CA publishes; finance fetches it on its own
    schedule; the CA's host goes down; office has the CRL from finance in their next exchange;
    both refuse district. No file is copied by hand, no command is given to a node."""
    d = ops.d
    ops.edit("finance", "crl_gossip = 5", "crl_gossip = 5\ncrl_refresh = 2")
    for unit in ("finance", "district"):  # connections kept open for the whole test
        ops.edit(unit, "read_timeout = 10", "read_timeout = 10\nidle_timeout = 600")
        d.x("reload", "--config", ops.cfg(unit), quiet=True)
    for a, b in (("finance", "district"), ("district", "finance")):
        ops.delivered(a, ops.send(a, b, f"{a} to {b} before the revocation"))
        assert [p["connections"] for p in ops.status(a)[1]["peers"] if p["unit"] == b] == [1]
    serial = subprocess.run(["openssl", "x509", "-noout", "-serial", "-in",
                             str(d.work / "district-node.pem")], capture_output=True, text=True,
                            check=True).stdout.strip().split("=")[1]
    d.x("ca", "revoke", "--dir", "ca", serial, "--reason", "keyCompromise", *d.op("officer"),
        quiet=True)
    number = ops.ca_crl()
    d.wait_for("finance to fetch it by itself", lambda: ops.crl_number("finance") == number,
               timeout=60)
    ca_server = d.daemons.pop("ca")
    ca_server.terminate()
    ca_server.wait(10)
    d.wait_for("office to have it from finance", lambda: ops.crl_number("office") == number,
               timeout=60)
    rows = subprocess.run(["sqlite3", str(d.work / "office" / "data" / "node.db"),
                           "SELECT details FROM audit WHERE action = 'crl-installed' AND "
                           f"object = '{number}'"], capture_output=True, text=True)
    if rows.returncode == 0:  # the sqlite3 shell is optional here
        assert "peer finance" in rows.stdout
    for unit in ("finance", "office"):
        doc = ops.send(unit, "district", f"{unit} to the revoked district")
        err = d.wait_for(f"{unit} to refuse district", lambda unit=unit, doc=doc: "revoked" in (
            ops.outbox(unit, doc).get("last_error") or ""), timeout=60)
        assert err
    # The connections open before the revocation did not outlive it: finance closed district's
    # at district's next request (a keep-alive ping), and its own to district.
    d.wait_for("finance to close district's kept connection", lambda: re.search(
        r"closing the connection from district: .*revoked", ops.log("finance")), timeout=30)
    assert [p["connections"] for p in ops.status("finance")[1]["peers"]
            if p["unit"] == "district"] == [0]
    late = ops.send("district", "finance", "district, revoked, to finance")
    d.wait_for("district's document to be refused", lambda: ops.outbox(
        "district", late).get("last_error"), timeout=30)
    assert d.item("finance", "inbox", late) == {}
    # The connections opened after the revocation resumed TLS sessions made before it: no
    # certificate crossed the wire, and each side judged the other's from the session, against
    # the CRL held now. finance refused district as a client and as a server all the same.
    for a, b in (("finance", "district"), ("district", "finance")):
        shakes = next(p["tls_handshakes"] for p in ops.status(a)[1]["peers"] if p["unit"] == b)
        assert shakes.get("resumed", 0) >= 1, (a, b, shakes)
