"""Our documents and receipts going out: one sender task per configured peer, store-and-forward.

A sender delivers its peer's due documents and the signed-for receipts owed to it, then sleeps
until the next one falls due or something is queued (`poke`). A failed attempt is counted and
retried with exponential backoff and jitter (the store keeps the schedule, so it survives a
restart); a refusal that says "not now" is retried, any other is final.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import trio
from cryptography.hazmat.primitives import hashes

from exchanged import receipts
from exchanged.common import stamp_precise
from exchanged.errors import ExchangedError
from exchanged.node.base import CHUNK, DISK_SLICE, Node, describe
from exchanged.pki import verify
from exchanged.store.audit import mirror_line
from exchanged.store.nodedb import OutItem
from exchanged.transport import protocol as proto
from exchanged.transport.peers import Peer, PeerRefused
from exchanged.transport.tlskey import peer_chain_der

log = logging.getLogger("exchanged")
# How long a receiver may take, after the last byte, to store, unpack and check a package
# before it acknowledges: read_timeout plus this much per byte (3.7 s/GB measured).
ACK_SECONDS_PER_BYTE = 1 / (16 * 1024 * 1024)
# Refusals that say "not now" rather than "never": the document is sent again later.
TRANSIENT = frozenset({"busy", "timeout", "internal-error", "truncated"})
RESTART_SECONDS = 10  # a sender that failed unexpectedly starts again after this long
WITNESS_RETRY_SECONDS = 30  # our witness unreachable or refusing: try again after this long
CRL_SPREAD_SECONDS = 5.0  # a newer CRL goes to a peer at once, but not twice in this long


class Outbound:
    """The sender tasks, one per configured peer, in the nursery given to `start`."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.wake: dict[str, trio.Event] = {}
        self.senders: set[str] = set()  # units that have a sender task now
        self.nursery: trio.Nursery | None = None
        self.witness_retry = 0.0  # trio time before which our witness is not tried again
        # unit -> (trio time, our CRL number then) of the last CRL comparison with the peer
        self.crl_compared: dict[str, tuple[float, int | None]] = {}
        # unit -> last_success / last_error / last_error_at (exchanged status)
        self.peer_state: dict[str, dict[str, str]] = {}

    def start(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        for unit in self.node.config.peers:
            self.start_sender(unit)

    def poke(self, unit: str) -> None:
        """Something is due for `unit` now (a document queued, a receipt to return)."""
        self.wake.setdefault(unit, trio.Event()).set()

    def _note(self, unit: str, error: str | None = None) -> None:
        state = self.peer_state.setdefault(unit, {})
        if error is None:
            state["last_success"] = stamp_precise()
        else:
            state["last_error"], state["last_error_at"] = error, stamp_precise()

    def crl_changed(self) -> None:
        """A newer CRL is held: every peer is asked whether it has it."""
        for unit in self.node.config.peers:
            self.poke(unit)

    def _crl_wait(self, unit: str) -> float:
        """Seconds until the CRL is next compared with `unit` (0: now)."""
        last = self.crl_compared.get(unit)
        if last is None:
            return 0.0
        since = trio.current_time() - last[0]
        if last[1] != self.node.crls.number():
            return max(0.0, CRL_SPREAD_SECONDS - since)
        return max(0.0, self.node.config.crl_gossip - since)

    def peers_changed(self, added: set[str]) -> None:
        """The peer table changed: new peers get a sender, removed ones' senders stop (their
        queued documents wait, should the peer come back)."""
        for unit in sorted(added):
            self.start_sender(unit)
        for unit in set(self.wake) - set(self.node.config.peers):
            self.poke(unit)

    def start_sender(self, unit: str) -> None:
        if unit not in self.senders and self.nursery is not None:
            self.senders.add(unit)
            self.nursery.start_soon(self._sender, unit)

    async def _sender(self, unit: str) -> None:
        """One task per peer: deliver its due documents and receipts, retry with backoff.
        Whatever goes wrong with one peer stays with that peer's sender, which starts over."""
        try:
            while True:
                try:
                    await self._loop(unit)
                    return
                except Exception as e:
                    log.exception("the sender for %s failed; it starts again in %ss", unit,
                                  RESTART_SECONDS)
                    await self.node.audit("sender-failed", unit, outcome="failed",
                                          details={"error": describe(e)})
                    await trio.sleep(RESTART_SECONDS)
        finally:
            self.senders.discard(unit)

    async def _loop(self, unit: str) -> None:
        node = self.node
        while unit in node.config.peers:
            self.wake[unit] = trio.Event()
            if not node.token_present:  # no handshake without the key: documents wait
                self._note(unit, f"this node's token is not present ({node.token_problem})")
                with trio.move_on_after(5):
                    await self.wake[unit].wait()
                continue
            items = await node.db(node.store.due, time.time(), recipient=unit)
            owed = await node.db(node.store.receipts_to_return, unit)
            checkpoints = []
            if unit == node.config.witness:
                checkpoints = await node.db(node.store.unwitnessed)
            later = trio.current_time() < self.witness_retry
            crl_wait = self._crl_wait(unit)
            if items or owed or (checkpoints and not later) or crl_wait == 0:
                await self._deliver(unit, items, owed, [] if later else checkpoints)
                continue
            nxt = await node.db(node.store.next_due_time, recipient=unit)
            wait = 3600.0 if nxt is None else max(0.05, nxt - time.time())
            wait = min(wait, max(0.05, crl_wait))
            if checkpoints:
                wait = min(wait, max(0.05, self.witness_retry - trio.current_time()))
            with trio.move_on_after(wait):
                await self.wake[unit].wait()

    async def _deliver(self, unit: str, items: list[OutItem], owed: list[dict[str, Any]],
                       checkpoints: list[dict[str, Any]]) -> None:
        node = self.node
        peer = node.config.peers.get(unit)
        if peer is None:  # removed from the configuration meanwhile
            return
        self.crl_compared[unit] = (trio.current_time(), node.crls.number())  # tried, at least
        try:
            with trio.fail_after(node.config.limits.handshake_timeout):
                sock = await trio.open_tcp_stream(peer.host, peer.port)
            try:
                tls, _, _, limited = await node.handshake(sock, server=False, expect=unit)
            except BaseException:
                await trio.aclose_forcefully(sock)
                raise
        except Exception as e:  # unreachable, refused, or whatever the server sent
            err = f"cannot reach {unit} at {peer.host}:{peer.port}: {describe(e)}"
            if isinstance(e, PeerRefused):
                node.metrics.refused_connection(e.code)
                log.warning("refusing %s: %s", unit, e)
                await node.audit("peer-refused", unit, outcome="refused",
                                 details={"code": e.code, "error": str(e)})
            self._note(unit, err)
            for item in items:
                await node.db(node.store.schedule_retry, item.doc_id, err, time.time())
            if checkpoints:
                self.witness_retry = trio.current_time() + WITNESS_RETRY_SECONDS
            await trio.sleep(1)  # receipts retry on the next round
            return
        untried = list(items)
        try:
            conn = proto.ClientConnection(f"{peer.host}:{peer.port}",
                                          max_crl_size=node.config.limits.max_crl_bytes)
            await self._compare_crls(tls, conn, unit)
            if limited is not None:  # our CRL is stale: did the peer mend it?
                still = await trio.to_thread.run_sync(
                    lambda: node.peers.admit(peer_chain_der(tls), expect=unit)[1])
                limited = None if still is None else str(still)
            if limited is not None:
                err = f"this node has no current CRL ({limited}): nothing is sent until it " \
                      "has one"
                log.warning("%s: %s", unit, err)
                self._note(unit, err)
                for item in items:
                    await node.db(node.store.schedule_retry, item.doc_id, err, time.time())
                return
            for r in owed:
                await self._send_receipt(tls, conn, r)
            for item in items:
                untried.remove(item)  # from here on _send_one records what happens to it
                await self._send_one(tls, conn, item, peer)
                if conn.state is not proto.State.IDLE:
                    break
            if checkpoints and conn.state is proto.State.IDLE:  # after the documents
                self.witness_retry = trio.current_time() + WITNESS_RETRY_SECONDS
                for cp in checkpoints:
                    if not await self._send_checkpoint(tls, conn, cp, unit):
                        break
                else:
                    self.witness_retry = 0.0
            self._note(unit)
        except (trio.BrokenResourceError, trio.TooSlowError, proto.ProtocolError, OSError,
                ExchangedError) as e:
            log.warning("delivery to %s interrupted: %s", unit, describe(e))
            self._note(unit, f"delivery interrupted: {describe(e)}")
            for item in untried:  # the session broke before their turn (e.g. at the ping)
                await node.db(node.store.schedule_retry, item.doc_id,
                              f"delivery to {unit} interrupted: {describe(e)}", time.time())
            await trio.sleep(1)  # never a tight reconnect loop; items have their own backoff
        finally:
            await trio.aclose_forcefully(tls)

    async def _compare_crls(self, tls: trio.SSLStream[Any], conn: proto.ClientConnection,
                            unit: str) -> None:
        """Ping with our CRL number; whichever side holds the older CRL gets the newer one."""
        node = self.node
        ours = node.crls.number()
        await node.send(tls, conn.send(proto.Ping(ours)))
        pong = await self._response(tls, conn)
        if not isinstance(pong, proto.Pong):
            log.warning("%s did not answer our ping: %s", unit, getattr(pong, "message", pong))
            return
        theirs = pong.crl_number
        if theirs is not None and (ours is None or theirs > ours):
            await node.send(tls, conn.send(proto.FetchCrl()))
            answer = await self._response(tls, conn)
            if isinstance(answer, proto.CrlFile):
                try:
                    await node.take_crl(answer.crl, f"peer {unit}")
                except verify.ValidationError as e:
                    log.warning("refused the CRL %s holds: %s", unit, e)
                    await node.audit("crl-refused", unit, outcome="refused",
                                     details={"code": e.code, "error": str(e)})
        elif ours is not None and (theirs is None or ours > theirs):
            der = node.crls.der()
            if der is not None:
                await node.send(tls, conn.send(proto.OfferCrl(der)))
                answer = await self._response(tls, conn)
                if isinstance(answer, proto.Reject):
                    log.warning("%s refused our CRL number %d: %s", unit, ours,
                                answer.message)
        self.crl_compared[unit] = (trio.current_time(), node.crls.number())

    async def _send_one(self, tls: trio.SSLStream[Any], conn: proto.ClientConnection,
                        item: OutItem, peer: Peer) -> None:
        node = self.node
        await node.db(node.store.mark_sending, item.doc_id)
        path = node.store.blob_path(item.package_sha256)
        try:
            await node.send(tls, conn.send(proto.SubmitDocument(
                item.doc_id, item.size, item.package_sha256,
                {"custody": item.custody} if item.custody else {})))
            with open(path, "rb") as f:  # noqa: ASYNC230 — local disk, read in slices
                while conn.body_remaining:
                    data = await trio.to_thread.run_sync(f.read, DISK_SLICE)
                    if not data:
                        raise ExchangedError(f"blob {path} is shorter than recorded",
                                             code="corrupt-blob")
                    for i in range(0, len(data), CHUNK):
                        await node.send(tls, conn.send_body(data[i:i + CHUNK]))
            answer = await self._response(tls, conn, extra=item.size * ACK_SECONDS_PER_BYTE)
        except BaseException as e:
            err = str(e) or type(e).__name__
            with trio.CancelScope(shield=True):
                await node.db(node.store.schedule_retry, item.doc_id, err, time.time())
            raise
        unproven = None
        if isinstance(answer, proto.Acknowledge):
            unproven = await trio.to_thread.run_sync(self._check_receipt, item, answer, peer)
        await node.db(self._record_answer, item, answer, unproven)

    def _check_receipt(self, item: OutItem, answer: proto.Acknowledge, peer: Peer
                       ) -> str | None:
        """The delivery receipt proves the delivery: signed by a node certificate of the
        recipient's unit (a configured peer, good per our CRLs), for this document, this
        content, from us to them. None if it does; else what is wrong."""
        node = self.node
        try:
            if answer.receipt is None:
                raise receipts.ReceiptError("no delivery receipt came with the acknowledgement")
            signer, _, payload = receipts.open_signed(answer.receipt, node.ca_cert,
                                                      "delivery receipt")
            node.peers.check([signer], expect=peer.unit)
            receipts.check_delivery(payload, doc_id=item.doc_id, sha256=item.package_sha256,
                                    sender=node.config.unit, recipient=peer.unit)
        except ExchangedError as e:
            return f"{peer.unit} acknowledged {item.doc_id} without a valid delivery receipt: {e}"
        return None

    def _record_answer(self, item: OutItem, answer: Any, unproven: str | None) -> None:
        store = self.node.store
        if isinstance(answer, proto.Reject) and answer.code in TRANSIENT:
            store.schedule_retry(item.doc_id, f"{answer.code}: {answer.message}", time.time())
            return
        if unproven is not None:  # not delivered until proven: sent again, then given up
            log.warning("%s", unproven)
            with store.transaction():
                store.schedule_retry(item.doc_id, unproven, time.time())
                store.audit.append(action="document-receipt-refused", obj=item.doc_id,
                                   outcome="refused", details={"recipient": item.recipient,
                                                               "error": unproven})
            return
        with store.transaction():
            if isinstance(answer, proto.Acknowledge):
                self.node.metrics.sent.labels(peer=item.recipient).inc()
                store.mark_delivered(item.doc_id, answer.receipt)
                store.audit.append(action="document-delivered", obj=item.doc_id,
                                   details={"recipient": item.recipient,
                                            "status": answer.status})
            else:
                self.node.metrics.rejected.labels(peer=item.recipient, code=answer.code).inc()
                store.mark_rejected(item.doc_id, answer.code, answer.message)
                store.audit.append(action="document-rejected-by-peer", obj=item.doc_id,
                                   outcome="refused",
                                   details={"recipient": item.recipient, "code": answer.code,
                                            "error": answer.message})

    async def _send_receipt(self, tls: trio.SSLStream[Any], conn: proto.ClientConnection,
                            r: dict[str, Any]) -> None:
        node = self.node
        await node.send(tls, conn.send(proto.DeliverReceipt(r["doc_id"], r["receipt"])))
        answer = await self._response(tls, conn)
        await node.db(node.store.mark_receipt_returned, r["id"],
                      isinstance(answer, proto.ReceiptAccepted),
                      error=getattr(answer, "message", None) or "refused")

    async def _send_checkpoint(self, tls: trio.SSLStream[Any], conn: proto.ClientConnection,
                               row: dict[str, Any], unit: str) -> bool:
        """One of our signed audit checkpoints to our witness; True if it keeps it."""
        node = self.node
        current = node.cert.fingerprint(hashes.SHA256()).hex()
        if json.loads(row["details"]).get("signer_sha256") != current:
            # Signed with the key this node had before a renewal: the witness knows the node
            # by its current certificate, and the checkpoint signed at the renewal with the
            # new key covers everything before it (it signs the chain's head).
            await node.db(node.store.mark_witnessed, row["seq"])
            log.info("audit checkpoint %d (signed before the certificate was renewed) is "
                     "covered by a later one; not given to the witness", row["seq"])
            return True
        record = mirror_line(row).rstrip(b"\n")
        await node.send(tls, conn.send(proto.DeliverCheckpoint(row["seq"], record)))
        answer = await self._response(tls, conn)
        if isinstance(answer, proto.CheckpointAccepted):
            await node.db(node.store.mark_witnessed, row["seq"])
            return True
        message = getattr(answer, "message", type(answer).__name__)
        log.error("witness %s refused audit checkpoint %d: %s", unit, row["seq"], message)
        await node.audit("witness-refused", unit, outcome="refused",
                         details={"seq": row["seq"], "error": message})
        return False

    async def _response(self, tls: trio.SSLStream[Any], conn: proto.ClientConnection,
                        extra: float = 0.0) -> Any:
        """The peer's answer; `extra` seconds are allowed on top of read_timeout for the
        receiver to store and check a large package before it answers."""
        while True:
            event = conn.next_event()
            if event is proto.NEED_DATA:
                with trio.fail_after(self.node.config.limits.read_timeout + extra):
                    conn.receive_data(await tls.receive_some(CHUNK))
                continue
            if isinstance(event, proto.Continue):
                continue
            return event
