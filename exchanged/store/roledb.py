"""The roles' tables, in the CA's database and in every node's: who holds which role, who is
suspended, which signed role requests were applied. Data only; the rules are `exchanged.roles`.

- roles(id, person, holder_serial, holder_subject, role, division, status, granted_by,
      granted_at, grant_seq, reviewed_by, reviewed_at, review_seq, review_reason, revoked_by,
      revoked_at, revoke_seq)       status: pending -> active | rejected; active/pending -> revoked
- suspensions(person, since, by, seq, reason)       A39: every right of the person, at once
- role_requests(sha256, at)       signed role requests applied at a node (a replay is refused)

`*_seq` columns point at the audit entry that carries the act's signature.
"""

from __future__ import annotations

from typing import Any

import sqlite_utils

from exchanged.store.db import insert, one, rows, update

SCHEMA = """
CREATE TABLE IF NOT EXISTS roles (
    id INTEGER PRIMARY KEY, person TEXT NOT NULL, holder_serial TEXT NOT NULL,
    holder_subject TEXT NOT NULL, role TEXT NOT NULL, division TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL CHECK (status IN ('pending', 'active', 'rejected', 'revoked')),
    granted_by TEXT, granted_at TEXT NOT NULL, grant_seq INTEGER,
    reviewed_by TEXT, reviewed_at TEXT, review_seq INTEGER, review_reason TEXT,
    revoked_by TEXT, revoked_at TEXT, revoke_seq INTEGER);
CREATE INDEX IF NOT EXISTS roles_person ON roles(person, status);
CREATE TABLE IF NOT EXISTS role_requests (
    sha256 BLOB PRIMARY KEY, at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS suspensions (
    person TEXT PRIMARY KEY, since TEXT NOT NULL, by TEXT NOT NULL, seq INTEGER NOT NULL,
    reason TEXT NOT NULL);
"""


class RoleStore:
    """The roles' rows of one database. Every method runs inside the caller's transaction."""

    def __init__(self, db: sqlite_utils.Database) -> None:
        self.db = db

    @staticmethod
    def create(db: sqlite_utils.Database) -> None:
        db.conn.executescript(SCHEMA)

    # -- roles ------------------------------------------------------------------------------

    def empty(self) -> bool:
        """No role was ever recorded (the first holders may then be set up)."""
        return self.db.execute("SELECT 1 FROM roles LIMIT 1").fetchone() is None

    def held(self, person: str, statuses: tuple[str, ...] = ("active",)) -> list[dict[str, Any]]:
        marks = ",".join("?" * len(statuses))
        return rows(self.db, f"SELECT * FROM roles WHERE person = ? AND status IN ({marks}) "
                             "ORDER BY id", [person, *statuses])

    def list(self, status: str | None = None) -> list[dict[str, Any]]:
        sql = ("SELECT id, person, holder_subject, role, division, status, holder_serial, "
               "granted_by, granted_at, reviewed_by, reviewed_at FROM roles")
        params: list[Any] = []
        if status:
            sql += " WHERE status = ?"
            params.append(status)
        out = rows(self.db, sql + " ORDER BY id", params)
        suspended = {r[0] for r in self.db.execute("SELECT person FROM suspensions")}
        for r in out:
            r["suspended"] = r["person"] in suspended
        return out

    def row(self, role_id: int) -> dict[str, Any] | None:
        return one(self.db, "SELECT * FROM roles WHERE id = ?", [role_id])

    def add(self, *, person: str, holder_serial: str, holder_subject: str, role: str,
            division: str, status: str, granted_by: str | None, granted_at: str,
            grant_seq: int) -> int:
        return insert(self.db, "roles", {
            "person": person, "holder_serial": holder_serial, "holder_subject": holder_subject,
            "role": role, "division": division, "status": status, "granted_by": granted_by,
            "granted_at": granted_at, "grant_seq": grant_seq})

    def set(self, role_id: int, **values: Any) -> None:
        update(self.db, "roles", "id", role_id, values)

    def rebind(self, person: str, serial: str, subject: str) -> None:
        """The person's roles now go with their new certificate (a re-issue)."""
        self.db.execute("UPDATE roles SET holder_serial = ?, holder_subject = ? WHERE person = ? "
                        "AND status IN ('active', 'pending')", [serial, subject, person])

    # -- suspensions ------------------------------------------------------------------------

    def suspended(self, person: str) -> bool:
        return self.db.execute("SELECT 1 FROM suspensions WHERE person = ?",
                               [person]).fetchone() is not None

    def suspend(self, *, person: str, since: str, by: str, seq: int, reason: str) -> None:
        insert(self.db, "suspensions", {"person": person, "since": since, "by": by, "seq": seq,
                                        "reason": reason})

    def resume(self, person: str) -> None:
        self.db.execute("DELETE FROM suspensions WHERE person = ?", [person])

    # -- signed requests applied once -------------------------------------------------------

    def request_seen(self, digest: bytes) -> bool:
        return self.db.execute("SELECT 1 FROM role_requests WHERE sha256 = ?",
                               [digest]).fetchone() is not None

    def remember_request(self, digest: bytes, at: str) -> None:
        insert(self.db, "role_requests", {"sha256": digest, "at": at})
