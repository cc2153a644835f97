"""PKCS#10 requests: built and signed on the token, and checked before the CA accepts one."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from exchanged.errors import ExchangedError
from exchanged.pki import profiles
from exchanged.pki.token import TokenKey

# Extensions a CSR may carry; all but the SAN are ignored, the profile decides the rest.
_TOLERATED = (x509.SubjectAlternativeName, x509.KeyUsage, x509.ExtendedKeyUsage,
              x509.BasicConstraints, x509.SubjectKeyIdentifier)
MAX_CSR_BYTES = 64 * 1024


class CsrError(ExchangedError):
    code = "bad-csr"


def build(key: TokenKey, profile: str, form: profiles.Form) -> x509.CertificateSigningRequest:
    """A CSR for `form`, signed on the token with `key`."""
    form.check(profile)
    b = x509.CertificateSigningRequestBuilder().subject_name(profiles.subject_for(profile, form))
    if profile == "node":
        names = profiles.sans(form, None)
        if names:
            b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return b.sign(key.signer(), hashes.SHA256())


def renewal(key: TokenKey, cert: x509.Certificate) -> x509.CertificateSigningRequest:
    """A CSR for a new key that asks for what `cert` says: its subject and its
    subjectAltName (the CA's officer still decides, as for any request)."""
    b = x509.CertificateSigningRequestBuilder().subject_name(cert.subject)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        b = b.add_extension(san, critical=False)
    except x509.ExtensionNotFound:
        pass
    return b.sign(key.signer(), hashes.SHA256())


def load(data: bytes, source: str = "CSR") -> x509.CertificateSigningRequest:
    """Parse a PEM or DER CSR; a clear error for anything else."""
    if len(data) > MAX_CSR_BYTES:
        raise CsrError(f"{source}: {len(data)} bytes is too large for a CSR")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_csr(data)
        return x509.load_der_x509_csr(data)
    except ValueError as e:
        raise CsrError(f"{source} is not a valid PKCS#10 request: {_first_line(e)}") from None


def check(csr: x509.CertificateSigningRequest, source: str = "CSR") -> None:
    """Refuse a CSR with a bad signature, a weak key, or a request the profile cannot honour."""
    try:
        public_key = csr.public_key()
    except (ValueError, TypeError) as e:
        raise CsrError(f"{source}: unusable public key: {_first_line(e)}",
                       code="weak-key") from None
    profiles.check_public_key(public_key)
    if not csr.is_signature_valid:
        raise CsrError(f"{source}: the signature does not verify (the request was altered or "
                       "not signed by its key)", code="bad-signature")
    try:
        extensions = list(csr.extensions)
    except ValueError as e:
        raise CsrError(f"{source}: malformed extensions: {_first_line(e)}") from None
    for ext in extensions:
        if isinstance(ext.value, x509.BasicConstraints) and ext.value.ca:
            raise CsrError(f"{source} asks for CA:TRUE; the CA issues only end-entity "
                           "certificates from requests", code="ca-requested")
        if not isinstance(ext.value, _TOLERATED):
            raise CsrError(f"{source} asks for extension {ext.oid.dotted_string} "
                           f"({getattr(ext.oid, '_name', 'unknown')}); the profile, not the "
                           "request, decides extensions", code="extension-requested")


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__
