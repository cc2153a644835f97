"""Our own RFC 5280 section 6.1 path building and processing, for what cryptography's verifier
cannot do.

`exchanged.pki.verify` asks cryptography's Rust verifier first. That verifier refuses some
valid paths on purpose (it is a web-PKI verifier): critical name constraints of type
directoryName or URI, names that match only under the comparison rules of RFC 5280 7.1,
self-issued intermediates counted against pathLenConstraint, a non-critical basicConstraints in
a CA certificate, GeneralizedTime validity dates before 2050, critical policy extensions. And it
ignores what it does not support when the extension is not critical (name constraints of those
types, certificate policies). So verify.py also

* runs `check_path()` on every chain cryptography accepts whose certificates carry name
  constraints or policy constraints (what cryptography may have skipped), and
* when cryptography refuses, searches paths itself with `build()` and accepts one only if
  `check_path()` passes every rule on it.

Rules implemented (RFC 5280 6.1.3 to 6.1.5):

* signature by the working public key, with the algorithms cryptography's verifier allows
  (RSA >= 2048 bits PKCS#1 v1.5 or PSS, ECDSA, Ed25519, Ed448; SHA-256/384/512). DSA is
  refused on purpose (FIPS 186-5 no longer approves it for signatures; our PKI never issues it);
* validity period at the validation time;
* name chaining, names compared per 7.1 (`name_key`);
* name constraints (4.2.1.10): directoryName, rfc822Name (also emailAddress attributes of the
  subject), dNSName, uniformResourceIdentifier, iPAddress; permitted subtrees intersected,
  excluded subtrees accumulated; self-issued intermediates are not checked (6.1.3 (b)); a
  constraint of another name type when the certificate has a name of that type is refused;
* basicConstraints cA in every intermediate, pathLenConstraint with self-issued intermediates
  not counted (6.1.4 (l)), keyUsage keyCertSign when present (6.1.4 (n)), unknown critical
  extensions refused (6.1.4 (o), 6.1.5 (f));
* certificate policies (6.1.3 (d)-(f), 6.1.4 (a)-(b), (h)-(j), 6.1.5 (a)-(b), (g)) with the
  inputs every validation here uses: any policy acceptable, no explicit policy, mapping or
  anyPolicy inhibited by the caller. Then a path can only fail on policies when a certificate
  requires an explicit policy (requireExplicitPolicy), and the valid_policy_tree is only kept
  for such paths; a mapping to or from anyPolicy is refused in any path;
* our own profile rules (as the extension policies handed to cryptography): subject key
  identifier in CA certificates, authority key identifier unless self-signed or trusted,
  keyCertSign only with cA, no empty extendedKeyUsage, positive serial numbers of at most
  20 octets, the same signature algorithm inside and outside the TBSCertificate.

Work is bounded (`Budget`): signature checks, candidate issuers looked at, complete paths
examined, name-against-subtree comparisons, policy tree nodes, all per validation; on
exhaustion the search stops with an error that says so.
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa
from cryptography.x509.oid import ExtensionOID, NameOID

__all__ = ["Budget", "PathError", "build", "check_path", "name_key", "names_equal",
           "unreadable_reason"]


class PathError(Exception):
    """A rule the path breaks: `code` (a verify.REASON_CODES value), the certificate."""

    def __init__(self, code: str, message: str, cert: x509.Certificate | None) -> None:
        super().__init__(message)
        self.code = code
        self.cert = cert


class CostExceeded(PathError):
    """The validation would cost more than its budget allows: the search stops here."""


# --------------------------------------------------------------------------------------------
# Names (RFC 5280 7.1, RFC 4518 in simplified form)

NameKey = tuple[tuple[tuple[str, str], ...], ...]


def _value_key(attr: x509.NameAttribute[str | bytes]) -> str:
    value = attr.value
    if isinstance(value, bytes):
        return "#" + value.hex()
    # RFC 4518: compatibility normalisation, case folding, insignificant space removed (leading
    # and trailing dropped, inner runs collapsed to one); PrintableString and UTF8String
    # values compare as the characters they hold (cryptography has decoded both to str).
    text = unicodedata.normalize("NFKC", value).casefold()
    return " ".join(text.split())


@functools.lru_cache(maxsize=4096)  # the same few names come back at every handshake
def name_key(name: x509.Name) -> NameKey:
    """A key under which two names are equal exactly when RFC 5280 7.1 says they match: RDNs in
    order, attributes of an RDN in any order, values compared after normalisation."""
    return tuple(tuple(sorted((a.oid.dotted_string, _value_key(a)) for a in rdn))
                 for rdn in name.rdns)


def names_equal(a: x509.Name, b: x509.Name) -> bool:
    return a == b or name_key(a) == name_key(b)


def _within_dn(name: NameKey, base: NameKey) -> bool:
    return name[:len(base)] == base


# --------------------------------------------------------------------------------------------
# Signatures

_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)


def check_signature(cert: x509.Certificate, issuer_key: object) -> str | None:
    """None if `issuer_key` verifies `cert`'s signature, else why not."""
    if isinstance(issuer_key, dsa.DSAPublicKey):
        return ("its issuer's key is a DSA key: exchanged refuses DSA signatures on purpose "
                "(FIPS 186-5 withdrew DSA for signing; use RSA, ECDSA or EdDSA)")
    try:
        hash_alg = cert.signature_hash_algorithm
    except UnsupportedAlgorithm as e:
        return f"unsupported signature algorithm ({e})"
    sig, tbs = cert.signature, cert.tbs_certificate_bytes
    if not _same_signature_algorithms(cert):
        return ("the signature algorithm inside the certificate differs from the one outside "
                "(RFC 5280 4.1.1.2)")
    try:
        if isinstance(issuer_key, rsa.RSAPublicKey):
            if issuer_key.key_size < 2048:
                return f"its issuer's RSA key has only {issuer_key.key_size} bits (< 2048)"
            if not isinstance(hash_alg, _HASHES):
                return f"signature hash {getattr(hash_alg, 'name', hash_alg)} is not allowed"
            params = cert.signature_algorithm_parameters
            if not isinstance(params, padding.PKCS1v15 | padding.PSS):
                return "RSA signature with unknown padding"
            issuer_key.verify(sig, tbs, params, hash_alg)
        elif isinstance(issuer_key, ec.EllipticCurvePublicKey):
            if not isinstance(issuer_key.curve, ec.SECP256R1 | ec.SECP384R1 | ec.SECP521R1):
                return f"its issuer's key is on the curve {issuer_key.curve.name}, not allowed"
            if not isinstance(hash_alg, _HASHES):
                return f"signature hash {getattr(hash_alg, 'name', hash_alg)} is not allowed"
            issuer_key.verify(sig, tbs, ec.ECDSA(hash_alg))
        elif isinstance(issuer_key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            if hash_alg is not None:
                return "EdDSA key but the signature algorithm names a hash"
            issuer_key.verify(sig, tbs)
        else:
            return f"unsupported issuer key type {type(issuer_key).__name__}"
    except InvalidSignature:
        return "the signature does not verify with the issuer's key"
    except (TypeError, ValueError, UnsupportedAlgorithm) as e:
        return f"the signature cannot be checked ({e})"
    return None


def _element(buf: bytes, pos: int) -> tuple[int, int]:
    """(content start, end) of the DER element at pos."""
    n = buf[pos + 1]
    start = pos + 2
    if n & 0x80:
        k = n & 0x7F
        n = int.from_bytes(buf[start:start + k], "big")
        start += k
    return start, start + n


def _same_signature_algorithms(cert: x509.Certificate) -> bool:
    """TBSCertificate.signature equals Certificate.signatureAlgorithm, byte for byte."""
    try:
        der = cert.public_bytes(serialization.Encoding.DER)
        start, _ = _element(der, 0)  # Certificate
        tbs_start, tbs_end = _element(der, start)
        outer = der[tbs_end:_element(der, tbs_end)[1]]
        pos = tbs_start
        if der[pos] == 0xA0:  # [0] version
            pos = _element(der, pos)[1]
        pos = _element(der, pos)[1]  # serialNumber
        inner = der[pos:_element(der, pos)[1]]
    except IndexError:
        return False
    return inner == outer


def _public_key(cert: x509.Certificate) -> object | None:
    try:
        return cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        return None


# --------------------------------------------------------------------------------------------
# Extensions

# What we recognise in a certificate (6.1.4 (o)): processed here or by verify.py, or policy
# extensions whose content we ignore (see the module docstring).
_KNOWN = frozenset({
    ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE, ExtensionOID.EXTENDED_KEY_USAGE,
    ExtensionOID.SUBJECT_ALTERNATIVE_NAME, ExtensionOID.ISSUER_ALTERNATIVE_NAME,
    ExtensionOID.NAME_CONSTRAINTS, ExtensionOID.CERTIFICATE_POLICIES,
    ExtensionOID.POLICY_CONSTRAINTS, ExtensionOID.POLICY_MAPPINGS,
    ExtensionOID.INHIBIT_ANY_POLICY, ExtensionOID.CRL_DISTRIBUTION_POINTS,
    ExtensionOID.FRESHEST_CRL, ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
    ExtensionOID.SUBJECT_KEY_IDENTIFIER,
})
# Extensions RFC 5280 says MUST be non-critical; a critical one is refused.
_MUST_BE_NON_CRITICAL = frozenset({
    ExtensionOID.AUTHORITY_KEY_IDENTIFIER, ExtensionOID.SUBJECT_KEY_IDENTIFIER,
    ExtensionOID.AUTHORITY_INFORMATION_ACCESS, ExtensionOID.FRESHEST_CRL,
})


def _extensions(cert: x509.Certificate) -> x509.Extensions:
    try:
        return cert.extensions
    except ValueError as e:
        raise PathError("invalid", f"its extensions cannot be parsed ({e})", cert) from None


def _get(exts: x509.Extensions, cls: type[x509.ExtensionType]) -> x509.Extension[
        x509.ExtensionType] | None:
    try:
        return exts.get_extension_for_class(cls)
    except x509.ExtensionNotFound:
        return None


def self_issued(cert: x509.Certificate) -> bool:
    return names_equal(cert.subject, cert.issuer)


# --------------------------------------------------------------------------------------------
# Name constraints

# Most (names x subtrees) comparisons one validation may cost (all the paths it examines
# together); beyond it the path is refused (a hostile certificate with thousands of names
# against thousands of subtrees).
MAX_NAME_CHECKS = 1 << 16


def _dns_within(name: str, base: str) -> bool:
    name, base = name.lower().rstrip("."), base.lower().rstrip(".")
    if not base:
        return True
    if base.startswith("."):
        return name.endswith(base)
    return name == base or name.endswith("." + base)


def _wildcard_may_match(name: str, base: str) -> bool:
    """A wildcard name "*.example.com" stands for names the excluded subtree "bar.example.com"
    holds: refused (x509-limbo cve-2025-61727)."""
    if not name.startswith("*."):
        return False
    suffix, base = name[2:].lower().rstrip("."), base.lower().lstrip(".").rstrip(".")
    return base.endswith("." + suffix)


def _host_within(host: str, base: str) -> bool:
    """URI host against a URI constraint (4.2.1.10: a leading period means subdomains only)."""
    host, base = host.lower().rstrip("."), base.lower().rstrip(".")
    if base.startswith("."):
        return host.endswith(base)
    return host == base


def _email_within(mail: str, base: str) -> bool:
    local, at, domain = mail.rpartition("@")
    if not at:
        return False
    if "@" in base:
        b_local, _, b_domain = base.rpartition("@")
        return local == b_local and domain.lower() == b_domain.lower()
    domain, base = domain.lower(), base.lower()
    if base.startswith("."):
        return domain.endswith(base)
    return domain == base


def _ip_within(addr: bytes, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return ip.version == net.version and ip in net


# A name to check: (type tag, value); subtrees are (type tag, base).
_Name = tuple[str, object]


def _general(gn: x509.GeneralName) -> _Name:
    if isinstance(gn, x509.DirectoryName):
        return "dn", name_key(gn.value)
    if isinstance(gn, x509.RFC822Name):
        return "email", gn.value
    if isinstance(gn, x509.DNSName):
        return "dns", gn.value
    if isinstance(gn, x509.UniformResourceIdentifier):
        return "uri", gn.value
    if isinstance(gn, x509.IPAddress):
        return "ip", gn.value
    return type(gn).__name__, None


def _subtree(gn: x509.GeneralName) -> _Name:
    if isinstance(gn, x509.IPAddress):
        return "ip", gn.value  # an ip_network
    return _general(gn)


def _matches(kind: str, value: object, base: object) -> bool:
    if kind == "dn":
        assert isinstance(value, tuple) and isinstance(base, tuple)
        return _within_dn(value, base)
    if kind == "email":
        return _email_within(str(value), str(base))
    if kind == "dns":
        return _dns_within(str(value), str(base))
    if kind == "uri":
        host = urlsplit(str(value)).hostname
        return bool(host) and _host_within(str(host), str(base))
    if kind == "ip":
        if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
            value = value.packed
        assert isinstance(base, ipaddress.IPv4Network | ipaddress.IPv6Network)
        return isinstance(value, bytes) and _ip_within(value, base)
    return False


@dataclass
class _Constraints:
    # each entry: the subtrees of one CA certificate (by type) that names must fall within
    permitted: list[tuple[x509.Certificate, dict[str, list[object]]]] = field(
        default_factory=list)
    excluded: list[tuple[x509.Certificate, str, object]] = field(default_factory=list)

    def add(self, ca: x509.Certificate, nc: x509.NameConstraints) -> None:
        if nc.permitted_subtrees is not None:
            by_type: dict[str, list[object]] = {}
            for gn in nc.permitted_subtrees:
                kind, base = _subtree(gn)
                by_type.setdefault(kind, []).append(base)
            self.permitted.append((ca, by_type))
        for gn in nc.excluded_subtrees or ():
            kind, base = _subtree(gn)
            self.excluded.append((ca, kind, base))

    def check(self, cert: x509.Certificate, names: list[_Name], budget: Budget) -> None:
        if not self.permitted and not self.excluded:
            return
        cost = len(names) * (len(self.excluded) + sum(
            len(v) for _, d in self.permitted for v in d.values()))
        budget.spent_name_checks += cost
        if budget.spent_name_checks > budget.name_checks:
            raise CostExceeded("invalid", f"too many names ({len(names)}) against too many "
                            f"name constraints to check (over {budget.name_checks} "
                            "comparisons: refused for cost)", cert)
        for kind, value in names:
            if value is None and (any(kind in d for _, d in self.permitted)
                                  or any(k == kind for _, k, _b in self.excluded)):
                raise PathError("invalid", f"it has a {kind} name, and name constraints of "
                                "that type cannot be checked", cert)
            for ca, by_type in self.permitted:
                bases = by_type.get(kind)
                if bases is not None and not any(_matches(kind, value, b) for b in bases):
                    raise PathError("invalid", f"its {kind} name {_show(kind, value)} is not "
                                    f"within the permitted subtrees of {_who(ca)}", cert)
            for ca, ekind, base in self.excluded:
                if ekind == kind and (_matches(kind, value, base) or (
                        kind == "dns" and _wildcard_may_match(str(value), str(base)))):
                    raise PathError("invalid", f"its {kind} name {_show(kind, value)} is "
                                    f"within an excluded subtree of {_who(ca)}", cert)


def _show(kind: str, value: object) -> str:
    if kind == "dn" and isinstance(value, tuple):
        return "/".join("+".join(f"{o}={v}" for o, v in rdn) for rdn in value) or "<empty>"
    return repr(value)


def _who(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "<empty subject>"


def _names_of(cert: x509.Certificate, exts: x509.Extensions) -> list[_Name]:
    """The names name constraints apply to (6.1.3 (b), (c)): the subject DN when not empty,
    emailAddress attributes of the subject as rfc822 names, and the subjectAltName entries."""
    names: list[_Name] = []
    if cert.subject.rdns:
        names.append(("dn", name_key(cert.subject)))
    for attr in cert.subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS):
        names.append(("email", str(attr.value)))
    san = _get(exts, x509.SubjectAlternativeName)
    if san is not None:
        assert isinstance(san.value, x509.SubjectAlternativeName)
        names += [_general(gn) for gn in san.value]
    return names


# --------------------------------------------------------------------------------------------
# Certificate policies (6.1.2 (a), 6.1.3 (d)-(f), 6.1.4 (a)-(b), (h)-(j), 6.1.5 (a)-(b), (g))
#
# With the inputs every validation here uses: user-initial-policy-set {anyPolicy}, and
# initial-policy-mapping-inhibit, initial-explicit-policy, initial-any-policy-inhibit all false.

ANY_POLICY = "2.5.29.32.0"


@dataclass(eq=False)
class _PolicyNode:
    policy: str
    expected: set[str]
    parent: _PolicyNode | None
    children: list[_PolicyNode] = field(default_factory=list)

    def add(self, policy: str, expected: set[str]) -> _PolicyNode:
        child = _PolicyNode(policy, expected, self)
        self.children.append(child)
        return child


class _Policies:
    """The valid_policy_tree and its three counters, for a path of n certificates."""

    # Most nodes the tree may hold (policy mappings can make it grow with every certificate).
    MAX_NODES = 1 << 12

    def __init__(self, n: int) -> None:
        self.root: _PolicyNode | None = _PolicyNode(ANY_POLICY, {ANY_POLICY}, None)
        self.levels: list[list[_PolicyNode]] = [[self.root]]  # the nodes of each depth
        self.explicit_policy = n + 1
        self.inhibit_any_policy = n + 1
        self.policy_mapping = n + 1
        self.nodes = 1

    @property
    def level(self) -> list[_PolicyNode]:
        """The nodes of the deepest depth."""
        return self.levels[-1] if self.root is not None else []

    def _grow(self, cert: x509.Certificate) -> None:
        self.nodes += 1
        if self.nodes > self.MAX_NODES:
            raise CostExceeded("invalid", "the certificate policy tree grows past "
                               f"{self.MAX_NODES} nodes (refused for cost)", cert)

    def _prune(self) -> None:
        """Delete every node above the deepest depth that has no children, bottom up; the
        tree is NULL when nothing is left."""
        for depth in range(len(self.levels) - 2, -1, -1):
            keep = []
            for node in self.levels[depth]:
                if node.children:
                    keep.append(node)
                elif node.parent is not None:
                    node.parent.children.remove(node)
            self.levels[depth] = keep
        if not self.levels[0] or not self.levels[-1]:
            self.root = None

    def process(self, cert: x509.Certificate, exts: x509.Extensions, last: bool,
                is_self_issued: bool) -> None:
        """6.1.3 (d)-(f)."""
        ext = _get(exts, x509.CertificatePolicies)
        if ext is not None and self.root is not None:
            assert isinstance(ext.value, x509.CertificatePolicies)
            oids = [p.policy_identifier.dotted_string for p in ext.value]
            new_level: list[_PolicyNode] = []
            for oid in oids:
                if oid == ANY_POLICY:
                    continue
                parents = [nd for nd in self.level if oid in nd.expected] or \
                    [nd for nd in self.level if nd.policy == ANY_POLICY]
                for nd in parents:
                    self._grow(cert)
                    new_level.append(nd.add(oid, {oid}))
            if ANY_POLICY in oids and (self.inhibit_any_policy > 0
                                       or (not last and is_self_issued)):
                for nd in self.level:
                    have = {c.policy for c in nd.children}
                    for value in sorted(nd.expected - have):
                        self._grow(cert)
                        new_level.append(nd.add(value, {value}))
            self.levels.append(new_level)
            self._prune()
        elif ext is None:
            self.root = None
        if self.explicit_policy <= 0 and self.root is None:
            raise PathError("invalid", "no acceptable certificate policy while an explicit "
                            "policy is required (RFC 5280 6.1.3 (f))", cert)

    def prepare(self, cert: x509.Certificate, exts: x509.Extensions,
                is_self_issued: bool) -> None:
        """6.1.4 (a), (b), (h)-(j)."""
        pairs = _policy_mappings(cert, exts)
        if pairs is not None:
            mapping: dict[str, set[str]] = {}
            for issuer_p, subject_p in pairs:
                if ANY_POLICY in (issuer_p, subject_p):
                    raise PathError("invalid", "policyMappings maps anyPolicy (RFC 5280 "
                                    "6.1.4 (a))", cert)
                mapping.setdefault(issuer_p, set()).add(subject_p)
            if self.root is not None:
                if self.policy_mapping > 0:
                    for issuer_p, subjects in mapping.items():
                        matched = [nd for nd in self.level if nd.policy == issuer_p]
                        for nd in matched:
                            nd.expected = set(subjects)
                        if not matched:
                            for nd in [x for x in self.level if x.policy == ANY_POLICY]:
                                if nd.parent is not None:
                                    self._grow(cert)
                                    self.levels[-1].append(nd.parent.add(issuer_p,
                                                                         set(subjects)))
                else:
                    gone = [nd for nd in self.level if nd.policy in mapping]
                    for nd in gone:
                        if nd.parent is not None:
                            nd.parent.children.remove(nd)
                    self.levels[-1] = [nd for nd in self.level if nd not in gone]
                    self._prune()
        if not is_self_issued:  # (h)
            self.explicit_policy = max(0, self.explicit_policy - 1)
            self.policy_mapping = max(0, self.policy_mapping - 1)
            self.inhibit_any_policy = max(0, self.inhibit_any_policy - 1)
        self._constraints(exts)
        inhibit = _get(exts, x509.InhibitAnyPolicy)
        if inhibit is not None:  # (j)
            assert isinstance(inhibit.value, x509.InhibitAnyPolicy)
            self.inhibit_any_policy = min(self.inhibit_any_policy, inhibit.value.skip_certs)

    def _constraints(self, exts: x509.Extensions) -> None:
        pc = _get(exts, x509.PolicyConstraints)
        if pc is not None:  # (i)
            assert isinstance(pc.value, x509.PolicyConstraints)
            if pc.value.require_explicit_policy is not None:
                self.explicit_policy = min(self.explicit_policy,
                                           pc.value.require_explicit_policy)
            if pc.value.inhibit_policy_mapping is not None:
                self.policy_mapping = min(self.policy_mapping, pc.value.inhibit_policy_mapping)

    def wrap_up(self, cert: x509.Certificate, exts: x509.Extensions) -> None:
        """6.1.5 (a), (b), (g) with user-initial-policy-set {anyPolicy}."""
        if self.explicit_policy > 0:
            self.explicit_policy -= 1
        pc = _get(exts, x509.PolicyConstraints)
        if pc is not None and isinstance(pc.value, x509.PolicyConstraints) and \
                pc.value.require_explicit_policy == 0:
            self.explicit_policy = 0
        if self.explicit_policy <= 0 and self.root is None:
            raise PathError("invalid", "no acceptable certificate policy while an explicit "
                            "policy is required (RFC 5280 6.1.5)", cert)


def _needs_policies(path: Sequence[x509.Certificate]) -> bool:
    """Policy processing can only refuse a path when some certificate requires an explicit
    policy (or maps anyPolicy, checked regardless)."""
    for cert in path[:-1]:
        try:
            pc = cert.extensions.get_extension_for_class(x509.PolicyConstraints)
        except x509.ExtensionNotFound:
            continue
        except ValueError:
            return True
        if pc.value.require_explicit_policy is not None:
            return True
    return False


# --------------------------------------------------------------------------------------------
# Processing one path


@dataclass
class Profile:
    """Our profile rules on top of RFC 5280, and the validation parameters."""

    at: dt.datetime
    trusted_der: frozenset[bytes]
    # (cert, is_ca) -> None or why the certificate breaks a rule of ours; see verify.py
    extra: Callable[[x509.Certificate, bool], str | None] | None = None


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def check_validity(cert: x509.Certificate, at: dt.datetime) -> None:
    if at < cert.not_valid_before_utc:
        raise PathError("not-yet-valid", f"it is not valid before "
                        f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S}Z (checked at "
                        f"{at:%Y-%m-%d %H:%M:%S}Z)", cert)
    if at > cert.not_valid_after_utc:
        raise PathError("expired", f"it expired at {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S}Z"
                        f" (checked at {at:%Y-%m-%d %H:%M:%S}Z)", cert)


def check_path(path: Sequence[x509.Certificate], profile: Profile,
               verify_signature: Callable[[x509.Certificate, x509.Certificate], str | None]
               | None = None, budget: Budget | None = None) -> None:
    """RFC 5280 6.1 on `path` (leaf first, trust anchor last); raise PathError at the first
    rule broken. The anchor's own checks are those cryptography's verifier makes of a trust
    anchor (check_anchor); its name constraints apply to the path."""
    budget = budget or Budget()
    verify = verify_signature or (lambda c, i: check_signature(c, _public_key(i)))
    anchor = path[-1]
    n = len(path) - 1
    max_path_length = n
    constraints = _Constraints()
    anchor_nc = check_anchor(anchor, profile.at)
    if anchor_nc is not None:
        constraints.add(anchor, anchor_nc)
    working = anchor
    policies = _Policies(n) if _needs_policies(path) else None
    for i in range(1, n + 1):
        cert = path[n - i]
        last = i == n
        exts = _extensions(cert)
        is_self_issued = self_issued(cert)
        # (a)(1) signature, (a)(2) validity, (a)(4) name chaining
        if not names_equal(cert.issuer, working.subject):
            raise PathError("unknown-issuer", f"its issuer name does not match the subject "
                            f"of {_who(working)}", cert)
        problem = verify(cert, working)
        if problem is not None:
            raise PathError("bad-signature", problem, cert)
        check_validity(cert, profile.at)
        check_serial(cert)
        # (b), (c) name constraints, not for self-issued intermediates
        if (constraints.permitted or constraints.excluded) and (last or not is_self_issued):
            constraints.check(cert, _names_of(cert, exts), budget)
        _check_criticality(cert, exts)
        bc = _get(exts, x509.BasicConstraints)
        bc_value = bc.value if bc is not None else None
        assert bc_value is None or isinstance(bc_value, x509.BasicConstraints)
        is_ca = bool(bc_value is not None and bc_value.ca)
        if policies is not None:
            policies.process(cert, exts, last, is_self_issued)
        if profile.extra is not None:
            problem = profile.extra(cert, not last)
            if problem is not None:
                raise PathError("wrong-key-usage" if problem.startswith("[wrong-key-usage]")
                                else "invalid", problem.removeprefix("[wrong-key-usage]")
                                .strip(), cert)
        if last:
            nc = _get(exts, x509.NameConstraints)
            if nc is not None and not is_ca:
                raise PathError("invalid", "nameConstraints in a certificate that is not a "
                                "CA", cert)
            if policies is not None:
                policies.wrap_up(cert, exts)
            break
        # preparation for the next certificate (6.1.4)
        if not is_ca:
            raise PathError("invalid", "it is used as a CA but its basicConstraints does not "
                            "say cA (RFC 5280 6.1.4 (k))", cert)
        nc = _get(exts, x509.NameConstraints)
        if nc is not None:
            assert isinstance(nc.value, x509.NameConstraints)
            constraints.add(cert, nc.value)
        if policies is not None:
            policies.prepare(cert, exts, is_self_issued)
        else:
            _check_mappings(cert, exts)
        if not is_self_issued:  # (l)
            if max_path_length <= 0:
                raise PathError("invalid", "the path is longer than a pathLenConstraint "
                                "above it allows (RFC 5280 6.1.4 (l))", cert)
            max_path_length -= 1
        if bc_value is not None and bc_value.path_length is not None:  # (m)
            max_path_length = min(max_path_length, bc_value.path_length)
        ku = _get(exts, x509.KeyUsage)
        if ku is not None:  # (n)
            assert isinstance(ku.value, x509.KeyUsage)
            if not ku.value.key_cert_sign:
                raise PathError("invalid", "keyUsage of a CA certificate must assert "
                                "keyCertSign (RFC 5280 6.1.4 (n))", cert)
        working = cert


def _check_mappings(cert: x509.Certificate, exts: x509.Extensions) -> None:
    """6.1.4 (a), when the policy tree is not kept."""
    for pair in _policy_mappings(cert, exts) or ():
        if ANY_POLICY in pair:
            raise PathError("invalid", "policyMappings maps anyPolicy (RFC 5280 6.1.4 (a))",
                            cert)


def _policy_mappings(cert: x509.Certificate, exts: x509.Extensions
                     ) -> list[tuple[str, str]] | None:
    """(issuerDomainPolicy, subjectDomainPolicy) pairs of policyMappings, None when absent
    (cryptography does not parse this extension; asn1crypto does)."""
    try:
        ext = exts.get_extension_for_oid(ExtensionOID.POLICY_MAPPINGS)
    except x509.ExtensionNotFound:
        return None
    from asn1crypto import x509 as ax  # only for certificates that map policies
    value = ext.value
    der = value.value if isinstance(value, x509.UnrecognizedExtension) else value.public_bytes()
    try:
        return [(m["issuer_domain_policy"].dotted, m["subject_domain_policy"].dotted)
                for m in ax.PolicyMappings.load(der)]
    except (ValueError, TypeError) as e:
        raise PathError("invalid", f"its policyMappings cannot be parsed ({e})", cert) from None


def _check_criticality(cert: x509.Certificate, exts: x509.Extensions) -> None:
    for ext in exts:
        if ext.critical and ext.oid in _MUST_BE_NON_CRITICAL:
            raise PathError("invalid", f"its {getattr(ext.oid, '_name', ext.oid.dotted_string)}"
                            " extension is critical (RFC 5280 requires it non-critical)", cert)
        if ext.critical and ext.oid not in _KNOWN:
            raise PathError("invalid", f"unknown critical extension {ext.oid.dotted_string}",
                            cert)


def check_anchor(anchor: x509.Certificate, at: dt.datetime) -> x509.NameConstraints | None:
    """What cryptography's verifier demands of a trust anchor, demanded here too: within its
    validity period, positive serial, a CA certificate (basicConstraints critical with cA,
    keyCertSign if keyUsage is present), a subject key identifier, no unknown critical
    extension. Returns its name constraints, which apply to the path (RFC 5280 6.1.1 (d))."""
    exts = _extensions(anchor)
    check_validity(anchor, at)
    check_serial(anchor)
    _check_criticality(anchor, exts)
    bc = _get(exts, x509.BasicConstraints)
    if bc is None or not isinstance(bc.value, x509.BasicConstraints) or not bc.value.ca \
            or not bc.critical:
        raise PathError("invalid", "trust anchor without a critical basicConstraints cA", anchor)
    ku = _get(exts, x509.KeyUsage)
    if ku is not None and isinstance(ku.value, x509.KeyUsage) and not ku.value.key_cert_sign:
        raise PathError("invalid", "trust anchor whose keyUsage lacks keyCertSign", anchor)
    if _get(exts, x509.SubjectKeyIdentifier) is None:
        raise PathError("invalid", "trust anchor without subjectKeyIdentifier", anchor)
    nc = _get(exts, x509.NameConstraints)
    return nc.value if nc is not None and isinstance(nc.value, x509.NameConstraints) else None


def check_serial(cert: x509.Certificate) -> None:
    """RFC 5280 4.1.2.2: a positive integer of at most 20 octets (read from the DER:
    cryptography warns when a non-positive serial is read)."""
    tbs = cert.tbs_certificate_bytes
    pos = 2 + (tbs[1] & 0x7F if tbs[1] & 0x80 else 0)
    if tbs[pos] == 0xA0:  # [0] version
        pos += 2 + tbs[pos + 1]
    length = tbs[pos + 1]
    if length & 0x80 or length > 21 or (length == 21 and tbs[pos + 2] != 0):
        raise PathError("invalid", "serial number longer than 20 octets", cert)
    value = tbs[pos + 2:pos + 2 + length]
    if not value or value[0] & 0x80 or not any(value):
        raise PathError("invalid", "serial number must be positive", cert)


# --------------------------------------------------------------------------------------------
# Building paths


@dataclass
class Budget:
    """Work one validation may do; exhausted, the search stops."""

    signatures: int = 64  # signature checks while building
    paths: int = 16  # complete paths run through check_path()
    steps: int = 2048  # candidate issuers looked at (a signature cached or not)
    name_checks: int = MAX_NAME_CHECKS  # name x subtree comparisons, all paths together
    spent_name_checks: int = 0
    spent_signatures: int = 0
    spent_paths: int = 0
    spent_steps: int = 0


@dataclass
class _Search:
    leaf: x509.Certificate
    anchors: list[x509.Certificate]
    pool: list[x509.Certificate]
    profile: Profile
    max_intermediates: int
    budget: Budget
    by_name: dict[NameKey, list[tuple[x509.Certificate, bool]]] = field(default_factory=dict)
    sig_cache: dict[tuple[int, int], str | None] = field(default_factory=dict)
    errors: list[tuple[int, PathError]] = field(default_factory=list)
    reached_anchor_name: bool = False

    def __post_init__(self) -> None:
        seen: set[bytes] = set()
        for cert, trusted in [(a, True) for a in self.anchors] + [(c, False) for c in self.pool]:
            der = _der(cert)
            if der in seen:
                continue
            seen.add(der)
            self.by_name.setdefault(name_key(cert.subject), []).append((cert, trusted))

    def signature(self, cert: x509.Certificate, issuer: x509.Certificate) -> str | None:
        key = (id(cert), id(issuer))
        if key not in self.sig_cache:
            if self.budget.spent_signatures >= self.budget.signatures:
                raise _Exhausted()
            self.budget.spent_signatures += 1
            self.sig_cache[key] = check_signature(cert, _public_key(issuer))
        return self.sig_cache[key]

    def candidates(self, cert: x509.Certificate) -> list[tuple[x509.Certificate, bool]]:
        found = list(self.by_name.get(name_key(cert.issuer), ()))
        aki = _aki(cert)
        # Anchors first, then issuers whose key identifier matches the authority key identifier.
        found.sort(key=lambda ct: (not ct[1], aki is not None and _ski(ct[0]) not in (None, aki)))
        return found

    def run(self) -> list[x509.Certificate] | None:
        return self.extend([self.leaf])

    def extend(self, path: list[x509.Certificate]) -> list[x509.Certificate] | None:
        current = path[-1]
        for issuer, trusted in self.candidates(current):
            self.budget.spent_steps += 1
            if self.budget.spent_steps > self.budget.steps:
                raise _Exhausted()
            if any(issuer is c or _der(issuer) == _der(c) for c in path):
                continue  # no loops
            if trusted:
                self.reached_anchor_name = True
            problem = self.signature(current, issuer)
            if problem is not None:
                self.errors.append((len(path), PathError("bad-signature", problem, current)))
                continue
            candidate = [*path, issuer]
            if trusted:
                if self.budget.spent_paths >= self.budget.paths:
                    raise _Exhausted()
                self.budget.spent_paths += 1
                try:
                    check_path(candidate, self.profile, self.signature, self.budget)
                except CostExceeded:
                    raise
                except PathError as e:
                    self.errors.append((len(candidate) + 100, e))
                    continue
                return candidate
            # Intermediates so far, the new one included: self-issued ones do not count against
            # the limit (RFC 5280 6.1.4 (l) in spirit), but the path stays bounded.
            counted = sum(not self_issued(c) for c in candidate[1:])
            if counted <= self.max_intermediates and len(candidate) - 1 <= 2 * (
                    self.max_intermediates + 4):
                found = self.extend(candidate)
                if found is not None:
                    return found
        return None


class _Exhausted(Exception):
    pass


def _aki(cert: x509.Certificate) -> bytes | None:
    try:
        ext = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    except (x509.ExtensionNotFound, ValueError):
        return None
    return ext.value.key_identifier


def _ski(cert: x509.Certificate) -> bytes | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except (x509.ExtensionNotFound, ValueError):
        return None


def build(leaf: x509.Certificate, anchors: Sequence[x509.Certificate],
          pool: Iterable[x509.Certificate], profile: Profile, *, max_intermediates: int = 8,
          budget: Budget | None = None) -> list[x509.Certificate]:
    """A path from `leaf` to one of `anchors` through `pool` that passes check_path(), leaf
    first; PathError with the most telling reason when there is none."""
    search = _Search(leaf, list(anchors), list(pool), profile, max_intermediates,
                     budget or Budget())
    if any(_der(leaf) == _der(a) for a in anchors):
        check_anchor(leaf, profile.at)
        return [leaf]
    try:
        found = search.run()
    except _Exhausted:
        b = search.budget
        raise PathError("invalid", f"path search budget exhausted ({b.spent_signatures} of "
                        f"{b.signatures} signature checks, {b.spent_paths} of {b.paths} complete "
                        f"paths, {b.spent_steps} of {b.steps} candidates) without a valid path: "
                        "too many candidate issuers", leaf) from None
    if found is not None:
        return found
    if search.errors:
        # the error from the path that got furthest (a complete path beats a broken link)
        raise max(search.errors, key=lambda e: e[0])[1]
    if not search.reached_anchor_name:
        raise PathError("unknown-issuer", "no issuer chain to a trusted certificate (issuer "
                        f"{leaf.issuer.rfc4514_string()} unknown)", leaf)
    raise PathError("invalid", "no valid path to a trusted certificate within "
                    f"{max_intermediates} intermediates", leaf)


# --------------------------------------------------------------------------------------------
# Certificates cryptography cannot parse

_DSA_OID = "1.2.840.10040.4.1"


def unreadable_reason(der: bytes, error: str) -> str:
    """Why a certificate cryptography refused to parse is refused, read with asn1crypto: a DSA
    key whose parameters are inherited from the issuer (RFC 3279 2.3.2) gets a plain answer."""
    from asn1crypto import x509 as ax  # only on this error path
    try:
        cert = ax.Certificate.load(der)
        spki = cert["tbs_certificate"]["subject_public_key_info"]
        algorithm = spki["algorithm"]["algorithm"].dotted
        params = spki["algorithm"]["parameters"]
        subject = cert["tbs_certificate"]["subject"].human_friendly
    except (ValueError, TypeError, KeyError) as e:
        return f"it is not a certificate ({error.splitlines()[0]}; {e})"
    if algorithm == _DSA_OID:
        inherited = params.native is None
        return (f"{subject or '<empty subject>'}: its key is a DSA key"
                f"{' whose parameters are inherited from its issuer' if inherited else ''}: "
                "exchanged refuses DSA on purpose (FIPS 186-5 withdrew DSA for signing)")
    return f"{subject or '<empty subject>'}: cryptography cannot read it ({error.splitlines()[0]})"
