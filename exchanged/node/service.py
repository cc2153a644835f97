"""`exchanged serve`: the unit's node as a service — one trio nursery tree (design decision 8).

The tree: the listener and its connection handlers (`inbound`), one sender per configured
peer (`outbound`), the control socket (`control`, with the handlers of `local`), the
housekeeping task (CRL watcher, audit checkpoints, systemd watchdog), and the signal handler.
SIGHUP reloads CRLs and peers; SIGTERM stops accepting, lets transfers in progress finish
within `drain_timeout`, then stops: a document is acknowledged only once it is on disk, so an
interrupted one is simply sent again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import logging
import signal
import sqlite3
import time
from typing import Any

import trio

from exchanged.common import give_back_memory, keep_large_buffers_apart, parse_time, stamp
from exchanged.errors import ExchangedError
from exchanged.node import control, logs, status
from exchanged.node.base import Node
from exchanged.node.config import Config
from exchanged.node.inbound import Inbound
from exchanged.node.local import LocalCommands
from exchanged.node.outbound import Outbound
from exchanged.node.relay import Relays
from exchanged.node.sdnotify import Notifier
from exchanged.transport import publish

log = logging.getLogger("exchanged")
CHECKPOINT_SECONDS = 300  # a signed audit checkpoint at least this often
# What SIGHUP cannot change: the unit's identity, where it listens and keeps its store, the
# PKCS#11 module (one engine per process) and the trust anchors.
RESTART_ONLY = ("unit", "name", "data_dir", "listen_host", "listen_port", "control_socket",
                "module", "ca", "metrics_listen", "log_format")
STALE_RETRY_SECONDS = 60  # while the CRL held is stale, the publication point is asked this often
EXPIRY_CHECK_SECONDS = 3600  # certificates' expiry is looked at this often
TOKEN_CHECK_SECONDS = 5.0  # is the node's token still there (and, gone, back yet)?


class Service:
    """The running daemon: a `Node` and the tasks that serve it."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.notifier = Notifier()
        self.accepting = trio.CancelScope()
        self.crl_wake = trio.Event()
        self.expiry_wake = trio.Event()  # set when the node certificate changed
        self.token_wake = trio.Event()  # set when something failed on the token

    async def run(self, *, task_status: trio.TaskStatus[Service] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        keep_large_buffers_apart()
        self.node = node = await trio.to_thread.run_sync(Node.open, self.config)
        relays = Relays(node)
        self.inbound = Inbound(node, relays)
        self.outbound = Outbound(node, relays)
        relays.poke = self.outbound.poke
        node.on_crl = self._crl_changed
        try:
            async with trio.open_nursery() as nursery:
                listeners = await trio.open_tcp_listeners(self.config.listen_port,
                                                          host=self.config.listen_host)
                node.port = listeners[0].socket.getsockname()[1]
                conns: trio.Nursery = await nursery.start(_nursery)
                nursery.start_soon(self._accept, listeners, conns)
                self.outbound.start(nursery)
                handlers = LocalCommands(node, self.outbound, self.reload).handlers()
                await nursery.start(control.serve, self.config.socket_path, handlers)
                nursery.start_soon(self._signals, nursery, listeners)
                nursery.start_soon(self._housekeeping)
                nursery.start_soon(self._crl_refresh)
                nursery.start_soon(self._expiry_watch)
                nursery.start_soon(self._token_watch)
                if self.config.metrics_listen:
                    host, port = self.config.metrics_listen
                    bound = await nursery.start(functools.partial(
                        publish.serve_get, self._metrics, host, port, quiet=True))
                    log.info("metrics at http://%s:%d/metrics", host, bound)
                status = (f"unit {self.config.unit} listening on "
                          f"{self.config.listen_host}:{node.port}, "
                          f"{len(self.config.peers)} peer(s)")
                log.info("%s", status)
                self.notifier.ready(status)
                give_back_memory()  # what start-up parsed and built is garbage now
                task_status.started(self)
        finally:
            await trio.to_thread.run_sync(node.close)

    async def _accept(self, listeners: list[trio.SocketListener], n: trio.Nursery) -> None:
        async def one(stream: trio.SocketStream) -> None:
            try:
                await self.inbound.serve(stream)
            except Exception:  # serve() raises nothing; if it ever does, the node stays up
                log.exception("a connection's handler failed")
                await trio.aclose_forcefully(stream)

        with self.accepting:  # cancelled on SIGTERM: no new connections
            await trio.serve_listeners(one, listeners, handler_nursery=n)

    async def _signals(self, nursery: trio.Nursery,
                       listeners: list[trio.SocketListener]) -> None:
        node = self.node
        with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as sigs:
            async for sig in sigs:
                if sig == signal.SIGHUP:
                    with contextlib.suppress(ExchangedError):  # logged and audited already
                        await self.reload()
                    continue
                node.stopping = True
                self.notifier.stopping("draining")
                log.info("stopping: no new connections; %d transfer(s) may finish within %ss",
                         node.active_transfers, self.config.limits.drain_timeout)
                self.accepting.cancel()
                for listener in listeners:
                    await listener.aclose()
                with trio.move_on_after(self.config.limits.drain_timeout):
                    while node.active_transfers:  # noqa: ASYNC110 — bounded by the deadline
                        await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
                return

    async def reload(self) -> dict[str, Any]:
        """SIGHUP (or `exchanged reload`): read the configuration again and apply what can
        change while the node runs — peers, limits, roles' declaration, the alert command,
        divisions and the box, witnesses, CRL settings and files, the node certificate (a
        renewal or a new card: new connections use it, those in progress finish with the old
        one). What needs a restart (the unit, addresses, the data directory, the PKCS#11
        module, the trusted CAs) is refused with a message saying so, and the rest applied.
        Says in the log and the audit log what changed; the old configuration stays whole if
        the new one cannot be read or its certificate is not acceptable."""
        node, old = self.node, self.config
        try:
            new = await trio.to_thread.run_sync(Config.load, old.source) if old.source else old
            refused = [f"{name} (needs a restart: systemctl restart exchanged)"
                       for name in RESTART_ONLY if getattr(new, name) != getattr(old, name)]
            keep = {name: getattr(old, name) for name in RESTART_ONLY}
            new = dataclasses.replace(new, **keep)
            identity = await node.tok(node.renew_identity, new) if node.token_present else None
            if not node.token_present and (new.cert, new.key, new.pin_file) != (
                    old.cert, old.key, old.pin_file):
                refused.append("the node certificate or key (the token is not present: "
                               "reload again once it is back)")
        except ExchangedError as e:
            log.error("reload failed, the old configuration stays in force: %s", e)
            await node.audit("config-reload", old.unit, outcome="failed",
                             details={"error": str(e)})
            raise
        changed = [f.name for f in dataclasses.fields(Config)
                   if f.name not in RESTART_ONLY and f.name != "source"
                   and getattr(new, f.name) != getattr(old, f.name)]
        self.config = node.config = node.crls.config = new
        self.inbound.limits_changed()
        if "stale_crl" in changed:
            node.peers.set_stale_policy(new.stale_crl)
        if {"crl_url", "crl_refresh", "stale_crl", "crls"} & set(changed):
            self.crl_wake.set()  # the refresh loop takes the new settings at once
        await trio.to_thread.run_sync(
            lambda: node.peers.reload(new.peers, force=True, crl_paths=node.crls.paths()))
        if {"box", "roles"} & set(changed):
            await node.db(node.reconfigure_box)
        self.outbound.peers_changed(set(new.peers) - set(old.peers))
        if identity:
            old_cert, new_cert, what = identity
            changed.append(f"node certificate: {what}")
            await node.db(node.record_new_identity, old_cert, new_cert)
            self.expiry_wake.set()
        for item in changed:
            log.info("reload: %s changed", item)
        for item in refused:
            log.warning("reload: %s changed but is not applied: %s", item.split(" ")[0], item)
        log.info("configuration reloaded: %d change(s) applied, %d refused", len(changed),
                 len(refused))
        await node.audit("config-reload", new.unit, details={"changed": changed,
                                                             "refused": refused})
        return {"changed": changed, "refused": refused}

    async def _housekeeping(self) -> None:
        """CRL files are re-read when they change; the watchdog is fed; checkpoints signed."""
        node = self.node
        last_checkpoint = time.monotonic()
        interval = (self.notifier.watchdog_seconds or 20) / 2
        last_reminder = dt.datetime.now(dt.UTC)
        while True:
            await trio.sleep(min(interval, 5))
            self.notifier.watchdog()
            last_reminder = await self._remind(last_reminder)
            try:
                if await trio.to_thread.run_sync(node.peers.reload):
                    log.info("CRLs changed on disk: reloaded")
                    await node.audit("crl-reload", self.config.unit)
            except ExchangedError as e:
                log.error("CRL reload failed, the previous CRLs stay in force: %s", e)
            await self.inbound.refusals.flush()
            if time.monotonic() - last_checkpoint > CHECKPOINT_SECONDS:
                if await node.audit("checkpoint-timer", self.config.unit, checkpoint=True):
                    last_checkpoint = time.monotonic()
                    if self.config.witness:
                        self.outbound.poke(self.config.witness)


    async def _metrics(self, target: bytes) -> tuple[int, str, bytes] | None:
        """GET /metrics: the gauges read now, then every figure."""
        if target.split(b"?", 1)[0] != b"/metrics":
            return None
        self.node.metrics.update(await status.gather(self.node, self.outbound))
        return (200, *self.node.metrics.exposition())

    async def _token_watch(self) -> None:
        """The card comes and goes (A card pulled, a reader unplugged, p11-kit's server
        gone): every TOKEN_CHECK_SECONDS the token is asked whether it is there. Gone: the
        node stays up, refuses connections that need its key, keeps documents waiting, and
        says so (log, audit, the token-missing alert, status, metric). Back: it logs in again
        and carries on."""
        node = self.node
        while True:
            with trio.move_on_after(TOKEN_CHECK_SECONDS):
                await self.token_wake.wait()
            self.token_wake = trio.Event()
            if node.token_present:
                problem = await trio.to_thread.run_sync(node.probe_token,
                                                        limiter=node.token_limiter)
                if problem is None:
                    continue
                node.token_present, node.token_problem = False, problem
                log.error("the node's token is gone (%s): connections needing its key are "
                          "refused and documents wait until it is back", problem)
                node.alert("token-missing", detail=problem)
                await node.audit("token-missing", node.config.unit, outcome="failed",
                                 details={"error": problem})
                continue
            try:
                await trio.to_thread.run_sync(node.recover_token, limiter=node.token_limiter)
            except ExchangedError as e:
                node.token_problem = str(e)
                continue
            node.token_present, node.token_problem = True, None
            log.info("the node's token is back: logged in again, carrying on")
            node.alert("token-back", detail=node.config.key)
            await node.audit("token-back", node.config.unit)
            for unit in node.config.peers:
                self.outbound.poke(unit)

    def _crl_changed(self) -> None:
        """A newer CRL is held: the peers are asked whether they have it, and whether it is
        stale is looked at now."""
        self.outbound.crl_changed()
        self.crl_wake.set()

    async def _crl_refresh(self) -> None:
        """Fetch the CRL from the CA's publication point every crl_refresh seconds (every
        minute while the one held is stale), and say so when the one held is stale."""
        node = self.node
        fetched = -1e9
        while True:
            stale = node.crls.stale()
            wait = node.config.crl_refresh if stale is None else min(node.config.crl_refresh,
                                                                     STALE_RETRY_SECONDS)
            if trio.current_time() - fetched >= wait:
                await node.fetch_crl()
                fetched = trio.current_time()
                stale = node.crls.stale()
            self.crl_wake = trio.Event()  # what was taken until now is looked at just below
            if stale is not None or node.crls.held() is None:
                self._stale_alert()
            with trio.move_on_after(max(0.0, fetched + wait - trio.current_time())):
                await self.crl_wake.wait()

    async def _expiry_watch(self) -> None:
        """Certificates nearing their end (the node's, and the persons' last used here): a
        warning in the log, the cert-expiring alert and the status, once at each of 30, 7 and
        1 days before notAfter (and once more when expired)."""
        node = self.node
        warned: set[tuple[str, int]] = set()
        while True:
            now = dt.datetime.now(dt.UTC)
            certs = [("the node certificate", format(node.cert.serial_number, "x"),
                      node.cert.not_valid_after_utc)]
            try:
                for person, seen in (await node.db(node.store.persons_seen)).items():
                    certs.append((f"{person}'s certificate", seen["serial"],
                                  parse_time(seen["not_after"])))
            except (ExchangedError, sqlite3.Error) as e:
                log.error("cannot read the persons' certificates: %s", e)
            for what, serial, not_after in certs:
                days = status.expiry_warning(not_after, now)
                if days is None or (serial, days) in warned:
                    continue
                warned.add((serial, days))
                detail = (f"{what} ({serial}) expired at {stamp(not_after)}" if days == 0 else
                          f"{what} ({serial}) expires at {stamp(not_after)}, within {days} "
                          "day(s): renew it (exchanged renew)")
                log.warning("%s", detail)
                node.alert("cert-expiring", every_time=True, detail=detail, serial=serial)
            with trio.move_on_after(EXPIRY_CHECK_SECONDS):
                await self.expiry_wake.wait()
            self.expiry_wake = trio.Event()

    def _stale_alert(self) -> None:
        node = self.node
        held = node.crls.held()
        if held is None:
            detail = "this node holds no CRL of its CA"
        else:
            due = f"{held.next_update:%Y-%m-%d %H:%M:%S}Z" if held.next_update else "-"
            detail = f"CRL number {held.number} is stale: it was due for renewal at {due}"
        policy = node.config.stale_crl
        log.error("%s; %s", detail, "no documents pass until a fresh CRL arrives (stale_crl = "
                  "refuse)" if policy == "refuse" else "the revocations it lists still apply "
                  "(stale_crl = warn)")
        node.alert("crl-stale", detail=detail)

    async def _remind(self, since: dt.datetime) -> dt.datetime:
        """Reminders (A16, A35): the alert command again for each urgent document nobody has
        signed for, every urgent_every_minutes; and at each reminder time of day, for
        whatever is pending."""
        node, now = self.node, dt.datetime.now(dt.UTC)
        try:
            urgent, pending = await node.db(node.box.reminders, now, since)
        except (ExchangedError, OSError, sqlite3.Error) as e:
            log.error("reminders failed: %s", e)
            return since
        for item in urgent:
            log.warning("urgent document %s (%r from %s) is not signed for in the %s box",
                        item["doc_id"], item["title"], item["sender"], item["box"])
            node.alert("urgent-pending", every_time=True, doc_id=item["doc_id"],
                       title=item["title"], sender=item["sender"], urgency=item["urgency"],
                       box=item["box"])
        if pending:
            log.info("reminder: %d document(s) wait for someone to act (exchanged due)", pending)
            node.alert("pending", every_time=True, count=str(pending))
        return now


async def _nursery(*, task_status: trio.TaskStatus[trio.Nursery] = trio.TASK_STATUS_IGNORED
                   ) -> None:
    """A nursery of its own for the connection handlers, cancelled with the service."""
    async with trio.open_nursery() as n:
        task_status.started(n)
        await trio.sleep_forever()


def run(config: Config) -> int:
    """The console entry for `exchanged serve`."""
    logs.setup(config.unit, config.log_format)
    try:
        trio.run(Service(config).run)
    except ExchangedError as e:
        log.error("%s", e)
        return 1
    return 0
