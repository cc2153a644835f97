"""An operator: a person acting with their own token (their certificate and the key beside it).

Whatever an operator decides is signed on their token as a detached CMS SignedData over the
canonical JSON of the act, so that `openssl cms -verify` can later prove who did what (A25).
"""

from __future__ import annotations

import json
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from exchanged.errors import ExchangedError
from exchanged.pki.token import TokenKey


def canonical(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def attr(name: x509.Name, oid: x509.ObjectIdentifier) -> str:
    found = name.get_attributes_for_oid(oid)
    return str(found[0].value) if found else ""


def person_of(subject: x509.Name) -> str:
    """The person a certificate names, across re-issues: common name and unit (O).

    A change of post or division re-issues the certificate under a new serial; the person,
    and so the roles and the separation rules, stay the same."""
    return f"CN={attr(subject, NameOID.COMMON_NAME)},O={attr(subject, NameOID.ORGANIZATION_NAME)}"


class Operator:
    """A person at a token: `cert` is theirs, `key` the private key beside it on the token."""

    def __init__(self, key: TokenKey, cert: x509.Certificate) -> None:
        self.key = key
        self.cert = cert
        self.serial = format(cert.serial_number, "x")
        self.person = person_of(cert.subject)

    @classmethod
    def from_token(cls, key: TokenKey) -> Operator:
        cert = key.token.certificate(id=key.id)
        if cert is None:
            raise ExchangedError(f"token {key.token.label!r} holds no certificate beside key "
                                 f"{key.label!r}: import the operator's certificate first "
                                 "(exchanged token import-cert)", code="no-cert")
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        if key.public_key.public_bytes(serialization.Encoding.DER, spki) != \
                cert.public_key().public_bytes(serialization.Encoding.DER, spki):
            raise ExchangedError(f"the certificate beside key {key.label!r} on token "
                                 f"{key.token.label!r} is not for that key", code="key-mismatch")
        return cls(key, cert)

    @property
    def name(self) -> str:
        return attr(self.cert.subject, NameOID.COMMON_NAME)

    def sign(self, payload: dict[str, Any], *, detached: bool = True) -> tuple[bytes, bytes]:
        """Sign the canonical payload on the operator's token: (payload bytes, CMS DER).

        Detached for audit entries (the log holds the payload); attached for receipts, which
        travel alone: `openssl cms -verify` then prints what was signed."""
        data = canonical(payload)
        options = [pkcs7.PKCS7Options.Binary]
        if detached:
            options.append(pkcs7.PKCS7Options.DetachedSignature)
        cms = (pkcs7.PKCS7SignatureBuilder().set_data(data)
               .add_signer(self.cert, self.key.signer(), hashes.SHA256())  # type: ignore[arg-type]
               .sign(serialization.Encoding.DER, options))
        return data, cms
