"""A peer's connection to us: documents arriving, and signed-for receipts for ours coming back.

Each connection is served on its own: whatever goes wrong on one (a malformed request, a
peer that stops reading) ends that connection only, and is audited. A document is stored
(blob fsynced, row committed) before it is acknowledged with a delivery receipt signed on the
node token; a repeat of an acknowledged document is recognised by its id and acknowledged
again.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import trio
from cryptography import x509

from exchanged import package as pkg
from exchanged import receipts
from exchanged.common import stamp
from exchanged.errors import ExchangedError
from exchanged.node.base import CHUNK, DISK_SLICE, Node, describe
from exchanged.roles import check_remote_receiver
from exchanged.store.nodedb import BlobWriter
from exchanged.transport import protocol as proto
from exchanged.transport.peers import Peer, PeerRefused

log = logging.getLogger("exchanged")


class Inbound:
    """Serves the connections peers open to this node."""

    def __init__(self, node: Node) -> None:
        self.node = node

    async def serve(self, stream: trio.SocketStream) -> None:
        node = self.node
        addr = _addr(stream)
        try:
            tls, peer, leaf = await node.handshake(stream, server=True)
        except PeerRefused as e:
            log.warning("refused %s: %s", addr, e)
            await node.audit("peer-refused", addr, outcome="refused",
                             details={"code": e.code, "error": str(e)})
            await trio.aclose_forcefully(stream)
            return
        except (trio.BrokenResourceError, trio.TooSlowError, OSError) as e:
            log.warning("TLS handshake with %s failed: %s", addr, describe(e))
            await node.audit("tls-failed", addr, outcome="refused",
                             details={"error": describe(e)})
            await trio.aclose_forcefully(stream)
            return
        try:
            await self._requests(tls, peer, leaf)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            pass
        except Exception as e:  # one peer's failure must never take the whole node down
            log.error("connection from %s (%s) failed: %s", peer.unit, addr, describe(e))
            await node.audit("connection-failed", peer.unit, outcome="failed",
                             details={"error": describe(e)})
        finally:
            await trio.aclose_forcefully(tls)

    async def _requests(self, tls: trio.SSLStream[Any], peer: Peer,
                        leaf: x509.Certificate) -> None:
        node = self.node
        limits = node.config.limits
        conn = proto.ServerConnection(max_body_size=limits.max_document_bytes)
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
                if isinstance(event, proto.Ping):
                    await node.send(tls, conn.send(proto.Pong(
                        node.config.unit, dt.datetime.now(dt.UTC))))
                elif isinstance(event, proto.SubmitDocument):
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
                if conn.must_close or (node.stopping and writer is None):
                    return
        finally:
            if writer is not None:
                await trio.to_thread.run_sync(writer.abort)
                node.active_transfers -= 1

    async def _received(self, peer: Peer, leaf: x509.Certificate, submit: proto.SubmitDocument,
                        end: proto.BodyEnd, writer: BlobWriter
                        ) -> proto.Acknowledge | proto.Reject:
        """A whole package has arrived: check it, store it, acknowledge with a signed receipt."""
        node = self.node
        doc = submit.doc_id
        if not end.digest_ok:
            await trio.to_thread.run_sync(writer.abort)
            return await self._refuse(peer, doc, "digest-mismatch",
                                      "the body does not match X-Exchanged-Sha256")
        sha = await node.db(writer.commit)
        workdir = Path(tempfile.mkdtemp(dir=node.config.data_dir, prefix=".unpack-"))
        try:
            received = await trio.to_thread.run_sync(
                lambda: pkg.read(node.store.blob_path(sha), workdir, issuer=node.ca_cert,
                                 max_file_size=node.config.limits.max_document_bytes,
                                 expected_recipient=node.config.unit))
        except ExchangedError as e:
            return await self._refuse(peer, doc, _reason(e.code), str(e))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        meta = received.metadata
        if received.signer != leaf:  # signed by the very node that is talking to us
            return await self._refuse(peer, doc, "wrong-sender", "the package is signed by "
                                      f"{received.signer.subject.rfc4514_string()}, not by the "
                                      "node that sent it")
        if meta.doc_id != doc or meta.sender != peer.unit or meta.recipient != node.config.unit:
            return await self._refuse(peer, doc, "bad-form",
                                      f"the package is {meta.doc_id} from {meta.sender} to "
                                      f"{meta.recipient}; this is {node.config.unit} talking "
                                      f"to {peer.unit} about {doc}")
        received_at = stamp()
        receipt = await node.tok(receipts.delivery, node.signer, doc_id=doc, sha256=sha,
                                 sender=peer.unit, recipient=node.config.unit,
                                 received_at=received_at)
        try:
            new = await node.db(self._store_received, doc, peer, meta, sha, receipt)
        except ExchangedError as e:
            return await self._refuse(peer, doc, _reason(e.code), str(e))
        if new:
            log.info("received %s from %s: %r (%s)", doc, peer.unit, meta.title, meta.urgency)
            self._alert(meta)
        return proto.Acknowledge(doc, "stored" if new else "duplicate", receipt)

    def _store_received(self, doc: str, peer: Peer, meta: pkg.Metadata, sha: str,
                        receipt: bytes) -> bool:
        store = self.node.store
        with store.transaction():
            new = store.receive(doc_id=doc, sender=peer.unit, metadata=meta.to_dict(),
                                package_sha256=sha, size=store.blob_path(sha).stat().st_size,
                                delivery_receipt=receipt)
            store.audit.append(action="document-received" if new else "document-duplicate",
                               obj=doc, actor_subject=f"{peer.name},{peer.org}",
                               details={"sender": peer.unit, "sha256": sha,
                                        "title": meta.title, "urgency": meta.urgency})
        return new

    async def _refuse(self, peer: Peer, doc: str, code: str, message: str) -> proto.Reject:
        log.warning("rejected %s from %s: %s", doc, peer.unit, message)
        await self.node.audit("document-rejected", doc, outcome="refused",
                              details={"sender": peer.unit, "code": code, "error": message})
        return proto.Reject(code, message)

    async def _signed_for(self, peer: Peer, event: proto.DeliverReceipt
                          ) -> proto.ReceiptAccepted | proto.Reject:
        """The recipient's receiver signed for one of our documents: check, keep."""
        node = self.node
        try:
            signer, _, payload = receipts.open_signed(event.receipt, node.ca_cert)
            item = await node.db(node.store.out_item, event.doc_id)
            if item["recipient"] != peer.unit:
                raise receipts.ReceiptError(f"{event.doc_id} was not sent to {peer.unit}")
            receipts.check_signed_for(payload, doc_id=event.doc_id,
                                      sha256=item["package_sha256"], sender=node.config.unit,
                                      recipient=peer.unit)
            # A person of the recipient unit, with a certificate good now, signed it.
            node.person_status(signer)
            check_remote_receiver(signer, peer.org)
            await node.db(self._store_signed_for, event.doc_id, event.receipt, signer, payload)
        except ExchangedError as e:
            return proto.Reject("unknown-document" if e.code == "not-found" else "bad-receipt",
                                str(e))
        log.info("%s signed for by %s", event.doc_id, signer.subject.rfc4514_string())
        return proto.ReceiptAccepted(event.doc_id)

    def _store_signed_for(self, doc: str, receipt: bytes, signer: x509.Certificate,
                          payload: dict[str, Any]) -> None:
        store = self.node.store
        with store.transaction():
            store.mark_signed_for(doc, receipt)
            store.audit.append(action="document-signed-for", obj=doc,
                               actor=format(signer.serial_number, "x"),
                               actor_subject=signer.subject.rfc4514_string(),
                               details=payload, signature=receipt)

    def _alert(self, meta: pkg.Metadata) -> None:
        """N3: an arriving document sounds an alert (a configured command), and is logged."""
        command = self.node.config.alert_command
        if not command:
            return
        env = {**os.environ, "EXCHANGED_DOC_ID": meta.doc_id, "EXCHANGED_TITLE": meta.title,
               "EXCHANGED_SENDER": meta.sender, "EXCHANGED_URGENCY": meta.urgency}
        try:
            subprocess.Popen(list(command), env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        except OSError as e:
            log.error("alert command failed: %s", e)


def _addr(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "?"


def _reason(code: str) -> str:
    return code if code in proto.REASON_CODES else "bad-form"
