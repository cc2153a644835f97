"""PKCS#11 tokens: open one, generate keys that never leave it, sign with them, store certificates.

One `Token` is one logged-in session to one token; every call on it is serialised by a lock
(several PKCS#11 modules misbehave when one token is used from two threads at once).
Private keys are generated with CKA_SENSITIVE=true and CKA_EXTRACTABLE=false; nothing here
ever asks a token for private key material.

`TokenKey.signer()` returns an object that cryptography's builders accept as a private key
(`CertificateBuilder.sign`, `CertificateSigningRequestBuilder.sign`, `PKCS7SignatureBuilder`):
they call its `sign()`, which calls the token.
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pkcs11
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11e
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from exchanged.errors import ExchangedError
from exchanged.pki.keys import spki_der
from exchanged.pki.pin import PinSource
from exchanged.pki.uri import Pkcs11Uri

SOFTHSM_PATHS = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
)
OPENSC_PATHS = (
    "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so",
    "/usr/lib/aarch64-linux-gnu/opensc-pkcs11.so",
    "/usr/lib/opensc-pkcs11.so",
)
P256_OID = "1.2.840.10045.3.1.7"
RSA_MIN_BITS = 2048
HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512,
}
_RSA_PKCS_MECH = {"sha256": Mechanism.SHA256_RSA_PKCS, "sha384": Mechanism.SHA384_RSA_PKCS,
                  "sha512": Mechanism.SHA512_RSA_PKCS}


class TokenError(ExchangedError):
    code = "token"


def default_module() -> str:
    """The PKCS#11 module: $EXCHANGED_PKCS11_MODULE, else SoftHSM where Debian installs it."""
    env = os.environ.get("EXCHANGED_PKCS11_MODULE")
    if env:
        return env
    for path in SOFTHSM_PATHS:
        if os.path.exists(path):
            return path
    return SOFTHSM_PATHS[0]


_libs: dict[str, Any] = {}
_libs_lock = threading.Lock()


def load_module(path: str | None = None) -> Any:
    """Load (once per process) the PKCS#11 module at `path`."""
    path = path or default_module()
    with _libs_lock:
        if path not in _libs:
            if not os.path.exists(path):
                raise TokenError(f"PKCS#11 module not found: {path} (install softhsm2 or "
                                 "opensc, or set EXCHANGED_PKCS11_MODULE)", code="no-module")
            try:
                _libs[path] = pkcs11.lib(path)
            except (p11e.PKCS11Error, OSError, RuntimeError) as e:
                raise TokenError(f"cannot load PKCS#11 module {path}: {e!r}",
                                 code="no-module") from None
        return _libs[path]


def reset_module(path: str | None = None) -> None:
    """C_Finalize then C_Initialize the module (python-pkcs11's `reinitialize`): after a token
    went away with its connection (p11-kit-client reconnects to its server only here), or a
    reader was replugged. Every Token of that module must be closed first: session and object
    handles of the old instance are reused by the new one. Not while a call may hang on the
    module: C_Finalize holds the interpreter lock."""
    lib = load_module(path)
    try:
        lib.reinitialize()
    except (p11e.PKCS11Error, RuntimeError) as e:
        raise TokenError(f"cannot re-initialise PKCS#11 module {path or default_module()}: "
                         f"{type(e).__name__}") from None


def token_present(path: str | None, uri: Pkcs11Uri) -> str | None:
    """None if the token `uri` names answers (C_GetSlotList, C_GetTokenInfo), else why not.
    Cheap: no login, no signature."""
    try:
        find_token(load_module(path), uri)
    except TokenError as e:
        return str(e)
    except (p11e.PKCS11Error, RuntimeError) as e:  # python-pkcs11 lets some through raw
        return f"the token does not answer: {type(e).__name__}"
    return None


@dataclass(frozen=True)
class ObjectInfo:
    """What `token list` shows of one object; never key material."""

    kind: str  # "private", "public", "cert"
    label: str
    id: str  # hex
    key_type: str | None = None
    key_size: int | None = None
    subject: str | None = None
    sensitive: bool | None = None
    extractable: bool | None = None
    never_extractable: bool | None = None
    always_sensitive: bool | None = None


class Token:
    """A logged-in session to one token, found by the token attributes of a `pkcs11:` URI."""

    def __init__(self, session: Any, token: Any, uri: Pkcs11Uri, module: str) -> None:
        self._session = session
        self._token = token
        self.uri = uri.token_only()
        self.module = module
        self.label = token.label
        self.lock = threading.RLock()

    @classmethod
    def open(cls, uri: Pkcs11Uri, pin: PinSource, *, module: str | None = None,
             rw: bool = True) -> Token:
        module = uri.module_path or module or default_module()
        lib = load_module(module)
        tok = find_token(lib, uri)
        pin_value = pin.read(uri.pin_source, uri_pin_value="pin-value" in uri.query)
        try:
            session = tok.open(user_pin=pin_value, rw=rw)
        except p11e.PinIncorrect:
            raise TokenError(f"wrong PIN for token {tok.label!r} (the token locks after "
                             "too many wrong PINs)", code="wrong-pin") from None
        except p11e.PinLocked:
            raise TokenError(f"token {tok.label!r} is locked after too many wrong PINs: "
                             "the security officer must unblock it", code="pin-locked") from None
        except p11e.PKCS11Error as e:
            raise TokenError(f"cannot log in to token {tok.label!r}: {type(e).__name__}") from None
        finally:
            del pin_value
        return cls(session, tok, uri, module)

    def close(self) -> None:
        """Log out and close the session; a token that is gone is closed all the same."""
        with self.lock:
            if self._session is not None:
                try:
                    self._session.close()
                except (p11e.PKCS11Error, RuntimeError):
                    pass  # the device is gone: there is nothing left to close
                finally:
                    self._session = None

    def __enter__(self) -> Token:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- keys -------------------------------------------------------------------------------

    def generate_keypair(self, label: str, *, key_type: str = "ec", bits: int = 3072) -> TokenKey:
        """Generate a key pair on the token: private half sensitive and never extractable."""
        if not label:
            raise TokenError("a key needs a label")
        with self.lock:
            if self._find(ObjectClass.PRIVATE_KEY, label=label):
                raise TokenError(f"token {self.label!r} already holds a key labelled {label!r}",
                                 code="exists")
            key_id = secrets.token_bytes(16)
            common = {Attribute.TOKEN: True, Attribute.LABEL: label, Attribute.ID: key_id}
            private = {**common, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
                       Attribute.EXTRACTABLE: False, Attribute.SIGN: True,
                       Attribute.DECRYPT: False, Attribute.UNWRAP: False,
                       Attribute.DERIVE: False}
            public = {**common, Attribute.PRIVATE: False, Attribute.VERIFY: True,
                      Attribute.ENCRYPT: False, Attribute.WRAP: False}
            try:
                if key_type == "ec":
                    params = self._session.create_domain_parameters(
                        KeyType.EC,
                        {Attribute.EC_PARAMS: encode_named_curve_parameters(P256_OID)},
                        local=True)
                    params.generate_keypair(
                        store=True, capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                        public_template=public, private_template=private)
                elif key_type == "rsa":
                    if bits < RSA_MIN_BITS:
                        raise TokenError(f"RSA keys must have at least {RSA_MIN_BITS} bits")
                    self._session.generate_keypair(
                        KeyType.RSA, bits, store=True,
                        capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                        public_template=public, private_template=private)
                else:
                    raise TokenError(f"unknown key type {key_type!r} (ec or rsa)")
            except p11e.PKCS11Error as e:
                raise TokenError(f"token {self.label!r} could not generate the key: "
                                 f"{type(e).__name__}") from None
            return self.key(label=label)

    def key(self, label: str | None = None, id: bytes | None = None) -> TokenKey:
        """The private key named by label and/or id, with its public key."""
        if label is None and id is None:
            raise TokenError("name a key by its label (object=) or id (id=)")
        with self.lock:
            found = self._find(ObjectClass.PRIVATE_KEY, label=label, id=id)
            name = label if label is not None else (id or b"").hex()
            if not found:
                raise TokenError(f"token {self.label!r} holds no private key {name!r}",
                                 code="no-key")
            if len(found) > 1:
                raise TokenError(f"token {self.label!r} holds several private keys {name!r}; "
                                 "name it by id", code="ambiguous")
            priv = found[0]
            key_id = bytes(priv[Attribute.ID])
            return TokenKey(self, priv, self._public_key(priv, key_id), priv[Attribute.LABEL],
                            key_id)

    def key_from_uri(self, uri: Pkcs11Uri) -> TokenKey:
        return self.key(label=uri.object, id=uri.id)

    def key_for(self, cert: x509.Certificate, uri: Pkcs11Uri) -> TokenKey:
        """The key `uri` names if `cert` certifies it; else the key on this token that `cert`
        certifies (after a renewal the certificate says which key is the node's). TokenError
        "key-mismatch" if there is none."""
        want = spki_der(cert.public_key())
        with self.lock:
            try:
                named = self.key_from_uri(uri)
                if spki_der(named.public_key) == want:
                    return named
            except TokenError as e:
                if e.code != "no-key":
                    raise
            for key in self.keys():
                if spki_der(key.public_key) == want:
                    return key
        raise TokenError(f"no key on token {self.label!r} is certified by "
                         f"{cert.subject.rfc4514_string()} (serial "
                         f"{cert.serial_number:x}): the certificate belongs to another key",
                         code="key-mismatch")

    def _public_key(self, priv: Any, key_id: bytes) -> Any:
        pubs = self._find(ObjectClass.PUBLIC_KEY, id=key_id)
        if pubs:
            return _to_crypto_public(pubs[0])
        for cert in self._find(ObjectClass.CERTIFICATE, id=key_id):
            return x509.load_der_x509_certificate(bytes(cert[Attribute.VALUE])).public_key()
        raise TokenError(f"token {self.label!r}: no public key or certificate beside private "
                         f"key {priv[Attribute.LABEL]!r}", code="no-key")

    # -- certificates -----------------------------------------------------------------------

    def store_certificate(self, cert: x509.Certificate, *, label: str | None = None) -> TokenKey:
        """Store `cert` beside the private key whose public key it carries (same id and label)."""
        want = spki_der(cert.public_key())
        with self.lock:
            for key in self.keys():
                if spki_der(key.public_key) == want:
                    break
            else:
                raise TokenError(f"token {self.label!r} holds no private key for this "
                                 "certificate", code="no-key")
            if self._find(ObjectClass.CERTIFICATE, id=key.id):
                raise TokenError(f"token {self.label!r} already holds a certificate for key "
                                 f"{key.label!r}", code="exists")
            try:
                self._session.create_object({
                    Attribute.CLASS: ObjectClass.CERTIFICATE,
                    Attribute.CERTIFICATE_TYPE: pkcs11.CertificateType.X_509,
                    Attribute.TOKEN: True, Attribute.PRIVATE: False,
                    Attribute.LABEL: label or key.label, Attribute.ID: key.id,
                    Attribute.SUBJECT: cert.subject.public_bytes(),
                    Attribute.ISSUER: cert.issuer.public_bytes(),
                    Attribute.SERIAL_NUMBER: _der_integer(cert.serial_number),
                    Attribute.VALUE: cert.public_bytes(serialization.Encoding.DER),
                })
            except p11e.PKCS11Error as e:
                raise TokenError(f"token {self.label!r} refused the certificate: "
                                 f"{type(e).__name__}") from None
            return key

    def certificate(self, label: str | None = None, id: bytes | None = None
                    ) -> x509.Certificate | None:
        with self.lock:
            found = self._find(ObjectClass.CERTIFICATE, label=label, id=id)
            if not found:
                return None
            return x509.load_der_x509_certificate(bytes(found[0][Attribute.VALUE]))

    # -- listing ----------------------------------------------------------------------------

    def keys(self) -> Iterator[TokenKey]:
        with self.lock:
            privs = self._find(ObjectClass.PRIVATE_KEY)
            for priv in privs:
                key_id = bytes(priv[Attribute.ID])
                yield TokenKey(self, priv, self._public_key(priv, key_id), priv[Attribute.LABEL],
                               key_id)

    def list_objects(self) -> list[ObjectInfo]:
        out: list[ObjectInfo] = []
        with self.lock:
            for obj in self._find(ObjectClass.PRIVATE_KEY):
                kt = obj[Attribute.KEY_TYPE]
                out.append(ObjectInfo(
                    kind="private", label=obj[Attribute.LABEL], id=bytes(obj[Attribute.ID]).hex(),
                    key_type="ec" if kt == KeyType.EC else "rsa" if kt == KeyType.RSA else str(kt),
                    sensitive=bool(obj[Attribute.SENSITIVE]),
                    extractable=bool(obj[Attribute.EXTRACTABLE]),
                    never_extractable=bool(obj[Attribute.NEVER_EXTRACTABLE]),
                    always_sensitive=bool(obj[Attribute.ALWAYS_SENSITIVE])))
            for obj in self._find(ObjectClass.PUBLIC_KEY):
                pub = _to_crypto_public(obj)
                out.append(ObjectInfo(
                    kind="public", label=obj[Attribute.LABEL], id=bytes(obj[Attribute.ID]).hex(),
                    key_type="ec" if isinstance(pub, ec.EllipticCurvePublicKey) else "rsa",
                    key_size=pub.key_size))
            for obj in self._find(ObjectClass.CERTIFICATE):
                cert = x509.load_der_x509_certificate(bytes(obj[Attribute.VALUE]))
                out.append(ObjectInfo(kind="cert", label=obj[Attribute.LABEL],
                                      id=bytes(obj[Attribute.ID]).hex(),
                                      subject=cert.subject.rfc4514_string()))
        return out

    def _find(self, cls: ObjectClass, *, label: str | None = None,
              id: bytes | None = None) -> list[Any]:
        attrs: dict[Attribute, Any] = {Attribute.CLASS: cls}
        if label is not None:
            attrs[Attribute.LABEL] = label
        if id is not None:
            attrs[Attribute.ID] = id
        if self._session is None:
            raise TokenError(f"token {self.label!r} is closed")
        try:
            return list(self._session.get_objects(attrs))
        except p11e.PKCS11Error as e:
            raise TokenError(f"token {self.label!r}: cannot search objects: "
                             f"{type(e).__name__}") from None

    def _sign(self, priv: Any, data: bytes, mechanism: Mechanism,
              mechanism_param: Any = None) -> bytes:
        with self.lock:
            if self._session is None:
                raise TokenError(f"token {self.label!r} is closed")
            try:
                return bytes(priv.sign(data, mechanism=mechanism,
                                       mechanism_param=mechanism_param))
            except p11e.PKCS11Error as e:
                raise TokenError(f"token {self.label!r} failed to sign: "
                                 f"{type(e).__name__}") from None


def find_token(lib: Any, uri: Pkcs11Uri) -> Any:
    """The one token the URI's token attributes name; an error if none or several match."""
    want = {k: uri.attrs.get(k) for k in ("token", "serial", "manufacturer", "model")}
    try:
        tokens = [t for t in lib.get_tokens() if t.flags & pkcs11.TokenFlag.TOKEN_INITIALIZED]
    except p11e.PKCS11Error as e:
        raise TokenError(f"cannot list tokens: {type(e).__name__}") from None
    matches = [t for t in tokens if
               (want["token"] is None or t.label == want["token"]) and
               (want["serial"] is None or _text(t.serial) == want["serial"]) and
               (want["manufacturer"] is None or t.manufacturer_id == want["manufacturer"]) and
               (want["model"] is None or _text(t.model) == want["model"])]
    described = ";".join(f"{k}={v}" for k, v in want.items() if v is not None) or "(any)"
    if not matches:
        labels = ", ".join(repr(t.label) for t in tokens) or "none"
        raise TokenError(f"no token matches {described} (tokens present: {labels})",
                         code="no-token")
    if len(matches) > 1:
        raise TokenError(f"{len(matches)} tokens match {described}: name one by serial=",
                         code="ambiguous")
    return matches[0]


def list_tokens(module: str | None = None) -> list[dict[str, str]]:
    lib = load_module(module)
    return [{"label": t.label, "serial": _text(t.serial), "manufacturer": t.manufacturer_id,
             "model": _text(t.model)} for t in lib.get_tokens()
            if t.flags & pkcs11.TokenFlag.TOKEN_INITIALIZED]


class TokenKey:
    """A private key on a token (a handle, never the key) and its public key."""

    def __init__(self, token: Token, priv: Any, public_key: Any, label: str, id: bytes) -> None:
        self.token = token
        self._priv = priv
        self.public_key = public_key
        self.label = label
        self.id = id

    @property
    def uri(self) -> Pkcs11Uri:
        return self.token.uri.with_object(self.label, self.id, "private")

    @property
    def key_type(self) -> str:
        return "ec" if isinstance(self.public_key, ec.EllipticCurvePublicKey) else "rsa"

    def attribute(self, attr: Attribute) -> Any:
        with self.token.lock:
            return self._priv[attr]

    def sign(self, data: bytes, hash_name: str = "sha256", *, pss: bool = False) -> bytes:
        """Sign `data` on the token: a DER ECDSA signature, or an RSA PKCS#1 v1.5/PSS one."""
        algorithm = HASHES[hash_name]()
        if self.key_type == "ec":
            h = hashes.Hash(algorithm)
            h.update(data)
            # SoftHSM 2.6 lacks CKM_ECDSA_SHA256: hash here, sign the digest with CKM_ECDSA.
            raw = self.token._sign(self._priv, h.finalize(), Mechanism.ECDSA)
            half = len(raw) // 2
            return utils.encode_dss_signature(int.from_bytes(raw[:half], "big"),
                                              int.from_bytes(raw[half:], "big"))
        if pss:
            mech = {"sha256": Mechanism.SHA256_RSA_PKCS_PSS,
                    "sha384": Mechanism.SHA384_RSA_PKCS_PSS,
                    "sha512": Mechanism.SHA512_RSA_PKCS_PSS}[hash_name]
            mgf = {"sha256": pkcs11.MGF.SHA256, "sha384": pkcs11.MGF.SHA384,
                   "sha512": pkcs11.MGF.SHA512}[hash_name]
            hmech = {"sha256": Mechanism.SHA256, "sha384": Mechanism.SHA384,
                     "sha512": Mechanism.SHA512}[hash_name]
            return self.token._sign(self._priv, data, mech, (hmech, mgf, algorithm.digest_size))
        return self.token._sign(self._priv, data, _RSA_PKCS_MECH[hash_name])

    def signer(self) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
        """A cryptography private-key object whose sign() runs on the token."""
        return _EcTokenSigner(self) if self.key_type == "ec" else _RsaTokenSigner(self)


def _hash_name(algorithm: hashes.HashAlgorithm) -> str:
    if algorithm.name not in HASHES:
        raise TokenError(f"hash {algorithm.name} is not offered for token signatures")
    return algorithm.name


class _EcTokenSigner(ec.EllipticCurvePrivateKey):
    """Lets cryptography's builders sign with an EC key that stays on the token."""

    def __init__(self, key: TokenKey) -> None:
        self._key = key

    def sign(self, data: bytes | bytearray | memoryview,
             signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA) or isinstance(
                signature_algorithm.algorithm, utils.Prehashed):
            raise TokenError("token EC keys sign with ECDSA over unhashed data only")
        return self._key.sign(bytes(data), _hash_name(signature_algorithm.algorithm))

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key  # type: ignore[no-any-return]

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._key.public_key.curve  # type: ignore[no-any-return]

    @property
    def key_size(self) -> int:
        return self._key.public_key.key_size  # type: ignore[no-any-return]

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        raise TokenError("token keys are for signing only")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        raise TokenError("a token-held private key cannot be exported")

    def private_bytes(self, *args: Any, **kwargs: Any) -> bytes:
        raise TokenError("a token-held private key cannot be exported")

    def __copy__(self) -> _EcTokenSigner:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> _EcTokenSigner:
        return self


class _RsaTokenSigner(rsa.RSAPrivateKey):
    """Lets cryptography's builders sign with an RSA key that stays on the token."""

    def __init__(self, key: TokenKey) -> None:
        self._key = key

    def sign(self, data: bytes | bytearray | memoryview, padding_: padding.AsymmetricPadding,
             algorithm: Any) -> bytes:  # HashAlgorithm; cryptography also names Prehashed and
        data = bytes(data)                 # NoDigestInfo, which a token key never takes
        if not isinstance(algorithm, hashes.HashAlgorithm):
            raise TokenError("token RSA keys sign unhashed data only")
        if isinstance(padding_, padding.PSS):
            return self._key.sign(data, _hash_name(algorithm), pss=True)
        if isinstance(padding_, padding.PKCS1v15):
            return self._key.sign(data, _hash_name(algorithm))
        raise TokenError(f"padding {padding_.name} is not offered for token signatures")

    def public_key(self) -> rsa.RSAPublicKey:
        return self._key.public_key  # type: ignore[no-any-return]

    @property
    def key_size(self) -> int:
        return self._key.public_key.key_size  # type: ignore[no-any-return]

    def decrypt(self, ciphertext: bytes, padding: padding.AsymmetricPadding) -> bytes:
        raise TokenError("token keys are for signing only")

    def private_numbers(self) -> rsa.RSAPrivateNumbers:
        raise TokenError("a token-held private key cannot be exported")

    def private_bytes(self, *args: Any, **kwargs: Any) -> bytes:
        raise TokenError("a token-held private key cannot be exported")

    def __copy__(self) -> _RsaTokenSigner:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> _RsaTokenSigner:
        return self


def _to_crypto_public(obj: Any) -> Any:
    kt = obj[Attribute.KEY_TYPE]
    if kt == KeyType.EC:
        return serialization.load_der_public_key(encode_ec_public_key(obj))
    if kt == KeyType.RSA:
        n = int.from_bytes(bytes(obj[Attribute.MODULUS]), "big")
        e = int.from_bytes(bytes(obj[Attribute.PUBLIC_EXPONENT]), "big")
        return rsa.RSAPublicNumbers(e, n).public_key()
    raise TokenError(f"unsupported key type on token: {kt}")


def _der_integer(value: int) -> bytes:
    body = value.to_bytes(value.bit_length() // 8 + 1, "big", signed=True)
    return bytes([0x02, len(body)]) + body if len(body) < 128 else (
        bytes([0x02, 0x81, len(body)]) + body)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip()
    return str(value).strip()
