#!/usr/bin/env python3
"""Benchmark: two units' nodes (`exchanged serve`) on loopback, each figure printed beside a
reference measured in the same run, on the same machine, with the same token key:

1. New TLS connections per second (full handshake, mutual authentication, one tiny HTTP GET
   each) from `openssl s_time -new -www`, against the daemon and against `openssl s_server`
   holding the same node key on the same SoftHSM token (the pkcs11 engine); with an empty CRL,
   then with a 100,000-entry CRL published to both (`s_server -crl_check`).
2. 1 MiB documents end to end (submitted to the sending node until the last one is delivered:
   packaged and signed on the token, stored durably on both sides, acknowledged with a signed
   receipt), in MiB/s, beside the same bytes piped through `openssl s_client` into
   `openssl s_server`.
3. Small documents per second with full durability and receipts, beside what bounds them: the
   rate of fsync'd small-file writes on this filesystem and of token signatures; then the
   two halves apart: submissions while the receiving daemon is paused (SIGSTOP), and that
   backlog's delivery once it runs again (SIGCONT), each with its CPU per document.
4. The receiving (and the sending) daemon's peak resident memory while a 1,000 MB document
   passes, beside the document's size.

`s_time` cannot take a key from an engine, so the TLS client holds a *software* EC P-256 key
made by openssl for a test-only node certificate issued by the same CA (that key never lived on
a token); both servers see the same client. Documents are submitted through the daemon's
control socket, exactly as `exchanged send` does, without starting a Python per document.

5. Token operations per document at steady state, counted by OpenSC's pkcs11-spy between
   each daemon and SoftHSM (both daemons restarted on the spy), and what a card at 200 ms per
   signature would allow.

Usage: tools/bench-exchange [--quick] [--json] [--big-mb MB] [--rounds N] [--seconds S]
       [--docs N] [--small N] [--crl-entries N] [--workdir DIR] [--keep]
--json prints one JSON object of the headline figures instead of the report.
Everything it starts (daemons, s_server) is stopped on the way out, also on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from demo_network import Demo, free_port  # noqa: E402

from exchanged import client  # noqa: E402
from exchanged.pki.pin import PinSource  # noqa: E402
from exchanged.pki.token import Token, default_module  # noqa: E402
from exchanged.pki.uri import parse  # noqa: E402
from exchanged.transport.tlskey import openssl_cli_engine  # noqa: E402

MiB = 1024 * 1024
SPY = Path("/usr/lib/x86_64-linux-gnu/pkcs11/pkcs11-spy.so")  # OpenSC's, from Debian's opensc
CARD_SIGNATURE_SECONDS = 0.2  # a real smart card: 100-500 ms per signature
REASONS = ["unspecified", "keyCompromise", "superseded", "affiliationChanged",
           "cessationOfOperation"]
CLIENT = ("node-bench-client", "Bench Client (test only)")


# -- small helpers ---------------------------------------------------------------------------

def listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port (from /proc: no probe connection)."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        next(f)
        return any(line.split()[1] == want and line.split()[3] == "0A" for line in f)


def proc_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    """CPU seconds used by this process's waited-for children (s_time, s_client)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def per_doc(before: dict[str, float], after: dict[str, float], n: int) -> dict[str, float]:
    """CPU milliseconds per document from two readings of `daemons_cpu`."""
    return {u: 1000 * (after[u] - before[u]) / n for u in before}


def ceiling(cpu_ms: float) -> str:
    """The rate that `cpu_ms` of CPU per operation allows on this machine's cores."""
    cores = len(os.sched_getaffinity(0))
    rate = f"at most {cores * 1000 / cpu_ms:.0f}/s" if cpu_ms else "n/a (too short)"
    return f"{cores} core(s): {rate}"  # CPU is counted in clock ticks: 0 for a short run


def mib(kib: int) -> str:
    return f"{kib / 1024:,.1f} MiB"


class Sampler(threading.Thread):
    """Samples VmRSS of some processes every 20 ms; keeps the maximum of each."""

    def __init__(self, pids: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.pids, self.peak = pids, {k: 0 for k in pids}
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(0.02):
            for k, pid in self.pids.items():
                with contextlib.suppress(OSError, KeyError):
                    self.peak[k] = max(self.peak[k], proc_kib(pid, "VmRSS"))


def write_pdf(path: Path, size: int) -> None:
    """A PDF as the package's sniffer wants it: a header, a zero-filled body, a trailer."""
    head, tail = b"%PDF-1.4\n%bench\n", b"\n%%EOF\n"
    with open(path, "wb") as f:
        f.write(head)
        left = size - len(head) - len(tail)
        zeros = bytes(16 * MiB)
        while left > 0:
            n = min(left, len(zeros))
            f.write(zeros[:n] if n < len(zeros) else zeros)
            left -= n
        f.write(tail)


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.a = args
        self.work = work
        self.d = Demo(work)
        self.servers: list[subprocess.Popen[bytes]] = []
        self.notes: list[str] = []
        self.rates: dict[str, tuple[float, float]] = {}
        self.figures: dict[str, Any] = {}  # --json
        self.rss_trail: list[tuple[str, dict[str, int]]] = []

    # -- the network ---------------------------------------------------------------------------

    def setup(self) -> None:
        d, w = self.d, self.work
        out = d.run(["bash", str(ROOT / "softhsm-setup.sh"), str(d.tok), "ca", "admin",
                     "officer", "auditor", "finance-node", "office-node"], quiet=True)
        conf = re.search(r"SOFTHSM2_CONF=(\S+)", out)
        if conf is None:
            raise SystemExit(f"bench: softhsm-setup.sh printed no SOFTHSM2_CONF:\n{out}")
        d.env["SOFTHSM2_CONF"] = os.environ["SOFTHSM2_CONF"] = conf.group(1)
        d.init_ca("Bench Root CA")
        d.issue("finance-node", "node", "node-finance", "Finance Bureau", "--ip", "127.0.0.1")
        d.issue("office-node", "node", "node-office", "General Office Archives", "--ip",
                "127.0.0.1")
        # The TLS client for s_time: a software key (s_time takes no engine key), a test-only
        # node certificate from the same CA, configured as one of office's peers.
        d.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
               "-out", "client.key"], quiet=True)
        d.run(["openssl", "req", "-new", "-key", "client.key", "-subj", f"/CN={CLIENT[0]}",
               "-out", "client.csr"], quiet=True)
        rid = json.loads(d.x("ca", "request", "submit", "--dir", "ca", "--csr", "client.csr",
                             "--profile", "node", "--name", CLIENT[0], "--unit", CLIENT[1],
                             "--ip", "127.0.0.1", "--json", quiet=True))["id"]
        d.x("ca", "request", "approve", "--dir", "ca", str(rid), *d.op("officer"), quiet=True)
        d.x("ca", "issue", "--dir", "ca", str(rid), *d.op("officer"), "--ca-pin-file",
            d.pin("ca"), "-o", "client.pem", quiet=True)
        # openssl's pkcs11 engine: module from the config; the PIN from a file without newline.
        conf, pin = openssl_cli_engine(w, d.pin("office-node"))
        # What s_server -WWW answers to GET /ping: about the size of the daemon's pong.
        (w / "ping").write_text('{"unit": "office", "time": "2026-01-01T00:00:00Z", '
                                '"note": "a reference answer of about a pong\'s size"}\n')
        self.engine_key = f"pkcs11:token=office-node;object=me;type=private?pin-source={pin}"
        self.ossl_env = {**d.env, "OPENSSL_CONF": str(conf)}

        self.pa, self.pb = free_port(), free_port()
        d.config("finance", "Finance Bureau", "finance-node", self.pa,
                 {"office": (self.pb, "node-office", "General Office Archives")})
        d.config("office", "General Office Archives", "office-node", self.pb,
                 {"finance": (self.pa, "node-finance", "Finance Bureau"),
                  "bench-client": (free_port(), CLIENT[0], CLIENT[1])})
        d.serve_ca()  # the CRL URL in the node certificates answers, as in a deployment
        d.start("finance")
        d.start("office")
        self.sock_a = w / "finance" / "data" / "control.sock"
        self.sock_b = w / "office" / "data" / "control.sock"

    def stop(self) -> None:
        for p in self.servers:
            if p.stdin is not None:
                p.stdin.close()
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.d.stop()

    def daemon_log_problems(self, unit: str) -> list[str]:
        text = (self.work / unit / "daemon.log").read_text(errors="replace")
        return [ln for ln in text.splitlines() if " WARNING " in ln or " ERROR " in ln]

    # -- openssl -------------------------------------------------------------------------------

    def s_server(self, port: int, *extra: str, stdout: Any = subprocess.DEVNULL
                 ) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(
            ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-engine", "pkcs11",
             "-keyform", "engine", "-key", self.engine_key, "-cert",
             str(self.work / "office-node.pem"), "-CAfile", str(self.work / "ca" / "ca.pem"),
             "-Verify", "1", "-verify_return_error", "-verify_quiet", "-quiet", *extra],
            # stdin stays open: at EOF on its input s_server would close the connection
            cwd=self.work, env=self.ossl_env, stdin=subprocess.PIPE, stdout=stdout,
            stderr=open(self.work / f"s_server-{port}.log", "ab"))
        self.servers.append(p)
        deadline = time.monotonic() + 20
        while not listening(port):
            if p.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("bench: openssl s_server did not start:\n" +
                                 (self.work / f"s_server-{port}.log").read_text()[-2000:])
            time.sleep(0.02)
        return p

    def s_time(self, port: int, path: str, server_pid: int) -> tuple[float, int, int, float,
                                                                      float]:
        """connections/s (by wall clock around s_time), connections, bytes read per conn,
        the server's and the client's CPU milliseconds per connection."""
        argv = ["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new", "-time",
                str(self.a.seconds), "-www", path, "-cert", str(self.work / "client.pem"),
                "-key", str(self.work / "client.key")]
        t, cpu, client_cpu = time.perf_counter(), proc_cpu(server_pid), children_cpu()
        p = subprocess.run(argv, cwd=self.work, env=self.d.env, capture_output=True, text=True)
        wall = time.perf_counter() - t
        cpu, client_cpu = proc_cpu(server_pid) - cpu, children_cpu() - client_cpu
        m = re.search(r"(\d+) connections in \d+ real seconds, (\d+) bytes read per connection",
                      p.stdout)
        if p.returncode != 0 or not m:
            raise SystemExit(f"bench: s_time failed ({p.returncode}):\n{p.stdout[-1500:]}\n"
                             f"{p.stderr[-1500:]}")
        n, per = int(m.group(1)), int(m.group(2))
        if per == 0:
            raise SystemExit(f"bench: the server on port {port} answered no connection "
                             "(0 bytes read per connection): the handshakes were refused")
        return n / wall, n, per, 1000 * cpu / n, 1000 * client_cpu / n

    # -- 1. handshakes -----------------------------------------------------------------------

    def handshakes(self, label: str, crl_args: list[str]) -> None:
        port = free_port()
        srv = self.s_server(port, "-WWW", *crl_args)  # serves ./ping: an answer like a pong
        ours, theirs = [], []
        try:
            for _ in range(self.a.rounds):  # interleaved, so a drift hits both
                ours.append(self.s_time(self.pb, "/v1/ping", self.d.daemons["office"].pid))
                theirs.append(self.s_time(port, "/ping", srv.pid))
        finally:
            srv.stdin.close()  # type: ignore[union-attr]
            srv.terminate()
            srv.wait(10)
        o, t = max(ours), max(theirs)
        print(f"  exchanged serve, {label:27} {o[0]:8.1f} conn/s   ({o[1]} in the best "
              f"round; {o[2]} bytes read per connection)")
        print(f"  openssl s_server, {label:25} {t[0]:8.1f} conn/s   ({t[1]} in the best "
              f"round; {t[2]} bytes read per connection)")
        print(f"  ratio exchanged/openssl {'':21} {o[0] / t[0]:8.2f}   (rounds: exchanged "
              f"{', '.join(f'{r[0]:.0f}' for r in ours)}; openssl "
              f"{', '.join(f'{r[0]:.0f}' for r in theirs)})")
        print(f"  CPU per connection, best rounds: server {o[3]:.2f} ms exchanged, {t[3]:.2f} "
              f"ms s_server; the client (s_time) {o[4]:.2f} / {t[4]:.2f} ms")
        self.rates[label] = (o[0], t[0])
        key = "handshake_ratio" if len(self.rates) == 1 else "handshake_ratio_big_crl"
        self.figures[key] = round(o[0] / t[0], 3)
        self.figures[key.replace("ratio", "per_s")] = round(o[0], 1)
        if len(self.rates) == 1:
            self.figures.update(handshake_server_cpu_ms=round(o[3], 2),
                                handshake_s_server_cpu_ms=round(t[3], 2))

    def big_crl(self) -> Path:
        """Revoke N random serials in the CA database and publish the CRL to both nodes."""
        rng = random.Random(1)
        now = dt.datetime.now(dt.UTC)
        db = sqlite3.connect(str(self.work / "ca" / "ca.db"))
        db.executemany(
            "INSERT INTO certificates (serial, profile, subject, not_before, not_after, pem, "
            "status, issued_at, revoked_at, reason) VALUES (?, 'node', 'CN=x', '', '', '', "
            "'revoked', '', ?, ?)",
            [(format(rng.getrandbits(150) | (1 << 150), "x"),
              (now - dt.timedelta(seconds=rng.randrange(86400 * 365))).strftime(
                  "%Y-%m-%dT%H:%M:%SZ"), REASONS[i % len(REASONS)])
             for i in range(self.a.crl_entries)])
        db.commit()
        db.close()
        t = time.perf_counter()
        self.d.x("ca", "crl", "--dir", "ca", "--ca-pin-file", self.d.pin("ca"), quiet=True)
        t_crl = time.perf_counter() - t
        crl = self.work / "ca" / "ca.crl"
        before = {u: self.status(u)["peer_check"]["crl_generation"] for u in ("finance", "office")}
        rss0 = proc_kib(self.d.daemons["office"].pid, "VmRSS")
        self.d.publish_crl()
        t = time.perf_counter()
        deadline = time.monotonic() + 120
        while any(self.status(u)["peer_check"]["crl_generation"] <= before[u] for u in before):
            if time.monotonic() > deadline:
                raise SystemExit("bench: the daemons did not reload the CRL within 120 s")
            time.sleep(0.2)
        t_seen = time.perf_counter() - t
        rss1 = proc_kib(self.d.daemons["office"].pid, "VmRSS")
        out = subprocess.run(["openssl", "crl", "-inform", "DER", "-in", str(crl), "-noout",
                              "-text"], capture_output=True, text=True, check=True).stdout
        entries = out.count("Serial Number:")
        print(f"  (CRL of {entries:,} entries, {crl.stat().st_size:,} bytes, made by "
              f"`exchanged ca crl` in {t_crl:.1f} s; both daemons reloaded it {t_seen:.1f} s "
              f"after it was published; office's RSS {mib(rss0)} -> {mib(rss1)})")
        return crl

    def status(self, unit: str) -> dict[str, Any]:
        return client.request(self.sock_a if unit == "finance" else self.sock_b, "status")

    # -- 2, 3. documents ---------------------------------------------------------------------

    def send(self, pdf: Path, txt: Path, title: str) -> str:
        ans = client.request(self.sock_a, "send", to="office", title=title, pdf=str(pdf),
                              editable=str(txt), urgency="normal", classification="internal",
                              number=None, deadline=None, paper_original=False, doc_id=None)
        return str(ans["doc_id"])

    def wait_delivered(self, ids: list[str], timeout: float) -> list[dict[str, Any]]:
        """Until none of `ids` is queued or sending; then each must be delivered."""
        self.wait_settled(ids, timeout)
        return self.delivered(ids)

    def wait_settled(self, ids: list[str], timeout: float) -> None:
        """Until none of `ids` is queued or sending."""
        want = set(ids)
        deadline = time.monotonic() + timeout
        while True:
            pending = [i for s in ("queued", "sending")
                       for i in client.request(self.sock_a, "outbox", state=s)["items"]
                       if i["doc_id"] in want]
            if not pending:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"bench: {len(pending)} document(s) not delivered within "
                                 f"{timeout:.0f} s; e.g. {pending[0]}")
            time.sleep(0.2)

    def delivered(self, ids: list[str]) -> list[dict[str, Any]]:
        """Each of `ids`, which must be delivered with its receipt."""
        items = [client.request(self.sock_a, "outbox-show", doc_id=i)["item"] for i in ids]
        bad = [i for i in items if i["state"] != "delivered" or not i.get("delivery_receipt")]
        if bad:
            raise SystemExit(f"bench: not delivered: {bad[0]['doc_id']} is {bad[0]['state']}: "
                             f"{bad[0].get('last_error')}")
        retried = [i for i in items if i.get("attempts")]  # failed attempts before success
        if retried:
            self.notes.append(f"{len(retried)} of {len(items)} document(s) needed more than one "
                              f"attempt (e.g. {retried[0]['attempts']} failed, last error "
                              f"{retried[0].get('last_error')!r})")
        return items

    def timed_sends(self, n: int, pdf: Path, txt: Path, title: str
                    ) -> tuple[float, dict[str, float]]:
        """Seconds from the first submission to the last delivery (the daemon's own clock),
        and each node's CPU milliseconds per document (all its threads, user + system; from
        the first submission until none is left to deliver; the polls for that included)."""
        cpu = self.daemons_cpu()
        t0 = time.time()
        ids = [self.send(pdf, txt, f"{title} {i}") for i in range(n)]
        self.wait_settled(ids, timeout=120 + 2 * n)
        cpu = per_doc(cpu, self.daemons_cpu(), n)
        items = self.delivered(ids)
        return max(float(i["delivered_at"]) for i in items) - t0, cpu

    def daemons_cpu(self) -> dict[str, float]:
        """Each daemon's CPU seconds so far (proc_cpu)."""
        return {u: proc_cpu(self.d.daemons[u].pid) for u in ("finance", "office")}

    def cpu_line(self, cpu: dict[str, float], what: str) -> str:
        """Where the CPU goes, and the rate it allows on this machine's cores."""
        return (f"  CPU per {what}: finance {cpu['finance']:.1f} ms, office {cpu['office']:.1f} "
                f"ms; both on {ceiling(sum(cpu.values()))}")

    def documents(self) -> None:
        w, a = self.work, self.a
        pdf, txt = w / "doc-1mib.pdf", w / "doc.txt"
        txt.write_bytes(b"Notice on the budget for 2027.\n" * 2)
        write_pdf(pdf, MiB - txt.stat().st_size)  # 1 MiB in all
        size = pdf.stat().st_size + txt.stat().st_size
        self.wait_delivered([self.send(pdf, txt, "warm-up")], timeout=60)

        ref = w / "ref.bin"
        with open(ref, "wb") as f:
            for _ in range(a.docs):
                f.write(pdf.read_bytes() + txt.read_bytes())
        empty = w / "empty.bin"
        empty.write_bytes(b"")
        got = w / "pipe.out"
        self.pipe(ref, got)  # once, untimed: s_server must receive every byte
        if got.stat().st_size != ref.stat().st_size:
            raise SystemExit(f"bench: s_server received {got.stat().st_size:,} of "
                             f"{ref.stat().st_size:,} bytes")
        got.unlink()
        ours, theirs, setup = [], [], []
        # interleaved, as the handshakes are: a shared machine's speed drifts by the minute
        for i in range(max(a.rounds, 5)):  # a pipe run is short: a few more cost nothing
            if i < a.rounds:
                ours.append(self.timed_sends(a.docs, pdf, txt, "1 MiB"))
            theirs.append(self.pipe(ref))
            setup.append(self.pipe(empty))
        total = a.docs * size / MiB
        (o, cpu), t, t0 = min(ours, key=lambda r: r[0]), min(theirs), min(setup)
        self.figures.update(doc_1mib_ratio=round(t / o, 3), doc_1mib_mib_s=round(total / o, 1),
                            pipe_mib_s=round(total / t, 1),
                            doc_1mib_cpu_ms={u: round(v, 2) for u, v in cpu.items()})
        print(f"\n{a.docs} documents of 1 MiB ({size:,} bytes: a PDF + a "
              f"{txt.stat().st_size}-byte text), end to end, best of {a.rounds} "
              f"(openssl: best of {len(theirs)})")
        print(f"  exchanged, submit -> all delivered        {total / o:8.1f} MiB/s  "
              f"({a.docs / o:.1f} documents/s, {o:.3f} s)")
        print(f"  openssl s_client | s_server, same bytes   {total / t:8.1f} MiB/s  "
              f"({t:.3f} s wall: one connection, nothing stored)")
        if t - t0 > 0.25 * t:
            print(f"  ... less s_client's start + handshake     {total / (t - t0):8.1f} MiB/s  "
                  f"({t0:.3f} s, timed with an empty input, taken off)")
            print(f"  ratio exchanged/openssl                   {t / o:8.2f} (wall), "
                  f"{(t - t0) / o:.2f} (less start + handshake)")
        else:
            print(f"  ... less s_client's start + handshake          n/a   ({t0:.3f} s with an "
                  "empty input: too close to tell; more --docs)")
            print(f"  ratio exchanged/openssl                   {t / o:8.2f} (wall)")
        print(self.cpu_line(cpu, "document of 1 MiB"))

        small_pdf, small_txt = w / "small.pdf", w / "small.txt"
        write_pdf(small_pdf, 1024)
        small_txt.write_bytes(b"A short notice.\n")
        ssize = small_pdf.stat().st_size + small_txt.stat().st_size
        runs = [self.timed_sends(a.small, small_pdf, small_txt, "small")
                for _ in range(a.rounds)]
        rates = [a.small / r[0] for r in runs]
        small_cpu = min(runs, key=lambda r: r[0])[1]  # the best round's
        fs, sig = self.fsync_rate(), self.sign_rate()
        self.figures.update(small_docs_per_s=round(max(rates), 1), fsync_per_s=round(fs, 1),
                            token_signatures_per_s=round(sig, 1),
                            small_doc_cpu_ms={u: round(v, 2) for u, v in small_cpu.items()})
        print(f"\n{a.small} small documents ({ssize:,} bytes each), full durability and "
              f"receipts, best of {a.rounds}")
        print(f"  exchanged, submit -> all delivered        {max(rates):8.1f} documents/s  "
              f"(rounds: {', '.join(f'{r:.1f}' for r in rates)})")
        print(self.cpu_line(small_cpu, "document"))
        print(f"  reference: write + fsync a 1 KiB file     {fs:8.1f} /s (same filesystem)")
        print(f"  reference: ECDSA P-256 token signatures   {sig:8.1f} /s (SoftHSM, "
              "python-pkcs11)")
        print("  (each document: packaged and signed on finance's token, fsynced into its "
              "store;\n   sent; fsynced into office's store; a delivery receipt signed on "
              "office's token;\n   the receipt recorded at finance)")
        self.split(small_pdf, small_txt)

    def split(self, pdf: Path, txt: Path) -> None:
        """The small documents' two halves apart: submissions while office's daemon is paused
        (SIGSTOP; finance packages, signs and stores each, and cannot send), then the backlog's
        delivery once it runs again (SIGCONT), timed from the first delivery to the last."""
        n = self.a.small
        if n < 2:
            self.notes.append("--small below 2: the submissions and deliveries not timed apart")
            return
        office = self.d.daemons["office"].pid
        before = self.daemons_cpu()
        os.kill(office, signal.SIGSTOP)
        try:
            t0 = time.perf_counter()
            ids = [self.send(pdf, txt, f"backlog {i}") for i in range(n)]
            submit_s = time.perf_counter() - t0
            paused = self.daemons_cpu()
        finally:
            os.kill(office, signal.SIGCONT)
        self.wait_settled(ids, timeout=120 + 2 * n)
        cpu = per_doc(paused, self.daemons_cpu(), n)
        at = [float(i["delivered_at"]) for i in self.delivered(ids)]
        submit_cpu = per_doc(before, paused, n)["finance"]
        rate = (n - 1) / max(max(at) - min(at), 1e-3)  # the clock's resolution is finer
        self.figures.update(submit_only_per_s=round(n / submit_s, 1),
                            submit_cpu_ms=round(submit_cpu, 2),
                            backlog_docs_per_s=round(rate, 1),
                            backlog_cpu_ms={u: round(v, 2) for u, v in cpu.items()})
        print(f"  the two halves apart, {n} documents:\n"
              f"    submissions alone (office paused)       {n / submit_s:8.1f} /s   "
              f"(finance's CPU {submit_cpu:.1f} ms each; on {ceiling(submit_cpu)})")
        print(f"    then that backlog delivered             {rate:8.1f} /s   (from the first "
              "delivery to the last)")
        print("  " + self.cpu_line(cpu, "document delivered"))

    def pipe(self, data: Path, out: Path | None = None) -> float:
        """Seconds to pipe `data` through s_client into s_server (which echoes what it reads
        to /dev/null, or to `out`), from s_client's start until s_server has read the end."""
        port = free_port()
        sink = open(out, "wb") if out else subprocess.DEVNULL
        try:
            srv = self.s_server(port, "-naccept", "1", stdout=sink)
        finally:
            if out:
                sink.close()  # type: ignore[union-attr]
        t = time.perf_counter()
        with open(data, "rb") as stdin:
            subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-cert",
                            str(self.work / "client.pem"), "-key",
                            str(self.work / "client.key"), "-quiet", "-no_ign_eof"],
                           stdin=stdin, cwd=self.work, env=self.d.env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        srv.wait(120)
        elapsed = time.perf_counter() - t
        srv.stdin.close()  # type: ignore[union-attr]
        if srv.returncode != 0:
            raise SystemExit(f"bench: s_server exited {srv.returncode}")
        return elapsed

    def fsync_rate(self) -> float:
        path, data, n = self.work / "fsync.tmp", os.urandom(1024), 0
        t = time.perf_counter()
        while time.perf_counter() - t < 2:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.write(fd, data)
            os.fsync(fd)
            os.close(fd)
            n += 1
        rate = n / (time.perf_counter() - t)
        path.unlink()
        return rate

    def sign_rate(self) -> float:
        token = Token.open(parse("pkcs11:token=office-node"),
                           PinSource("node", "X", self.d.pin("office-node")))
        try:
            key = token.key_from_uri(parse("pkcs11:token=office-node;object=me"))
            n, t = 0, time.perf_counter()
            while time.perf_counter() - t < 2:
                key.sign(b"x" * 64)
                n += 1
            return n / (time.perf_counter() - t)
        finally:
            token.close()

    # -- 4. memory ---------------------------------------------------------------------------

    def memory(self) -> None:
        w = self.work
        big, txt = w / "big.pdf", w / "doc.txt"
        size = self.a.big_mb * 1000 * 1000 - txt.stat().st_size
        write_pdf(big, size)
        pids = {u: self.d.daemons[u].pid for u in ("office", "finance")}
        base = {u: proc_kib(p, "VmRSS") for u, p in pids.items()}
        hwm0 = {u: proc_kib(p, "VmHWM") for u, p in pids.items()}
        reset = True
        for p in pids.values():  # "5": reset the peak RSS (VmHWM) to the current RSS
            try:
                Path(f"/proc/{p}/clear_refs").write_text("5")
            except OSError:
                reset = False
        sampler = Sampler(pids)
        sampler.start()
        try:
            t0 = time.time()
            doc = self.send(big, txt, "big")
            t_sent = time.time() - t0
            item = self.wait_delivered([doc], timeout=1800)[0]
            t_done = float(item["delivered_at"]) - t0
        finally:
            sampler.halt.set()
            sampler.join()
        hwm = {u: proc_kib(p, "VmHWM") for u, p in pids.items()}
        total = size + txt.stat().st_size
        self.figures.update(big_doc_mb=round(total / 1e6),
                            big_doc_peak_rss_mib=round(max(hwm.values()) / 1024, 1))
        print(f"\nPeak memory while a {total / 1e6:,.0f} MB document ({total:,} bytes) passes")
        for u, role in (("office", "receiving"), ("finance", "sending")):
            how = "VmHWM, reset just before" if reset else \
                f"VmHWM since start (could not reset; it was {mib(hwm0[u])} before)"
            print(f"  {role} daemon ({u}): peak RSS {mib(hwm[u]):>11} ({how}), "
                  f"{(hwm[u] - base[u]) / 1024:+.1f} MiB over the {mib(base[u])} before; "
                  f"highest 20 ms sample {mib(sampler.peak[u])}; VmHWM since start "
                  f"{mib(hwm0[u])}")
        print(f"  reference: the document itself            {total / MiB:8,.1f} MiB; receiving "
              f"peak / document = {hwm['office'] * 1024 / total:.3f}")
        print(f"  (submitted in {t_sent:.1f} s: packaged, signed, stored at finance; "
              f"delivered {t_done:.1f} s after submission: {total / MiB / t_done:.1f} MiB/s "
              "end to end)")
        big.unlink()

    # -- idle memory -------------------------------------------------------------------------

    def rss_mark(self, when: str) -> None:
        """Remember both daemons' resident memory at this point (printed at the end)."""
        self.rss_trail.append((when, {u: proc_kib(self.d.daemons[u].pid, "VmRSS")
                                      for u in ("finance", "office")}))

    def idle_rss(self) -> None:
        """Both daemons' resident memory, idle after start-up (empty CRL, nothing queued)."""
        time.sleep(2)
        rss = {u: proc_kib(self.d.daemons[u].pid, "VmRSS") for u in ("finance", "office")}
        self.figures["idle_rss_mib"] = round(max(rss.values()) / 1024, 1)
        print(f"\nIdle daemons after start-up: resident memory finance {mib(rss['finance'])}, "
              f"office {mib(rss['office'])}")

    # -- 5. token operations -----------------------------------------------------------------

    def token_ops(self) -> None:
        """Restart both daemons on pkcs11-spy (OpenSC) in front of SoftHSM, send documents on
        kept connections, and count the PKCS#11 signatures each token made per document."""
        d, w, n = self.d, self.work, self.a.small
        if not SPY.exists():
            self.notes.append(f"{SPY} missing (Debian package opensc): token operations not "
                              "counted")
            return
        units = ("finance", "office")
        for u in units:
            p = d.daemons[u]
            p.send_signal(signal.SIGTERM)
            p.wait(30)
            cfg = w / u / "exchanged.toml"
            cfg.write_text(cfg.read_text().replace("[pkcs11]\n", f'[pkcs11]\nmodule = "{SPY}"\n'))
        saved = dict(d.env)
        try:
            d.env["PKCS11SPY"] = default_module()
            for u in units:
                d.env["PKCS11SPY_OUTPUT"] = str(w / u / "spy.log")
                with contextlib.redirect_stdout(io.StringIO()):
                    d.start(u)
        finally:
            d.env.clear()
            d.env.update(saved)
        small_pdf, small_txt = w / "small.pdf", w / "small.txt"

        def calls_since(marks: dict[str, int]) -> dict[str, Counter[str]]:
            counts: dict[str, Counter[str]] = {}
            for u in units:
                with open(w / u / "spy.log", "rb") as f:
                    f.seek(marks[u])
                    text = f.read().decode(errors="replace")
                counts[u] = Counter(re.findall(r"^\d+: (C_\w+)$", text, re.MULTILINE))
            return counts

        def mark() -> dict[str, int]:
            return {u: (w / u / "spy.log").stat().st_size for u in units}

        # One signature is C_SignInit then C_Sign (python-pkcs11 and libp11 may call C_Sign
        # twice, the first time for the length): signatures are counted by their C_SignInit.
        def signatures(marks: dict[str, int]) -> dict[str, int]:
            return {u: c["C_SignInit"] for u, c in calls_since(marks).items()}

        first = mark()  # both daemons just started: the first connection is a full handshake
        self.timed_sends(1, small_pdf, small_txt, "spy, first connection")
        full = signatures(first)
        self.timed_sends(4, small_pdf, small_txt, "spy warm-up")  # connections made and kept
        marks = mark()
        seconds, _ = self.timed_sends(n, small_pdf, small_txt, "spy")
        counts = calls_since(marks)
        sigs = {u: counts[u]["C_SignInit"] for u in units}
        # finance's kept connections to office closed (idle_timeout 1 s): the next document
        # goes on a new connection, which resumes the TLS session of an earlier one
        cfg = w / "finance" / "exchanged.toml"
        cfg.write_text(cfg.read_text().replace("[limits]\n", "[limits]\nidle_timeout = 1\n"))
        d.x("reload", "--config", str(cfg), quiet=True)
        deadline = time.monotonic() + 30
        while self.status("finance")["peers"][0]["connections"] and time.monotonic() < deadline:
            time.sleep(0.2)
        again = mark()
        self.timed_sends(1, small_pdf, small_txt, "spy, a new connection")
        resumed = signatures(again)
        shakes = self.status("finance")["peers"][0].get("tls_handshakes", {})
        per_doc = sum(sigs.values()) / n
        busiest = max(sigs.values()) / n
        card = 1 / (CARD_SIGNATURE_SECONDS * busiest) if busiest else float("inf")
        self.figures.update(token_ops_per_doc=round(per_doc, 2),
                            token_ops_per_doc_by_node={u: round(v / n, 2) for u, v in
                                                       sigs.items()},
                            card_200ms_docs_per_s=round(card, 2),
                            token_ops_first_doc_full_handshake=sum(full.values()),
                            token_ops_doc_on_resumed_connection=sum(resumed.values()))
        print(f"\nToken operations at steady state: {n} small documents on kept connections, "
              "counted by OpenSC's pkcs11-spy in front of SoftHSM")
        for u, role in (("finance", "sending"), ("office", "receiving")):
            calls = sum(counts[u].values())
            print(f"  {role} node ({u}): {sigs[u] / n:5.2f} signatures per document "
                  f"({sigs[u]} in all; {calls} PKCS#11 calls, {calls / n:.1f} per document)")
        print(f"  both tokens: {per_doc:.2f} signatures per document; a card at "
              f"{CARD_SIGNATURE_SECONDS * 1000:.0f} ms per signature would allow "
              f"{card:.1f} documents/s (the busier token bounds it)")
        print(f"  (with the spy logging every call: {n / seconds:.1f} documents/s)")
        print(f"  one document on a new connection, full handshake: {sum(full.values())} "
              f"signatures (finance {full['finance']}, office {full['office']}); on a new "
              f"connection resuming a TLS session: {sum(resumed.values())} (finance "
              f"{resumed['finance']}, office {resumed['office']}); finance's handshakes to "
              f"office: {shakes}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="1 round of 3 s, 5 and 20 documents, a 200 MB document")
    ap.add_argument("--big-mb", type=int, help="size of the big document in MB (default 1000, "
                    "--quick 200; the package limit is 1 GiB per file)")
    ap.add_argument("--rounds", type=int, help="rounds per figure, best kept (default 3)")
    ap.add_argument("--seconds", type=int, help="s_time seconds per round (default 10)")
    ap.add_argument("--docs", type=int, help="1 MiB documents per round (default 20)")
    ap.add_argument("--small", type=int, help="small documents per round (default 100)")
    ap.add_argument("--crl-entries", type=int, default=100_000)
    ap.add_argument("--workdir", help="work here (default: a new temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--json", action="store_true", help="print one JSON object of the headline "
                    "figures (handshake_ratio, doc_1mib_ratio, small_docs_per_s, fsync_per_s, "
                    "big_doc_peak_rss_mib, idle_rss_mib, token_ops_per_doc, ...) instead")
    a = ap.parse_args()
    q = a.quick
    a.big_mb = a.big_mb or (200 if q else 1000)
    a.rounds = a.rounds or (1 if q else 3)
    a.seconds = a.seconds or (3 if q else 10)
    a.docs = a.docs or (5 if q else 20)
    a.small = a.small or (20 if q else 100)
    if a.big_mb * 1000 * 1000 >= 1024**3:
        ap.error("--big-mb: a PDF of the package is at most 1 GiB (1073 MB)")

    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="bench-exchange-"))
    work.mkdir(parents=True, exist_ok=True)
    b = Bench(a, work)
    report = io.StringIO()
    with contextlib.redirect_stdout(report) if a.json else contextlib.nullcontext():
        code = run(a, b, work)
    if a.json:
        print(json.dumps(b.figures, indent=1, sort_keys=True))
    return code


def run(a: argparse.Namespace, b: Bench, work: Path) -> int:
    ver = subprocess.run(["openssl", "version"], capture_output=True, text=True).stdout.strip()
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), platform.machine())
    print(f"exchanged exchange benchmark: {os.cpu_count()} CPU(s) by nproc "
          f"({len(os.sched_getaffinity(0))} usable), {cpu}; all traffic on loopback "
          f"127.0.0.1; {ver}; Python {platform.python_version()}; node keys EC P-256 on SoftHSM "
          "tokens; client and servers share the machine", flush=True)
    setup_log = io.StringIO()
    t_start = time.perf_counter()
    try:
        try:
            with contextlib.redirect_stdout(setup_log):
                b.setup()
        except BaseException:
            print(setup_log.getvalue(), file=sys.stderr)
            raise
        b.idle_rss()
        b.rss_mark("idle after start-up")
        print(f"\nNew TLS connections per second: full handshake (TLS 1.3, mutual auth, the "
              f"server key on the token), one small HTTP GET each;\nclient `openssl s_time -new "
              f"-www` with a software key (s_time takes no engine key), {a.seconds} s per "
              f"round, best of {a.rounds};\nopenssl s_server: the same token key through the "
              "pkcs11 engine, -Verify 1 -crl_check with the CRL file the daemon has",
              flush=True)
        b.handshakes("empty CRL", ["-crl_check", "-CRLform", "DER", "-CRL",
                                   str(work / "ca" / "ca.crl")])
        b.rss_mark("after the handshakes, empty CRL")
        crl = b.big_crl()
        b.rss_mark("after taking the 100k CRL")
        b.handshakes(f"{a.crl_entries // 1000}k-entry CRL",
                     ["-crl_check", "-CRLform", "DER", "-CRL", str(crl)])
        r = b.rates
        (e0, o0), (e1, o1) = list(r.values())
        print(f"  100k CRL / empty CRL: exchanged {e1 / e0:.2f}, openssl {o1 / o0:.2f}",
              flush=True)
        b.rss_mark("after the handshakes, 100k CRL")
        b.documents()
        b.rss_mark("after the 1 MiB and small documents")
        b.memory()
        b.rss_mark("after the big document")
        b.token_ops()
        for unit in ("finance", "office"):
            problems = b.daemon_log_problems(unit)
            if problems:
                b.notes.append(f"{unit}'s daemon logged {len(problems)} warning(s)/error(s), "
                               f"e.g. {problems[0]}")
        print("\nResident memory along the way (finance, office):")
        for when, rss in b.rss_trail:
            print(f"  {when:40} {mib(rss['finance']):>11} {mib(rss['office']):>11}")
        for note in b.notes:
            print(f"  note: {note}")
        print(f"\n(total {time.perf_counter() - t_start:.0f} s; work directory {work}"
              f"{'' if a.keep else ', removed'})")
    finally:
        with contextlib.redirect_stdout(io.StringIO()):
            b.stop()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
