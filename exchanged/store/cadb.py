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
- roles, suspensions, role_requests   who holds which role (exchanged/store/roledb.py)
- persons(id, name, unit, created_at, request_id, current_serial)    the registry: each person
      once, under a stable id (`P-` + 16 hex digits) carried in their certificates' subject
      (serialNumber); `current_serial` is the certificate they act with now
- requests(id, submitted_at, profile, name, unit, division, post, reason, dns, ip, csr_pem,
      key_sha256, applicant_serial, status, decided_by, decided_at, decision_reason,
      decision_seq, cert_serial, supersedes, submit_seq, person_id, approvals_needed, flags,
      submitted_by)
      status: pending -> approved -> issued, or pending -> rejected. `person_id` is set for a
      re-issue (the same person); a new person gets an id when issued. `approvals_needed` is
      2 (dual control) when `flags` (JSON list of reasons) says why
- approvals(request_id, person, officer_serial, seq, at)    one row per approving officer
- certificates(serial, request_id, profile, subject, not_before, not_after, pem, status,
      issued_at, issued_by, issue_seq, revoked_at, reason, person_id)
      status: good | held | revoked; `reason` is the RFC 5280 reason name while held/revoked
- status_changes(id, serial, action, reason, at, officer_serial, seq)   hold/release/revoke
- crls(number, this_update, next_update, entries, path, sha256)

Serials are lower-case hex text (they are up to 20 octets; SQLite integers hold 8).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlite_utils
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from exchanged.common import stamp
from exchanged.store.audit import AuditLog
from exchanged.store.db import StoreError, connect, insert, one, rows, update
from exchanged.store.roledb import RoleStore

SCHEMA_VERSION = 2  # 2: the person registry, dual control

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
    decision_seq INTEGER, cert_serial TEXT, supersedes TEXT, submit_seq INTEGER,
    person_id TEXT, approvals_needed INTEGER NOT NULL DEFAULT 1 CHECK (approvals_needed >= 1),
    flags TEXT NOT NULL DEFAULT '[]', submitted_by TEXT);
CREATE INDEX IF NOT EXISTS requests_status ON requests(status);
CREATE TABLE IF NOT EXISTS persons (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, unit TEXT NOT NULL, created_at TEXT NOT NULL,
    request_id INTEGER REFERENCES requests(id), current_serial TEXT);
CREATE TABLE IF NOT EXISTS approvals (
    request_id INTEGER NOT NULL REFERENCES requests(id), person TEXT NOT NULL,
    officer_serial TEXT NOT NULL, seq INTEGER NOT NULL, at TEXT NOT NULL,
    PRIMARY KEY (request_id, person));
CREATE TABLE IF NOT EXISTS certificates (
    serial TEXT PRIMARY KEY, request_id INTEGER REFERENCES requests(id), profile TEXT NOT NULL,
    subject TEXT NOT NULL, not_before TEXT NOT NULL, not_after TEXT NOT NULL, pem TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('good','held','revoked')),
    issued_at TEXT NOT NULL, issued_by TEXT, issue_seq INTEGER,
    revoked_at TEXT, reason TEXT, person_id TEXT);
CREATE INDEX IF NOT EXISTS certificates_status ON certificates(status);
CREATE TABLE IF NOT EXISTS status_changes (
    id INTEGER PRIMARY KEY, serial TEXT NOT NULL REFERENCES certificates(serial),
    action TEXT NOT NULL CHECK (action IN ('hold','release','revoke')), reason TEXT,
    at TEXT NOT NULL, officer_serial TEXT NOT NULL, seq INTEGER);
CREATE TABLE IF NOT EXISTS crls (
    number INTEGER PRIMARY KEY, this_update TEXT NOT NULL, next_update TEXT NOT NULL,
    entries INTEGER NOT NULL, path TEXT NOT NULL, sha256 TEXT NOT NULL);
"""



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
            RoleStore.create(db)
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                         [str(SCHEMA_VERSION)])
        found = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.DatabaseError as e:
        raise StoreError(f"the CA database {path} cannot be read ({e}); restore it from "
                         "a backup", code="corrupt-db") from None
    version = found[0] if found else None
    if version != str(SCHEMA_VERSION):
        raise StoreError(f"the CA database {path} has schema version {version}; this "
                         f"exchanged expects {SCHEMA_VERSION}", code="schema")
    return db


def serial_hex(serial: int) -> str:
    return format(serial, "x")


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


class CaStore:
    """The CA's rows: requests, certificates, status changes, CRLs, meta. Every method runs
    inside the caller's transaction (or alone, for a read)."""

    def __init__(self, db: sqlite_utils.Database) -> None:
        self.db = db

    def set_meta(self, values: dict[str, str]) -> None:
        for key, value in values.items():
            self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                            [key, value])

    # -- requests ---------------------------------------------------------------------------

    def add_request(self, *, profile: str, form: dict[str, Any],
                    csr: x509.CertificateSigningRequest, key_sha256: str, status: str, at: str,
                    **decision: Any) -> int:
        """One issuance request: the application form (A28), the CSR, and — for a request
        decided as it is made (the ceremony, a re-issue) — its decision columns."""
        return insert(self.db, "requests", {
            "submitted_at": at, "profile": profile, "name": form["name"], "unit": form["unit"],
            "division": form["division"], "post": form["post"], "reason": form["reason"],
            "dns": json.dumps(list(form["dns"])), "ip": json.dumps(list(form["ip"])),
            "csr_pem": csr.public_bytes(serialization.Encoding.PEM).decode(),
            "key_sha256": key_sha256, "status": status, **decision})

    def update_request(self, rid: int, **values: Any) -> None:
        update(self.db, "requests", "id", rid, values)

    def request(self, rid: int) -> dict[str, Any] | None:
        row = one(self.db, "SELECT * FROM requests WHERE id = ?", [rid])
        if row is not None:
            for k in ("dns", "ip", "flags"):
                row[k] = json.loads(row[k])
        return row

    def request_status(self, rid: int) -> str | None:
        row = one(self.db, "SELECT status FROM requests WHERE id = ?", [rid])
        return None if row is None else str(row["status"])

    def requests(self, status: str | None = None) -> list[dict[str, Any]]:
        return self._listing("SELECT id, submitted_at, profile, name, unit, division, post, "
                             "status, (SELECT count(*) FROM approvals a WHERE a.request_id = "
                             "requests.id) || '/' || approvals_needed AS approvals, flags, "
                             "decided_by, cert_serial FROM requests", status, "id")

    # -- the person registry ----------------------------------------------------------------

    def add_person(self, *, person_id: str, name: str, unit: str, at: str,
                   request_id: int | None) -> None:
        insert(self.db, "persons", {"id": person_id, "name": name, "unit": unit,
                                    "created_at": at, "request_id": request_id})

    def person(self, person_id: str) -> dict[str, Any] | None:
        return one(self.db, "SELECT * FROM persons WHERE id = ?", [person_id])

    def persons(self) -> list[dict[str, Any]]:
        return rows(self.db, "SELECT * FROM persons ORDER BY created_at, id")

    def set_current(self, person_id: str, serial: str) -> None:
        update(self.db, "persons", "id", person_id, {"current_serial": serial})

    # -- approvals (dual control) -----------------------------------------------------------

    def add_approval(self, *, request_id: int, person: str, officer_serial: str, seq: int,
                     at: str) -> None:
        insert(self.db, "approvals", {"request_id": request_id, "person": person,
                                      "officer_serial": officer_serial, "seq": seq, "at": at})

    def approvals(self, request_id: int) -> list[dict[str, Any]]:
        return rows(self.db, "SELECT * FROM approvals WHERE request_id = ? ORDER BY seq",
                    [request_id])

    # -- certificates -----------------------------------------------------------------------

    def add_certificate(self, cert: x509.Certificate, *, request_id: int | None, profile: str,
                        at: str, by: str | None, seq: int | None, person_id: str | None = None
                        ) -> None:
        insert(self.db, "certificates", {"person_id": person_id or None,
            "serial": serial_hex(cert.serial_number), "request_id": request_id,
            "profile": profile, "subject": cert.subject.rfc4514_string(),
            "not_before": stamp(cert.not_valid_before_utc),
            "not_after": stamp(cert.not_valid_after_utc), "pem": pem(cert), "status": "good",
            "issued_at": at, "issued_by": by, "issue_seq": seq})

    def certificate(self, serial: str) -> dict[str, Any] | None:
        return one(self.db, "SELECT * FROM certificates WHERE serial = ?", [serial])

    def serial_taken(self, serial: str) -> bool:
        return self.db.execute("SELECT 1 FROM certificates WHERE serial = ?",
                               [serial]).fetchone() is not None

    def certificates(self, status: str | None = None) -> list[dict[str, Any]]:
        return self._listing("SELECT serial, profile, subject, person_id AS person, "
                             "not_before, not_after, status, reason, revoked_at, request_id "
                             "FROM certificates", status, "issued_at")

    def _listing(self, select: str, status: str | None, order: str) -> list[dict[str, Any]]:
        if status:
            return rows(self.db, f"{select} WHERE status = ? ORDER BY {order}", [status])
        return rows(self.db, f"{select} ORDER BY {order}")

    def set_status(self, serial: str, *, action: str, status: str, at: str,
                   revoked_at: str | None, reason: str | None, officer: str, seq: int) -> None:
        """A hold, release or revocation: the certificate's new status and its history row."""
        update(self.db, "certificates", "serial", serial,
               {"status": status, "revoked_at": revoked_at, "reason": reason})
        insert(self.db, "status_changes", {"serial": serial, "action": action, "reason": reason,
                                           "at": at, "officer_serial": officer, "seq": seq})

    def listed(self) -> Iterator[tuple[str, str, str]]:
        """(serial, since, reason) of every held or revoked certificate: a CRL's entries."""
        yield from self.db.execute("SELECT serial, revoked_at, reason FROM certificates "
                                   "WHERE status IN ('held', 'revoked')")

    # -- CRLs -------------------------------------------------------------------------------

    def next_crl_number(self) -> int:
        found = self.db.execute("SELECT max(number) FROM crls").fetchone()
        return int(found[0] or 0) + 1

    def add_crl(self, *, number: int, this_update: str, next_update: str, entries: int,
                path: str, sha256: str) -> None:
        insert(self.db, "crls", {"number": number, "this_update": this_update,
                                 "next_update": next_update, "entries": entries, "path": path,
                                 "sha256": sha256})
