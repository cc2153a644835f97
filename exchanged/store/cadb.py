"""The CA's database: requests, certificates, status changes, CRLs, roles and the audit log.

One SQLite file (`ca.db` in the CA directory), WAL mode with synchronous=FULL so that a
committed change survives a crash. Every change the CA makes is one transaction: either all
of it lands (the request's new state, the certificate, the audit entry carrying the
operator's signature) or none.

Layout (README "CA directory" repeats it for operators):

- meta(key, value)                      schema version and the CA's identity
- audit, audit_head        the hash-chained audit log (exchanged/store/audit.py); an
      operator's act is an entry whose `details` are the canonical JSON they signed and whose
      `signature` is the detached CMS SignedData made on their token. Columns named *_seq
      below point at such entries.
- roles, suspensions      who holds which role (exchanged/roles.py)
- requests(id, submitted_at, profile, name, unit, division, post, reason, dns, ip, csr_pem,
      key_sha256, applicant_serial, status, decided_by, decided_at, decision_reason,
      decision_seq, cert_serial, supersedes, submit_seq)
      status: pending -> approved -> issued, or pending -> rejected
- certificates(serial, request_id, profile, subject, not_before, not_after, pem, status,
      issued_at, issued_by, issue_seq, revoked_at, reason)
      status: good | held | revoked; `reason` is the RFC 5280 reason name while held/revoked
- status_changes(id, serial, action, reason, at, officer_serial, seq)   hold/release/revoke
- crls(number, this_update, next_update, entries, path, sha256)

Serials are lower-case hex text (they are up to 20 octets; SQLite integers hold 8).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import sqlite_utils

from exchanged.errors import ExchangedError
from exchanged.roles import Roles
from exchanged.store.audit import AuditLog

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY, submitted_at TEXT NOT NULL, profile TEXT NOT NULL,
    name TEXT NOT NULL, unit TEXT NOT NULL, division TEXT NOT NULL DEFAULT '',
    post TEXT NOT NULL DEFAULT '', reason TEXT NOT NULL DEFAULT '',
    dns TEXT NOT NULL DEFAULT '[]', ip TEXT NOT NULL DEFAULT '[]',
    csr_pem TEXT NOT NULL, key_sha256 TEXT NOT NULL, applicant_serial TEXT,
    status TEXT NOT NULL CHECK (status IN ('pending','approved','rejected','issued')),
    decided_by TEXT, decided_at TEXT, decision_reason TEXT,
    decision_seq INTEGER, cert_serial TEXT, supersedes TEXT, submit_seq INTEGER);
CREATE INDEX IF NOT EXISTS requests_status ON requests(status);
CREATE TABLE IF NOT EXISTS certificates (
    serial TEXT PRIMARY KEY, request_id INTEGER REFERENCES requests(id), profile TEXT NOT NULL,
    subject TEXT NOT NULL, not_before TEXT NOT NULL, not_after TEXT NOT NULL, pem TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('good','held','revoked')),
    issued_at TEXT NOT NULL, issued_by TEXT, issue_seq INTEGER,
    revoked_at TEXT, reason TEXT);
CREATE INDEX IF NOT EXISTS certificates_status ON certificates(status);
CREATE TABLE IF NOT EXISTS status_changes (
    id INTEGER PRIMARY KEY, serial TEXT NOT NULL REFERENCES certificates(serial),
    action TEXT NOT NULL CHECK (action IN ('hold','release','revoke')), reason TEXT,
    at TEXT NOT NULL, officer_serial TEXT NOT NULL, seq INTEGER);
CREATE TABLE IF NOT EXISTS crls (
    number INTEGER PRIMARY KEY, this_update TEXT NOT NULL, next_update TEXT NOT NULL,
    entries INTEGER NOT NULL, path TEXT NOT NULL, sha256 TEXT NOT NULL);
"""


class StoreError(ExchangedError):
    code = "store"


def open_db(path: Path, *, create: bool = False) -> sqlite_utils.Database:
    """Open (or with `create`, make) the CA database; WAL, synchronous=FULL, foreign keys on."""
    if not create and not path.exists():
        raise StoreError(f"no CA database at {path}: run `exchanged ca init` first, or give "
                         "the right --dir", code="no-ca")
    try:
        db = connect(path)
        conn = db.conn
        if create:
            conn.executescript(_SCHEMA)
            AuditLog.create(db)
            Roles.create(db)
            db["meta"].upsert({"key": "schema_version", "value": str(SCHEMA_VERSION)},
                              pk="key")
        version = _meta(db, "schema_version")
    except sqlite3.DatabaseError as e:
        raise StoreError(f"the CA database {path} cannot be read ({e}); restore it from "
                         "a backup", code="corrupt-db") from None
    if version != str(SCHEMA_VERSION):
        raise StoreError(f"the CA database {path} has schema version {version}; this "
                         f"exchanged expects {SCHEMA_VERSION}", code="schema")
    return db


def connect(path: Path) -> sqlite_utils.Database:
    """A connection as every store of ours wants it: WAL, synchronous=FULL (a committed
    transaction survives power loss), foreign keys on, transactions managed by us."""
    # check_same_thread=False: the daemon reaches its database from worker threads, one at a
    # time (a trio CapacityLimiter(1) per database serialises every call).
    conn = sqlite3.connect(str(path), isolation_level=None, timeout=30, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    return sqlite_utils.Database(conn)


def _meta(db: sqlite_utils.Database, key: str) -> str | None:
    row = db.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()
    return row[0] if row else None


class Transaction:
    """`with Transaction(db):` — BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception."""

    def __init__(self, db: sqlite_utils.Database) -> None:
        self.db = db

    def __enter__(self) -> sqlite_utils.Database:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is None:
            self.db.execute("COMMIT")
        else:
            self.db.execute("ROLLBACK")


def rows(db: sqlite_utils.Database, sql: str, params: Any = ()) -> list[dict[str, Any]]:
    cur = db.execute(sql, params)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def one(db: sqlite_utils.Database, sql: str, params: Any = ()) -> dict[str, Any] | None:
    found = rows(db, sql, params)
    return found[0] if found else None
