"""Certificate-chain validation with CRLs: is this certificate good, at this time, for this use?

Two halves:

* **Path building and checking** is left to `cryptography.x509.verification` (a Rust path builder
  with a signature-check budget, so a hostile bag of intermediates cannot drive it into an
  exponential search). We only choose its extension policies: RFC 5280 rather than web-PKI
  rules (no SAN or EKU demanded of the leaf, a CA certificate need not carry keyUsage), and a few
  RFC 5280 MUSTs the stock policies do not enforce (AKI on non-self-signed CA certificates, SKI on
  CA certificates, positive serials).
* **Revocation** is our own RFC 5280 §6.3 processing of CRLs for every certificate of the
  verified chain except the trust anchor: CRL issuer and signer (including a separate
  cRLSign key of the same CA and indirect CRLs), freshness, CRL numbers, issuingDistributionPoint
  scopes, onlySomeReasons coverage, delta CRLs, unknown critical extensions, holds.

`CrlSet` parses and indexes CRLs once, so a daemon keeps one and reuses it for every handshake;
`validate()` returns the verified chain or raises `ValidationError` whose `.code` says why.
"""

from __future__ import annotations

import base64
import datetime as dt
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification as xv
from cryptography.x509.oid import CRLEntryExtensionOID, ExtendedKeyUsageOID, ExtensionOID

from exchanged.errors import ExchangedError
from exchanged.pki import path as pathmod
from exchanged.pki.path import NameKey, name_key, names_equal

__all__ = ["PURPOSES", "REASON_CODES", "CrlInfo", "CrlSet", "ValidationError", "check_crl",
           "crl_der", "describe", "validate"]

#: Every value `ValidationError.code` can take.
REASON_CODES = (
    "revoked",          # on a usable CRL with a reason other than certificateHold
    "suspended",        # on a usable CRL with reason certificateHold
    "expired",          # a certificate of the path is past notAfter at the validation time
    "not-yet-valid",    # ... or before notBefore
    "unknown-issuer",   # no issuer name chain from the leaf reaches a trusted certificate
    "crl-missing",      # no usable complete CRL (or the usable ones cover only some reasons)
    "crl-stale",        # the best CRL there is for the certificate is past its nextUpdate
    "bad-signature",    # a certificate or every CRL for it was signed by some other key
    "wrong-key-usage",  # the leaf (or a CA's EKU) does not allow the requested purpose
    "crl-invalid",      # CRLs exist but none is usable (unknown critical extension, no cRLSign...)
    "invalid",          # anything else the path validator rejects; its message is passed on
)

#: purpose -> (keyUsage bits the leaf must assert, EKUs the leaf must list)
PURPOSES: dict[str, tuple[tuple[str, ...], tuple[x509.ObjectIdentifier, ...]]] = {
    "node": (("digital_signature",),
             (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)),
    "person": (("digital_signature", "content_commitment"),
               (ExtendedKeyUsageOID.CLIENT_AUTH,)),
}

_RFC_KU_NAMES = {"digital_signature": "digitalSignature",
                 "content_commitment": "nonRepudiation (contentCommitment)"}
_EKU_NAMES = {ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
              ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth"}

# RFC 5280 5.3.1 reasons an onlySomeReasons scope can name; full coverage is all of them.
_ALL_REASONS = frozenset({
    x509.ReasonFlags.key_compromise, x509.ReasonFlags.ca_compromise,
    x509.ReasonFlags.affiliation_changed, x509.ReasonFlags.superseded,
    x509.ReasonFlags.cessation_of_operation, x509.ReasonFlags.certificate_hold,
    x509.ReasonFlags.privilege_withdrawn, x509.ReasonFlags.aa_compromise,
})

# CRL extensions we process or that carry no obligation; any other critical one makes the CRL
# unusable (RFC 5280 5.2).
_KNOWN_CRL_EXTENSIONS = frozenset({
    ExtensionOID.CRL_NUMBER, ExtensionOID.DELTA_CRL_INDICATOR,
    ExtensionOID.ISSUING_DISTRIBUTION_POINT, ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
    ExtensionOID.ISSUER_ALTERNATIVE_NAME, ExtensionOID.FRESHEST_CRL,
    ExtensionOID.AUTHORITY_INFORMATION_ACCESS,
})
_KNOWN_ENTRY_EXTENSIONS = frozenset({
    CRLEntryExtensionOID.CRL_REASON, CRLEntryExtensionOID.INVALIDITY_DATE,
    CRLEntryExtensionOID.CERTIFICATE_ISSUER,
})

# DER fragments whose absence from revokedCertificates proves that no entry has a critical
# extension (BOOLEAN TRUE followed by the extnValue OCTET STRING) or a certificateIssuer (its
# OID); see _Crl.index().
_DER_CRITICAL_TRUE = b"\x01\x01\xff\x04"
_DER_CERTIFICATE_ISSUER_OID = b"\x06\x03\x55\x1d\x1d"

# Marker our extension-policy callbacks put in their exceptions, so the verifier's error string
# (which embeds them) can be mapped back to a reason code.
_WRONG_KU_MARK = "[wrong-key-usage]"

# Most certificates (other than the issuer) tried as the signer of one CRL.
_MAX_CRL_SIGNERS = 8

_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----(.*?)-----END X509 CRL-----", re.DOTALL)


class ValidationError(ExchangedError):
    """Why a certificate is not good: `.code` is one of REASON_CODES.

    `.message` is the human text naming the reason and the certificate concerned (subject and
    serial in hex); `.certificate` is that certificate when known; `.crl_reason` is the RFC 5280
    reason name (e.g. "keyCompromise") for "revoked" and "suspended".
    """

    code = "invalid"

    def __init__(self, code: str, message: str, *, certificate: x509.Certificate | None = None,
                 crl_reason: str | None = None) -> None:
        assert code in REASON_CODES, code
        super().__init__(message, code=code)
        self.certificate = certificate
        self.crl_reason = crl_reason

    @property
    def message(self) -> str:
        return str(self)


def describe(cert: x509.Certificate) -> str:
    """'CN=alice,O=unit (serial 1f3a...)': how messages name a certificate."""
    subject = cert.subject.rfc4514_string() or "<empty subject>"
    if len(subject) > 200:  # hostile certificates carry thousands of attributes
        subject = subject[:200] + "..."
    return f"{subject} (serial {_serial(cert):x})"


def _serial(cert: x509.Certificate) -> int:
    """cert.serial_number, read from the DER: cryptography warns (an error under pytest) when
    code reads a zero or negative serial, and we must read one to refuse it."""
    tbs = cert.tbs_certificate_bytes
    _, pos, _ = _der_header(tbs, 0)
    if tbs[pos] == 0xA0:  # [0] version
        pos = _der_header(tbs, pos)[2]
    _, start, end = _der_header(tbs, pos)
    return int.from_bytes(tbs[start:end], "big", signed=True)


def _utc(when: dt.datetime | None) -> dt.datetime:
    """Aware UTC, floored to the second: certificates and CRLs only have second granularity,
    and RFC 5280's inclusive notAfter means 00:00:00.5 is still within a notAfter of 00:00:00."""
    if when is None:
        when = dt.datetime.now(dt.UTC)
    elif when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)  # naive times are UTC by contract
    return when.astimezone(dt.UTC).replace(microsecond=0)


_E = TypeVar("_E", bound=x509.ExtensionType)


def _ext(cert: x509.Certificate, cls: type[_E]) -> _E | None:
    """The extension's value, None when absent; "invalid" when the certificate's extensions
    cannot be parsed (cryptography parses them all at once, and the path validator only
    looks at those it knows)."""
    try:
        return cert.extensions.get_extension_for_class(cls).value
    except x509.ExtensionNotFound:
        return None
    except ValueError as e:
        raise ValidationError("invalid", f"{describe(cert)}: its extensions cannot be parsed "
                              f"({e})", certificate=cert) from None


def _is_ca(cert: x509.Certificate) -> bool:
    bc = _ext(cert, x509.BasicConstraints)
    return bool(bc is not None and bc.ca)


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


# --------------------------------------------------------------------------------------------
# CRLs, indexed once


@dataclass(eq=False)
class _Crl:
    """One CRL with what validation needs precomputed; `problem` says why it is never usable."""

    crl: x509.CertificateRevocationList
    source: str
    issuer: x509.Name
    this_update: dt.datetime
    next_update: dt.datetime | None
    number: int | None = None
    base_number: int | None = None  # deltaCRLIndicator: this is a delta on top of that base
    idp: x509.IssuingDistributionPoint | None = None
    key_id: bytes | None = None  # authorityKeyIdentifier: which key signed it
    problem: str | None = None
    # serial -> entry, for entries about certificates of the CRL issuer itself
    direct: dict[int, x509.RevokedCertificate] = field(default_factory=dict)
    # ... or, in the usual case (see `index`), only the serials, the entry read on a hit
    direct_serials: frozenset[int] | None = None
    # (certificate issuer, serial) -> entry, for other issuers' entries of an indirect CRL
    indirect: dict[tuple[NameKey, int], x509.RevokedCertificate] = field(default_factory=dict)
    # SPKI DER of a key -> does the CRL signature verify with it (a CrlSet is long-lived)
    signature_ok: dict[bytes, bool] = field(default_factory=dict)

    @classmethod
    def parse(cls, crl: x509.CertificateRevocationList, source: str,
              der: bytes | None = None) -> _Crl:
        """`der` is the CRL's encoding when the caller has it (re-encoding 100,000 entries
        costs cryptography ~0.1 s)."""
        next_update = crl.next_update_utc
        c = cls(crl=crl, source=source, issuer=crl.issuer, this_update=crl.last_update_utc,
                next_update=next_update)
        try:
            extensions = list(crl.extensions)
        except ValueError as e:
            c.problem = f"its extensions cannot be parsed ({e})"
            return c
        for ext in extensions:
            if ext.oid not in _KNOWN_CRL_EXTENSIONS and ext.critical:
                c.problem = f"it has an unknown critical extension {ext.oid.dotted_string}"
            elif isinstance(ext.value, x509.CRLNumber):
                c.number = ext.value.crl_number
                if ext.critical:  # RFC 5280 5.2.3: MUST be non-critical
                    c.problem = "its cRLNumber extension is marked critical"
            elif isinstance(ext.value, x509.DeltaCRLIndicator):
                c.base_number = ext.value.crl_number
            elif isinstance(ext.value, x509.IssuingDistributionPoint):
                c.idp = ext.value
            elif isinstance(ext.value, x509.AuthorityKeyIdentifier):
                c.key_id = ext.value.key_identifier
        if c.problem is None and c.number is None:
            c.problem = "it has no cRLNumber (RFC 5280 5.2.3)"
        if c.problem is None and next_update is None:
            # A CRL without nextUpdate could never be judged stale, so an arbitrarily old one
            # would be accepted: we refuse it (RFC 5280 5.1.2.5: CAs MUST include nextUpdate).
            c.problem = "it has no nextUpdate"
        c.index(der if der is not None else crl.public_bytes(serialization.Encoding.DER))
        return c

    @property
    def is_indirect(self) -> bool:
        return bool(self.idp is not None and self.idp.indirect_crl)

    @property
    def reasons(self) -> frozenset[x509.ReasonFlags]:
        """The reasons this CRL covers (onlySomeReasons, else all)."""
        if self.idp is not None and self.idp.only_some_reasons:
            return frozenset(self.idp.only_some_reasons) & _ALL_REASONS
        return _ALL_REASONS

    @property
    def scope(self) -> tuple[NameKey, x509.IssuingDistributionPoint | None]:
        """CRLs with the same scope compete (highest number wins); a delta needs one."""
        return (name_key(self.issuer), self.idp)

    def index(self, der: bytes) -> None:
        """Build the serial -> entry dictionaries (O(1) lookup afterwards).

        Measured on a 100,000-entry CRL (4.7 MB; half the entries with a reasonCode, a tenth
        with an invalidityDate; cryptography 50, one core): reading every entry's extensions
        through cryptography takes ~0.45 s, a pure-Python DER walker doing the same ~0.3-0.4 s,
        asn1crypto ~3.7 s. Extensions only matter here when an entry has a critical one (the CRL
        becomes unusable) or a certificateIssuer (indirect CRLs), and both leave a fixed DER
        fragment in revokedCertificates; when neither occurs (the usual case) we index serials
        only and read an entry's reasonCode when its serial is hit: CrlSet.load() of that file
        takes ~0.11 s (`time`: 0.21 s for the whole process, 0.08 s of it importing), and
        from_crls() ~0.2 s as it has to re-encode the CRL. A lookup is a dict access (~0.1 us).
        """
        crl = self.crl
        region = _revoked_region(der)
        if _DER_CRITICAL_TRUE not in region and _DER_CERTIFICATE_ISSUER_OID not in region:
            # Only the serials are kept: loading a 100,000-entry CRL took 24-29 MiB with a
            # dict of entry objects, 13 with a frozenset of serials (its own 4.7 MB encoding
            # included). The entry of a serial that is hit is read from the CRL then
            # (cryptography scans it: milliseconds; a refused peer's verdict is cached).
            serials = frozenset(entry.serial_number for entry in crl)
            if len(serials) == len(crl):
                self.direct_serials = serials
                return
            # A serial listed twice (a broken CA): let a revocation win over removeFromCRL.
            self.direct = {}
            for entry in crl:
                self._put(None, entry)
            return
        # Full scan: entry extensions, certificateIssuer carried over to following entries
        # (RFC 5280 5.3.3).
        current: NameKey | None = None  # None: the CRL issuer
        for entry in crl:
            try:
                extensions = list(entry.extensions)
            except ValueError as e:
                self.problem = self.problem or (
                    f"the entry for serial {entry.serial_number:x} cannot be parsed ({e})")
                extensions = []
            for ext in extensions:
                if ext.oid not in _KNOWN_ENTRY_EXTENSIONS and ext.critical:
                    self.problem = self.problem or (
                        f"the entry for serial {entry.serial_number:x} has an unknown critical "
                        f"extension {ext.oid.dotted_string}")
                if isinstance(ext.value, x509.CertificateIssuer):
                    if not self.is_indirect:
                        self.problem = self.problem or (
                            "it has a certificateIssuer entry but is not an indirect CRL")
                    # RFC 5280 5.3.3: the entry and those that follow it are about
                    # certificates of this issuer; names compared per 7.1.
                    names = [n.value for n in ext.value if isinstance(n, x509.DirectoryName)]
                    current = name_key(names[0]) if names else ()
                    if names and names_equal(names[0], self.issuer):
                        current = None
            self._put(current, entry)

    def _put(self, issuer: NameKey | None, entry: x509.RevokedCertificate) -> None:
        """Index an entry; of two for the same certificate, keep the one that revokes."""
        table: dict[Any, x509.RevokedCertificate] = \
            self.direct if issuer is None else self.indirect
        key = entry.serial_number if issuer is None else (issuer, entry.serial_number)
        old = table.get(key)
        if old is None or _reason(old) is x509.ReasonFlags.remove_from_crl:
            table[key] = entry

    def lookup(self, cert: x509.Certificate) -> x509.RevokedCertificate | None:
        if names_equal(cert.issuer, self.issuer):
            serial = _serial(cert)
            if self.direct_serials is not None:
                if serial not in self.direct_serials:
                    return None
                return self.crl.get_revoked_certificate_by_serial_number(serial)
            return self.direct.get(serial)
        return self.indirect.get((name_key(cert.issuer), _serial(cert)))

    def verifies_with(self, cert: x509.Certificate) -> bool:
        try:
            key = cert.public_key()
        except (ValueError, UnsupportedAlgorithm):  # junk from a peer's bag of certificates
            return False
        spki = key.public_bytes(serialization.Encoding.DER,
                                serialization.PublicFormat.SubjectPublicKeyInfo)
        ok = self.signature_ok.get(spki)
        if ok is None:
            try:
                ok = self.crl.is_signature_valid(key)  # type: ignore[arg-type]
            except (TypeError, ValueError, UnsupportedAlgorithm):  # e.g. an X25519 key
                ok = False
            self.signature_ok[spki] = ok
        return ok

    def describe(self) -> str:
        number = "" if self.number is None else f" number {self.number}"
        kind = "delta CRL" if self.base_number is not None else "CRL"
        return f"{kind}{number} of {self.issuer.rfc4514_string()} ({self.source})"


def _der_header(buf: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, value start, value end) of the DER element at pos."""
    tag, n = buf[pos], buf[pos + 1]
    pos += 2
    if n & 0x80:
        k = n & 0x7F
        n = int.from_bytes(buf[pos:pos + k], "big")
        pos += k
    return tag, pos, pos + n


def _revoked_region(der: bytes) -> bytes:
    """The revokedCertificates bytes of a CertificateList (RFC 5280 5.1), b"" when none.

    `der` was already parsed by cryptography, so it is well-formed DER; on any surprise we
    return it whole, which only sends index() down the slower full scan.
    """
    tbs = der
    try:
        _, pos, _ = _der_header(tbs, 0)  # CertificateList
        _, pos, end = _der_header(tbs, pos)  # tbsCertList
        tag, _, nxt = _der_header(tbs, pos)
        if tag == 0x02:  # version
            pos = nxt
        for _ in range(3):  # signature, issuer, thisUpdate
            pos = _der_header(tbs, pos)[2]
        if pos < end and tbs[pos] in (0x17, 0x18):  # nextUpdate
            pos = _der_header(tbs, pos)[2]
        if pos < end and tbs[pos] == 0x30:
            _, start, stop = _der_header(tbs, pos)
            return tbs[start:stop]
        return b""
    except IndexError:
        return der


class CrlSet:
    """CRLs parsed and indexed once, for reuse by every validate() call.

    Lookup of a certificate on a CRL is a dictionary access; CRLs are grouped by issuer name.
    """

    def __init__(self) -> None:
        self._crls: list[_Crl] = []
        self._by_issuer: dict[NameKey, list[_Crl]] = {}

    def _add(self, crl: x509.CertificateRevocationList, source: str,
             der: bytes | None = None) -> None:
        c = _Crl.parse(crl, source, der)
        self._crls.append(c)
        self._by_issuer.setdefault(name_key(c.issuer), []).append(c)

    @classmethod
    def from_crls(cls, crls: Iterable[x509.CertificateRevocationList]) -> CrlSet:
        s = cls()
        for i, crl in enumerate(crls):
            s._add(crl, f"CRL #{i + 1}")
        return s

    @classmethod
    def load(cls, paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> CrlSet:
        """Read CRL files: DER, or PEM holding one or more X509 CRL blocks.

        Raises ExchangedError (code "bad-crl-file") naming the file that cannot be read or
        holds no CRL.
        """
        if isinstance(paths, str | os.PathLike):
            paths = [paths]
        s = cls()
        for path in paths:
            p = Path(path)
            try:
                data = p.read_bytes()
            except OSError as e:
                raise ExchangedError(f"cannot read CRL file {p}: {e.strerror or e}",
                                     code="bad-crl-file") from None
            for i, (crl, der) in enumerate(_parse_crl_file(p, data)):
                s._add(crl, str(p) if i == 0 else f"{p} #{i + 1}", der)
        return s

    def __len__(self) -> int:
        return len(self._crls)

    def __iter__(self) -> Iterator[x509.CertificateRevocationList]:
        return (c.crl for c in self._crls)

    def _issued_by(self, name: x509.Name) -> list[_Crl]:
        return self._by_issuer.get(name_key(name), [])

    def newest(self, issuer: x509.Name) -> CrlInfo | None:
        """The complete CRL with the highest number `issuer` signed in this set (whether or
        not it is usable: that is for `validate` to judge), or None."""
        best = None
        for c in self._issued_by(issuer):
            if c.base_number is None and c.number is not None and (
                    best is None or c.number > (best.number or 0)):
                best = c
        return None if best is None else CrlInfo.of(best)


@dataclass(frozen=True)
class CrlInfo:
    """What a node shows of a CRL it holds."""

    issuer: x509.Name
    number: int
    this_update: dt.datetime
    next_update: dt.datetime | None
    entries: int
    source: str
    crl: x509.CertificateRevocationList

    @classmethod
    def of(cls, c: _Crl) -> CrlInfo:
        return cls(issuer=c.issuer, number=c.number or 0, this_update=c.this_update,
                   next_update=c.next_update, entries=len(c.crl), source=c.source, crl=c.crl)

    def stale(self, at: dt.datetime) -> bool:
        return self.next_update is None or at > self.next_update


CRL_CLOCK_SKEW = dt.timedelta(minutes=5)  # a CRL's thisUpdate may be this far in our future


def check_crl(der: bytes, trusted: Sequence[x509.Certificate], *,
              at: dt.datetime | None = None, source: str = "the offered CRL") -> CrlInfo:
    """A CRL someone hands us, before we hold it: strict DER, signed by one of `trusted`
    (whose keyUsage allows cRLSign) with that CA's own key, complete (no delta, no
    issuingDistributionPoint scope), numbered, with a nextUpdate, not issued in the future.
    Whether it is newer than the one held is the caller's question. Raises ValidationError
    ("crl-invalid" or "bad-signature") saying what is wrong."""
    at = _utc(at)
    try:
        crl = x509.load_der_x509_crl(der)
        if crl.public_bytes(serialization.Encoding.DER) != der:
            raise ValueError("it is not in DER (a re-encoding differs)")
    except ValueError as e:
        raise ValidationError("crl-invalid", f"{source} is not a CRL in DER: {e}") from None
    ca = next((c for c in trusted if c.subject == crl.issuer), None)
    if ca is None:
        raise ValidationError("crl-invalid", f"{source} is issued by "
                              f"{crl.issuer.rfc4514_string()}, which is not a CA we trust")
    ku = _ext(ca, x509.KeyUsage)
    if ku is not None and not ku.crl_sign:
        raise ValidationError("crl-invalid", f"{describe(ca)} may not sign CRLs (keyUsage)")
    try:
        c = _Crl.parse(crl, source, der)
    except ValueError as e:
        raise ValidationError("crl-invalid", f"{source} cannot be read: {e}") from None
    if not c.verifies_with(ca):
        raise ValidationError("bad-signature", f"{c.describe()} is not signed by "
                              f"{describe(ca)}")
    if c.problem is not None:
        raise ValidationError("crl-invalid", f"{c.describe()} is unusable: {c.problem}")
    if c.base_number is not None or c.idp is not None:
        raise ValidationError("crl-invalid", f"{c.describe()} is a delta or partitioned CRL; "
                              "only a complete CRL of the whole CA is taken")
    if c.this_update > at + CRL_CLOCK_SKEW:
        raise ValidationError("crl-invalid", f"{c.describe()} is not valid before "
                              f"{c.this_update:%Y-%m-%d %H:%M:%S}Z: check this node's clock")
    return CrlInfo.of(c)


def crl_der(data: bytes, name: str = "the CRL") -> bytes:
    """One CRL's DER from `data`, DER or PEM (one X509 CRL block); ValidationError if it
    holds no CRL or more than one."""
    try:
        found = _parse_crl_file(Path(name), data)
    except ExchangedError as e:
        raise ValidationError("crl-invalid", str(e)) from None
    if len(found) != 1:
        raise ValidationError("crl-invalid", f"{name} holds {len(found)} CRLs; give one")
    return found[0][1]


def _parse_crl_file(path: Path, data: bytes
                    ) -> list[tuple[x509.CertificateRevocationList, bytes]]:
    """The CRLs of a file with their DER encodings."""
    if b"-----BEGIN" in data:
        blocks = _PEM_CRL.findall(data)
        if not blocks:
            raise ExchangedError(f"{path} holds PEM data but no 'X509 CRL' block",
                                 code="bad-crl-file")
        crls = []
        for i, body in enumerate(blocks, 1):
            try:
                der = base64.b64decode(body)  # skips the line breaks
                crls.append((x509.load_der_x509_crl(der), der))
            except ValueError as e:  # binascii.Error is a ValueError
                raise ExchangedError(f"{path}: PEM CRL block {i} is not a valid CRL ({e})",
                                     code="bad-crl-file") from None
        return crls
    try:
        return [(x509.load_der_x509_crl(data), data)]
    except ValueError:
        raise ExchangedError(f"{path} is not a CRL (neither PEM nor DER)",
                             code="bad-crl-file") from None


# --------------------------------------------------------------------------------------------
# Extension policies for cryptography's verifier


class _PolicyViolation(ValueError):
    pass


def _self_signed(cert: x509.Certificate) -> bool:
    if cert.subject != cert.issuer:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _ca_policy(trusted_der: frozenset[bytes], ekus: tuple[x509.ObjectIdentifier, ...]
               ) -> xv.ExtensionPolicy:
    """webpki_defaults_ca() relaxed and tightened towards RFC 5280:

    * keyUsage may be absent (6.1.4(n) only checks keyCertSign *if* present; x509-limbo
      crl::issuer-no-keyusage-extension); when present, keyCertSign must be asserted;
    * subjectKeyIdentifier required (4.2.1.2: MUST appear in all CA certificates);
    * authorityKeyIdentifier required unless self-signed (4.2.1.1); trust anchors are exempt
      because they are trusted by configuration, not by their issuer (x509-limbo
      cve::cve-2024-0567 has a trusted cross-signed root without AKI);
    * extendedKeyUsage in a CA certificate is only looked at when a purpose is asked for: then
      it must allow the purpose's EKUs (or anyExtendedKeyUsage), as CA EKUs constrain
      their subtree in practice.
    """
    any_eku = x509.ObjectIdentifier("2.5.29.37.0")

    def key_usage(_policy: xv.Policy, cert: x509.Certificate, ku: x509.KeyUsage | None) -> None:
        if ku is not None and not ku.key_cert_sign:
            raise _PolicyViolation("keyUsage of a CA certificate must assert keyCertSign")

    def aki(_policy: xv.Policy, cert: x509.Certificate,
            value: x509.AuthorityKeyIdentifier | None) -> None:
        if value is None and _der(cert) not in trusted_der and not _self_signed(cert):
            raise _PolicyViolation("CA certificate without authorityKeyIdentifier")

    def eku(_policy: xv.Policy, cert: x509.Certificate,
            value: x509.ExtendedKeyUsage | None) -> None:
        if value is None or not ekus or any_eku in value:
            return
        missing = [_EKU_NAMES[oid] for oid in ekus if oid not in value]
        if missing:
            raise _PolicyViolation(f"{_WRONG_KU_MARK} CA extendedKeyUsage excludes "
                                   f"{', '.join(missing)}")

    agnostic, non_critical = xv.Criticality.AGNOSTIC, xv.Criticality.NON_CRITICAL
    return (xv.ExtensionPolicy.webpki_defaults_ca()
            .may_be_present(x509.KeyUsage, agnostic, key_usage)
            .require_present(x509.SubjectKeyIdentifier, non_critical, None)
            .may_be_present(x509.AuthorityKeyIdentifier, non_critical, aki)
            .may_be_present(x509.ExtendedKeyUsage, agnostic, eku))


def _ee_policy() -> xv.ExtensionPolicy:
    """webpki_defaults_ee() without the web PKI's demands (SAN, an EKU matching TLS client or
    server): purposes are checked by validate() itself. Kept from it: AKI required, name
    constraints forbidden, AIA non-critical, unknown critical extensions refused.

    The leaf may be a CA certificate (RFC 5280 4.2.1.9: the last certificate of a path is not
    counted by pathLenConstraint; x509-limbo pathlen::validation-ignores-pathlen-in-leaf), but
    keyCertSign without cA is inconsistent (4.2.1.9), and an empty EKU is malformed
    (4.2.1.12: "one or more purposes"; cryptography already fails to hand one to our callback).
    """

    def key_usage(_policy: xv.Policy, cert: x509.Certificate, ku: x509.KeyUsage | None) -> None:
        if ku is not None and ku.key_cert_sign and not _is_ca(cert):
            raise _PolicyViolation("keyCertSign asserted in a certificate that is not a CA")

    def eku(_policy: xv.Policy, cert: x509.Certificate,
            value: x509.ExtendedKeyUsage | None) -> None:
        if value is not None and len(value) == 0:
            raise _PolicyViolation("empty extendedKeyUsage")

    agnostic = xv.Criticality.AGNOSTIC
    return (xv.ExtensionPolicy.webpki_defaults_ee()
            .may_be_present(x509.SubjectAlternativeName, agnostic, None)
            .may_be_present(x509.BasicConstraints, agnostic, None)
            .may_be_present(x509.KeyUsage, agnostic, key_usage)
            .may_be_present(x509.ExtendedKeyUsage, agnostic, eku))


def _profile_rules(trusted_der: frozenset[bytes], ekus: tuple[x509.ObjectIdentifier, ...]
                   ) -> Callable[[x509.Certificate, bool], str | None]:
    """The rules of _ca_policy() and _ee_policy(), for exchanged.pki.path's own pass."""
    any_eku = x509.ObjectIdentifier("2.5.29.37.0")

    def rules(cert: x509.Certificate, as_ca: bool) -> str | None:
        try:
            ku = _ext(cert, x509.KeyUsage)
            eku = _ext(cert, x509.ExtendedKeyUsage)
            aki = _ext(cert, x509.AuthorityKeyIdentifier)
            ski = _ext(cert, x509.SubjectKeyIdentifier)
        except ValidationError as e:
            return str(e)
        if eku is not None and len(eku) == 0:
            return "empty extendedKeyUsage"
        if as_ca:
            if ski is None:
                return "CA certificate without subjectKeyIdentifier"
            if aki is None and _der(cert) not in trusted_der and not _self_signed(cert):
                return "CA certificate without authorityKeyIdentifier"
            if eku is not None and ekus and any_eku not in eku:
                missing = [_EKU_NAMES[oid] for oid in ekus if oid not in eku]
                if missing:
                    return f"{_WRONG_KU_MARK} CA extendedKeyUsage excludes {', '.join(missing)}"
            return None
        if aki is None and not _self_signed(cert):
            return "certificate without authorityKeyIdentifier"
        if ku is not None and ku.key_cert_sign and not _is_ca(cert):
            return "keyCertSign asserted in a certificate that is not a CA"
        return None

    return rules


_SECOND_LOOK = frozenset({ExtensionOID.NAME_CONSTRAINTS, ExtensionOID.POLICY_CONSTRAINTS,
                          ExtensionOID.POLICY_MAPPINGS})


def _needs_second_look(cert: x509.Certificate) -> bool:
    try:
        return any(e.oid in _SECOND_LOOK for e in cert.extensions)
    except ValueError:
        return True  # let the full pass say what is wrong


def _from_path_error(pe: pathmod.PathError, leaf: x509.Certificate) -> ValidationError:
    cert = pe.cert or leaf
    where = "" if cert is leaf else f"{describe(leaf)}: issuer "
    return ValidationError(pe.code, f"{where}{describe(cert)}: {pe}", certificate=cert)


# --------------------------------------------------------------------------------------------
# Validation


def validate(leaf: x509.Certificate, *, trusted: Sequence[x509.Certificate],
             untrusted: Sequence[x509.Certificate] = (),
             crls: CrlSet | Sequence[x509.CertificateRevocationList] = (),
             at: dt.datetime | None = None, purpose: str | None = None,
             check_revocation: bool = True, max_chain_depth: int | None = None,
             stale_ok: bool = False) -> list[x509.Certificate]:
    """Validate `leaf` and return the verified chain, leaf first, trust anchor last.

    trusted: the trust anchors. untrusted: intermediates the path may use (and CRL-signing
    certificates). crls: a CrlSet (build it once and reuse it) or CRL objects.
    at: the validation time, default now; naive datetimes are UTC.
    purpose: None for plain RFC 5280 path validation (no keyUsage or EKU demanded of the
    leaf), "node" (keyUsage digitalSignature, EKU serverAuth and clientAuth) or "person"
    (keyUsage digitalSignature and nonRepudiation, EKU clientAuth).
    check_revocation: every certificate of the chain except the trust anchor must then be
    covered by a usable CRL - with no CRLs that is "crl-missing".
    max_chain_depth: the most intermediates allowed (cryptography's default, 8, when None).
    stale_ok: a CRL past its nextUpdate still decides (a node's `stale_crl = "warn"` policy:
    the newest revocations it knows of still apply; it warns elsewhere).

    Raises ValidationError (codes in REASON_CODES).
    """
    if purpose is not None and purpose not in PURPOSES:
        raise ValueError(f"unknown purpose {purpose!r} (expected one of {sorted(PURPOSES)})")
    crlset = crls if isinstance(crls, CrlSet) else CrlSet.from_crls(crls)
    run = _Run(trusted=list(trusted), untrusted=list(untrusted), crls=crlset, at=_utc(at),
               max_chain_depth=max_chain_depth, stale_ok=stale_ok)
    return run.validate(leaf, purpose=purpose, check_revocation=check_revocation)


@dataclass
class _Failure:
    """Why one CRL cannot be used for one certificate; higher rank = got further."""

    rank: int
    code: str
    text: str


class _Run:
    """State of one validate() call: the certificate pool, and the guard and cache for the
    recursive validation of CRL-signing certificates."""

    def __init__(self, *, trusted: list[x509.Certificate], untrusted: list[x509.Certificate],
                 crls: CrlSet, at: dt.datetime, max_chain_depth: int | None,
                 stale_ok: bool = False) -> None:
        self.stale_ok = stale_ok
        self.trusted = trusted
        self.untrusted = untrusted
        self.crls = crls
        self.at = at
        self.max_chain_depth = max_chain_depth
        self.trusted_der = frozenset(_der(c) for c in trusted)
        self.by_subject: dict[NameKey, list[x509.Certificate]] = {}
        for c in trusted + untrusted:
            self.by_subject.setdefault(name_key(c.subject), []).append(c)
        self.in_progress: set[bytes] = set()
        self.signer_results: dict[tuple[bytes, bytes], str | None] = {}

    # -- the path -------------------------------------------------------------------------

    def validate(self, leaf: x509.Certificate, *, purpose: str | None,
                 check_revocation: bool) -> list[x509.Certificate]:
        chain = self.path(leaf, purpose)
        if check_revocation:
            key = _der(leaf)
            self.in_progress.add(key)
            try:
                # From the anchor down: a revoked CA is the root cause of anything below it.
                for i in range(len(chain) - 2, -1, -1):
                    self.check_status(chain[i], chain[i + 1], chain[-1])
            finally:
                self.in_progress.discard(key)
        return chain

    def path(self, leaf: x509.Certificate, purpose: str | None) -> list[x509.Certificate]:
        self.check_validity(leaf)
        if not self.trusted:
            raise ValidationError("unknown-issuer", f"{describe(leaf)}: no trusted certificates",
                                  certificate=leaf)
        ekus = PURPOSES[purpose][1] if purpose else ()
        builder = (xv.PolicyBuilder().store(xv.Store(self.trusted)).time(self.at)
                   .extension_policies(ca_policy=_ca_policy(self.trusted_der, ekus),
                                       ee_policy=_ee_policy()))
        if self.max_chain_depth is not None:
            builder = builder.max_chain_depth(self.max_chain_depth)
        profile = pathmod.Profile(at=self.at, trusted_der=self.trusted_der,
                                  extra=_profile_rules(self.trusted_der, ekus))
        try:
            chain = builder.build_client_verifier().verify(leaf, self.untrusted).chain
        except xv.VerificationError as e:
            # cryptography refuses some valid paths (see exchanged.pki.path): search ourselves,
            # and accept only a path that passes every rule there.
            refusal = self.classify(leaf, str(e))
            try:
                chain = pathmod.build(leaf, self.trusted, self.untrusted, profile,
                                      max_intermediates=8 if self.max_chain_depth is None
                                      else self.max_chain_depth)
            except pathmod.PathError as pe:
                if refusal.code != "invalid" or pe.code == "unknown-issuer":
                    raise refusal from None
                raise _from_path_error(pe, leaf) from None
        else:
            # What cryptography skips: name constraints of the types it does not support
            # (directoryName, URI...) when not critical, certificate policies. Our pass on
            # its chain, signatures already checked; everything else it enforces itself at
            # least as strictly, so a chain without those extensions needs no second look.
            if any(_needs_second_look(c) for c in chain):
                try:
                    pathmod.check_path(chain, profile, lambda _c, _i: None)
                except pathmod.PathError as pe:
                    raise _from_path_error(pe, leaf) from None
        for cert in chain[:-1]:
            # RFC 5280 4.1.2.2: positive. cryptography accepts 0 for compatibility with old
            # roots; our PKI never issues it, so a 0 is a forgery or a foreign certificate.
            if _serial(cert) <= 0:
                raise ValidationError("invalid", f"{describe(cert)}: serial number must be "
                                      "positive", certificate=cert)
        if purpose is not None:
            self.check_purpose(leaf, purpose)
        return chain

    def check_validity(self, cert: x509.Certificate) -> None:
        if self.at < cert.not_valid_before_utc:
            raise ValidationError("not-yet-valid", f"{describe(cert)} is not valid before "
                                  f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S}Z (checked at "
                                  f"{self.at:%Y-%m-%d %H:%M:%S}Z)", certificate=cert)
        if self.at > cert.not_valid_after_utc:
            raise ValidationError("expired", f"{describe(cert)} expired at "
                                  f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S}Z (checked at "
                                  f"{self.at:%Y-%m-%d %H:%M:%S}Z)", certificate=cert)

    def issuer_names_reachable(self, leaf: x509.Certificate) -> tuple[bool, list[x509.Certificate]]:
        """Follow issuer names up from the leaf through the pool (names only, no signatures).

        Returns whether a trusted certificate's subject is reached, and the certificates met.
        """
        trusted_names = {name_key(c.subject) for c in self.trusted}
        seen: set[NameKey] = set()
        todo = [name_key(leaf.issuer)]
        met: list[x509.Certificate] = []
        reached = False
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            reached = reached or name in trusted_names
            for c in self.by_subject.get(name, ()):
                met.append(c)
                todo.append(name_key(c.issuer))
        return reached, met

    def classify(self, leaf: x509.Certificate, error: str) -> ValidationError:
        """Map cryptography's VerificationError text to our reason codes."""
        text = error.removeprefix("validation failed: ")
        text = text.replace("Python extension validator failed: _PolicyViolation: ", "")
        reached, met = self.issuer_names_reachable(leaf)
        if not reached:
            return ValidationError("unknown-issuer", f"{describe(leaf)}: no issuer chain to a "
                                   f"trusted certificate (issuer {leaf.issuer.rfc4514_string()} "
                                   "unknown)", certificate=leaf)
        if "not valid at validation time" in text:
            for c in met:  # which CA certificate on the way up is out of its validity period
                try:
                    self.check_validity(c)
                except ValidationError as e:
                    return ValidationError(e.code, f"{describe(leaf)}: issuer {e}",
                                           certificate=c)
        if _WRONG_KU_MARK in text:
            return ValidationError("wrong-key-usage", f"{describe(leaf)}: "
                                   f"{text.replace(_WRONG_KU_MARK, '').strip()}",
                                   certificate=leaf)
        if "signature does not match" in text:
            return ValidationError("bad-signature", f"{describe(leaf)}: no issuer certificate's "
                                   f"key verifies the signature ({text})", certificate=leaf)
        return ValidationError("invalid", f"{describe(leaf)}: {text}", certificate=leaf)

    def check_purpose(self, leaf: x509.Certificate, purpose: str) -> None:
        bits, ekus = PURPOSES[purpose]
        ku = _ext(leaf, x509.KeyUsage)
        missing = [_RFC_KU_NAMES[b] for b in bits if ku is None or not getattr(ku, b)]
        eku = _ext(leaf, x509.ExtendedKeyUsage)
        missing += [_EKU_NAMES[oid] for oid in ekus
                    if eku is None or oid not in eku]
        if missing:
            raise ValidationError("wrong-key-usage", f"{describe(leaf)} is not a {purpose} "
                                  f"certificate: it lacks {', '.join(missing)}",
                                  certificate=leaf)

    # -- revocation (RFC 5280 6.3) ----------------------------------------------------------

    def check_status(self, cert: x509.Certificate, issuer: x509.Certificate,
                     anchor: x509.Certificate) -> None:
        """Raise unless usable CRLs, taken together, say `cert` is not revoked."""
        complete: list[_Crl] = []
        deltas: list[_Crl] = []
        failures: list[_Failure] = []
        seen_any = False
        reasons_of: dict[int, frozenset[x509.ReasonFlags]] = {}
        for crl in self.candidate_crls(cert):
            reasons = self.dp_reasons(crl, cert)
            if reasons is None:
                continue
            reasons_of[id(crl)] = reasons
            seen_any = True
            # A complete CRL past its nextUpdate still counts in choosing the newest: an older
            # CRL that is still current must not stand in for a newer one that is stale (it
            # would drop the newer one's revocations). Staleness is judged on the winner.
            failure = self.unusable(crl, cert, issuer, anchor,
                                    stale_counts=crl.base_number is not None)
            if failure is not None:
                failures.append(failure)
            elif crl.base_number is not None:
                deltas.append(crl)
            else:
                complete.append(crl)

        if not complete:
            if not seen_any:
                raise ValidationError("crl-missing", f"{describe(cert)}: no CRL from "
                                      f"{cert.issuer.rfc4514_string()} covers it",
                                      certificate=cert)
            if not failures:  # only deltas were usable
                raise ValidationError("crl-missing", f"{describe(cert)}: only delta CRLs from "
                                      f"{cert.issuer.rfc4514_string()}, no complete CRL they "
                                      "apply to", certificate=cert)
            best = max(failures, key=lambda f: f.rank)  # the CRL that came closest
            raise ValidationError(best.code, f"{describe(cert)}: no usable CRL: {best.text}",
                                  certificate=cert)

        # Per scope the highest cRLNumber wins: a newer CRL that drops a hold releases it.
        winners: dict[tuple[NameKey, x509.IssuingDistributionPoint | None], _Crl] = {}
        for crl in complete:
            best_crl = winners.get(crl.scope)
            if best_crl is None or (crl.number or 0) > (best_crl.number or 0):
                winners[crl.scope] = crl

        covered: set[x509.ReasonFlags] = set()
        hits: list[tuple[x509.RevokedCertificate, _Crl]] = []
        for scope, base in winners.items():
            covered |= reasons_of[id(base)]
            entry, source = base.lookup(cert), base
            if entry is not None and _reason(entry) is x509.ReasonFlags.remove_from_crl:
                entry = None  # removeFromCRL only means something in a delta (RFC 5280 5.3.1)
            # The newest delta built on this complete CRL (or an older base) updates it.
            # 6.3.3 (c): same issuer and scope, the same key when the complete CRL says which
            # (authorityKeyIdentifier), built on this complete CRL or an older one.
            applicable = [d for d in deltas if d.scope == scope
                          and (base.key_id is None or d.key_id == base.key_id)
                          and (d.base_number or 0) <= (base.number or 0)
                          and (d.number or 0) > (base.number or 0)]
            if applicable:
                delta = max(applicable, key=lambda d: d.number or 0)
                d_entry = delta.lookup(cert)
                if d_entry is not None:
                    released = _reason(d_entry) is x509.ReasonFlags.remove_from_crl
                    entry, source = (None, delta) if released else (d_entry, delta)
            if entry is not None:
                hits.append((entry, source))

        for entry, source in sorted(hits, key=lambda h: _reason(h[0]) is
                                    x509.ReasonFlags.certificate_hold):  # revocations first
            reason = _reason(entry)
            since = f"{entry.revocation_date_utc:%Y-%m-%d %H:%M:%S}Z"
            if reason is x509.ReasonFlags.certificate_hold:
                raise ValidationError("suspended", f"{describe(cert)} is suspended "
                                      f"(certificateHold) since {since} per {source.describe()}",
                                      certificate=cert, crl_reason=reason.value)
            raise ValidationError("revoked", f"{describe(cert)} is revoked ({reason.value}) "
                                  f"since {since} per {source.describe()}", certificate=cert,
                                  crl_reason=reason.value)

        if not self.stale_ok:
            for base in winners.values():
                if base.next_update is not None and self.at > base.next_update:
                    raise ValidationError("crl-stale", f"{describe(cert)}: no usable CRL: "
                                          f"{base.describe()} is stale: its nextUpdate was "
                                          f"{base.next_update:%Y-%m-%d %H:%M:%S}Z",
                                          certificate=cert)

        if covered != _ALL_REASONS:
            missing = sorted(r.value for r in _ALL_REASONS - covered)
            raise ValidationError("crl-missing", f"{describe(cert)}: the usable CRLs cover only "
                                  f"some revocation reasons; none covers {', '.join(missing)}",
                                  certificate=cert)

    def candidate_crls(self, cert: x509.Certificate) -> list[_Crl]:
        """CRLs issued under the certificate's issuer name, and indirect CRLs from issuers its
        cRLDistributionPoints delegate to (RFC 5280 6.3.3(b)(1): cRLIssuer)."""
        found = list(self.crls._issued_by(cert.issuer))
        for name in _delegated_crl_issuers(cert):
            if not names_equal(name, cert.issuer):
                found += [c for c in self.crls._issued_by(name) if c.is_indirect]
        return found

    def dp_reasons(self, crl: _Crl, cert: x509.Certificate) -> frozenset[x509.ReasonFlags] | None:
        """The reasons `crl` can decide for `cert` (RFC 5280 6.3.3 (b), (d): its scope), or None
        when it does not cover the certificate.

        Some distribution point of the certificate must lead to the CRL - a certificate without
        cRLDistributionPoints has one implied, with no name, its issuer as cRLIssuer and all
        reasons: (b)(1) a cRLIssuer in the point needs a CRL issued under that name with the
        indirectCRL flag, no cRLIssuer a CRL of the certificate's issuer; (b)(2)(i) when the
        CRL's issuingDistributionPoint names a point, one of its names must be among the
        point's names (or, for a point without a name, among its cRLIssuer names); (b)(2)(ii)-
        (iv) onlyContainsUserCerts, onlyContainsCACerts, onlyContainsAttributeCerts. The
        reasons are those of the matching points met with onlySomeReasons (d)."""
        idp = crl.idp
        if idp is not None:
            if idp.only_contains_attribute_certs:
                return None
            is_ca = _is_ca(cert)
            if (idp.only_contains_user_certs and is_ca) or (idp.only_contains_ca_certs
                                                            and not is_ca):
                return None
        dps = _ext(cert, x509.CRLDistributionPoints)
        found = self._through_points(crl, cert, list(dps) if dps else [None])
        if found is None and dps:
            # 6.3.3: a CRL of the certificate issuer that none of its points leads to is still
            # taken through the implied point (no reasons, no cRLIssuer, named by the issuer).
            found = self._through_points(crl, cert, [None])
        return found

    def _through_points(self, crl: _Crl, cert: x509.Certificate,
                        points: list[x509.DistributionPoint | None]
                        ) -> frozenset[x509.ReasonFlags] | None:
        idp_names = _idp_names(crl)
        reasons: set[x509.ReasonFlags] = set()
        matched = False
        for dp in points:
            delegated = [gn.value for gn in (dp.crl_issuer if dp is not None else None) or ()
                         if isinstance(gn, x509.DirectoryName)]
            if dp is not None and dp.crl_issuer:
                if not crl.is_indirect or not any(names_equal(crl.issuer, n)
                                                   for n in delegated):
                    continue
            elif not names_equal(crl.issuer, cert.issuer):
                continue
            if idp_names:
                if dp is not None and (dp.full_name or dp.relative_name):
                    names = _point_names(dp, cert)
                else:
                    names = {_gn_key(x509.DirectoryName(n)) for n in delegated or [cert.issuer]}
                if not names & idp_names:
                    continue
            matched = True
            point_reasons = (frozenset(dp.reasons) if dp is not None and dp.reasons
                             else _ALL_REASONS)
            reasons |= point_reasons & crl.reasons
        return frozenset(reasons) if matched else None

    def unusable(self, crl: _Crl, cert: x509.Certificate, issuer: x509.Certificate,
                 anchor: x509.Certificate, *, stale_counts: bool = True) -> _Failure | None:
        """None if `crl` may decide `cert`'s status, else why not (`stale_counts`: a CRL
        past its nextUpdate is unusable, unless the run allows stale CRLs)."""
        signer_failure = self.check_signer(crl, issuer, anchor)
        if signer_failure is not None:
            return signer_failure
        if crl.problem is not None:
            return _Failure(2, "crl-invalid", f"{crl.describe()} is unusable: {crl.problem}")
        if crl.this_update > self.at:
            return _Failure(3, "crl-invalid", f"{crl.describe()} is not valid before "
                            f"{crl.this_update:%Y-%m-%d %H:%M:%S}Z")
        if (crl.next_update is not None and self.at > crl.next_update and stale_counts
                and not self.stale_ok):
            return _Failure(3, "crl-stale", f"{crl.describe()} is stale: its nextUpdate was "
                            f"{crl.next_update:%Y-%m-%d %H:%M:%S}Z")
        return None

    def check_signer(self, crl: _Crl, issuer: x509.Certificate,
                     anchor: x509.Certificate) -> _Failure | None:
        """RFC 5280 6.3.3(f)/(g): the CRL is signed by the certificate's issuer, or by another
        certificate with the CRL issuer's name and cRLSign that validates to the same anchor
        (a separate CRL-signing key of the same CA, or the signer of an indirect CRL)."""
        candidates = [issuer] if names_equal(issuer.subject, crl.issuer) else []
        others = [c for c in self.by_subject.get(name_key(crl.issuer), ()) if c != issuer]
        if others and crl.key_id is not None:  # skip certificates of other keys unverified
            others = [c for c in others if _key_id(c) in (None, crl.key_id)]
        # The pool may hold a peer's certificates: bound the signature checks they can cause.
        candidates += others[:_MAX_CRL_SIGNERS]
        failure: _Failure | None = None
        for signer in candidates:
            if not crl.verifies_with(signer):
                continue
            try:
                ku = _ext(signer, x509.KeyUsage)
            except ValidationError:
                continue
            if signer is issuer:
                if ku is not None and not ku.crl_sign:
                    failure = _Failure(2, "crl-invalid", f"{crl.describe()} is signed by "
                                       f"{describe(signer)}, whose keyUsage lacks cRLSign")
                    continue
                return None
            if ku is None or not ku.crl_sign:
                failure = _Failure(2, "crl-invalid", f"{crl.describe()} is signed by "
                                   f"{describe(signer)}, which has no keyUsage cRLSign")
                continue
            problem = self.signer_problem(signer, anchor)
            if problem is None:
                return None
            failure = _Failure(2, "crl-invalid", f"{crl.describe()} is signed by "
                               f"{describe(signer)}, which is not valid: {problem}")
        return failure or _Failure(1, "bad-signature", f"{crl.describe()} is not signed by the "
                                   "issuer's key nor by a CRL-signing certificate of it")

    def signer_problem(self, signer: x509.Certificate, anchor: x509.Certificate) -> str | None:
        """Validate a separate CRL signer (with revocation checking) to the same anchor."""
        key = _der(signer)
        if key in self.in_progress:
            # Being validated further up the stack (e.g. the CRL that covers the signer is
            # signed by the signer itself): its path is already verified and the outer frame
            # decides its status; recursing again would never end.
            return None
        cache_key = (key, _der(anchor))
        if cache_key not in self.signer_results:
            try:
                chain = self.validate(signer, purpose=None, check_revocation=True)
            except ValidationError as e:
                result: str | None = f"{e} [{e.code}]"
            else:
                result = None if chain[-1] == anchor else "it chains to another trust anchor"
            self.signer_results[cache_key] = result
        return self.signer_results[cache_key]


def _reason(entry: x509.RevokedCertificate) -> x509.ReasonFlags:
    """The entry's reasonCode; absent (or unreadable, failing closed) is unspecified."""
    try:
        return entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except (x509.ExtensionNotFound, ValueError):
        return x509.ReasonFlags.unspecified


def _key_id(cert: x509.Certificate) -> bytes | None:
    try:
        ski = _ext(cert, x509.SubjectKeyIdentifier)
    except ValidationError:
        return None
    return ski.digest if ski is not None else None


def _delegated_crl_issuers(cert: x509.Certificate) -> list[x509.Name]:
    dps = _ext(cert, x509.CRLDistributionPoints)
    names: list[x509.Name] = []
    for dp in dps or ():
        for gn in dp.crl_issuer or ():
            if isinstance(gn, x509.DirectoryName):
                names.append(gn.value)
    return names


def _gn_key(gn: x509.GeneralName) -> tuple[str, object]:
    """A general name as compared in distribution point matching: directory names per
    RFC 5280 7.1, other names by value."""
    if isinstance(gn, x509.DirectoryName):
        return ("dn", name_key(gn.value))
    return (type(gn).__name__, gn.value)


def _relative(base: x509.Name, rdn: x509.RelativeDistinguishedName) -> tuple[str, object]:
    return _gn_key(x509.DirectoryName(x509.Name([*base.rdns, rdn])))


def _idp_names(crl: _Crl) -> set[tuple[str, object]]:
    """The distribution point names of the CRL's issuingDistributionPoint (a relative name is
    under the CRL issuer)."""
    idp = crl.idp
    if idp is None:
        return set()
    if idp.full_name:
        return {_gn_key(gn) for gn in idp.full_name}
    if idp.relative_name:
        return {_relative(crl.issuer, idp.relative_name)}
    return set()


def _point_names(dp: x509.DistributionPoint, cert: x509.Certificate) -> set[tuple[str, object]]:
    """The names of one distribution point of a certificate (a relative name is under its
    cRLIssuer, or under the certificate's issuer when it has none)."""
    if dp.full_name:
        return {_gn_key(gn) for gn in dp.full_name}
    if dp.relative_name:
        bases = [gn.value for gn in dp.crl_issuer or () if isinstance(gn, x509.DirectoryName)]
        return {_relative(b, dp.relative_name) for b in bases or [cert.issuer]}
    return set()
