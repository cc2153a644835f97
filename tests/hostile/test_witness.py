"""Class 2, beyond the database: a node's signed audit checkpoints are kept by a witness (its
peer), so a log cut back to an older checkpoint — with its recorded head and its local copy
rewritten too — is still found; and a witness refuses a checkpoint that contradicts one it
holds.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

from exchanged.store.audit import MIRROR
from hostile.conftest import Net


def _verify(net: Net, *copies: str) -> subprocess.CompletedProcess[str]:
    args = [a for c in copies for a in ("--checkpoints", c)]
    return subprocess.run([sys.executable, "-m", "exchanged", "audit", "verify", "--node-config",
                           str(net.cfg("finance")), *args, "--json"], cwd=net.d.work,
                          env=net.d.env, capture_output=True, text=True)


def _witnessed(net: Net) -> int:
    return int(net.sql("office", "SELECT count(*) FROM witnessed WHERE unit = 'finance'")[0][0])


def test_the_witness_keeps_checkpoints_and_a_cut_back_log_is_found(healthy: Net) -> None:
    net = healthy
    before = _witnessed(net)
    for _ in range(2):  # every stop signs a checkpoint; the next start gives it to the witness
        net.stop("finance")
        net.start("finance")
    net.d.wait_for("the witness", lambda: _witnessed(net) >= before + 2, timeout=30)
    copy = net.d.work / "finance-witnessed.jsonl"
    net.d.x("audit", "witnessed", "--config", str(net.cfg("office")), "--unit", "finance",
            "-o", str(copy), quiet=True)
    assert len(copy.read_text().splitlines()) == _witnessed(net)
    assert _verify(net, str(copy)).returncode == 0

    # Someone with the database and its directory cuts the log back to its first checkpoint,
    # rewrites the recorded head, and takes the local copy with it.
    net.stop("finance")
    db = net.d.work / "finance" / "data" / "node.db"
    saved = db.read_bytes(), (net.d.work / "finance" / "data" / MIRROR).read_bytes()
    try:
        conn = sqlite3.connect(db)
        conn.execute("DELETE FROM audit WHERE seq > 1")
        first = conn.execute("SELECT hash FROM audit WHERE seq = 1").fetchone()[0]
        conn.execute("UPDATE audit_head SET checkpoint_seq = 1, checkpoint_hash = ?", [first])
        conn.commit()
        conn.close()
        for p in (db.with_name("node.db-wal"), db.with_name("node.db-shm")):
            p.unlink(missing_ok=True)
        (net.d.work / "finance" / "data" / MIRROR).unlink()
        assert _verify(net).returncode == 0  # the stated limit, alone
        found = _verify(net, str(copy))
        assert found.returncode != 0
        assert any("kept outside the database" in f and "truncated" in f
                   for f in json.loads(found.stdout)["findings"]), found.stdout
    finally:
        db.write_bytes(saved[0])
        (net.d.work / "finance" / "data" / MIRROR).write_bytes(saved[1])
        net.start("finance")


def test_a_witness_refuses_a_checkpoint_that_contradicts_one_it_holds(healthy: Net) -> None:
    """A rewritten log's checkpoint under a number the witness holds, or older than one it
    holds, is refused (the daemon then audits and alerts: inbound._witness)."""
    from exchanged.store.nodedb import NodeStore
    net = healthy
    net.d.wait_for("a witnessed checkpoint", lambda: _witnessed(net) >= 1, timeout=30)
    net.stop("office")
    try:
        store = NodeStore.open(net.d.work / "office" / "data", create=False)
        try:
            [held] = store.witnessed("finance")[-1:]
            forged = dict(held, hash="0" * 64)
            for record, why in ((forged, "other content"), (dict(held, seq=held["seq"] - 1),
                                                            "cut back")):
                try:
                    store.witness("finance", record)
                except Exception as e:
                    assert why in str(e) and getattr(e, "code", "") == "id-conflict"
                else:
                    raise AssertionError(f"a {why} checkpoint was kept")
        finally:
            store.close()
    finally:
        net.start("office")
