"""The tamper-evident audit log: a hash chain in SQLite with checkpoints signed on a token.

Each entry holds the SHA-256 of the entry before it, and its own hash covers every field
(time, actor, role, action, object, outcome, details, the operator's signature, the previous
hash). Appending reads only the last entry: O(1). A checkpoint is an entry whose signature,
made on the CA's (or the node's) token, covers its place, its time and the hash of the entry
before it; the first entry of every log is one. `verify()` recomputes the chain and checks
every row against the log's grammar (`verify_rows`): an edited, deleted, inserted or reordered
entry breaks a hash or a link; a checkpoint is checked by its signature wherever it stands,
and an operator's act by the operator's; a row relabelled to escape either breaks the grammar;
the recorded head (`audit_head`) must be a signed checkpoint with its recorded hash; a chain
rewritten without the token fails the signatures.

Every signed checkpoint is also kept outside the database: appended, after its commit, to an
append-only file beside it (`MIRROR`, each line self-verifying), and at a node sent to a
configured witness that stores it. Cutting the log back to an older checkpoint, even with its
head rewritten, is then found by comparing the copies. What is left undetectable: entries
after the last checkpoint that every copy knows of, if someone who can write the database
file (and the file beside it, and the witness) removes them. Checkpoint often: the CA writes
one whenever its token is open, a node every five minutes and at every stop.

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
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes

from exchanged.common import canonical, stamp, stamp_precise
from exchanged.errors import ExchangedError
from exchanged.pki.cms import CmsError, verify_detached
from exchanged.pki.keys import UnsupportedKey, verify_signature
from exchanged.pki.names import common_name, organization

CHECKPOINT_PREFIX = b"exchanged-audit-checkpoint-v1\n"
MIRROR = "audit-checkpoints.jsonl"  # the checkpoints' copy outside the database, beside it
GENESIS_PREV = "0" * 64
NODE_CERTIFICATE = "node-certificate"  # a node's certificate changed: both are in the details
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
    place: str | None = None  # where, when it is not an entry of the log (an archive's file)

    def __str__(self) -> str:
        where = self.place or (f"entry {self.seq}" if self.seq is not None else "the log")
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

    def verify(self, signer: x509.Certificate | Sequence[x509.Certificate], *,
               issuer: x509.Certificate | None = None, mirrors: Iterable[Path] = ()) -> Report:
        """Check the whole log (see `verify_rows`), its recorded head, and the copies of its
        checkpoints kept outside the database (`mirrors`: the local copy, a witness's)."""
        head = self.db.execute("SELECT checkpoint_seq, checkpoint_hash FROM audit_head"
                               ).fetchone()
        outside = [item for path in mirrors for item in read_mirror(path)]
        return verify_rows(self.rows(), signer, issuer=issuer, mirror=outside,
                           head=(int(head[0]), str(head[1])) if head else None)

    def mirror_checkpoints(self, path: Path) -> int:
        """Append to `path` the checkpoints of the log it does not hold yet; call after the
        transaction that made them commits (a line for a checkpoint that was rolled back
        would be a false alarm). The file is append-only and each line signed, so cutting
        the log back to an older checkpoint is found by `verify(mirror=path)` even by someone
        who rewrote the database and its recorded head. Returns how many were added."""
        last = _last_mirrored(path)
        new = list(self.rows("WHERE action = 'checkpoint' AND seq > ?", [last]))
        if not new:
            return 0
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, b"".join(mirror_line(r) for r in new))
            os.fsync(fd)
        finally:
            os.close(fd)
        return len(new)


def mirror_line(row: dict[str, Any]) -> bytes:
    """A checkpoint as the mirror file (or a witness) keeps it: self-verifying. `row` is an
    audit row (its `prev`) or a witnessed one (its `head`)."""
    return canonical({"seq": row["seq"], "at": row["at"], "head": row.get("head", row.get("prev")),
                      "hash": row["hash"],
                      "signature": base64.b64encode(row["signature"]).decode()}) + b"\n"


def parse_record(line: bytes) -> dict[str, Any]:
    """One checkpoint record (a mirror line, or what a witness was given); ValueError if it
    is not one."""
    item = json.loads(line)
    if not isinstance(item, dict) or set(item) != {"seq", "at", "head", "hash", "signature"}:
        raise ValueError("not a checkpoint record")
    if isinstance(item["seq"], bool) or not isinstance(item["seq"], int) or item["seq"] < 1 \
            or not all(isinstance(item[k], str) for k in ("at", "head", "hash", "signature")):
        raise ValueError("a checkpoint record's fields have the wrong types")
    item["signature"] = base64.b64decode(item["signature"], validate=True)
    return item


def record_signed(item: dict[str, Any], public_key: Any) -> bool:
    """The record's signature is the checkpoint's, by `public_key`."""
    return _checkpoint_ok({"seq": item["seq"], "at": item["at"], "prev": item["head"],
                           "signature": item["signature"],
                           "details": canonical({"head": item["head"]}).decode()}, public_key)


def read_mirror(path: Path) -> list[dict[str, Any]]:
    """The checkpoints kept outside the database; an unreadable line is kept as a problem."""
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for n, line in enumerate(lines, 1):
        try:
            item = parse_record(line)
        except (ValueError, TypeError):
            item = {"seq": None, "line": n}
        out.append(item)
    return out


def _last_mirrored(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            tail = f.read().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(tail):
        try:
            return int(json.loads(line)["seq"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


OUTCOMES = frozenset({"ok", "refused", "failed"})


def verify_rows(rows: Iterator[dict[str, Any]] | list[dict[str, Any]],
                signer: x509.Certificate | Sequence[x509.Certificate], *,
                head: tuple[int, str] | None = None,
                first_prev: str = GENESIS_PREV, first_seq: int = 1,
                issuer: x509.Certificate | None = None,
                mirror: list[dict[str, Any]] | None = None) -> Report:
    """Check a run of entries: hashes, links, sequence, every signature, the grammar of rows,
    the recorded head, truncation, and the checkpoints kept outside.

    The grammar, which no relabelling escapes: a `checkpoint` row is signed by `signer`'s key
    (or, for a node whose certificate was renewed, by the key of the one of `signer`'s
    certificates its signer_sha256 names) over its place, time and the hash before it, and
    names no actor; a row that names an
    actor carries that actor's CMS signature over its details, by a certificate `issuer`
    issued (when `issuer` is given); any other row carries no signature. `head` is the last
    checkpoint recorded apart from the entries (audit_head): the row there must be a signed
    checkpoint with that hash. `mirror` is the checkpoints kept outside the database: each
    must be in the log, as it was signed. `first_prev` and `first_seq` let an evidence bundle
    start in the middle of a log."""
    findings: list[Finding] = []
    expect_seq, prev = first_seq, first_prev
    count = checkpoints = 0
    last_cp: int | None = None
    keys = _keys(signer)
    signed_checkpoints: dict[int, dict[str, Any]] = {}
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
            if _checkpoint_by(row, keys) and row["actor"] is None:
                last_cp = seq
                signed_checkpoints[seq] = row
            else:
                findings.append(Finding(seq, "checkpoint signature does not verify: the chain "
                                             "was rewritten without the token"))
        else:
            problem = _grammar(row, issuer)
            if problem:
                findings.append(Finding(seq, problem))
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
        elif signed_checkpoints.get(hseq, {}).get("hash") != hhash:
            findings.append(Finding(hseq, f"the recorded head, checkpoint {hseq}, is not a "
                                          "signed checkpoint of this log with the recorded "
                                          "hash: the log or its head was rewritten"))
    for item in mirror or ():
        findings += _mirrored(item, signed_checkpoints, keys, expect_seq - 1)
    return Report(count, checkpoints, last_cp, findings[:51])


def _grammar(row: dict[str, Any], issuer: x509.Certificate | None) -> str | None:
    """What is wrong with a row that is not a checkpoint, if anything."""
    if row["outcome"] not in OUTCOMES:
        return f"outcome {row['outcome']!r} is not one the log writes: the entry was forged"
    if row["actor"] is None:
        if row["signature"] is not None:
            return ("carries a signature but names no actor: a checkpoint relabelled, or a "
                    "signed act stripped of its actor")
        return None
    if not isinstance(row["signature"], bytes):
        return ("names an actor but carries no signature: a signed act relabelled or stripped, "
                "or an entry forged")
    if issuer is None:
        return None
    try:
        cert = verify_detached(row["signature"], str(row["details"]).encode(), issuer)
    except CmsError as e:
        return f"the actor's signature does not verify ({e}): the entry was rewritten"
    if format(cert.serial_number, "x") != row["actor"]:
        return (f"signed by certificate {cert.serial_number:x}, not by the actor it names "
                f"({row['actor']}): the entry was rewritten")
    return None


def _mirrored(item: dict[str, Any], signed: dict[int, dict[str, Any]], keys: dict[str, Any],
              last: int) -> list[Finding]:
    """A checkpoint kept outside the database, against the log."""
    seq = item.get("seq")
    if seq is None:
        return [Finding(None, f"line {item.get('line')} of the checkpoint copy cannot be read")]
    if not any(record_signed(item, key) for key in keys.values()):
        return [Finding(seq, "a checkpoint in the copy kept outside the database has no valid "
                             "signature: the copy was tampered with")]
    row = signed.get(seq)
    if row is None:
        why = "truncated" if seq > last else "rewritten"
        return [Finding(seq, f"checkpoint {seq}, kept outside the database, is not in the log "
                             f"as signed: the log was {why} back past it")]
    if (row["at"], row["prev"], row["hash"]) != (item["at"], item["head"], item["hash"]):
        return [Finding(seq, f"checkpoint {seq} differs from the copy kept outside the "
                             "database: the log was rewritten")]
    return []


def _keys(signer: x509.Certificate | Sequence[x509.Certificate]) -> dict[str, Any]:
    """SHA-256 fingerprint (hex) -> public key, of each certificate that may sign checkpoints."""
    certs = [signer] if isinstance(signer, x509.Certificate) else list(signer)
    return {c.fingerprint(hashes.SHA256()).hex(): c.public_key() for c in certs}


def _checkpoint_by(row: dict[str, Any], keys: dict[str, Any]) -> bool:
    """The checkpoint row is signed by the key of the certificate it names (signer_sha256),
    which must be one of `keys`; a row that names none (older logs) by any of them."""
    try:
        named = json.loads(row["details"]).get("signer_sha256")
    except (TypeError, ValueError, AttributeError, RecursionError):
        return False
    if named is not None:
        return named in keys and _checkpoint_ok(row, keys[named])
    return any(_checkpoint_ok(row, key) for key in keys.values())


def signers(rows: Iterable[dict[str, Any]], current: x509.Certificate,
            issuer: x509.Certificate) -> list[x509.Certificate]:
    """The certificates a node's checkpoints may be signed by: `current`, and those its log
    recorded when its certificate changed (`node-certificate` entries) that `issuer` issued
    to the same node (same CN and O). A recorded certificate proves nothing by being in the
    log: it counts only because the CA issued it to this node."""
    out = {current.fingerprint(hashes.SHA256()).hex(): current}
    for row in rows:
        if row["action"] != NODE_CERTIFICATE:
            continue
        try:
            details = json.loads(row["details"])
            found = [x509.load_pem_x509_certificate(str(details[k]).encode())
                     for k in ("certificate", "previous") if details.get(k)]
        except (TypeError, ValueError, KeyError, AttributeError):
            continue
        for cert in found:
            try:
                cert.verify_directly_issued_by(issuer)
            except (ValueError, TypeError, InvalidSignature):
                continue
            if (common_name(cert), organization(cert)) == (common_name(current),
                                                           organization(current)):
                out.setdefault(cert.fingerprint(hashes.SHA256()).hex(), cert)
    return list(out.values())


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
