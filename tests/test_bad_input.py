"""Bad input gets one clear line on stderr, a non-zero exit, and leaves the CA as it was."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import CaSetup, Result
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID


def refused(ca: CaSetup, fn: Callable[[], Result], *words: str) -> Result:
    """The command fails with one line naming the problem; the CA's state is unchanged; the
    refusal itself is the one new entry of the audit log."""
    before = ca.db_dump()
    audit_before = ca.audit()
    r = fn()
    assert r.rc != 0
    lines = r.err.strip().splitlines()
    assert len(lines) == 1, r.err
    assert lines[0].startswith("exchanged: error: "), r.err
    for w in words:
        assert w in lines[0], lines[0]
    assert ca.db_dump() == before, "a refused operation changed the CA database"
    new = ca.audit()[len(audit_before):]
    if new:  # commands that never reach a CA (usage errors) leave nothing
        assert len(new) == 1 and new[0][3] == "refused", new
    return r


def software_csr(path: Path, key: object, *, ca_true: bool = False,
                 extra: x509.ExtensionType | None = None) -> str:
    b = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
    if ca_true:
        b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    if extra is not None:
        b = b.add_extension(extra, critical=False)
    csr = b.sign(key, hashes.SHA256())  # type: ignore[arg-type]
    path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    return str(path)


def submit(ca: CaSetup, csr: str) -> Callable[[], Result]:
    return lambda: ca.cli("ca", "request", "submit", "--dir", ca.dir, "--csr", csr, "--profile",
                          "node", "--name", "n", "--unit", "u", ok=None)


def test_malformed_csr(ca: CaSetup, tmp_path: Path) -> None:
    bad = tmp_path / "bad.csr"
    bad.write_bytes(b"-----BEGIN CERTIFICATE REQUEST-----\nnot base64 at all\n"
                    b"-----END CERTIFICATE REQUEST-----\n")
    refused(ca, submit(ca, str(bad)), "not a valid PKCS#10 request")
    (tmp_path / "junk.der").write_bytes(b"\x30\x03\x02\x01")
    refused(ca, submit(ca, str(tmp_path / "junk.der")), "not a valid PKCS#10 request")


def test_csr_with_bad_signature(ca: CaSetup, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    good = x509.load_pem_x509_csr(Path(software_csr(tmp_path / "g.csr", key)).read_bytes())
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # inside the signature value
    (tmp_path / "b.csr").write_bytes(bytes(der))
    refused(ca, submit(ca, str(tmp_path / "b.csr")), "signature does not verify")


def test_weak_rsa_key(ca: CaSetup, tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    refused(ca, submit(ca, software_csr(tmp_path / "w.csr", key)), "1024 bits", "2048")


def test_unknown_curve(ca: CaSetup, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256K1())
    refused(ca, submit(ca, software_csr(tmp_path / "k.csr", key)), "secp256k1")


def test_csr_asking_for_ca_true(ca: CaSetup, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    refused(ca, submit(ca, software_csr(tmp_path / "ca.csr", key, ca_true=True)), "CA:TRUE")


def test_csr_asking_for_extra_extension(ca: CaSetup, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    ext = x509.NameConstraints(permitted_subtrees=[x509.DNSName("example.com")],
                               excluded_subtrees=None)
    refused(ca, submit(ca, software_csr(tmp_path / "e.csr", key, extra=ext)),
            "the profile, not the request, decides")


def test_wrong_pin(ca: CaSetup, tmp_path: Path) -> None:
    csr = ca.csr(ca.key("node"), "node")
    rid = ca.submit(csr)
    wrong = tmp_path / "wrong.pin"
    wrong.write_text("000000\n")
    wrong.chmod(0o600)
    refused(ca, lambda: ca.cli("ca", "request", "approve", "--dir", ca.dir, str(rid),
                               "--operator", f"pkcs11:token=officer1;object=off-{ca.tag}",
                               "--operator-pin-file", str(wrong), ok=None), "wrong PIN")


def test_pin_file_readable_by_all_is_refused(ca: CaSetup, tmp_path: Path) -> None:
    loose = tmp_path / "loose.pin"
    loose.write_text(Path(ca.cli.tokens.pin("officer1")).read_text())
    loose.chmod(0o644)
    rid = ca.submit(ca.csr(ca.key("node"), "node"))
    refused(ca, lambda: ca.cli("ca", "request", "approve", "--dir", ca.dir, str(rid),
                               "--operator", f"pkcs11:token=officer1;object=off-{ca.tag}",
                               "--operator-pin-file", str(loose), ok=None), "chmod")


def test_pin_value_in_uri_is_refused(ca: CaSetup) -> None:
    refused(ca, lambda: ca.cli("ca", "hold", "--dir", ca.dir, "abcd", "--operator",
                               f"pkcs11:token=officer1;object=off-{ca.tag}?pin-value=1234",
                               ok=None), "pin-value")


def test_unknown_token(ca: CaSetup) -> None:
    refused(ca, lambda: ca.cli("ca", "hold", "--dir", ca.dir, "abcd", "--operator",
                               "pkcs11:token=no-such-token;object=x", "--operator-pin-file",
                               ca.cli.tokens.pin("officer1"), ok=None),
            "no token matches token=no-such-token")


def test_unknown_serial(ca: CaSetup) -> None:
    refused(ca, lambda: ca.cli("ca", "hold", "--dir", ca.dir, "deadbeef", *ca.op(1), ok=None),
            "no certificate with serial deadbeef")
    refused(ca, lambda: ca.cli("ca", "hold", "--dir", ca.dir, "not-hex", *ca.op(1), ok=None),
            "not a certificate serial")


def test_revoking_twice_and_releasing_a_revoked_certificate(ca: CaSetup) -> None:
    _, serial = ca.issue_node()
    ca.cli("ca", "revoke", "--dir", ca.dir, serial, "--reason", "keyCompromise", *ca.op(1))
    refused(ca, lambda: ca.cli("ca", "revoke", "--dir", ca.dir, serial, "--reason",
                               "superseded", *ca.op(1), ok=None), "already revoked")
    refused(ca, lambda: ca.cli("ca", "release", "--dir", ca.dir, serial, *ca.op(2), ok=None),
            "already revoked")
    refused(ca, lambda: ca.cli("ca", "hold", "--dir", ca.dir, serial, *ca.op(2), ok=None),
            "already revoked")


def test_release_of_a_good_certificate_and_double_hold(ca: CaSetup) -> None:
    _, serial = ca.issue_node()
    refused(ca, lambda: ca.cli("ca", "release", "--dir", ca.dir, serial, *ca.op(1), ok=None),
            "not on hold")
    ca.cli("ca", "hold", "--dir", ca.dir, serial, *ca.op(1))
    refused(ca, lambda: ca.cli("ca", "hold", "--dir", ca.dir, serial, *ca.op(1), ok=None),
            "already on hold")


def test_issuing_an_unapproved_request(ca: CaSetup) -> None:
    rid = ca.submit(ca.csr(ca.key("node"), "node"))
    refused(ca, lambda: ca.cli("ca", "issue", "--dir", ca.dir, str(rid), *ca.op(1),
                               *ca.ca_pin, ok=None), "only an approved request is issued")
    ca.cli("ca", "request", "reject", "--dir", ca.dir, str(rid), *ca.op(1), "--reason",
           "no letter from the unit head")
    refused(ca, lambda: ca.cli("ca", "issue", "--dir", ca.dir, str(rid), *ca.op(1),
                               *ca.ca_pin, ok=None), "rejected")
    refused(ca, lambda: ca.cli("ca", "request", "approve", "--dir", ca.dir, str(rid),
                               *ca.op(2), ok=None), "not pending")


def test_self_approval_by_name(ca: CaSetup) -> None:
    # Officer Li Wei applies for a personal certificate by form (no signed submission).
    csr = ca.csr(ca.key("person"), "person", profile="person", name="Li Wei",
                 unit="General Office")
    rid = ca.submit(csr, profile="person", name="Li Wei", unit="General Office")
    refused(ca, lambda: ca.cli("ca", "request", "approve", "--dir", ca.dir, str(rid),
                               *ca.op(2), ok=None), "another security officer")
    ca.cli("ca", "request", "approve", "--dir", ca.dir, str(rid), *ca.op(1))


def test_unknown_request_and_missing_ca(ca: CaSetup, tmp_path: Path) -> None:
    refused(ca, lambda: ca.cli("ca", "request", "show", "--dir", ca.dir, "999", ok=None),
            "no request 999")
    r = ca.cli("ca", "list", "--dir", str(tmp_path / "nowhere"), ok=False)
    assert r.err.count("\n") == 1 and "ca init" in r.err


def test_held_officer_cannot_act(ca: CaSetup) -> None:
    li = ca.serial_of("Li Wei")
    ca.cli("ca", "hold", "--dir", ca.dir, li, *ca.op(1))
    rid = ca.submit(ca.csr(ca.key("node"), "node"))
    refused(ca, lambda: ca.cli("ca", "request", "approve", "--dir", ca.dir, str(rid),
                               *ca.op(2), ok=None), "held")


@pytest.mark.parametrize("argv", [["ca"], ["token", "keygen"], ["cert", "verify"]])
def test_usage_errors_exit_2(ca: CaSetup, argv: list[str]) -> None:
    r = ca.cli(*argv, ok=False)
    assert r.rc == 2 and "usage:" in r.err
