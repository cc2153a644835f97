"""An operator: a person acting with their own token (their certificate and the key beside it).

Whatever an operator decides is signed on their token as a CMS SignedData over the canonical
JSON of the act, so that `openssl cms -verify` can later prove who did what (A25).

Two kinds of operator act: an `Operator` holds their token here and signs now; a
`SignedOperator` signed on their own machine (the command line holds the token, the daemon
the database) and brings the request exactly as signed. Both are an `Actor`.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from exchanged.common import canonical
from exchanged.errors import ExchangedError
from exchanged.pki.keys import spki_der
from exchanged.pki.names import common_name, person_of
from exchanged.pki.token import TokenKey


class Actor(Protocol):
    """Someone acting with a certificate: who they are, and (if they signed already) what."""

    cert: x509.Certificate
    serial: str
    person: str

    @property
    def name(self) -> str: ...

    @property
    def presigned(self) -> tuple[bytes, bytes] | None: ...

    def sign(self, payload: dict[str, Any], *, detached: bool = True) -> tuple[bytes, bytes]: ...


class Operator:
    """A person at a token: `cert` is theirs, `key` the private key beside it on the token."""

    presigned = None

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
        if spki_der(key.public_key) != spki_der(cert.public_key()):
            raise ExchangedError(f"the certificate beside key {key.label!r} on token "
                                 f"{key.token.label!r} is not for that key", code="key-mismatch")
        return cls(key, cert)

    @property
    def name(self) -> str:
        return common_name(self.cert)

    def sign(self, payload: dict[str, Any], *, detached: bool = True) -> tuple[bytes, bytes]:
        """Sign the canonical payload on the operator's token: (payload bytes, CMS DER).

        Detached for audit entries (the log holds the payload); attached for receipts, which
        travel alone: `openssl cms -verify` then prints what was signed."""
        data = canonical(payload)
        options = [pkcs7.PKCS7Options.Binary]
        if detached:
            options.append(pkcs7.PKCS7Options.DetachedSignature)
        cms = (pkcs7.PKCS7SignatureBuilder().set_data(data)
               .add_signer(self.cert, self.key.signer(), hashes.SHA256())
               .sign(serialization.Encoding.DER, options))
        return data, cms


class SignedOperator:
    """An operator who signed a request on their own machine: their certificate, and the
    request exactly as signed (`payload`, the canonical JSON; `cms`, their signature)."""

    def __init__(self, cert: x509.Certificate, payload: bytes, cms: bytes) -> None:
        self.cert = cert
        self.serial = format(cert.serial_number, "x")
        self.person = person_of(cert.subject)
        self.presigned: tuple[bytes, bytes] | None = (payload, cms)
        self.request: dict[str, Any] = json.loads(payload)

    @property
    def name(self) -> str:
        return common_name(self.cert)

    def sign(self, payload: dict[str, Any], *, detached: bool = True) -> tuple[bytes, bytes]:
        raise ExchangedError(f"{self.name} signed on their own machine; nothing more can be "
                             "signed for them here", code="bad-request")
