"""A peer's connection to us: documents arriving, and signed-for receipts for ours coming back.

Each connection is served on its own: whatever goes wrong on one (a malformed certificate or
request, a peer that stops reading) ends that connection only, and is audited. A document is
stored (blob fsynced, row committed) before it is acknowledged with a delivery receipt signed
on the node token; a repeat of an acknowledged document is recognised by its id and
acknowledged again.

What a connection may cost is bounded before anyone is known: the handshake deadline counts
from the accept; at most `max_unauthenticated` connections may be in their handshake, and
`max_unauthenticated_per_source` from one address (`Gate`); refusals are audited once per
source, kind and interval with a count (`RefusalLog`), so a flood cannot fill the disk with
audit entries. Once known, a peer is held to `max_connections`, its `peer_quota_bytes` of
documents not yet signed for, and the disk's `disk_reserve_bytes` ("busy": it sends again).
A refused package's blob is deleted at once.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import sqlite3
import ssl
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from exchanged import package as pkg
from exchanged import receipts
from exchanged.box import MAX_HOPS
from exchanged.common import stamp
from exchanged.errors import ExchangedError
from exchanged.node import relay
from exchanged.node.base import CHUNK, DISK_SLICE, Admission, Node, describe
from exchanged.node.relay import RelayError, Relays
from exchanged.pki import verify
from exchanged.receipts import ReceiptError
from exchanged.roles import check_remote_receiver
from exchanged.store.audit import parse_record, record_signed
from exchanged.store.db import StoreError
from exchanged.store.nodedb import BlobWriter
from exchanged.transport import protocol as proto
from exchanged.transport.peers import Peer, PeerRefused

log = logging.getLogger("exchanged")


class Gate:
    """Connections not yet authenticated: at most `total`, and `per_source` from one address."""

    def __init__(self, total: int, per_source: int) -> None:
        self.total, self.per_source = total, per_source
        self.count = 0
        self.by_source: dict[str, int] = {}

    def enter(self, source: str) -> str | None:
        """None if the connection may go on to its handshake, else why not."""
        if self.count >= self.total:
            return f"{self.count} connections are in their handshake already"
        if self.by_source.get(source, 0) >= self.per_source:
            return f"{self.per_source} connections from {source} are in their handshake already"
        self.count += 1
        self.by_source[source] = self.by_source.get(source, 0) + 1
        return None

    def leave(self, source: str) -> None:
        self.count -= 1
        left = self.by_source[source] - 1
        if left:
            self.by_source[source] = left
        else:
            del self.by_source[source]


class RefusalLog:
    """Refused connections go to the audit log without letting a flood fill the disk: the
    first refusal of a kind from a source in each interval is recorded at once; the rest are
    counted and recorded as one entry, with the count, when the interval is over (`flush`)."""

    MAX_KEYS = 1024  # beyond this many (source, kind) pairs, new sources count under "*"

    def __init__(self, node: Node) -> None:
        self.node = node
        # (action, source, code) -> [window start, refusals not yet recorded, last error]
        self.pending: dict[tuple[str, str, str], list[Any]] = {}

    async def note(self, action: str, source: str, code: str, error: str) -> None:
        self.node.metrics.refused_connection(code)
        now = trio.current_time()
        interval = self.node.config.limits.refusal_audit_interval
        key = (action, source, code)
        if key not in self.pending and len(self.pending) >= self.MAX_KEYS:
            key = (action, "*", code)
        entry = self.pending.get(key)
        if entry is not None and now - entry[0] < interval:
            entry[1] += 1
            entry[2] = error
            return
        if entry is not None and entry[1]:
            await self._record(key, entry[1], entry[2])
        self.pending[key] = [now, 0, error]
        log.warning("%s %s: %s", "refused" if action == "peer-refused" else
                    "TLS handshake failed with", source, error)
        await self._record(key, 1, error)

    async def flush(self) -> None:
        now = trio.current_time()
        interval = self.node.config.limits.refusal_audit_interval
        for key, (start, count, error) in list(self.pending.items()):
            if now - start >= interval:
                del self.pending[key]
                if count:
                    await self._record(key, count, error)

    async def _record(self, key: tuple[str, str, str], count: int, error: str) -> None:
        action, source, code = key
        await self.node.audit(action, source, outcome="refused",
                              details={"code": code, "error": error, "count": count})


class Inbound:
    """Serves the connections peers open to this node."""

    def __init__(self, node: Node, relays: Relays) -> None:
        self.node = node
        self.relays = relays
        limits = node.config.limits
        self.gate = Gate(limits.max_unauthenticated, limits.max_unauthenticated_per_source)
        self.refusals = RefusalLog(node)
        self.slots = trio.CapacityLimiter(limits.max_connections)
        self.in_flight: Counter[str] = Counter()  # blobs of packages being checked now
        self.per_peer: Counter[str] = Counter()  # connections open now, by peer unit

    def limits_changed(self) -> None:
        """SIGHUP changed the limits: the gate and the connection slots follow (connections
        already admitted keep theirs)."""
        limits = self.node.config.limits
        self.gate.total = limits.max_unauthenticated
        self.gate.per_source = limits.max_unauthenticated_per_source
        self.slots.total_tokens = limits.max_connections

    async def serve(self, stream: trio.SocketStream) -> None:
        """One accepted connection, start to end; raises nothing."""
        node = self.node
        source = _host(stream)
        deadline = trio.current_time() + node.config.limits.handshake_timeout
        if not node.token_present:  # a handshake needs the key: refuse it plainly
            await trio.aclose_forcefully(stream)
            await self.refusals.note("tls-failed", source, "token-missing",
                                     f"this node's token is not present "
                                     f"({node.token_problem})")
            return
        why = self.gate.enter(source)
        if why is not None:
            await trio.aclose_forcefully(stream)
            await self.refusals.note("tls-failed", source, "too-many-connections", why)
            return
        try:
            with trio.fail_at(deadline):  # counted from the accept, not from a free slot
                tls, peer, leaf, adm = await node.handshake(stream, server=True)
        except PeerRefused as e:
            await trio.aclose_forcefully(stream)
            await self.refusals.note("peer-refused", source, e.code, str(e))
            return
        except Exception as e:  # a failed handshake, whatever the peer sent
            await trio.aclose_forcefully(stream)
            await self.refusals.note("tls-failed", source, _kind(e), describe(e))
            return
        finally:
            self.gate.leave(source)
        try:
            cap = node.config.limits.max_connections_per_peer
            if self.per_peer[peer.unit] >= cap:  # one peer may not take every slot
                await self.refusals.note("peer-refused", peer.unit, "busy",
                                         f"{peer.unit} already has {cap} connections open "
                                         "(limits.max_connections_per_peer)")
                return
            with trio.move_on_after(node.config.limits.handshake_timeout) as waited:
                await self.slots.acquire()
            if waited.cancelled_caught:
                await self.refusals.note("peer-refused", source, "busy",
                                         f"{peer.unit}: all {self.slots.total_tokens} "
                                         "connection slots are taken")
                return
            self.per_peer[peer.unit] += 1
            try:
                await self._requests(tls, peer, leaf, adm)
            finally:
                self.slots.release()
                self.per_peer[peer.unit] -= 1
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            pass
        except Exception as e:  # one peer's failure must never take the whole node down
            log.error("connection from %s (%s) failed: %s", peer.unit, source, describe(e))
            await node.audit("connection-failed", peer.unit, outcome="failed",
                             details={"error": describe(e)})
        finally:
            await trio.aclose_forcefully(tls)

    async def _requests(self, tls: trio.SSLStream[Any], peer: Peer,
                        leaf: x509.Certificate, adm: Admission) -> None:
        """A known peer's requests, one after another on one connection (peers keep theirs
        open between rounds). Each request is judged under the CRLs and peer table in force
        when it arrives (`Node.readmit`). `adm.limited`: our CRL is stale (policy "refuse"),
        so only CRLs may pass, to mend that."""
        node = self.node
        limits = node.config.limits
        conn = proto.ServerConnection(max_body_size=limits.max_document_bytes,
                                      max_crl_size=limits.max_crl_bytes)
        writer: BlobWriter | None = None
        pending = bytearray()  # body bytes not yet handed to the disk thread (< DISK_SLICE)
        submit: proto.SubmitDocument | None = None
        try:
            while True:
                try:
                    event = conn.next_event()
                except proto.RemoteProtocolError as e:
                    await node.send(tls, conn.send_error(e))
                    return
                if event is proto.NEED_DATA:
                    if conn.they_are_waiting_for_100_continue:
                        await node.send(tls, conn.send_continue())
                    try:
                        with trio.fail_after(limits.read_timeout):
                            data = await tls.receive_some(CHUNK)
                    except trio.TooSlowError:
                        await node.send(tls, conn.send_error(proto.Reject(
                            "timeout", "no data within the read timeout")))
                        return
                    conn.receive_data(data)
                    continue
                if isinstance(event, proto.ConnectionClosed) or event is proto.PAUSED:
                    return
                if isinstance(event, proto.Request):
                    try:
                        adm = await node.readmit(adm)
                    except PeerRefused as e:
                        log.warning("closing the connection from %s: %s", peer.unit, e)
                        await self.refusals.note("peer-refused", peer.unit, e.code, str(e))
                        await node.send(tls, conn.send(proto.Reject(
                            "unknown-sender", f"{node.config.unit} no longer accepts "
                            f"{peer.unit}'s node: {e}")))
                        return
                limited = adm.limited
                if isinstance(event, proto.Ping):
                    await node.send(tls, conn.send(proto.Pong(
                        node.config.unit, dt.datetime.now(dt.UTC), node.crls.number())))
                elif isinstance(event, proto.FetchCrl):
                    der = node.crls.der()
                    await node.send(tls, conn.send(
                        proto.CrlFile(der) if der is not None else
                        proto.Reject("not-found", f"{node.config.unit} holds no CRL")))
                elif isinstance(event, proto.OfferCrl):
                    await node.send(tls, conn.send(await self._offered_crl(peer, event)))
                elif limited is not None and isinstance(
                        event, proto.SubmitDocument | proto.DeliverReceipt
                        | proto.DeliverCheckpoint):
                    await node.send(tls, conn.send(proto.Reject(
                        "busy", f"{node.config.unit} has no current CRL ({limited}); it takes "
                        "nothing but a CRL until it has one: send again later")))
                    if isinstance(event, proto.SubmitDocument):
                        return  # the body was not read: the connection cannot go on
                elif isinstance(event, proto.SubmitDocument):
                    full = await self._not_relayed(peer, event) or \
                        await self._no_room(peer, event)
                    if full is not None:
                        await node.send(tls, conn.send(full))
                        return
                    submit = event
                    writer = await node.db(node.store.blob_writer,
                                           max_size=limits.max_document_bytes)
                    node.active_transfers += 1
                elif isinstance(event, proto.BodyChunk):
                    assert writer is not None
                    pending += event.data
                    if len(pending) >= DISK_SLICE:
                        await trio.to_thread.run_sync(writer.write, bytes(pending))
                        pending.clear()
                elif isinstance(event, proto.BodyEnd):
                    assert writer is not None and submit is not None
                    if pending:
                        await trio.to_thread.run_sync(writer.write, bytes(pending))
                        pending.clear()
                    answer = await self._received(peer, leaf, submit, event, writer)
                    writer, submit = None, None
                    node.active_transfers -= 1
                    await node.send(tls, conn.send(answer))
                elif isinstance(event, proto.DeliverReceipt):
                    await node.send(tls, conn.send(await self._signed_for(peer, event)))
                elif isinstance(event, proto.DeliverCheckpoint):
                    await node.send(tls, conn.send(await self._witness(peer, leaf, event)))
                if conn.must_close or (node.stopping and writer is None):
                    return
        finally:
            if writer is not None:
                await trio.to_thread.run_sync(writer.abort)
                node.active_transfers -= 1

    async def _offered_crl(self, peer: Peer, offer: proto.OfferCrl
                           ) -> proto.CrlAccepted | proto.Reject:
        """A peer hands us the CRL it holds: held if it verifies and is newer than ours."""
        node = self.node
        try:
            await node.take_crl(offer.crl, f"peer {peer.unit}")
        except verify.ValidationError as e:
            log.warning("refused the CRL %s offered: %s", peer.unit, e)
            await node.audit("crl-refused", peer.unit, outcome="refused",
                             details={"code": e.code, "error": str(e)})
            return proto.Reject("bad-crl", str(e))
        except (ExchangedError, OSError, sqlite3.Error) as e:
            return proto.Reject("busy", f"{node.config.unit} could not store the CRL ({e}); "
                                "offer it again later")
        return proto.CrlAccepted()

    async def _not_relayed(self, peer: Peer, submit: proto.SubmitDocument
                           ) -> proto.Reject | None:
        """Before a byte of body: a document handed to us to relay that we will not carry
        (not a relay for these units, the hop limit), or relayed to us by a neighbour we do
        not take relayed documents from."""
        try:
            wanted = relay.request(submit.metadata)
            if wanted is not None and wanted[0] != self.node.config.unit:
                self.relays.may_take(peer, *wanted)
            elif wanted is not None:
                self.relays.may_bring(peer)
        except RelayError as e:
            return await self._refuse(peer, submit.doc_id, e.code, str(e))
        return None

    async def _no_room(self, peer: Peer, submit: proto.SubmitDocument) -> proto.Reject | None:
        """Before a byte of body is read: is there room for it? A full disk or a peer over its
        quota is told "busy" (it sends again later); the disk-full alert is raised."""
        node = self.node
        limits = node.config.limits
        free = await trio.to_thread.run_sync(node.disk_free)
        if free - submit.length < limits.disk_reserve_bytes:
            log.error("disk nearly full (%d bytes free): %s from %s must wait", free,
                      submit.doc_id, peer.unit)
            node.alert("disk-full", detail=f"{free} bytes free in {node.config.data_dir}")
            return await self._refuse(peer, submit.doc_id, "busy", "the receiving node's disk "
                                      "is full; send the document again later")
        pending = await node.db(node.store.pending_bytes, peer.unit)
        if pending + submit.length > limits.peer_quota_bytes:
            return await self._refuse(peer, submit.doc_id, "busy",
                                      f"{node.config.unit} holds {pending} bytes from "
                                      f"{peer.unit} not yet signed for (quota "
                                      f"{limits.peer_quota_bytes}); send it again later")
        return None

    async def _received(self, peer: Peer, leaf: x509.Certificate, submit: proto.SubmitDocument,
                        end: proto.BodyEnd, writer: BlobWriter
                        ) -> proto.Acknowledge | proto.Reject:
        """A whole package has arrived: check it, store it, acknowledge with a signed receipt.
        Refused, its blob goes at once (unless a stored document holds the same content)."""
        node = self.node
        doc = submit.doc_id
        if not end.digest_ok:
            await trio.to_thread.run_sync(writer.abort)
            return await self._refuse(peer, doc, "digest-mismatch",
                                      "the body does not match X-Exchanged-Sha256")
        try:
            sha = await node.db(writer.commit)
        except ExchangedError as e:  # no room on the disk, most likely: not the sender's fault
            return await self._refuse(peer, doc, "busy", f"the receiving node could not store "
                                      f"the document ({e}); send it again later")
        self.in_flight[sha] += 1
        try:
            answer = await self._check_and_store(peer, leaf, doc, sha, submit.metadata)
        finally:
            self.in_flight[sha] -= 1
            if not self.in_flight[sha]:
                del self.in_flight[sha]
        if isinstance(answer, proto.Reject) and sha not in self.in_flight:
            await node.db(node.store.drop_blob_if_unused, sha)
        return answer

    async def _check_and_store(self, peer: Peer, leaf: x509.Certificate, doc: str, sha: str,
                               metadata: Mapping[str, Any]) -> proto.Acknowledge | proto.Reject:
        node = self.node
        custody = metadata.get("custody")
        relayed = relay.request(metadata)  # well-formed: checked before the body was read
        if relayed is not None and relayed[0] != node.config.unit:
            return await self._take_for_relay(peer, leaf, doc, sha, relayed[0])
        path = relayed[1] if relayed is not None else None
        if path is not None and custody is not None:
            return await self._refuse(peer, doc, "bad-form", "a forwarded document is not "
                                      "relayed: it takes the direct path its custody records "
                                      "name")
        records: list[dict[str, Any]] = []
        if custody is not None:  # forwarded: the records say from whom, through whom
            try:
                records = await trio.to_thread.run_sync(self._custody, peer, doc, sha, custody)
            except ExchangedError as e:
                return await self._refuse(peer, doc, "bad-form", f"the custody records do not "
                                          f"hold: {e}")
        recipient = records[0]["node"] if records else node.config.unit
        received = await self._check_package(peer, doc, sha, recipient)
        if isinstance(received, proto.Reject):
            return received
        meta = received.metadata
        sender = peer.unit
        if path is not None:  # relayed: each hop checked, the package S's own, S our peer
            try:
                await trio.to_thread.run_sync(self.relays.check_path, peer, doc, sha, path,
                                              meta)
                await trio.to_thread.run_sync(
                    lambda: node.peers.check([received.signer], expect=meta.sender))
            except RelayError as e:
                return await self._refuse(peer, doc, e.code, str(e))
            except PeerRefused as e:
                return await self._refuse(peer, doc, "wrong-sender", f"the relayed package's "
                                          f"signer is not {meta.sender}'s good node: {e}")
            sender = meta.sender
        elif records:  # signed by the node of the unit that first sent it, good per our CRLs
            problem = await trio.to_thread.run_sync(self._origin_problem, received.signer, meta,
                                                    records)
            if problem:
                return await self._refuse(peer, doc, "wrong-sender", problem)
        elif received.signer != leaf:  # signed by the very node that is talking to us
            return await self._refuse(peer, doc, "wrong-sender", "the package is signed by "
                                      f"{received.signer.subject.rfc4514_string()}, not by the "
                                      "node that sent it")
        if meta.doc_id != doc or (not records and (meta.sender != sender
                                                   or meta.recipient != node.config.unit)):
            return await self._refuse(peer, doc, "bad-form",
                                      f"the package is {meta.doc_id} from {meta.sender} to "
                                      f"{meta.recipient}; this is {node.config.unit} talking "
                                      f"to {peer.unit} about {doc}")
        box = meta.division if not records else ""
        if box and box not in node.config.box.divisions:
            return await self._refuse(peer, doc, "bad-form", f"the document is addressed to "
                                      f"division {box!r}; {node.config.unit} has none by that "
                                      "name")
        received_at = stamp()
        receipt = await node.tok(receipts.delivery, node.signer, doc_id=doc, sha256=sha,
                                 sender=sender, recipient=node.config.unit,
                                 received_at=received_at)
        new = await self._record(peer, doc, self._store_received, doc, peer, sender, meta, sha,
                                 receipt, box, [str(c) for c in custody or ()],
                                 received.signer.fingerprint(hashes.SHA256()).hex(), path or [])
        if isinstance(new, proto.Reject):
            return new
        if new:
            log.info("received %s from %s%s: %r (%s)", doc, sender,
                     f" through relay {peer.unit}" if path else "", meta.title, meta.urgency)
            node.metrics.received.labels(peer=sender).inc()
            node.alert("document", every_time=True, doc_id=meta.doc_id, title=meta.title,
                       sender=meta.sender, urgency=meta.urgency)
        return proto.Acknowledge(doc, "stored" if new else "duplicate", receipt)

    async def _record(self, peer: Peer, doc: str, fn: Callable[..., bool], *args: Any
                      ) -> bool | proto.Reject:
        """`fn(*args)` in a group commit (True: new); the refusal sent back if the store
        cannot take it (an id-conflict is final; the store failing is not the peer's fault)."""
        try:
            return await self.node.commit(fn, *args)
        except StoreError as e:
            return await self._refuse(peer, doc, e.code if e.code in proto.REASON_CODES
                                      else "busy", str(e))
        except (OSError, sqlite3.Error) as e:
            return await self._refuse(peer, doc, "busy", f"{self.node.config.unit} could not "
                                      f"record the document ({e}); send it again later")

    async def _check_package(self, peer: Peer, doc: str, sha: str, recipient: str
                             ) -> pkg.Checked | proto.Reject:
        """Every check of unpacking, on the stored package itself (nothing copied): what it
        is, or the refusal sent back."""
        node = self.node
        try:
            return await trio.to_thread.run_sync(
                lambda: pkg.check(node.store.blob_path(sha), issuer=node.ca_cert,
                                  max_file_size=node.config.limits.max_document_bytes,
                                  expected_recipient=recipient))
        except ExchangedError as e:
            return await self._refuse(peer, doc, _reason(e.code), str(e))
        except OSError as e:
            return await self._refuse(peer, doc, "busy", f"{node.config.unit} could not read "
                                      f"the document ({e.strerror}); send it again later")

    def _store_received(self, doc: str, peer: Peer, sender: str, meta: pkg.Metadata,
                        sha: str, receipt: bytes, box: str, custody: list[str], signer: str,
                        path: list[str]) -> bool:
        store = self.node.store
        with store.transaction():
            new = store.receive(doc_id=doc, sender=sender, metadata=meta.to_dict(),
                                package_sha256=sha, size=store.blob_path(sha).stat().st_size,
                                delivery_receipt=receipt, box=box, origin=meta.sender,
                                custody=custody, signer_sha256=signer, relay_path=path)
            details = {"sender": sender, "sha256": sha, "title": meta.title,
                       "urgency": meta.urgency, "box": box, "origin": meta.sender,
                       "forwards": len(custody)}
            store.audit.append(action="document-received" if new else "document-duplicate",
                               obj=doc, actor_subject=f"{peer.name},{peer.org}",
                               details={**details, "relayed_by": peer.unit} if path
                               else details)
        return new

    async def _take_for_relay(self, peer: Peer, leaf: x509.Certificate, doc: str, sha: str,
                              to: str) -> proto.Acknowledge | proto.Reject:
        """A document `peer` hands us to pass on to `to` (A12): checked as its recipient
        would check it, kept, acknowledged with our signed hop record."""
        node = self.node
        received = await self._check_package(peer, doc, sha, to)
        if isinstance(received, proto.Reject):
            return received
        try:
            self.relays.check_taken(peer, leaf, doc, to, received)
        except RelayError as e:
            return await self._refuse(peer, doc, e.code, str(e))
        meta = received.metadata
        try:
            old = await node.db(node.store.relay_row, peer.unit, doc)
        except StoreError:
            old = None
        if old is not None and old["package_sha256"] == sha:
            hop = base64.b64decode(old["path"][-1])  # taken before: the same record again
        else:
            hop = await node.tok(receipts.relay_hop, node.signer, doc_id=doc, sha256=sha,
                                 sender=peer.unit, recipient=to, from_unit=peer.unit,
                                 relay_unit=node.config.unit)
        new = await self._record(peer, doc, self._store_relayed, doc, peer, to, meta, sha, hop)
        if isinstance(new, proto.Reject):
            return new
        if new:
            log.info("relaying %s from %s to %s: %r (%s)", doc, peer.unit, to, meta.title,
                     meta.urgency)
            self.relays.poke(to)
        return proto.Acknowledge(doc, "stored" if new else "duplicate", hop)

    def _store_relayed(self, doc: str, peer: Peer, to: str, meta: pkg.Metadata, sha: str,
                       hop: bytes) -> bool:
        store = self.node.store
        with store.transaction():
            new = store.relay_take(doc_id=doc, sender=peer.unit, recipient=to,
                                   handed_by=peer.unit, metadata=meta.to_dict(),
                                   package_sha256=sha, size=store.blob_path(sha).stat().st_size,
                                   path=[base64.b64encode(hop).decode()])
            if new:
                store.audit.append(action="document-relay-taken", obj=doc,
                                   actor_subject=f"{peer.name},{peer.org}",
                                   details={"sender": peer.unit, "recipient": to,
                                            "sha256": sha, "urgency": meta.urgency})
        return new

    def _custody(self, peer: Peer, doc: str, sha: str, custody: Any) -> list[dict[str, Any]]:
        """A forwarded document's custody records, each checked: signed by a person (good per
        our CRLs) of our CA, each the forward of this very document from one unit to the
        next, the last from the peer talking to us (signed by someone of its unit) to us."""
        node = self.node
        if not isinstance(custody, list) or not 0 < len(custody) <= MAX_HOPS or \
                not all(isinstance(c, str) for c in custody):
            raise ReceiptError(f"custody must be a list of 1 to {MAX_HOPS} signed records")
        records = []
        for n, c in enumerate(custody):
            try:
                cms = base64.b64decode(c, validate=True)
            except ValueError:
                raise ReceiptError(f"record {n + 1} is not base64") from None
            signer, _, payload = receipts.open_signed(cms, node.ca_cert, "custody record")
            node.person_status(signer)
            records.append({**payload, "_signer": signer})
        for a, b in zip(records, records[1:], strict=False):
            if a.get("to") != b.get("node"):
                raise ReceiptError(f"the records do not follow each other ({a.get('to')} then "
                                   f"{b.get('node')})")
        for r in records:
            receipts.check_forward(r, doc_id=doc, sha256=sha, from_unit=str(r.get("node")),
                                   to_unit=str(r.get("to")))
        last = records[-1]
        if last["node"] != peer.unit or last["to"] != node.config.unit:
            raise ReceiptError(f"the last forward is from {last['node']} to {last['to']}, not "
                               f"from {peer.unit} to {node.config.unit}")
        check_remote_receiver(last["_signer"], peer.org)
        return records

    def _origin_problem(self, signer: x509.Certificate, meta: pkg.Metadata,
                        records: list[dict[str, Any]]) -> str | None:
        """A forwarded package is signed by the node of the unit that sent it first: the
        node certificate the first forwarder took it from (its configured peer, checked then,
        and named in every custody record), good per our CRLs now."""
        try:
            verify.validate(signer, trusted=self.node.trusted, crls=self.node.peers.crls,
                            purpose="node")
        except verify.ValidationError as e:
            return f"the forwarded package's signer is not good: {e}"
        fingerprint = signer.fingerprint(hashes.SHA256()).hex()
        for r in records:
            if r.get("origin") != meta.sender or r.get("origin_signer") != fingerprint:
                return (f"the forwarded package is signed by {signer.subject.rfc4514_string()}"
                        f" of {meta.sender}, which is not the origin its custody records name")
        return None

    async def _refuse(self, peer: Peer, doc: str, code: str, message: str) -> proto.Reject:
        log.warning("rejected %s from %s: %s", doc, peer.unit, message)
        self.node.metrics.refused.labels(peer=peer.unit, code=code).inc()
        await self.node.audit("document-rejected", doc, outcome="refused",
                              details={"sender": peer.unit, "code": code, "error": message})
        return proto.Reject(code, message)

    async def _signed_for(self, peer: Peer, event: proto.DeliverReceipt
                          ) -> proto.ReceiptAccepted | proto.Reject:
        """Something the recipient unit's people signed about one of our documents: a
        signed-for receipt (the unit's, or a division's for its copy) or a return notice
        (N4, with its reason). Check it, keep it; a repeat is taken again and changes
        nothing."""
        node = self.node
        try:
            signer, _, payload = receipts.open_signed(event.receipt, node.ca_cert)
            if payload.get("sender") != node.config.unit:  # not ours: one we relay back
                return await self._carry_receipt(peer, event, payload)
            item = await node.db(node.store.out_item, event.doc_id)
            recipient = item["recipient"]
            if recipient != peer.unit and peer.unit not in node.config.relay.through:
                raise receipts.ReceiptError(f"{event.doc_id} was not sent to {peer.unit}, nor "
                                            f"is {peer.unit} a relay of ours")
            kind, division = payload.get("type"), str(payload.get("division") or "")
            want = {"doc_id": event.doc_id, "sha256": item["package_sha256"],
                    "sender": node.config.unit, "recipient": recipient}
            if kind == receipts.DELIVERY:  # the recipient's node's, carried back by a relay
                receipts.check_delivery(payload, **want)
                try:
                    node.peers.check([signer], expect=recipient)
                except PeerRefused as e:
                    raise receipts.ReceiptError(f"the delivery receipt is not signed by "
                                                f"{recipient}'s good node: {e}") from None
                await node.commit(self._store_delivered_via, event.doc_id, event.receipt,
                                  recipient, peer.unit)
                return proto.ReceiptAccepted(event.doc_id)
            if kind == receipts.SIGNED_FOR:
                receipts.check_signed_for(payload, **want, division=division)
            elif kind == receipts.RETURN:
                receipts.check_return(payload, **want)
            else:
                raise receipts.ReceiptError(f"a receipt of an unknown kind {kind!r}")
            # A person of the recipient unit, with a certificate good now, signed it.
            node.person_status(signer)
            org = node.config.peers[recipient].org if recipient in node.config.peers else None
            if org is None:
                raise receipts.ReceiptError(f"{recipient} is no longer a configured peer")
            check_remote_receiver(signer, org)
            await node.db(self._store_signed_for, event.doc_id, event.receipt, signer, payload)
        except ExchangedError as e:
            return proto.Reject("unknown-document" if e.code == "not-found" else "bad-receipt",
                                str(e))
        if kind == receipts.RETURN:
            node.metrics.returned.labels(direction="in").inc()
        log.info("%s %s by %s", event.doc_id, "returned" if kind == receipts.RETURN else
                 f"signed for{' (' + division + ')' if division else ''}",
                 signer.subject.rfc4514_string())
        return proto.ReceiptAccepted(event.doc_id)

    def _store_delivered_via(self, doc: str, receipt: bytes, recipient: str,
                             relay_unit: str) -> None:
        store = self.node.store
        with store.transaction():
            if store.mark_delivered_via(doc, receipt):
                self.node.metrics.sent.labels(peer=recipient).inc()
                store.audit.append(action="document-delivered", obj=doc,
                                   details={"recipient": recipient, "status": "relayed",
                                            "relay": relay_unit})

    async def _carry_receipt(self, peer: Peer, event: proto.DeliverReceipt,
                             payload: dict[str, Any]) -> proto.ReceiptAccepted | proto.Reject:
        """As a relay: a receipt `peer` (the recipient) gives us for the sender of one of its
        documents, which it cannot reach itself. Carried, not judged: the sender checks who
        signed it and for what."""
        node = self.node
        sender, kind = str(payload.get("sender")), payload.get("type")
        serves = node.config.relay.serves
        if peer.unit not in serves or sender not in serves or sender not in node.config.peers:
            return proto.Reject("not-relayed", f"{node.config.unit} relays for "
                                f"{', '.join(serves) or 'no one'}, not from {peer.unit} to "
                                f"{sender}")
        if kind not in relay.CARRIED_KINDS or payload.get("recipient") != peer.unit or \
                payload.get("doc_id") != event.doc_id:
            return proto.Reject("bad-receipt", f"not a receipt of {peer.unit}'s for "
                                f"{event.doc_id}")
        try:
            new = await node.commit(self._store_carried, peer, sender, event, str(kind))
        except StoreError as e:
            return proto.Reject("busy" if e.code == "busy" else "bad-receipt", str(e))
        except (ExchangedError, OSError, sqlite3.Error) as e:
            return proto.Reject("busy", f"the relay could not keep the receipt ({e})")
        if new:
            log.info("relaying %s's %s receipt for %s back to %s", peer.unit, kind,
                     event.doc_id, sender)
            self.relays.poke(sender)
        return proto.ReceiptAccepted(event.doc_id)

    def _store_carried(self, peer: Peer, sender: str, event: proto.DeliverReceipt,
                       kind: str) -> bool:
        store = self.node.store
        with store.transaction():
            carried = relay.CARRIED_PREFIX + kind
            if any(r["kind"] == carried and r["receipt"] == event.receipt
                   for r in store.receipts_for(event.doc_id, with_receipts=True)
                   if r["sender"] == sender):
                return False  # carried before: the recipient repeated it
            waiting = store.carried_waiting(sender, relay.CARRIED_PREFIX)
            if waiting >= relay.MAX_CARRIED:
                raise StoreError(f"{self.node.config.unit} holds {waiting} receipts for "
                                 f"{sender} already; give this one again later", code="busy")
            store.queue_receipt(sender, event.doc_id, carried, event.receipt)
            store.audit.append(action="receipt-relay-taken", obj=event.doc_id,
                               details={"from": peer.unit, "to": sender, "kind": kind})
        return True

    async def _witness(self, peer: Peer, leaf: x509.Certificate, event: proto.DeliverCheckpoint
                       ) -> proto.CheckpointAccepted | proto.Reject:
        """A peer we witness gives us one of its signed audit checkpoints: check it is its
        node's signature, keep it. The same number with other content means the peer's log
        was rewritten: refused, audited, alerted."""
        node = self.node
        if peer.unit not in node.config.witness_for:
            return proto.Reject("unknown-sender", f"{node.config.unit} does not witness "
                                f"{peer.unit}'s audit log (witness_for)")
        try:
            record = parse_record(event.record)
        except (ValueError, TypeError) as e:
            return proto.Reject("bad-request", f"not a checkpoint record: {e}")
        if record["seq"] != event.seq or not record_signed(record, leaf.public_key()):
            return proto.Reject("bad-signature", f"checkpoint {event.seq} is not signed by "
                                f"{peer.unit}'s node")
        try:
            new = await node.db(self._store_witnessed, peer, record)
        except StoreError as e:
            if e.code == "id-conflict":
                log.error("%s", e)
                await node.audit("witness-conflict", peer.unit, outcome="refused",
                                 details={"seq": record["seq"], "error": str(e)})
                node.alert("witness-conflict", detail=str(e))
                return proto.Reject("id-conflict", str(e))
            return proto.Reject("busy", str(e))
        except (OSError, sqlite3.Error) as e:
            return proto.Reject("busy", f"the witness could not keep the checkpoint ({e})")
        if new:
            log.info("witnessed %s's audit checkpoint %d", peer.unit, record["seq"])
        return proto.CheckpointAccepted(event.seq)

    def _store_witnessed(self, peer: Peer, record: dict[str, Any]) -> bool:
        store = self.node.store
        with store.transaction():
            new = store.witness(peer.unit, record)
            if new:
                store.audit.append(action="checkpoint-witnessed", obj=peer.unit,
                                   details={"seq": record["seq"], "hash": record["hash"]})
        return new

    def _store_signed_for(self, doc: str, receipt: bytes, signer: x509.Certificate,
                          payload: dict[str, Any]) -> None:
        store, rows = self.node.store, self.node.box.rows
        kind, division = str(payload["type"]), str(payload.get("division") or "")
        subject = signer.subject.rfc4514_string()
        with store.transaction():
            if not rows.record_receipt(doc, kind, division, format(signer.serial_number, "x"),
                                       subject, receipt):
                return  # taken before: the recipient retried
            if kind == receipts.RETURN:
                rows.mark_returned(doc, subject, str(payload["reason"]))
            elif not division and store.out_item(doc)["state"] == "delivered":
                store.mark_signed_for(doc, receipt)
            store.audit.append(action="document-returned-to-us" if kind == receipts.RETURN
                               else "document-signed-for", obj=doc,
                               actor=format(signer.serial_number, "x"), actor_subject=subject,
                               details=payload, signature=receipt)


def _host(stream: trio.SocketStream) -> str:
    """The source address (no port: limits and refusals count per address)."""
    try:
        return str(stream.socket.getpeername()[0])
    except (OSError, IndexError, TypeError):
        return "?"


def _kind(e: BaseException) -> str:
    """A refused handshake's kind, for counting: timeout, tls (with OpenSSL's reason, a word
    from its small fixed vocabulary, e.g. tls:CERTIFICATE_VERIFY_FAILED:10), network or
    internal."""
    if isinstance(e, trio.TooSlowError):
        return "timeout"
    cause = e.__cause__ if isinstance(e, trio.BrokenResourceError) else e
    if isinstance(cause, ssl.SSLError):
        code = getattr(cause, "verify_code", None)
        return f"tls:{cause.reason or 'unknown'}" + (f":{code}" if code else "")
    if isinstance(e, trio.BrokenResourceError):
        return "tls"
    if isinstance(e, OSError):
        return "network"
    return "internal"


def _reason(code: str) -> str:
    return code if code in proto.REASON_CODES else "bad-form"
