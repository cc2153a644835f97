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


# Universal tags that DER allows in constructed form: SEQUENCE and SET. Every other universal
# type (strings, BIT STRING, OCTET STRING...) must be primitive in DER (X.690 10.2).
_CONSTRUCTED_OK = frozenset({0x30, 0x31})
_MAX_DEPTH = 32


def der_problem(buf: bytes) -> str | None:
    """Why `buf` is not one DER element with nothing after it, or None. Checks what makes a
    BER encoding differ from DER (X.690 clause 10, 11): definite, minimal lengths; no
    constructed strings; BOOLEAN as 00 or FF; minimal INTEGERs and ENUMERATEDs; SET OF elements
    in ascending order; nothing after the outer element. (What asn1crypto's re-encoding
    compared, at a fortieth of its cost: tools/bench-exchange spends it on every receipt.)"""
    try:
        end = _der_walk(buf, 0, len(buf), 0)
    except _NotDer as e:
        return str(e)
    return None if end == len(buf) else f"{len(buf) - end} byte(s) after the signature"


class _NotDer(ValueError):
    pass


def _der_walk(buf: bytes, pos: int, limit: int, depth: int) -> int:
    """Check the element at `pos` (ending by `limit`); returns where it ends."""
    if depth > _MAX_DEPTH:
        raise _NotDer("nested too deeply")
    if pos + 2 > limit:
        raise _NotDer("truncated element")
    tag = buf[pos]
    pos += 1
    if tag & 0x1F == 0x1F:
        raise _NotDer("multi-byte tag (none in CMS)")
    first = buf[pos]
    pos += 1
    if first < 0x80:
        length = first
    elif first == 0x80:
        raise _NotDer("indefinite length (BER, not DER)")
    else:
        n = first & 0x7F
        if n > 4 or pos + n > limit:
            raise _NotDer("bad length")
        length = int.from_bytes(buf[pos:pos + n], "big")
        if buf[pos] == 0 or length < 0x80:
            raise _NotDer("length not in its shortest form")
        pos += n
    end = pos + length
    if end > limit:
        raise _NotDer("element longer than what holds it")
    if tag & 0x20:  # constructed: its content is elements
        if tag & 0xC0 == 0 and tag not in _CONSTRUCTED_OK:
            raise _NotDer(f"constructed form of universal tag {tag & 0x1F}")
        previous: bytes | None = None
        while pos < end:
            nxt = _der_walk(buf, pos, end, depth + 1)
            if tag == 0x31:  # SET OF: ascending, compared as if padded with zeros (11.6)
                element = buf[pos:nxt]
                if previous is not None:
                    width = max(len(previous), len(element))
                    if previous.ljust(width, b"\0") > element.ljust(width, b"\0"):
                        raise _NotDer("SET OF elements out of order")
                previous = element
            pos = nxt
        return end
    value = buf[pos:end]
    if tag == 0x01 and (length != 1 or value[0] not in (0x00, 0xFF)):
        raise _NotDer("BOOLEAN not encoded as 00 or FF")
    if tag in (0x02, 0x0A):
        if length == 0:
            raise _NotDer("empty INTEGER")
        if length > 1 and ((value[0] == 0 and value[1] < 0x80)
                           or (value[0] == 0xFF and value[1] >= 0x80)):
            raise _NotDer("INTEGER not in its shortest form")
    return end


def _load(signature: bytes) -> acms.ContentInfo:
    """Parse a CMS ContentInfo strictly: DER only, nothing after it. BER, or bytes appended to
    a valid signature, would let one signed act take many byte forms (and so slip past a
    check keyed on the bytes)."""
    if not isinstance(signature, bytes) or len(signature) > MAX_SIGNATURE:
        raise CmsError("not a CMS signature (too large, or not bytes)")
    problem = der_problem(signature)
    if problem is not None:
        raise CmsError(f"malformed CMS signature: not in DER (distinguished) form: {problem}")
    try:
        return acms.ContentInfo.load(signature, strict=True)
    except (ValueError, TypeError, KeyError, OverflowError) as e:
        raise CmsError(f"malformed CMS signature: {e}") from None


def _content(info: acms.ContentInfo) -> bytes:
    try:
        content = info["content"]["encap_content_info"]["content"]
        value = content.native
    except (ValueError, TypeError, KeyError) as e:
        raise CmsError(f"malformed CMS signature: {e}") from None
    if not isinstance(value, bytes):
        raise CmsError("the signature carries no content")
    return value


def cms_content(signature: bytes) -> bytes:
    """The content carried inside an attached SignedData (a receipt); CmsError if none."""
    return _content(_load(signature))


def verify_attached(signature: bytes, issuer: x509.Certificate
                    ) -> tuple[x509.Certificate, bytes]:
    """Check an attached SignedData (a receipt) whose signer was certified by `issuer`: (the
    signer's certificate, the content). CmsError otherwise. One parse for both."""
    info = _load(signature)
    content = _content(info)
    return _verify(info, content, issuer), content


def verify_detached(signature: bytes, content: bytes, issuer: x509.Certificate
                    ) -> x509.Certificate:
    """Check a detached SignedData over `content` whose signer certificate (carried inside)
    was issued by `issuer`; returns the signer's certificate. Raises CmsError otherwise.

    Only the signature and the issuing link are checked here; whether the signer's
    certificate is good now is the caller's question (CRLs, roles)."""
    return _verify(_load(signature), content, issuer)


def _verify(info: acms.ContentInfo, content: bytes, issuer: x509.Certificate
            ) -> x509.Certificate:
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
