"""exchanged.pki.verify: chain validation and RFC 5280 CRL processing, with software keys.

Every PKI here is built with cryptography's builders (EC P-256) at a pinned clock, NOW.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from exchanged.errors import ExchangedError
from exchanged.pki.verify import CrlSet, ValidationError, validate

NOW = dt.datetime(2025, 6, 1, 12, 0, 0, tzinfo=dt.UTC)
SECOND = dt.timedelta(seconds=1)
DAY = dt.timedelta(days=1)
R = x509.ReasonFlags


# --------------------------------------------------------------------------------------------
# A small software PKI


def name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def key_usage(**bits: bool) -> x509.KeyUsage:
    fields = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
              "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")
    return x509.KeyUsage(**{f: bits.get(f, False) for f in fields})


@dataclass
class Party:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def name(self) -> x509.Name:
        return self.cert.subject


_serials = iter(range(0x1000, 1 << 30))


def issue(subject: str | x509.Name, issuer: Party | None, *, ca: bool = False,
          ku: x509.KeyUsage | None = None, eku: Sequence[x509.ObjectIdentifier] | None = None,
          not_before: dt.datetime = NOW - 30 * DAY, not_after: dt.datetime = NOW + 365 * DAY,
          extensions: Iterable[tuple[x509.ExtensionType, bool]] = (),
          key: ec.EllipticCurvePrivateKey | None = None, signing_key=None) -> Party:
    """A certificate for `subject` signed by `issuer` (self-signed when issuer is None)."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    subject_name = name(subject) if isinstance(subject, str) else subject
    issuer_name = subject_name if issuer is None else issuer.name
    issuer_key = key if issuer is None else issuer.key
    b = (x509.CertificateBuilder().subject_name(subject_name).issuer_name(issuer_name)
         .public_key(key.public_key()).serial_number(next(_serials))
         .not_valid_before(not_before).not_valid_after(not_after)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
             issuer_key.public_key()), False))
    if ca:
        b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        ku = ku or key_usage(key_cert_sign=True, crl_sign=True)
    if ku is not None:
        b = b.add_extension(ku, True)
    if eku is not None:
        b = b.add_extension(x509.ExtendedKeyUsage(list(eku)), False)
    for ext, critical in extensions:
        b = b.add_extension(ext, critical)
    return Party(b.sign(signing_key or issuer_key, hashes.SHA256()), key)


def node(issuer: Party, cn: str = "node-1", **kw) -> Party:
    kw.setdefault("ku", key_usage(digital_signature=True))
    kw.setdefault("eku", [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    return issue(cn, issuer, **kw)


def person(issuer: Party, cn: str = "alice", **kw) -> Party:
    kw.setdefault("ku", key_usage(digital_signature=True, content_commitment=True))
    kw.setdefault("eku", [ExtendedKeyUsageOID.CLIENT_AUTH])
    return issue(cn, issuer, **kw)




def crl(issuer: Party | x509.Name, entries: Iterable[tuple] = (), *, number: int | None = 1,
        this_update: dt.datetime = NOW - 3600 * SECOND, next_update: dt.datetime = NOW + DAY,
        extensions: Iterable[tuple[x509.ExtensionType, bool]] = (),
        key: ec.EllipticCurvePrivateKey | None = None) -> x509.CertificateRevocationList:
    """A CRL naming `issuer`, signed with its key (or `key`).

    entries: (Party or serial, reason or None[, [(entry extension, critical), ...]]).
    """
    issuer_name = issuer if isinstance(issuer, x509.Name) else issuer.name
    signing_key = key or issuer.key  # type: ignore[union-attr]
    b = (x509.CertificateRevocationListBuilder().issuer_name(issuer_name)
         .last_update(this_update).next_update(next_update))
    if number is not None:
        b = b.add_extension(x509.CRLNumber(number), False)
    for ext, critical in extensions:
        b = b.add_extension(ext, critical)
    for target, reason, *extra in entries:
        serial = target if isinstance(target, int) else target.cert.serial_number
        r = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(NOW - DAY)
        if reason is not None:
            r = r.add_extension(x509.CRLReason(reason), False)
        for ext, critical in (extra[0] if extra else ()):
            r = r.add_extension(ext, critical)
        b = b.add_revoked_certificate(r.build())
    return b.sign(signing_key, hashes.SHA256())


def idp(**kw) -> x509.IssuingDistributionPoint:
    args = dict(full_name=None, relative_name=None, only_contains_user_certs=False,
                only_contains_ca_certs=False, only_some_reasons=None, indirect_crl=False,
                only_contains_attribute_certs=False)
    args.update(kw)
    return x509.IssuingDistributionPoint(**args)


@dataclass
class Pki:
    root: Party
    ica: Party
    leaf: Party

    def good_crls(self) -> list[x509.CertificateRevocationList]:
        return [crl(self.root), crl(self.ica)]

    def check(self, leaf: Party | None = None, crls=None, **kw) -> list[x509.Certificate]:
        kw.setdefault("at", NOW)
        kw.setdefault("untrusted", [self.ica.cert])
        return validate((leaf or self.leaf).cert, trusted=[self.root.cert],
                        crls=self.good_crls() if crls is None else crls, **kw)

    def code(self, *args, **kw) -> str:
        with pytest.raises(ValidationError) as e:
            self.check(*args, **kw)
        return e.value.code


@pytest.fixture
def pki() -> Pki:
    root = issue("Test Root", None, ca=True, not_before=NOW - 365 * DAY,
                 not_after=NOW + 3650 * DAY)
    ica = issue("Test ICA", root, ca=True, not_after=NOW + 1000 * DAY)
    return Pki(root, ica, node(ica))


# --------------------------------------------------------------------------------------------
# Paths


def test_good_chain_is_returned_leaf_to_anchor(pki: Pki) -> None:
    assert pki.check() == [pki.leaf.cert, pki.ica.cert, pki.root.cert]


@pytest.mark.parametrize(("offset", "code"), [
    (-SECOND, "not-yet-valid"), (0 * SECOND, None),  # notBefore is inclusive
])
def test_leaf_not_before(pki: Pki, offset: dt.timedelta, code: str | None) -> None:
    at = pki.leaf.cert.not_valid_before_utc + offset
    crls = [crl(pki.root, this_update=at - DAY), crl(pki.ica, this_update=at - DAY)]
    if code is None:
        assert pki.check(at=at, crls=crls)[0] == pki.leaf.cert
    else:
        assert pki.code(at=at, crls=crls) == code


@pytest.mark.parametrize(("offset", "code"), [
    (0 * SECOND, None), (SECOND, "expired"),  # notAfter is inclusive
])
def test_leaf_not_after(pki: Pki, offset: dt.timedelta, code: str | None) -> None:
    at = pki.leaf.cert.not_valid_after_utc + offset
    crls = [crl(pki.root, this_update=at - DAY, next_update=at + DAY),
            crl(pki.ica, this_update=at - DAY, next_update=at + DAY)]
    if code is None:
        assert pki.check(at=at, crls=crls)[0] == pki.leaf.cert
    else:
        with pytest.raises(ValidationError) as e:
            pki.check(at=at, crls=crls)
        assert e.value.code == code
        assert f"{pki.leaf.cert.serial_number:x}" in e.value.message


def test_expired_intermediate_is_named(pki: Pki) -> None:
    ica = issue("Old ICA", pki.root, ca=True, not_after=NOW - DAY)
    leaf = node(ica, not_after=NOW + DAY)
    with pytest.raises(ValidationError) as e:
        pki.check(leaf, untrusted=[ica.cert], check_revocation=False)
    assert e.value.code == "expired"
    assert e.value.certificate == ica.cert


def test_naive_time_is_utc(pki: Pki) -> None:
    at = pki.leaf.cert.not_valid_before_utc.replace(tzinfo=None) - SECOND
    assert pki.code(at=at, check_revocation=False) == "not-yet-valid"


def test_unknown_issuer(pki: Pki) -> None:
    other_root = issue("Other Root", None, ca=True)
    stranger = node(issue("Other ICA", other_root, ca=True))
    assert pki.code(stranger) == "unknown-issuer"
    assert pki.code(untrusted=[]) == "unknown-issuer"  # intermediate not supplied


def test_leaf_signed_by_another_key_is_bad_signature(pki: Pki) -> None:
    impostor = node(pki.ica, signing_key=ec.generate_private_key(ec.SECP256R1()))
    assert pki.code(impostor, check_revocation=False) == "bad-signature"


def test_unparseable_extension_is_invalid(pki: Pki) -> None:
    # A cRLDistributionPoints the path validator does not read, but revocation checking does.
    broken = x509.UnrecognizedExtension(x509.oid.ExtensionOID.CRL_DISTRIBUTION_POINTS, b"\x05\x00")
    leaf = node(pki.ica, extensions=[(broken, False)])
    assert pki.code(leaf) == "invalid"


def test_max_chain_depth(pki: Pki) -> None:
    assert pki.check(max_chain_depth=1)
    assert pki.code(max_chain_depth=0, check_revocation=False) == "invalid"


# --------------------------------------------------------------------------------------------
# Purposes


def test_no_purpose_demands_no_key_usage_or_eku(pki: Pki) -> None:
    bare = issue("bare", pki.ica)
    assert pki.check(bare)[0] == bare.cert


@pytest.mark.parametrize("purpose", ["node", "person"])
def test_purpose_met(pki: Pki, purpose: str) -> None:
    leaf = node(pki.ica) if purpose == "node" else person(pki.ica)
    assert pki.check(leaf, purpose=purpose)[0] == leaf.cert


@pytest.mark.parametrize(("make", "purpose"), [
    (lambda ca: node(ca, eku=[ExtendedKeyUsageOID.SERVER_AUTH]), "node"),   # no clientAuth
    (lambda ca: node(ca, ku=key_usage(key_agreement=True)), "node"),        # no digitalSignature
    (lambda ca: node(ca, eku=None), "node"),                                 # no EKU at all
    (lambda ca: node(ca, ku=None), "node"),                                  # no keyUsage at all
    (lambda ca: person(ca, ku=key_usage(digital_signature=True)), "person"),  # no nonRepudiation
    (lambda ca: node(ca), "person"),                                         # a node is no person
    (lambda ca: person(ca), "node"),                                         # nor vice versa
])
def test_purpose_not_met(pki: Pki, make, purpose: str) -> None:
    assert pki.code(make(pki.ica), purpose=purpose) == "wrong-key-usage"


def test_ca_eku_must_allow_the_purpose(pki: Pki) -> None:
    ica = issue("Mail ICA", pki.root, ca=True, eku=[ExtendedKeyUsageOID.EMAIL_PROTECTION])
    leaf = node(ica)
    assert pki.check(leaf, untrusted=[ica.cert], check_revocation=False)
    assert pki.code(leaf, untrusted=[ica.cert], check_revocation=False,
                    purpose="node") == "wrong-key-usage"


def test_unknown_purpose_is_a_programming_error(pki: Pki) -> None:
    with pytest.raises(ValueError):
        pki.check(purpose="server")


# --------------------------------------------------------------------------------------------
# Revocation


def test_hold_is_suspended(pki: Pki) -> None:
    with pytest.raises(ValidationError) as e:
        pki.check(crls=[crl(pki.root), crl(pki.ica, [(pki.leaf, R.certificate_hold)])])
    assert e.value.code == "suspended"
    assert e.value.crl_reason == "certificateHold"
    assert "certificateHold" in e.value.message


def test_key_compromise_is_revoked(pki: Pki) -> None:
    with pytest.raises(ValidationError) as e:
        pki.check(crls=[crl(pki.root), crl(pki.ica, [(pki.leaf, R.key_compromise)])])
    assert e.value.code == "revoked"
    assert "keyCompromise" in e.value.message
    assert "CN=node-1" in e.value.message
    assert f"{pki.leaf.cert.serial_number:x}" in e.value.message
    assert e.value.certificate == pki.leaf.cert


def test_entry_without_reason_is_revoked_unspecified(pki: Pki) -> None:
    with pytest.raises(ValidationError) as e:
        pki.check(crls=[crl(pki.root), crl(pki.ica, [(pki.leaf, None)])])
    assert (e.value.code, e.value.crl_reason) == ("revoked", "unspecified")


def test_other_serials_do_not_matter(pki: Pki) -> None:
    other = node(pki.ica, "node-2")
    assert pki.check(crls=[crl(pki.root), crl(pki.ica, [(other, R.key_compromise)])])


def test_same_serial_on_another_issuers_crl_does_not_matter(pki: Pki) -> None:
    other_ca = issue("Other CA", pki.root, ca=True)
    crls = pki.good_crls() + [crl(other_ca, [(pki.leaf, R.key_compromise)])]
    assert pki.check(crls=crls)


def test_intermediate_revoked_by_root_crl(pki: Pki) -> None:
    with pytest.raises(ValidationError) as e:
        pki.check(crls=[crl(pki.root, [(pki.ica, R.ca_compromise)]), crl(pki.ica)])
    assert e.value.code == "revoked"
    assert e.value.certificate == pki.ica.cert
    assert "cACompromise" in e.value.message


def test_no_crl_is_crl_missing(pki: Pki) -> None:
    assert pki.code(crls=[]) == "crl-missing"
    assert pki.code(crls=[crl(pki.root)]) == "crl-missing"  # nothing for the leaf's issuer


def test_check_revocation_false_skips_crls(pki: Pki) -> None:
    revoked = [crl(pki.root), crl(pki.ica, [(pki.leaf, R.key_compromise)])]
    assert pki.check(crls=[], check_revocation=False)
    assert pki.check(crls=revoked, check_revocation=False)


def test_stale_crl(pki: Pki) -> None:
    stale = crl(pki.ica, this_update=NOW - 8 * DAY, next_update=NOW - SECOND)
    assert pki.code(crls=[crl(pki.root), stale]) == "crl-stale"


def test_crl_at_next_update_is_still_fresh(pki: Pki) -> None:
    assert pki.check(crls=[crl(pki.root), crl(pki.ica, next_update=NOW)])


def test_crl_from_the_future_is_not_usable(pki: Pki) -> None:
    future = crl(pki.ica, this_update=NOW + SECOND, next_update=NOW + DAY)
    assert pki.code(crls=[crl(pki.root), future]) == "crl-invalid"


def test_crl_signed_by_another_key(pki: Pki) -> None:
    forged = crl(pki.ica, key=ec.generate_private_key(ec.SECP256R1()))
    assert pki.code(crls=[crl(pki.root), forged]) == "bad-signature"


def test_forged_crl_beside_a_good_one_is_ignored(pki: Pki) -> None:
    forged = crl(pki.ica, number=99, key=ec.generate_private_key(ec.SECP256R1()))
    assert pki.check(crls=[crl(pki.root), crl(pki.ica), forged])


def test_issuer_without_crl_sign(pki: Pki) -> None:
    ica = issue("No-CRL ICA", pki.root, ca=True, ku=key_usage(key_cert_sign=True))
    leaf = node(ica)
    assert pki.code(leaf, untrusted=[ica.cert], crls=[crl(pki.root), crl(ica)]) == "crl-invalid"


def test_newer_crl_dropping_a_hold_wins(pki: Pki) -> None:
    held = crl(pki.ica, [(pki.leaf, R.certificate_hold)], number=7)
    released = crl(pki.ica, [], number=8)
    for order in ([held, released], [released, held]):
        assert pki.check(crls=[crl(pki.root), *order])
    # ... and the other way round: the newer one puts it on hold.
    assert pki.code(crls=[crl(pki.root), crl(pki.ica, number=9), crl(
        pki.ica, [(pki.leaf, R.certificate_hold)], number=10)]) == "suspended"


def test_remove_from_crl_in_a_complete_crl_is_ignored(pki: Pki) -> None:
    assert pki.check(crls=[crl(pki.root), crl(pki.ica, [(pki.leaf, R.remove_from_crl)])])


def test_unknown_critical_crl_extension(pki: Pki) -> None:
    odd = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.55738.1"), b"\x05\x00")
    crls = [crl(pki.root), crl(pki.ica, extensions=[(odd, True)])]
    assert pki.code(crls=crls) == "crl-invalid"
    # Non-critical, it is ignored.
    assert pki.check(crls=[crl(pki.root), crl(pki.ica, extensions=[(odd, False)])])


def test_unknown_critical_entry_extension(pki: Pki) -> None:
    odd = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.55738.2"), b"\x05\x00")
    other = node(pki.ica, "node-2")
    crls = [crl(pki.root), crl(pki.ica, [(other, R.superseded, [(odd, True)])])]
    assert pki.code(crls=crls) == "crl-invalid"  # the whole CRL is unusable, not just the entry


def _tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    length = bytes([n]) if n < 0x80 else bytes([0x80 | (n.bit_length() + 7) // 8]) + \
        n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag]) + length + body


def _elements(der: bytes) -> list[bytes]:
    """The encoded elements inside a DER SEQUENCE."""
    out, pos = [], 2 + (der[1] & 0x7F if der[1] & 0x80 else 0)
    while pos < len(der):
        n, head = der[pos + 1], 2
        if n & 0x80:
            head += n & 0x7F
            n = int.from_bytes(der[pos + 2:pos + head], "big")
        out.append(der[pos:pos + head + n])
        pos += head + n
    return out


def without_next_update(signed: x509.CertificateRevocationList,
                        key: ec.EllipticCurvePrivateKey) -> x509.CertificateRevocationList:
    """The same CRL minus nextUpdate, re-signed (cryptography's builder insists on one)."""
    tbs, alg, _ = _elements(signed.public_bytes(serialization.Encoding.DER))
    fields = _elements(tbs)  # version, signature, issuer, thisUpdate, nextUpdate, ...
    tbs = _tlv(0x30, b"".join(fields[:4] + fields[5:]))
    signature = key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    return x509.load_der_x509_crl(_tlv(0x30, tbs + alg + _tlv(0x03, b"\x00" + signature)))


def test_crl_without_number_or_next_update(pki: Pki) -> None:
    assert pki.code(crls=[crl(pki.root), crl(pki.ica, number=None)]) == "crl-invalid"
    no_next = without_next_update(crl(pki.ica), pki.ica.key)
    assert no_next.next_update_utc is None and no_next.is_signature_valid(pki.ica.key.public_key())
    assert pki.code(crls=[crl(pki.root), no_next]) == "crl-invalid"


def test_separate_crl_signing_key_of_the_same_ca(pki: Pki) -> None:
    # Same name as the ICA, its own key, certified by the ICA for cRLSign only.
    signer = issue(pki.ica.name, pki.ica, ku=key_usage(crl_sign=True))
    crls = [crl(pki.root), crl(pki.ica.name, key=signer.key)]
    untrusted = [pki.ica.cert, signer.cert]
    assert pki.check(crls=crls, untrusted=untrusted)
    revoking = [crl(pki.root), crl(pki.ica.name, [(pki.leaf, R.key_compromise)], key=signer.key)]
    assert pki.code(crls=revoking, untrusted=untrusted) == "revoked"
    # Not usable when the signer certificate is not supplied.
    assert pki.code(crls=crls) == "bad-signature"


def test_crl_signer_found_by_key_identifier_among_impostors(pki: Pki) -> None:
    # A peer may send many certificates claiming the CA's name; the CRL's authorityKeyIdentifier
    # picks the real signer without trying them all (and they are tried at most 8 at a time).
    signer = issue(pki.ica.name, pki.ica, ku=key_usage(crl_sign=True))
    junk = [issue(pki.ica.name, pki.ica, ku=key_usage(crl_sign=True)).cert for _ in range(12)]
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.key.public_key())
    with_aki = crl(pki.ica.name, [(pki.leaf, R.key_compromise)], key=signer.key,
                   extensions=[(aki, False)])
    untrusted = [pki.ica.cert, *junk, signer.cert]
    assert pki.code(crls=[crl(pki.root), with_aki], untrusted=untrusted) == "revoked"
    without_aki = crl(pki.ica.name, [(pki.leaf, R.key_compromise)], key=signer.key)
    assert pki.code(crls=[crl(pki.root), without_aki], untrusted=untrusted) == "bad-signature"


def test_crl_signer_without_crl_sign_is_refused(pki: Pki) -> None:
    signer = issue(pki.ica.name, pki.ica, ku=key_usage(digital_signature=True))
    crls = [crl(pki.root), crl(pki.ica.name, key=signer.key)]
    assert pki.code(crls=crls, untrusted=[pki.ica.cert, signer.cert]) == "crl-invalid"


def test_crl_signer_must_chain_to_the_same_anchor(pki: Pki) -> None:
    other_root = issue("Other Root", None, ca=True)
    # Claims the ICA's name, but is certified by another (also trusted) root.
    signer = issue(pki.ica.name, other_root, ku=key_usage(crl_sign=True))
    crls = [crl(pki.root), crl(pki.ica.name, key=signer.key), crl(other_root)]
    with pytest.raises(ValidationError) as e:
        validate(pki.leaf.cert, trusted=[pki.root.cert, other_root.cert],
                 untrusted=[pki.ica.cert, signer.cert], crls=crls, at=NOW)
    assert e.value.code == "crl-invalid"


def test_revoked_crl_signer_is_refused(pki: Pki) -> None:
    # The signer's CRL lists the signer itself: what it signs is no longer usable.
    signer = issue(pki.ica.name, pki.ica, ku=key_usage(crl_sign=True))
    crls = [crl(pki.root), crl(pki.ica.name, [(signer, R.key_compromise)], key=signer.key)]
    with pytest.raises(ValidationError) as e:
        pki.check(crls=crls, untrusted=[pki.ica.cert, signer.cert])
    assert e.value.code == "crl-invalid"
    assert "keyCompromise" in e.value.message


def test_delta_crl_revokes_on_top_of_its_base(pki: Pki) -> None:
    base = crl(pki.ica, number=10)
    delta = crl(pki.ica, [(pki.leaf, R.key_compromise)], number=11,
                extensions=[(x509.DeltaCRLIndicator(10), True)])
    assert pki.check(crls=[crl(pki.root), base])
    assert pki.code(crls=[crl(pki.root), base, delta]) == "revoked"
    # A delta whose base is newer than the complete CRL we have does not apply to it.
    later = crl(pki.ica, [(pki.leaf, R.key_compromise)], number=13,
                extensions=[(x509.DeltaCRLIndicator(12), True)])
    assert pki.check(crls=[crl(pki.root), base, later])


def test_delta_remove_from_crl_releases_a_hold(pki: Pki) -> None:
    base = crl(pki.ica, [(pki.leaf, R.certificate_hold)], number=20)
    delta = crl(pki.ica, [(pki.leaf, R.remove_from_crl)], number=21,
                extensions=[(x509.DeltaCRLIndicator(20), True)])
    assert pki.code(crls=[crl(pki.root), base]) == "suspended"
    assert pki.check(crls=[crl(pki.root), base, delta])


def test_delta_alone_is_not_complete(pki: Pki) -> None:
    delta = crl(pki.ica, number=31, extensions=[(x509.DeltaCRLIndicator(30), True)])
    assert pki.code(crls=[crl(pki.root), delta]) == "crl-missing"


def test_indirect_crl_with_certificate_issuer(pki: Pki) -> None:
    authority = issue("CRL Authority", pki.root, ku=key_usage(crl_sign=True))
    other_ca = issue("Other CA", pki.root, ca=True)
    dp = x509.CRLDistributionPoints([x509.DistributionPoint(
        full_name=None, relative_name=None, reasons=None,
        crl_issuer=[x509.DirectoryName(authority.name)])])
    leaf = node(pki.ica, extensions=[(dp, False)])
    bystander = node(pki.ica, "node-3", extensions=[(dp, False)])

    def indirect(entries) -> x509.CertificateRevocationList:
        return crl(authority, entries, extensions=[(idp(indirect_crl=True), True)])

    def issuer_is(party: Party) -> list:
        return [(x509.CertificateIssuer([x509.DirectoryName(party.name)]), False)]

    untrusted = [pki.ica.cert, authority.cert]
    # other CA's serial 5; then the ICA's bystander, and, carried over, the leaf.
    entries = [(5, R.superseded, issuer_is(other_ca)),
               (bystander, R.key_compromise, issuer_is(pki.ica)),
               (leaf, R.key_compromise)]
    with pytest.raises(ValidationError) as e:
        pki.check(leaf, crls=[crl(pki.root), indirect(entries)], untrusted=untrusted)
    assert (e.value.code, e.value.certificate) == ("revoked", leaf.cert)
    # The leaf's serial listed for another issuer does not touch it.
    elsewhere = [(leaf, R.key_compromise, issuer_is(other_ca))]
    assert pki.check(leaf, crls=[crl(pki.root), indirect(elsewhere)], untrusted=untrusted)
    # Without the delegation in cRLDistributionPoints, the indirect CRL does not cover the leaf.
    plain = node(pki.ica, "node-4")
    assert pki.code(plain, crls=[crl(pki.root), indirect([])], untrusted=untrusted) == \
        "crl-missing"


def test_only_some_reasons_is_partial_coverage(pki: Pki) -> None:
    key_reasons = frozenset({R.key_compromise, R.ca_compromise})
    rest = frozenset({R.affiliation_changed, R.superseded, R.cessation_of_operation,
                      R.certificate_hold, R.privilege_withdrawn, R.aa_compromise})
    part1 = crl(pki.ica, number=1, extensions=[(idp(only_some_reasons=key_reasons), True)])
    part2 = crl(pki.ica, number=1, extensions=[(idp(only_some_reasons=rest), True)])
    assert pki.code(crls=[crl(pki.root), part1]) == "crl-missing"
    assert pki.check(crls=[crl(pki.root), part1, part2])


def test_idp_user_and_ca_scopes(pki: Pki) -> None:
    users = crl(pki.ica, extensions=[(idp(only_contains_user_certs=True), True)])
    cas = crl(pki.ica, extensions=[(idp(only_contains_ca_certs=True), True)])
    assert pki.check(crls=[crl(pki.root), users])
    assert pki.code(crls=[crl(pki.root), cas]) == "crl-missing"
    root_users_only = crl(pki.root, extensions=[(idp(only_contains_user_certs=True), True)])
    assert pki.code(crls=[root_users_only, crl(pki.ica)]) == "crl-missing"  # ICA not covered


def test_distribution_point_names_must_match(pki: Pki) -> None:
    def dp(url: str) -> x509.CRLDistributionPoints:
        return x509.CRLDistributionPoints([x509.DistributionPoint(
            full_name=[x509.UniformResourceIdentifier(url)], relative_name=None, reasons=None,
            crl_issuer=None)])

    leaf = node(pki.ica, extensions=[(dp("http://crl.test/a.crl"), False)])
    part_a = crl(pki.ica, extensions=[(idp(
        full_name=[x509.UniformResourceIdentifier("http://crl.test/a.crl")]), True)])
    part_b = crl(pki.ica, extensions=[(idp(
        full_name=[x509.UniformResourceIdentifier("http://crl.test/b.crl")]), True)])
    assert pki.check(leaf, crls=[crl(pki.root), part_a])
    assert pki.code(leaf, crls=[crl(pki.root), part_b]) == "crl-missing"


# --------------------------------------------------------------------------------------------
# CrlSet


def test_crlset_is_reusable(pki: Pki) -> None:
    crls = CrlSet.from_crls([crl(pki.root), crl(pki.ica, [(pki.leaf, R.superseded)])])
    assert len(crls) == 2
    other = node(pki.ica, "node-2")
    for _ in range(3):
        assert pki.code(crls=crls) == "revoked"
        assert pki.check(other, crls=crls)


def test_crlset_load_pem_der_and_bundles(pki: Pki, tmp_path: Path) -> None:
    root_crl, ica_crl = crl(pki.root), crl(pki.ica, [(pki.leaf, R.key_compromise)])
    bundle = tmp_path / "all.pem"
    bundle.write_bytes(root_crl.public_bytes(serialization.Encoding.PEM)
                       + ica_crl.public_bytes(serialization.Encoding.PEM))
    der = tmp_path / "ica.crl"
    der.write_bytes(ica_crl.public_bytes(serialization.Encoding.DER))
    assert len(CrlSet.load([bundle])) == 2
    assert len(CrlSet.load(der)) == 1
    assert pki.code(crls=CrlSet.load([bundle])) == "revoked"
    assert list(CrlSet.load([bundle, der]))[2] == ica_crl


@pytest.mark.parametrize("content", [
    b"garbage, not a CRL\n",
    b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    b"-----BEGIN X509 CRL-----\nbm90IGEgQ1JM\n-----END X509 CRL-----\n",
    b"",
])
def test_crlset_load_garbage(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.crl"
    path.write_bytes(content)
    with pytest.raises(ExchangedError) as e:
        CrlSet.load([path])
    assert e.value.code == "bad-crl-file"
    assert str(path) in str(e.value)
    assert not isinstance(e.value, ValidationError)


def test_crlset_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ExchangedError) as e:
        CrlSet.load([tmp_path / "nope.crl"])
    assert e.value.code == "bad-crl-file"
    assert "nope.crl" in str(e.value)


def test_index_fast_path_agrees_with_full_scan(pki: Pki) -> None:
    """Serial-only indexing (no critical entry extension, no certificateIssuer) must give the
    same answers as reading every entry's extensions."""
    reasons = [None, R.key_compromise, R.certificate_hold, R.superseded, R.remove_from_crl]
    entries = [(1000 + i, reasons[i % len(reasons)]) for i in range(300)]
    fast = CrlSet.from_crls([crl(pki.ica, entries)])._crls[0]
    assert not fast.indirect and fast.problem is None
    # The same entries plus one carrying a certificateIssuer naming the CRL issuer itself:
    # that forces the full scan and changes nothing.
    same_issuer = [(x509.CertificateIssuer([x509.DirectoryName(pki.ica.name)]), False)]
    full = CrlSet.from_crls([crl(pki.ica, [(999, None, same_issuer), *entries],
                                 extensions=[(idp(indirect_crl=True), True)])])._crls[0]
    assert full.problem is None
    assert fast.direct_serials is not None and full.direct_serials is None
    assert set(full.direct) == fast.direct_serials | {999}
    for serial in fast.direct_serials:  # the entry read on a hit is the one the scan kept
        entry = fast.crl.get_revoked_certificate_by_serial_number(serial)
        assert entry is not None and entry.serial_number == serial
        assert list(entry.extensions) == list(full.direct[serial].extensions)
    bystander = node(pki.ica)
    assert fast.lookup(bystander.cert) is None
    listed = CrlSet.from_crls([crl(pki.ica, [*entries, (bystander, R.key_compromise)])])._crls[0]
    hit = listed.lookup(bystander.cert)
    assert hit is not None and hit.serial_number == bystander.cert.serial_number
    assert hit.extensions.get_extension_for_class(x509.CRLReason).value.reason == \
        R.key_compromise


def test_certificate_issuer_in_a_direct_crl_makes_it_unusable(pki: Pki) -> None:
    ext = [(x509.CertificateIssuer([x509.DirectoryName(name("Elsewhere"))]), False)]
    assert pki.code(crls=[crl(pki.root), crl(pki.ica, [(5, None, ext)])]) == "crl-invalid"
