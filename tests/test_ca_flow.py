"""The CA's life cycle through the CLI: signed officer actions, re-issue, CRL contents, secrets."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import subprocess
from pathlib import Path

from conftest import CaSetup
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from exchanged.pki import profiles


def openssl(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)


def test_every_officer_action_is_signed_and_openssl_verifies_it(ca: CaSetup) -> None:
    _, serial = ca.issue_node()
    ca.cli("ca", "hold", "--dir", ca.dir, serial, *ca.op(2), "--note", "lost")
    ca.cli("ca", "release", "--dir", ca.dir, serial, *ca.op(1))
    ca.cli("ca", "revoke", "--dir", ca.dir, serial, "--reason", "cessationOfOperation",
           *ca.op(2))
    work = ca.cli.cwd
    conn = sqlite3.connect(str(work / ca.dir / "ca.db"))
    actions = conn.execute("SELECT seq, action, object, details, signature FROM audit "
                           "WHERE signature IS NOT NULL AND action != 'checkpoint'").fetchall()
    kinds = [a[1] for a in actions]
    for expected in ("role-bootstrap", "role-grant", "role-approve", "request-approve",
                     "certificate-issue", "certificate-hold", "certificate-release",
                     "certificate-revoke"):
        assert expected in kinds
    for _seq, action, obj, payload, sig in actions:
        (work / "p").write_bytes(payload.encode())
        (work / "s.der").write_bytes(sig)
        p = openssl("cms", "-verify", "-binary", "-inform", "DER", "-in", "s.der", "-content",
                    "p", "-CAfile", f"{ca.dir}/ca.pem", "-purpose", "any", "-out", "/dev/null",
                    cwd=work)
        assert p.returncode == 0, (action, p.stderr)
        assert json.loads(payload)["action"] == action and json.loads(payload)["object"] == obj
        # The signature binds the payload: one changed character and openssl refuses it.
        (work / "p").write_bytes(payload.replace(action, action.upper()).encode())
        p = openssl("cms", "-verify", "-binary", "-inform", "DER", "-in", "s.der", "-content",
                    "p", "-CAfile", f"{ca.dir}/ca.pem", "-purpose", "any", "-out", "/dev/null",
                    cwd=work)
        assert p.returncode != 0
    changes = conn.execute("SELECT action, officer_serial FROM status_changes "
                           "WHERE serial = ? ORDER BY id", [serial]).fetchall()
    assert [c[0] for c in changes] == ["hold", "release", "revoke"]
    assert changes[0][1] != changes[1][1]  # two different officers, each on record


def test_reissue_on_change_of_post_supersedes_the_old_certificate(ca: CaSetup) -> None:
    key = ca.key("person")
    csr = ca.csr(key, "person", profile="person", name="Zhao Min", unit="Finance Bureau")
    rid = ca.submit(csr, profile="person", name="Zhao Min", unit="Finance Bureau")
    ca.cli("ca", "request", "approve", "--dir", ca.dir, str(rid), *ca.op(1))
    ca.cli("ca", "issue", "--dir", ca.dir, str(rid), *ca.op(1), *ca.ca_pin, "-o", "old.pem")
    old = x509.load_pem_x509_certificate((ca.cli.cwd / "old.pem").read_bytes())
    new_key = ca.key("person")
    csr2 = ca.csr(new_key, "person", profile="person", name="Zhao Min", unit="Finance Bureau")
    # A29: one officer asks for the re-issue, another reviews it; then it is issued.
    rid2 = json.loads(ca.cli("ca", "reissue", "--dir", ca.dir, format(old.serial_number, "x"),
                             "--csr", csr2, "--post", "Deputy Director", "--division",
                             "Budget", *ca.op(2), "--json").out)["id"]
    ca.cli("ca", "request", "approve", "--dir", ca.dir, str(rid2), *ca.op(2), ok=False)
    ca.cli("ca", "request", "approve", "--dir", ca.dir, str(rid2), *ca.op(1))
    ca.cli("ca", "issue", "--dir", ca.dir, str(rid2), *ca.op(1), *ca.ca_pin, "-o", "new.pem")
    new = x509.load_pem_x509_certificate((ca.cli.cwd / "new.pem").read_bytes())
    assert "Deputy Director" in new.subject.rfc4514_string()
    from exchanged.pki.names import person_of
    assert person_of(new.subject) == person_of(old.subject) != ""  # the same person
    assert "OU=Budget" in new.subject.rfc4514_string()
    listed = {c["serial"]: c for c in json.loads(ca.cli("ca", "list", "--dir", ca.dir,
                                                        "--json").out)}
    assert listed[format(old.serial_number, "x")]["status"] == "revoked"
    assert listed[format(old.serial_number, "x")]["reason"] == "superseded"
    assert listed[format(new.serial_number, "x")]["status"] == "good"
    ca.cli("ca", "crl", "--dir", ca.dir, *ca.ca_pin)
    crl = x509.load_der_x509_crl((ca.cli.cwd / ca.dir / "ca.crl").read_bytes())
    entry = crl.get_revoked_certificate_by_serial_number(old.serial_number)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == \
        x509.ReasonFlags.superseded


def test_officer_cannot_reissue_their_own_certificate(ca: CaSetup) -> None:
    li = [c for c in json.loads(ca.cli("ca", "list", "--dir", ca.dir, "--json").out)
          if "Li Wei" in c["subject"]][0]
    csr = ca.csr(ca.key("person"), "person", profile="person", name="Li Wei",
                 unit="General Office")
    r = ca.cli("ca", "reissue", "--dir", ca.dir, li["serial"], "--csr", csr, "--post", "Chief",
               *ca.op(2), ok=False)
    assert "another security officer" in r.err


def test_issued_certificates_follow_the_profile_not_the_csr(ca: CaSetup) -> None:
    pem_path, _ = ca.issue_node("node-p")
    cert = x509.load_pem_x509_certificate((ca.cli.cwd / pem_path).read_bytes())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign and not ku.crl_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {o.dotted_string for o in eku} == {"1.3.6.1.5.5.7.3.1", "1.3.6.1.5.5.7.3.2"}
    assert 64 <= cert.serial_number.bit_length() <= 159
    assert "O=Finance Bureau" in cert.subject.rfc4514_string()
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_cert = x509.load_pem_x509_certificate((ca.cli.cwd / ca.dir / "ca.pem").read_bytes())
    assert aki.key_identifier == ca_cert.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier).value.digest
    p = openssl("verify", "-CAfile", f"{ca.dir}/ca.pem", "-purpose", "sslserver", pem_path,
                cwd=ca.cli.cwd)
    assert p.returncode == 0, p.stderr


def test_no_pin_reaches_the_database_or_the_config(ca: CaSetup) -> None:
    ca.issue_node()
    blobs = b"".join(p.read_bytes() for p in (ca.cli.cwd / ca.dir).rglob("*") if p.is_file())
    for label in ("ca", "officer1", "officer2", "node"):
        pin = Path(ca.cli.tokens.pin(label)).read_text().strip().encode()
        assert pin not in blobs, f"the {label} PIN was written into the CA directory"


def test_crl_numbers_increase_and_list_held_and_revoked(ca: CaSetup) -> None:
    _, s1 = ca.issue_node("n1")
    _, s2 = ca.issue_node("n2")
    ca.cli("ca", "hold", "--dir", ca.dir, s1, *ca.op(1))
    ca.cli("ca", "revoke", "--dir", ca.dir, s2, "--reason", "affiliationChanged", *ca.op(1))
    ca.cli("ca", "crl", "--dir", ca.dir, *ca.ca_pin, "--hours", "2")
    first = x509.load_der_x509_crl((ca.cli.cwd / ca.dir / "ca.crl").read_bytes())
    ca.cli("ca", "crl", "--dir", ca.dir, *ca.ca_pin)
    second = x509.load_der_x509_crl((ca.cli.cwd / ca.dir / "ca.crl").read_bytes())
    n1 = first.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    n2 = second.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert n2 == n1 + 1
    assert (first.next_update_utc - first.last_update_utc).total_seconds() == 7200
    reasons = {format(r.serial_number, "x"): r.extensions.get_extension_for_class(
        x509.CRLReason).value.reason for r in second}
    assert reasons == {s1: x509.ReasonFlags.certificate_hold,
                       s2: x509.ReasonFlags.affiliation_changed}


def test_cert_verify_names_the_reason(ca: CaSetup, tmp_path: Path) -> None:
    pem_path, _ = ca.issue_node("node-v")
    cert = x509.load_pem_x509_certificate((ca.cli.cwd / pem_path).read_bytes())
    base = ["cert", "verify", pem_path, "--ca", f"{ca.dir}/ca.pem", "--crl", f"{ca.dir}/ca.crl"]
    assert json.loads(ca.cli(*base, "--purpose", "node", "--json").out)["ok"] is True
    early = (cert.not_valid_before_utc - dt.timedelta(seconds=1)).isoformat()
    assert "is not valid before" in ca.cli(*base, "--at", early, ok=False).err
    late = (cert.not_valid_after_utc + dt.timedelta(seconds=1)).isoformat()
    r = ca.cli("cert", "verify", pem_path, "--ca", f"{ca.dir}/ca.pem", "--no-crl-check",
               "--at", late, ok=False)
    assert "expired" in r.err
    assert "lacks nonRepudiation" in ca.cli(*base, "--purpose", "person", ok=False).err
    r = ca.cli("cert", "verify", pem_path, "--ca", f"{ca.dir}/ca.pem", ok=False)
    assert "CRL" in r.err and r.err.count("\n") == 1
    k = ec.generate_private_key(ec.SECP256R1())
    other_ca = profiles.ca_root(
        name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Another CA")]),
        public_key=k.public_key(), not_before=dt.datetime.now(dt.UTC), days=10,
    ).sign(k, hashes.SHA256())
    (tmp_path / "other.pem").write_bytes(other_ca.public_bytes(serialization.Encoding.PEM))
    r = ca.cli("cert", "verify", pem_path, "--ca", str(tmp_path / "other.pem"),
               "--no-crl-check", ok=False)
    assert "issuer" in r.err
