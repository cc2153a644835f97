"""The exchange box's rows in a node's database: what happens to a document after it arrives
(registered, distributed, forwarded, returned, its paper original received), the copies each
division signs for, the receipts that came back for what we sent, and the number sequences.
Data and state transitions only; who may do what is `exchanged.roles`, the acts themselves
`exchanged.box`.

- copies(id, inbox_id, division, state, distributed_at, distributed_by, signed_for_at,
      signed_for_by, receipt)      UNIQUE(inbox_id, division); state: pending -> signed-for
- outbox_receipts(id, doc_id, kind, division, by_serial, by_subject, at, receipt)    what came
      back for a document we sent: signed-for receipts (the unit's, each division's copy's)
      and a return notice; UNIQUE(doc_id, kind, division)
- sequences(name, year, next)      gap-free numbers per name and year: a number is taken in
      the transaction that records what it numbers, so a rolled-back act (or a SIGKILL before
      the commit) takes none, and two acts never take the same one

Every method runs inside the caller's transaction (`NodeStore.transaction()`), so an act, its
rows and its audit entry commit together.
"""

from __future__ import annotations

import time
from typing import Any

import sqlite_utils

from exchanged.store.db import StoreError, one, rows

SCHEMA = """
CREATE TABLE IF NOT EXISTS copies (
    id INTEGER PRIMARY KEY, inbox_id INTEGER NOT NULL REFERENCES inbox(id),
    division TEXT NOT NULL, state TEXT NOT NULL CHECK (state IN ('pending', 'signed-for')),
    distributed_at REAL NOT NULL, distributed_by TEXT NOT NULL,
    signed_for_at REAL, signed_for_by TEXT, receipt BLOB,
    UNIQUE (inbox_id, division));
CREATE TABLE IF NOT EXISTS outbox_receipts (
    id INTEGER PRIMARY KEY, doc_id TEXT NOT NULL, kind TEXT NOT NULL,
    division TEXT NOT NULL DEFAULT '', by_serial TEXT NOT NULL, by_subject TEXT NOT NULL,
    at REAL NOT NULL, receipt BLOB NOT NULL, UNIQUE (doc_id, kind, division));
CREATE TABLE IF NOT EXISTS sequences (
    name TEXT NOT NULL, year INTEGER NOT NULL, next INTEGER NOT NULL,
    PRIMARY KEY (name, year));
"""


class BoxStore:
    """The exchange box's rows of one node database."""

    def __init__(self, db: sqlite_utils.Database) -> None:
        self.db = db

    @staticmethod
    def create(db: sqlite_utils.Database) -> None:
        db.conn.executescript(SCHEMA)

    # -- numbers ----------------------------------------------------------------------------

    def take_number(self, name: str, year: int) -> int:
        """The next number of sequence `name` in `year` (1, 2, ...), taken now: call inside
        the transaction that records what it numbers."""
        if not self.db.conn.in_transaction:
            raise StoreError("a number is taken inside the act's transaction", code="internal")
        self.db.execute("INSERT OR IGNORE INTO sequences (name, year, next) VALUES (?, ?, 1)",
                        [name, year])
        n = int(self.db.execute("SELECT next FROM sequences WHERE name = ? AND year = ?",
                                [name, year]).fetchone()[0])
        self.db.execute("UPDATE sequences SET next = ? WHERE name = ? AND year = ?",
                        [n + 1, name, year])
        return n

    def peek_number(self, name: str, year: int) -> int:
        """The number `take_number` would give now (nothing is taken)."""
        found = self.db.execute("SELECT next FROM sequences WHERE name = ? AND year = ?",
                                [name, year]).fetchone()
        return 1 if found is None else int(found[0])

    def outgoing_number_used(self, number: str) -> str | None:
        """The document of ours that already carries `number`, if one does."""
        found = self.db.execute("SELECT doc_id FROM outbox WHERE json_extract(metadata, "
                                "'$.number') = ? LIMIT 1", [number]).fetchone()
        return None if found is None else str(found[0])

    # -- the inbox's acts -------------------------------------------------------------------

    def item(self, doc_id: str) -> dict[str, Any]:
        found = rows(self.db, "SELECT * FROM inbox WHERE doc_id = ?", [doc_id])
        if not found:
            raise StoreError(f"no document {doc_id} in the exchange box", code="not-found")
        if len(found) > 1:
            raise StoreError(f"{len(found)} senders sent a document {doc_id}", code="ambiguous")
        return found[0]

    def _move(self, row: dict[str, Any], action: str, allowed: tuple[str, ...],
              **values: Any) -> None:
        if row["state"] not in allowed:
            raise StoreError(f"cannot {action} document {row['doc_id']}: it is {row['state']}, "
                             f"not {' or '.join(allowed)}", code="bad-state")
        values["updated_at"] = time.time()
        self.db.execute(f"UPDATE inbox SET {', '.join(f'{k} = ?' for k in values)} "
                        "WHERE id = ?", [*values.values(), row["id"]])

    def register(self, row: dict[str, Any], number: str, by: str) -> None:
        """signed-for -> registered, with its register number (unique)."""
        if row["box"]:
            raise StoreError(f"document {row['doc_id']} is in the {row['box']} box; the "
                             "archives section registers what is in the unit's box (a division "
                             "passes it on first: forward --to-registrar)", code="bad-state")
        self._move(row, "register", ("signed-for",), state="registered",
                   register_number=number, registered_at=time.time(), registered_by=by)

    def distribute(self, row: dict[str, Any], divisions: list[str], by: str) -> None:
        """registered -> distributed: a copy for each division, pending its sign-for."""
        self._move(row, "distribute", ("registered",), state="distributed")
        now = time.time()
        for division in divisions:
            self.db.execute("INSERT INTO copies (inbox_id, division, state, distributed_at, "
                            "distributed_by) VALUES (?, ?, 'pending', ?, ?)",
                            [row["id"], division, now, by])

    def copy(self, row: dict[str, Any], division: str) -> dict[str, Any]:
        found = one(self.db, "SELECT * FROM copies WHERE inbox_id = ? AND division = ?",
                    [row["id"], division])
        if found is None:
            raise StoreError(f"document {row['doc_id']} was not distributed to {division}",
                             code="not-found")
        return found

    def copies(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        return rows(self.db, "SELECT * FROM copies WHERE inbox_id = ? ORDER BY id", [row["id"]])

    def sign_copy(self, copy: dict[str, Any], receipt: bytes, by: str) -> None:
        if copy["state"] != "pending":
            raise StoreError(f"the {copy['division']} copy is {copy['state']} already",
                             code="bad-state")
        self.db.execute("UPDATE copies SET state = 'signed-for', signed_for_at = ?, "
                        "signed_for_by = ?, receipt = ? WHERE id = ?",
                        [time.time(), by, receipt, copy["id"]])

    def close(self, row: dict[str, Any], state: str, allowed: tuple[str, ...], by: str,
              note: str) -> None:
        """-> returned or forwarded: the document leaves this unit's box for good."""
        action = {"returned": "return", "forwarded": "forward"}[state]
        self._move(row, action, allowed, state=state, closed_at=time.time(), closed_by=by,
                   close_note=note)

    def pass_to(self, row: dict[str, Any], box: str) -> None:
        """A division passes a document it signed for to the unit's box (A19)."""
        self._move(row, "pass on", ("signed-for",), box=box)

    def paper_received(self, row: dict[str, Any], by: str) -> None:
        if row["paper_received_at"] is not None:
            raise StoreError(f"the paper original of {row['doc_id']} was recorded already",
                             code="bad-state")
        self.db.execute("UPDATE inbox SET paper_received_at = ?, paper_received_by = ?, "
                        "updated_at = ? WHERE id = ?", [time.time(), by, time.time(), row["id"]])

    def reminded(self, inbox_id: int, at: float) -> None:
        self.db.execute("UPDATE inbox SET reminded_at = ? WHERE id = ?", [at, inbox_id])

    # -- boxes and what is due --------------------------------------------------------------

    def box(self, division: str | None) -> list[dict[str, Any]]:
        """A box's documents: the unit's ('' or None), or a division's (its own documents and
        the copies it was given), oldest first."""
        if not division:
            return rows(self.db, "SELECT * FROM inbox WHERE box = '' ORDER BY id")
        own = rows(self.db, "SELECT *, NULL AS copy_state FROM inbox WHERE box = ? ORDER BY id",
                   [division])
        given = rows(self.db, "SELECT i.*, c.state AS copy_state FROM copies c JOIN inbox i "
                              "ON i.id = c.inbox_id WHERE c.division = ? ORDER BY c.id",
                     [division])
        return own + given

    def open_items(self) -> list[dict[str, Any]]:
        """Documents someone still has to act on: not signed for (in any box), a copy not
        signed for, or signed for in the unit's box but not yet registered; with the box or
        division that must act, most urgent first."""
        return rows(self.db, """
            SELECT i.*, i.box AS waiting_in, 'sign-for' AS waiting_for FROM inbox i
                WHERE i.state = 'received'
            UNION ALL
            SELECT i.*, '' AS waiting_in, 'register' AS waiting_for FROM inbox i
                WHERE i.state = 'signed-for' AND i.box = ''
            UNION ALL
            SELECT i.*, c.division AS waiting_in, 'sign-for' AS waiting_for
                FROM copies c JOIN inbox i ON i.id = c.inbox_id WHERE c.state = 'pending'
            ORDER BY urgency, received_at""")

    # -- what came back for what we sent ----------------------------------------------------

    def record_receipt(self, doc_id: str, kind: str, division: str, by_serial: str,
                       by_subject: str, receipt: bytes) -> bool:
        """Keep a receipt or notice for one of our documents; False if it was kept before
        (a sender's retry)."""
        if one(self.db, "SELECT 1 AS x FROM outbox_receipts WHERE doc_id = ? AND kind = ? AND "
                        "division = ?", [doc_id, kind, division]) is not None:
            return False
        self.db.execute("INSERT INTO outbox_receipts (doc_id, kind, division, by_serial, "
                        "by_subject, at, receipt) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        [doc_id, kind, division, by_serial, by_subject, time.time(), receipt])
        return True

    def receipts(self, doc_id: str) -> list[dict[str, Any]]:
        return rows(self.db, "SELECT kind, division, by_serial, by_subject, at, receipt FROM "
                             "outbox_receipts WHERE doc_id = ? ORDER BY id", [doc_id])

    def mark_returned(self, doc_id: str, by: str, reason: str) -> None:
        """delivered/signed-for -> returned: the recipient sent our document back (N4)."""
        row = one(self.db, "SELECT state FROM outbox WHERE doc_id = ?", [doc_id])
        if row is None:
            raise StoreError(f"no document {doc_id} in the outbox", code="not-found")
        if row["state"] not in ("delivered", "signed-for"):
            raise StoreError(f"document {doc_id} is {row['state']}; only a delivered document "
                             "is returned", code="bad-state")
        now = time.time()
        self.db.execute("UPDATE outbox SET state = 'returned', returned_at = ?, returned_by = ?, "
                        "return_reason = ?, updated_at = ? WHERE doc_id = ?",
                        [now, by, reason, now, doc_id])
