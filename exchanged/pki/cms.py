"""Checking detached CMS SignedData (RFC 5652) in Python, where cryptography stops.

cryptography builds CMS signatures (with a token key, see operator.py) but verifies none;
asn1crypto reads the structure and cryptography checks the signature. The same signatures
verify with `openssl cms -verify -binary -content FILE`, which the tests use as the judge.
"""

from __future__ import annotations

import hashlib

from asn1crypto import cms as acms
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes

from exchanged.errors import ExchangedError
from exchanged.pki.keys import UnsupportedKey, verify_signature

_HASHES = {"sha256": (hashlib.sha256, hashes.SHA256), "sha384": (hashlib.sha384, hashes.SHA384),
           "sha512": (hashlib.sha512, hashes.SHA512)}


class CmsError(ExchangedError):
    code = "bad-signature"


MAX_SIGNATURE = 256 * 1024  # a receipt or a signed act is a few KiB


def _load(signature: bytes) -> acms.ContentInfo:
    """Parse a CMS ContentInfo strictly: DER only, nothing after it. BER, or bytes appended to
    a valid signature, would let one signed act take many byte forms (and so slip past a
    check keyed on the bytes)."""
    if not isinstance(signature, bytes) or len(signature) > MAX_SIGNATURE:
        raise CmsError("not a CMS signature (too large, or not bytes)")
    try:
        info = acms.ContentInfo.load(signature, strict=True)
        canonical = info.dump(force=True) == signature
    except (ValueError, TypeError, KeyError, OverflowError) as e:
        raise CmsError(f"malformed CMS signature: {e}") from None
    if not canonical:
        raise CmsError("malformed CMS signature: not in DER (distinguished) form")
    return info


def cms_content(signature: bytes) -> bytes:
    """The content carried inside an attached SignedData (a receipt); CmsError if none."""
    info = _load(signature)
    try:
        content = info["content"]["encap_content_info"]["content"]
        value = content.native
    except (ValueError, TypeError, KeyError) as e:
        raise CmsError(f"malformed CMS signature: {e}") from None
    if not isinstance(value, bytes):
        raise CmsError("the signature carries no content")
    return value


def verify_detached(signature: bytes, content: bytes, issuer: x509.Certificate
                    ) -> x509.Certificate:
    """Check a detached SignedData over `content` whose signer certificate (carried inside)
    was issued by `issuer`; returns the signer's certificate. Raises CmsError otherwise.

    Only the signature and the issuing link are checked here; whether the signer's
    certificate is good now is the caller's question (CRLs, roles)."""
    info = _load(signature)
    try:
        if info["content_type"].native != "signed_data":
            raise CmsError("not a CMS SignedData")
        sd = info["content"]
        signers = list(sd["signer_infos"])
        if len(signers) != 1:
            raise CmsError(f"expected one signer, found {len(signers)}")
        si = signers[0]
        sid = si["sid"]
        certs = [x509.load_der_x509_certificate(c.chosen.dump()) for c in sd["certificates"]
                 if c.name == "certificate"]
        if sid.name != "issuer_and_serial_number":
            raise CmsError("signer identified by key id; expected issuer and serial")
        serial = sid.chosen["serial_number"].native
        signer = next((c for c in certs if c.serial_number == serial), None)
        if signer is None:
            raise CmsError("the signer's certificate is not in the signature")
        digest_name = si["digest_algorithm"]["algorithm"].native
        if digest_name not in _HASHES:
            raise CmsError(f"digest {digest_name} not accepted")
        hash_fn, hash_cls = _HASHES[digest_name]
        attrs = si["signed_attrs"]
        if not attrs:
            raise CmsError("no signed attributes")
        digests = [a["values"][0].native for a in attrs if a["type"].native == "message_digest"]
        if digests != [hash_fn(content).digest()]:
            raise CmsError("the content does not match the signed digest: it was altered")
        signed = attrs.untag().dump()  # signed as a SET OF, not with the [0] tag (RFC 5652 5.4)
        sig = si["signature"].native
    except (ValueError, TypeError, KeyError) as e:
        raise CmsError(f"malformed CMS signature: {e}") from None
    try:
        signer.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        raise CmsError(f"the signer {signer.subject.rfc4514_string()} was not certified by "
                       f"{issuer.subject.rfc4514_string()}") from None
    try:
        verify_signature(signer.public_key(), sig, signed, hash_cls())
    except UnsupportedKey:
        raise CmsError("unsupported signer key") from None
    except InvalidSignature:
        raise CmsError("the signature does not verify") from None
    return signer
