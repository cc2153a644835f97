#!/usr/bin/env python3
"""A province on one machine: N units' daemons on loopback, traffic, faults, and the invariants.

Each unit has its own SoftHSM token, its node certificate issued by one CA through the CA's own
commands (`exchanged ca request submit/approve`, `ca issue`), its own `exchanged serve` daemon
and data directory. Units peer with a few others (a ring and random chords, from --seed), each
link configured on both sides (A13); every link runs through a fault-injecting TCP proxy of
this script (each node's `[peers.X] address` is the proxy for that link). While documents flow
(`exchanged send` between random peers: some urgent, some extra-urgent, a few of several MB),
faults are injected and logged with their times: partitions (refused, or silently dropped),
flapping links, connections reset mid-transfer, daemons SIGKILLed and restarted, one node's
certificate revoked (CA revoke, a new CRL on the CA's publication point, which nodes fetch and
gossip), one node's token pulled out and put back (`p11-kit server` in front of SoftHSM), one
node's disk nearly full (a small tmpfs as its data directory, filled), and the direct link
between two units cut, so that their documents go through the neighbour they both relay
through (`[relay]`).

Then the faults end, queues drain (bounded), everything is stopped, and the outcome is judged
from the nodes' own stores, read after their daemons stopped: every document sent is delivered
exactly once with a delivery receipt that verifies (exchanged.receipts, against the CA), or
refused with a reason, or still queued with a reason; lost and duplicated must be 0; the
package in the recipient's blob store verifies against the original sender's certificate
(exchanged.package.check); every node's audit chain verifies (`exchanged audit verify`); every
node took the CRL revoking the revoked node within a stated time. A table (or --json), a PNG,
and a non-zero exit when an invariant fails.

`--break ack-without-store` runs the daemons through tools/sim_break.py, which acknowledges
some documents without storing them: the run must then fail with lost > 0.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import glob
import json
import math
import os
import random
import re
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
sys.path.insert(0, str(TOOLS))
from demo_network import EXCHANGED, Demo, free_port  # noqa: E402

P11_CLIENT = next(iter(sorted(glob.glob("/usr/lib/*/pkcs11/p11-kit-client.so"))), "")
SOFTHSM = next(iter(sorted(glob.glob("/usr/lib/softhsm/libsofthsm2.so") +
                           glob.glob("/usr/lib/*/softhsm/libsofthsm2.so"))), "")
FAULTS = ("partition", "flap", "reset", "kill", "revoke", "token", "disk", "relay")
URGENCIES = ("normal", "urgent", "extra-urgent")
RANK = {"extra-urgent": 0, "urgent": 1, "normal": 2}
MIB = 1 << 20
# SoftHSM's file store, read by many processes while others write a token, now and then
# answers C_GetSlotList with CKR_GENERAL_ERROR or leaves a token out of the list: a command
# that fails so before doing anything is run again.
SOFTHSM_GLITCHES = ("GeneralError", "no token matches")
HOP_ONLY = "hop-only"  # a relayed document's sender holds the relay's hop record only


def relay_supported() -> bool:
    from exchanged.node import config
    return hasattr(config, "RelaySettings")


STARTED = time.monotonic()


def log(msg: str) -> None:
    print(f"simulate [{time.monotonic() - STARTED:5.0f} s]: {msg}", file=sys.stderr, flush=True)


@dataclass
class Unit:
    id: str  # the unit id, e.g. u07
    index: int
    port: int  # where its daemon listens (the proxies connect there)
    peers: list[str] = field(default_factory=list)
    serial: str = ""
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)  # extra environment of its daemon
    card: subprocess.Popen[bytes] | None = None  # p11-kit server in front of its token
    tmpfs: Path | None = None  # its data directory, when it is a small tmpfs
    relay_through: list[str] = field(default_factory=list)
    relay_for: list[str] = field(default_factory=list)
    start_retries: int = 0
    # held from a SIGKILL until the daemon is up again: a second kill of the same unit waits,
    # or it would kill the restarting daemon and the first restart would find it gone
    restarting: trio.Lock = field(default_factory=trio.Lock)

    @property
    def token(self) -> str:
        return f"{self.id}-node"

    @property
    def cn(self) -> str:
        return self.id  # a node certificate's CN is the unit id it speaks for

    @property
    def org(self) -> str:
        return f"Unit {self.id[1:]} Office"


class Link:
    """One link between two units, both directions, each through its own proxy listener."""

    def __init__(self, a: str, b: str) -> None:
        self.a, self.b = a, b
        self.mode = "up"  # up | refuse (connections reset at once) | drop (held, silent)
        self.reset_after: int | None = None  # new connections are cut after this many bytes
        self.scopes: set[trio.CancelScope] = set()
        self.stats: Counter[str] = Counter()

    @property
    def name(self) -> str:
        return f"{self.a}-{self.b}"

    def cut(self) -> None:
        for cs in list(self.scopes):
            cs.cancel()


@dataclass
class Event:
    t: float  # seconds since traffic started
    kind: str
    target: str
    detail: str = ""


@dataclass
class Sent:
    t: float
    sender: str
    to: str
    urgency: str
    size: int
    doc_id: str = ""
    error: str = ""
    relay: bool = False  # meant to go through a relay (its direct link was cut)
    division: str = ""  # addressed to this division of the recipient


def _rst(stream: trio.SocketStream) -> None:
    """Close with a TCP reset, as a dying link does."""
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class Province(Demo):
    """The units, their CA, tokens, configurations and daemons (the demo's code paths)."""

    def __init__(self, work: Path, args: argparse.Namespace) -> None:
        super().__init__(work)
        self.args = args
        self.rng = random.Random(args.seed)
        self.units: dict[str, Unit] = {}
        self.links: dict[frozenset[str], Link] = {}
        self.proxy_port: dict[tuple[str, str], int] = {}  # (from, to) -> proxy port
        self.events: list[Event] = []
        self.sent: list[Sent] = []
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.t0 = 0.0
        self.procs: list[subprocess.Popen[bytes]] = []  # everything started, for the end
        self.mounts: list[Path] = []
        self.ports: set[int] = set()
        self.person_ids: dict[str, str] = {}
        self.revoked: str | None = None
        self.revoked_at: float | None = None  # wall time the CRL listing it was published
        self.revoked_crl: int | None = None
        self.notes: list[str] = []  # what could not be done, said in the output
        self.traffic_done = False
        self.relay_units: list[str] = []  # A, B (the relay), C
        self.files: list[tuple[Path, Path, int]] = []
        self.nursery: trio.Nursery | None = None
        self.rss_peak_mib = 0.0  # the daemons' resident memory in all, highest sample
        self.faults = set(FAULTS) if args.faults == "all" else \
            set() if args.faults == "none" else set(args.faults.split(","))
        if args.break_ == "ack-without-store":
            self.exchanged = [sys.executable, str(TOOLS / "sim_break.py")]
        else:
            self.exchanged = list(EXCHANGED)

    # -- setup ---------------------------------------------------------------------------------

    def port(self) -> int:
        while (p := free_port()) in self.ports:
            pass
        self.ports.add(p)
        return p

    def run(self, argv: list[str], *, ok: bool | None = True, quiet: bool = False) -> str:
        """Demo.run, quiet, run again on a SOFTHSM_GLITCHES failure."""
        for attempt in range(5):
            p = subprocess.run(argv, cwd=self.work, env=self.env, capture_output=True,
                               text=True)
            out = (p.stdout + p.stderr).rstrip()
            if p.returncode == 0 or not any(m in out for m in SOFTHSM_GLITCHES):
                break
            time.sleep(0.5 + attempt)
        if ok and p.returncode != 0:
            raise SystemExit(f"simulate: step failed: {' '.join(argv)}\n{out}")
        if ok is False and p.returncode == 0:
            raise SystemExit(f"simulate: this should have failed: {' '.join(argv)}")
        return out

    def person_id(self, name: str) -> str:
        if name not in self.person_ids:
            self.person_ids[name] = super().person_id(name)
        return self.person_ids[name]

    def topology(self) -> None:
        n = self.args.units
        ids = [f"u{i:02d}" for i in range(1, n + 1)]
        for i, u in enumerate(ids):
            self.units[u] = Unit(u, i, self.port())
        pairs = {frozenset((ids[i], ids[(i + 1) % n])) for i in range(n)} if n > 1 else set()
        chords = n // 2 if n > 4 else 0
        tries = 0
        while chords and tries < 1000:
            tries += 1
            a, b = self.rng.sample(ids, 2)
            if frozenset((a, b)) not in pairs:
                pairs.add(frozenset((a, b)))
                chords -= 1
        self.relay_units = []
        if n >= 5 and "relay" in self.faults:
            if relay_supported():
                # A relay B between A and C, its ring neighbours, which also have a direct
                # link (cut during the run): A and C relay through B, B relays for both.
                i = self.rng.randrange(n)
                a_, b_, c_ = ids[i - 1], ids[i], ids[(i + 1) % n]
                pairs.add(frozenset((a_, c_)))
                self.relay_units = [a_, b_, c_]
                self.units[a_].relay_through = [b_]
                self.units[c_].relay_through = [b_]
                self.units[b_].relay_for = [a_, c_]
            else:
                self.notes.append("relay left out: this exchanged has no [relay] yet")
        for pair in sorted(pairs, key=sorted):
            a, b = sorted(pair)
            self.links[pair] = Link(a, b)
            self.units[a].peers.append(b)
            self.units[b].peers.append(a)
            self.proxy_port[(a, b)] = self.port()
            self.proxy_port[(b, a)] = self.port()

    def choose_roles(self) -> dict[str, str]:
        """Which unit suffers which single-node fault (distinct units where there are
        enough)."""
        ids = sorted(self.units)
        pool = [u for u in ids if u not in self.relay_units]
        self.rng.shuffle(pool)
        roles: dict[str, str] = {}
        for fault in ("revoke", "token", "disk"):
            if fault in self.faults and pool:
                roles[fault] = pool.pop()
        return roles

    def setup(self) -> None:
        a = self.args
        self.topology()
        self.roles = self.choose_roles()
        labels = ["ca", "admin", "officer", "auditor", *(u.token for u in self.units.values())]
        log(f"{len(labels)} SoftHSM tokens, the CA, {len(self.units)} node certificates "
            f"(work directory {self.work})")
        out = self.run(["bash", str(ROOT / "softhsm-setup.sh"), str(self.tok), *labels],
                       quiet=True)
        self.env["SOFTHSM2_CONF"] = re.search(r"SOFTHSM2_CONF=(\S+)", out).group(1)  # type: ignore[union-attr]
        self.init_ca("Province Root CA")
        # Keys and certificates: each unit's key on its own token, its request approved by the
        # officer and issued by the CA (the CA's commands wait for each other on ca.db).
        with contextlib.redirect_stdout(sys.stderr), ThreadPoolExecutor(3) as pool:
            serials = pool.map(lambda u: self.issue(u.token, "node", u.cn, u.org, "--ip",
                                                    "127.0.0.1"), list(self.units.values()))
            for u, serial in zip(self.units.values(), serials, strict=True):
                u.serial = serial
        if "disk" in self.roles:
            self.mount_small_disk(self.units[self.roles["disk"]])
        if "token" in self.roles:
            if P11_CLIENT and SOFTHSM:
                self.card_insert(self.units[self.roles["token"]])
            else:
                self.notes.append("token fault left out: p11-kit-client.so or SoftHSM not found")
                del self.roles["token"]
        for u in self.units.values():
            self.configure(u)
        names = sorted(lk.name for lk in self.links.values())
        log(f"topology: {len(self.links)} links ({', '.join(names)})")
        del a

    def configure(self, u: Unit) -> None:
        peers = {p: (self.proxy_port[(u.id, p)], self.units[p].cn, self.units[p].org)
                 for p in u.peers}
        with contextlib.redirect_stdout(sys.stderr):
            cfg = self.config(u.id, u.org, u.token, u.port, peers)
        text = cfg.read_text()
        # CRLs fetched from the publication point and compared with peers often, so that a
        # revocation reaches everyone within the run.
        text = text.replace("[limits]\n", "crl_refresh = 20\ncrl_gossip = 15\n\n[limits]\n")
        if u.tmpfs is not None:  # its small disk: a sender hears "busy" below 16 MiB free
            text = text.replace("[limits]\n", "[limits]\ndisk_reserve_bytes = 16777216\n")
        if u.card is not None:
            text = text.replace("[pkcs11]\n", f'[pkcs11]\nmodule = "{P11_CLIENT}"\n')
            u.env["P11_KIT_SERVER_ADDRESS"] = f"unix:path={self.card_socket(u)}"
        if u.relay_through or u.relay_for:
            text += ("\n[relay]\n" + f"through = {json.dumps(u.relay_through)}\n"
                     f"for = {json.dumps(u.relay_for)}\nafter = {self.args.relay_after}\n")
        cfg.write_text(text)

    def mount_small_disk(self, u: Unit) -> None:
        data = self.work / u.id / "data"
        data.mkdir(parents=True, exist_ok=True)
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs",
                            str(data)], capture_output=True, text=True)
        if p.returncode != 0:
            self.notes.append(f"disk fault left out: cannot mount a tmpfs for {u.id} "
                              f"({(p.stderr or p.stdout).strip()})")
            del self.roles["disk"]
            return
        self.mounts.append(data)
        u.tmpfs = data

    # -- the token that comes and goes ---------------------------------------------------------

    def card_socket(self, u: Unit) -> Path:
        return self.work / u.id / "p11kit.sock"

    def card_insert(self, u: Unit) -> None:
        sock = self.card_socket(u)
        sock.parent.mkdir(parents=True, exist_ok=True)
        with open(self.work / u.id / "p11kit.log", "ab") as out:
            u.card = subprocess.Popen(
                ["p11-kit", "server", "-f", "-n", str(sock), "--provider", SOFTHSM,
                 f"pkcs11:token={u.token}"], env=self.env, stdout=out, stderr=out,
                start_new_session=True)
        self.procs.append(u.card)
        deadline = time.monotonic() + 20
        while not sock.exists():
            if time.monotonic() > deadline:
                raise SystemExit(f"simulate: p11-kit server for {u.id} did not start")
            time.sleep(0.1)

    def card_pull(self, u: Unit) -> None:
        if u.card is not None:
            _killpg(u.card, signal.SIGTERM)
            u.card = None
        self.card_socket(u).unlink(missing_ok=True)

    # -- daemons -------------------------------------------------------------------------------

    def cfg(self, unit: str) -> str:
        return str(self.work / unit / "exchanged.toml")

    def db_path(self, unit: str) -> Path:
        return self.work / unit / "data" / "node.db"

    def start_daemon(self, u: Unit) -> None:
        with open(self.work / u.id / "daemon.log", "ab") as out:
            u.proc = subprocess.Popen(self.exchanged + ["serve", "--config", self.cfg(u.id)],
                                      cwd=self.work, env={**self.env, **u.env}, stdout=out,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(u.proc)

    def ready(self, u: Unit) -> bool:
        if u.proc is None or u.proc.poll() is not None:
            tail = (self.work / u.id / "daemon.log").read_text(errors="replace")[-2000:]
            # SOFTHSM_GLITCHES at start-up: the daemon says so and exits. Started again, it
            # comes up; the run notes each time.
            last = "\n".join(tail.splitlines()[-5:])
            if any(m in last for m in SOFTHSM_GLITCHES) and u.start_retries < 3:
                u.start_retries += 1
                self.notes.append(f"{u.id}'s daemon exited at start-up: SoftHSM did not "
                                  "list its token (a concurrent read); started again")
                self.start_daemon(u)
                return False
            raise SystemExit(f"simulate: the {u.id} daemon exited; see {self.work / u.id}/"
                             "daemon.log:\n" + tail)
        if not (self.work / u.id / "data" / "control.sock").exists():
            return False
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", u.port)) == 0

    def kill(self, u: Unit) -> None:
        if u.proc is not None and u.proc.poll() is None:
            _killpg(u.proc, signal.SIGKILL)

    def stop_daemons(self) -> None:
        live = [u for u in self.units.values() if u.proc is not None and u.proc.poll() is None]
        for u in live:
            _killpg(u.proc, signal.SIGTERM)  # type: ignore[arg-type]
        deadline = time.monotonic() + 30
        for u in live:
            try:
                u.proc.wait(max(0.1, deadline - time.monotonic()))  # type: ignore[union-attr]
            except subprocess.TimeoutExpired:
                _killpg(u.proc, signal.SIGKILL)  # type: ignore[arg-type]
                self.notes.append(f"{u.id}'s daemon did not stop on SIGTERM within 30 s")

    def cleanup(self) -> None:
        """Stop everything this run started; unmount what it mounted."""
        for p in self.procs:
            if p.poll() is None:
                _killpg(p, signal.SIGKILL)
        for p in self.procs:
            with contextlib.suppress(Exception):
                p.wait(5)
        for m in self.mounts:
            r = subprocess.run(["umount", str(m)], capture_output=True, text=True)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", str(m)], capture_output=True)
        self.mounts.clear()

    # -- reading the stores (read-only) --------------------------------------------------------

    def read(self, unit: str, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        path = self.db_path(unit)
        if not path.exists():
            return []
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        conn.row_factory = sqlite3.Row
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def queue_depths(self) -> dict[str, int]:
        depths = {}
        for unit in self.units:
            try:
                rows = self.read(unit, "SELECT count(*) FROM outbox WHERE state IN "
                                 "('queued', 'sending')")
                depths[unit] = int(rows[0][0]) if rows else 0
            except sqlite3.Error:
                depths[unit] = -1
        return depths

    def rss_mib(self) -> float:
        """The daemons' resident memory now, in all (MiB)."""
        total = 0
        for u in self.units.values():
            if u.proc is None:
                continue
            with contextlib.suppress(OSError, ValueError, IndexError):
                for line in Path(f"/proc/{u.proc.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):  # a zombie (killed, not reaped) has none
                        total += int(line.split()[1])
        return round(total / 1024, 1)

    def pending(self) -> int:
        """Documents still to go that can go: not from or to the revoked node."""
        n = 0
        for unit in self.units:
            if unit == self.revoked:
                continue
            with contextlib.suppress(sqlite3.Error):
                n += int(self.read(unit, "SELECT count(*) FROM outbox WHERE state IN "
                                   "('queued', 'sending') AND recipient != ?",
                                   (self.revoked or "",))[0][0])
        return n

    def note(self, kind: str, target: str, detail: str = "") -> None:
        e = Event(round(time.time() - self.t0, 1), kind, target, detail)
        self.events.append(e)
        log(f"t={e.t:6.1f}s  {kind:<14} {target} {detail}")


def _killpg(p: subprocess.Popen[bytes], sig: int) -> None:
    """Signal `p`'s process group (it leads one: started with start_new_session), else `p`."""
    try:
        if os.getpgid(p.pid) == p.pid:
            os.killpg(p.pid, sig)
            return
    except (ProcessLookupError, PermissionError):
        pass
    with contextlib.suppress(ProcessLookupError):
        p.send_signal(sig)


# -- the proxies ---------------------------------------------------------------------------------

async def proxy(sim: Province, link: Link, listen: int, target: int,
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    listeners = await trio.open_tcp_listeners(listen, host="127.0.0.1")
    task_status.started()
    await trio.serve_listeners(partial(_carry, link, target), listeners)


async def _carry(link: Link, target: int, client: trio.SocketStream) -> None:
    upstream: trio.SocketStream | None = None
    try:
        if link.mode == "refuse":
            link.stats["refused"] += 1
            _rst(client)
            return
        if link.mode == "drop":  # accepted, then silence until the link heals
            link.stats["dropped"] += 1
            while link.mode == "drop":  # noqa: ASYNC110 — a mode, polled
                await trio.sleep(0.5)
            _rst(client)
            return
        try:
            upstream = await trio.open_tcp_stream("127.0.0.1", target)
        except OSError:
            _rst(client)
            return
        limit = link.reset_after
        carried = [0]
        with trio.CancelScope() as cs:
            link.scopes.add(cs)
            try:
                async with trio.open_nursery() as n:
                    n.start_soon(_pump, client, upstream, carried, limit, cs, link)
                    n.start_soon(_pump, upstream, client, carried, limit, cs, link)
            finally:
                link.scopes.discard(cs)
        if cs.cancelled_caught:
            _rst(client)
            _rst(upstream)
    finally:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(client)
            if upstream is not None:
                await trio.aclose_forcefully(upstream)


async def _pump(src: trio.SocketStream, dst: trio.SocketStream, carried: list[int],
                limit: int | None, cs: trio.CancelScope, link: Link) -> None:
    try:
        while True:
            data = await src.receive_some(65536)
            if not data:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError,
                                         OSError):
                    await dst.send_eof()
                return
            carried[0] += len(data)
            if limit is not None and carried[0] >= limit:
                link.stats["reset"] += 1
                cs.cancel()
                return
            await dst.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        cs.cancel()


# -- the run -------------------------------------------------------------------------------------

def make_files(sim: Province) -> list[tuple[Path, Path, int]]:
    """PDFs (judged by content: %PDF- at the start, %%EOF at the end) and editable text files:
    small ones of a few KB, and two of several MB."""
    d = sim.work / "files"
    d.mkdir(exist_ok=True)
    out = []
    sizes = [2_000, 6_000, 15_000, 40_000, 90_000, 2 * MIB, 4 * MIB]
    for i, size in enumerate(sizes):
        pdf, txt = d / f"doc{i}.pdf", d / f"doc{i}.txt"
        filler = base64.b64encode(os.urandom(size * 3 // 4))
        body = b"\n".join(b"%" + filler[j:j + 76] for j in range(0, len(filler), 76))
        pdf.write_bytes(b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\n" + body +
                        b"\ntrailer<</Root 1 0 R>>\n%%EOF\n")
        txt.write_text(f"Document form {i}: notice to the units of the province.\n" * 20)
        out.append((pdf, txt, pdf.stat().st_size + txt.stat().st_size))
    return out


async def send_one(sim: Province, s: Sent, files: tuple[Path, Path, int]) -> None:
    pdf, txt, _ = files
    argv = sim.exchanged + ["send", "--config", sim.cfg(s.sender), "--to", s.to, "--title",
                            f"Notice {len(sim.sent)} from {s.sender}", "--pdf", str(pdf),
                            "--editable", str(txt), "--urgency", s.urgency, "--json"]
    if s.division:
        argv += ["--division", s.division]
    p = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False,
                               env=sim.env, cwd=sim.work)
    if p.returncode == 0:
        s.doc_id = json.loads(p.stdout)["doc_id"]
    else:
        s.error = (p.stderr.decode(errors="replace").strip().splitlines() or ["?"])[-1]
        s.error = s.error.removeprefix("exchanged: error: ")


async def traffic(sim: Province, files: list[tuple[Path, Path, int]]) -> None:
    a = sim.args
    rng = random.Random(a.seed + 1)
    # At most three sends at once: when they lag (a loaded machine), the traffic slows down
    # rather than piling up sends past its end.
    slots = trio.Semaphore(3)
    large_every = max(20.0, a.seconds / 5)
    next_large = large_every / 2
    units = sorted(sim.units)
    async with trio.open_nursery() as n:
        while True:
            await slots.acquire()
            t = time.time() - sim.t0
            if t >= a.seconds:
                slots.release()
                break
            sender = rng.choice(units)
            to = rng.choice(sim.units[sender].peers)
            urgency = rng.choices(URGENCIES, weights=(70, 20, 10))[0]
            if t >= next_large and not a.no_large:
                f = files[rng.choice((5, 6))]
                next_large += large_every
            else:
                f = files[rng.randrange(5)]
            s = Sent(round(t, 2), sender, to, urgency, f[2])
            if rng.random() < a.misaddressed:  # to a division the recipient does not have
                s.division = "Division of Lost Letters"
            sim.sent.append(s)

            async def go(s: Sent = s, f: tuple[Path, Path, int] = f) -> None:
                try:
                    await send_one(sim, s, f)
                finally:
                    slots.release()
            n.start_soon(go)
            await trio.sleep(rng.expovariate(a.rate))
    sim.traffic_done = True


async def sampler(sim: Province) -> None:
    while True:
        depths = await trio.to_thread.run_sync(sim.queue_depths)
        sim.samples.append((round(time.time() - sim.t0, 1), depths))
        sim.rss_peak_mib = max(sim.rss_peak_mib, await trio.to_thread.run_sync(sim.rss_mib))
        await trio.sleep(sim.args.sample)


async def restart(sim: Province, u: Unit) -> None:
    sim.start_daemon(u)
    with trio.move_on_after(60):
        while not sim.ready(u):  # noqa: ASYNC110 — a socket that appears, polled
            await trio.sleep(0.3)
        sim.note("restarted", u.id)
        return
    sim.note("restart-slow", u.id, "not ready within 60 s")


async def faults(sim: Province) -> None:
    """The fault schedule, spread over the traffic period, deterministic from --seed."""
    a = sim.args
    S = a.seconds
    rng = random.Random(a.seed + 2)
    links = sorted(sim.links.values(), key=lambda x: x.name)
    special = set(sim.roles.values()) | set(sim.relay_units)
    plain_links = [lk for lk in links if not ({lk.a, lk.b} & set(sim.relay_units))] or links
    plan: list[tuple[float, Any]] = []

    def at(frac: float, fn: Any) -> None:
        plan.append((frac * S, fn))

    if "partition" in sim.faults and links:
        for frac, mode, dur in ((0.08, "refuse", min(45.0, 0.2 * S)),
                                (0.45, "drop", min(40.0, 0.2 * S))):
            lk = rng.choice(plain_links)
            at(frac, partial(partition, sim, lk, mode, dur))
    if "flap" in sim.faults and links:
        lk = rng.choice(plain_links)
        at(0.22, partial(flap, sim, lk, min(60.0, 0.25 * S)))
    if "reset" in sim.faults and links:
        for frac in (0.12, 0.4, 0.65):
            lk = rng.choice(plain_links)
            at(frac, partial(resets, sim, lk, rng.randrange(3_000, 400_000),
                             min(40.0, 0.2 * S)))
    if "kill" in sim.faults:
        victims = [u for u in sorted(sim.units) if u not in special] or sorted(sim.units)
        for frac in (0.18, 0.5, 0.72):
            u = sim.units[rng.choice(victims)]
            at(frac, partial(kill, sim, u, min(10.0, 0.1 * S)))
    if "token" in sim.roles:
        at(0.3, partial(token, sim, sim.units[sim.roles["token"]], min(25.0, 0.15 * S)))
    if "disk" in sim.roles:
        at(0.35, partial(disk, sim, sim.units[sim.roles["disk"]], min(40.0, 0.2 * S)))
    if "revoke" in sim.roles:
        at(0.45, partial(revoke, sim, sim.units[sim.roles["revoke"]]))
    if sim.relay_units:
        at(0.04, partial(relay_cut, sim, min(S * 0.7, max(S * 0.5, 3 * a.relay_after))))
    plan.sort(key=lambda x: x[0])
    async with trio.open_nursery() as n:
        for when, fn in plan:
            await trio.sleep(max(0.0, sim.t0 + when - time.time()))
            n.start_soon(fn)


async def partition(sim: Province, lk: Link, mode: str, dur: float) -> None:
    lk.mode = mode
    lk.cut()
    sim.note("partition", lk.name, f"{mode} for {dur:.0f} s")
    send_into(sim, lk.a, lk.b)
    await trio.sleep(dur)
    lk.mode = "up"
    sim.note("heal", lk.name)


async def relay_cut(sim: Province, dur: float) -> None:
    """The direct link between the relay's two units is cut; documents between them wait
    `after` seconds, then go through the relay; the link comes back while some may still be
    at the relay."""
    a, b, c = sim.relay_units
    lk = sim.links[frozenset((a, c))]
    lk.mode = "refuse"
    lk.cut()
    sim.note("relay-cut", lk.name, f"for {dur:.0f} s; relay {b}")
    end = time.time() + dur
    async with trio.open_nursery() as n:
        k = 0
        while time.time() < end:
            src, dst = (a, c) if k % 2 == 0 else (c, a)
            n.start_soon(extra_send, sim, src, dst, True)
            k += 1
            await trio.sleep(max(2.0, dur / 8))
        lk.mode = "up"
        sim.note("relay-heal", lk.name)


def send_into(sim: Province, *args: Any) -> None:
    assert sim.nursery is not None
    sim.nursery.start_soon(extra_send, sim, *args)


async def extra_send(sim: Province, sender: str, to: str, relay: bool = False,
                     large: bool = False) -> None:
    """A document sent because of a fault: so that the fault meets traffic."""
    f = sim.files[6 if large else 1]
    s = Sent(round(time.time() - sim.t0, 2), sender, to, "normal", f[2], relay=relay)
    sim.sent.append(s)
    await send_one(sim, s, f)


async def flap(sim: Province, lk: Link, dur: float) -> None:
    sim.note("flap", lk.name, f"down 3 s / up 4 s for {dur:.0f} s")
    end = time.time() + dur
    while time.time() < end:
        lk.mode = "refuse"
        lk.cut()
        await trio.sleep(3)
        lk.mode = "up"
        await trio.sleep(4)
    sim.note("flap-end", lk.name)


async def resets(sim: Province, lk: Link, after: int, dur: float) -> None:
    lk.reset_after = after
    lk.cut()  # kept connections too: the next ones are cut mid-transfer
    sim.note("reset", lk.name, f"connections cut after {after} bytes, for {dur:.0f} s")
    await trio.sleep(dur)
    lk.reset_after = None
    sim.note("reset-end", lk.name)


async def kill(sim: Province, u: Unit, down: float) -> None:
    async with u.restarting:
        sim.kill(u)
        sim.note("sigkill", u.id)
        await trio.sleep(down)
        await restart(sim, u)


async def token(sim: Province, u: Unit, dur: float) -> None:
    sim.card_pull(u)
    sim.note("token-out", u.id)
    send_into(sim, u.peers[0], u.id)
    send_into(sim, u.id, u.peers[0])  # refused at once: no key to sign
    await trio.sleep(dur)
    await trio.to_thread.run_sync(sim.card_insert, u)
    sim.note("token-in", u.id)


async def disk(sim: Province, u: Unit, dur: float) -> None:
    assert u.tmpfs is not None
    st = os.statvfs(u.tmpfs)
    free = st.f_bavail * st.f_frsize
    filler = u.tmpfs / "filler"
    size = max(0, free - 4 * MIB)

    def fill() -> None:
        with open(filler, "wb") as f, contextlib.suppress(OSError):
            os.posix_fallocate(f.fileno(), 0, size)
    await trio.to_thread.run_sync(fill)
    sim.note("disk-full", u.id, f"{size // MIB} MiB filled, 4 MiB left (reserve 16 MiB)")
    send_into(sim, u.peers[0], u.id, False, True)
    send_into(sim, u.peers[-1], u.id)
    await trio.sleep(dur)
    filler.unlink(missing_ok=True)
    sim.note("disk-freed", u.id)


async def revoke(sim: Province, u: Unit) -> None:
    def do() -> int:
        sim.x("ca", "revoke", "--dir", "ca", u.serial, "--reason", "keyCompromise",
              *sim.op("officer"), quiet=True)
        out = sim.x("ca", "crl", "--dir", "ca", "--ca-pin-file", sim.pin("ca"), quiet=True)
        return int(re.search(r"CRL number (\d+)", out).group(1))  # type: ignore[union-attr]
    number = await trio.to_thread.run_sync(do)
    sim.revoked, sim.revoked_at, sim.revoked_crl = u.id, time.time(), number
    sim.note("revoked", u.id, f"serial {u.serial}, CRL number {number} published")


async def run(sim: Province) -> None:
    a = sim.args
    files = sim.files = make_files(sim)
    async with trio.open_nursery() as n:
        for (src, dst), port in sorted(sim.proxy_port.items()):
            await n.start(proxy, sim, sim.links[frozenset((src, dst))], port,
                          sim.units[dst].port)
        log("starting the CA's publication point and the daemons")
        with contextlib.redirect_stdout(sys.stderr):
            sim.serve_ca()
        sim.procs.append(sim.daemons["ca"])
        for u in sim.units.values():
            sim.start_daemon(u)
            await trio.sleep(0.1)
        with trio.fail_after(60 + 3 * len(sim.units)):
            for u in sim.units.values():
                while not sim.ready(u):  # noqa: ASYNC110 — a socket that appears, polled
                    await trio.sleep(0.3)
        sim.t0 = time.time()
        log(f"{len(sim.units)} daemons up; traffic for {a.seconds} s")
        n.start_soon(sampler, sim)
        sim.nursery = n  # documents sent into faults
        async with trio.open_nursery() as m:
            m.start_soon(traffic, sim, files)
            m.start_soon(faults, sim)
        # Every fault has ended (each heals itself). Drain, bounded.
        sim.note("drain", "all", f"up to {a.drain} s")
        for u in sim.units.values():
            if u.proc is None or u.proc.poll() is not None:
                await restart(sim, u)
        end = time.time() + a.drain
        while time.time() < end:
            left = await trio.to_thread.run_sync(sim.pending)
            # ... and the revocation must have reached every node (it may come late in a
            # short run on a loaded machine): the judgement reads when each took it.
            unaware = (await trio.to_thread.run_sync(judge_revocation, sim)
                       )["revocation_not_refused_by"] if sim.revoked else []
            if not left and not unaware:
                break
            await trio.sleep(2)
        # The revocation must have reached everyone; wait for it within the drain too.
        sim.note("stop", "all")
        n.cancel_scope.cancel()


# -- judging -------------------------------------------------------------------------------------

def judge(sim: Province) -> dict[str, Any]:
    from cryptography import x509

    from exchanged import package as pkg
    from exchanged import receipts

    ca_cert = x509.load_pem_x509_certificate((sim.work / "ca" / "ca.pem").read_bytes())
    certs = {u: x509.load_pem_x509_certificate((sim.work / f"{sim.units[u].token}.pem")
                                               .read_bytes()) for u in sim.units}
    outbox = {u: {r["doc_id"]: dict(r) for r in sim.read(u, "SELECT * FROM outbox")}
              for u in sim.units}
    inbox: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for u in sim.units:
        for r in sim.read(u, "SELECT * FROM inbox"):
            inbox.setdefault(r["doc_id"], []).append((u, dict(r)))
    res: dict[str, Any] = {"units": len(sim.units), "links": len(sim.links),
                           "seconds": sim.args.seconds, "seed": sim.args.seed}
    sent = [s for s in sim.sent if s.doc_id]
    not_sent = [s for s in sim.sent if not s.doc_id]
    res["attempted"] = len(sim.sent)
    res["sent"] = len(sent)
    res["send_refused"] = len(not_sent)
    res["send_refused_reasons"] = dict(Counter(_reason(s.error) for s in not_sent)
                                       .most_common())
    counts: Counter[str] = Counter()
    refused: Counter[str] = Counter()
    queued: Counter[str] = Counter()
    retried: Counter[str] = Counter()  # delivered in the end: the last failure before
    problems: list[str] = []
    latency: dict[str, list[float]] = {u: [] for u in URGENCIES}
    relayed = relayed_ok = 0
    for s in sent:
        row = outbox[s.sender].get(s.doc_id)
        copies = inbox.get(s.doc_id, [])
        if len(copies) > 1:
            counts["duplicated"] += len(copies) - 1
            problems.append(f"{s.doc_id} from {s.sender}: {len(copies)} copies "
                            f"({', '.join(u for u, _ in copies)})")
        if row is None:
            counts["lost"] += 1
            problems.append(f"{s.doc_id}: accepted by {s.sender}'s send, not in its outbox")
            continue
        stored = [r for u, r in copies if u == s.to]
        if row["state"] in ("delivered", "signed-for", "returned"):
            if not stored:
                counts["lost"] += 1
                problems.append(f"{s.doc_id} {s.sender}->{s.to}: acknowledged, not in "
                                f"{s.to}'s inbox")
                continue
            why = _check_delivered(sim, s, row, stored[0], ca_cert, certs, receipts, pkg)
            if why == HOP_ONLY:  # the relay took it; the recipient's receipt is not back
                counts["queued"] += 1
                queued["relayed and stored at the recipient; the sender holds the relay's hop "
                       "record, the recipient's receipt is not back yet"] += 1
                continue
            if why:
                counts["bad_evidence"] += 1
                problems.append(f"{s.doc_id} {s.sender}->{s.to}: {why}")
                continue
            if len(copies) == 1:
                counts["delivered_once"] += 1
                if row["attempts"]:
                    counts["delivered_after_failures"] += 1
                    retried[_reason(row["last_error"] or "?")] += 1
            if row.get("relay"):
                counts["handed_to_relay"] += 1
            if stored[0].get("relay_path") not in (None, "", "[]"):  # it came the relay's way
                relayed += 1
                why = _check_relayed(s, row, stored[0], ca_cert, certs, receipts)
                if why:
                    problems.append(f"{s.doc_id} {s.sender}->{s.to} relayed: {why}")
                else:
                    relayed_ok += 1
            latency[s.urgency].append(row["delivered_at"] - row["queued_at"])
        elif row["state"] in ("rejected", "failed"):
            counts["refused"] += 1
            refused[_reason(f"{row['reject_code'] or row['state']}: "
                            f"{row['reject_message'] or row['last_error'] or ''}")] += 1
        else:  # queued, sending
            counts["queued"] += 1
            who = "from the revoked node: " if s.sender == sim.revoked else ""
            if stored:
                queued[who + "stored at the recipient, its receipt not back yet"] += 1
            else:
                queued[who + _reason(row["last_error"] or "not tried yet")] += 1
    res["relay_intended"] = sum(1 for s in sent if s.relay)
    res["delivered_after_failures_reasons"] = dict(retried.most_common())
    for k in ("delivered_once", "refused", "queued", "lost", "duplicated", "bad_evidence",
              "handed_to_relay", "delivered_after_failures"):
        res[k] = counts[k]
    res["refused_reasons"] = dict(refused.most_common())
    res["queued_reasons"] = dict(queued.most_common())
    res["relayed"] = relayed
    res["relayed_signatures_ok"] = relayed_ok
    every = sorted(x for v in latency.values() for x in v)
    res["latency_p50_s"] = _pct(every, 50)
    res["latency_p99_s"] = _pct(every, 99)
    res["latency_by_urgency"] = {u: {"n": len(v), "p50_s": _pct(sorted(v), 50),
                                     "p99_s": _pct(sorted(v), 99)}
                                 for u, v in latency.items()}
    res["latency_all_s"] = [round(x, 3) for x in every]
    res["problems"] = problems[:50]
    res["_latency_raw"] = latency
    res.update(judge_revocation(sim))
    return res


def _check_delivered(sim: Province, s: Sent, row: dict[str, Any], stored: dict[str, Any],
                     ca_cert: Any, certs: dict[str, Any], receipts: Any, pkg: Any) -> str:
    """Why the evidence of a delivered document does not hold ('' when it does): the delivery
    receipt verifies against the CA, is by the recipient's node, for this document; the stored
    package is the one sent, and verifies against the original sender's certificate."""
    if not row["delivery_receipt"]:
        return "delivered without a delivery receipt"
    try:
        signer, _, payload = receipts.open_signed(row["delivery_receipt"], ca_cert)
        if payload.get("type") == "relay" and row.get("relay"):
            receipts.check_relay_hop(payload, doc_id=s.doc_id, sha256=row["package_sha256"],
                                     sender=s.sender, recipient=s.to, from_unit=s.sender,
                                     relay_unit=row["relay"])
            return HOP_ONLY if signer == certs[row["relay"]] else "a hop record by another"
        receipts.check_delivery(payload, doc_id=s.doc_id, sha256=row["package_sha256"],
                                sender=s.sender, recipient=s.to)
    except Exception as e:
        return f"the delivery receipt does not hold: {e}"
    if signer != certs[s.to]:
        return f"the delivery receipt is signed by {signer.subject.rfc4514_string()}"
    if stored["package_sha256"] != row["package_sha256"]:
        return "the recipient stored another package than the one sent"
    blob = sim.work / s.to / "data" / "blobs" / row["package_sha256"][:2] / row["package_sha256"]
    try:
        checked = pkg.check(blob, issuer=ca_cert, expected_recipient=s.to)
    except Exception as e:
        return f"the stored package does not verify: {e}"
    if checked.signer != certs[s.sender]:
        return "the stored package is not signed by the sender's node"
    if checked.metadata.doc_id != s.doc_id or checked.metadata.sender != s.sender:
        return "the stored package is another document"
    return ""


def _check_relayed(s: Sent, row: dict[str, Any], stored: dict[str, Any], ca_cert: Any,
                   certs: dict[str, Any], receipts: Any) -> str:
    """A relayed document's path at the recipient: each hop record signed by the node of the
    relay it names (a certificate of our CA), for this document, this content, from the
    sender to the recipient, one hop after the other; the sender handed it to the first."""
    try:
        path = json.loads(stored.get("relay_path") or "[]")
    except ValueError:
        return "its relay_path is not JSON"
    if not path:
        return "no hop records at the recipient"
    before = s.sender
    for n, record in enumerate(path):
        try:
            signer, _, payload = receipts.open_signed(base64.b64decode(record), ca_cert,
                                                      "hop record")
            hop = str(payload.get("node"))
            receipts.check_relay_hop(payload, doc_id=s.doc_id, sha256=row["package_sha256"],
                                     sender=s.sender, recipient=s.to, from_unit=before,
                                     relay_unit=hop)
        except Exception as e:
            return f"hop record {n + 1} does not hold: {e}"
        if hop not in certs or signer != certs[hop]:
            return f"hop record {n + 1} names {hop} but is signed by another"
        before = hop
    if row.get("relay") and before != row["relay"]:
        return f"the sender handed it to {row['relay']}, the path ends at {before}"
    return ""


def judge_revocation(sim: Province) -> dict[str, Any]:
    """When each other node took the CRL that lists the revoked node (its audit log's
    crl-installed entry): from then on it refuses it."""
    if sim.revoked is None or sim.revoked_at is None or sim.revoked_crl is None:
        return {"revoked": None, "revocation_refused_by_all_after_s": None,
                "revocation_refused_by": {}, "revocation_not_refused_by": []}
    took: dict[str, float | None] = {}
    for u in sorted(sim.units):
        if u == sim.revoked:
            continue
        rows = sim.read(u, "SELECT at, object, details FROM audit WHERE action = "
                        "'crl-installed' ORDER BY seq")
        when = None
        for r in rows:
            if int(r["object"]) >= sim.revoked_crl:
                when = dt.datetime.fromisoformat(r["at"].replace("Z", "+00:00")).timestamp()
                break
        took[u] = None if when is None else round(max(0.0, when - sim.revoked_at), 1)
    missing = [u for u, v in took.items() if v is None]
    worst = None if missing or not took else max(v for v in took.values() if v is not None)
    # Besides: the revoked node's neighbours that refused it in the act (their audit logs
    # record a refused connection or document naming the revocation).
    seen = [u for u in sim.units[sim.revoked].peers
            if sim.read(u, "SELECT 1 FROM audit WHERE action != 'crl-installed' AND details "
                        "LIKE '%revoked%' LIMIT 1")]
    return {"revoked": sim.revoked, "revocation_crl": sim.revoked_crl,
            "revocation_refused_by": took, "revocation_not_refused_by": missing,
            "revocation_refused_by_all_after_s": worst,
            "revocation_refusals_seen_at": seen}


def audit_chains(sim: Province) -> dict[str, str]:
    """`exchanged audit verify --node-config` on every node (daemons stopped): '' or why."""
    def one(u: str) -> tuple[str, str]:
        p = subprocess.run(sim.exchanged + ["audit", "verify", "--node-config", sim.cfg(u)],
                           env=sim.env, cwd=sim.work, capture_output=True, text=True)
        return u, "" if p.returncode == 0 else (p.stderr or p.stdout).strip()[-300:]
    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(one, sorted(sim.units)))


def _pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    k = max(0, min(len(values) - 1, math.ceil(p / 100 * len(values)) - 1))
    return round(values[k], 2)


def _reason(text: str) -> str:
    """A reason without the document-specific parts, so that like reasons count together."""
    text = re.sub(r"\b[0-9a-f]{16,}\b", "…", text)
    text = re.sub(r"\b(doc|D)-[\w-]+", "…", text)
    text = re.sub(r"\d+(\.\d+)? ?(s|bytes|seconds)\b", "N \\2", text)
    text = re.sub(r" at 127\.0\.0\.1:\d+", "", text)
    text = re.sub(r"\bu\d{2,}\b", "uNN", text)
    return text[:140]


# -- output --------------------------------------------------------------------------------------

def table(res: dict[str, Any]) -> str:
    rows: list[tuple[str, Any]] = [
        ("units, links", f"{res['units']}, {res['links']}"),
        ("traffic seconds, drain", f"{res['seconds']}, {res['drained_s']} s"),
        ("send attempts", res["attempted"]),
        ("  refused by the sending node", res["send_refused"]),
        *_reasons(res["send_refused_reasons"]),
        ("documents sent", res["sent"]),
        ("delivered exactly once, receipt verified", res["delivered_once"]),
        ("  of which after failed attempts (last failure)", res["delivered_after_failures"]),
        *_reasons(res["delivered_after_failures_reasons"]),
        ("refused with a reason", res["refused"]),
        *_reasons(res["refused_reasons"]),
        ("still queued with a reason", res["queued"]),
        *_reasons(res["queued_reasons"]),
        ("LOST (must be 0)", res["lost"]),
        ("DUPLICATED (must be 0)", res["duplicated"]),
        ("evidence that does not hold (must be 0)", res["bad_evidence"]),
        ("sent while the relay's direct link was cut", res["relay_intended"]),
        ("  handed to the relay by the sender", res["handed_to_relay"]),
        ("  arrived through the relay, hop records and end-to-end signature verified",
         f"{res['relayed_signatures_ok']} of {res['relayed']}"),
        ("audit chains verified", f"{res['audit_chains_verified']} of {res['units']}"),
        ("revoked node", res["revoked"] or "-"),
        ("  refused by every other node after",
         "-" if res["revoked"] is None else
         f"{res['revocation_refused_by_all_after_s']} s (bound {res['revocation_bound_s']} s)"
         if res["revocation_refused_by_all_after_s"] is not None else
         f"NOT by {', '.join(res['revocation_not_refused_by'])}"),
        ("  neighbours seen refusing it (audit)",
         f"{', '.join(res.get('revocation_refusals_seen_at') or []) or '-'}"),
        ("latency p50 / p99, all", f"{res['latency_p50_s']} / {res['latency_p99_s']} s"),
        *((f"  {u} (n={v['n']})", f"{v['p50_s']} / {v['p99_s']} s")
          for u, v in res["latency_by_urgency"].items()),
        ("faults injected", len(res["faults"])),
        ("daemons' resident memory, in all, at most", f"{res['daemons_rss_peak_mib']} MiB"),
        ("wall time", f"{res['wall_s']} s"),
    ]
    width = max(len(str(k)) for k, v in rows if v is not None) + 2
    lines = [f"{str(k):<{width}}{v}" if v is not None else k for k, v in rows]
    if res["failures"]:
        lines += ["", "INVARIANTS FAILED:"] + [f"  {f}" for f in res["failures"]]
    else:
        lines += ["", "every invariant holds"]
    for n in res["notes"]:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def _reasons(reasons: dict[str, int]) -> list[tuple[str, None]]:
    return [(f"    {n:>4} x {k}", None) for k, n in reasons.items()]


def draw(sim: Province, res: dict[str, Any], png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 9), height_ratios=(3, 2),
                                   layout="constrained")
    times = [t for t, _ in sim.samples]
    special = {v: k for k, v in sim.roles.items()}
    if sim.relay_units:
        a_, b_, c_ = sim.relay_units
        special.update({a_: f"via {b_}", b_: "relay", c_: f"via {b_}"})
    for unit in sorted(sim.units):
        ys = [max(0, d.get(unit, 0)) for _, d in sim.samples]
        if unit in special or max(ys, default=0) >= 3:
            ax1.plot(times, ys, lw=1.2, label=f"{unit}" + (f" ({special[unit]})"
                                                            if unit in special else ""))
        else:
            ax1.plot(times, ys, lw=0.5, color="0.7")
    colours = {"partition": "red", "flap": "orange", "reset": "purple", "sigkill": "black",
               "revoked": "blue", "token-out": "green", "disk-full": "brown", "drain": "grey",
               "relay-cut": "teal", "relay-heal": "teal"}
    top = max([max(d.values(), default=0) for _, d in sim.samples] or [1]) or 1
    for e in sim.events:
        if e.kind in colours:
            ax1.axvline(e.t, color=colours[e.kind], lw=0.8, ls="--")
            ax1.text(e.t, top, f" {e.kind} {e.target}", rotation=90, va="top", fontsize=7,
                     color=colours[e.kind])
    ax1.set_xlabel("seconds since traffic started")
    ax1.set_ylabel("documents queued (outbox)")
    ax1.set_title(f"{res['units']} units, {res['sent']} documents sent: queue depth per node; "
                  "dashed: faults")
    if ax1.get_legend_handles_labels()[0]:
        ax1.legend(fontsize=7, ncol=4, loc="upper left")
    data = [[x for x in _latencies(sim, res, u)] for u in URGENCIES]
    bins = [0.05 * 1.25 ** k for k in range(45)]
    for u, d in zip(URGENCIES, data, strict=True):
        if d:
            ax2.hist(d, bins=bins, histtype="step", lw=1.5, label=f"{u} (n={len(d)})")
    ax2.set_xscale("log")
    ax2.set_xlabel("delivery latency, seconds (queued at the sender to delivered)")
    ax2.set_ylabel("documents")
    ax2.set_title(f"latency: p50 {res['latency_p50_s']} s, p99 {res['latency_p99_s']} s")
    ax2.legend(fontsize=8)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _latencies(sim: Province, res: dict[str, Any], urgency: str) -> list[float]:
    return list(res["_latency_raw"].get(urgency, []))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--units", type=int, default=30, help="units, each with its daemon "
                    "(default 30)")
    ap.add_argument("--seconds", type=float, default=300, help="traffic period (default 300)")
    ap.add_argument("--drain", type=float, default=180,
                    help="at most this long for queues to empty after the traffic")
    ap.add_argument("--rate", type=float, default=1.0, help="documents per second (mean)")
    ap.add_argument("--seed", type=int, default=1, help="topology, traffic and faults follow "
                    "from it (default 1)")
    ap.add_argument("--workdir", type=Path, help="an empty or new directory for everything "
                    "(default: a new one under $TMPDIR); kept after the run")
    ap.add_argument("--png", type=Path, help="where to draw (default WORKDIR/simulate.png)")
    ap.add_argument("--json", action="store_true", help="print one JSON object, no table")
    ap.add_argument("--faults", default="all",
                    help=f"all, none, or a comma-separated list of {','.join(FAULTS)}")
    ap.add_argument("--relay-after", type=float, default=15,
                    help="[relay] after: seconds a direct path must have failed")
    ap.add_argument("--misaddressed", type=float, default=0.02,
                    help="share of documents addressed to a division the recipient has not "
                         "(it refuses them with the reason)")
    ap.add_argument("--no-large", action="store_true", help="no documents of several MB")
    ap.add_argument("--sample", type=float, default=3, help="seconds between queue samples")
    ap.add_argument("--revocation-bound", type=float, default=90,
                    help="every node must refuse the revoked node within this many seconds")
    ap.add_argument("--break", dest="break_", choices=["ack-without-store"],
                    help="run with an invariant broken on purpose: the run must fail")
    a = ap.parse_args(argv)
    if a.units < 2:
        ap.error("--units must be at least 2")
    unknown = set(a.faults.split(",")) - set(FAULTS) - {"all", "none"}
    if unknown:
        ap.error(f"unknown faults: {', '.join(sorted(unknown))}")
    work = a.workdir or Path(tempfile.mkdtemp(prefix="exchanged-sim-"))
    if work.exists() and any(work.iterdir()):
        ap.error(f"{work} is not empty")
    work.mkdir(parents=True, exist_ok=True)
    work = work.resolve()
    sim = Province(work, a)
    # Ctrl-C, and SIGTERM turned into it (trio delivers it where it is safe), even when
    # started in the background with SIGINT ignored: everything started is stopped.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    started = time.time()
    try:
        sim.setup()
        trio.run(run, sim)
        drained = round(time.time() - sim.t0 - a.seconds, 1)
        log("stopping the daemons")
        sim.stop_daemons()
        log("judging: stores, receipts, packages, audit chains")
        res = judge(sim)  # before the small disk is unmounted
        res["drained_s"] = drained
        chains = audit_chains(sim)
    except BaseException as e:  # trio's nurseries may wrap it in an exception group
        if isinstance(e, KeyboardInterrupt) or (isinstance(e, BaseExceptionGroup)
                                                and e.subgroup(KeyboardInterrupt)):
            log("interrupted: stopping everything it started")
            return 130
        raise
    finally:
        sim.cleanup()
        signal.signal(signal.SIGTERM, previous)
    res["audit_chains_verified"] = sum(1 for v in chains.values() if not v)
    res["audit_chains_ok"] = all(not v for v in chains.values())
    res["audit_chain_problems"] = {u: v for u, v in chains.items() if v}
    res["revocation_bound_s"] = a.revocation_bound
    res["faults"] = [e.__dict__ for e in sim.events]
    res["notes"] = sim.notes
    res["daemons_rss_peak_mib"] = sim.rss_peak_mib
    res["workdir"] = str(work)
    res["wall_s"] = round(time.time() - started, 1)
    res["broken_on_purpose"] = a.break_
    failures = []
    if res["lost"]:
        failures.append(f"{res['lost']} document(s) lost")
    if res["duplicated"]:
        failures.append(f"{res['duplicated']} document(s) duplicated")
    if res["bad_evidence"]:
        failures.append(f"{res['bad_evidence']} delivered document(s) whose evidence fails")
    if not res["audit_chains_ok"]:
        failures.append("audit chains that do not verify: "
                        + ", ".join(sorted(res["audit_chain_problems"])))
    if res["revoked"] is not None:
        after = res["revocation_refused_by_all_after_s"]
        if after is None or after > a.revocation_bound:
            failures.append(f"the revoked node {res['revoked']} was not refused by every node "
                            f"within {a.revocation_bound} s")
    if res["relayed"] != res["relayed_signatures_ok"]:
        failures.append("relayed documents whose hop records or end-to-end signature fail")
    if sim.relay_units and res["relay_intended"] and not res["relayed"]:
        failures.append(f"no document went through the relay {sim.relay_units[1]} while the "
                        f"direct link {sim.relay_units[0]}-{sim.relay_units[2]} was cut")
    if res["sent"] == 0:
        failures.append("no document was sent")
    res["failures"] = failures
    res["ok"] = not failures
    png = a.png or work / "simulate.png"
    try:
        draw(sim, res, png)
        res["png"] = str(png)
    except ImportError as e:
        res["notes"].append(f"no PNG: {e} (matplotlib is in the test extra)")
    del res["_latency_raw"]
    (work / "result.json").write_text(json.dumps(res, indent=1))
    if a.json:
        out = {k: v for k, v in res.items() if k != "latency_all_s"}
        print(json.dumps(out))
    else:
        print(table(res))
        print(f"\nwork directory {work}; result.json; PNG {res.get('png', '-')}")
    return 0 if res["ok"] else 1


def _interrupt(signum: int, frame: Any) -> None:
    signal.raise_signal(signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())
