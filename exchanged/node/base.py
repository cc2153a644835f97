"""A node, opened: its store, its token, its TLS contexts, its peers and roles — what the
daemon's parts (`inbound`, `outbound`, `local`, `service`) share.

Blocking work (PKCS#11, SQLite, fsync) goes through `trio.to_thread.run_sync` with a
CapacityLimiter(1) per token and per database (`db()`, `tok()`), which also serialises each of
them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import shutil
import sqlite3
import ssl
import stat
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from exchanged.box import Box
from exchanged.common import stamp
from exchanged.errors import ExchangedError
from exchanged.node.config import Config
from exchanged.node.crls import CrlKeeper
from exchanged.node.metrics import Metrics
from exchanged.pki import verify
from exchanged.pki.names import common_name, organization, person_of
from exchanged.pki.operator import Operator
from exchanged.pki.pin import PinSource
from exchanged.pki.token import Token, TokenKey, default_module, reset_module, token_present
from exchanged.pki.uri import parse
from exchanged.roles import Roles
from exchanged.store.audit import MIRROR, NODE_CERTIFICATE, signers
from exchanged.store.db import Change, apply_group
from exchanged.store.nodedb import NodeStore
from exchanged.store.roledb import RoleStore
from exchanged.transport import publish
from exchanged.transport.peers import Peer, PeerCheck, PeerRefused
from exchanged.transport.tlskey import make_context, peer_chain_der, renew_engine

log = logging.getLogger("exchanged")
T = TypeVar("T")
CHUNK = 64 * 1024  # one read from a peer
# Disk work goes to a thread in slices this big: one thread hop per 16 KiB TLS record cost
# ~100 us each (tools/bench-exchange: 61,000 hops per GB, the main cost of a large transfer).
DISK_SLICE = 1024 * 1024
ALERT_INTERVAL = 60.0  # seconds between two alerts of the same kind
# A connection kept open is judged again at least this often (and whenever CRLs or peers change).
REJUDGE_SECONDS = 60.0


class Node:
    """The running node's parts. `Node.open(config)` makes them; `close()` lets them go."""

    store: NodeStore
    token: Token
    key: TokenKey
    cert: x509.Certificate
    ca_cert: x509.Certificate
    trusted: list[x509.Certificate]
    signer: Operator
    peers: PeerCheck
    crls: CrlKeeper
    roles: Roles
    box: Box
    server_ctx: Any
    client_ctx: Any
    port: int = 0  # where the listener is bound (set by the service)

    def __init__(self, config: Config) -> None:
        self.config = config
        self.db_limiter = trio.CapacityLimiter(1)
        self.commit_queue: list[Change] = []  # group commit (`commit`)
        self.committing = False
        self.commit_turn = trio.Event()
        self.commit_stats = {"commits": 0, "changes": 0}
        self.token_limiter = trio.CapacityLimiter(1)
        self.stopping = False
        self.active_transfers = 0
        self._alerted: dict[str, float] = {}
        self.started = dt.datetime.now(dt.UTC)
        self.metrics = Metrics()
        # peer -> {"full": n, "resumed": m}: TLS handshakes we opened to it (exchanged status)
        self.handshakes: dict[str, Counter[str]] = {}
        self._retired: list[Token] = []  # tokens of earlier identities (closed at the end)
        self.token_present = True  # the node's token answers (see the service's token watch)
        self.token_problem: str | None = None
        self.on_crl: Callable[[], None] = lambda: None  # a newer CRL is held (the service
        # spreads it to the peers)

    @classmethod
    def open(cls, config: Config) -> Node:
        """Everything that can fail at start-up, before we tell systemd we are ready."""
        node = cls(config)
        c = config
        os.umask(0o077)  # everything the daemon creates is its own: 0700 and 0600
        secure_data_dir(c.data_dir)
        node.store = NodeStore.open(c.data_dir)
        node.store.sweep_temp()
        orphans = node.store.sweep_orphans()
        if orphans:
            log.info("removed %d blob(s) no document names (a crash, or a refusal cut short)",
                     orphans)
        requeued = node.store.recover()
        if requeued:
            log.info("recovered %d document(s) left in flight by the last run", requeued)
        node.trusted = [x509.load_pem_x509_certificate(p.read_bytes()) for p in c.ca]
        node.ca_cert = node.trusted[0]
        node._adopt(load_identity(c, node.trusted))
        if node.store.audit.head()[0] == 0:  # a new log begins with a signed anchor
            node.audit_event("node-init", c.unit)
        node.crls = CrlKeeper(c, node.trusted, node.cert, node.audit_event)
        node.peers = node.crls.peers
        node.roles = Roles(RoleStore(node.store.db), node.store.audit, node.person_status,
                           divisions=c.box.divisions)
        node.box = Box(node.store, node.roles, c.unit, c.box, node.ca_cert)
        with node.store.transaction():
            if node.roles.bootstrap_declared(c.roles, f"configuration {c.source}"):
                log.info("roles declared in the configuration: %s", c.roles)
        node.audit_event("node-start", c.unit, details={"requeued": requeued})
        return node

    def _adopt(self, identity: Identity) -> None:
        self.identity = identity
        self.token, self.key, self.cert = identity.token, identity.key, identity.cert
        self.signer = identity.signer
        self.server_ctx, self.client_ctx = identity.server_ctx, identity.client_ctx

    def renew_identity(self, config: Config
                       ) -> tuple[x509.Certificate, x509.Certificate, str] | None:
        """SIGHUP: the node certificate, its key or its token changed in `config` (a renewal,
        or a new card). The new certificate must be valid, chain to our CA, be good per our
        CRLs and name the same node (peers know it by CN and O); then new connections use it,
        while those in progress finish with the old one. None if nothing changed, else what
        did: (old certificate, new one, a description); ExchangedError (nothing changed) if the
        new identity is not acceptable. Blocking: run it in the token thread."""
        old = self.identity
        chain = _read_chain(config.cert)
        if (chain == old.chain and config.key == old.key_uri
                and config.pin_file == old.pin_file):
            return None
        cert = chain[0]
        if (common_name(cert), organization(cert)) != (common_name(old.cert),
                                                       organization(old.cert)):
            raise ExchangedError(f"the new certificate names {cert.subject.rfc4514_string()}, "
                                 f"not {old.cert.subject.rfc4514_string()}: peers know this "
                                 "node by its CN and O, keep them", code="wrong-identity")
        try:
            verify.validate(cert, trusted=self.trusted, untrusted=chain[1:],
                            crls=self.peers.crls, purpose="node",
                            stale_ok=self.config.stale_crl == "warn")
        except verify.ValidationError as e:
            raise ExchangedError(f"the new certificate is not acceptable: {e}",
                                 code=e.code) from None
        same_token = (parse(config.key).token_only() == old.token.uri
                      and config.pin_file == old.pin_file)
        identity = load_identity(config, self.trusted, chain=chain,
                                 token=old.token if same_token else None)
        self._adopt(identity)
        if not same_token:
            self._retired.append(old.token)  # a signature may still be under way with it
        return old.cert, cert, (
            f"certificate {old.cert.serial_number:x} -> {cert.serial_number:x} (valid until "
            f"{stamp(cert.not_valid_after_utc)}), key {identity.key.label!r} on token "
            f"{identity.token.label!r}")

    def checkpoint_signers(self) -> list[x509.Certificate]:
        """The certificates this node's checkpoints are signed by: the current one first, then
        those it had before a renewal (from its log's node-certificate entries). DB thread."""
        return signers(self.store.audit.rows("WHERE action = ?", [NODE_CERTIFICATE]),
                       self.cert, self.ca_cert)

    def record_new_identity(self, old: x509.Certificate, new: x509.Certificate) -> None:
        """After a renewal: both certificates into the log (so the old one's checkpoints stay
        verifiable), then a checkpoint signed with the new key. DB thread."""
        pem = serialization.Encoding.PEM
        self.audit_event(NODE_CERTIFICATE, format(new.serial_number, "x"), details={
            "certificate": new.public_bytes(pem).decode(),
            "previous": old.public_bytes(pem).decode(),
            "not_after": stamp(new.not_valid_after_utc)}, checkpoint=True)

    def reconfigure_box(self) -> None:
        """SIGHUP changed the exchange box's settings or the declared roles."""
        c = self.config
        self.roles.divisions = c.box.divisions
        self.box = Box(self.store, self.roles, c.unit, c.box, self.ca_cert)
        with self.store.transaction():
            if self.roles.bootstrap_declared(c.roles, f"configuration {c.source}"):
                log.info("roles declared in the configuration: %s", c.roles)

    def close(self) -> None:
        try:
            self.audit_event("node-stop", self.config.unit, checkpoint=True)
        finally:
            for token in [self.token, *self._retired]:
                token.close()
            self.store.close()

    # -- who is who ---------------------------------------------------------------------------

    def person_status(self, cert: x509.Certificate) -> None:
        """An operator at this node: a person certificate of our CA, good per our CRLs."""
        try:
            verify.validate(cert, trusted=self.trusted, crls=self.peers.crls, purpose="person",
                            stale_ok=self.config.stale_crl == "warn")
        except verify.ValidationError as e:
            raise ExchangedError(f"operator certificate refused: {e}", code=e.code) from None
        person = person_of(cert.subject)
        if person:  # its expiry is watched from now on (exchanged status)
            self.store.remember_person(person, format(cert.serial_number, "x"),
                                       cert.subject.rfc4514_string(),
                                       stamp(cert.not_valid_after_utc))

    async def handshake(self, stream: trio.abc.Stream, *, server: bool,
                        expect: str | None = None, session: ssl.SSLSession | None = None
                        ) -> tuple[trio.SSLStream[Any], Peer, x509.Certificate, Admission]:
        """TLS on `stream`, then who the peer is (transport.peers): (the TLS stream, the
        configured peer, its leaf certificate, the admission — `limited` says why only CRLs
        may pass: our CRL is stale). PeerRefused if it is no peer of ours.

        `session` (client side): a TLS session of an earlier connection to the same peer, to
        resume — no certificate is sent and no token signs, on either side. The server's
        certificate is then the one the session was made with, and it is judged as every
        peer's is, against the CRLs and peer table in force now: a resumed session never lets
        a revoked peer through. A session this context cannot take (made before our
        certificate was renewed) is left out: a full handshake."""
        ctx = self.server_ctx if server else self.client_ctx
        tls = trio.SSLStream(stream, ctx, server_side=server,
                             server_hostname=None if server else "exchanged-peer")
        if session is not None and not server:
            with contextlib.suppress(ValueError):  # "refers to a different SSLContext"
                tls.session = session
        with trio.fail_after(self.config.limits.handshake_timeout):
            await tls.do_handshake()
        self.metrics.handshakes.labels(side="server" if server else "client",
                                       resumed="yes" if tls.session_reused else "no").inc()
        if expect is not None:  # counted before the peer is judged: a refusal counts too
            self.handshakes.setdefault(expect, Counter())[
                "resumed" if tls.session_reused else "full"] += 1
        chain = peer_chain_der(tls)
        generation = self.peers.generation
        peer, limited = await self._admit(chain, expect)
        return (tls, peer, x509.load_der_x509_certificate(chain[0]),  # parsed by admit()
                Admission(chain, expect, generation, trio.current_time(), ctx,
                          None if limited is None else str(limited)))

    async def _admit(self, chain: list[bytes], expect: str | None
                     ) -> tuple[Peer, PeerRefused | None]:
        """PeerCheck.admit: from its cache in the event loop (no thread hop), else judged in
        a thread (that may take a while)."""
        known = self.peers.admit_cached(chain, expect=expect)
        if known is not None:
            return known
        return await trio.to_thread.run_sync(lambda: self.peers.admit(chain, expect=expect))

    async def readmit(self, adm: Admission) -> Admission:
        """A connection kept open is judged again before it is used: at once when the CRLs or
        the peer table changed since it was admitted, else at least every REJUDGE_SECONDS
        (a certificate expiring, a CRL passing its nextUpdate). The same admission if nothing
        changed, a new one (its `limited` maybe changed), or PeerRefused: close it."""
        generation = self.peers.generation
        if generation == adm.generation and \
                trio.current_time() - adm.at < REJUDGE_SECONDS:
            return adm
        _, limited = await self._admit(adm.chain, adm.expect)
        return Admission(adm.chain, adm.expect, generation, trio.current_time(), adm.ctx,
                         None if limited is None else str(limited))

    async def take_crl(self, der: bytes, source: str) -> bool:
        """A CRL from `source` (a peer, the publication point, an operator): checked, then
        held if it is newer than ours (and the service told, to spread it). False if it is
        no news; ValidationError if it does not verify."""
        info = await trio.to_thread.run_sync(self.crls.check, der, source)
        installed = await self.db(self.crls.install, der, info, source)
        if installed:
            kind = "peer" if source.startswith("peer ") else \
                "publication-point" if source.startswith("http") else "operator"
            self.metrics.crls_taken.labels(source=kind).inc()
            self.on_crl()
        return installed

    async def fetch_crl(self) -> dict[str, Any]:
        """One fetch from the publication point; what happened (also kept for status)."""
        url = self.crls.publication_point()
        result: dict[str, Any] = {"url": url, "time": stamp(), "ok": False}
        if url is None:
            result["error"] = ("no publication point: set trust.crl_url, or issue node "
                               "certificates with a CRL distribution point (ca init --crl-url)")
        else:
            try:
                der = await publish.fetch(url, max_size=self.config.limits.max_crl_bytes,
                                          seconds=self.config.limits.read_timeout)
                installed = await self.take_crl(der, url)
                result.update(ok=True, installed=installed, number=self.crls.number())
            except (ExchangedError, OSError, sqlite3.Error) as e:
                result["error"] = str(e)
                log.warning("CRL fetch from %s failed: %s", url, e)
                if isinstance(e, verify.ValidationError):
                    await self.audit("crl-refused", url, outcome="refused",
                                     details={"code": e.code, "error": str(e)})
        self.crls.last_fetch = result
        return result

    async def send(self, tls: trio.SSLStream[Any], data: bytes) -> None:
        """Write to a peer within the read timeout (a peer that stops reading is let go)."""
        if data:
            with trio.fail_after(self.config.limits.read_timeout):
                await tls.send_all(data)

    # -- threads ------------------------------------------------------------------------------

    async def db(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        return await trio.to_thread.run_sync(lambda: fn(*args, **kw),
                                             limiter=self.db_limiter)

    async def commit(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in the database thread, in a group commit: changes that arrive together
        (documents on several connections) share one transaction and one fsync, each in its
        own savepoint. Returns (or raises) only after the COMMIT that covers it; what `fn`
        raises is undone alone. The first caller to find no batch running runs one with all
        that wait; the others wait for their batch."""
        change = Change(fn, args)
        self.commit_queue.append(change)
        while not change.done:
            if self.committing:
                await self.commit_turn.wait()
                continue
            self.committing = True
            try:
                batch, self.commit_queue = self.commit_queue, []
                await self.db(apply_group, self.store.db, batch)
                self.commit_stats["commits"] += 1
                self.commit_stats["changes"] += len(batch)
            finally:
                self.committing = False
                self.commit_turn.set()
                self.commit_turn = trio.Event()
        if change.error is not None:
            raise change.error
        return change.result  # type: ignore[no-any-return]

    async def tok(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """`fn` in the token's thread; refused at once while the token is away."""
        if not self.token_present:
            raise ExchangedError(f"the node's token is not present ({self.token_problem}): "
                                 "plug it back in; the node logs in again by itself",
                                 code="token-missing")
        return await trio.to_thread.run_sync(lambda: fn(*args, **kw),
                                             limiter=self.token_limiter)

    # -- the token coming and going ---------------------------------------------------------

    def probe_token(self) -> str | None:
        """None if the node's token answers, else why not (token thread)."""
        return token_present(self.config.module, parse(self.config.key))

    def recover_token(self) -> None:
        """The token is back: close what is left of the old sessions, re-initialise the
        module (p11-kit-client reconnects only then), log in again, and make new TLS contexts
        (a new engine: the old one's module instance is dead). Connections already made go on.
        Raises if the token is still away (token thread)."""
        self.token.close()
        for token in self._retired:
            token.close()
        self._retired.clear()
        module = parse(self.config.key).module_path or self.config.module or default_module()
        reset_module(module)
        problem = self.probe_token()
        if problem:
            raise ExchangedError(problem, code="token-missing")
        renew_engine()
        self._adopt(load_identity(self.config, self.trusted, chain=self.identity.chain))

    # -- the audit log ------------------------------------------------------------------------

    def audit_event(self, action: str, obj: str, *, outcome: str = "ok",
                    actor: str | None = None, details: dict[str, Any] | None = None,
                    checkpoint: bool = False) -> None:
        """Append to the node's audit log (and sign a checkpoint on the node token if asked;
        the first entry of a new log is a checkpoint, as at the CA)."""
        with self.store.transaction():
            if self.store.audit.head()[0] == 0:
                self.store.audit.checkpoint(self.key.sign, self.cert)
            self.store.audit.append(action=action, obj=obj, outcome=outcome,
                                    actor_subject=actor, details=details or {})
            if checkpoint:
                self.store.audit.checkpoint(self.key.sign, self.cert)
        if checkpoint:
            self.store.audit.mirror_checkpoints(self.config.data_dir / MIRROR)

    async def audit(self, action: str, obj: str, **kw: Any) -> bool:
        """Record an event. Events are what happened around the acts (a refused connection,
        a reload), and recording one must never end the node: if the store cannot take it
        (the disk is full), it is logged instead and False returned."""
        try:
            await self.db(self.audit_event, action, obj, **kw)
            return True
        except (ExchangedError, OSError, sqlite3.Error) as e:
            log.error("could not record %s of %s in the audit log: %s", action, obj, e)
            self.alert("audit-failed", detail=f"{action} {obj}: {e}")
            return False

    # -- alerts -------------------------------------------------------------------------------

    def alert(self, event: str, *, every_time: bool = False, **env: str) -> None:
        """Run the configured alert command (N3) with EXCHANGED_EVENT=event and each of `env`
        as EXCHANGED_<NAME>. A trouble event (disk-full, audit-failed...) alerts at most once
        a minute, so a flood cannot fork a process per packet; an arriving document alerts
        `every_time`."""
        command = self.config.alert_command
        now = time.monotonic()
        if not command or (not every_time
                           and now - self._alerted.get(event, -1e9) < ALERT_INTERVAL):
            return
        self._alerted[event] = now
        extra = {f"EXCHANGED_{k.upper()}": v for k, v in env.items()}
        try:
            subprocess.Popen(list(command), env={**os.environ, "EXCHANGED_EVENT": event,
                                                 **extra},
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            log.error("alert command failed: %s", e)

    def disk_free(self) -> int:
        return shutil.disk_usage(self.config.data_dir).free


@dataclass(frozen=True)
class Admission:
    """How a peer's connection was let in, kept to judge it again (`Node.readmit`)."""

    chain: list[bytes]  # as the peer sent it, leaf first
    expect: str | None  # the unit we dialled (None: a connection we accepted)
    generation: int  # the PeerCheck generation (CRLs, peer table) it was judged under
    at: float  # trio time of that judgement
    ctx: Any  # our TLS context then: a renewed certificate makes new connections
    limited: str | None  # why only CRLs may pass (our CRL is stale), or None


@dataclass(frozen=True)
class Identity:
    """Who this node is on the wire: its certificate chain and the key on its token that the
    certificate certifies, with the TLS contexts made of them."""

    token: Token
    key: TokenKey
    chain: list[x509.Certificate]
    key_uri: str  # as configured
    pin_file: str | None
    signer: Operator
    server_ctx: Any
    client_ctx: Any

    @property
    def cert(self) -> x509.Certificate:
        return self.chain[0]


def _read_chain(path: Path) -> list[x509.Certificate]:
    try:
        chain = x509.load_pem_x509_certificates(path.read_bytes())
    except OSError as e:
        raise ExchangedError(f"cannot read the node certificate {path}: {e.strerror}",
                             code="bad-cert") from None
    except ValueError as e:
        raise ExchangedError(f"{path} holds no PEM certificate ({e})", code="bad-cert") from None
    return chain


def load_identity(config: Config, trusted: list[x509.Certificate], *,
                  chain: list[x509.Certificate] | None = None,
                  token: Token | None = None) -> Identity:
    """Open the token (unless given), find the key the certificate certifies (the configured
    key, or after a renewal the one the new certificate names), and make the TLS contexts
    (each signs a test message on the token)."""
    chain = chain if chain is not None else _read_chain(config.cert)
    pin = PinSource(role="node", env="EXCHANGED_PIN", file=config.pin_file)
    uri = parse(config.key)
    opened = token is None
    token = token or Token.open(uri, pin, module=config.module)
    try:
        key = token.key_for(chain[0], uri)
        common = dict(key_uri=key.uri, pin=pin, cert_chain=chain, trusted=trusted,
                      module=config.module)
        server_ctx = make_context(server=True, **common)  # type: ignore[arg-type]
        client_ctx = make_context(server=False, **common)  # type: ignore[arg-type]
    except BaseException:
        if opened:
            token.close()
        raise
    return Identity(token=token, key=key, chain=chain, key_uri=config.key,
                    pin_file=config.pin_file, signer=Operator(key, chain[0]),
                    server_ctx=server_ctx, client_ctx=client_ctx)


def secure_data_dir(path: Path) -> None:
    """The data directory exists, is ours and is no one else's to write (the store, the
    control socket and the blobs live there). Read access for others is taken away; write
    access for others means someone may have changed it already: refuse to start."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.stat()
    if st.st_uid != os.geteuid():
        raise ExchangedError(f"the data directory {path} belongs to uid {st.st_uid}, not to "
                             f"this service's user (uid {os.geteuid()}): chown it",
                             code="unsafe-mode")
    if st.st_mode & 0o022:
        raise ExchangedError(f"the data directory {path} is writable by its group or by others "
                             f"(mode {stat.S_IMODE(st.st_mode):o}): someone may have changed "
                             f"the store; check it, then chmod 700 {path}", code="unsafe-mode")
    if st.st_mode & 0o077:
        path.chmod(0o700)
    names = ["node.db", "node.db-wal", "node.db-shm", "blobs", "crls"]
    if (path / "blobs").is_dir():  # its shards (at most 256): made by a restore, say, with cp
        names += [f"blobs/{e.name}" for e in os.scandir(path / "blobs") if e.is_dir()]
    for name in names:
        p = path / name
        if p.exists() and not p.is_symlink() and p.stat().st_mode & 0o077:
            p.chmod(0o700 if p.is_dir() else 0o600)



def describe(e: BaseException) -> str:
    """What went wrong, never an empty string: trio's BrokenResourceError says nothing itself;
    the SSL error that caused it does (e.g. "certificate verify failed")."""
    return str(e) or (f"{type(e).__name__}: {describe(e.__cause__)}" if e.__cause__
                      else type(e).__name__)
