"""The tamper-evident audit log: a hash chain in SQLite with checkpoints signed on a token.

Each entry holds the SHA-256 of the entry before it, and its own hash covers every field
(time, actor, role, action, object, outcome, details, the operator's signature, the previous
hash). Appending reads only the last entry: O(1). A checkpoint is an entry whose signature,
made on the CA's (or the node's) token, covers the hash of the entry before it; the first entry
of every log is one. `verify()` recomputes the chain and checks every checkpoint, and says
where the first break is: an edited, deleted, inserted or reordered entry breaks a hash or a
link; a truncated log ends before its last signed checkpoint (recorded in `audit_head`, which
only grows); a chain rewritten without the token fails the checkpoint signatures.

What cannot be detected: changes after the last checkpoint by someone who can write the
database file, if they also cut the log back to that checkpoint. Checkpoint often (the CA
writes one whenever its token is open; `exchanged audit checkpoint` writes one on demand).

Entries are appended inside the caller's transaction, so a change and its entry commit or
roll back together.

Checkpoint signatures are raw signatures (ECDSA/SHA-256 or RSA PKCS#1 v1.5/SHA-256) over
`CHECKPOINT_PREFIX + canonical JSON`: the prefix keeps them from ever being mistaken for a
certificate or CRL body signed by the same key (those start with a DER SEQUENCE byte).
`openssl dgst -sha256 -verify KEY.pem -signature SIG MSG` checks them.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes

from exchanged.common import canonical, stamp, stamp_precise
from exchanged.errors import ExchangedError
from exchanged.pki.keys import UnsupportedKey, verify_signature

CHECKPOINT_PREFIX = b"exchanged-audit-checkpoint-v1\n"
GENESIS_PREV = "0" * 64
FIELDS = ("seq", "at", "actor", "actor_subject", "role", "action", "object", "outcome",
          "details", "signature", "prev")

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY, at TEXT NOT NULL, actor TEXT, actor_subject TEXT, role TEXT,
    action TEXT NOT NULL, object TEXT NOT NULL DEFAULT '', outcome TEXT NOT NULL,
    details TEXT NOT NULL DEFAULT '{}', signature BLOB, prev TEXT NOT NULL,
    hash TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS audit_actor ON audit(actor);
CREATE INDEX IF NOT EXISTS audit_action ON audit(action);
CREATE INDEX IF NOT EXISTS audit_at ON audit(at);
CREATE TABLE IF NOT EXISTS audit_head (
    id INTEGER PRIMARY KEY CHECK (id = 1), checkpoint_seq INTEGER NOT NULL,
    checkpoint_hash TEXT NOT NULL);
"""


_INSERT = (f"INSERT INTO audit ({', '.join(FIELDS)}, hash) "
           f"VALUES ({', '.join('?' * (len(FIELDS) + 1))})")


class AuditError(ExchangedError):
    code = "audit"


def entry_hash(row: dict[str, Any]) -> str:
    """SHA-256 over the canonical JSON of every field but the hash itself."""
    body = {k: row[k] for k in FIELDS}
    sig = body["signature"]
    body["signature"] = base64.b64encode(sig).decode() if sig is not None else None
    return hashlib.sha256(canonical(body)).hexdigest()


def checkpoint_message(seq: int, at: str, head: str) -> bytes:
    """What a checkpoint signs: its own place and time, and the hash of the entry before it."""
    return CHECKPOINT_PREFIX + canonical({"seq": seq, "at": at, "head": head})


@dataclass(frozen=True)
class Finding:
    seq: int | None
    problem: str

    def __str__(self) -> str:
        where = f"entry {self.seq}" if self.seq is not None else "the log"
        return f"{where}: {self.problem}"


@dataclass
class Report:
    entries: int
    checkpoints: int
    last_checkpoint: int | None
    findings: list[Finding]

    @property
    def ok(self) -> bool:
        return not self.findings


class AuditLog:
    """The audit chain of one SQLite database (the CA's, or a node's)."""

    def __init__(self, db: Any) -> None:
        self.db = db

    @staticmethod
    def create(db: Any) -> None:
        db.conn.executescript(SCHEMA)

    def head(self) -> tuple[int, str]:
        row = self.db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        return (int(row[0]), str(row[1])) if row else (0, GENESIS_PREV)

    def append(self, *, action: str, outcome: str = "ok", obj: str = "",
               actor: str | None = None, actor_subject: str | None = None,
               role: str | None = None, details: dict[str, Any] | None = None,
               signature: bytes | None = None, at: str | None = None) -> int:
        """Append one entry inside the caller's transaction; returns its sequence number."""
        last_seq, last_hash = self.head()
        row: dict[str, Any] = {
            "seq": last_seq + 1, "at": at or stamp_precise(), "actor": actor,
            "actor_subject": actor_subject, "role": role, "action": action, "object": obj,
            "outcome": outcome, "details": canonical(details or {}).decode(),
            "signature": signature, "prev": last_hash}
        row["hash"] = entry_hash(row)
        # Plain SQL: sqlite-utils' insert() inspects the table on every call.
        self.db.execute(_INSERT, list(row.values()))
        return int(row["seq"])

    def checkpoint(self, sign: Any, signer: x509.Certificate) -> int:
        """Append a checkpoint signed by `sign(message) -> signature` (the token key), inside
        the caller's transaction, and raise the high-water mark that truncation is checked
        against."""
        last_seq, last_hash = self.head()
        at = stamp_precise()
        sig = sign(checkpoint_message(last_seq + 1, at, last_hash))
        seq = self.append(action="checkpoint", obj=str(last_seq), at=at,
                          actor_subject=signer.subject.rfc4514_string(),
                          details={"head": last_hash, "signer_sha256":
                                   signer.fingerprint(hashes.SHA256()).hex()},
                          signature=sig)
        new_hash = self.head()[1]
        self.db.execute("INSERT INTO audit_head (id, checkpoint_seq, checkpoint_hash) "
                        "VALUES (1, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                        "checkpoint_seq = excluded.checkpoint_seq, "
                        "checkpoint_hash = excluded.checkpoint_hash "
                        "WHERE excluded.checkpoint_seq > audit_head.checkpoint_seq",
                        [seq, new_hash])
        return seq

    def rows(self, where: str = "", params: Any = (), *, limit: int | None = None
             ) -> Iterator[dict[str, Any]]:
        sql = f"SELECT {', '.join(FIELDS)}, hash FROM audit {where} ORDER BY seq"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        cur = self.db.execute(sql, params)
        names = [d[0] for d in cur.description]
        for r in cur:
            yield dict(zip(names, r, strict=True))

    def query(self, match: dict[str, list[str]], *, since: dt.datetime | None = None,
              until: dt.datetime | None = None, limit: int | None = None
              ) -> list[dict[str, Any]]:
        """Entries whose column (actor, action, object) is one of the values given for it,
        at or after `since` and at or before `until` (whole seconds: an entry stamped within
        the second `until` names is included)."""
        where: list[str] = []
        params: list[Any] = []
        for column, values in match.items():
            if column not in ("actor", "action", "object"):
                raise ValueError(f"no audit filter on {column!r}")
            where.append(f"{column} IN ({', '.join('?' * len(values))})")
            params += values
        if since is not None:  # no "Z": "12:00:00" sorts before "12:00:00.5Z"
            where.append("at >= ?")
            params.append(since.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S"))
        if until is not None:  # "Z" sorts after "12:00:00.999999Z"'s "."
            where.append("at <= ?")
            params.append(stamp(until))
        clause = ("WHERE " + " AND ".join(where)) if where else ""
        return list(self.rows(clause, params, limit=limit))

    def verify(self, signer: x509.Certificate) -> Report:
        head = self.db.execute("SELECT checkpoint_seq, checkpoint_hash FROM audit_head"
                               ).fetchone()
        return verify_rows(self.rows(), signer, head=(int(head[0]), str(head[1])) if head
                           else None)


def verify_rows(rows: Iterator[dict[str, Any]] | list[dict[str, Any]],
                signer: x509.Certificate, *, head: tuple[int, str] | None = None,
                first_prev: str = GENESIS_PREV, first_seq: int = 1) -> Report:
    """Check a run of entries: hashes, links, sequence, checkpoint signatures, truncation.

    `head` is the last checkpoint recorded apart from the entries (audit_head); `first_prev`
    and `first_seq` let an evidence bundle start in the middle of a log."""
    findings: list[Finding] = []
    expect_seq, prev = first_seq, first_prev
    count = checkpoints = 0
    last_cp: int | None = None
    public_key = signer.public_key()
    for row in rows:
        count += 1
        seq = row["seq"]
        if seq != expect_seq:
            findings.append(Finding(seq, f"out of sequence (expected entry {expect_seq}): "
                                         "entries were deleted, inserted or reordered"))
        if row["prev"] != prev:
            findings.append(Finding(seq, "does not link to the entry before it: an entry was "
                                         "deleted, inserted or reordered"))
        try:
            edited = entry_hash(row) != row["hash"]
        except (TypeError, ValueError):  # a column rewritten to the wrong type
            edited = True
        if edited:
            findings.append(Finding(seq, "its content does not match its hash: the entry was "
                                         "edited"))
        if row["action"] == "checkpoint":
            checkpoints += 1
            if _checkpoint_ok(row, public_key):
                last_cp = seq
            else:
                findings.append(Finding(seq, "checkpoint signature does not verify: the chain "
                                             "was rewritten without the token"))
        prev, expect_seq = row["hash"], seq + 1
        if len(findings) > 50:
            findings.append(Finding(None, "more than 50 problems; stopped"))
            break
    if count == 0 and head is None:
        return Report(0, 0, None, [])
    if checkpoints == 0:
        findings.append(Finding(None, "no signed checkpoint: nothing anchors this log to the "
                                      "token (its first entry should be one)"))
    if head is not None:
        hseq, hhash = head
        if expect_seq - 1 < hseq:
            findings.append(Finding(hseq, f"missing: the log ends at entry {expect_seq - 1} but "
                                          f"checkpoint {hseq} was recorded: it was truncated"))
    return Report(count, checkpoints, last_cp, findings)


def _checkpoint_ok(row: dict[str, Any], public_key: Any) -> bool:
    try:
        details = json.loads(row["details"])
        if not isinstance(details, dict) or details.get("head") != row["prev"] or \
                not isinstance(row["signature"], bytes):
            return False
    except (TypeError, ValueError, RecursionError):
        return False
    message = checkpoint_message(row["seq"], row["at"], row["prev"])
    try:
        verify_signature(public_key, row["signature"], message)
    except (InvalidSignature, UnsupportedKey):
        return False
    return True
