"""The audit log: every kind of tampering is found and located; changes and entries are atomic;
evidence bundles verify offline and with openssl."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CaSetup
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from exchanged.store.audit import AuditLog, entry_hash, verify_rows


def open_log(path: Path) -> tuple[sqlite3.Connection, AuditLog, x509.Certificate]:
    import sqlite_utils
    conn = sqlite3.connect(str(path), isolation_level=None)
    ca_cert = x509.load_pem_x509_certificate((path.parent / "ca.pem").read_bytes())
    return conn, AuditLog(sqlite_utils.Database(conn)), ca_cert


@pytest.fixture
def busy_ca(ca: CaSetup) -> CaSetup:
    _, serial = ca.issue_node()
    ca.cli("ca", "hold", "--dir", ca.dir, serial, *ca.op(1))
    ca.cli("ca", "release", "--dir", ca.dir, serial, *ca.op(2))
    ca.cli("ca", "crl", "--dir", ca.dir, *ca.ca_pin)
    return ca


def tampered_copy(ca: CaSetup, tmp_path: Path, name: str) -> Path:
    d = tmp_path / name
    shutil.copytree(ca.cli.cwd / ca.dir, d)
    return d / "ca.db"


def findings(db: Path) -> list[str]:
    conn, log, cert = open_log(db)
    try:
        return [str(f) for f in log.verify(cert).findings]
    finally:
        conn.close()


def test_untouched_log_verifies(busy_ca: CaSetup) -> None:
    db = busy_ca.cli.cwd / busy_ca.dir / "ca.db"
    assert findings(db) == []
    conn, log, cert = open_log(db)
    report = log.verify(cert)
    assert report.entries > 20 and report.checkpoints >= 4
    conn.close()


def test_each_kind_of_tampering_is_found_and_located(busy_ca: CaSetup, tmp_path: Path) -> None:
    base = busy_ca.cli.cwd / busy_ca.dir / "ca.db"
    conn, log, _ = open_log(base)
    n = log.head()[0]
    conn.close()
    target = n // 2  # an ordinary entry in the middle, before the last checkpoint

    edited = tampered_copy(busy_ca, tmp_path, "edit")
    c = sqlite3.connect(edited)
    c.execute("UPDATE audit SET outcome = 'ok', object = 'nothing' WHERE seq = ?", [target])
    c.commit()
    c.close()
    assert any(f.startswith(f"entry {target}:") and "edited" in f for f in findings(edited))

    deleted = tampered_copy(busy_ca, tmp_path, "delete")
    c = sqlite3.connect(deleted)
    c.execute("DELETE FROM audit WHERE seq = ?", [target])
    c.commit()
    c.close()
    assert any(f.startswith(f"entry {target + 1}:") for f in findings(deleted))

    inserted = tampered_copy(busy_ca, tmp_path, "insert")
    c = sqlite3.connect(inserted)
    rows = c.execute("SELECT * FROM audit WHERE seq >= ? ORDER BY seq DESC", [target]).fetchall()
    for r in rows:  # make room, then forge an entry with a correct-looking own hash
        c.execute("UPDATE audit SET seq = seq + 1 WHERE seq = ?", [r[0]])
    prev = c.execute("SELECT hash FROM audit WHERE seq = ?", [target - 1]).fetchone()[0]
    forged = {"seq": target, "at": "2026-01-01T00:00:00.000000Z", "actor": None,
              "actor_subject": None, "role": None, "action": "certificate-release",
              "object": "x", "outcome": "ok", "details": "{}", "signature": None, "prev": prev}
    c.execute("INSERT INTO audit VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
              [*forged.values(), entry_hash(forged)])
    c.commit()
    c.close()
    assert any(f.startswith(f"entry {target + 1}:") and "link" in f for f in findings(inserted))

    swapped = tampered_copy(busy_ca, tmp_path, "swap")
    c = sqlite3.connect(swapped)
    c.execute("UPDATE audit SET seq = -1 WHERE seq = ?", [target])
    c.execute("UPDATE audit SET seq = ? WHERE seq = ?", [target, target + 1])
    c.execute("UPDATE audit SET seq = ? WHERE seq = -1", [target + 1])
    c.commit()
    c.close()
    assert any(f.startswith(f"entry {target}:") for f in findings(swapped))

    cut = tampered_copy(busy_ca, tmp_path, "truncate")
    c = sqlite3.connect(cut)
    c.execute("DELETE FROM audit WHERE seq > ?", [target])
    c.commit()
    c.close()
    assert any("truncated" in f for f in findings(cut))


def test_a_chain_rewritten_without_the_token_is_found(busy_ca: CaSetup, tmp_path: Path) -> None:
    """The forger recomputes every hash and re-signs checkpoints with a key of their own."""
    db = tampered_copy(busy_ca, tmp_path, "rewrite")
    c = sqlite3.connect(db)
    c.row_factory = sqlite3.Row
    rows = [dict(r) for r in c.execute("SELECT * FROM audit ORDER BY seq")]
    forger = ec.generate_private_key(ec.SECP256R1())
    from exchanged.store.audit import checkpoint_message
    prev = "0" * 64
    for r in rows:
        if r["action"] == "certificate-hold":
            r["object"] = "someone-else"
        r["prev"] = prev
        if r["action"] == "checkpoint":
            r["details"] = json.dumps({"head": prev, "signer_sha256": "x"})
            r["signature"] = forger.sign(checkpoint_message(r["seq"], r["at"], prev),
                                         ec.ECDSA(hashes.SHA256()))
        r["hash"] = entry_hash(r)
        prev = r["hash"]
        c.execute("UPDATE audit SET object=?, prev=?, details=?, signature=?, hash=? "
                  "WHERE seq=?", [r["object"], r["prev"], r["details"], r["signature"],
                                  r["hash"], r["seq"]])
    c.commit()
    c.close()
    found = findings(db)
    # Every checkpoint fails its signature; the recorded head is no signed checkpoint either.
    assert found and all("checkpoint signature does not verify" in f or "recorded head" in f
                         for f in found)
    assert found[0].startswith("entry 1:")


def test_a_log_without_any_checkpoint_is_not_trusted() -> None:
    from exchanged.store.audit import GENESIS_PREV
    row = {"seq": 1, "at": "t", "actor": None, "actor_subject": None, "role": None,
           "action": "x", "object": "", "outcome": "ok", "details": "{}", "signature": None,
           "prev": GENESIS_PREV}
    row["hash"] = entry_hash(row)
    cert_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([])
    import datetime as dt
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(cert_key.public_key()).serial_number(1)
            .not_valid_before(dt.datetime(2020, 1, 1)).not_valid_after(dt.datetime(2030, 1, 1))
            .sign(cert_key, hashes.SHA256()))
    report = verify_rows([row], cert)
    assert not report.ok and "no signed checkpoint" in str(report.findings[0])


def test_the_cli_reports_tampering_to_the_auditor(busy_ca: CaSetup) -> None:
    c = sqlite3.connect(busy_ca.cli.cwd / busy_ca.dir / "ca.db")
    c.execute("UPDATE audit SET actor_subject = 'CN=Nobody' WHERE seq = 5")
    c.commit()
    c.close()
    r = busy_ca.cli("audit", "verify", "--dir", busy_ca.dir, *busy_ca.auditor, ok=False)
    assert "tampered" in r.err and "entry 5" in r.err


def test_audit_tools_are_refused_to_everyone_but_the_auditor(ca: CaSetup,
                                                            tmp_path: Path) -> None:
    for who in (ca.admin, ca.op(1), ca.op(2)):
        for cmd in (["show"], ["verify"], ["export", "--out", str(tmp_path / "b")]):
            r = ca.cli("audit", cmd[0], "--dir", ca.dir, *cmd[1:], *who, ok=False)
            assert "not an active auditor" in r.err
    # Every use by the auditor is on the record too.
    ca.cli("audit", "show", "--dir", ca.dir, *ca.auditor)
    assert ca.audit("WHERE action = 'audit-show'")


def test_refusals_and_failed_pins_are_audited(ca: CaSetup, tmp_path: Path) -> None:
    wrong = tmp_path / "pin"
    wrong.write_text("000000\n")
    wrong.chmod(0o600)
    ca.cli("ca", "hold", "--dir", ca.dir, "abc", "--operator",
           f"pkcs11:token=officer1;object=off-{ca.tag}", "--operator-pin-file", str(wrong),
           ok=False)
    last = ca.audit()[-1]
    assert last[1] == "ca-hold-login-failed" and last[3] == "refused"
    assert "wrong-pin" in last[5]


def test_changes_and_entries_commit_together(ca: CaSetup, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    """A failure after the entry is written but before the change completes leaves neither."""
    from exchanged import ca as camod
    from exchanged.pki.operator import Operator
    from exchanged.pki.pin import PinSource
    from exchanged.pki.token import Token
    from exchanged.pki.uri import parse
    from exchanged.store import cadb

    _, serial = ca.issue_node()
    before_state, before_audit = ca.db_dump(), ca.audit()
    authority = camod.CA(ca.cli.cwd / ca.dir)
    tok = Token.open(parse("pkcs11:token=officer1"), PinSource("t", "X",
                                                               ca.cli.tokens.pin("officer1")))
    op = Operator.from_token(tok.key(label=f"off-{ca.tag}"))

    real_insert = cadb.insert

    def boom(db: object, table: str, values: dict[str, object]) -> int:
        if table == "status_changes":  # after the certificate's new status and its entry
            raise OSError("disk full")
        return real_insert(db, table, values)  # type: ignore[arg-type]

    monkeypatch.setattr(cadb, "insert", boom)
    with pytest.raises(OSError):
        authority.hold(serial, op)
    tok.close()
    authority.close()
    assert ca.db_dump() == before_state and ca.audit() == before_audit


def test_kill_at_random_moments_never_splits_a_change_from_its_entry(ca: CaSetup) -> None:
    """SIGKILL `exchanged ca hold/release` at random moments; afterwards every status change
    has its audit entry and every entry its change, and the chain verifies."""
    _, serial = ca.issue_node()
    rng = random.Random(7)
    killed = finished = 0
    # How long one act takes on this machine now (a loaded machine is slower): the kills fall
    # between a tenth of that and a little past it, so that both outcomes happen.
    start = time.monotonic()
    ca.cli("ca", "hold", "--dir", ca.dir, serial, *ca.op(1))
    took = time.monotonic() - start
    finished += 1
    for i in range(12):
        state = json.loads(ca.cli("ca", "list", "--dir", ca.dir, "--json").out)
        status = next(c["status"] for c in state if c["serial"] == serial)
        action = "release" if status == "held" else "hold"
        p = subprocess.Popen([sys.executable, "-m", "exchanged", "ca", action, "--dir", ca.dir,
                              serial, *ca.op(1 + i % 2)], cwd=ca.cli.cwd, env=ca.cli.env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.1, 1.3) * took)
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            killed += 1
        elif p.returncode == 0:
            finished += 1
        p.wait()
    assert killed and finished, (killed, finished)  # both outcomes were exercised
    conn = sqlite3.connect(ca.cli.cwd / ca.dir / "ca.db")
    changes = conn.execute("SELECT action, seq FROM status_changes WHERE serial = ?",
                           [serial]).fetchall()
    entries = conn.execute("SELECT seq, action FROM audit WHERE object = ? AND action IN "
                           "('certificate-hold', 'certificate-release')", [serial]).fetchall()
    conn.close()
    assert {s for _, s in changes} == {s for s, _ in entries}
    assert [f"certificate-{a}" for a, _ in sorted(changes, key=lambda c: c[1])] == \
        [a for _, a in sorted(entries)]
    ca.cli("audit", "verify", "--dir", ca.dir, *ca.auditor)


def test_evidence_bundle_verifies_offline_and_with_openssl(busy_ca: CaSetup,
                                                           tmp_path: Path) -> None:
    ca = busy_ca
    serial = next(c["serial"] for c in json.loads(ca.cli("ca", "list", "--dir", ca.dir,
                                                         "--json").out)
                  if c["profile"] == "node")
    bundle = tmp_path / "matter"
    ca.cli("audit", "export", "--dir", ca.dir, "--object", serial, "--out", str(bundle),
           *ca.auditor)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert len(manifest["matter"]) >= 3  # issue, hold, release
    r = ca.cli("audit", "verify", str(bundle), "--ca", str(ca.cli.cwd / ca.dir / "ca.pem"))
    assert "OK" in r.out
    checked = 0
    for sig in (bundle / "openssl").glob("*.cms.der"):
        seq = sig.name.split(".")[0]
        p = subprocess.run(["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in",
                            str(sig), "-content", str(bundle / "openssl" / f"{seq}.json"),
                            "-CAfile", str(bundle / "signer.pem"), "-purpose", "any",
                            "-out", "/dev/null"], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        checked += 1
    for sig in (bundle / "openssl").glob("cp-*.sig"):
        p = subprocess.run(["openssl", "dgst", "-sha256", "-verify",
                            str(bundle / "openssl" / "signer-pubkey.pem"), "-signature",
                            str(sig), str(sig.with_suffix(".msg"))], capture_output=True,
                           text=True)
        assert "Verified OK" in p.stdout, p.stderr
        checked += 1
    assert checked >= 4
    # An edited bundle fails.
    lines = (bundle / "entries.jsonl").read_text().splitlines()
    row = json.loads(lines[0])
    row["outcome"] = "refused"
    lines[0] = json.dumps(row)
    (bundle / "entries.jsonl").write_text("\n".join(lines) + "\n")
    r = ca.cli("audit", "verify", str(bundle), ok=False)
    assert "tampered" in r.err


def test_columns_rewritten_to_another_type_are_findings_not_crashes(busy_ca: CaSetup,
                                                                    tmp_path: Path) -> None:
    """Regression: a checkpoint whose details were not JSON, or a signature stored as text,
    crashed `audit verify` instead of naming the entry."""
    db = tampered_copy(busy_ca, tmp_path, "types")
    c = sqlite3.connect(db)
    cp = c.execute("SELECT seq FROM audit WHERE action = 'checkpoint' ORDER BY seq DESC "
                   "LIMIT 1 OFFSET 1").fetchone()[0]
    c.execute("UPDATE audit SET details = 'not json' WHERE seq = ?", [cp])
    signed = c.execute("SELECT seq FROM audit WHERE signature IS NOT NULL AND action != "
                       "'checkpoint' LIMIT 1").fetchone()[0]
    c.execute("UPDATE audit SET signature = 'text' WHERE seq = ?", [signed])
    c.commit()
    c.close()
    found = findings(db)
    assert any(f.startswith(f"entry {cp}:") for f in found), found
    assert any(f.startswith(f"entry {signed}:") for f in found), found
