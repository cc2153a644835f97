"""Classes 4 and 5: what anyone who reaches the port, or a configured peer, may cost a node is
bounded, and a full disk is a pause, not an end.

Regressions: 64 idle TCP connections delayed a real peer by 14.5 s (130 past its limit); every
failed handshake wrote an fsynced audit entry (~660/s); a refused package's blob stayed for
ever (5 refused 2 MB bodies: +10 MB); the verdict cache grew with every distinct chain; a full
disk would likely have ended the daemon.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509

from exchanged.transport import protocol as proto
from hostile.conftest import Net, submit_raw, tls_context


def _connect_from(source: str, port: int) -> socket.socket:
    s = socket.socket()
    s.bind((source, 0))  # all of 127/8 is loopback: another source address for the limits
    s.connect(("127.0.0.1", port))
    return s


def _text(n: int) -> bytes:
    """n bytes of text that no other call returns (an editable file judged by content)."""
    return os.urandom(n // 2).hex().encode()


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_idle_connections_from_one_address_do_not_hold_up_a_peer(healthy: Net) -> None:
    net = healthy
    pid = net.d.daemons["office"].pid
    before = _fds(pid)
    idle = [_connect_from("127.0.0.2", net.port("office")) for _ in range(300)]
    try:
        time.sleep(0.5)
        # At most max_unauthenticated_per_source (8) wait for a handshake; the rest are closed.
        assert _fds(pid) - before < 40
        doc = net.send("past the idle crowd")
        net.delivered(doc, timeout=20)  # not held up for the handshake timeout of the crowd
    finally:
        for s in idle:
            s.close()
    refused = net.sql("office", "SELECT details FROM audit WHERE action = 'tls-failed' AND "
                                "object = '127.0.0.2'")
    assert refused and "too-many-connections" in refused[0][0]


def test_one_peer_cannot_take_every_connection_slot(healthy: Net) -> None:
    """A configured peer (here: finance's certificate with a test key) holding connections
    open gets at most max_connections_per_peer of them; the next is closed after the
    handshake, told nothing, and the refusal is logged."""
    import trio

    net = healthy
    old = net.restart("office", max_connections_per_peer=3)

    async def hold(n: int) -> list[bool]:
        """Open n connections one after another, keep them, and say which got a pong."""
        answered, held = [], []
        try:
            for _ in range(n):
                stream = await trio.open_tcp_stream("127.0.0.1", net.port("office"))
                tls = trio.SSLStream(stream, tls_context(net, "finance", server=False),
                                     server_hostname="peer")
                held.append(tls)
                conn = proto.ClientConnection("peer")
                got = None
                try:
                    with trio.fail_after(10):
                        await tls.send_all(conn.send(proto.Ping(None)))
                        while (got := conn.next_event()) is proto.NEED_DATA:
                            conn.receive_data(await tls.receive_some(65536))
                except (trio.BrokenResourceError, proto.ProtocolError):
                    got = None
                answered.append(isinstance(got, proto.Pong))
        finally:
            for tls in held:
                await trio.aclose_forcefully(tls)
        return answered

    try:
        answered = trio.run(hold, 6)
        # finance's own daemon may hold one or two of the three already (kept connections).
        assert 1 <= sum(answered) <= 3 and answered[-1] is False, answered
        assert answered == sorted(answered, reverse=True), answered  # refused only once full
        log = (net.d.work / "office" / "daemon.log").read_text()
        assert "finance already has 3 connections open" in log
    finally:
        net.cfg("office").write_text(old)
        net.stop("office")
        net.start("office")


def test_failed_handshakes_are_audited_in_aggregate(healthy: Net) -> None:
    net = healthy
    net.restart("office", refusal_audit_interval=2)
    before = net.audit_count("office")
    for _ in range(300):
        with _connect_from("127.0.0.3", net.port("office")) as s:
            s.sendall(b"\x16\x03\x01\x00\x05hello")  # not a TLS ClientHello
    time.sleep(1)
    assert net.audit_count("office") - before <= 5  # not 300 fsynced entries
    # When the interval is over, one entry says how many there were.
    counted = net.d.wait_for("the aggregate", lambda: [
        json.loads(d)["count"] for (d,) in net.sql(
            "office", "SELECT details FROM audit WHERE action = 'tls-failed' AND object = "
                      "'127.0.0.3' AND seq > ?", (before,))
        if json.loads(d)["count"] > 1], timeout=20)
    assert sum(counted) + 1 >= 250  # type: ignore[arg-type]


def _blob_bytes(net: Net, unit: str) -> int:
    return sum(p.stat().st_size for p in (net.d.work / unit / "data" / "blobs").rglob("*")
               if p.is_file())


def test_refused_packages_leave_nothing_on_disk(healthy: Net) -> None:
    net = healthy
    before = _blob_bytes(net, "office")
    rng = random.Random(1)
    for _ in range(5):
        body = rng.randbytes(2 * 1024 * 1024)
        answer = submit_raw(net, "office", body)
        assert isinstance(answer, proto.Reject) and answer.code in ("bad-package", "bad-form")
        sha = hashlib.sha256(body).hexdigest()
        assert not (net.d.work / "office" / "data" / "blobs" / sha[:2] / sha).exists()
    assert _blob_bytes(net, "office") - before < 1024 * 1024


def test_orphan_blobs_are_swept_at_start(healthy: Net) -> None:
    net = healthy
    blobs = net.d.work / "office" / "data" / "blobs"
    sha = hashlib.sha256(b"orphan").hexdigest()
    (blobs / sha[:2]).mkdir(exist_ok=True)
    (blobs / sha[:2] / sha).write_bytes(b"orphan")
    net.restart("office")
    assert not (blobs / sha[:2] / sha).exists()


def test_a_peer_over_its_quota_is_told_busy_and_waits(healthy: Net) -> None:
    net = healthy
    pending = int(net.sql("office", "SELECT coalesce(sum(size), 0) FROM inbox WHERE sender = "
                                    "'finance' AND state = 'received'")[0][0])
    original = net.restart("office", peer_quota_bytes=pending + 300_000)
    try:
        docs = [net.send(f"quota {i}", body=_text(100_000)) for i in range(5)]
        err = net.d.wait_for("a refusal for the quota", lambda: next(
            (e for d in docs if "quota" in (e := net.outbox(d)["last_error"] or "")), None),
            timeout=30)
        assert "busy" in str(err) or "quota" in str(err)
        assert all(net.outbox(d)["state"] in ("queued", "sending", "delivered") for d in docs)
        assert net.alive("office")
    finally:
        net.stop("office")
        net.cfg("office").write_text(original)
        net.start("office")
    for d in docs:  # room again: they arrive, nothing lost
        net.delivered(d, timeout=90)


def test_a_full_disk_answers_busy_raises_the_alert_and_recovers(healthy: Net,
                                                               tmp_path: Path) -> None:
    net = healthy
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(small)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.fail(f"this test mounts a small tmpfs (CI runs as root): {mounted.stderr}")
    cfg = net.cfg("office")
    original = cfg.read_text()
    alerts = tmp_path / "alerts"
    try:
        net.stop("office")
        shutil.copytree(net.d.work / "office" / "data", small / "data")
        (small / "data").chmod(0o700)
        cfg.write_text(original.replace(f'data_dir = "{net.d.work}/office/data"',
                                        f'data_dir = "{small}/data"').replace(
            "[pkcs11]", f'alert_command = ["sh", "-c", "echo $EXCHANGED_EVENT >> {alerts}"]'
                        "\n\n[pkcs11]").replace("[limits]\n", "[limits]\n"
                                                "disk_reserve_bytes = 4000000\n"))
        net.start("office")
        filler = small / "filler"
        free = shutil.disk_usage(small).free
        with open(filler, "wb") as f:
            f.write(b"\0" * (free - 2_000_000))  # less than the reserve is left
        doc = net.send("onto a full disk", body=_text(50_000))
        err = net.d.wait_for("busy", lambda: "disk is full" in (
            net.outbox(doc)["last_error"] or ""), timeout=30)
        assert err and net.alive("office")
        net.d.wait_for("the alert", lambda: alerts.exists() and "disk-full" in
                       alerts.read_text(), timeout=10)
        # Room for the package and little more: it is stored at the first attempt. (Checking
        # a package once unpacked it into a scratch copy, which failed here with ENOSPC; the
        # checks now read the stored package where it lies: package.check.)
        net.stop("office")
        cfg.write_text(cfg.read_text().replace("disk_reserve_bytes = 4000000",
                                               "disk_reserve_bytes = 1"))
        net.start("office")
        with open(filler, "ab") as f:
            f.write(b"\0" * (shutil.disk_usage(small).free - 700_000))
        doc2 = net.send("onto a disk with room for it alone", body=_text(500_000))
        net.delivered(doc2, timeout=60)
        assert net.outbox(doc2)["attempts"] == 0 and net.alive("office")
        assert shutil.disk_usage(small).free < 200_000
        filler.unlink()
        net.delivered(doc, timeout=90)
        net.delivered(doc2, timeout=90)
    finally:
        net.stop("office")
        cfg.write_text(original)
        subprocess.run(["umount", "-l", str(small)], capture_output=True)
        net.start("office")


def test_the_verdict_cache_is_bounded(net: Net) -> None:
    """A configured peer sending a new extra certificate with every handshake cannot grow the
    daemon's memory: the cache keeps the 1024 most recent verdicts."""
    from exchanged.transport.peers import MAX_CACHED, Peer, PeerCheck
    from hostile.test_malformed_chains import mutate
    ca = x509.load_pem_x509_certificate((net.d.work / "ca" / "ca.pem").read_bytes())
    leaf = (net.peers / "finance.pem").read_bytes()
    check = PeerCheck([ca], [net.d.work / "finance" / "ca.crl"],
                      {"finance": Peer("finance", "127.0.0.1", 1, "node-finance",
                                       "Finance Bureau")})
    leaf_der = x509.load_pem_x509_certificate(leaf).public_bytes(
        __import__("cryptography.hazmat.primitives.serialization",
                   fromlist=["Encoding"]).Encoding.DER)
    for i in range(MAX_CACHED + 200):
        extra = mutate("version", 0, i % 120)[:-1] + bytes([i % 256])
        try:
            check.check([leaf_der, extra])
        except Exception:  # refusals are expected; only the cache's size matters here
            pass
    assert check.statistics()["cached_peers"] <= MAX_CACHED
