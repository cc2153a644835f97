"""Names in certificates: one attribute of a subject, and the person a certificate names.

A person is an identity, not a name: the CA registers each person once and gives them a
stable person id (`P-` and 16 hex digits), carried in the subject's serialNumber attribute of
every certificate it issues them. Two people may share a name; a second certificate of one
person comes only by re-issue, which keeps the id. Node certificates carry no person id.
"""

from __future__ import annotations

import re
import secrets
import unicodedata

from cryptography import x509
from cryptography.x509.oid import NameOID

PERSON_ID_RE = re.compile(r"P-[0-9A-F]{16}")


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
    """The registered person a subject names (their person id), or "" if it names none (a
    node, or a certificate from before the registry): such a certificate acts for no one.

    A change of post or division re-issues the certificate under a new serial; the person,
    and so the roles and the separation rules, stay the same."""
    value = attr(subject, NameOID.SERIAL_NUMBER)
    return value if PERSON_ID_RE.fullmatch(value) else ""


def new_person_id() -> str:
    return "P-" + secrets.token_hex(8).upper()


def same_name(a: str, b: str) -> bool:
    """Two names a reader would take for the same: compatibility forms, case and spacing
    folded (full-width letters, a capital, a double space do not make another person)."""
    def fold(s: str) -> str:
        return " ".join(unicodedata.normalize("NFKC", s).casefold().split())
    return fold(a) == fold(b)
