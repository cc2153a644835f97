"""Backups of a running node, and their restore (issue 10, item 7).

A backup is a directory the daemon writes when the node's administrator asks (`exchanged
backup DIR`: an act signed on their token, checked by `exchanged.roles` and recorded in the
audit log, as `archive export` is):

    backup.json    what is in it: the unit, when, by whom, the node certificate, the database's
                   digest, every file with its size and SHA-256, the audit log's head; canonical
                   JSON, signed by the node (backup.cms)
    backup.cms     detached CMS over backup.json, made on the node token (`Operator.sign`, as
                   an archive's list; checked by `pki.cms.verify_detached` and by openssl)
    node.db        the database, through SQLite's online backup API: one consistent snapshot
    blobs/ab/…     every package the snapshot names, each hashed against its name as copied
    audit-checkpoints.jsonl   the copy of the signed checkpoints kept beside the database, cut
                   at the snapshot's head
    VERIFY.txt     the openssl command that checks the list's signature

Directories are 0700, files 0600. A failure removes what was written and is recorded.

Consistency. The act, a signed checkpoint and the snapshot are taken in one hold of the
database (the daemon's DB limiter), so the snapshot's head is that checkpoint and its copy of
the checkpoints ends there. The blobs are copied afterwards, in a thread, without the
database: a blob is immutable and named by its digest, and one the snapshot names cannot be
deleted meanwhile — rows are never deleted, and the store deletes only blobs no row names (a
refused package's at once, orphans at start-up; see `NodeStore.blob_refs`). Should one be
missing or not hash to its name all the same (disk damage, someone else), the backup fails
saying which blob, and its directory is removed.

Restore (`exchanged restore DIR`) runs with the daemon stopped: it refuses while the control
socket answers or another process has the database open; checks the list's signature against
the configured CA and that its signer is this unit's node certificate; every file's size and
SHA-256 against the list, as it copies them into a temporary directory inside the data
directory; the backed-up audit chain with `nodedb.verify_log` (hashes, grammar, every
signature, the checkpoints' copy); then records the restore in the log, moves an existing
store aside (only with `--force`, into `replaced-TIME/`: nothing is deleted) and renames the
new one into place, database last. Documents queued or in flight at the snapshot go again
when the daemon starts; the recipient acknowledges a repeat by its id ("duplicate"), so
nothing is lost and nothing is received twice.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shutil
import socket
import sqlite3
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from exchanged.common import stamp
from exchanged.errors import ExchangedError
from exchanged.node.config import Config
from exchanged.pki.cms import CmsError, verify_detached
from exchanged.pki.operator import Operator
from exchanged.store.audit import MIRROR
from exchanged.store.db import StoreError
from exchanged.store.files import fsync_dir
from exchanged.store.nodedb import (
    BLOB_MODE,
    BLOBS,
    DB_NAME,
    NodeStore,
    sha256_file,
    verify_log,
)

FORMAT = "exchanged-backup-1"
MANIFEST = "backup.json"
SIGNATURE = "backup.cms"
DIR_MODE = 0o700
FILE_MODE = 0o600
CHUNK = 1 << 20
_BLOB_PATH = re.compile(r"blobs/([0-9a-f]{2})/([0-9a-f]{64})")
_SHA256 = re.compile(r"[0-9a-f]{64}")
VERIFY_TXT = """How to check this backup's list with openssl alone (from this directory; CA.pem is
your copy of the CA certificate):

  openssl cms -verify -binary -inform DER -in backup.cms -content backup.json \\
      -CAfile CA.pem -purpose any -out /dev/null

The signer must be the node's certificate (backup.json: node_certificate); every file's
SHA-256 is in backup.json (sha256sum). `exchanged restore DIR` checks all of it, and the
audit chain, before it installs anything.
"""


class BackupError(ExchangedError):
    code = "backup"


# -- taking a backup (at the daemon) ------------------------------------------------------------


@dataclass
class Snapshot:
    """A backup being written: its directory (`created` if the backup made it), the audit
    head the snapshot ends at, and, once copied, its files and the blobs it names."""

    out: Path
    created: bool
    head: tuple[int, str]
    files: list[dict[str, Any]] = field(default_factory=list)
    blobs: int = 0
    statistics: dict[str, Any] = field(default_factory=dict)


def check_target(out: Path) -> None:
    """A backup goes into a new directory, or an empty one, named by an absolute path."""
    if not out.is_absolute():
        raise BackupError(f"{out}: give the backup directory as an absolute path",
                          code="usage")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise BackupError(f"{out} exists and is not a directory; choose a new directory",
                          code="exists")
    if out.is_dir() and any(out.iterdir()):
        raise BackupError(f"{out} is not empty; a backup goes into a new or empty directory",
                          code="exists")


def snapshot(store: NodeStore, out: Path, mirror: Path) -> Snapshot:
    """The consistent part, while the caller holds the database (no transaction open): the
    database through SQLite's online backup API, and the checkpoints' copy cut at the
    snapshot's head. Removes what it wrote if it fails."""
    check_target(out)
    created = not out.exists()
    try:
        out.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        out.chmod(DIR_MODE)
        db = out / DB_NAME
        store.backup_to(db)
        db.chmod(FILE_MODE)
        head = store.audit.head()
        if mirror.exists():
            _write_new(out / MIRROR, _mirror_upto(mirror.read_bytes(), head[0]))
        return Snapshot(out, created, head)
    except (OSError, sqlite3.Error) as e:
        discard(out, created)
        raise BackupError(f"cannot write the backup into {out}: "
                          f"{getattr(e, 'strerror', None) or e} (the daemon "
                          "writes it as the service's user; under systemd, only the unit's "
                          "ReadWritePaths are writable: add the backup location there)",
                          code="io") from None
    except BaseException:
        discard(out, created)
        raise


def _mirror_upto(data: bytes, last: int) -> bytes:
    """The checkpoints' copy up to entry `last` (checkpoints the daemon wrote after the
    snapshot are not in the backed-up log: kept, they would read as a log cut back)."""
    kept = []
    for line in data.splitlines(keepends=True):
        try:
            seq = json.loads(line)["seq"]
        except (ValueError, KeyError, TypeError):
            seq = None  # kept as it is: audit verify reports an unreadable line
        if isinstance(seq, int) and seq > last:
            break
        kept.append(line)
    return b"".join(kept)


def copy_blobs(snap: Snapshot, blobs: Path) -> list[dict[str, Any]]:
    """Outside the database (a thread of its own): every blob the snapshot names, from the
    store's `blobs` directory, hashed as it is copied and held to its name and size. Returns
    every file of the backup so far with its size and SHA-256."""
    out = snap.out
    store = NodeStore.read_only(out / DB_NAME)
    try:
        refs = store.blob_refs()
        snap.statistics = store.statistics()
    finally:
        store.close()
    files = [_entry(out, DB_NAME)]
    if (out / MIRROR).exists():
        files.append(_entry(out, MIRROR))
    try:
        (out / BLOBS).mkdir(mode=DIR_MODE)
        for sha, size in refs:
            files.append(_copy_blob(sha, size, blobs, out))
    except OSError as e:
        raise BackupError(f"cannot copy the blobs into {out}: {e.strerror or e}",
                          code="io") from None
    snap.blobs = len(refs)
    snap.files = files
    return files


def _copy_blob(sha: str, size: int, blobs: Path, out: Path) -> dict[str, Any]:
    src = blobs / sha[:2] / sha
    dest = out / BLOBS / sha[:2] / sha
    dest.parent.mkdir(mode=DIR_MODE, exist_ok=True)
    try:
        actual, n = _copy(src, dest)
    except FileNotFoundError:
        if os.path.lexists(src):
            raise  # the destination's
        raise BackupError(f"blob {sha}, which the backed-up database names, is missing from the "
                          f"store ({src}): a blob a document names is never deleted, so this is "
                          "disk damage or someone else's doing; check the store (exchanged "
                          "audit verify --node-config), then back up again",
                          code="missing-blob") from None
    if actual != sha or n != size:
        raise BackupError(f"blob {src} does not match its name (its content hashes to {actual}, "
                          f"{n} bytes; the database says {size}): disk damage or tampering; "
                          "the backup was not written", code="corrupt-blob")
    return {"path": f"{BLOBS}/{sha[:2]}/{sha}", "size": n, "sha256": actual}


def seal(snap: Snapshot, *, unit: str, signer: Operator, by: str) -> dict[str, Any]:
    """The list of the backup, signed on the node token (call through the token's limiter),
    written with the openssl command that checks it; everything made durable."""
    out = snap.out
    db = next(f for f in snap.files if f["path"] == DB_NAME)
    manifest = {
        "format": FORMAT, "unit": unit, "created": stamp(), "by": by,
        "node_certificate": signer.cert.public_bytes(serialization.Encoding.PEM).decode(),
        "database": {"path": DB_NAME, "sha256": db["sha256"], "size": db["size"]},
        "audit": {"head_seq": snap.head[0], "head_hash": snap.head[1]},
        "documents": {"outbox": sum(snap.statistics["outbox"].values()),
                      "inbox": sum(snap.statistics["inbox"].values())},
        "blobs": snap.blobs, "files": snap.files}
    data, cms = signer.sign(manifest, detached=True)
    try:
        _write_new(out / MANIFEST, data)
        _write_new(out / SIGNATURE, cms)
        _write_new(out / "VERIFY.txt", VERIFY_TXT.encode())
        for d in sorted({out, out / BLOBS, *((out / f["path"]).parent for f in snap.files)}):
            fsync_dir(d)
        fsync_dir(out.parent)
    except OSError as e:
        raise BackupError(f"cannot write the backup's list into {out}: {e.strerror or e}",
                          code="io") from None
    manifest["manifest_sha256"] = hashlib.sha256(data).hexdigest()
    return manifest


def discard(out: Path, created: bool) -> None:
    """Remove a failed backup: the directory if the backup made it, else what it put there."""
    if created:
        shutil.rmtree(out, ignore_errors=True)
        return
    for p in out.iterdir() if out.is_dir() else ():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


# -- files ----------------------------------------------------------------------------------------


def _copy(src: Path, dest: Path) -> tuple[str, int]:
    """Copy `src` (not through a symbolic link) to the new file `dest` (0600), hashing as it
    goes, and fsync it: (SHA-256, size)."""
    h = hashlib.sha256()
    n = 0
    fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            while block := os.read(fd, CHUNK):
                h.update(block)
                n += len(block)
                _write_all(out, block)
            os.fsync(out)
        finally:
            os.close(out)
    finally:
        os.close(fd)
    return h.hexdigest(), n


def _write_new(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _entry(base: Path, name: str) -> dict[str, Any]:
    return {"path": name, "size": (base / name).stat().st_size,
            "sha256": sha256_file(base / name)}


# -- restoring (offline) --------------------------------------------------------------------------


def daemon_listening(path: Path) -> bool:
    """Whether a daemon answers on the control socket at `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        try:
            s.connect(str(path))
        except PermissionError:
            raise BackupError(f"no permission for {path}: run restore as the service's user",
                              code="no-permission") from None
        except OSError:  # no socket, or a stale one nobody listens on
            return False
    return True


def _store_parts(data: Path) -> list[str]:
    """What of a node store is in the data directory."""
    found = [n for n in (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", MIRROR)
             if (data / n).exists() or (data / n).is_symlink()]
    blobs = data / BLOBS
    if blobs.is_symlink() or (blobs.exists() and (not blobs.is_dir() or any(blobs.iterdir()))):
        found.append(BLOBS)
    return found


def _refuse_if_in_use(db: Path) -> None:
    """Another process (a daemon) with the database open holds its WAL: leaving WAL mode then
    fails with "database is locked". Alone, this also folds the WAL into the file that is
    moved aside, so that it is whole by itself."""
    if not db.exists():
        return
    try:
        conn = sqlite3.connect(str(db), timeout=1, isolation_level=None)
    except sqlite3.Error:
        return  # unreadable: that is what the restore is for
    try:
        conn.execute("PRAGMA journal_mode=DELETE").fetchone()
    except sqlite3.OperationalError as e:
        if "locked" in str(e) or "busy" in str(e):
            raise BackupError(f"the database {db} is in use by another process (is the daemon "
                              "running?): stop it, then restore", code="in-use") from None
    except sqlite3.DatabaseError:
        pass  # damaged: moved aside all the same
    finally:
        conn.close()


def read_manifest(src: Path, cfg: Config) -> tuple[dict[str, Any], bytes, x509.Certificate,
                                                   x509.Certificate]:
    """The backup's list, its signature checked against the configured CA and its signer
    held to this unit's node certificate: (the list, its bytes, the node certificate, the CA
    certificate that issued it)."""
    try:
        data = (src / MANIFEST).read_bytes()
        cms = (src / SIGNATURE).read_bytes()
    except FileNotFoundError as e:
        raise BackupError(f"{src} is not a backup: {Path(str(e.filename)).name} is missing",
                          code="not-a-backup") from None
    except OSError as e:
        raise BackupError(f"cannot read the backup {src}: {e.strerror}", code="io") from None
    try:
        node_cert = x509.load_pem_x509_certificates(cfg.cert.read_bytes())[0]
        cas = [c for p in cfg.ca for c in x509.load_pem_x509_certificates(p.read_bytes())]
    except (OSError, ValueError) as e:
        raise BackupError(f"cannot read the node's or the CA's certificate named in "
                          f"{cfg.source}: {e}", code="config") from None
    signer, issuer, problem = None, None, "no CA is configured"
    for ca in cas:
        try:
            signer = verify_detached(cms, data, ca)
            issuer = ca
            break
        except CmsError as e:
            problem = str(e)
    if signer is None or issuer is None:
        raise BackupError(f"{MANIFEST}'s signature does not verify against the configured CA "
                          f"({problem}): the backup was altered, or is not this CA's; nothing "
                          "was restored", code="tampered")
    fp = hashes.SHA256()
    if signer.fingerprint(fp) != node_cert.fingerprint(fp):
        raise BackupError(f"{MANIFEST} is signed by {signer.subject.rfc4514_string()} (serial "
                          f"{signer.serial_number:x}), not by this unit's node certificate "
                          f"{node_cert.subject.rfc4514_string()} (serial "
                          f"{node_cert.serial_number:x}, {cfg.cert}): another node's backup, "
                          "or one from before the certificate was renewed; nothing was restored",
                          code="wrong-signer")
    try:
        manifest = json.loads(data)
    except ValueError as e:
        raise BackupError(f"{MANIFEST} cannot be read: {e}", code="not-a-backup") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupError(f"{src}: unknown backup format "
                          f"{manifest.get('format') if isinstance(manifest, dict) else None!r}",
                          code="not-a-backup")
    if manifest.get("unit") != cfg.unit:
        raise BackupError(f"{src} is a backup of unit {manifest.get('unit')!r}, not of "
                          f"{cfg.unit!r}", code="wrong-unit")
    _check_files(manifest)
    return manifest, data, node_cert, issuer


def _check_files(manifest: dict[str, Any]) -> None:
    """The list names only the files a backup holds, each once, a blob by its own digest."""
    files = manifest.get("files")
    if not isinstance(files, list) or not files:
        raise BackupError(f"{MANIFEST} lists no files", code="not-a-backup")
    seen = set()
    for f in files:
        if not isinstance(f, dict) or not isinstance(f.get("path"), str) or \
                not isinstance(f.get("size"), int) or not isinstance(f.get("sha256"), str) or \
                not _SHA256.fullmatch(f["sha256"]):
            raise BackupError(f"{MANIFEST}: a file entry is malformed: {f!r}",
                              code="not-a-backup")
        path = f["path"]
        blob = _BLOB_PATH.fullmatch(path)
        if path not in (DB_NAME, MIRROR) and not blob:
            raise BackupError(f"{MANIFEST} names {path!r}, which is no file of a backup",
                              code="not-a-backup")
        if blob and (blob.group(2) != f["sha256"] or blob.group(2)[:2] != blob.group(1)):
            raise BackupError(f"{MANIFEST}: {path} is listed with another content's digest",
                              code="not-a-backup")
        if path in seen:
            raise BackupError(f"{MANIFEST} lists {path} twice", code="not-a-backup")
        seen.add(path)
    db = manifest.get("database")
    if DB_NAME not in seen or not isinstance(db, dict) or not any(
            f["path"] == DB_NAME and f["sha256"] == db.get("sha256") for f in files):
        raise BackupError(f"{MANIFEST} does not list the database as its own digest says",
                          code="not-a-backup")


def restore(src: Path, cfg: Config, *, force: bool = False) -> dict[str, Any]:
    """Install the backup in `src` as the store of the node `cfg` configures, the daemon
    stopped (see the module's doc). Returns what was restored."""
    data = cfg.data_dir
    if daemon_listening(cfg.socket_path):
        raise BackupError(f"the daemon is running (its control socket {cfg.socket_path} "
                          "answers): stop it (systemctl stop exchanged), then restore",
                          code="daemon-running")
    existing = _store_parts(data) if data.exists() else []
    if existing and not force:
        raise BackupError(f"{data} holds a node store already ({', '.join(existing)}): restore "
                          "over it with --force, which moves it aside into "
                          f"{data}/replaced-TIME/ (nothing is deleted)", code="exists")
    if existing:
        _refuse_if_in_use(data / DB_NAME)
    manifest, raw, node_cert, issuer = read_manifest(src, cfg)
    try:
        data.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=data, prefix=".restore-"))
    except OSError as e:
        raise BackupError(f"cannot write into the data directory {data}: {e.strerror or e}",
                          code="io") from None
    try:
        summary = _prepare(src, work, manifest, raw, node_cert, issuer, cfg)
        aside = _install(work, data, existing)
    except OSError as e:
        shutil.rmtree(work, ignore_errors=True)
        raise BackupError(f"restoring into {data} failed: {e.strerror or e}; nothing was "
                          "installed", code="io") from None
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    summary["moved_aside"] = str(aside) if aside else None
    summary["data_dir"] = str(data)
    return summary


def _prepare(src: Path, work: Path, manifest: dict[str, Any], raw: bytes,
             node_cert: x509.Certificate, issuer: x509.Certificate,
             cfg: Config) -> dict[str, Any]:
    """Copy every listed file into `work` (laid out as a data directory), each held to the
    list as it is copied; check the database and its audit chain; record the restore."""
    (work / BLOBS).mkdir(mode=DIR_MODE)
    listed: dict[str, int] = {}
    for f in manifest["files"]:
        path = f["path"]
        dest = work / path
        dest.parent.mkdir(mode=DIR_MODE, exist_ok=True)
        try:
            actual, n = _copy(src / path, dest)
        except FileNotFoundError:
            raise BackupError(f"{path}, listed in the signed {MANIFEST}, is missing from {src}; "
                              "nothing was restored", code="tampered") from None
        except OSError as e:
            raise BackupError(f"cannot copy {src / path}: {e.strerror or e}; nothing was "
                              "restored", code="io") from None
        if actual != f["sha256"] or n != f["size"]:
            raise BackupError(f"{path} does not match the signed {MANIFEST} (its SHA-256 is "
                              f"{actual}, {n} bytes; the list says {f['sha256']}, {f['size']} "
                              "bytes): the backup was altered or damaged; nothing was restored",
                              code="tampered")
        if _BLOB_PATH.fullmatch(path):
            dest.chmod(BLOB_MODE)
            listed[f["sha256"]] = n
    try:
        store = NodeStore.open(work, create=False)
    except StoreError as e:
        raise BackupError(f"the backed-up database cannot be used: {e}", code="bad-db") from None
    try:
        head = store.audit.head()
        want = manifest.get("audit") or {}
        if (head[0], head[1]) != (want.get("head_seq"), want.get("head_hash")):
            raise BackupError(f"the backed-up audit log ends at entry {head[0]}, not at the "
                              f"entry {want.get('head_seq')} the list names; nothing was "
                              "restored", code="tampered")
        for sha, size in store.blob_refs():
            if listed.get(sha) != size:
                raise BackupError(f"the backed-up database names blob {sha}, which the backup "
                                  "does not hold; nothing was restored", code="tampered")
        statistics = store.statistics()
    finally:
        store.close()
    report = verify_log(work, node_cert, issuer)
    if not report.ok:
        raise BackupError(f"the backed-up audit log does not verify: {report.findings[0]} "
                          f"({len(report.findings)} problem(s)); nothing was restored",
                          code="tampered")
    manifest_sha = hashlib.sha256(raw).hexdigest()
    store = NodeStore.open(work, create=False)
    try:
        with store.transaction():  # the log says where this store came from
            seq = store.audit.append(action="node-restore", obj=cfg.unit, details={
                "backup": str(src), "created": manifest.get("created"), "by": manifest.get("by"),
                "manifest_sha256": manifest_sha, "head_seq": head[0]})
    finally:
        store.close()
    os.chmod(work / DB_NAME, FILE_MODE)
    for sub in (work / BLOBS).iterdir():
        sub.chmod(DIR_MODE)
    if (work / MIRROR).exists():
        (work / MIRROR).chmod(FILE_MODE)
    return {"from": str(src), "unit": cfg.unit, "created": manifest.get("created"),
            "by": manifest.get("by"), "manifest_sha256": manifest_sha,
            "outbox": statistics["outbox"], "inbox": statistics["inbox"],
            "documents": {"outbox": sum(statistics["outbox"].values()),
                          "inbox": sum(statistics["inbox"].values())},
            "blobs": len(listed), "blob_bytes": sum(listed.values()),
            "audit": {"head_seq": head[0], "head_hash": head[1], "restore_entry": seq},
            "witness": cfg.witness}


def _install(work: Path, data: Path, existing: list[str]) -> Path | None:
    """Move an existing store aside, then rename the prepared one into place, the database
    last (until it is there, the data directory holds no store). Returns where the old
    store went."""
    aside = None
    if existing:
        when = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        aside = data / f"replaced-{when}"
        n = 1
        while aside.exists():
            n += 1
            aside = data / f"replaced-{when}-{n}"
        aside.mkdir(mode=DIR_MODE)
    try:
        if aside is not None:
            for name in existing:
                os.rename(data / name, aside / name)
            fsync_dir(aside)
        blobs = data / BLOBS
        if blobs.is_dir() and not blobs.is_symlink():
            blobs.rmdir()  # empty (else it was moved aside)
        for name in (BLOBS, MIRROR, f"{DB_NAME}-wal", f"{DB_NAME}-shm", DB_NAME):
            if (work / name).exists():
                os.rename(work / name, data / name)
        fsync_dir(data)
    except OSError as e:
        raise BackupError(f"installing the restored store in {data} failed: {e}"
                          + (f"; the store that was there is in {aside}" if aside else ""),
                          code="io") from None
    work.rmdir()
    data.chmod(DIR_MODE)
    return aside


__all__ = ["BackupError", "Snapshot", "check_target", "copy_blobs", "daemon_listening",
           "discard", "read_manifest", "restore", "seal", "snapshot"]
