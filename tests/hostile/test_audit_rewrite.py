"""Class 2: a log rewritten by someone who can write the database, but holds no token, is found
whatever they relabel.

Regression (the review's attack): edit an entry covered by two signed checkpoints, delete
another, rename the later checkpoints (their signatures were checked only by action name),
recompute every hash, pad to the recorded length: `audit verify` found nothing
(`audit_head.checkpoint_hash` was read and never compared).
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from exchanged.store.audit import GENESIS_PREV, MIRROR, AuditLog, entry_hash
from exchanged.store.db import connect
from hostile.conftest import Net


@pytest.fixture
def ca_copy(net: Net, tmp_path: Path) -> Path:
    """A copy of the demo CA's directory (its log has checkpoints, acts and events)."""
    d = tmp_path / "ca"
    shutil.copytree(net.d.work / "ca", d)
    return d


def findings(ca_dir: Path, *, mirror: bool = True) -> list[str]:
    cert = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    db = connect(ca_dir / "ca.db")
    try:
        report = AuditLog(db).verify(cert, issuer=cert,
                                     mirrors=[ca_dir / MIRROR] if mirror else [])
        return [str(f) for f in report.findings]
    finally:
        db.conn.close()


def rows(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    conn.row_factory = sqlite3.Row
    return [dict(r) for r in conn.execute("SELECT * FROM audit ORDER BY seq")]


def rewrite(conn: sqlite3.Connection, new: list[dict[str, Any]]) -> None:
    """Renumber, relink and rehash `new` as the whole log, as a forger with no token can."""
    conn.execute("DELETE FROM audit")
    prev = GENESIS_PREV
    for seq, r in enumerate(new, 1):
        r["seq"], r["prev"] = seq, prev
        r["hash"] = prev = entry_hash(r)
        conn.execute(f"INSERT INTO audit ({', '.join(r)}) VALUES ({', '.join('?' * len(r))})",
                     list(r.values()))
    conn.commit()


def the_attack(ca_dir: Path, *, head_to_genesis: bool) -> None:
    conn = sqlite3.connect(ca_dir / "ca.db")
    log = rows(conn)
    head_seq = conn.execute("SELECT checkpoint_seq FROM audit_head").fetchone()[0]
    cps = [r["seq"] for r in log if r["action"] == "checkpoint"]
    assert len(cps) >= 4, "the demo CA's log should have several checkpoints"
    c1, c2 = next((a, b) for a, b in zip(cps, cps[1:], strict=False) if b - a > 2)
    covered = [r for r in log if c1 < r["seq"] < c2]
    edited, deleted = covered[0]["seq"], covered[1]["seq"]
    new = []
    for r in log:
        if r["seq"] == deleted:
            continue
        if r["seq"] == edited:
            r["object"] = "nothing happened"
            if r["actor"] is not None:  # make it look like a plain event
                r["actor"], r["signature"] = None, None
        if r["action"] == "checkpoint" and r["seq"] >= c2:
            r.update(action="crl-publish", signature=None, actor=None)  # relabelled, stripped
        new.append(r)
    while len(new) < len(log):  # padded to the recorded length
        new.append(dict(new[-1], action="node-start", object="pad", signature=None,
                        actor=None))
    rewrite(conn, new)
    if head_to_genesis:  # and the recorded head moved back to the first checkpoint
        first = conn.execute("SELECT hash FROM audit WHERE seq = 1").fetchone()[0]
        conn.execute("UPDATE audit_head SET checkpoint_seq = 1, checkpoint_hash = ?", [first])
    else:  # or pointed at whatever now stands where the head was
        h = conn.execute("SELECT hash FROM audit WHERE seq = ?", [head_seq]).fetchone()[0]
        conn.execute("UPDATE audit_head SET checkpoint_hash = ?", [h])
    conn.commit()
    conn.close()


def test_the_untouched_log_and_its_copy_verify(ca_copy: Path) -> None:
    assert (ca_copy / MIRROR).stat().st_size > 0
    assert findings(ca_copy) == []


def test_the_reviewed_attack_is_found_by_the_recorded_head(ca_copy: Path) -> None:
    the_attack(ca_copy, head_to_genesis=False)
    found = findings(ca_copy, mirror=False)
    assert any("recorded head" in f for f in found), found


def test_the_attack_with_its_head_moved_back_is_found_by_the_copy(ca_copy: Path) -> None:
    the_attack(ca_copy, head_to_genesis=True)
    found = findings(ca_copy)
    assert any("kept outside the database" in f for f in found), found
    # Without the copy, this is the stated limit (a witness covers a node's log too).
    assert findings(ca_copy, mirror=False) == []


def test_a_relabelled_checkpoint_keeping_its_signature_breaks_the_grammar(ca_copy: Path
                                                                          ) -> None:
    conn = sqlite3.connect(ca_copy / "ca.db")
    log = rows(conn)
    last_cp = max(r["seq"] for r in log if r["action"] == "checkpoint")
    for r in log:
        if r["seq"] == last_cp:
            r["action"] = "crl-publish"
    rewrite(conn, log)
    conn.close()
    found = findings(ca_copy, mirror=False)
    assert any(f.startswith(f"entry {last_cp}:") and "names no actor" in f for f in found)


def test_an_operators_act_rewritten_fails_the_operators_signature(ca_copy: Path) -> None:
    conn = sqlite3.connect(ca_copy / "ca.db")
    log = rows(conn)
    act = next(r for r in log if r["actor"] is not None and r["action"] == "role-bootstrap")
    act["details"] = act["details"].replace("administrator", "auditor")
    rewrite(conn, log)
    conn.close()
    found = findings(ca_copy, mirror=False)
    assert any(f.startswith(f"entry {act['seq']}:") and "actor's signature" in f
               for f in found), found


def test_a_copy_line_forged_or_cut_is_found(ca_copy: Path) -> None:
    lines = (ca_copy / MIRROR).read_bytes().splitlines(keepends=True)
    (ca_copy / MIRROR).write_bytes(b"".join(lines[:-1]) + lines[-1].replace(b'"seq":',
                                                                            b'"seq":1'))
    assert any("copy" in f for f in findings(ca_copy))
