"""The node's store: its outbox, its inbox (the unit's exchange box), and the document blobs.

A node keeps everything in its data directory:

- `node.db`    one SQLite file, WAL mode, synchronous=FULL, foreign keys on (as the CA's);
- `blobs/ab/abcdef…`   document packages, one immutable file each (mode 0440), named by the
      SHA-256 (lower-case hex) of its content, in a sub-directory named by its first two digits;
- `blobs/.tmp-*.part`  blobs being written; left behind only by a crash, removed by
      `NodeStore.sweep_temp()` at startup.

Durability (design decision 7, "nothing acknowledged is ever lost"): a blob is written to a
temporary file in `blobs/`, fsynced, renamed into place and its directory fsynced
(`BlobWriter.commit`), and only then is the row that names it committed (`enqueue`, `receive`
refuse a blob that is not in place). The sender is acknowledged only after that commit returns.
A crash at any point leaves either no row, or a row whose blob is complete; at worst a temporary
file or an unreferenced complete blob, both harmless. Blobs are immutable and idempotent: the same
content gets the same name, and committing a blob that already exists only checks the existing
file (and replaces it if it had been corrupted).

Tables of node.db (times are REAL UNIX seconds, as in the API; the audit log keeps ISO strings):

- meta(key, value)          schema version and `kind` = "node"
- audit, audit_head         the node's hash-chained audit log (exchanged/store/audit.py)
- roles, suspensions, role_requests   who holds which role on this node (store/roledb.py)
- outbox(id, doc_id UNIQUE, recipient, metadata, urgency, package_sha256, size, state,
      created_at, queued_at, updated_at, attempts, next_attempt_at, last_error, delivered_at,
      delivery_receipt, signed_for_at, signed_for_receipt, reject_code, reject_message,
      custody, returned_at, returned_by, return_reason)
      state: queued -> sending -> delivered -> signed-for; sending -> queued (schedule_retry,
      recover); queued/sending -> failed (gave up); sending/delivered -> rejected (final, with
      the peer's code and message); failed -> queued (requeue, by an operator);
      delivered/signed-for -> returned (the recipient sent it back, N4: with its reason).
      `attempts` and `max_age` count from `queued_at` (the enqueue, or the last requeue).
      `custody` (JSON list) is the forward records a forwarded document travels with.
      `relay` the neighbour it was handed to while the direct path had failed (A12; still
      'queued': the direct path is tried again, and the recipient's delivery receipt may come
      back either way), `relay_receipt` that relay's signed hop record.
- inbox(id, sender, doc_id, metadata, urgency, package_sha256, size, state, box, origin,
      custody, signer_sha256, received_at, updated_at, delivery_receipt, signed_for_at,
      signed_for_receipt,
      signed_for_by, register_number UNIQUE, registered_at, registered_by, paper_received_at,
      paper_received_by, closed_at, closed_by, close_note, reminded_at)
      UNIQUE(sender, doc_id); `box` is '' for the unit's box (the archives section's) or the
      division a document is addressed to or was passed to; `origin` the unit that first sent
      it (not the sender, for a forwarded document); `signer_sha256` the fingerprint of the
      node certificate that signed the package. The exchange box's states and acts are
      `exchanged.box`'s: received -> signed-for -> registered -> distributed; received or
      signed-for -> returned; signed-for/registered -> forwarded. `relay_path` (JSON list)
      a relayed document's signed hop records; its sender is the unit that signed it.
- relay(id, sender, doc_id, recipient, handed_by, urgency, package_sha256, size, path, state,
      received_at, updated_at, attempts, next_attempt_at, last_error, delivered_at,
      delivery_receipt, reject_code)    documents this node relays for others (A12),
      UNIQUE(sender, doc_id): queued -> sending -> delivered (the recipient's delivery receipt
      is queued back to the sender in receipts_out) | refused | failed; `path` the signed hop
      records, ours last. The blob is named while queued or sending only.
- receipts_out(id, sender, doc_id, kind, receipt, created_at, next_at, attempts, error,
      returned_at)    what goes back to senders, store-and-forward: signed-for receipts (of
      the unit, and of each division a copy went to) and return notices; at a relay, the
      receipts it carries back (kind delivery, signed-for or return). `receipts_to_return()`
      lists those whose `next_at` has come; `mark_receipt_returned()` records the sender's
      answer (a refusal is retried with the documents' backoff, never given up).
- witnessed(unit, seq, at, head, hash, signature, received_at)    the signed audit checkpoints
      of the peers this node witnesses (as in audit.mirror_line); meta `witness_seq` is the
      last of our own checkpoints our witness has taken

`metadata` is canonical JSON; `urgency` is its "urgency" as a rank (0 extra-urgent, 1 urgent,
2 normal) so that `due()` sorts in SQL. Receipts are the raw bytes the peer sent (CMS).

Atomicity with the audit log: every mutating method runs in one transaction of its own, or —
when called while the connection is already in a transaction — inside the caller's, under a
SAVEPOINT (so a refused change leaves the caller's transaction as it was). A change and its
audit entry therefore commit together like this:

    with store.transaction():                 # cadb.Transaction: BEGIN IMMEDIATE ... COMMIT
        store.mark_delivered(doc_id, receipt)
        store.audit.append(action="document-delivered", obj=doc_id)

The connection may be used from a worker thread (`trio.to_thread`), one thread at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import sqlite3
import tempfile
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import sqlite_utils
from cryptography import x509

from exchanged.common import canonical
from exchanged.store.audit import MIRROR, NODE_CERTIFICATE, AuditLog, Report, signers
from exchanged.store.boxdb import BoxStore
from exchanged.store.db import StoreError, Transaction, change, connect, one, rows
from exchanged.store.files import fsync_dir
from exchanged.store.roledb import RoleStore

SCHEMA_VERSION = 3  # 2: the exchange box (inbox boxes and acts, receipts_out, copies, numbers)
# 3: relay (A12): the relay table, outbox.relay and relay_receipt, inbox.relay_path
DB_NAME = "node.db"
BLOBS = "blobs"
TEMP_PREFIX = ".tmp-"
TEMP_SUFFIX = ".part"
BLOB_MODE = 0o400  # immutable: nobody writes a blob after it is in place; only we read it

MAX_BLOB_SIZE = 1 << 30  # default limit of one package (1 GiB)
CHUNK = 1 << 20  # read size when hashing a blob file

URGENCY = {"extra-urgent": 0, "urgent": 1, "normal": 2}
OUT_STATES = ("queued", "sending", "delivered", "signed-for", "rejected", "failed", "returned")
IN_STATES = ("received", "signed-for", "registered", "distributed", "returned", "forwarded")

BACKOFF_BASE = 2.0  # seconds
BACKOFF_CAP = 600.0  # seconds
MAX_ATTEMPTS = 1000
MAX_AGE = 7 * 86400.0  # seconds since enqueue after which the node gives up
MAX_WITNESSED_PER_HOUR = 120  # checkpoints kept for one peer (a node signs ~12 an hour)

_SHA256 = re.compile(r"[0-9a-f]{64}")
# The blobs rows name (with their sizes): our documents, received ones, and relayed ones until
# they have been passed on.
_NAMED = ("SELECT package_sha256, size FROM outbox UNION SELECT package_sha256, size FROM inbox "
          "UNION SELECT package_sha256, size FROM relay WHERE state IN ('queued', 'sending')")
RELAY_STATES = ("queued", "sending", "delivered", "refused", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY, doc_id TEXT NOT NULL UNIQUE, recipient TEXT NOT NULL,
    metadata TEXT NOT NULL, urgency INTEGER NOT NULL CHECK (urgency IN (0, 1, 2)),
    package_sha256 TEXT NOT NULL, size INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN
        ('queued','sending','delivered','signed-for','rejected','failed','returned')),
    created_at REAL NOT NULL, queued_at REAL NOT NULL, updated_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL, last_error TEXT,
    delivered_at REAL, delivery_receipt BLOB, signed_for_at REAL, signed_for_receipt BLOB,
    reject_code TEXT, reject_message TEXT, custody TEXT NOT NULL DEFAULT '[]',
    returned_at REAL, returned_by TEXT, return_reason TEXT,
    relay TEXT NOT NULL DEFAULT '', relay_receipt BLOB);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(state, recipient, next_attempt_at);
CREATE TABLE IF NOT EXISTS inbox (
    id INTEGER PRIMARY KEY, sender TEXT NOT NULL, doc_id TEXT NOT NULL,
    metadata TEXT NOT NULL, urgency INTEGER NOT NULL CHECK (urgency IN (0, 1, 2)),
    package_sha256 TEXT NOT NULL, size INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('received','signed-for','registered','distributed',
                                         'returned','forwarded')),
    box TEXT NOT NULL DEFAULT '', origin TEXT NOT NULL DEFAULT '',
    custody TEXT NOT NULL DEFAULT '[]', signer_sha256 TEXT NOT NULL DEFAULT '',
    received_at REAL NOT NULL, updated_at REAL NOT NULL, delivery_receipt BLOB,
    signed_for_at REAL, signed_for_receipt BLOB, signed_for_by TEXT,
    register_number TEXT UNIQUE, registered_at REAL, registered_by TEXT,
    paper_received_at REAL, paper_received_by TEXT,
    closed_at REAL, closed_by TEXT, close_note TEXT, reminded_at REAL,
    relay_path TEXT NOT NULL DEFAULT '[]',
    UNIQUE (sender, doc_id));
CREATE TABLE IF NOT EXISTS receipts_out (
    id INTEGER PRIMARY KEY, sender TEXT NOT NULL, doc_id TEXT NOT NULL, kind TEXT NOT NULL,
    receipt BLOB NOT NULL, created_at REAL NOT NULL, next_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, error TEXT, returned_at REAL);
CREATE INDEX IF NOT EXISTS receipts_due ON receipts_out(sender, next_at)
    WHERE returned_at IS NULL;
CREATE INDEX IF NOT EXISTS inbox_doc ON inbox(doc_id);
CREATE INDEX IF NOT EXISTS inbox_state ON inbox(state);
CREATE TABLE IF NOT EXISTS relay (
    id INTEGER PRIMARY KEY, sender TEXT NOT NULL, doc_id TEXT NOT NULL,
    recipient TEXT NOT NULL, handed_by TEXT NOT NULL,
    urgency INTEGER NOT NULL CHECK (urgency IN (0, 1, 2)),
    package_sha256 TEXT NOT NULL, size INTEGER NOT NULL, path TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued','sending','delivered','refused','failed')),
    received_at REAL NOT NULL, updated_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL, last_error TEXT,
    delivered_at REAL, delivery_receipt BLOB, reject_code TEXT,
    UNIQUE (sender, doc_id));
CREATE INDEX IF NOT EXISTS relay_due ON relay(state, recipient, next_attempt_at);
CREATE TABLE IF NOT EXISTS witnessed (
    unit TEXT NOT NULL, seq INTEGER NOT NULL, at TEXT NOT NULL, head TEXT NOT NULL,
    hash TEXT NOT NULL, signature BLOB NOT NULL, received_at REAL NOT NULL,
    PRIMARY KEY (unit, seq));
"""


# -- files ------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def backoff_delay(attempts: int, rng: random.Random, *, base: float = BACKOFF_BASE,
                  cap: float = BACKOFF_CAP) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**(attempts-1))]
    after the `attempts`-th failed attempt."""
    ceiling = min(cap, base * 2.0 ** min(max(attempts - 1, 0), 60))
    return rng.uniform(0.0, ceiling)


class BlobWriter:
    """Streams one blob into a temporary file while hashing it; `commit()` puts it in place.

    Memory does not grow with the blob's size. Use as a context manager: leaving the block
    without `commit()` (by an exception or not) removes the temporary file."""

    def __init__(self, blobs: Path, max_size: int) -> None:
        self._blobs = blobs
        self.max_size = max_size
        self.size = 0
        self.sha256: str | None = None  # set by commit()
        self._hash = hashlib.sha256()
        try:
            fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=blobs)
        except OSError as e:
            raise StoreError(f"cannot create a blob file in {blobs}: {e.strerror}",
                             code="io") from None
        self.temp = Path(name)
        self._file: Any = os.fdopen(fd, "wb")
        self._open = True

    def write(self, chunk: bytes | bytearray | memoryview) -> None:
        """Append `chunk`; over `max_size` the blob is abandoned (StoreError "too-large")."""
        if not self._open:
            raise StoreError("this blob writer is already committed or aborted", code="closed")
        n = memoryview(chunk).nbytes
        if self.size + n > self.max_size:
            self.abort()
            raise StoreError(f"the document is larger than the limit of {self.max_size} bytes",
                             code="too-large")
        try:
            self._file.write(chunk)
        except OSError as e:
            self.abort()
            raise StoreError(f"cannot write blob file {self.temp}: {e.strerror}",
                             code="io") from None
        self._hash.update(chunk)
        self.size += n

    def commit(self, expect_sha256: str | None = None) -> str:
        """fsync the data, rename it to blobs/ab/<sha256>, fsync the directory; returns the
        SHA-256. With `expect_sha256`, content that does not match it is abandoned
        (StoreError "hash-mismatch")."""
        if not self._open:
            raise StoreError("this blob writer is already committed or aborted", code="closed")
        digest = self._hash.hexdigest()
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            os.fchmod(self._file.fileno(), BLOB_MODE)
            self._file.close()
            if expect_sha256 is not None and expect_sha256 != digest:
                raise StoreError(f"the content's SHA-256 is {digest}, not the announced "
                                 f"{expect_sha256}: it was damaged in transit; send it again",
                                 code="hash-mismatch")
            final = self._blobs / digest[:2] / digest
            if not final.parent.is_dir():
                final.parent.mkdir(exist_ok=True)
                fsync_dir(self._blobs)
            if final.exists() and final.stat().st_size == self.size \
                    and sha256_file(final) == digest:
                self.temp.unlink()  # already in place and intact: nothing to do
            else:  # new, or the file in place is damaged: (re)place it atomically
                os.replace(self.temp, final)
                fsync_dir(final.parent)
        except OSError as e:
            self.abort()
            raise StoreError(f"cannot store blob {digest}: {e.strerror or e}", code="io") from None
        except BaseException:
            self.abort()
            raise
        self._open = False
        self.sha256 = digest
        return digest

    def abort(self) -> None:
        """Abandon the blob and remove its temporary file; harmless to call twice."""
        self._open = False
        if not self._file.closed:
            self._file.close()
        self.temp.unlink(missing_ok=True)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.sha256 is None:
            self.abort()


# -- the store --------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutItem:
    """An outbox document ready to be sent (what `due()` returns)."""

    doc_id: str
    recipient: str
    metadata: dict[str, Any]
    package_sha256: str
    size: int
    urgency: str
    attempts: int
    created_at: float
    next_attempt_at: float
    custody: list[str]  # a forwarded document's custody records (base64 CMS)


def _urgency(metadata: dict[str, Any]) -> int:
    if not isinstance(metadata, dict):
        raise StoreError("document metadata must be a JSON object", code="bad-metadata")
    value = metadata.get("urgency", "normal")
    if value not in URGENCY:
        raise StoreError(f"unknown urgency {value!r} (one of {', '.join(URGENCY)})",
                         code="bad-metadata")
    return URGENCY[value]


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    if "metadata" in row:
        row["metadata"] = json.loads(row["metadata"])
    row["urgency"] = next(k for k, v in URGENCY.items() if v == row["urgency"])
    for key in ("custody", "relay_path", "path"):
        if key in row:
            row[key] = json.loads(row[key])
    return row


def _migrate_2_to_3(conn: sqlite3.Connection) -> str:
    """Schema 2 -> 3 (relay), in one transaction: new columns with their defaults, the new
    table. Nothing existing changes."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("ALTER TABLE outbox ADD COLUMN relay TEXT NOT NULL DEFAULT ''")
        conn.execute("ALTER TABLE outbox ADD COLUMN relay_receipt BLOB")
        conn.execute("ALTER TABLE inbox ADD COLUMN relay_path TEXT NOT NULL DEFAULT '[]'")
        for statement in _SCHEMA.split(";"):
            if "TABLE IF NOT EXISTS relay " in statement or "INDEX IF NOT EXISTS relay_due" \
                    in statement:
                conn.execute(statement)
        conn.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return "3"


class NodeStore:
    """A node's outbox, inbox, blobs, audit log and roles (see the module's docstring)."""

    def __init__(self, db: sqlite_utils.Database, datadir: Path, *,
                 max_attempts: int = MAX_ATTEMPTS, max_age: float = MAX_AGE,
                 rng: random.Random | None = None) -> None:
        self.db = db
        self.datadir = datadir
        self.blobs = datadir / BLOBS
        self.audit = AuditLog(db)
        self.max_attempts = max_attempts
        self.max_age = max_age
        self.rng = rng or random.Random()

    @classmethod
    def open(cls, datadir: Path, *, create: bool = True, max_attempts: int = MAX_ATTEMPTS,
             max_age: float = MAX_AGE, rng: random.Random | None = None) -> NodeStore:
        """Open the store in `datadir` (with `create`, make it if it is not there).

        `max_attempts` failed attempts or `max_age` seconds after enqueue, a document is given
        up ('failed'). `rng` is the jitter's source (tests pass a seeded one)."""
        datadir = Path(datadir)
        path = datadir / DB_NAME
        if not create and not path.exists():
            raise StoreError(f"no node store at {path}: initialise the node first, or give the "
                             "right data directory", code="no-store")
        try:
            if create:
                datadir.mkdir(parents=True, exist_ok=True)
                if not (datadir / BLOBS).is_dir():
                    (datadir / BLOBS).mkdir()
                    fsync_dir(datadir)
            db = connect(path)
            conn = db.conn
        except OSError as e:
            raise StoreError(f"cannot create the node store in {datadir}: {e.strerror}",
                             code="io") from None
        except sqlite3.DatabaseError as e:
            raise StoreError(f"the node database {path} cannot be read ({e}); restore it from "
                             "a backup", code="corrupt-db") from None
        try:
            if create:
                conn.executescript(_SCHEMA)
                AuditLog.create(db)
                RoleStore.create(db)
                BoxStore.create(db)
                conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES "
                             "('schema_version', ?), ('kind', 'node')", [str(SCHEMA_VERSION)])
            found = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'"
                                 ).fetchone()
        except sqlite3.DatabaseError as e:
            conn.close()
            raise StoreError(f"the node database {path} cannot be read ({e}); restore it from "
                             "a backup", code="corrupt-db") from None
        version = found[0] if found else None
        if version == "2":
            version = _migrate_2_to_3(conn)
        if version != str(SCHEMA_VERSION):
            conn.close()
            raise StoreError(f"the node database {path} has schema version {version}; this "
                             f"exchanged expects {SCHEMA_VERSION}", code="schema")
        if not (datadir / BLOBS).is_dir():
            conn.close()
            raise StoreError(f"the blob directory {datadir / BLOBS} is missing: restore it "
                             "from a backup", code="missing-blob")
        return cls(db, datadir, max_attempts=max_attempts, max_age=max_age, rng=rng)

    def close(self) -> None:
        self.db.conn.close()

    def __enter__(self) -> NodeStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def transaction(self) -> Transaction:
        """`with store.transaction():` groups changes and audit entries into one commit."""
        return Transaction(self.db)

    def _change(self) -> AbstractContextManager[None]:
        """A transaction of our own, or a savepoint inside the caller's."""
        return change(self.db, "nodedb")

    # -- blobs ----------------------------------------------------------------------------------

    def blob_writer(self, max_size: int = MAX_BLOB_SIZE) -> BlobWriter:
        """A writer for a new blob of at most `max_size` bytes."""
        return BlobWriter(self.blobs, max_size)

    def blob_path(self, sha256: str) -> Path:
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            raise StoreError(f"{sha256!r} is not a SHA-256 (64 lower-case hex digits)",
                             code="bad-hash")
        return self.blobs / sha256[:2] / sha256

    def check_blob(self, sha256: str) -> None:
        """Re-hash a blob; StoreError "missing-blob" or "corrupt-blob" if it is not intact."""
        path = self.blob_path(sha256)
        try:
            actual = sha256_file(path)
        except FileNotFoundError:
            raise StoreError(f"blob file {path} is missing: restore {self.blobs} from a "
                             "backup, or ask the sender to send the document again",
                             code="missing-blob") from None
        if actual != sha256:
            raise StoreError(f"blob file {path} no longer matches its SHA-256 (its content "
                             f"hashes to {actual}: disk damage or tampering): restore it from a "
                             "backup, or ask the sender to send the document again",
                             code="corrupt-blob")

    def sweep_temp(self, older_than: float = 0.0) -> int:
        """Remove temporary blob files left by a crash (call at startup); with `older_than`,
        only those not modified for that many seconds. Returns how many were removed."""
        removed = 0
        limit = time.time() - older_than
        for p in self.blobs.glob(f"{TEMP_PREFIX}*{TEMP_SUFFIX}"):
            try:
                if older_than <= 0 or p.stat().st_mtime < limit:
                    p.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
        return removed

    def sweep_orphans(self) -> int:
        """Remove complete blobs that no outbox or inbox row names (left by a crash between a
        blob's commit and its row's, or by a refusal interrupted); call at startup, before
        anything is received. Returns how many were removed."""
        used = {r[0] for r in self.db.execute(f"SELECT package_sha256 FROM ({_NAMED})")}
        removed = 0
        for sub in self.blobs.iterdir():
            if not sub.is_dir() or len(sub.name) != 2:
                continue
            for p in sub.iterdir():
                if _SHA256.fullmatch(p.name) and p.name not in used:
                    p.unlink(missing_ok=True)
                    removed += 1
        return removed

    def drop_blob_if_unused(self, sha256: str) -> bool:
        """Delete a blob no row names (a refused package's): True if it was deleted."""
        if self.db.execute(f"SELECT 1 FROM ({_NAMED}) WHERE package_sha256 = ? LIMIT 1",
                           [sha256]).fetchone():
            return False
        self.blob_path(sha256).unlink(missing_ok=True)
        return True

    def pending_bytes(self, sender: str) -> int:
        """The bytes of `sender`'s documents here that no one has signed for yet, and of those
        it handed us to relay that are not passed on yet (its quota)."""
        found = self.db.execute(
            "SELECT (SELECT COALESCE(SUM(size), 0) FROM inbox WHERE sender = ? AND state = "
            "'received') + (SELECT COALESCE(SUM(size), 0) FROM relay WHERE handed_by = ? AND "
            "state IN ('queued', 'sending'))", [sender, sender]).fetchone()
        return int(found[0])

    def _require_blob(self, sha256: str, size: int) -> None:
        path = self.blob_path(sha256)
        try:
            actual = path.stat().st_size
        except FileNotFoundError:
            raise StoreError(f"blob {sha256} is not stored (expected at {path}): commit the "
                             "package's blob before recording the document",
                             code="missing-blob") from None
        if actual != size:
            raise StoreError(f"blob {sha256} has {actual} bytes, not the {size} given",
                             code="size-mismatch")

    # -- outbox ---------------------------------------------------------------------------------

    def enqueue(self, *, doc_id: str, recipient: str, metadata: dict[str, Any],
                package_sha256: str, size: int, custody: list[str] | None = None) -> bool:
        """Queue a document whose package blob is already committed; due at once. `custody`
        is the forward records (base64 CMS) of a document we forward.

        Idempotent by `doc_id`: True if queued now, False if it was already there with the
        same package and recipient; anything else under that id is StoreError "id-conflict"."""
        urgency = _urgency(metadata)
        self._require_blob(package_sha256, size)
        with self._change():
            old = one(self.db, "SELECT recipient, package_sha256, size FROM outbox "
                      "WHERE doc_id = ?", [doc_id])
            if old is not None:
                if (old["recipient"], old["package_sha256"], old["size"]) \
                        != (recipient, package_sha256, size):
                    raise StoreError(f"document id {doc_id} is already used for a different "
                                     f"document (to {old['recipient']}, package "
                                     f"{old['package_sha256']}); give the new one its own id",
                                     code="id-conflict")
                return False
            now = time.time()
            self.db.execute(
                "INSERT INTO outbox (doc_id, recipient, metadata, urgency, package_sha256, "
                "size, state, created_at, queued_at, updated_at, attempts, next_attempt_at, "
                "custody) VALUES (?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?, 0, ?, ?)",
                [doc_id, recipient, canonical(metadata).decode(), urgency, package_sha256,
                 size, now, now, now, now, json.dumps(custody or [])])
        return True

    def due(self, now: float, limit: int = 100, *, recipient: str | None = None
            ) -> list[OutItem]:
        """Queued documents (for `recipient`, or all) whose time has come: most urgent
        first, then oldest first."""
        where, params = ("AND recipient = ? ", [recipient]) if recipient is not None else ("", [])
        found = rows(self.db,
                     "SELECT doc_id, recipient, metadata, package_sha256, size, urgency, "
                     "attempts, created_at, next_attempt_at, custody FROM outbox "
                     f"WHERE state = 'queued' {where}AND next_attempt_at <= ? "
                     "ORDER BY urgency, created_at, id LIMIT ?", [*params, now, limit])
        return [OutItem(**_decode(r)) for r in found]

    def next_due_time(self, *, recipient: str | None = None) -> float | None:
        """When something next falls due to go to `recipient` (or anyone): a queued document,
        a signed-for receipt to return (see `receipts_to_return`), or a document to relay.
        Possibly in the past; None if nothing is waiting."""
        out_where, in_where, params = "", "", []
        if recipient is not None:
            out_where, in_where, params = "AND recipient = ?", "AND sender = ?", [recipient]
        found = self.db.execute(
            "SELECT MIN(t) FROM ("
            f"SELECT MIN(next_attempt_at) AS t FROM outbox WHERE state = 'queued' {out_where} "
            "UNION ALL SELECT MIN(next_at) FROM receipts_out WHERE returned_at IS NULL "
            f"{in_where} UNION ALL SELECT MIN(next_attempt_at) FROM relay WHERE state = "
            f"'queued' {out_where})", [*params, *params, *params]).fetchone()
        return None if found[0] is None else float(found[0])

    def _move_out(self, doc_id: str, action: str, allowed: tuple[str, ...], new: str,
                  **cols: Any) -> dict[str, Any]:
        """Check the item's state is one of `allowed`, then set `new` and `cols`; returns the
        row as it was. Call inside `_change()`."""
        row = one(self.db, "SELECT * FROM outbox WHERE doc_id = ?", [doc_id])
        if row is None:
            raise StoreError(f"no document {doc_id} in the outbox", code="not-found")
        if row["state"] not in allowed:
            raise StoreError(f"cannot {action} document {doc_id}: it is {row['state']}, not "
                             f"{' or '.join(allowed)}", code="bad-state")
        sets = {"state": new, "updated_at": time.time(), **cols}
        self.db.execute(f"UPDATE outbox SET {', '.join(f'{k} = ?' for k in sets)} "
                        "WHERE doc_id = ?", [*sets.values(), doc_id])
        return row

    def mark_sending(self, doc_id: str) -> None:
        """queued -> sending: the node is about to transmit it."""
        with self._change():
            self._move_out(doc_id, "send", ("queued",), "sending")

    def mark_delivered(self, doc_id: str, receipt: bytes | None) -> None:
        """sending -> delivered: the recipient's node acknowledged it (with its receipt)."""
        with self._change():
            self._move_out(doc_id, "mark delivered", ("sending",), "delivered",
                           delivered_at=time.time(), delivery_receipt=receipt,
                           next_attempt_at=None)

    def relay_candidates(self, recipient: str, limit: int = 100) -> list[OutItem]:
        """Queued documents for `recipient` not yet handed to a relay, due or not: what may go
        through a relay while the direct path has failed. Forwarded documents stay on the
        direct path (their custody records name it)."""
        found = rows(self.db,
                     "SELECT doc_id, recipient, metadata, package_sha256, size, urgency, "
                     "attempts, created_at, next_attempt_at, custody FROM outbox "
                     "WHERE state = 'queued' AND recipient = ? AND relay = '' AND custody = '[]' "
                     "ORDER BY urgency, created_at, id LIMIT ?", [recipient, limit])
        return [OutItem(**_decode(r)) for r in found]

    def mark_relayed(self, doc_id: str, relay: str, receipt: bytes, retry_at: float) -> None:
        """sending -> queued: `relay` took the document (`receipt`: its signed hop record) and
        passes it on; the direct path is tried again at `retry_at` (the recipient takes the
        document once, whichever way it comes first)."""
        with self._change():
            self._move_out(doc_id, "mark relayed", ("sending",), "queued", relay=relay,
                           relay_receipt=receipt, next_attempt_at=retry_at,
                           last_error=f"handed to relay {relay}; the direct path is tried "
                                      "again meanwhile")

    def release(self, doc_id: str, error: str) -> None:
        """sending -> queued, keeping its schedule: not sent after all (a relay would not take
        it); not counted as an attempt."""
        with self._change():
            self._move_out(doc_id, "release", ("sending",), "queued", last_error=error)

    def mark_delivered_via(self, doc_id: str, receipt: bytes) -> bool:
        """The recipient's delivery receipt came back through a relay: queued, sending or
        failed -> delivered. False if it was delivered already (both paths got through)."""
        with self._change():
            row = self.out_item(doc_id)
            if row["state"] in ("delivered", "signed-for", "returned"):
                return False
            self._move_out(doc_id, "mark delivered", ("queued", "sending", "failed"),
                           "delivered", delivered_at=time.time(), delivery_receipt=receipt,
                           next_attempt_at=None)
        return True

    def mark_signed_for(self, doc_id: str, receipt: bytes) -> None:
        """delivered -> signed-for: a receiver signed for it (their signed receipt)."""
        with self._change():
            self._move_out(doc_id, "mark signed for", ("delivered",), "signed-for",
                           signed_for_at=time.time(), signed_for_receipt=receipt)

    def mark_rejected(self, doc_id: str, code: str, message: str) -> None:
        """sending/delivered -> rejected (final): the recipient refused it; `code` and
        `message` are the recipient's, kept for the sender to see."""
        with self._change():
            self._move_out(doc_id, "mark rejected", ("sending", "delivered"), "rejected",
                           reject_code=code, reject_message=message, next_attempt_at=None)

    def schedule_retry(self, doc_id: str, error: str, now: float) -> float | None:
        """An attempt failed (queued or sending -> queued): count it, record `error`, and
        schedule the next one with exponential backoff and full jitter; returns its time.
        After `max_attempts` attempts or `max_age` seconds the document is 'failed' and
        None is returned."""
        with self._change():
            row = one(self.db, "SELECT attempts, queued_at FROM outbox WHERE doc_id = ?",
                      [doc_id])
            attempts = (row["attempts"] if row else 0) + 1
            if row is not None and (attempts >= self.max_attempts
                                    or now - row["queued_at"] >= self.max_age):
                self._move_out(doc_id, "retry", ("queued", "sending"), "failed",
                               attempts=attempts, last_error=error, next_attempt_at=None)
                return None
            at = now + backoff_delay(attempts, self.rng)
            self._move_out(doc_id, "retry", ("queued", "sending"), "queued",
                           attempts=attempts, last_error=error, next_attempt_at=at)
        return at

    def requeue(self, doc_id: str, now: float) -> None:
        """failed -> queued (an operator's decision): due at `now`, attempts counted afresh,
        and `max_age` counted from now."""
        with self._change():
            self._move_out(doc_id, "requeue", ("failed",), "queued", attempts=0,
                           next_attempt_at=now, queued_at=now, last_error=None)

    def recover(self, now: float | None = None) -> int:
        """At startup: documents (ours and relayed ones) left 'sending' by a crash go back to
        'queued', due now (the recipient recognises a repeat by its id). Not counted as a
        failed attempt. Returns how many."""
        now = time.time() if now is None else now
        with self._change():
            n = 0
            for table in ("outbox", "relay"):
                cur = self.db.execute(f"UPDATE {table} SET state = 'queued', next_attempt_at = "
                                      "?, updated_at = ?, last_error = 'interrupted by a "
                                      "restart' WHERE state = 'sending'", [now, now])
                n += int(cur.rowcount)
            return n

    def outbox(self, state: str | None = None) -> list[dict[str, Any]]:
        """Every outbox row (optionally in one state), oldest first."""
        if state is not None and state not in OUT_STATES:
            raise StoreError(f"unknown outbox state {state!r} (one of {', '.join(OUT_STATES)})",
                             code="bad-state")
        where, params = ("WHERE state = ?", [state]) if state else ("", [])
        return [_decode(r) for r in rows(self.db, f"SELECT * FROM outbox {where} ORDER BY id",
                                         params)]

    def out_item(self, doc_id: str) -> dict[str, Any]:
        row = one(self.db, "SELECT * FROM outbox WHERE doc_id = ?", [doc_id])
        if row is None:
            raise StoreError(f"no document {doc_id} in the outbox", code="not-found")
        return _decode(row)

    # -- inbox ----------------------------------------------------------------------------------

    def receive(self, *, doc_id: str, sender: str, metadata: dict[str, Any],
                package_sha256: str, size: int, delivery_receipt: bytes | None = None,
                box: str = "", origin: str | None = None, custody: list[str] | None = None,
                signer_sha256: str = "", relay_path: list[str] | None = None) -> bool:
        """Record a received document whose package blob is already committed, in `box` (''
        for the unit's; a division's name if it is addressed to one). `origin` and `custody`
        are a forwarded document's first sender and forward records; `relay_path` a relayed
        one's signed hop records (the sender is then still the unit that signed the package).

        True if new; False if this (sender, doc_id) was already received with the same
        package (acknowledge it again: `in_item()` has the stored delivery receipt); a
        different package under it is StoreError "id-conflict"."""
        urgency = _urgency(metadata)
        self._require_blob(package_sha256, size)
        with self._change():
            old = one(self.db, "SELECT package_sha256 FROM inbox WHERE sender = ? AND "
                      "doc_id = ?", [sender, doc_id])
            if old is not None:
                if old["package_sha256"] != package_sha256:
                    raise StoreError(f"{sender} already sent a different document under the id "
                                     f"{doc_id}; it must give the new one its own id",
                                     code="id-conflict")
                return False
            now = time.time()
            self.db.execute(
                "INSERT INTO inbox (sender, doc_id, metadata, urgency, package_sha256, size, "
                "state, received_at, updated_at, delivery_receipt, box, origin, custody, "
                "signer_sha256, relay_path) VALUES (?, ?, ?, ?, ?, ?, 'received', ?, ?, ?, ?, ?, "
                "?, ?, ?)",
                [sender, doc_id, canonical(metadata).decode(), urgency, package_sha256, size,
                 now, now, delivery_receipt, box, origin or sender, json.dumps(custody or []),
                 signer_sha256, json.dumps(relay_path or [])])
        return True

    def _in_row(self, doc_id: str, sender: str | None) -> dict[str, Any]:
        if sender is None:
            found = rows(self.db, "SELECT * FROM inbox WHERE doc_id = ?", [doc_id])
        else:
            found = rows(self.db, "SELECT * FROM inbox WHERE doc_id = ? AND sender = ?",
                         [doc_id, sender])
        if not found:
            raise StoreError(f"no document {doc_id} in the inbox"
                             + (f" from {sender}" if sender else ""), code="not-found")
        if len(found) > 1:
            raise StoreError(f"{len(found)} senders sent a document {doc_id} (from "
                             f"{', '.join(r['sender'] for r in found)}): say which sender",
                             code="ambiguous")
        return found[0]

    def in_item(self, doc_id: str, sender: str | None = None) -> dict[str, Any]:
        """The inbox row of `doc_id` (ids are the senders', so give `sender` if two senders
        used the same id: StoreError "ambiguous")."""
        return _decode(self._in_row(doc_id, sender))

    def mark_in_signed_for(self, doc_id: str, receipt: bytes, by_serial: str, *,
                           sender: str | None = None) -> None:
        """received -> signed-for: a receiver (certificate serial `by_serial`) signed for it;
        `receipt` is their signed receipt, due at once to be returned to the sender."""
        with self._change():
            row = self._in_row(doc_id, sender)
            if row["state"] != "received":
                raise StoreError(f"cannot sign for document {doc_id}: it is {row['state']}, "
                                 "not received", code="bad-state")
            now = time.time()
            self.db.execute("UPDATE inbox SET state = 'signed-for', signed_for_at = ?, "
                            "signed_for_receipt = ?, signed_for_by = ?, updated_at = ? "
                            "WHERE id = ?", [now, receipt, by_serial, now, row["id"]])
            self.queue_receipt(row["sender"], doc_id, "signed-for", receipt, now=now)

    def queue_receipt(self, sender: str, doc_id: str, kind: str, receipt: bytes, *,
                      now: float | None = None) -> int:
        """Something signed that goes back to `sender` (a signed-for receipt, a return
        notice), due at once; call inside the transaction that records why."""
        now = time.time() if now is None else now
        cur = self.db.execute("INSERT INTO receipts_out (sender, doc_id, kind, receipt, "
                              "created_at, next_at) VALUES (?, ?, ?, ?, ?, ?)",
                              [sender, doc_id, kind, receipt, now, now])
        return int(cur.lastrowid or 0)

    def receipts_to_return(self, sender: str | None = None, now: float | None = None,
                           limit: int = 100) -> list[dict[str, Any]]:
        """What `sender` (or any sender) has not accepted yet and whose time has come, oldest
        first: [{"id", "doc_id", "sender", "kind", "receipt", "attempts"}]."""
        now = time.time() if now is None else now
        where, params = ("AND sender = ? ", [sender]) if sender is not None else ("", [])
        return rows(self.db,
                    "SELECT id, doc_id, sender, kind, receipt, attempts FROM receipts_out "
                    f"WHERE returned_at IS NULL {where}AND next_at <= ? "
                    "ORDER BY next_at, id LIMIT ?", [*params, now, limit])

    def carried_waiting(self, sender: str, kind_prefix: str) -> int:
        """Receipts a relay carries (their kind starts with `kind_prefix`) that `sender` has
        not taken yet."""
        return int(self.db.execute("SELECT COUNT(*) FROM receipts_out WHERE sender = ? AND "
                                   "returned_at IS NULL AND substr(kind, 1, ?) = ?",
                                   [sender, len(kind_prefix), kind_prefix]).fetchone()[0])

    def drop_receipt(self, receipt_id: int, error: str, now: float | None = None) -> None:
        """A carried receipt its sender refused for good: not tried again (error kept)."""
        with self._change():
            self.db.execute("UPDATE receipts_out SET returned_at = ?, error = ? WHERE id = ? "
                            "AND returned_at IS NULL",
                            [time.time() if now is None else now, error, receipt_id])

    def receipts_for(self, doc_id: str, *, with_receipts: bool = False) -> list[dict[str, Any]]:
        """Everything queued back to the sender of `doc_id`, and whether it was taken (and,
        `with_receipts`, what)."""
        extra = ", receipt" if with_receipts else ""
        return rows(self.db, "SELECT id, sender, kind, created_at, attempts, error, returned_at"
                             f"{extra} FROM receipts_out WHERE doc_id = ? ORDER BY id", [doc_id])

    def mark_receipt_returned(self, receipt_id: int, accepted: bool, *,
                              error: str = "refused by the sender",
                              now: float | None = None) -> float | None:
        """The sender's answer to a returned receipt or notice. Accepted: done (None).
        Otherwise it is tried again after the documents' backoff; returns when."""
        now = time.time() if now is None else now
        with self._change():
            row = one(self.db, "SELECT * FROM receipts_out WHERE id = ?", [receipt_id])
            if row is None or row["returned_at"] is not None:
                raise StoreError(f"receipt {receipt_id} is not waiting to be returned",
                                 code="bad-state")
            if accepted:
                self.db.execute("UPDATE receipts_out SET returned_at = ?, error = NULL "
                                "WHERE id = ?", [now, receipt_id])
                return None
            attempts = row["attempts"] + 1
            at = now + backoff_delay(attempts, self.rng)
            self.db.execute("UPDATE receipts_out SET attempts = ?, next_at = ?, error = ? "
                            "WHERE id = ?", [attempts, at, error, receipt_id])
        return at

    def inbox(self, state: str | None = None) -> list[dict[str, Any]]:
        """Every inbox row (optionally in one state), oldest first."""
        if state is not None and state not in IN_STATES:
            raise StoreError(f"unknown inbox state {state!r} (one of {', '.join(IN_STATES)})",
                             code="bad-state")
        where, params = ("WHERE state = ?", [state]) if state else ("", [])
        return [_decode(r) for r in rows(self.db, f"SELECT * FROM inbox {where} ORDER BY id",
                                         params)]

    # -- relaying (A12) --------------------------------------------------------------------------

    def relay_take(self, *, doc_id: str, sender: str, recipient: str, handed_by: str,
                   metadata: dict[str, Any], package_sha256: str, size: int,
                   path: list[str]) -> bool:
        """Keep a document this node relays (its blob committed, checked by the caller), due
        at once to go on to `recipient`. `path`: the signed hop records it travels with, ours
        last. True if new; False if the same one was taken before; another package under the
        (sender, doc_id) is StoreError "id-conflict"."""
        urgency = _urgency(metadata)
        self._require_blob(package_sha256, size)
        with self._change():
            old = one(self.db, "SELECT package_sha256 FROM relay WHERE sender = ? AND "
                      "doc_id = ?", [sender, doc_id])
            if old is not None:
                if old["package_sha256"] != package_sha256:
                    raise StoreError(f"{sender} already had a different document relayed under "
                                     f"the id {doc_id}", code="id-conflict")
                return False
            now = time.time()
            self.db.execute(
                "INSERT INTO relay (sender, doc_id, recipient, handed_by, urgency, "
                "package_sha256, size, path, state, received_at, updated_at, next_attempt_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?)",
                [sender, doc_id, recipient, handed_by, urgency, package_sha256, size,
                 json.dumps(path), now, now, now])
        return True

    def relay_due(self, now: float, recipient: str, limit: int = 100) -> list[dict[str, Any]]:
        """Relayed documents due to go on to `recipient`, most urgent first."""
        return [_decode(r) for r in rows(
            self.db, "SELECT * FROM relay WHERE state = 'queued' AND recipient = ? AND "
            "next_attempt_at <= ? ORDER BY urgency, received_at, id LIMIT ?",
            [recipient, now, limit])]

    def relay_row(self, sender: str, doc_id: str) -> dict[str, Any]:
        row = one(self.db, "SELECT * FROM relay WHERE sender = ? AND doc_id = ?",
                  [sender, doc_id])
        if row is None:
            raise StoreError(f"no relayed document {doc_id} from {sender}", code="not-found")
        return _decode(row)

    def relay_rows(self, state: str | None = None) -> list[dict[str, Any]]:
        """Every relayed document (optionally in one state), oldest first."""
        if state is not None and state not in RELAY_STATES:
            raise StoreError(f"unknown relay state {state!r} (one of "
                             f"{', '.join(RELAY_STATES)})", code="bad-state")
        where, params = ("WHERE state = ?", [state]) if state else ("", [])
        return [_decode(r) for r in rows(self.db, f"SELECT * FROM relay {where} ORDER BY id",
                                         params)]

    def _move_relay(self, row_id: int, allowed: tuple[str, ...], new: str,
                    **cols: Any) -> None:
        row = one(self.db, "SELECT state FROM relay WHERE id = ?", [row_id])
        if row is None or row["state"] not in allowed:
            raise StoreError(f"relayed document {row_id} is "
                             f"{row['state'] if row else 'not there'}, not "
                             f"{' or '.join(allowed)}", code="bad-state")
        sets = {"state": new, "updated_at": time.time(), **cols}
        self.db.execute(f"UPDATE relay SET {', '.join(f'{k} = ?' for k in sets)} WHERE id = ?",
                        [*sets.values(), row_id])

    def relay_sending(self, row_id: int) -> None:
        with self._change():
            self._move_relay(row_id, ("queued",), "sending")

    def relay_delivered(self, row_id: int, receipt: bytes) -> None:
        """sending -> delivered: the recipient's node took it (`receipt`: its delivery receipt,
        which goes back to the sender)."""
        with self._change():
            self._move_relay(row_id, ("sending",), "delivered", delivered_at=time.time(),
                             delivery_receipt=receipt, next_attempt_at=None)

    def relay_refused(self, row_id: int, code: str, message: str) -> None:
        """sending -> refused (final): the recipient refused it."""
        with self._change():
            self._move_relay(row_id, ("sending",), "refused", reject_code=code,
                             last_error=message, next_attempt_at=None)

    def relay_retry(self, row_id: int, error: str, now: float) -> float | None:
        """An attempt to pass it on failed: again after the documents' backoff; after
        `max_attempts` attempts or `max_age` seconds since it came, 'failed' (None)."""
        with self._change():
            row = one(self.db, "SELECT attempts, received_at FROM relay WHERE id = ?", [row_id])
            attempts = (row["attempts"] if row else 0) + 1
            if row is not None and (attempts >= self.max_attempts
                                    or now - row["received_at"] >= self.max_age):
                self._move_relay(row_id, ("queued", "sending"), "failed", attempts=attempts,
                                 last_error=error, next_attempt_at=None)
                return None
            at = now + backoff_delay(attempts, self.rng)
            self._move_relay(row_id, ("queued", "sending"), "queued", attempts=attempts,
                             last_error=error, next_attempt_at=at)
        return at

    # -- witnessing ------------------------------------------------------------------------------

    def witness(self, unit: str, record: dict[str, Any]) -> bool:
        """Keep a peer's signed checkpoint (checked by the caller): True if new, False if the
        same one was kept before; another checkpoint under the same number is StoreError
        "id-conflict" — the peer's log was rewritten."""
        with self._change():
            old = one(self.db, "SELECT at, head, hash, signature FROM witnessed WHERE unit = ? "
                      "AND seq = ?", [unit, record["seq"]])
            if old is not None:
                if (old["at"], old["head"], old["hash"], old["signature"]) != (
                        record["at"], record["head"], record["hash"], record["signature"]):
                    raise StoreError(f"{unit} gave checkpoint {record['seq']} before with other "
                                     "content: its audit log was rewritten", code="id-conflict")
                return False
            newest, recent = self.db.execute(
                "SELECT max(seq), sum(received_at > ?) FROM witnessed WHERE unit = ?",
                [time.time() - 3600, unit]).fetchone()
            if (recent or 0) >= MAX_WITNESSED_PER_HOUR:  # a flood from a peer we witness
                raise StoreError(f"{unit} gave more than {MAX_WITNESSED_PER_HOUR} checkpoints "
                                 "in the last hour; later ones wait", code="busy")
            if newest is not None and record["seq"] < newest:
                raise StoreError(f"{unit} gave checkpoint {record['seq']}, older than "
                                 f"checkpoint {newest} it gave before: its audit log was cut "
                                 "back", code="id-conflict")
            self.db.execute("INSERT INTO witnessed VALUES (?, ?, ?, ?, ?, ?, ?)",
                            [unit, record["seq"], record["at"], record["head"], record["hash"],
                             record["signature"], time.time()])
        return True

    def witnessed(self, unit: str) -> list[dict[str, Any]]:
        """The checkpoints kept for `unit`, oldest first, as `audit.mirror_line` writes them."""
        return rows(self.db, "SELECT seq, at, head, hash, signature FROM witnessed WHERE "
                             "unit = ? ORDER BY seq", [unit])

    def unwitnessed(self, limit: int = 100) -> list[dict[str, Any]]:
        """Our own checkpoints our witness has not taken yet, oldest first."""
        found = self.db.execute("SELECT value FROM meta WHERE key = 'witness_seq'").fetchone()
        after = int(found[0]) if found else 0
        return list(self.audit.rows("WHERE action = 'checkpoint' AND seq > ?", [after],
                                    limit=limit))

    def mark_witnessed(self, seq: int) -> None:
        with self._change():
            self.db.execute("INSERT INTO meta (key, value) VALUES ('witness_seq', ?) ON CONFLICT"
                            "(key) DO UPDATE SET value = excluded.value WHERE "
                            "CAST(excluded.value AS INTEGER) > CAST(meta.value AS INTEGER)",
                            [str(seq)])

    # -- overview -------------------------------------------------------------------------------

    def queues(self) -> dict[str, dict[str, Any]]:
        """Per recipient: documents waiting to go (queued or being sent), the oldest's id and
        when it was queued (epoch seconds), and receipts owed to it."""
        out: dict[str, dict[str, Any]] = {}
        for recipient, n, oldest in self.db.execute(
                "SELECT recipient, COUNT(*), MIN(queued_at) FROM outbox WHERE state IN "
                "('queued', 'sending') GROUP BY recipient"):
            doc = self.db.execute("SELECT doc_id FROM outbox WHERE recipient = ? AND state IN "
                                  "('queued', 'sending') ORDER BY queued_at, id LIMIT 1",
                                  [recipient]).fetchone()
            out[str(recipient)] = {"queued": int(n), "oldest_queued_at": float(oldest),
                                   "oldest_doc_id": str(doc[0]), "receipts_owed": 0}
        for sender, n in self.db.execute("SELECT sender, COUNT(*) FROM receipts_out WHERE "
                                         "returned_at IS NULL GROUP BY sender"):
            out.setdefault(str(sender), {"queued": 0, "oldest_queued_at": None,
                                         "oldest_doc_id": None})["receipts_owed"] = int(n)
        return out

    def remember_person(self, person: str, serial: str, subject: str, not_after: str) -> None:
        """The certificate a person last acted with at this node (their expiry is watched)."""
        value = json.dumps({"serial": serial, "subject": subject, "not_after": not_after},
                           sort_keys=True)
        self.db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE "
                        "SET value = excluded.value", [f"person:{person}", value])

    def persons_seen(self) -> dict[str, dict[str, str]]:
        return {str(k).removeprefix("person:"): json.loads(v) for k, v in self.db.execute(
            "SELECT key, value FROM meta WHERE key LIKE 'person:%' ORDER BY key")}

    def statistics(self) -> dict[str, Any]:
        """{"outbox": {state: count}, "inbox": {state: count}, "blobs": n, "blob_bytes": b};
        every state is listed; blobs counts the distinct packages the rows name."""
        out: dict[str, Any] = {}
        for table, states in (("outbox", OUT_STATES), ("inbox", IN_STATES),
                              ("relay", RELAY_STATES)):
            counts = dict.fromkeys(states, 0)
            for state, n in self.db.execute(f"SELECT state, COUNT(*) FROM {table} "
                                            "GROUP BY state"):
                counts[state] = n
            out[table] = counts
        n, total = self.db.execute(
            f"SELECT COUNT(*), COALESCE(SUM(size), 0) FROM ({_NAMED})").fetchone()
        out["blobs"], out["blob_bytes"] = int(n), int(total)
        return out

    # -- backups (exchanged.node.backup) --------------------------------------------------------

    def blob_refs(self) -> list[tuple[str, int]]:
        """Every blob a document names, once, with its size: what a backup of this database
        must carry. Rows are never deleted, so a blob named here is never deleted while the
        store runs (`drop_blob_if_unused` and `sweep_orphans` take only unnamed ones; a
        relayed document's blob is named until it has been passed on, and removed at the next
        start after that)."""
        return [(str(sha), int(size)) for sha, size in self.db.execute(
            f"SELECT package_sha256, size FROM ({_NAMED}) ORDER BY 1")]

    def backup_to(self, dest: Path) -> None:
        """A consistent copy of the database in the new file `dest`, through SQLite's online
        backup API (one step: a single read snapshot), in rollback-journal mode so that it is
        one self-contained file. Call with no transaction open, the connection held (the
        daemon: inside `node.db(...)`)."""
        if self.db.conn.in_transaction:
            raise StoreError("a transaction is open on the store; back it up between "
                             "transactions", code="busy")
        target = sqlite3.connect(str(dest), isolation_level=None)
        try:
            self.db.conn.backup(target)
            target.execute("PRAGMA journal_mode=DELETE")
        finally:
            target.close()

    @classmethod
    def read_only(cls, path: Path) -> NodeStore:
        """A node database file opened for reading only (a backup's: opening it as a store
        would switch it to WAL, which writes to it)."""
        conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True,
                               isolation_level=None, check_same_thread=False)
        return cls(sqlite_utils.Database(conn), Path(path).parent)


def verify_log(datadir: Path, signer: x509.Certificate, issuer: x509.Certificate,
               copies: Iterable[Path] = ()) -> Report:
    """Check a node's audit chain against `signer` (the node certificate whose token signs its
    checkpoints) and `issuer` (the CA of the persons who signed acts), with the checkpoints'
    copy beside the database and any other `copies` (a witness's). Read-only, beside a
    running daemon: WAL readers do not block it."""
    path = Path(datadir) / DB_NAME
    if not path.exists():
        raise StoreError(f"no node database at {path}", code="no-store")
    db = connect(path)
    try:
        log = AuditLog(db)
        every = signers(log.rows("WHERE action = ?", [NODE_CERTIFICATE]), signer, issuer)
        return log.verify(every, issuer=issuer, mirrors=[Path(datadir) / MIRROR, *copies])
    finally:
        db.conn.close()


__all__ = ["BlobWriter", "NodeStore", "OutItem", "StoreError", "backoff_delay", "verify_log"]
