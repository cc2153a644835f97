"""Who is on the other end: the peer's chain, its CRL status and the peer table, after TLS.

OpenSSL has checked that the peer's chain leads to our CA; here the chain is validated again
with our CRL processing (`exchanged.pki.verify`) and the leaf is matched against the configured
peers (A13: a unit that is not configured is refused even with a valid certificate).

CRLs are parsed and indexed once when they change (`reload`), and a peer's verdict is reused
until its certificate, a CRL, or the clock (the certificate's notAfter, the CRL's nextUpdate,
at most five minutes) says otherwise: a handshake costs the same with a 100,000-entry CRL as
with an empty one. The cache holds at most `MAX_CACHED` verdicts (least recently used go).

The chain arrives as the DER the peer sent. OpenSSL is more lenient than our parser: it
accepts, for instance, an extension with an explicitly encoded DEFAULT or an unknown version.
Every certificate of the chain is parsed here the way the validator will use it, and a chain
that cannot be parsed is refused like any other bad chain: nothing a peer sends can raise
anything but `PeerRefused` from `check()`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from exchanged.common import give_back_memory
from exchanged.errors import ExchangedError
from exchanged.pki import verify
from exchanged.pki.names import common_name, organization

CACHE_SECONDS = 300
MAX_CACHED = 1024  # verdicts kept (a peer sending ever new extra certificates cannot grow it)
MAX_CHAIN = 10  # certificates a peer may send


class PeerRefused(ExchangedError):
    code = "peer-refused"


@dataclass(frozen=True)
class Peer:
    """Another unit's node this node may exchange with (A13: nothing else is accepted)."""

    unit: str
    host: str
    port: int
    name: str  # the peer node certificate's CN
    org: str  # the peer node certificate's O (the unit's name)


@dataclass(frozen=True)
class _Verdict:
    peer: Peer | None
    error: PeerRefused | None
    until: dt.datetime
    crl_only: Peer | None = None  # refused only because our CRL is stale: CRLs may pass


STALE_POLICIES = ("refuse", "warn")


def parse_chain(chain: Sequence[bytes]) -> list[x509.Certificate]:
    """The peer's certificates, each parsed as the validator will use it (subject, issuer,
    extensions, public key); PeerRefused naming the first that cannot be."""
    if not chain:
        raise PeerRefused("the peer sent no certificate")
    if len(chain) > MAX_CHAIN:
        raise PeerRefused(f"the peer sent {len(chain)} certificates; at most {MAX_CHAIN}",
                          code="peer-bad-chain")
    certs = []
    for i, der in enumerate(chain):
        try:
            cert = x509.load_der_x509_certificate(der)
            cert.extensions  # noqa: B018 — parsed now, not halfway through validation
            cert.public_key()
            cert.subject.rfc4514_string()
            cert.issuer.rfc4514_string()
        except Exception as e:  # cryptography raises ValueError, InvalidVersion, Unsupported...
            what = "its certificate" if i == 0 else f"certificate {i + 1} of its chain"
            raise PeerRefused(f"the peer sent {what} in a form we do not accept (strict DER, "
                              f"X.509 v3): {str(e) or type(e).__name__}",
                              code="peer-bad-chain") from None
        certs.append(cert)
    return certs


def _der(cert: bytes | x509.Certificate) -> bytes:
    return cert if isinstance(cert, bytes) else cert.public_bytes(serialization.Encoding.DER)


class PeerCheck:
    """Validates peers' chains against the CA certificates and CRL files, with a cache."""

    def __init__(self, trusted: Sequence[x509.Certificate], crl_paths: Sequence[Path],
                 peers: dict[str, Peer], *, stale_crl: str = "refuse") -> None:
        if stale_crl not in STALE_POLICIES:
            raise ValueError(f"stale_crl must be one of {STALE_POLICIES}, not {stale_crl!r}")
        self.stale_ok = stale_crl == "warn"
        self.trusted = list(trusted)
        self.crl_paths = list(crl_paths)
        self.peers = dict(peers)
        self._lock = threading.Lock()
        self._cache: OrderedDict[bytes, _Verdict] = OrderedDict()
        self.crls = verify.CrlSet.load(self.crl_paths) if self.crl_paths else verify.CrlSet()
        self.generation = 0
        self._stamps = self._file_stamps(self.crl_paths)

    @staticmethod
    def _file_stamps(paths: Sequence[Path]) -> tuple[tuple[str, int, int], ...]:
        out = []
        for p in paths:
            try:
                st = p.stat()
                out.append((str(p), st.st_mtime_ns, st.st_size))
            except OSError:
                out.append((str(p), -1, -1))
        return tuple(out)

    def reload(self, peers: dict[str, Peer] | None = None, *, force: bool = False,
               crl_paths: Sequence[Path] | None = None) -> bool:
        """Re-read the CRL files if they changed (or `force`, or `crl_paths` are new); swap in
        new peers. A CRL file that cannot be read keeps the old set in force and raises, so
        the caller can log it."""
        paths = self.crl_paths if crl_paths is None else list(crl_paths)
        stamps = self._file_stamps(paths)
        changed = swapped = force or stamps != self._stamps
        if changed:
            crls = verify.CrlSet.load(paths) if paths else verify.CrlSet()
        with self._lock:
            if changed:
                self.crls, self._stamps, self.crl_paths = crls, stamps, paths
                self.generation += 1
            if peers is not None:
                self.peers = dict(peers)
                changed = True
                self.generation += 1  # connections open now are judged again (node/base.py)
            if changed:
                self._cache.clear()
        if swapped:  # the previous CRLs went with the swap: a large CRL's tens of MiB
            give_back_memory()
        return changed

    def set_stale_policy(self, stale_crl: str) -> None:
        if stale_crl not in STALE_POLICIES:
            raise ValueError(f"stale_crl must be one of {STALE_POLICIES}, not {stale_crl!r}")
        with self._lock:
            self.stale_ok = stale_crl == "warn"
            self.generation += 1
            self._cache.clear()

    def check(self, chain: Sequence[bytes | x509.Certificate], *, expect: str | None = None,
              now: dt.datetime | None = None) -> Peer:
        """The configured peer this chain (as sent, leaf first: DER or certificates) belongs
        to, or PeerRefused saying why."""
        peer, limited = self.admit(chain, expect=expect, now=now)
        if limited is not None:
            raise limited
        return peer

    def admit(self, chain: Sequence[bytes | x509.Certificate], *, expect: str | None = None,
              now: dt.datetime | None = None) -> tuple[Peer, PeerRefused | None]:
        """Like `check`, except for a peer refused only because our CRL is past its
        nextUpdate (policy "refuse") or because we hold none: it is admitted for the CRL
        exchange alone, so that a fresh CRL can still reach us. (the peer, None) or (the
        peer, the refusal that limits it to CRLs)."""
        if not chain:
            raise PeerRefused("the peer sent no certificate")
        ders = [_der(c) for c in chain]
        now = now or dt.datetime.now(dt.UTC)
        key = b"".join(hashlib.sha256(d).digest() for d in ders)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
            generation = self.generation
        if cached is None or now >= cached.until:
            cached = self._judge(ders, now)
            with self._lock:
                if self.generation == generation:  # not judged against CRLs since replaced
                    self._cache[key] = cached
                    self._cache.move_to_end(key)
                    while len(self._cache) > MAX_CACHED:
                        self._cache.popitem(last=False)
        return self._outcome(cached, expect)

    def admit_cached(self, chain: Sequence[bytes], *, expect: str | None = None
                     ) -> tuple[Peer, PeerRefused | None] | None:
        """`admit` from the cache alone, cheap enough for the event loop: None when the chain
        has no current verdict (then `admit` it in a thread: judging it may take a while)."""
        if not chain:
            return None
        key = b"".join(hashlib.sha256(d).digest() for d in chain)
        with self._lock:
            cached = self._cache.get(key)
            if cached is None or dt.datetime.now(dt.UTC) >= cached.until:
                return None
            self._cache.move_to_end(key)
        return self._outcome(cached, expect)

    @staticmethod
    def _outcome(cached: _Verdict, expect: str | None) -> tuple[Peer, PeerRefused | None]:
        peer, limited = cached.peer, None
        if cached.error is not None:
            if cached.crl_only is None:
                # A new exception each time: re-raising one object grows its traceback forever.
                raise PeerRefused(str(cached.error), code=cached.error.code)
            peer = cached.crl_only
            limited = PeerRefused(str(cached.error), code=cached.error.code)
        assert peer is not None
        if expect is not None and peer.unit != expect:
            raise PeerRefused(f"connected to {peer.unit}'s node, expected {expect}'s")
        return peer, limited

    def _judge(self, ders: Sequence[bytes], now: dt.datetime) -> _Verdict:
        with self._lock:
            crls, peers = self.crls, dict(self.peers)
        until = now + dt.timedelta(seconds=CACHE_SECONDS)
        try:
            chain = parse_chain(ders)
        except PeerRefused as e:
            return _Verdict(None, e, until)
        leaf = chain[0]
        if leaf.not_valid_after_utc > now:
            until = min(until, leaf.not_valid_after_utc)
        for crl in crls:  # the verdict changes when a CRL turns stale (not once it is)
            if crl.next_update_utc is not None and crl.next_update_utc > now:
                until = min(until, crl.next_update_utc)
        refused = self._validate(chain, crls, now, stale_ok=self.stale_ok)
        crl_only = None
        if refused is not None and refused.code in ("peer-crl-stale", "peer-crl-missing"):
            # Our CRL is stale (or we have none yet): a configured peer, good per the CRL we
            # hold if any, may still hand us a fresh one. A CRL is signed by the CA; who brings
            # it does not matter, and nothing else passes such a connection.
            if self._validate(chain, crls, now, stale_ok=True,
                              revocation=refused.code == "peer-crl-stale") is None:
                crl_only = self._configured(leaf, peers)
        if refused is not None:
            return _Verdict(None, refused, until, crl_only)
        peer = self._configured(leaf, peers)
        if peer is not None:
            return _Verdict(peer, None, until)
        cn, org = common_name(leaf), organization(leaf)
        return _Verdict(None, PeerRefused(f"{cn} of {org} is not a configured peer (A13)",
                                          code="peer-unknown"), until)

    def _validate(self, chain: list[x509.Certificate], crls: verify.CrlSet, now: dt.datetime,
                  *, stale_ok: bool, revocation: bool = True) -> PeerRefused | None:
        try:
            verify.validate(chain[0], trusted=self.trusted, untrusted=list(chain[1:]),
                            crls=crls, at=now, purpose="node", stale_ok=stale_ok,
                            check_revocation=revocation)
        except verify.ValidationError as e:
            return PeerRefused(f"peer certificate refused: {e}", code=f"peer-{e.code}")
        except Exception as e:  # the validator must not be a way to end the node
            return PeerRefused(f"peer certificate refused: it cannot be validated "
                               f"({str(e) or type(e).__name__})", code="peer-invalid")
        return None

    @staticmethod
    def _configured(leaf: x509.Certificate, peers: dict[str, Peer]) -> Peer | None:
        cn, org = common_name(leaf), organization(leaf)
        return next((p for p in peers.values() if p.name == cn and p.org == org), None)

    def held(self, issuer: x509.Name) -> verify.CrlInfo | None:
        """The newest CRL of `issuer` in force here."""
        with self._lock:
            crls = self.crls
        return crls.newest(issuer)

    def statistics(self) -> dict[str, int]:
        with self._lock:
            return {"cached_peers": len(self._cache), "crls": len(self.crls),
                    "crl_generation": self.generation}
