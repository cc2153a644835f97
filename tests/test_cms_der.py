"""The strict-DER check of CMS signatures (pki/cms.der_problem): every way a BER encoding can
differ from DER is refused, and what was accepted before (asn1crypto's re-encoding equal to
the input) still is. The walker replaced that re-encoding because it cost 0.75 ms per
receipt, twice per receipt checked."""

from __future__ import annotations

import datetime as dt

import pytest
from asn1crypto import cms as acms
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from exchanged.pki.cms import CmsError, cms_content, der_problem, verify_attached

NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node-test"),
                  x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test Unit")])


@pytest.fixture(scope="module")
def signed() -> tuple[bytes, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(NAME).issuer_name(NAME)
            .public_key(key.public_key()).serial_number(7)
            .not_valid_before(dt.datetime(2026, 1, 1)).not_valid_after(dt.datetime(2027, 1, 1))
            .sign(key, hashes.SHA256()))
    sig = (pkcs7.PKCS7SignatureBuilder().set_data(b'{"kind":"delivery"}')
           .add_signer(cert, key, hashes.SHA256())
           .sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary]))
    return sig, cert


def old_check(data: bytes) -> bool:
    """What _load compared before: asn1crypto's re-encoding equals the input."""
    try:
        return bool(acms.ContentInfo.load(data, strict=True).dump(force=True) == data)
    except (ValueError, TypeError, KeyError, OverflowError):
        return False


def test_a_real_signature_is_der_and_verifies(signed: tuple[bytes, x509.Certificate]) -> None:
    sig, cert = signed
    assert der_problem(sig) is None and old_check(sig)
    signer, content = verify_attached(sig, cert)
    assert signer == cert and content == b'{"kind":"delivery"}'


def _long_form_outer(sig: bytes) -> bytes:
    """The outer SEQUENCE's length with one more length byte than needed."""
    assert sig[1] == 0x82  # two length bytes for a signature of some hundred bytes
    return sig[:1] + b"\x83\x00" + sig[2:]


def _indefinite_outer(sig: bytes) -> bytes:
    assert sig[1] == 0x82
    return sig[:1] + b"\x80" + sig[4:] + b"\x00\x00"


@pytest.mark.parametrize("mutate, why", [
    (lambda s: s + b"\x00", "after the signature"),
    (_long_form_outer, "shortest form"),
    (_indefinite_outer, "indefinite length"),
])
def test_ber_forms_of_a_real_signature_are_refused(signed: tuple[bytes, x509.Certificate],
                                                   mutate, why: str) -> None:  # type: ignore[no-untyped-def]
    sig, cert = signed
    bad = mutate(sig)
    assert why in (der_problem(bad) or "")
    with pytest.raises(CmsError, match="DER"):
        cms_content(bad)
    with pytest.raises(CmsError, match="DER"):
        verify_attached(bad, cert)


@pytest.mark.parametrize("der, why", [
    (bytes.fromhex("3003010101"), "BOOLEAN"),                 # TRUE as 01, not FF
    (bytes.fromhex("300402020001"), "INTEGER"),               # 1 with a leading zero byte
    (bytes.fromhex("30040202ff80"), "INTEGER"),               # -128 with a leading FF
    (bytes.fromhex("30020200"), "empty INTEGER"),
    (bytes.fromhex("3006310402010202"), "truncated"),         # an element cut short
    (bytes.fromhex("310602010202010" + "1"), "out of order"),  # SET OF {2, 1}
    (bytes.fromhex("30062404040201" + "02"), "constructed form"),  # constructed OCTET STRING
    (bytes.fromhex("3080020101" + "0000"), "indefinite"),
    (bytes.fromhex("30810302010" + "1"), "shortest form"),    # 3 in long form
    (bytes.fromhex("3003020101" + "00"), "after"),
    (bytes.fromhex("1f0100"), "multi-byte tag"),
    (bytes.fromhex("30" + "02" + "3000") * 1, None),          # an empty SEQUENCE inside: DER
    (bytes.fromhex("310602010102010" + "2"), None),           # SET OF {1, 2}: DER
    (bytes.fromhex("300402020080"), None),                    # 128 needs its leading zero
    (bytes.fromhex("30030101ff"), None),
])
def test_each_der_rule(der: bytes, why: str | None) -> None:
    problem = der_problem(der)
    if why is None:
        assert problem is None
    else:
        assert problem is not None and why in problem, problem


def test_deep_nesting_is_refused_not_a_recursion_error() -> None:
    der = b""
    for _ in range(200):
        der = b"\x30" + bytes([len(der)]) + der if len(der) < 128 else \
            b"\x30\x82" + len(der).to_bytes(2, "big") + der
    assert "deeply" in (der_problem(der) or "")
