"""Certificate profiles: what the CA puts into a node's, a person's and its own certificates.

The profile decides every extension; a CSR contributes only its public key (and, for a node,
the DNS/IP names it asks for when the request form names none).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from exchanged.errors import ExchangedError

PROFILES = ("node", "person")
MIN_RSA_BITS = 2048
ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


class ProfileError(ExchangedError):
    code = "bad-request"


@dataclass(frozen=True)
class Form:
    """The application form of A28: who asks, for what, and why."""

    name: str
    unit: str
    division: str = ""
    post: str = ""
    reason: str = ""
    dns: Sequence[str] = field(default_factory=tuple)
    ip: Sequence[str] = field(default_factory=tuple)

    def check(self, profile: str) -> None:
        if profile not in PROFILES:
            raise ProfileError(f"unknown profile {profile!r} (node or person)")
        for label, value in (("name", self.name), ("unit", self.unit)):
            if not value or not value.strip():
                raise ProfileError(f"the form needs a {label}")
        if profile == "person" and not self.division.strip():
            raise ProfileError("a person's form needs a division")
        for value in (self.name, self.unit, self.division, self.post):
            if len(value) > 64:
                raise ProfileError(f"form field too long (64 characters at most): {value[:20]}...")
        for ip in self.ip:
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                raise ProfileError(f"not an IP address: {ip!r}") from None


def subject_for(profile: str, form: Form, person_id: str = "") -> x509.Name:
    """The subject the profile gives: O=unit, [OU=division, title=post, serialNumber=person
    id, for a person], CN=name. Nothing of the CSR's subject is kept."""
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, form.unit)]
    if profile == "person":
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, form.division))
        if form.post:
            attrs.append(x509.NameAttribute(NameOID.TITLE, form.post))
        if person_id:
            attrs.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, person_id))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, form.name))
    return x509.Name(attrs)


def check_public_key(key: object) -> None:
    """Refuse keys too weak or of kinds the CA does not certify."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise ProfileError(f"RSA key of {key.key_size} bits refused: at least "
                               f"{MIN_RSA_BITS} bits", code="weak-key")
        return
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ALLOWED_CURVES):
            raise ProfileError(f"EC curve {key.curve.name} refused (P-256, P-384 or P-521)",
                               code="weak-key")
        return
    raise ProfileError(f"key type {type(key).__name__} refused (EC or RSA)", code="weak-key")


def random_serial() -> int:
    """A positive serial of at most 20 octets with 159 bits of randomness (RFC 5280 4.1.2.2)."""
    while True:
        serial = secrets.randbits(159)
        if serial >= 1 << 64:  # never short: short serials are guessable and collide
            return serial


def sans(form: Form, csr: x509.CertificateSigningRequest | None) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in form.dns]
    names += [x509.IPAddress(ipaddress.ip_address(i)) for i in form.ip]
    if not names and csr is not None:
        try:
            ext = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return []
        for gn in ext:
            if not isinstance(gn, x509.DNSName | x509.IPAddress):
                raise ProfileError(f"the CSR asks for a {type(gn).__name__} name; only DNS "
                                   "names and IP addresses are certified")
            names.append(gn)
    return names


def end_entity(profile: str, *, form: Form, public_key: object, ca_cert: x509.Certificate,
               serial: int, not_before: dt.datetime, days: int, crl_url: str | None,
               csr: x509.CertificateSigningRequest | None = None,
               person_id: str = "") -> x509.CertificateBuilder:
    """The builder for a node's or a person's certificate, ready to be signed by the CA. A
    person's carries their registered `person_id`."""
    form.check(profile)
    not_after = min(not_before + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    b = (x509.CertificateBuilder()
         .subject_name(subject_for(profile, form, person_id))
         .issuer_name(ca_cert.subject)
         .public_key(public_key)  # type: ignore[arg-type]
         .serial_number(serial)
         .not_valid_before(not_before)
         .not_valid_after(not_after)
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
    if profile == "node":
        b = b.add_extension(_key_usage(digital_signature=True), critical=True)
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                   ExtendedKeyUsageOID.CLIENT_AUTH]),
                            critical=False)
        names = sans(form, csr)
        if names:
            b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    else:
        b = b.add_extension(_key_usage(digital_signature=True, content_commitment=True),
                            critical=True)
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                            critical=False)
    return _common(b, public_key, ca_cert, crl_url)


def ca_root(*, name: x509.Name, public_key: object, not_before: dt.datetime,
            days: int) -> x509.CertificateBuilder:
    """A self-signed root: CA:TRUE, keyCertSign + cRLSign."""
    ski = x509.SubjectKeyIdentifier.from_public_key(public_key)  # type: ignore[arg-type]
    return (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(public_key)  # type: ignore[arg-type]
            .serial_number(random_serial())
            .not_valid_before(not_before)
            .not_valid_after(not_before + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                           critical=False))


def _common(b: x509.CertificateBuilder, public_key: object, ca_cert: x509.Certificate,
            crl_url: str | None) -> x509.CertificateBuilder:
    b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key),  # type: ignore[arg-type]
                        critical=False)
    try:
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_cert.public_key())  # type: ignore[arg-type]
    b = b.add_extension(aki, critical=False)
    if crl_url:
        b = b.add_extension(x509.CRLDistributionPoints([x509.DistributionPoint(
            full_name=[x509.UniformResourceIdentifier(crl_url)], relative_name=None,
            reasons=None, crl_issuer=None)]), critical=False)
    return b


def _key_usage(*, digital_signature: bool = False, content_commitment: bool = False,
               key_cert_sign: bool = False, crl_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=digital_signature,
                         content_commitment=content_commitment, key_encipherment=False,
                         data_encipherment=False, key_agreement=False,
                         key_cert_sign=key_cert_sign, crl_sign=crl_sign,
                         encipher_only=False, decipher_only=False)
