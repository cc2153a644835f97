"""`exchanged serve`: the unit's node — mutual TLS with the key on the token, store-and-forward.

One trio nursery tree (design decision 8): the listener and its connection handlers, one sender
per configured peer, the control socket, the CRL watcher, the systemd notifier. Blocking work
(PKCS#11, SQLite, fsync) goes through `trio.to_thread.run_sync` with a CapacityLimiter(1) per
token and per database, which also serialises each of them. SIGHUP reloads CRLs and peers;
SIGTERM stops accepting, lets transfers in progress finish within `drain_timeout`, then stops:
a document is acknowledged only once it is on disk, so an interrupted one is simply sent again.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import trio
from cryptography import x509

from exchanged import package as pkg
from exchanged.config import Config, Peer
from exchanged.errors import ExchangedError
from exchanged.pki import verify
from exchanged.pki.cms import CmsError, cms_content, verify_detached
from exchanged.pki.operator import Operator
from exchanged.pki.pin import PinSource
from exchanged.pki.token import Token
from exchanged.pki.uri import parse
from exchanged.roles import Roles
from exchanged.sdnotify import Notifier
from exchanged.store.nodedb import NodeStore
from exchanged.transport import protocol as proto
from exchanged.transport.peers import PeerCheck, PeerRefused
from exchanged.transport.tlskey import make_context, peer_certificate_chain

log = logging.getLogger("exchanged")
T = TypeVar("T")
CHUNK = 64 * 1024
# Disk work goes to a thread in slices this big: one thread hop per 16 KiB TLS record cost
# ~100 us each (tools/bench-exchange: 61,000 hops per GB, the main cost of a large transfer).
DISK_SLICE = 1024 * 1024
# How long a receiver may take, after the last byte, to store, unpack and check a package
# before it acknowledges: read_timeout plus this much per byte (3.7 s/GB measured).
ACK_SECONDS_PER_BYTE = 1 / (16 * 1024 * 1024)
# Refusals that say "not now" rather than "never": the document is sent again later.
TRANSIENT = frozenset({"busy", "timeout", "internal-error", "truncated"})


class Node:
    """The running node: its store, its token, its TLS contexts, its peers."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.notifier = Notifier()
        self.db_limiter = trio.CapacityLimiter(1)
        self.token_limiter = trio.CapacityLimiter(1)
        self.wake: dict[str, trio.Event] = {}
        self.stopping = False
        self.active_transfers = 0
        self.senders: set[str] = set()  # units that have a sender task now
        self.accepting = trio.CancelScope()

    # -- start-up ---------------------------------------------------------------------------

    def open(self) -> None:
        """Everything that can fail at start-up, before we tell systemd we are ready."""
        c = self.config
        c.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.store = NodeStore.open(c.data_dir)
        self.store.sweep_temp()
        requeued = self.store.recover()
        if requeued:
            log.info("recovered %d document(s) left in flight by the last run", requeued)
        self.trusted = [x509.load_pem_x509_certificate(p.read_bytes()) for p in c.ca]
        chain = x509.load_pem_x509_certificates(c.cert.read_bytes())
        self.cert = chain[0]
        self.ca_cert = self.trusted[0]
        pin = PinSource(role="node", env="EXCHANGED_PIN", file=c.pin_file)
        uri = parse(c.key)
        self.token = Token.open(uri, pin, module=c.module)
        self.key = self.token.key_from_uri(uri)
        self.signer = Operator(self.key, self.cert)
        self.peers = PeerCheck(self.trusted, list(c.crls), c.peers)
        self.roles = Roles(self.store.db, self.store.audit, self.person_status)
        with self.store.transaction():
            if self.roles.bootstrap_declared(c.roles, f"configuration {c.source}"):
                log.info("roles declared in the configuration: %s", c.roles)
        common = dict(key_uri=uri, pin=pin, cert_chain=chain, trusted=self.trusted,
                      module=c.module)
        self.server_ctx = make_context(server=True, **common)  # type: ignore[arg-type]
        self.client_ctx = make_context(server=False, **common)  # type: ignore[arg-type]
        self.audit_event("node-start", self.config.unit, details={"requeued": requeued})

    def person_status(self, cert: x509.Certificate) -> None:
        """An operator at this node: a person certificate of our CA, good per our CRLs."""
        try:
            verify.validate(cert, trusted=self.trusted, crls=self.peers.crls, purpose="person")
        except verify.ValidationError as e:
            raise ExchangedError(f"operator certificate refused: {e}", code=e.code) from None

    def close(self) -> None:
        try:
            self.audit_event("node-stop", self.config.unit, checkpoint=True)
        finally:
            self.token.close()
            self.store.close()

    # -- helpers ----------------------------------------------------------------------------

    async def db(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        return await trio.to_thread.run_sync(lambda: fn(*args, **kw),
                                             limiter=self.db_limiter)

    async def tok(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        return await trio.to_thread.run_sync(lambda: fn(*args, **kw),
                                             limiter=self.token_limiter)

    def audit_event(self, action: str, obj: str, *, outcome: str = "ok",
                    actor: str | None = None, details: dict[str, Any] | None = None,
                    checkpoint: bool = False) -> None:
        """Append to the node's audit log (and sign a checkpoint on the node token if asked)."""
        with self.store.transaction():
            self.store.audit.append(action=action, obj=obj, outcome=outcome,
                                    actor_subject=actor, details=details or {})
            if checkpoint:
                self.store.audit.checkpoint(lambda m: self.key.sign(m), self.cert)

    async def audit(self, action: str, obj: str, **kw: Any) -> None:
        await self.db(self.audit_event, action, obj, **kw)

    # -- the service tree -------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        await trio.to_thread.run_sync(self.open)
        try:
            async with trio.open_nursery() as nursery:
                listeners = await trio.open_tcp_listeners(self.config.listen_port,
                                                          host=self.config.listen_host)
                self.port = listeners[0].socket.getsockname()[1]
                conn_nursery = await nursery.start(self._connections)
                self.nursery = nursery
                nursery.start_soon(self._accept, listeners, conn_nursery)
                for unit in self.config.peers:
                    self._start_sender(unit)
                await nursery.start(self._control)
                nursery.start_soon(self._signals, nursery, conn_nursery, listeners)
                nursery.start_soon(self._housekeeping)
                status = (f"unit {self.config.unit} listening on "
                          f"{self.config.listen_host}:{self.port}, "
                          f"{len(self.config.peers)} peer(s)")
                log.info("%s", status)
                self.notifier.ready(status)
                task_status.started(self)
        finally:
            await trio.to_thread.run_sync(self.close)

    async def _connections(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as n:
            task_status.started(n)
            await trio.sleep_forever()

    async def _accept(self, listeners: list[trio.SocketListener], n: trio.Nursery) -> None:
        limiter = trio.CapacityLimiter(self.config.limits.max_connections)

        async def one(stream: trio.SocketStream) -> None:
            async with limiter:
                await self._serve(stream)

        with self.accepting:  # cancelled on SIGTERM: no new connections
            await trio.serve_listeners(one, listeners, handler_nursery=n)

    async def _signals(self, nursery: trio.Nursery, conns: trio.Nursery,
                       listeners: list[trio.SocketListener]) -> None:
        with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as sigs:
            async for sig in sigs:
                if sig == signal.SIGHUP:
                    await self.reload()
                    continue
                self.stopping = True
                self.notifier.stopping("draining")
                log.info("stopping: no new connections; %d transfer(s) may finish within %ss",
                         self.active_transfers, self.config.limits.drain_timeout)
                self.accepting.cancel()
                for listener in listeners:
                    await listener.aclose()
                with trio.move_on_after(self.config.limits.drain_timeout):
                    while self.active_transfers:  # noqa: ASYNC110 — bounded by the deadline
                        await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
                return

    async def reload(self) -> None:
        try:
            new = await trio.to_thread.run_sync(Config.load, self.config.source) \
                if self.config.source else self.config
            changed = await trio.to_thread.run_sync(
                lambda: self.peers.reload(new.peers, force=True))
            # The peer table takes effect at once: new peers get a sender, removed ones' senders
            # stop (their queued documents wait, should the peer come back).
            added = set(new.peers) - set(self.config.peers)
            self.config = dataclasses.replace(self.config, peers=new.peers)
            for unit in sorted(added):
                self._start_sender(unit)
            for unit in set(self.wake) - set(new.peers):
                self.poke(unit)
            await self.audit("config-reload", self.config.unit,
                             details={"peers": sorted(new.peers), "changed": changed})
            log.info("reloaded CRLs and %d peer(s)", len(new.peers))
        except ExchangedError as e:
            log.error("reload failed, the old configuration stays in force: %s", e)
            await self.audit("config-reload", self.config.unit, outcome="failed",
                             details={"error": str(e)})

    async def _housekeeping(self) -> None:
        """CRL files are re-read when they change; the watchdog is fed; checkpoints signed."""
        last_checkpoint = time.monotonic()
        interval = (self.notifier.watchdog_seconds or 20) / 2
        while True:
            await trio.sleep(min(interval, 5))
            self.notifier.watchdog()
            try:
                if await trio.to_thread.run_sync(self.peers.reload):
                    log.info("CRLs changed on disk: reloaded")
                    await self.audit("crl-reload", self.config.unit)
            except ExchangedError as e:
                log.error("CRL reload failed, the previous CRLs stay in force: %s", e)
            if time.monotonic() - last_checkpoint > 300:
                await self.db(self.audit_event, "checkpoint-timer", self.config.unit,
                              checkpoint=True)
                last_checkpoint = time.monotonic()

    # -- receiving --------------------------------------------------------------------------

    async def _handshake(self, stream: trio.abc.Stream, *, server: bool,
                         expect: str | None = None) -> tuple[trio.SSLStream[Any], Peer]:
        ctx = self.server_ctx if server else self.client_ctx
        tls = trio.SSLStream(stream, ctx, server_side=server,
                             server_hostname=None if server else "exchanged-peer")
        with trio.fail_after(self.config.limits.handshake_timeout):
            await tls.do_handshake()
        chain = peer_certificate_chain(tls._ssl_object)  # noqa: SLF001
        peer = await trio.to_thread.run_sync(lambda: self.peers.check(chain, expect=expect))
        return tls, peer

    async def _serve(self, stream: trio.SocketStream) -> None:
        addr = _addr(stream)
        try:
            tls, peer = await self._handshake(stream, server=True)
        except PeerRefused as e:
            log.warning("refused %s: %s", addr, e)
            await self.audit("peer-refused", addr, outcome="refused",
                             details={"code": e.code, "error": str(e)})
            await trio.aclose_forcefully(stream)
            return
        except (trio.BrokenResourceError, trio.TooSlowError, OSError) as e:
            log.warning("TLS handshake with %s failed: %s", addr, _describe(e))
            await self.audit("tls-failed", addr, outcome="refused",
                             details={"error": _describe(e)})
            await trio.aclose_forcefully(stream)
            return
        try:
            await self._serve_requests(tls, peer, peer_certificate_chain(tls._ssl_object)[0])
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            pass
        except Exception as e:  # one peer's failure must never take the whole node down
            log.error("connection from %s (%s) failed: %s", peer.unit, addr, _describe(e))
            await self.audit("connection-failed", peer.unit, outcome="failed",
                             details={"error": _describe(e)})
        finally:
            await trio.aclose_forcefully(tls)

    async def _serve_requests(self, tls: trio.SSLStream[Any], peer: Peer,
                              leaf: x509.Certificate) -> None:
        limits = self.config.limits
        conn = proto.ServerConnection(max_body_size=limits.max_document_bytes)
        writer = None
        pending = bytearray()  # body bytes not yet handed to the disk thread (< DISK_SLICE)
        submit: proto.SubmitDocument | None = None
        try:
            while True:
                try:
                    event = conn.next_event()
                except proto.RemoteProtocolError as e:
                    await self._send(tls, conn.send_error(e))
                    return
                if event is proto.NEED_DATA:
                    if conn.they_are_waiting_for_100_continue:
                        await self._send(tls, conn.send_continue())
                    try:
                        with trio.fail_after(limits.read_timeout):
                            data = await tls.receive_some(CHUNK)
                    except trio.TooSlowError:
                        await self._send(tls, conn.send_error(proto.Reject(
                            "timeout", "no data within the read timeout")))
                        return
                    conn.receive_data(data)
                    continue
                if isinstance(event, proto.ConnectionClosed) or event is proto.PAUSED:
                    return
                if isinstance(event, proto.Ping):
                    await self._send(tls, conn.send(proto.Pong(
                        self.config.unit, dt.datetime.now(dt.UTC))))
                elif isinstance(event, proto.SubmitDocument):
                    submit = event
                    writer = await self.db(self.store.blob_writer,
                                           max_size=limits.max_document_bytes)
                    self.active_transfers += 1
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
                    self.active_transfers -= 1
                    await self._send(tls, conn.send(answer))
                elif isinstance(event, proto.DeliverReceipt):
                    await self._send(tls, conn.send(await self._signed_for(peer, event)))
                if conn.must_close or (self.stopping and writer is None):
                    return
        finally:
            if writer is not None:
                await trio.to_thread.run_sync(writer.abort)
                self.active_transfers -= 1

    async def _send(self, tls: trio.SSLStream[Any], data: bytes) -> None:
        if data:
            with trio.fail_after(self.config.limits.read_timeout):
                await tls.send_all(data)

    async def _received(self, peer: Peer, leaf: x509.Certificate, submit: proto.SubmitDocument,
                        end: proto.BodyEnd, writer: Any) -> proto.Acknowledge | proto.Reject:
        """A whole package has arrived: check it, store it, acknowledge with a signed receipt."""
        doc = submit.doc_id
        if not end.digest_ok:
            await trio.to_thread.run_sync(writer.abort)
            return await self._refuse(peer, doc, "digest-mismatch",
                                      "the body does not match X-Exchanged-Sha256")
        sha = await self.db(writer.commit)
        workdir = Path(tempfile.mkdtemp(dir=self.config.data_dir, prefix=".unpack-"))
        try:
            received = await trio.to_thread.run_sync(
                lambda: pkg.read(self.store.blob_path(sha), workdir, issuer=self.ca_cert,
                                 max_file_size=self.config.limits.max_document_bytes,
                                 expected_recipient=self.config.unit))
        except ExchangedError as e:
            return await self._refuse(peer, doc, _reason(e.code), str(e))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        meta = received.metadata
        if received.signer != leaf:  # signed by the very node that is talking to us
            return await self._refuse(peer, doc, "wrong-sender", "the package is signed by "
                                      f"{received.signer.subject.rfc4514_string()}, not by the "
                                      "node that sent it")
        if meta.doc_id != doc or meta.sender != peer.unit or meta.recipient != self.config.unit:
            return await self._refuse(peer, doc, "bad-form",
                                      f"the package is {meta.doc_id} from {meta.sender} to "
                                      f"{meta.recipient}; this is {self.config.unit} talking "
                                      f"to {peer.unit} about {doc}")
        received_at = _now()
        receipt_payload = {"type": "delivery", "doc_id": doc, "sha256": sha,
                           "sender": peer.unit, "recipient": self.config.unit,
                           "received_at": received_at}
        _, receipt = await self.tok(self.signer.sign, receipt_payload, detached=False)
        try:
            new = await self.db(self._store_received, doc, peer, meta, sha, receipt,
                                received_at)
        except ExchangedError as e:
            return await self._refuse(peer, doc, _reason(e.code), str(e))
        if new:
            log.info("received %s from %s: %r (%s)", doc, peer.unit, meta.title, meta.urgency)
            self._alert(meta)
        return proto.Acknowledge(doc, "stored" if new else "duplicate", receipt)

    def _store_received(self, doc: str, peer: Peer, meta: Any, sha: str, receipt: bytes,
                        at: str) -> bool:
        with self.store.transaction():
            new = self.store.receive(doc_id=doc, sender=peer.unit, metadata=meta.to_dict(),
                                     package_sha256=sha, size=self.store.blob_path(sha).stat()
                                     .st_size, delivery_receipt=receipt)
            self.store.audit.append(action="document-received" if new else "document-duplicate",
                                    obj=doc, actor_subject=f"{peer.name},{peer.org}",
                                    details={"sender": peer.unit, "sha256": sha,
                                             "title": meta.title, "urgency": meta.urgency})
        return new

    async def _refuse(self, peer: Peer, doc: str, code: str, message: str) -> proto.Reject:
        log.warning("rejected %s from %s: %s", doc, peer.unit, message)
        await self.audit("document-rejected", doc, outcome="refused",
                         details={"sender": peer.unit, "code": code, "error": message})
        return proto.Reject(code, message)

    async def _signed_for(self, peer: Peer, event: proto.DeliverReceipt
                          ) -> proto.ReceiptAccepted | proto.Reject:
        """The recipient's receiver signed for one of our documents: check, keep."""
        try:
            content = cms_content(event.receipt)
            signer = verify_detached(event.receipt, content, self.ca_cert)
            payload = json.loads(content)
            if not isinstance(payload, dict):
                raise ValueError("not a JSON object")
        except (CmsError, ValueError, RecursionError) as e:
            return proto.Reject("bad-receipt", f"the receipt does not verify: {e}")
        if payload.get("type") != "signed-for" or payload.get("doc_id") != event.doc_id \
                or payload.get("recipient") != peer.unit:
            return proto.Reject("bad-receipt", "the receipt is not a signed-for receipt of "
                                "this document by this unit")
        try:
            # A person of the recipient unit, with a certificate good now, signed it.
            self.person_status(signer)
            if _org(signer) != peer.org:
                raise ExchangedError(f"the receipt is signed by {signer.subject.rfc4514_string()}"
                                     f", not by someone of {peer.org}", code="bad-receipt")
            await self.db(self._store_signed_for, event.doc_id, event.receipt, signer, payload,
                          peer)
        except ExchangedError as e:
            return proto.Reject("unknown-document" if e.code == "not-found" else "bad-receipt",
                                str(e))
        log.info("%s signed for by %s", event.doc_id, signer.subject.rfc4514_string())
        return proto.ReceiptAccepted(event.doc_id)

    def _store_signed_for(self, doc: str, receipt: bytes, signer: x509.Certificate,
                          payload: dict[str, Any], peer: Peer) -> None:
        item = self.store.out_item(doc)
        if item["recipient"] != peer.unit or payload.get("sha256") != item["package_sha256"]:
            raise ExchangedError(f"{doc} was not sent to {peer.unit} with that content",
                                 code="bad-receipt")
        with self.store.transaction():
            self.store.mark_signed_for(doc, receipt)
            self.store.audit.append(action="document-signed-for", obj=doc,
                                    actor=format(signer.serial_number, "x"),
                                    actor_subject=signer.subject.rfc4514_string(),
                                    details=payload, signature=receipt)

    def _alert(self, meta: Any) -> None:
        """N3: an arriving document sounds an alert (a configured command), and is logged."""
        if not self.config.alert_command:
            return
        env = {**os.environ, "EXCHANGED_DOC_ID": meta.doc_id, "EXCHANGED_TITLE": meta.title,
               "EXCHANGED_SENDER": meta.sender, "EXCHANGED_URGENCY": meta.urgency}
        try:
            subprocess.Popen(list(self.config.alert_command), env=env,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            log.error("alert command failed: %s", e)

    # -- sending ----------------------------------------------------------------------------

    def poke(self, unit: str) -> None:
        self.wake.setdefault(unit, trio.Event()).set()

    def _start_sender(self, unit: str) -> None:
        if unit not in self.senders:
            self.senders.add(unit)
            self.nursery.start_soon(self._sender, unit)

    async def _sender(self, unit: str) -> None:
        """One task per peer: deliver its due documents and receipts, retry with backoff."""
        try:
            await self._send_loop(unit)
        finally:
            self.senders.discard(unit)

    async def _send_loop(self, unit: str) -> None:
        while unit in self.config.peers:
            self.wake[unit] = trio.Event()
            items = await self.db(self.store.due, time.time(), recipient=unit)
            receipts = await self.db(self.store.receipts_to_return, unit)
            if items or receipts:
                await self._deliver(unit, items, receipts)
                continue
            nxt = await self.db(self.store.next_due_time, recipient=unit)
            wait = 3600.0 if nxt is None else max(0.05, nxt - time.time())
            with trio.move_on_after(wait):
                await self.wake[unit].wait()

    async def _deliver(self, unit: str, items: list[Any], receipts: list[Any]) -> None:
        peer = self.config.peers.get(unit)
        if peer is None:  # removed from the configuration meanwhile
            return
        try:
            with trio.fail_after(self.config.limits.handshake_timeout):
                sock = await trio.open_tcp_stream(peer.host, peer.port)
            try:
                tls, _ = await self._handshake(sock, server=False, expect=unit)
            except BaseException:
                await trio.aclose_forcefully(sock)
                raise
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, PeerRefused) as e:
            err = f"cannot reach {unit} at {peer.host}:{peer.port}: {_describe(e)}"
            if isinstance(e, PeerRefused):
                log.warning("refusing %s: %s", unit, e)
                await self.audit("peer-refused", unit, outcome="refused",
                                 details={"code": e.code, "error": str(e)})
            for item in items:
                await self.db(self.store.schedule_retry, item.doc_id, err, time.time())
            await trio.sleep(1)  # receipts retry on the next round
            return
        try:
            conn = proto.ClientConnection(f"{peer.host}:{peer.port}")
            for r in receipts:
                await self._send_receipt(tls, conn, r)
            for item in items:
                await self._send_one(tls, conn, item)
                if conn.state is not proto.State.IDLE:
                    break
        except (trio.BrokenResourceError, trio.TooSlowError, proto.ProtocolError, OSError,
                ExchangedError) as e:
            log.warning("delivery to %s interrupted: %s", unit, _describe(e))
            await trio.sleep(1)  # never a tight reconnect loop; items have their own backoff
        finally:
            await trio.aclose_forcefully(tls)

    async def _send_one(self, tls: trio.SSLStream[Any], conn: proto.ClientConnection,
                        item: Any) -> None:
        await self.db(self.store.mark_sending, item.doc_id)
        path = self.store.blob_path(item.package_sha256)
        try:
            await self._send(tls, conn.send(proto.SubmitDocument(
                item.doc_id, item.size, item.package_sha256)))
            with open(path, "rb") as f:  # noqa: ASYNC230 — local disk, read in slices
                while conn.body_remaining:
                    data = await trio.to_thread.run_sync(f.read, DISK_SLICE)
                    if not data:
                        raise ExchangedError(f"blob {path} is shorter than recorded",
                                             code="corrupt-blob")
                    for i in range(0, len(data), CHUNK):
                        await self._send(tls, conn.send_body(data[i:i + CHUNK]))
            answer = await self._response(tls, conn, extra=item.size * ACK_SECONDS_PER_BYTE)
        except BaseException as e:
            err = str(e) or type(e).__name__
            with trio.CancelScope(shield=True):
                await self.db(self.store.schedule_retry, item.doc_id, err, time.time())
            raise
        await self.db(self._record_answer, item, answer)

    def _record_answer(self, item: Any, answer: Any) -> None:
        if isinstance(answer, proto.Reject) and answer.code in TRANSIENT:
            self.store.schedule_retry(item.doc_id, f"{answer.code}: {answer.message}",
                                      time.time())
            return
        with self.store.transaction():
            if isinstance(answer, proto.Acknowledge):
                self.store.mark_delivered(item.doc_id, answer.receipt)
                self.store.audit.append(action="document-delivered", obj=item.doc_id,
                                        details={"recipient": item.recipient,
                                                 "status": answer.status})
            else:
                self.store.mark_rejected(item.doc_id, answer.code, answer.message)
                self.store.audit.append(action="document-rejected-by-peer", obj=item.doc_id,
                                        outcome="refused",
                                        details={"recipient": item.recipient,
                                                 "code": answer.code,
                                                 "error": answer.message})

    async def _send_receipt(self, tls: trio.SSLStream[Any], conn: proto.ClientConnection,
                            r: Any) -> None:
        await self._send(tls, conn.send(proto.DeliverReceipt(r["doc_id"], r["receipt"])))
        answer = await self._response(tls, conn)
        await self.db(self.store.mark_receipt_returned, r["doc_id"],
                      isinstance(answer, proto.ReceiptAccepted), sender=r["sender"],
                      error=getattr(answer, "message", None) or "refused")

    async def _response(self, tls: trio.SSLStream[Any], conn: proto.ClientConnection,
                        extra: float = 0.0) -> Any:
        """The peer's answer; `extra` seconds are allowed on top of read_timeout for the
        receiver to store and check a large package before it answers."""
        while True:
            event = conn.next_event()
            if event is proto.NEED_DATA:
                with trio.fail_after(self.config.limits.read_timeout + extra):
                    conn.receive_data(await tls.receive_some(CHUNK))
                continue
            if isinstance(event, proto.Continue):
                continue
            return event

    # -- the control socket -----------------------------------------------------------------

    async def _control(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        from exchanged import control
        await control.serve(self, task_status=task_status)


def _describe(e: BaseException) -> str:
    """What went wrong, never an empty string: trio's BrokenResourceError says nothing itself;
    the SSL error that caused it does (e.g. "certificate verify failed")."""
    return str(e) or (f"{type(e).__name__}: {_describe(e.__cause__)}" if e.__cause__
                      else type(e).__name__)


def _org(cert: x509.Certificate) -> str:
    found = cert.subject.get_attributes_for_oid(x509.oid.NameOID.ORGANIZATION_NAME)
    return str(found[0].value) if found else ""


def _addr(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "?"


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _reason(code: str) -> str:
    return code if code in proto.REASON_CODES else "bad-form"


def run(config: Config) -> int:
    """The console entry for `exchanged serve`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    node = Node(config)
    try:
        trio.run(node.run)
    except ExchangedError as e:
        log.error("%s", e)
        return 1
    return 0
