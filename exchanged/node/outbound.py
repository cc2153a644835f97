"""Our documents and receipts going out: one sender task per configured peer, store-and-forward.

A sender delivers its peer's due documents and the signed-for receipts owed to it, then sleeps
until the next one falls due or something is queued (`poke`). A failed attempt is counted and
retried with exponential backoff and jitter (the store keeps the schedule, so it survives a
restart); a refusal that says "not now" is retried, any other is final.

Connections (`Link`) stay open between rounds: a steady exchange costs no handshake, so no
token signature, per round. A kept link is pinged after `keepalive` idle seconds (the ping also
compares CRLs), closed after `idle_timeout` seconds with nothing to send, judged again under the
current CRLs and peer table before each use (`Node.readmit`), and dropped when this node's
certificate changes. A round with several documents due shares them among up to
`connections_per_peer` links, each document on one of them, one at a time.
"""

from __future__ import annotations

import json
import logging
import ssl
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import trio
from cryptography.hazmat.primitives import hashes

from exchanged import receipts
from exchanged.common import stamp_precise
from exchanged.errors import ExchangedError
from exchanged.node.base import CHUNK, DISK_SLICE, Admission, Node, describe
from exchanged.node.relay import CARRIED_PREFIX, Relays
from exchanged.pki import verify
from exchanged.store.audit import mirror_line
from exchanged.store.db import StoreError
from exchanged.store.nodedb import OutItem
from exchanged.transport import protocol as proto
from exchanged.transport.peers import Peer, PeerRefused

log = logging.getLogger("exchanged")
# How long a receiver may take, after the last byte, to store, unpack and check a package
# before it acknowledges: read_timeout plus this much per byte (3.7 s/GB measured).
ACK_SECONDS_PER_BYTE = 1 / (16 * 1024 * 1024)
# Refusals that say "not now" rather than "never": the document is sent again later.
TRANSIENT = frozenset({"busy", "timeout", "internal-error", "truncated"})
RESTART_SECONDS = 10  # a sender that failed unexpectedly starts again after this long
WITNESS_RETRY_SECONDS = 30  # our witness unreachable or refusing: try again after this long
CRL_SPREAD_SECONDS = 5.0  # a newer CRL goes to a peer at once, but not twice in this long
# A kept link used this recently is taken without a ping first (a peer closes an idle
# connection only after its read_timeout; a ping costs a round trip).
FRESH_SECONDS = 1.0


@dataclass
class Jobs:
    """What one round carries to a peer: our documents for it, the receipts and checkpoints
    owed to it, our documents for units cut off that it relays (`handed`), and documents we
    relay that are for it (`relayed`)."""

    items: list[OutItem]
    owed: list[dict[str, Any]]
    checkpoints: list[dict[str, Any]]
    handed: list[OutItem]
    relayed: list[dict[str, Any]]

    def documents(self) -> int:
        return len(self.items) + len(self.handed) + len(self.relayed)

    def share(self, i: int, k: int) -> Jobs:
        """Link i's share of k: every k-th document; the first link also takes the receipts
        and checkpoints."""
        return Jobs(self.items[i::k], self.owed if i == 0 else [],
                    self.checkpoints if i == 0 else [], self.handed[i::k], self.relayed[i::k])


@dataclass
class Link:
    """One TLS connection to a peer, kept open between rounds."""

    tls: trio.SSLStream[Any]
    conn: proto.ClientConnection
    adm: Admission
    address: tuple[str, int]  # where it was opened: a peer moved in the configuration, closed
    used: float  # trio time of the last exchange on it (a keep-alive ping counts)
    worked: float  # trio time it last carried documents, receipts or checkpoints


class Outbound:
    """The sender tasks, one per configured peer, in the nursery given to `start`."""

    def __init__(self, node: Node, relays: Relays) -> None:
        self.node = node
        self.relays = relays
        self.wake: dict[str, trio.Event] = {}
        self.senders: set[str] = set()  # units that have a sender task now
        self.nursery: trio.Nursery | None = None
        self.witness_retry = 0.0  # trio time before which our witness is not tried again
        # unit -> (trio time, our CRL number then) of the last CRL comparison with the peer
        self.crl_compared: dict[str, tuple[float, int | None]] = {}
        # unit -> last_success / last_error / last_error_at (exchanged status)
        self.peer_state: dict[str, dict[str, str]] = {}
        self.idle: dict[str, list[Link]] = {}  # unit -> its links kept open, none in use
        # (unit, host, port) -> TLS sessions of its last connections: a new connection resumes
        # one (no token signature on either side; the peer is judged all the same). Each is
        # used once (RFC 8446 C.4); the connection that used it leaves its own.
        self.sessions: dict[tuple[str, str, int], list[ssl.SSLSession]] = {}
        self.open_links: Counter[str] = Counter()  # unit -> its links open, in use or not

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
            for link in self.idle.pop(unit, []):
                await self._drop(unit, link)

    async def _loop(self, unit: str) -> None:
        node = self.node
        while unit in node.config.peers:
            self.wake[unit] = trio.Event()
            if not node.token_present:  # no handshake without the key: documents wait
                self._note(unit, f"this node's token is not present ({node.token_problem})")
                await self._close_links(unit, all_links=True)
                with trio.move_on_after(5):
                    await self.wake[unit].wait()
                continue
            now = time.time()
            items = await node.db(node.store.due, now, recipient=unit)
            owed = await node.db(node.store.receipts_to_return, unit)
            relayed = await node.db(node.store.relay_due, now, unit)  # as a relay, to `unit`
            handed: list[OutItem] = []  # to `unit` as our relay: their direct path failed
            for cut_off in self.relays.via(unit):
                handed += [i for i in await node.db(node.store.relay_candidates, cut_off)
                           if self.relays.offer(unit, i.doc_id)]
                owed += await node.db(node.store.receipts_to_return, cut_off)
            checkpoints = []
            if unit == node.config.witness:
                checkpoints = await node.db(node.store.unwitnessed)
            later = trio.current_time() < self.witness_retry
            crl_wait = self._crl_wait(unit)
            if items or owed or relayed or handed or (checkpoints and not later) \
                    or crl_wait == 0:
                await self._round(unit, Jobs(items, owed, [] if later else checkpoints,
                                             handed, relayed))
                continue
            keep = await self._close_links(unit)
            if keep == 0:
                await self._keepalive(unit)
                continue
            nxt = await node.db(node.store.next_due_time, recipient=unit)
            wait = 3600.0 if nxt is None else max(0.05, nxt - time.time())
            wait = min(wait, max(0.05, crl_wait))
            if keep is not None:
                wait = min(wait, keep)
            if checkpoints:
                wait = min(wait, max(0.05, self.witness_retry - trio.current_time()))
            if unit in node.config.relay.through:  # a direct path failing may come to need us
                for other in list(self.relays.down_since):
                    until = self.relays.cut_off_in(other)
                    if until:
                        wait = min(wait, max(0.05, until))
            with trio.move_on_after(wait):
                await self.wake[unit].wait()
        await self._close_links(unit, all_links=True)

    # -- links ------------------------------------------------------------------------------

    def _keepalive_seconds(self) -> float:
        limits = self.node.config.limits
        return min(limits.keepalive, limits.read_timeout / 2)

    async def _close_links(self, unit: str, *, all_links: bool = False) -> float | None:
        """Close `unit`'s kept links idle for idle_timeout (or all of them); seconds until
        one of the rest needs a keep-alive ping or closing (None: no link kept)."""
        now = trio.current_time()
        limits = self.node.config.limits
        links = self.idle.get(unit, [])
        for link in [ln for ln in links
                     if all_links or now - ln.worked >= limits.idle_timeout]:
            links.remove(link)
            await self._drop(unit, link)
        if not links:
            return None
        ka = self._keepalive_seconds()
        return max(0.0, min(min(ln.used + ka, ln.worked + limits.idle_timeout) - now
                            for ln in links))

    async def _keepalive(self, unit: str) -> None:
        """Ping each kept link idle for `keepalive` seconds (the peer would time it out)."""
        links = self.idle.get(unit, [])
        now = trio.current_time()
        for link in [ln for ln in links if now - ln.used >= self._keepalive_seconds()]:
            links.remove(link)
            try:
                link.adm = await self.node.readmit(link.adm)  # revoked meanwhile: closed now
                await self._compare_crls(link.tls, link.conn, unit)
            except (trio.BrokenResourceError, trio.TooSlowError, proto.ProtocolError,
                    OSError, ExchangedError) as e:  # PeerRefused among them
                log.info("kept connection to %s closed: %s", unit, describe(e))
                await self._drop(unit, link)
                continue
            link.used = trio.current_time()
            links.append(link)

    async def _drop(self, unit: str, link: Link) -> None:
        self.open_links[unit] -= 1
        await trio.aclose_forcefully(link.tls)

    async def _link(self, unit: str, peer: Peer, compare: bool) -> Link:
        """A link ready for a round: a kept one that still holds (judged again; pinged unless
        just used and no CRL comparison is due), else a new connection (handshake, then the
        ping every connection starts with). Errors as from the handshake (PeerRefused among
        them)."""
        node = self.node
        links = self.idle.setdefault(unit, [])
        while links:
            link = links.pop()  # the most recently used
            try:
                if link.adm.ctx is not node.client_ctx:  # our certificate was renewed
                    raise ExchangedError("made with this node's previous certificate")
                if link.address != (peer.host, peer.port):
                    raise ExchangedError(f"{unit}'s address is now {peer.host}:{peer.port}")
                if link.conn.state is not proto.State.IDLE:
                    raise ExchangedError(f"in state {link.conn.state}")
                link.adm = await node.readmit(link.adm)
                if compare or trio.current_time() - link.used >= FRESH_SECONDS:
                    await self._compare_crls(link.tls, link.conn, unit)
                    link.used = trio.current_time()
                return link
            except PeerRefused:
                await self._drop(unit, link)
                raise
            except (trio.BrokenResourceError, trio.TooSlowError, proto.ProtocolError,
                    OSError, ExchangedError) as e:
                log.info("kept connection to %s not reused: %s", unit, describe(e))
                await self._drop(unit, link)
        with trio.fail_after(node.config.limits.handshake_timeout):
            sock = await trio.open_tcp_stream(peer.host, peer.port)
        saved = self.sessions.setdefault((unit, peer.host, peer.port), [])
        session = saved.pop() if saved else None
        try:
            tls, _, _, adm = await node.handshake(sock, server=False, expect=unit,
                                                  session=session)
        except BaseException:
            await trio.aclose_forcefully(sock)
            raise
        now = trio.current_time()
        link = Link(tls, proto.ClientConnection(f"{peer.host}:{peer.port}",
                                                max_crl_size=node.config.limits.max_crl_bytes),
                    adm, (peer.host, peer.port), now, now)
        self.open_links[unit] += 1
        try:
            await self._compare_crls(tls, link.conn, unit)
        except BaseException:
            await self._drop(unit, link)
            raise
        # The server's session ticket came with its first answer: keep it for the next
        # connection (good for tlskey.SESSION_SECONDS, 300 s; after that, or when the server
        # restarted, a full handshake).
        if tls.session is not None and tls.session.has_ticket:
            saved.append(tls.session)
            del saved[:-max(1, node.config.limits.connections_per_peer)]
        return link

    # -- rounds -----------------------------------------------------------------------------

    async def _round(self, unit: str, jobs: Jobs) -> None:
        """Deliver what is due, the documents shared among up to connections_per_peer links
        (the first also carries the receipts and checkpoints)."""
        k = max(1, min(self.node.config.limits.connections_per_peer, jobs.documents()))
        if k == 1:
            await self._deliver(unit, jobs)
            return
        async with trio.open_nursery() as nursery:
            for i in range(k):
                nursery.start_soon(self._deliver, unit, jobs.share(i, k))

    async def _deliver(self, unit: str, jobs: Jobs) -> None:
        node = self.node
        items, owed, checkpoints = jobs.items, jobs.owed, jobs.checkpoints
        peer = node.config.peers.get(unit)
        if peer is None:  # removed from the configuration meanwhile
            return
        compare = self._crl_wait(unit) == 0
        self.crl_compared[unit] = (trio.current_time(), node.crls.number())  # tried, at least
        try:
            link = await self._link(unit, peer, compare)
        except Exception as e:  # unreachable, refused, or whatever the server sent
            err = f"cannot reach {unit} at {peer.host}:{peer.port}: {describe(e)}"
            if isinstance(e, PeerRefused):
                node.metrics.refused_connection(e.code)
                log.warning("refusing %s: %s", unit, e)
                await node.audit("peer-refused", unit, outcome="refused",
                                 details={"code": e.code, "error": str(e)})
            self._note(unit, err)
            if isinstance(e, PeerRefused):  # not a path that failed: nothing to relay around
                self.relays.direct_worked(unit)
            else:
                self._direct_failed(unit)
            for item in items:
                await node.db(node.store.schedule_retry, item.doc_id, err, time.time())
            for row in jobs.relayed:
                await node.db(node.store.relay_retry, row["id"], err, time.time())
            for item in jobs.handed:  # offered to another relay, if there is one, meanwhile
                self.relays.note_refused(unit, item.doc_id)
            if checkpoints:
                self.witness_retry = trio.current_time() + WITNESS_RETRY_SECONDS
            await trio.sleep(1)  # receipts retry on the next round
            return
        tls, conn = link.tls, link.conn
        self.relays.direct_worked(unit)
        untried = list(items)
        relay_untried: Jobs | None = None  # marked sending, not yet in _relay_jobs' hands
        keep = False
        try:
            if link.adm.limited is not None:  # our CRL is stale: did the peer mend it?
                link.adm = await node.readmit(link.adm)
            if link.adm.limited is not None:
                err = f"this node has no current CRL ({link.adm.limited}): nothing is sent " \
                      "until it has one"
                log.warning("%s: %s", unit, err)
                self._note(unit, err)
                for item in items:
                    await node.db(node.store.schedule_retry, item.doc_id, err, time.time())
                return
            for r in owed:
                await self._send_receipt(tls, conn, r)
            if jobs.documents():  # all of this link's share at once: one commit, not one each
                taken = await node.commit(self._mark_sending, jobs)
                jobs.handed = [i for i in jobs.handed if i.doc_id not in taken]
                relay_untried = jobs
            for item in items:
                untried.remove(item)  # from here on _send_one records what happens to it
                await self._send_one(tls, conn, item, peer)
                if conn.state is not proto.State.IDLE:
                    break
            for item in untried:  # marked sending, but the peer closed before their turn
                await node.db(node.store.schedule_retry, item.doc_id, f"{unit} closed the "
                              "connection before this document's turn", time.time())
            untried = []
            relay_untried = None
            await self._relay_jobs(tls, conn, jobs, peer)
            if checkpoints and conn.state is proto.State.IDLE:  # after the documents
                self.witness_retry = trio.current_time() + WITNESS_RETRY_SECONDS
                for cp in checkpoints:
                    if not await self._send_checkpoint(tls, conn, cp, unit):
                        break
                else:
                    self.witness_retry = 0.0
            self._note(unit)
            keep = conn.state is proto.State.IDLE
        except (trio.BrokenResourceError, trio.TooSlowError, proto.ProtocolError, OSError,
                ExchangedError) as e:
            log.warning("delivery to %s interrupted: %s", unit, describe(e))
            self._note(unit, f"delivery interrupted: {describe(e)}")
            for item in untried:  # the session broke before their turn (e.g. at the ping)
                await node.db(node.store.schedule_retry, item.doc_id,
                              f"delivery to {unit} interrupted: {describe(e)}", time.time())
            if relay_untried is not None:
                await self._put_back(relay_untried.handed, relay_untried.relayed, peer,
                                     f"delivery to {unit} interrupted: {describe(e)}")
            await trio.sleep(1)  # never a tight reconnect loop; items have their own backoff
        finally:
            if keep and unit in node.config.peers:
                now = trio.current_time()
                link.used = now
                if items or owed or checkpoints:
                    link.worked = now
                self.idle.setdefault(unit, []).append(link)
            else:
                await self._drop(unit, link)

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

    def _mark_sending(self, jobs: Jobs) -> set[str]:
        """Mark this link's share sending; returns the ids of documents for a relay that the
        direct path took meanwhile (left alone)."""
        store = self.node.store
        taken = set()
        with store.transaction():
            for item in jobs.items:
                store.mark_sending(item.doc_id)
            for item in jobs.handed:
                try:
                    store.mark_sending(item.doc_id)
                except StoreError:
                    taken.add(item.doc_id)
            for row in jobs.relayed:
                store.relay_sending(row["id"])
        return taken

    async def _submit(self, tls: trio.SSLStream[Any], conn: proto.ClientConnection,
                      doc_id: str, size: int, sha: str, metadata: dict[str, Any]) -> Any:
        """One document's package from our blob store, and the peer's answer."""
        node = self.node
        path = node.store.blob_path(sha)
        await node.send(tls, conn.send(proto.SubmitDocument(doc_id, size, sha, metadata)))
        with open(path, "rb") as f:  # noqa: ASYNC230 — local disk, read in slices
            while conn.body_remaining:
                data = await trio.to_thread.run_sync(f.read, DISK_SLICE)
                if not data:
                    raise ExchangedError(f"blob {path} is shorter than recorded",
                                         code="corrupt-blob")
                for i in range(0, len(data), CHUNK):
                    await node.send(tls, conn.send_body(data[i:i + CHUNK]))
        return await self._response(tls, conn, extra=size * ACK_SECONDS_PER_BYTE)

    async def _send_one(self, tls: trio.SSLStream[Any], conn: proto.ClientConnection,
                        item: OutItem, peer: Peer) -> None:
        node = self.node
        try:
            answer = await self._submit(tls, conn, item.doc_id, item.size, item.package_sha256,
                                        {"custody": item.custody} if item.custody else {})
        except BaseException as e:
            err = str(e) or type(e).__name__
            with trio.CancelScope(shield=True):
                await node.db(node.store.schedule_retry, item.doc_id, err, time.time())
            raise
        unproven = None
        if isinstance(answer, proto.Acknowledge):
            unproven = await trio.to_thread.run_sync(self._check_receipt, item, answer, peer)
        await node.commit(self._record_answer, item, answer, unproven)

    # -- relaying (A12) ---------------------------------------------------------------------

    def _direct_failed(self, unit: str) -> None:
        """Our connection to `unit` failed: from relay.after on, its documents may go
        through a relay. The relays' senders look again (now, and when that time comes)."""
        self.relays.direct_failed(unit)
        for relay_unit in self.node.config.relay.through:
            if relay_unit != unit:
                self.poke(relay_unit)

    async def _relay_jobs(self, tls: trio.SSLStream[Any], conn: proto.ClientConnection,
                          jobs: Jobs, peer: Peer) -> None:
        """After our own documents: ours for units cut off, handed to `peer` as our relay,
        and documents we relay, passed on to `peer` as their recipient. Each marked sending
        and not tried (the link broke) goes back to its queue."""
        handed, relayed = list(jobs.handed), list(jobs.relayed)
        try:
            while handed and conn.state is proto.State.IDLE:
                await self._hand_one(tls, conn, handed.pop(0), peer)
            while relayed and conn.state is proto.State.IDLE:
                await self._pass_on(tls, conn, relayed.pop(0), peer)
        finally:
            await self._put_back(handed, relayed, peer,
                                 f"{peer.unit} closed the connection before its turn")

    async def _put_back(self, handed: list[OutItem], relayed: list[dict[str, Any]],
                        peer: Peer, why: str) -> None:
        """Documents marked sending for a relay job that were not tried: back to their
        queues (ours offered to this relay again only after a while: no tight loop)."""
        node = self.node
        with trio.CancelScope(shield=True):
            for item in handed:
                self.relays.note_refused(peer.unit, item.doc_id)
                await node.db(node.store.release, item.doc_id, why)
            for row in relayed:
                await node.db(node.store.relay_retry, row["id"], why, time.time())

    async def _hand_one(self, tls: trio.SSLStream[Any], conn: proto.ClientConnection,
                        item: OutItem, peer: Peer) -> None:
        """One of our documents for a unit cut off, to `peer` as our relay: kept queued for
        the direct path, with the relay's signed hop record, once the relay has it."""
        node = self.node
        try:
            answer = await self._submit(tls, conn, item.doc_id, item.size, item.package_sha256,
                                        {"relay": {"to": item.recipient, "path": []}})
        except BaseException as e:
            self.relays.note_refused(peer.unit, item.doc_id)
            with trio.CancelScope(shield=True):
                await node.db(node.store.release, item.doc_id,
                              f"relay {peer.unit}: {str(e) or type(e).__name__}")
            raise
        problem = None
        if isinstance(answer, proto.Acknowledge):
            problem = await trio.to_thread.run_sync(self._check_hop, item, answer, peer)
        else:
            problem = f"relay {peer.unit} refused it: {answer.code}: {answer.message}"
        if problem is not None:
            log.warning("%s not relayed: %s", item.doc_id, problem)
            self.relays.note_refused(peer.unit, item.doc_id)
            await node.commit(self._record_not_relayed, item, peer.unit, problem)
            return
        assert isinstance(answer, proto.Acknowledge) and answer.receipt is not None
        log.info("%s handed to relay %s for %s", item.doc_id, peer.unit, item.recipient)
        await node.commit(self._record_relayed, item, peer.unit, answer.receipt)

    def _check_hop(self, item: OutItem, answer: proto.Acknowledge, peer: Peer) -> str | None:
        """The relay's hop record: signed by its node, for this document and this step."""
        try:
            if answer.receipt is None:
                raise receipts.ReceiptError("no hop record came with the acknowledgement")
            signer, _, payload = receipts.open_signed(answer.receipt, self.node.ca_cert,
                                                      "hop record")
            self.node.peers.check([signer], expect=peer.unit)
            receipts.check_relay_hop(payload, doc_id=item.doc_id, sha256=item.package_sha256,
                                     sender=self.node.config.unit, recipient=item.recipient,
                                     from_unit=self.node.config.unit, relay_unit=peer.unit)
        except ExchangedError as e:
            return f"relay {peer.unit} took it without a valid hop record: {e}"
        return None

    def _record_relayed(self, item: OutItem, relay_unit: str, hop: bytes) -> None:
        store = self.node.store
        with store.transaction():
            store.mark_relayed(item.doc_id, relay_unit, hop,
                               time.time() + self.node.config.relay.after)
            store.audit.append(action="document-relayed", obj=item.doc_id,
                               details={"recipient": item.recipient, "relay": relay_unit})

    def _record_not_relayed(self, item: OutItem, relay_unit: str, problem: str) -> None:
        store = self.node.store
        with store.transaction():
            store.release(item.doc_id, problem)
            store.audit.append(action="document-relay-refused", obj=item.doc_id,
                               outcome="refused", details={"recipient": item.recipient,
                                                           "relay": relay_unit,
                                                           "error": problem})

    async def _pass_on(self, tls: trio.SSLStream[Any], conn: proto.ClientConnection,
                       row: dict[str, Any], peer: Peer) -> None:
        """A document we relay, to `peer`, its recipient: its delivery receipt goes back to
        the sender."""
        node = self.node
        try:
            answer = await self._submit(tls, conn, row["doc_id"], row["size"],
                                        row["package_sha256"],
                                        {"relay": {"to": peer.unit, "path": row["path"]}})
        except BaseException as e:
            with trio.CancelScope(shield=True):
                await node.db(node.store.relay_retry, row["id"], str(e) or type(e).__name__,
                              time.time())
            raise
        if isinstance(answer, proto.Acknowledge):
            try:
                await trio.to_thread.run_sync(self._check_passed, row, answer, peer)
            except ExchangedError as e:
                answer = proto.Reject("bad-receipt", f"{peer.unit} took {row['doc_id']} "
                                      f"without a valid delivery receipt: {e}")
                log.warning("%s", answer.message)
                await node.db(node.store.relay_retry, row["id"], answer.message, time.time())
                return
        await node.commit(self._record_passed, row, answer, peer.unit)
        if isinstance(answer, proto.Acknowledge):
            self.poke(row["sender"])

    def _check_passed(self, row: dict[str, Any], answer: proto.Acknowledge, peer: Peer
                      ) -> None:
        if answer.receipt is None:
            raise receipts.ReceiptError("no delivery receipt came with the acknowledgement")
        signer, _, payload = receipts.open_signed(answer.receipt, self.node.ca_cert,
                                                  "delivery receipt")
        self.node.peers.check([signer], expect=peer.unit)
        receipts.check_delivery(payload, doc_id=row["doc_id"], sha256=row["package_sha256"],
                                sender=row["sender"], recipient=peer.unit)

    def _record_passed(self, row: dict[str, Any], answer: Any, unit: str) -> None:
        store = self.node.store
        if isinstance(answer, proto.Reject) and answer.code in TRANSIENT:
            store.relay_retry(row["id"], f"{answer.code}: {answer.message}", time.time())
            return
        with store.transaction():
            if isinstance(answer, proto.Acknowledge):
                assert answer.receipt is not None
                store.relay_delivered(row["id"], answer.receipt)
                store.queue_receipt(row["sender"], row["doc_id"],
                                    CARRIED_PREFIX + receipts.DELIVERY, answer.receipt)
                store.audit.append(action="document-relay-delivered", obj=row["doc_id"],
                                   details={"sender": row["sender"], "recipient": unit,
                                            "status": answer.status})
            else:
                store.relay_refused(row["id"], answer.code, answer.message)
                store.audit.append(action="document-relay-rejected", obj=row["doc_id"],
                                   outcome="refused",
                                   details={"sender": row["sender"], "recipient": unit,
                                            "code": answer.code, "error": answer.message})

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
            if isinstance(answer, proto.Acknowledge) and store.out_item(item.doc_id)["state"] \
                    != "sending":  # its receipt came back through a relay meanwhile
                return
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
        if str(r["kind"]).startswith(CARRIED_PREFIX) and isinstance(answer, proto.Reject) \
                and answer.code not in TRANSIENT:  # carried, not ours: refused for good
            log.warning("%s refused the receipt for %s we carried: %s", r["sender"],
                        r["doc_id"], answer.message)
            await node.db(node.store.drop_receipt, r["id"], f"{answer.code}: {answer.message}")
            await node.audit("receipt-relay-refused", r["doc_id"], outcome="refused",
                             details={"to": r["sender"], "code": answer.code,
                                      "error": answer.message})
            return
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
