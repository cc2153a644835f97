"""Public keys: how they are compared, and one signature check for every EC or RSA key."""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes


def spki_der(public_key: PublicKeyTypes) -> bytes:
    """A public key as DER SubjectPublicKeyInfo: how keys are compared."""
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def key_sha256(public_key: PublicKeyTypes) -> str:
    """The SHA-256 of a key's SubjectPublicKeyInfo, in hex: a key's name in our records."""
    return hashlib.sha256(spki_der(public_key)).hexdigest()


class UnsupportedKey(TypeError):
    """The key is neither EC nor RSA: nothing we issue or accept."""


def verify_signature(public_key: PublicKeyTypes, signature: bytes, data: bytes,
                     algorithm: hashes.HashAlgorithm | None = None) -> None:
    """Check `signature` over `data`: ECDSA, or RSA PKCS#1 v1.5, with `algorithm` (SHA-256 by
    default). Raises cryptography's InvalidSignature, or UnsupportedKey for another key type."""
    algorithm = algorithm or hashes.SHA256()
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        public_key.verify(signature, data, ec.ECDSA(algorithm))
    elif isinstance(public_key, rsa.RSAPublicKey):
        public_key.verify(signature, data, padding.PKCS1v15(), algorithm)
    else:
        raise UnsupportedKey(f"{type(public_key).__name__} keys are not supported (EC or RSA)")
