"""Backup and restore while running (issue 10, item 7), through real daemons on SoftHSM tokens:
a backup taken by the node's administrator while documents are being sent, the store
destroyed, restored, the daemon restarted; the audit log verifies, every document is there,
and what is sent again is received once. A tampered backup, a backup of another node, a
restore over a store or beside a running daemon, a person who is not the administrator: each
refused, saying why. openssl judges the backup's signature."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from exchanged import client
from exchanged.node import backup
from exchanged.node.config import Config
from exchanged.store.audit import MIRROR
from exchanged.store.nodedb import NodeStore

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from demo_network import Demo  # noqa: E402
from demo_pki import setup  # noqa: E402  (demo_network.setup, its PKI made once per run)

quiet = contextlib.redirect_stdout


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Demo, dict[str, str]]]:
    d = Demo(tmp_path_factory.mktemp("backup"))
    with quiet(io.StringIO()):
        paths = setup(d)
        d.start("finance")
        d.start("office")
    (d.work / "m.txt").write_text("body\n")
    yield d, paths
    with quiet(io.StringIO()):
        d.stop()


def x(d: Demo, *args: str, ok: bool = True) -> str:
    return d.x(*args, ok=ok, quiet=True)


def send(d: Demo, cfg: str, n: int, size: int = 200_000) -> list[str]:
    pdf = d.work / f"m-{size}.pdf"
    if not pdf.exists():
        pdf.write_bytes(b"%PDF-1.4\n" + os.urandom(size) + b"\n%%EOF\n")
    sock = Config.load(cfg).socket_path
    return [client.request(sock, "send", to="office", title=f"doc {i}", pdf=str(pdf),
                           editable=str(d.work / "m.txt"))["doc_id"] for i in range(n)]


def outbox(d: Demo, cfg: str) -> dict[str, dict[str, Any]]:
    return {i["doc_id"]: i for i in json.loads(x(d, "outbox", "--config", cfg, "--json"))}


def wait_delivered(d: Demo, cfg: str, docs: set[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = {k: v["state"] for k, v in outbox(d, cfg).items() if k in docs}
        if len(states) == len(docs) and all(s == "delivered" for s in states.values()):
            return
        time.sleep(0.5)
    raise AssertionError(f"not all delivered: {states}")


def take_backup(d: Demo, cfg: str, out: Path, who: str = "admin", ok: bool = True) -> str:
    return x(d, "backup", str(out), "--config", cfg, *d.op(who), "--json", ok=ok)


def backed_up(out: Path) -> dict[str, str]:
    """doc_id -> state, as the backup's database holds them (opened read-only)."""
    conn = sqlite3.connect(f"{(out / 'node.db').as_uri()}?mode=ro", uri=True)
    try:
        return dict(conn.execute("SELECT doc_id, state FROM outbox").fetchall())
    finally:
        conn.close()


def audit_count(d: Demo, unit: str, action: str, obj: str) -> int:
    conn = sqlite3.connect(d.work / unit / "data" / "node.db")
    try:
        return int(conn.execute("SELECT count(*) FROM audit WHERE action = ? AND object = ?",
                                [action, obj]).fetchone()[0])
    finally:
        conn.close()


def scratch(d: Demo, unit: str, name: str) -> str:
    """The unit's configuration with a data directory of its own (where no daemon runs)."""
    text = (d.work / unit / "exchanged.toml").read_text()
    cfg = d.work / unit / f"{name}.toml"
    cfg.write_text(text.replace(f'data_dir = "{d.work / unit}/data"',
                                f'data_dir = "{d.work / unit}/{name}"'))
    return str(cfg)


def dump(db: Path) -> list[str]:
    conn = sqlite3.connect(db)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def start(d: Demo, unit: str) -> None:
    with quiet(io.StringIO()):
        d.start(unit)


def stop(d: Demo, unit: str) -> None:
    p = d.daemons[unit]
    p.terminate()
    p.wait(30)


# -- the main path ------------------------------------------------------------------------------


def test_backup_during_traffic_destroy_restore_restart(net: tuple[Demo, dict[str, str]],
                                                       tmp_path: Path) -> None:
    d, paths = net
    fin = paths["finance"]
    early = send(d, fin, 4)
    wait_delivered(d, fin, set(early))
    # Office goes down a while: what finance sends meanwhile waits in its queue, retried
    # with backoff.
    stop(d, "office")
    waiting = send(d, fin, 8)
    start(d, "office")
    # The backup is taken while finance sends without pause: documents are queued, sent and
    # acknowledged while the snapshot is taken and the blobs copied.
    during: list[str] = []
    done = threading.Event()

    def keep_sending() -> None:
        while not done.is_set():
            during.extend(send(d, fin, 1, size=1_000_000))

    sender = threading.Thread(target=keep_sending)
    sender.start()
    out = tmp_path / "bk"
    try:
        time.sleep(0.5)
        answer = json.loads(take_backup(d, fin, out))
    finally:
        done.set()
        sender.join()
    assert answer["dir"] == str(out) and answer["blobs"] >= len(early) + len(waiting)

    # What the backup holds: every document queued before it; some not yet delivered.
    held = backed_up(out)
    assert set(early) | set(waiting) <= set(held)
    resent = {doc for doc, state in held.items() if state in ("queued", "sending")}
    assert resent, held
    assert set(during) - set(held), "documents were sent after the snapshot, too"
    assert answer["documents"]["outbox"] == len(held)
    # 0700 and 0600 throughout.
    assert mode(out) == 0o700
    for p in out.rglob("*"):
        assert mode(p) == (0o700 if p.is_dir() else 0o600), p
    manifest = json.loads((out / "backup.json").read_text())
    assert manifest["unit"] == "finance" and "Zhang Wei" in manifest["by"]
    assert manifest["audit"]["head_seq"] == answer["audit"]["head_seq"]
    # The act is the administrator's, signed, in finance's log; the backup's end, too.
    assert audit_count(d, "finance", "node-backup", str(out)) == 1
    assert audit_count(d, "finance", "node-backup-written", str(out)) == 1

    # Everything finance held reaches office before its store is lost.
    wait_delivered(d, fin, set(held) | set(during))

    # Restore refuses beside the running daemon, and over a store without --force.
    refused = x(d, "restore", str(out), "--config", fin, ok=False)
    assert "the daemon is running" in refused
    stop(d, "finance")
    refused = x(d, "restore", str(out), "--config", fin, ok=False)
    assert "holds a node store already" in refused and "--force" in refused

    # The store is destroyed, then restored from the backup.
    data = d.work / "finance" / "data"
    for p in data.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    done = json.loads(x(d, "restore", str(out), "--config", fin, "--json"))
    assert done["documents"]["outbox"] == len(held)
    assert done["audit"]["head_seq"] == manifest["audit"]["head_seq"]
    assert done["moved_aside"] is None
    assert mode(data) == 0o700 and mode(data / "node.db") == 0o600
    assert mode(data / MIRROR) == 0o600
    blobs = [p for p in (data / "blobs").rglob("*") if p.is_file()]
    assert len(blobs) == manifest["blobs"] and all(mode(p) == 0o400 for p in blobs)
    assert all(mode(p) == 0o700 for p in (data / "blobs").rglob("*") if p.is_dir())
    assert not list(data.glob(".restore-*"))
    x(d, "audit", "verify", "--node-config", fin)

    # Restarted: what was queued or in flight goes again; office acknowledges each repeat as
    # a duplicate; none is lost, none received twice.
    start(d, "finance")
    wait_delivered(d, fin, set(held))
    assert set(outbox(d, fin)) == set(held)
    inbox = json.loads(x(d, "inbox", "--config", paths["office"], "--json"))
    got = [i["doc_id"] for i in inbox]
    for doc in set(held) | set(during):
        assert got.count(doc) == 1, doc
        assert audit_count(d, "office", "document-received", doc) == 1, doc
    repeats = sum(audit_count(d, "office", "document-duplicate", doc) for doc in resent)
    assert repeats >= len(resent)
    with NodeStore.open(data, create=False) as store:
        for item in store.outbox():
            store.check_blob(item["package_sha256"])
    x(d, "audit", "verify", "--node-config", fin)
    rows = json.loads(x(d, "audit", "show", "--config", fin, "--action", "node-restore",
                        *d.op("auditor"), "--json"))
    assert len(rows) == 1


# -- who may, and what is refused -----------------------------------------------------------------


def test_only_the_administrator_may_take_a_backup(net: tuple[Demo, dict[str, str]],
                                                  tmp_path: Path) -> None:
    d, paths = net
    fin = paths["finance"]
    for who in ("receiver", "auditor"):  # no role here; the auditor's role is not enough
        out = tmp_path / f"by-{who}"
        refused = take_backup(d, fin, out, who=who, ok=False)
        assert "not an active administrator" in refused
        assert not out.exists()
        assert audit_count(d, "finance", "node-backup", str(out)) == 1  # the refusal
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    assert "is not empty" in take_backup(d, fin, full, ok=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    take_backup(d, fin, empty)
    assert (empty / "backup.json").exists()


def test_a_backup_that_cannot_be_written_fails_clearly(net: tuple[Demo, dict[str, str]],
                                                       tmp_path: Path) -> None:
    d, paths = net
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "a-file" / "bk"
    refused = take_backup(d, paths["finance"], out, ok=False)
    assert f"cannot write the backup into {out}" in refused
    assert audit_count(d, "finance", "node-backup", str(out)) == 2  # the act, its failure


def test_openssl_verifies_the_backups_signature(net: tuple[Demo, dict[str, str]],
                                                tmp_path: Path) -> None:
    d, paths = net
    out = tmp_path / "bk"
    take_backup(d, paths["finance"], out)
    subprocess.run(["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in",
                    str(out / "backup.cms"), "-content", str(out / "backup.json"), "-CAfile",
                    str(d.work / "ca" / "ca.pem"), "-purpose", "any", "-out", "/dev/null"],
                   check=True, capture_output=True)
    signer = subprocess.run(["openssl", "cms", "-cmsout", "-print", "-inform", "DER", "-in",
                             str(out / "backup.cms")], capture_output=True, text=True).stdout
    assert "node-finance" in signer
    # One byte of the list changed: openssl refuses it too.
    (out / "backup.json").write_bytes((out / "backup.json").read_bytes().replace(
        b'"unit":"finance"', b'"unit":"financf"'))
    bad = subprocess.run(["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in",
                          str(out / "backup.cms"), "-content", str(out / "backup.json"),
                          "-CAfile", str(d.work / "ca" / "ca.pem"), "-purpose", "any", "-out",
                          "/dev/null"], capture_output=True)
    assert bad.returncode != 0


def test_a_tampered_backup_is_refused_saying_what(net: tuple[Demo, dict[str, str]],
                                                  tmp_path: Path) -> None:
    d, paths = net
    fin = paths["finance"]
    send(d, fin, 2)
    good = tmp_path / "good"
    take_backup(d, fin, good)
    manifest = json.loads((good / "backup.json").read_text())
    blob = next(f["path"] for f in manifest["files"] if f["path"].startswith("blobs/"))
    cfg = scratch(d, "finance", "tamper")
    target = Path(Config.load(cfg).data_dir)

    def tampered(name: str, change: Any) -> str:
        copy = tmp_path / name
        shutil.copytree(good, copy)
        change(copy)
        out = x(d, "restore", str(copy), "--config", cfg, ok=False)
        assert not (target / "node.db").exists()  # nothing installed
        assert not list(target.glob(".restore-*")) if target.exists() else True
        return out

    def flip(path: str) -> Any:
        def change(copy: Path) -> None:
            p = copy / path
            p.chmod(0o600)
            data = bytearray(p.read_bytes())
            data[len(data) // 2] ^= 0x01
            p.write_bytes(bytes(data))
        return change

    out = tampered("db", flip("node.db"))
    assert "node.db does not match the signed backup.json" in out
    out = tampered("blob", flip(blob))
    assert f"{blob} does not match the signed backup.json" in out
    out = tampered("list", lambda c: (c / "backup.json").write_bytes(
        (c / "backup.json").read_bytes().replace(b'"unit":"finance"', b'"unit":"financf"')))
    assert "backup.json's signature does not verify" in out and "altered" in out
    out = tampered("gone", lambda c: (c / blob).unlink())
    assert f"{blob}, listed in the signed backup.json, is missing" in out
    # The untouched backup restores.
    x(d, "restore", str(good), "--config", cfg)
    x(d, "audit", "verify", "--node-config", cfg)


def test_another_nodes_backup_and_a_bad_audit_chain_are_refused(
        net: tuple[Demo, dict[str, str]], tmp_path: Path) -> None:
    d, paths = net
    # A row of office's live log is edited (without its token, the chain breaks), a backup
    # taken, and the row put back.
    db = d.work / "office" / "data" / "node.db"
    conn = sqlite3.connect(db, timeout=30)
    try:
        seq, details = conn.execute("SELECT seq, details FROM audit WHERE action = 'node-start' "
                                    "ORDER BY seq LIMIT 1").fetchone()
        conn.execute("UPDATE audit SET details = ? WHERE seq = ?", ['{"edited":1}', seq])
        conn.commit()
        out = tmp_path / "office"
        take_backup(d, paths["office"], out)
    finally:
        conn.execute("UPDATE audit SET details = ? WHERE seq = ?", [details, seq])
        conn.commit()
        conn.close()
    refused = x(d, "restore", str(out), "--config", scratch(d, "office", "chain"), ok=False)
    assert "the backed-up audit log does not verify" in refused and f"entry {seq}" in refused
    # Office's backup is not finance's, whoever tries it.
    refused = x(d, "restore", str(out), "--config", scratch(d, "finance", "other"), ok=False)
    assert "not by this unit's node certificate" in refused and "node-office" in refused


def test_restore_over_a_store_needs_force_and_moves_it_aside(net: tuple[Demo, dict[str, str]],
                                                             tmp_path: Path) -> None:
    d, paths = net
    out = tmp_path / "bk"
    take_backup(d, paths["finance"], out)
    cfg = scratch(d, "finance", "twice")
    target = Config.load(cfg).data_dir
    x(d, "restore", str(out), "--config", cfg)
    before = dump(target / "node.db")
    refused = x(d, "restore", str(out), "--config", cfg, ok=False)
    assert "holds a node store already (node.db" in refused
    done = json.loads(x(d, "restore", str(out), "--config", cfg, "--force", "--json"))
    aside = Path(done["moved_aside"])
    assert aside.parent == target and aside.name.startswith("replaced-")
    assert dump(aside / "node.db") == before  # moved, not deleted
    assert (aside / "blobs").is_dir() and (target / "blobs").is_dir()
    x(d, "audit", "verify", "--node-config", cfg)
    # A process with the database open: refused, even with --force.
    conn = sqlite3.connect(target / "node.db")
    conn.execute("PRAGMA journal_mode=WAL")
    try:
        refused = x(d, "restore", str(out), "--config", cfg, "--force", ok=False)
        assert "in use by another process" in refused
    finally:
        conn.close()


# -- the parts, without daemons -------------------------------------------------------------------


def _store_with_a_document(tmp_path: Path) -> tuple[NodeStore, str]:
    store = NodeStore.open(tmp_path / "data")
    with store.blob_writer() as w:
        w.write(b"a package")
        sha = w.commit()
    store.enqueue(doc_id="d1", recipient="office", metadata={"title": "t"},
                  package_sha256=sha, size=len(b"a package"))
    return store, sha


def test_a_blob_gone_or_changed_after_the_snapshot_fails_the_backup_cleanly(
        tmp_path: Path) -> None:
    store, sha = _store_with_a_document(tmp_path)
    try:
        for case in ("gone", "changed"):
            out = tmp_path / case
            snap = backup.snapshot(store, out, tmp_path / "data" / MIRROR)
            blob = store.blob_path(sha)
            kept = blob.read_bytes()
            blob.chmod(0o600)
            if case == "gone":
                blob.unlink()
            else:
                blob.write_bytes(b"another package")
            with pytest.raises(backup.BackupError) as e:
                backup.copy_blobs(snap, store.blobs)
            assert sha in str(e.value)
            assert e.value.code == ("missing-blob" if case == "gone" else "corrupt-blob")
            backup.discard(snap.out, snap.created)
            assert not out.exists()
            blob.unlink(missing_ok=True)
            blob.write_bytes(kept)
    finally:
        store.close()


def test_the_checkpoints_copy_is_cut_at_the_snapshot() -> None:
    lines = b"".join(json.dumps({"seq": s}).encode() + b"\n" for s in (1, 5, 9))
    assert backup._mirror_upto(lines, 5) == b'{"seq": 1}\n{"seq": 5}\n'
    assert backup._mirror_upto(lines, 100) == lines


@pytest.mark.parametrize("path", ["../node.db", "/etc/passwd", "blobs/zz/" + "0" * 64,
                                  "blobs/00/" + "1" * 64, "other.db"])
def test_the_list_names_only_a_backups_files(path: str) -> None:
    sha = "0" * 64
    with pytest.raises(backup.BackupError):
        backup._check_files({"database": {"sha256": sha}, "files": [
            {"path": "node.db", "size": 1, "sha256": sha},
            {"path": path, "size": 1, "sha256": sha}]})


def test_a_backup_directory_must_be_new_or_empty(tmp_path: Path) -> None:
    backup.check_target(tmp_path / "new")
    backup.check_target(tmp_path)
    (tmp_path / "x").write_text("")
    with pytest.raises(backup.BackupError, match="not empty"):
        backup.check_target(tmp_path)
    with pytest.raises(backup.BackupError, match="absolute"):
        backup.check_target(Path("relative"))
