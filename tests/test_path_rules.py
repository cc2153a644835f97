"""RFC 5280 path rules that cryptography's verifier does not implement, done by our own pass
(exchanged.pki.path), and the CRL scope rules of 6.3.3: each with certificates made here with
cryptography's builders, and where openssl implements the rule, the verdict of
`openssl verify` on the same certificates beside ours.
"""

from __future__ import annotations

import ipaddress
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from asn1crypto import x509 as ax
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec
from cryptography.x509.oid import NameOID
from test_verify import DAY, NOW, Party, crl, idp, issue, key_usage

from exchanged.pki import path as pathmod
from exchanged.pki.verify import ValidationError, validate

R = x509.ReasonFlags


def dn(*parts: tuple[x509.ObjectIdentifier, str],
       string: x509.name._ASN1Type | None = None) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, v, string) if string else
                      x509.NameAttribute(oid, v) for oid, v in parts])


O_, OU, CN = NameOID.ORGANIZATION_NAME, NameOID.ORGANIZATIONAL_UNIT_NAME, NameOID.COMMON_NAME


def nc(permitted: Sequence[x509.GeneralName] | None = None,
       excluded: Sequence[x509.GeneralName] | None = None) -> x509.NameConstraints:
    return x509.NameConstraints(permitted_subtrees=permitted, excluded_subtrees=excluded)


def openssl_ok(tmp: Path, leaf: x509.Certificate, root: x509.Certificate,
               untrusted: Sequence[x509.Certificate] = (),
               crls: Sequence[x509.CertificateRevocationList] = (), strict: bool = True,
               policy_check: bool = False) -> bool:
    """Does `openssl verify` accept the path (at NOW; CRLs checked for every certificate when
    given)?"""
    def pem(name: str, objs: Sequence[x509.Certificate | x509.CertificateRevocationList]) -> str:
        path = tmp / name
        path.write_bytes(b"".join(o.public_bytes(serialization.Encoding.PEM) for o in objs))
        return str(path)

    cmd = ["openssl", "verify", "-attime", str(int(NOW.timestamp())),
           "-CAfile", pem("root.pem", [root])]
    if strict:
        cmd.append("-x509_strict")
    if policy_check:
        cmd += ["-policy_check", "-policy", "2.5.29.32.0"]  # user-initial-policy-set: any
    if untrusted:
        cmd += ["-untrusted", pem("untrusted.pem", list(untrusted))]
    if crls:
        cmd += ["-crl_check_all", "-CRLfile", pem("crls.pem", list(crls))]
    p = subprocess.run([*cmd, pem("leaf.pem", [leaf])], capture_output=True, text=True)
    return p.returncode == 0


def ours(leaf: Party, root: Party, untrusted: Sequence[Party] = (),
         crls: Sequence[x509.CertificateRevocationList] | None = None) -> str | None:
    """None if validate() accepts, else the reason code."""
    try:
        validate(leaf.cert, trusted=[root.cert], untrusted=[u.cert for u in untrusted],
                 crls=crls or (), at=NOW, check_revocation=crls is not None)
    except ValidationError as e:
        assert e.certificate is not None and f"(serial {e.certificate.serial_number:x})" in str(e)
        return e.code
    return None


@pytest.fixture(scope="module")
def root() -> Party:
    return issue(dn((O_, "Test"), (CN, "Root")), None, ca=True, not_before=NOW - 365 * DAY,
                 not_after=NOW + 3650 * DAY)


# --------------------------------------------------------------------------------------------
# Name constraints of type directoryName and URI (4.2.1.10, 6.1.3 (b)-(c), 6.1.4 (g))


@pytest.mark.parametrize("critical", [True, False])
def test_directory_name_constraints(tmp_path: Path, root: Party, critical: bool) -> None:
    permitted = dn((O_, "Test"), (OU, "permitted"))
    ica = issue(dn((O_, "Test"), (CN, "ICA")), root, ca=True,
                extensions=[(nc(permitted=[x509.DirectoryName(permitted)],
                                excluded=[x509.DirectoryName(
                                    dn((O_, "Test"), (OU, "permitted"), (OU, "not this")))]),
                             critical)])
    inside = issue(dn((O_, "Test"), (OU, "permitted"), (CN, "alice")), ica)
    # 7.1 comparison: the same subtree spelt in other case and spacing is still inside
    inside_spelt = issue(dn((O_, "TEST"), (OU, "  Permitted "), (CN, "bob")), ica)
    outside = issue(dn((O_, "Test"), (OU, "elsewhere"), (CN, "carol")), ica)
    excluded = issue(dn((O_, "Test"), (OU, "permitted"), (OU, "not this"), (CN, "dave")), ica)
    outside_san = issue(dn((O_, "Test"), (OU, "permitted"), (CN, "erin")), ica, extensions=[
        (x509.SubjectAlternativeName([x509.DirectoryName(dn((O_, "Other")))]), False)])
    assert ours(inside, root, [ica]) is None
    assert ours(inside_spelt, root, [ica]) is None
    assert ours(outside, root, [ica]) == "invalid"
    assert ours(excluded, root, [ica]) == "invalid"
    assert ours(outside_san, root, [ica]) == "invalid"
    for leaf, ok in [(inside, True), (outside, False), (excluded, False), (outside_san, False)]:
        assert openssl_ok(tmp_path, leaf.cert, root.cert, [ica.cert], strict=critical) is ok


def test_name_constraints_skip_self_issued_intermediates(root: Party) -> None:
    """6.1.3 (b): a self-issued intermediate's own name is not checked (but the leaf's is)."""
    ica = issue(dn((O_, "Test"), (CN, "ICA")), root, ca=True, extensions=[
        (nc(permitted=[x509.DirectoryName(dn((O_, "Test"), (OU, "users")))]), True)])
    # ICA re-keyed: a self-issued certificate whose name is outside the subtree
    new_key = ec.generate_private_key(ec.SECP256R1())
    rollover = issue(ica.name, ica, ca=True, key=new_key)
    leaf = issue(dn((O_, "Test"), (OU, "users"), (CN, "alice")), rollover)
    assert ours(leaf, root, [ica, rollover]) is None
    bad_leaf = issue(dn((O_, "Test"), (CN, "mallory")), rollover)
    assert ours(bad_leaf, root, [ica, rollover]) == "invalid"


def test_uri_and_email_constraints(tmp_path: Path, root: Party) -> None:
    ica = issue(dn((O_, "Test"), (CN, "ICA")), root, ca=True, extensions=[
        (nc(permitted=[x509.UniformResourceIdentifier(".example.com"),
                       x509.RFC822Name("example.com")],
            excluded=[x509.UniformResourceIdentifier("bad.example.com")]), True)])

    def leaf(*names: x509.GeneralName, email: str | None = None) -> Party:
        subject = [(CN, "leaf")] + ([(NameOID.EMAIL_ADDRESS, email)] if email else [])
        return issue(dn(*subject), ica, extensions=[(x509.SubjectAlternativeName(list(names)),
                                                     False)])

    cases = [
        (leaf(x509.UniformResourceIdentifier("https://www.example.com/x")), True),
        (leaf(x509.UniformResourceIdentifier("https://example.com/x")), False),  # .example.com
        (leaf(x509.UniformResourceIdentifier("https://www.example.org/")), False),
        (leaf(x509.UniformResourceIdentifier("https://bad.example.com/")), False),
        (leaf(x509.UniformResourceIdentifier("urn:isbn:123")), False),  # no host
        (leaf(x509.RFC822Name("alice@example.com")), True),
        (leaf(x509.RFC822Name("alice@example.org")), False),
        (leaf(x509.UniformResourceIdentifier("https://a.example.com/"),
              email="alice@elsewhere.org"), False),  # the subject's emailAddress counts
    ]
    for party, ok in cases:
        assert (ours(party, root, [ica]) is None) is ok, party.cert.extensions
        assert openssl_ok(tmp_path, party.cert, root.cert, [ica.cert]) is ok


def test_dns_and_ip_constraints(root: Party) -> None:
    ica = issue(dn((O_, "Test"), (CN, "ICA")), root, ca=True, extensions=[
        (nc(permitted=[x509.DNSName("example.com"),
                       x509.IPAddress(ipaddress.ip_network("10.0.0.0/8"))],
            excluded=[x509.DNSName("bar.example.com")]), True)])

    def leaf(*names: x509.GeneralName) -> Party:
        return issue("leaf", ica, extensions=[(x509.SubjectAlternativeName(list(names)), False)])

    assert ours(leaf(x509.DNSName("www.example.com")), root, [ica]) is None
    assert ours(leaf(x509.DNSName("example.net")), root, [ica]) == "invalid"
    assert ours(leaf(x509.DNSName("x.bar.example.com")), root, [ica]) == "invalid"
    assert ours(leaf(x509.IPAddress(ipaddress.ip_address("10.1.2.3"))), root, [ica]) is None
    assert ours(leaf(x509.IPAddress(ipaddress.ip_address("11.1.2.3"))), root, [ica]) == "invalid"


# --------------------------------------------------------------------------------------------
# Name comparison (7.1)


@pytest.mark.parametrize("spelling", ["case", "spaces", "printable-vs-utf8"])
def test_issuer_names_compare_per_rfc5280_7_1(tmp_path: Path, root: Party, spelling: str) -> None:
    ica_name = dn((O_, "Test Certificates"), (CN, "Good CA"),
                  string=x509.name._ASN1Type.PrintableString)
    ica = issue(ica_name, root, ca=True)
    spelt = {"case": dn((O_, "TEST certificates"), (CN, "good ca")),
             "spaces": dn((O_, "  Test   Certificates "), (CN, "Good CA ")),
             "printable-vs-utf8": dn((O_, "Test Certificates"), (CN, "Good CA"),
                                     string=x509.name._ASN1Type.UTF8String)}[spelling]
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf_cert = (x509.CertificateBuilder().subject_name(x509.Name.from_rfc4514_string("CN=leaf"))
                 .issuer_name(spelt).public_key(leaf_key.public_key()).serial_number(77)
                 .not_valid_before(NOW - DAY).not_valid_after(NOW + DAY)
                 .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                     ica.key.public_key()), False)
                 .sign(ica.key, hashes.SHA256()))
    leaf = Party(leaf_cert, leaf_key)
    # the CRLs name the CA as it spells itself: found for the leaf all the same
    crls = [crl(root), crl(ica)]
    assert ours(leaf, root, [ica], crls=crls) is None
    revoked = [crl(root), crl(ica, [(77, R.key_compromise)])]
    assert ours(leaf, root, [ica], crls=revoked) == "revoked"
    if spelling != "spaces":  # openssl keeps inner runs of spaces
        assert openssl_ok(tmp_path, leaf.cert, root.cert, [ica.cert], crls)
        assert not openssl_ok(tmp_path, leaf.cert, root.cert, [ica.cert], revoked)


def test_rdn_order_matters(root: Party) -> None:
    ica = issue(dn((O_, "Test"), (CN, "Good CA")), root, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name.from_rfc4514_string("CN=leaf"))
            .issuer_name(dn((CN, "Good CA"), (O_, "Test"))).public_key(key.public_key())
            .serial_number(78).not_valid_before(NOW - DAY).not_valid_after(NOW + DAY)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ica.key.public_key()), False)
            .sign(ica.key, hashes.SHA256()))
    assert ours(Party(cert, key), root, [ica]) == "unknown-issuer"


# --------------------------------------------------------------------------------------------
# Basic constraints


def test_self_issued_intermediate_not_counted_in_path_length(tmp_path: Path,
                                                             root: Party) -> None:
    """6.1.4 (l): root -> CA (pathLen 0) -> CA re-keyed (self-issued) -> leaf is valid; with a
    sub-CA of another name in its place it is not."""
    ca = issue(dn((O_, "Test"), (CN, "CA")), root, ca=True, extensions=[])
    ca0 = issue(dn((O_, "Test"), (CN, "CA0")), root, ca=True)
    ca0 = _with_pathlen(ca0, root, 0)
    rekeyed = issue(ca0.name, ca0, ca=True, key=ec.generate_private_key(ec.SECP256R1()))
    leaf = issue("leaf", rekeyed)
    assert ours(leaf, root, [ca0, rekeyed]) is None
    assert openssl_ok(tmp_path, leaf.cert, root.cert, [ca0.cert, rekeyed.cert])
    sub = issue(dn((O_, "Test"), (CN, "sub")), ca0, ca=True)
    leaf2 = issue("leaf2", sub)
    assert ours(leaf2, root, [ca0, sub]) == "invalid"
    assert not openssl_ok(tmp_path, leaf2.cert, root.cert, [ca0.cert, sub.cert])
    assert ours(issue("leaf3", ca), root, [ca]) is None


def _with_pathlen(party: Party, issuer: Party, n: int) -> Party:
    """The same certificate (name, key) with basicConstraints pathLenConstraint n."""
    c = party.cert
    b = (x509.CertificateBuilder().subject_name(c.subject).issuer_name(c.issuer)
         .public_key(party.key.public_key()).serial_number(c.serial_number + 1)
         .not_valid_before(c.not_valid_before_utc).not_valid_after(c.not_valid_after_utc))
    for ext in c.extensions:
        value = (x509.BasicConstraints(ca=True, path_length=n)
                 if isinstance(ext.value, x509.BasicConstraints) else ext.value)
        b = b.add_extension(value, ext.critical)
    return Party(b.sign(issuer.key, hashes.SHA256()), party.key)


def test_basic_constraints_not_critical_in_an_intermediate_is_accepted(root: Party) -> None:
    """6.1.4 (k) only asks for cA; criticality is a rule for CAs issuing, not for validation
    (PKITS 4.6.4). openssl -x509_strict refuses it; plain openssl accepts."""
    key = ec.generate_private_key(ec.SECP256R1())
    ica = issue(dn((CN, "ICA")), root, key=key, extensions=[
        (x509.BasicConstraints(ca=True, path_length=None), False),
        (key_usage(key_cert_sign=True, crl_sign=True), True)])
    assert ours(issue("leaf", ica), root, [ica]) is None


# --------------------------------------------------------------------------------------------
# Our pass refuses what the RFC refuses, also on paths cryptography gave up on


def _constrained_ica(root: Party, **kw: object) -> Party:
    """An ICA with a critical directoryName constraint: cryptography's verifier refuses any
    path through it, so validate() falls back to our own search."""
    extensions = [(nc(permitted=[x509.DirectoryName(dn((O_, "Test")))]), True),
                  *kw.pop("extensions", [])]  # type: ignore[misc]
    return issue(dn((O_, "Test"), (CN, "ICA")), root, extensions=extensions, **kw)  # type: ignore[arg-type]


def test_fallback_refuses_every_broken_rule(root: Party) -> None:
    leaf_name = dn((O_, "Test"), (CN, "leaf"))
    good = _constrained_ica(root, ca=True)
    assert ours(issue(leaf_name, good), root, [good]) is None
    expired = _constrained_ica(root, ca=True, not_after=NOW - DAY)
    assert ours(issue(leaf_name, expired), root, [expired]) == "expired"
    not_ca = _constrained_ica(root, ku=key_usage(key_cert_sign=True))
    assert ours(issue(leaf_name, not_ca), root, [not_ca]) == "invalid"
    no_cert_sign = _constrained_ica(root, ca=True, ku=key_usage(crl_sign=True))
    assert ours(issue(leaf_name, no_cert_sign), root, [no_cert_sign]) == "invalid"
    unknown = _constrained_ica(root, ca=True, extensions=[
        (x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00"),
         True)])
    assert ours(issue(leaf_name, unknown), root, [unknown]) == "invalid"
    forged = issue(leaf_name, good, signing_key=ec.generate_private_key(ec.SECP256R1()))
    assert ours(forged, root, [good]) == "bad-signature"
    leaf_expired = issue(leaf_name, good, not_after=NOW - DAY)
    assert ours(leaf_expired, root, [good]) == "expired"


def test_dsa_is_refused_on_purpose(root: Party) -> None:
    dsa_key = dsa.generate_private_key(2048)
    ca_cert = (x509.CertificateBuilder().subject_name(dn((CN, "DSA CA")))
               .issuer_name(dn((CN, "DSA CA"))).public_key(dsa_key.public_key())
               .serial_number(5).not_valid_before(NOW - DAY).not_valid_after(NOW + DAY)
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(dsa_key.public_key()),
                              False)
               .sign(dsa_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder().subject_name(dn((CN, "leaf")))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(6)
            .not_valid_before(NOW - DAY).not_valid_after(NOW + DAY)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                dsa_key.public_key()), False)
            .sign(dsa_key, hashes.SHA256()))
    with pytest.raises(ValidationError) as e:
        validate(leaf, trusted=[ca_cert], at=NOW, check_revocation=False)
    assert "refuses DSA" in str(e.value) and "(serial 6)" in str(e.value)


def test_generalized_time_before_2050_is_accepted(tmp_path: Path, root: Party) -> None:
    """RFC 5280 4.1.2.5 says CAs MUST use UTCTime for dates through 2049, but a validator
    reading a GeneralizedTime date is not told to refuse it (PKITS 4.2.4, 4.2.8)."""
    ica = issue(dn((CN, "ICA")), root, ca=True)
    leaf = issue("leaf", ica)
    a = ax.Certificate.load(leaf.cert.public_bytes(serialization.Encoding.DER))
    tbs = a["tbs_certificate"]
    tbs["validity"]["not_before"] = ax.Time(name="general_time",
                                            value=NOW - 2 * DAY)
    tbs_der = tbs.dump(force=True)
    signature = ica.key.sign(tbs_der, ec.ECDSA(hashes.SHA256()))
    a = ax.Certificate({"tbs_certificate": ax.TbsCertificate.load(tbs_der),
                        "signature_algorithm": a["signature_algorithm"],
                        "signature_value": signature})
    cert = x509.load_der_x509_certificate(a.dump())
    assert b"\x18\x0f" in cert.tbs_certificate_bytes  # a GeneralizedTime is in there
    assert validate(cert, trusted=[root.cert], untrusted=[ica.cert], at=NOW,
                    check_revocation=False)[0] == cert
    assert openssl_ok(tmp_path, cert, root.cert, [ica.cert])
    with pytest.raises(ValidationError) as e:
        validate(cert, trusted=[root.cert], untrusted=[ica.cert], at=NOW - 3 * DAY,
                 check_revocation=False)
    assert e.value.code == "not-yet-valid"


# --------------------------------------------------------------------------------------------
# CRL scope: distribution points and indirect CRLs (6.3.3 (b))


def _dp(*full: x509.GeneralName, crl_issuer: Sequence[x509.Name] | None = None,
        reasons: frozenset[x509.ReasonFlags] | None = None) -> x509.DistributionPoint:
    return x509.DistributionPoint(full_name=list(full) or None, relative_name=None,
                                  reasons=reasons, crl_issuer=[x509.DirectoryName(n)
                                                               for n in crl_issuer]
                                  if crl_issuer else None)


def test_crl_with_a_named_point_does_not_cover_a_certificate_without_points(
        tmp_path: Path, root: Party) -> None:
    """6.3.3 (b)(2)(i): the implied point of a certificate without cRLDistributionPoints has no
    name, so the CRL's point name must be the certificate issuer's name (PKITS 4.14.9)."""
    ica = issue(dn((CN, "ICA")), root, ca=True)
    leaf = issue("leaf", ica)
    uri = x509.UniformResourceIdentifier("http://crl.example/ica-part1.crl")
    partitioned = crl(ica, extensions=[(idp(full_name=[uri]), True)])
    assert ours(leaf, root, [ica], crls=[crl(root), partitioned]) == "crl-missing"
    assert not openssl_ok(tmp_path, leaf.cert, root.cert, [ica.cert], [crl(root), partitioned])
    # naming the issuer itself as the point, it does cover it
    whole = crl(ica, extensions=[(idp(full_name=[x509.DirectoryName(ica.name)]), True)])
    assert ours(leaf, root, [ica], crls=[crl(root), whole]) is None
    # and a certificate that names the point is covered
    pointed = issue("leaf2", ica, extensions=[(x509.CRLDistributionPoints([_dp(uri)]), False)])
    assert ours(pointed, root, [ica], crls=[crl(root), partitioned]) is None
    other = crl(ica, extensions=[(idp(full_name=[
        x509.UniformResourceIdentifier("http://crl.example/ica-part2.crl")]), True)])
    assert ours(pointed, root, [ica], crls=[crl(root), other]) == "crl-missing"


def test_crl_issuer_in_a_point_needs_an_indirect_crl_of_that_issuer(root: Party) -> None:
    """6.3.3 (b)(1): a point with cRLIssuer is served only by an indirect CRL of that issuer;
    a CRL of the certificate issuer for that point does not stand in for it (PKITS 4.14.35).
    (A CRL of the certificate issuer that no point leads to is taken through the implied point,
    6.3.3's last paragraph.)"""
    ica = issue(dn((CN, "ICA")), root, ca=True)
    crl_signer = issue(dn((CN, "CRL issuer")), root, ca=True)
    point = x509.DirectoryName(dn((CN, "CRL issuer"), (OU, "part 1")))
    leaf = issue("leaf", ica, extensions=[(x509.CRLDistributionPoints(
        [_dp(point, crl_issuer=[crl_signer.name])]), False)])
    base = [crl(root), crl(ica, extensions=[(idp(full_name=[point]), True)])]
    assert ours(leaf, root, [ica, crl_signer], crls=base) == "crl-missing"
    assert ours(leaf, root, [ica, crl_signer], crls=[crl(root), crl(ica)]) is None
    indirect = crl(crl_signer, extensions=[(idp(full_name=[point], indirect_crl=True), True)])
    assert ours(leaf, root, [ica, crl_signer], crls=[*base, indirect]) is None
    not_indirect = crl(crl_signer, extensions=[(idp(full_name=[point]), True)])
    assert ours(leaf, root, [ica, crl_signer], crls=[*base, not_indirect]) == "crl-missing"
    entry = [(x509.CertificateIssuer([x509.DirectoryName(ica.name)]), True)]
    revoking = crl(crl_signer, [(leaf, R.key_compromise, entry)],
                   extensions=[(idp(full_name=[point], indirect_crl=True), True)])
    assert ours(leaf, root, [ica, crl_signer], crls=[*base, revoking]) == "revoked"
    # an entry without certificateIssuer is about the CRL issuer's own certificates
    own = crl(crl_signer, [(leaf, R.key_compromise)],
              extensions=[(idp(full_name=[point], indirect_crl=True), True)])
    assert ours(leaf, root, [ica, crl_signer], crls=[*base, own]) is None


def test_point_reasons_limit_what_a_crl_decides(root: Party) -> None:
    """6.3.3 (d): a point with reasons only gets those from its CRL; full coverage needs
    another point for the rest."""
    ica = issue(dn((CN, "ICA")), root, ca=True)
    uri = x509.UniformResourceIdentifier("http://crl.example/kc.crl")
    leaf = issue("leaf", ica, extensions=[(x509.CRLDistributionPoints(
        [_dp(uri, reasons=frozenset({R.key_compromise}))]), False)])
    kc = crl(ica, extensions=[(idp(full_name=[uri]), True)])
    assert ours(leaf, root, [ica], crls=[crl(root), kc]) == "crl-missing"


# --------------------------------------------------------------------------------------------
# Bounded search


def test_hostile_pool_of_issuers_ends_with_a_clear_error(root: Party) -> None:
    """Forty CAs sharing one name, each cross-certified by every other (valid signatures),
    none reaching the anchor: without a budget the number of paths is astronomical."""
    name = dn((O_, "Test"), (CN, "Hydra"))
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(40)]
    pool: list[x509.Certificate] = []
    for i, k in enumerate(keys):
        for j, signer in enumerate(keys[:8]):
            if i != j:
                pool.append(_ca_cert(name, name, k, signer))
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = _ca_cert(dn((CN, "leaf")), name, leaf_key, keys[0], ca=False)
    budget = pathmod.Budget()
    profile = pathmod.Profile(at=NOW, trusted_der=frozenset())
    start = time.monotonic()
    with pytest.raises(pathmod.PathError) as e:
        pathmod.build(leaf, [root.cert], pool, profile, budget=budget)
    assert time.monotonic() - start < 10  # only a guard against a hang; the budget is counted
    assert "budget exhausted" in str(e.value), e.value
    assert budget.spent_signatures <= budget.signatures
    assert budget.spent_steps <= budget.steps + 1
    # and through validate(), the reason and the certificate are named
    with pytest.raises(ValidationError) as v:
        validate(leaf, trusted=[root.cert], untrusted=pool, at=NOW, check_revocation=False)
    assert v.value.certificate == leaf and "(serial" in str(v.value)


def test_search_budget_runs_out_on_a_name_mesh_that_does_reach(root: Party) -> None:
    """Many same-name candidates with valid signatures among which only the last one is
    certified by the root: the search stops at its budget rather than trying all orders."""
    name = dn((O_, "Test"), (CN, "Mesh"))
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(12)]
    pool = [_ca_cert(name, name, k, s) for k in keys for s in keys if k is not s]
    leaf = _ca_cert(dn((CN, "leaf")), name, ec.generate_private_key(ec.SECP256R1()), keys[0],
                    ca=False)
    budget = pathmod.Budget(signatures=30, steps=200)
    with pytest.raises(pathmod.PathError) as e:
        pathmod.build(leaf, [root.cert], pool, pathmod.Profile(at=NOW, trusted_der=frozenset()),
                      budget=budget)
    assert "budget exhausted" in str(e.value)
    assert budget.spent_signatures <= 30 and budget.spent_steps <= 201


def _ca_cert(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey,
             signer: ec.EllipticCurvePrivateKey, ca: bool = True) -> x509.Certificate:
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(NOW - DAY).not_valid_after(NOW + DAY)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
             signer.public_key()), False))
    if ca:
        b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    return b.sign(signer, hashes.SHA256())


# --------------------------------------------------------------------------------------------
# `exchanged cert verify` with certificates cryptography cannot parse


def test_cert_verify_names_an_unreadable_dsa_certificate(tmp_path: Path, root: Party) -> None:
    """A DSA key whose parameters are inherited from the issuer (RFC 3279 2.3.2; PKITS 4.1.5):
    cryptography cannot parse the certificate; the command says what it is and why it is
    refused, for the leaf and for an intermediate it leaves out."""
    import sys
    ica = issue(dn((CN, "ICA")), root, ca=True)
    dsa_key = dsa.generate_private_key(2048)
    with_params = (x509.CertificateBuilder().subject_name(dn((CN, "DSA leaf")))
                   .issuer_name(ica.name).public_key(dsa_key.public_key()).serial_number(9)
                   .not_valid_before(NOW - DAY).not_valid_after(NOW + DAY)
                   .sign(ica.key, hashes.SHA256()))
    a = ax.Certificate.load(with_params.public_bytes(serialization.Encoding.DER))
    tbs = a["tbs_certificate"]
    spki = tbs["subject_public_key_info"]
    tbs["subject_public_key_info"] = ax.PublicKeyInfo({
        "algorithm": {"algorithm": "dsa"}, "public_key": spki["public_key"]})
    tbs_der = tbs.dump(force=True)
    der = ax.Certificate({"tbs_certificate": ax.TbsCertificate.load(tbs_der),
                          "signature_algorithm": a["signature_algorithm"],
                          "signature_value": ica.key.sign(tbs_der, ec.ECDSA(hashes.SHA256()))
                          }).dump()
    with pytest.raises(ValueError):
        x509.load_der_x509_certificate(der)
    (tmp_path / "dsa.der").write_bytes(der)
    (tmp_path / "root.pem").write_bytes(root.cert.public_bytes(serialization.Encoding.PEM))
    leaf = issue("leaf", ica)
    (tmp_path / "leaf.pem").write_bytes(leaf.cert.public_bytes(serialization.Encoding.PEM))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "exchanged", "cert", "verify", *args,
                               "--ca", str(tmp_path / "root.pem"), "--no-crl-check",
                               "--at", NOW.isoformat()], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent.parent)

    p = cli(str(tmp_path / "dsa.der"))
    assert p.returncode == 1
    assert "CN: DSA leaf" in p.stderr.replace("Common Name", "CN")
    assert "inherited from its issuer" in p.stderr and "refuses DSA on purpose" in p.stderr
    p = cli(str(tmp_path / "leaf.pem"), "--untrusted", str(tmp_path / "dsa.der"))
    assert p.returncode == 1
    assert "unknown" in p.stderr and "left out, unreadable" in p.stderr and "dsa.der" in p.stderr


def test_fallback_refuses_differing_signature_algorithms(root: Party) -> None:
    """RFC 5280 4.1.1.2: the algorithm inside TBSCertificate and the one outside must be the
    same; here the outside says ECDSA-SHA384 (and the signature is one) while the inside says
    SHA256."""
    ica = _constrained_ica(root, ca=True)
    leaf = issue(dn((O_, "Test"), (CN, "leaf")), ica)
    a = ax.Certificate.load(leaf.cert.public_bytes(serialization.Encoding.DER))
    tbs_der = a["tbs_certificate"].dump()
    swapped = ax.Certificate({
        "tbs_certificate": ax.TbsCertificate.load(tbs_der),
        "signature_algorithm": {"algorithm": "sha384_ecdsa"},
        "signature_value": ica.key.sign(tbs_der, ec.ECDSA(hashes.SHA384()))}).dump()
    cert = x509.load_der_x509_certificate(swapped)
    with pytest.raises(ValidationError) as e:
        validate(cert, trusted=[root.cert], untrusted=[ica.cert], at=NOW, check_revocation=False)
    assert e.value.code == "bad-signature" and "4.1.1.2" in str(e.value)


def test_delta_crl_applies_only_with_the_complete_crls_key_identifier(root: Party) -> None:
    """6.3.3 (c)(3): when the complete CRL names its key (authorityKeyIdentifier), a delta
    naming another key does not update it: its removeFromCRL does not release a hold."""
    ica = issue(dn((CN, "ICA")), root, ca=True)
    leaf = issue("leaf", ica)

    def aki(key_id: bytes) -> tuple[x509.AuthorityKeyIdentifier, bool]:
        return x509.AuthorityKeyIdentifier(key_id, None, None), False

    own = x509.SubjectKeyIdentifier.from_public_key(ica.key.public_key()).digest
    complete = crl(ica, [(leaf, R.certificate_hold)], number=10, extensions=[aki(own)])

    def delta(key_id: bytes) -> x509.CertificateRevocationList:
        return crl(ica, [(leaf, R.remove_from_crl)], number=11,
                   extensions=[aki(key_id), (x509.DeltaCRLIndicator(10), True)])

    assert ours(leaf, root, [ica], crls=[crl(root), complete, delta(own)]) is None
    assert ours(leaf, root, [ica], crls=[crl(root), complete, delta(b"\x01" * 20)]) == "suspended"


def test_name_constraint_work_is_bounded_across_paths(root: Party) -> None:
    """Six copies of one constrained CA (same name and key), each a complete path to check
    with 300 subtrees x 101 names: the comparisons of all paths together stay within the
    budget, then the search stops, saying why."""
    key = ec.generate_private_key(ec.SECP256R1())
    subtrees = [x509.DNSName(f"d{i}.example.com") for i in range(300)]
    copies = [issue(dn((O_, "Test"), (CN, "ICA")), root, ca=True, key=key,
                    extensions=[(nc(permitted=subtrees), True)]) for _ in range(6)]
    names = [x509.DNSName(f"d{i}.example.com") for i in range(100)] + [x509.DNSName("evil.org")]
    leaf = issue("leaf", copies[0], extensions=[(x509.SubjectAlternativeName(names), False)])
    budget = pathmod.Budget()
    with pytest.raises(pathmod.PathError) as e:
        pathmod.build(leaf.cert, [root.cert], [c.cert for c in copies],
                      pathmod.Profile(at=NOW, trusted_der=frozenset()), budget=budget)
    assert "refused for cost" in str(e.value)
    assert budget.spent_name_checks <= budget.name_checks + 300 * 101
    assert budget.spent_paths < 6


# --------------------------------------------------------------------------------------------
# Certificate policies (6.1.3 (d)-(f), 6.1.4 (a)-(b), (h)-(j), 6.1.5), default inputs:
# any policy acceptable to the user, no explicit policy asked for by the user


P1 = x509.ObjectIdentifier("1.3.6.1.4.1.99999.2.1")
P2 = x509.ObjectIdentifier("1.3.6.1.4.1.99999.2.2")
ANY = x509.ObjectIdentifier("2.5.29.32.0")


def policies(*oids: x509.ObjectIdentifier) -> tuple[x509.CertificatePolicies, bool]:
    return x509.CertificatePolicies([x509.PolicyInformation(o, None) for o in oids]), False


def require_explicit(n: int) -> tuple[x509.PolicyConstraints, bool]:
    return x509.PolicyConstraints(require_explicit_policy=n, inhibit_policy_mapping=None), True


def mappings(*pairs: tuple[x509.ObjectIdentifier, x509.ObjectIdentifier]
             ) -> tuple[x509.UnrecognizedExtension, bool]:
    der = ax.PolicyMappings([{"issuer_domain_policy": a.dotted_string,
                              "subject_domain_policy": b.dotted_string} for a, b in pairs]).dump()
    return x509.UnrecognizedExtension(x509.ObjectIdentifier("2.5.29.33"), der), True


def test_required_explicit_policy(tmp_path: Path, root: Party) -> None:
    ica = issue(dn((CN, "ICA")), root, ca=True, extensions=[policies(P1), require_explicit(0)])
    cases = [(issue("p1", ica, extensions=[policies(P1)]), True),
             (issue("p2", ica, extensions=[policies(P2)]), False),
             (issue("none", ica), False)]
    for leaf, ok in cases:
        assert (ours(leaf, root, [ica]) is None) is ok, leaf.cert.subject
        assert openssl_ok(tmp_path, leaf.cert, root.cert, [ica.cert], policy_check=True) is ok
    # without requireExplicitPolicy, policies do not decide
    free = issue(dn((CN, "free ICA")), root, ca=True, extensions=[policies(P1)])
    assert ours(issue("p2", free, extensions=[policies(P2)]), root, [free]) is None


def test_inhibit_any_policy(tmp_path: Path, root: Party) -> None:
    ica = issue(dn((CN, "ICA")), root, ca=True, extensions=[
        policies(ANY), require_explicit(0), (x509.InhibitAnyPolicy(0), True)])
    only_any = issue("any", ica, extensions=[policies(ANY)])
    named = issue("p1", ica, extensions=[policies(P1)])
    assert ours(only_any, root, [ica]) == "invalid"
    assert ours(named, root, [ica]) is None
    assert not openssl_ok(tmp_path, only_any.cert, root.cert, [ica.cert], policy_check=True)
    assert openssl_ok(tmp_path, named.cert, root.cert, [ica.cert], policy_check=True)


def test_policy_mapping(tmp_path: Path, root: Party) -> None:
    ica = issue(dn((CN, "ICA")), root, ca=True, extensions=[
        policies(P1), require_explicit(0), mappings((P1, P2))])
    mapped = issue("p2", ica, extensions=[policies(P2)])
    unmapped = issue("p1", ica, extensions=[policies(P1)])
    assert ours(mapped, root, [ica]) is None
    assert ours(unmapped, root, [ica]) == "invalid"
    assert openssl_ok(tmp_path, mapped.cert, root.cert, [ica.cert], policy_check=True)
    assert not openssl_ok(tmp_path, unmapped.cert, root.cert, [ica.cert], policy_check=True)
    to_any = issue(dn((CN, "bad ICA")), root, ca=True, extensions=[
        policies(P1), mappings((P1, ANY))])
    assert ours(issue("x", to_any, extensions=[policies(P1)]), root, [to_any]) == "invalid"


def test_mapping_does_not_revive_an_inhibited_any_policy(root: Party) -> None:
    """CA0 stops anyPolicy below it (inhibitAnyPolicy 0); CA1 asserts only anyPolicy, maps P3
    to P1 and requires an explicit policy. RFC 5280 6.1.3 (d)(2): CA1's anyPolicy is not
    honoured, so no policy survives CA1 (and 6.1.4 (b)(1) has no anyPolicy node to map from):
    the path is invalid. (openssl 3.0 -policy_check accepts it, mapping from the inhibited
    anyPolicy; found by comparing the two on random policy chains.)"""
    p3 = x509.ObjectIdentifier("1.3.6.1.4.1.99999.2.3")
    ca0 = issue(dn((CN, "CA0")), root, ca=True, extensions=[
        policies(ANY, P1), (x509.InhibitAnyPolicy(0), True)])
    ca1 = issue(dn((CN, "CA1")), ca0, ca=True, extensions=[
        policies(ANY), require_explicit(0), (x509.InhibitAnyPolicy(0), True),
        mappings((p3, P1))])
    assert ours(issue("leaf", ca1, extensions=[policies(P1)]), root, [ca0, ca1]) == "invalid"
    # the same CA1 without the inhibition above it keeps P1 through its anyPolicy
    free0 = issue(dn((CN, "CA0")), root, ca=True, extensions=[policies(ANY, P1)])
    free1 = issue(dn((CN, "CA1")), free0, ca=True, extensions=[
        policies(ANY), require_explicit(0), mappings((p3, P1))])
    assert ours(issue("leaf", free1, extensions=[policies(P1)]), root, [free0, free1]) is None
