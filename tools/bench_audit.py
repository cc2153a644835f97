#!/usr/bin/env python3
"""Benchmark the audit log: append N entries (default 1,000,000) with a checkpoint signed on a
SoftHSM token every 10,000, showing that appending stays O(1) (the rate of the first and the
last 10,000 appends), then time `verify` of the whole chain.

Run it with tools/bench-audit [N].
"""

from __future__ import annotations

import datetime as dt
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sqlite_utils  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

from exchanged.pki import profiles  # noqa: E402
from exchanged.pki.pin import PinSource  # noqa: E402
from exchanged.pki.token import Token  # noqa: E402
from exchanged.pki.uri import parse  # noqa: E402
from exchanged.store.audit import AuditLog  # noqa: E402

BATCH = 10_000


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    work = Path(tempfile.mkdtemp(prefix="bench-audit-"))
    out = subprocess.run(["bash", str(ROOT / "softhsm-setup.sh"), str(work / "tokens"),
                          "bench-audit"], capture_output=True, text=True, check=True).stdout
    os.environ["SOFTHSM2_CONF"] = re.search(r"SOFTHSM2_CONF=(\S+)", out).group(1)  # type: ignore[union-attr]
    token = Token.open(parse("pkcs11:token=bench-audit"),
                       PinSource("bench", "X", str(work / "tokens" / "bench-audit.pin")))
    key = token.generate_keypair("node")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Bench node")])
    cert = profiles.ca_root(name=name, public_key=key.public_key,
                            not_before=dt.datetime.now(dt.UTC), days=1).sign(
        key.signer(), hashes.SHA256())

    conn = sqlite3.connect(str(work / "audit.db"), isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    db = sqlite_utils.Database(conn)
    AuditLog.create(db)
    log = AuditLog(db)
    print(f"audit log of {n:,} entries, a token-signed checkpoint every {BATCH:,}")
    rates = []
    t_all = time.perf_counter()
    for start in range(0, n, BATCH):
        t = time.perf_counter()
        db.execute("BEGIN IMMEDIATE")
        for i in range(start, min(n, start + BATCH) - 1):
            log.append(action="document-received", obj=f"doc-{i}",
                       actor_subject="CN=node-office,O=General Office",
                       details={"sha256": "ab" * 32, "size": i})
        log.checkpoint(key.sign, cert)
        db.execute("COMMIT")
        rates.append(BATCH / (time.perf_counter() - t))
    t_all = time.perf_counter() - t_all
    print(f"  append, in transactions of {BATCH:,}          {n / t_all:10,.0f} entries/s")
    print(f"  append rate, first {BATCH:,}                  {rates[0]:10,.0f} entries/s")
    print(f"  append rate, last {BATCH:,}                   {rates[-1]:10,.0f} entries/s")
    t = time.perf_counter()
    report = log.verify(cert)
    t_verify = time.perf_counter() - t
    assert report.ok and report.entries == n, report.findings[:3]
    print(f"  verify {report.entries:,} entries, {report.checkpoints} checkpoints "
          f"  {t_verify:8.2f} s ({report.entries / t_verify:,.0f} entries/s)")
    size = (work / "audit.db").stat().st_size + sum(
        p.stat().st_size for p in work.glob("audit.db-*"))
    print(f"  database size                               {size / 1e6:8.1f} MB")
    token.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
