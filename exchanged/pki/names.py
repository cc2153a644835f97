"""Names in certificates: one attribute of a subject, and the person a certificate names."""

from __future__ import annotations

from cryptography import x509
from cryptography.x509.oid import NameOID


def attr(name: x509.Name, oid: x509.ObjectIdentifier) -> str:
    """The first value of attribute `oid` in `name`, or "" if it has none."""
    found = name.get_attributes_for_oid(oid)
    return str(found[0].value) if found else ""


def common_name(cert: x509.Certificate) -> str:
    return attr(cert.subject, NameOID.COMMON_NAME)


def organization(cert: x509.Certificate) -> str:
    """The certificate's unit (its subject's O)."""
    return attr(cert.subject, NameOID.ORGANIZATION_NAME)


def person_of(subject: x509.Name) -> str:
    """The person a certificate names, across re-issues: common name and unit (O).

    A change of post or division re-issues the certificate under a new serial; the person,
    and so the roles and the separation rules, stay the same."""
    return f"CN={attr(subject, NameOID.COMMON_NAME)},O={attr(subject, NameOID.ORGANIZATION_NAME)}"
