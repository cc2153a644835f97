"""The CRLs a node holds, and how newer ones reach it without a human.

A node reads the CRL files its configuration names (`trust.crls`, re-read when they change)
and holds the newest CRL it has learned in ``DATA_DIR/crls/`` (one file per CA). A CRL is
learned from three places, each checked the same way before it is held (signed by a trusted
CA, complete, newer than the one held: `exchanged.pki.verify.check_crl`):

* the CA's publication point, fetched every `crl_refresh` seconds and on `exchanged crl
  fetch` (`exchanged.transport.publish.fetch`);
* a peer: every connection to a peer begins with a ping that carries both sides' CRL numbers,
  and the side with the older CRL fetches, or is offered, the newer one (`outbound`,
  `inbound`); each peer is asked at least every `crl_gossip` seconds, and at once when a newer
  CRL was learned, so a revocation crosses the network in one round even with the CA down;
* an operator: `exchanged crl install FILE`.

The newest CRL held for our CA is what the node announces and hands over. Once it is past its
nextUpdate the node raises the crl-stale alert and shows it in its status; with
``stale_crl = "refuse"`` no documents pass until a fresh CRL arrives, while peers may still
hand one over.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from exchanged.common import stamp
from exchanged.node.config import Config
from exchanged.pki import verify
from exchanged.store.files import write_atomic
from exchanged.transport.peers import PeerCheck

log = logging.getLogger("exchanged")
LEARNED_DIR = "crls"


class CrlKeeper:
    """The CRLs of one node: what it holds, and taking a newer one. It makes the node's
    `PeerCheck` (`peers`), which judges peers by the CRLs in force."""

    def __init__(self, config: Config, trusted: list[x509.Certificate], cert: x509.Certificate,
                 record: Callable[..., None]) -> None:
        self.config, self.trusted, self.cert = config, trusted, cert
        self.ca = trusted[0]
        self.record = record  # (action, object, details=...): an entry in the audit log
        self.dir = config.data_dir / LEARNED_DIR
        self.peers = PeerCheck(trusted, self.paths(), config.peers, stale_crl=config.stale_crl)
        self._lock = threading.Lock()  # one install at a time (a fetch and a peer's offer)
        self._der: tuple[int, bytes] | None = None  # (number, DER) of the CRL handed over
        self.last_fetch: dict[str, Any] = {}  # the publication point's last answer
        self.last_taken: dict[str, Any] = {}  # the last CRL taken: number, source, time

    def path_for(self, issuer: x509.Name) -> Path:
        tag = hashlib.sha256(issuer.public_bytes()).hexdigest()[:16]
        return self.dir / f"{tag}.crl"

    def paths(self) -> list[Path]:
        """The CRL files in force: the configured ones, then the learned ones."""
        learned = sorted(self.dir.glob("*.crl")) if self.dir.is_dir() else []
        return list(self.config.crls) + learned

    def held(self) -> verify.CrlInfo | None:
        """The newest CRL of our CA in force here."""
        return self.peers.held(self.ca.subject)

    def number(self) -> int | None:
        info = self.held()
        return None if info is None else info.number

    def der(self) -> bytes | None:
        """The newest CRL of our CA, DER, to hand to a peer."""
        info = self.held()
        if info is None:
            return None
        cached = self._der
        if cached is None or cached[0] != info.number:
            cached = self._der = (info.number, info.crl.public_bytes(serialization.Encoding.DER))
        return cached[1]

    def stale(self, at: dt.datetime | None = None) -> verify.CrlInfo | None:
        """The held CRL if it is past its nextUpdate (or there is none: a stand-in), else None."""
        info = self.held()
        at = at or dt.datetime.now(dt.UTC)
        return info if info is not None and info.stale(at) else None

    def check(self, der: bytes, source: str) -> verify.CrlInfo:
        """Is `der` a CRL of a trusted CA we could hold? Its information, or ValidationError
        saying what is wrong with it. CPU only (no store): run it in a thread."""
        if len(der) > self.config.limits.max_crl_bytes:
            raise verify.ValidationError("crl-invalid", f"the CRL from {source} is {len(der)} "
                                         "bytes, over limits.max_crl_bytes")
        return verify.check_crl(der, self.trusted, source=f"the CRL from {source}")

    def install(self, der: bytes, info: verify.CrlInfo, source: str) -> bool:
        """Hold `der` (checked: `check`) if it is newer than the CRL held for its CA, and
        record that in the audit log; False if it is no news. Run it where the store may be
        written (the node's db thread)."""
        with self._lock:
            held = self.peers.held(info.issuer)
            if held is not None and info.number <= held.number:
                return False
            path = self.path_for(info.issuer)
            path.parent.mkdir(mode=0o700, exist_ok=True)
            write_atomic(path, der)
            try:
                self.peers.reload(crl_paths=self.paths(), force=True)
            except Exception:
                path.unlink(missing_ok=True)  # never leave a file the node cannot read
                self.peers.reload(crl_paths=self.paths(), force=True)
                raise
        self.last_taken = {"number": info.number, "source": source, "time": stamp()}
        log.info("CRL number %d of %s taken from %s (%d entries, next update %s)",
                 info.number, info.issuer.rfc4514_string(), source, info.entries,
                 stamp(info.next_update) if info.next_update else "-")
        self.record("crl-installed", str(info.number), details={
            "issuer": info.issuer.rfc4514_string(), "source": source,
            "previous": held.number if held else None, "entries": info.entries,
            "this_update": stamp(info.this_update),
            "next_update": stamp(info.next_update) if info.next_update else None})
        return True

    def status(self, at: dt.datetime | None = None) -> list[dict[str, Any]]:
        """Per trusted CA: the CRL held, its age and whether it is stale."""
        at = at or dt.datetime.now(dt.UTC)
        out = []
        for ca in self.trusted:
            info = self.peers.held(ca.subject)
            row: dict[str, Any] = {"ca": ca.subject.rfc4514_string(), "number": None}
            if info is not None:
                row.update(number=info.number, this_update=stamp(info.this_update),
                           next_update=stamp(info.next_update) if info.next_update else None,
                           age_seconds=int((at - info.this_update).total_seconds()),
                           entries=info.entries, source=info.source, stale=info.stale(at))
            else:
                row.update(stale=True)
            out.append(row)
        return out

    def publication_point(self) -> str | None:
        """Where our CA publishes: the configured crl_url, else the http URL in the node
        certificate's CRL distribution point."""
        if self.config.crl_url:
            return self.config.crl_url
        return distribution_point(self.cert)


def distribution_point(cert: x509.Certificate) -> str | None:
    try:
        dps = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except x509.ExtensionNotFound:
        return None
    for dp in dps:
        for name in dp.full_name or []:
            if isinstance(name, x509.UniformResourceIdentifier) and \
                    name.value.startswith("http://"):
                return name.value
    return None
