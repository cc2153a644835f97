"""Who is on the other end: the peer's chain, its CRL status and the peer table, after TLS.

OpenSSL has checked that the peer's chain leads to our CA; here the chain is validated again
with our CRL processing (`exchanged.pki.verify`) and the leaf is matched against the configured
peers (A13: a unit that is not configured is refused even with a valid certificate).

CRLs are parsed and indexed once when they change (`reload`), and a peer's verdict is reused
until its certificate, a CRL, or the clock (the certificate's notAfter, the CRL's nextUpdate,
at most five minutes) says otherwise: a handshake costs the same with a 100,000-entry CRL as
with an empty one.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from exchanged.errors import ExchangedError
from exchanged.pki import verify
from exchanged.pki.names import common_name, organization

CACHE_SECONDS = 300


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


class PeerCheck:
    """Validates peers' chains against the CA certificates and CRL files, with a cache."""

    def __init__(self, trusted: Sequence[x509.Certificate], crl_paths: Sequence[Path],
                 peers: dict[str, Peer]) -> None:
        self.trusted = list(trusted)
        self.crl_paths = list(crl_paths)
        self.peers = dict(peers)
        self._lock = threading.Lock()
        self._cache: dict[bytes, _Verdict] = {}
        self.crls = verify.CrlSet.load(self.crl_paths) if self.crl_paths else verify.CrlSet()
        self.generation = 0
        self._stamps = self._file_stamps()

    def _file_stamps(self) -> tuple[tuple[str, int, int], ...]:
        out = []
        for p in self.crl_paths:
            try:
                st = p.stat()
                out.append((str(p), st.st_mtime_ns, st.st_size))
            except OSError:
                out.append((str(p), -1, -1))
        return tuple(out)

    def reload(self, peers: dict[str, Peer] | None = None, *, force: bool = False) -> bool:
        """Re-read the CRL files if they changed (or `force`); swap in new peers. A CRL file
        that cannot be read keeps the old set in force and raises, so the caller can log it."""
        stamps = self._file_stamps()
        changed = force or stamps != self._stamps
        if changed:
            crls = verify.CrlSet.load(self.crl_paths) if self.crl_paths else verify.CrlSet()
        with self._lock:
            if changed:
                self.crls, self._stamps = crls, stamps
                self.generation += 1
            if peers is not None:
                self.peers = dict(peers)
                changed = True
            if changed:
                self._cache.clear()
        return changed

    def check(self, chain: Sequence[x509.Certificate], *, expect: str | None = None,
              now: dt.datetime | None = None) -> Peer:
        """The configured peer this chain belongs to, or PeerRefused saying why."""
        if not chain:
            raise PeerRefused("the peer sent no certificate")
        now = now or dt.datetime.now(dt.UTC)
        key = b"".join(c.fingerprint(hashes.SHA256()) for c in chain)
        with self._lock:
            cached = self._cache.get(key)
            generation = self.generation
        if cached is None or now >= cached.until:
            cached = self._judge(chain, now)
            with self._lock:
                if self.generation == generation:  # not judged against CRLs since replaced
                    self._cache[key] = cached
        if cached.error is not None:
            # A new exception each time: re-raising one object grows its traceback forever.
            raise PeerRefused(str(cached.error), code=cached.error.code)
        assert cached.peer is not None
        if expect is not None and cached.peer.unit != expect:
            raise PeerRefused(f"connected to {cached.peer.unit}'s node, expected {expect}'s")
        return cached.peer

    def _judge(self, chain: Sequence[x509.Certificate], now: dt.datetime) -> _Verdict:
        with self._lock:
            crls, peers = self.crls, dict(self.peers)
        leaf = chain[0]
        until = min(now + dt.timedelta(seconds=CACHE_SECONDS), leaf.not_valid_after_utc)
        for crl in crls:
            if crl.next_update_utc is not None:
                until = min(until, crl.next_update_utc)
        try:
            verify.validate(leaf, trusted=self.trusted, untrusted=list(chain[1:]),
                            crls=crls, at=now, purpose="node")
        except verify.ValidationError as e:
            return _Verdict(None, PeerRefused(f"peer certificate refused: {e}",
                                              code=f"peer-{e.code}"), until)
        cn, org = common_name(leaf), organization(leaf)
        for peer in peers.values():
            if peer.name == cn and peer.org == org:
                return _Verdict(peer, None, until)
        return _Verdict(None, PeerRefused(f"{cn} of {org} is not a configured peer (A13)",
                                          code="peer-unknown"), until)

    def statistics(self) -> dict[str, int]:
        with self._lock:
            return {"cached_peers": len(self._cache), "crls": len(self.crls),
                    "crl_generation": self.generation}
