"""Relay (A12): when exchange with a unit fails and cannot soon be restored, its documents go
through a neighbouring exchange box.

Three nodes take part; each side approves (A13), in ``[relay]`` of its configuration:

- the **sender** S names the neighbours it may relay through (``through``). When the direct
  path to a recipient T has failed for ``after`` seconds, S hands T's queued documents to such
  a neighbour R, as ``POST /v1/documents/{id}`` with ``{"relay": {"to": T, "path": []}}`` in
  ``X-Exchanged-Metadata``: the original package, signed by S for T, untouched. R answers with
  its **hop record** (signed on R's token: it took this document, this content, from S for T);
  S keeps it and goes on trying the direct path, so the document reaches T whichever way comes
  back first.
- the **relay** R names the units it relays for (``for``): it takes a document only from one of
  them, for another of them, a configured peer it reaches itself, never for itself; it checks
  the package as a recipient would (signed by the very node that hands it over, for T, in the
  permitted form; a classified document never travels between units, A38), keeps it in its
  ``relay`` table and passes it on to T with the path of hop records, ours last. T's delivery
  receipt goes back to S as a receipt R carries (``POST /v1/receipts/{id}``), as do T's
  signed-for receipts and return notices when T cannot reach S itself.
- the **recipient** T takes relayed documents only from neighbours in its ``through``. It checks
  every hop record (signed by the node of the unit it names, as the peer table knows that
  neighbour -- its name and organisation, good per our CRLs; one hop following the other from
  S to the neighbour talking to us) and the package
  against S's node certificate (S a configured peer, as for a direct delivery); it stores the
  document as S's (so a copy that comes directly as well is the same document: acknowledged
  again, stored once) with the path as evidence, and signs its delivery receipt to S.

A relay cannot alter a document (S's signature covers the manifest, the manifest every file's
digest) nor re-address it (the recipient is in the signed manifest; T refuses another's). The
path is bounded (`MAX_RELAY_HOPS`: today one relay passes a document on only to its
recipient), which with the recorded path rules out loops. Receipts are signed by T's node or
T's people: a relay can only carry them, or fail to.

The direct path "has failed" from the first failed connection after a success, as this node
last saw it (`Relays.direct_failed`); a restart forgets it, so relaying resumes ``after``
seconds after the first failure seen after the restart. A peer *refused* (revoked, not the
configured node) is not a failed path: its documents are not relayed around the refusal.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from cryptography import x509

from exchanged import package as pkg
from exchanged import receipts
from exchanged.errors import ExchangedError
from exchanged.receipts import ReceiptError
from exchanged.transport.peers import PeerRefused

if TYPE_CHECKING:
    from exchanged.node.base import Node
    from exchanged.transport.peers import Peer

log = logging.getLogger("exchanged")

MAX_RELAY_HOPS = 1  # relays one document passes through (the metadata header is 8 KiB)
REFUSED_RETRY_SECONDS = 60.0  # a relay refused a document: not offered to it again for this long
# Receipts a relay carries back: the recipient node's and the recipient unit's people's. In
# the relay's receipts_out their kind has CARRIED_PREFIX (they are not the relay's own); at
# most MAX_CARRIED wait for one sender, and one the sender refuses for good is dropped.
CARRIED_KINDS = (receipts.DELIVERY, receipts.SIGNED_FOR, receipts.RETURN)
CARRIED_PREFIX = "relayed-"
MAX_CARRIED = 10_000


class RelayError(ExchangedError):
    """A relay request this node will not take, or a relayed document it will not accept."""

    code = "not-relayed"


def request(metadata: Mapping[str, Any]) -> tuple[str, list[str]] | None:
    """The relay part of a submission's metadata: (recipient, hop records as base64), or None
    if the document is not relayed. RelayError if it is malformed."""
    spec = metadata.get("relay")
    if spec is None:
        return None
    if not isinstance(spec, dict) or set(spec) != {"to", "path"}:
        raise RelayError('relay must be {"to": UNIT, "path": [HOP RECORD, ...]}',
                         code="bad-request")
    to, path = spec["to"], spec["path"]
    if not isinstance(to, str) or not isinstance(path, list) or \
            not all(isinstance(h, str) for h in path):
        raise RelayError("relay.to must be a unit id, relay.path a list of base64 records",
                         code="bad-request")
    if len(path) > MAX_RELAY_HOPS:
        raise RelayError(f"the document has passed {len(path)} relays; at most "
                         f"{MAX_RELAY_HOPS} may carry one (hop limit)", code="not-relayed")
    return to, path


class Relays:
    """This node's part in relaying: which direct paths have failed, which neighbour may carry
    what, and the checks of the relay's and the recipient's sides."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.down_since: dict[str, float] = {}  # unit -> when its direct path failed (epoch s)
        self.refused: dict[tuple[str, str], float] = {}  # (doc_id, relay) -> refused at
        self.poke: Callable[[str], None] = lambda unit: None  # something is due for `unit`

    # -- the direct path ------------------------------------------------------------------------

    def direct_failed(self, unit: str) -> None:
        self.down_since.setdefault(unit, time.time())

    def direct_worked(self, unit: str) -> None:
        self.down_since.pop(unit, None)

    def cut_off_in(self, unit: str) -> float | None:
        """Seconds until `unit`'s direct path has failed for relay.after (0: it has; None: it
        has not failed)."""
        since = self.down_since.get(unit)
        if since is None:
            return None
        return max(0.0, since + self.node.config.relay.after - time.time())

    def via(self, relay: str) -> list[str]:
        """The units whose documents (and receipts) go through neighbour `relay` now: we may
        relay through it, and their direct path has failed for relay.after."""
        config = self.node.config
        if relay not in config.relay.through:
            return []
        return sorted(u for u in self.down_since
                      if u != relay and u in config.peers and self.cut_off_in(u) == 0)

    def offer(self, relay: str, doc_id: str) -> bool:
        """May document `doc_id` be offered to `relay` (it did not refuse it lately)?"""
        at = self.refused.get((doc_id, relay))
        if at is not None and time.time() - at < REFUSED_RETRY_SECONDS:
            return False
        self.refused.pop((doc_id, relay), None)
        return True

    def note_refused(self, relay: str, doc_id: str) -> None:
        now = time.time()
        self.refused = {k: t for k, t in self.refused.items()
                        if now - t < REFUSED_RETRY_SECONDS}
        self.refused[(doc_id, relay)] = now

    # -- as the relay ---------------------------------------------------------------------------

    def may_take(self, peer: Peer, to: str, path: list[str]) -> None:
        """Before a byte of body: will this node relay a document from `peer` to `to`?"""
        config = self.node.config
        serves = config.relay.serves
        if not serves:
            raise RelayError(f"{config.unit} is not a relay")
        if to == config.unit:
            raise RelayError("a document for this node is not relayed: send it without "
                             "relay", code="bad-request")
        if peer.unit not in serves or to not in serves:
            raise RelayError(f"{config.unit} relays for {', '.join(serves)} only, not from "
                             f"{peer.unit} to {to}")
        if to not in config.peers:
            raise RelayError(f"{config.unit} does not reach {to}")
        if path:
            raise RelayError(f"{config.unit} passes relayed documents on to their recipient "
                             "only, never to another relay (hop limit)")

    def may_bring(self, peer: Peer) -> None:
        """Before a byte of body: do we take relayed documents from `peer`?"""
        through = self.node.config.relay.through
        if peer.unit not in through:
            raise RelayError(f"{self.node.config.unit} takes relayed documents from "
                             f"{', '.join(through) or 'no one'}, not from {peer.unit} "
                             "(relay.through)", code="unknown-sender")

    def check_taken(self, peer: Peer, leaf: x509.Certificate, doc: str, to: str,
                    received: pkg.Checked) -> None:
        """A package handed to us to relay: for `to`, from the node that hands it over."""
        meta = received.metadata
        if received.signer != leaf or meta.sender != peer.unit:
            raise RelayError(f"the package is {meta.sender}'s, signed by "
                             f"{received.signer.subject.rfc4514_string()}: only a document's "
                             "sender hands it to a relay", code="wrong-sender")
        if meta.doc_id != doc or meta.recipient != to:
            raise RelayError(f"the package is {meta.doc_id} for {meta.recipient}, not {doc} for "
                             f"{to}", code="bad-form")
        if meta.classified:  # pkg.check refuses it already between units; never relayed
            raise RelayError("a classified document is never relayed (A38)", code="classified")

    # -- as the recipient -----------------------------------------------------------------------

    def check_path(self, peer: Peer, doc: str, sha: str, path: list[str],
                   meta: pkg.Metadata) -> None:
        """A relayed document's hop records, from its sender to `peer` (a neighbour we take
        relayed documents from), each signed by the node of the unit it names (known by the
        peer table, not by its certificate's CN: a node certificate need not be named after
        its unit)."""
        node = self.node
        self.may_bring(peer)  # checked before the body too; the configuration may have changed
        if not path:
            raise RelayError("a relayed document comes with its hop records", code="bad-form")
        before = meta.sender
        for n, record in enumerate(path):
            try:
                cms = base64.b64decode(record, validate=True)
            except (binascii.Error, ValueError):
                raise RelayError(f"hop record {n + 1} is not base64", code="bad-form") from None
            try:
                signer, _, payload = receipts.open_signed(cms, node.ca_cert, "hop record")
            except ReceiptError as e:
                raise RelayError(str(e), code="bad-form") from None
            hop = str(payload.get("node"))
            try:
                receipts.check_relay_hop(payload, doc_id=doc, sha256=sha, sender=meta.sender,
                                         recipient=node.config.unit, from_unit=before,
                                         relay_unit=hop)
                # The relay is a neighbour of ours (the hop limit: one, the node talking to
                # us), and the record is signed by its node, good now (A13's identity check).
                node.peers.check([signer], expect=hop)
            except ReceiptError as e:
                raise RelayError(f"hop record {n + 1}: {e}", code="bad-form") from None
            except PeerRefused as e:
                raise RelayError(f"hop record {n + 1} names {hop} but is not signed by its "
                                 f"good node: {e}", code="bad-form") from None
            before = hop
        if before != peer.unit:
            raise RelayError(f"the last hop record is {before}'s, not {peer.unit}'s",
                             code="bad-form")
