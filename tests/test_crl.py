"""CRLs written to DER by hand: byte-identical to cryptography's encoding, verified by openssl."""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path

from conftest import Tokens, uid
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from exchanged.pki import crl, profiles
from exchanged.pki.pin import PinSource
from exchanged.pki.token import Token
from exchanged.pki.uri import parse

T0 = dt.datetime(2026, 11, 25, 12, 0, 0, tzinfo=dt.UTC)


def software_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "CRL test CA")])
    cert = profiles.ca_root(name=name, public_key=key.public_key(), not_before=T0,
                            days=365).sign(key, hashes.SHA256())
    return key, cert


def entries() -> list[crl.Entry]:
    out = [crl.Entry(serial=(i + 1) * 0x1F3D5B7 + (1 << 150), revoked_at=T0 -
                     dt.timedelta(minutes=i), reason=reason)
           for i, reason in enumerate([None, *crl.REASONS])]
    out.append(crl.Entry(serial=127, revoked_at=dt.datetime(2051, 1, 2, 3, 4, 5,
                                                              tzinfo=dt.UTC), reason="superseded"))
    out.append(crl.Entry(serial=128, revoked_at=T0, reason="keyCompromise"))
    return out


def test_tbs_is_byte_identical_to_cryptographys_builder() -> None:
    key, ca = software_ca()
    b = (x509.CertificateRevocationListBuilder().issuer_name(ca.subject)
         .last_update(T0).next_update(T0 + dt.timedelta(days=7))
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
             ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value), False)
         .add_extension(x509.CRLNumber(42), False))
    for e in entries():
        rb = (x509.RevokedCertificateBuilder().serial_number(e.serial)
              .revocation_date(e.revoked_at))
        if e.reason and e.reason != "unspecified":
            rb = rb.add_extension(x509.CRLReason(x509.ReasonFlags[_flag(e.reason)]), False)
        b = b.add_revoked_certificate(rb.build())
    theirs = b.sign(key, hashes.SHA256()).tbs_certlist_bytes
    ours = crl.tbs_cert_list(issuer=ca, entries=entries(), number=42, this_update=T0,
                             next_update=T0 + dt.timedelta(days=7),
                             algorithm=crl._ALG_ECDSA_SHA256)
    assert ours == theirs


def _flag(reason: str) -> str:
    return {"keyCompromise": "key_compromise", "cACompromise": "ca_compromise",
            "affiliationChanged": "affiliation_changed", "superseded": "superseded",
            "cessationOfOperation": "cessation_of_operation",
            "certificateHold": "certificate_hold", "removeFromCRL": "remove_from_crl",
            "privilegeWithdrawn": "privilege_withdrawn", "aACompromise": "aa_compromise",
            "unspecified": "unspecified"}[reason]


def test_signed_on_the_token_and_verified_by_openssl(tokens: Tokens, tmp_path: Path) -> None:
    with Token.open(parse("pkcs11:token=ca"), PinSource("CA", "X", tokens.pin("ca"))) as t:
        key = t.generate_keypair(f"crl-{uid()}")
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Token CRL CA")])
        ca = profiles.ca_root(name=name, public_key=key.public_key, not_before=T0,
                              days=365).sign(key.signer(), hashes.SHA256())
        many = [crl.Entry(serial=(1 << 100) + i, revoked_at=T0, reason="keyCompromise")
                for i in range(5000)] + entries()
        der = crl.build(key=key, issuer=ca, entries=many, number=7, this_update=T0,
                        next_update=T0 + dt.timedelta(days=1))
        empty = crl.build(key=key, issuer=ca, entries=[], number=8, this_update=T0,
                          next_update=T0 + dt.timedelta(days=1))
    parsed = x509.load_der_x509_crl(der)
    assert parsed.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    assert parsed.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 7
    assert len(parsed) == len(many)
    held = parsed.get_revoked_certificate_by_serial_number(entries()[7].serial)
    assert held is not None
    assert held.extensions.get_extension_for_class(x509.CRLReason).value.reason == \
        x509.ReasonFlags.certificate_hold
    assert len(x509.load_der_x509_crl(empty)) == 0
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name_, data in (("big.crl", der), ("empty.crl", empty)):
        (tmp_path / name_).write_bytes(data)
        p = subprocess.run(["openssl", "crl", "-verify", "-noout", "-inform", "DER", "-in",
                            str(tmp_path / name_), "-CAfile", str(tmp_path / "ca.pem")],
                           capture_output=True, text=True)
        assert p.returncode == 0 and "verify OK" in p.stdout + p.stderr, p.stderr


def test_rsa_ca_crl_verifies(tokens: Tokens, tmp_path: Path) -> None:
    with Token.open(parse("pkcs11:token=ca"), PinSource("CA", "X", tokens.pin("ca"))) as t:
        key = t.generate_keypair(f"crl-rsa-{uid()}", key_type="rsa", bits=3072)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "RSA CA")])
        ca = profiles.ca_root(name=name, public_key=key.public_key, not_before=T0,
                              days=365).sign(key.signer(), hashes.SHA256())
        der = crl.build(key=key, issuer=ca, entries=entries(), number=1, this_update=T0,
                        next_update=T0 + dt.timedelta(days=1))
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "c.crl").write_bytes(der)
    p = subprocess.run(["openssl", "crl", "-verify", "-noout", "-inform", "DER", "-in",
                        str(tmp_path / "c.crl"), "-CAfile", str(tmp_path / "ca.pem")],
                       capture_output=True, text=True)
    assert "verify OK" in p.stdout + p.stderr, p.stderr
