"""The document package: what one unit sends another (N2, N4/A17, A16, A38), signed on the token.

A package is a POSIX ustar tar holding exactly four regular files, in this order:

``manifest.json``
    canonical JSON (sorted keys, no spaces, UTF-8)::

        {"files":[{"name":"document.pdf","role":"pdf","sha256":HEX,"size":N},
                  {"kind":"docx","name":"editable.docx","role":"editable","sha256":HEX,"size":N}],
         "format":"exchanged-package-1",
         "metadata":{"classification":...,"created":...,"deadline":...,"doc_id":...,
                     "number":...,"paper_original":...,"recipient":...,"sender":...,
                     "title":...,"urgency":...}}
``manifest.cms``
    a detached CMS SignedData (DER) over the exact bytes of ``manifest.json``, made on the sending
    node's token with its node certificate inside, so that ``openssl cms -verify -binary -inform
    DER -in manifest.cms -content manifest.json -CAfile ca.pem -purpose any`` accepts it;
``document.pdf``
    the PDF scan of the sealed paper document;
``editable.<kind>``
    the editable file, kind one of txt, doc, docx, wps, ofd, rtf.

The manifest comes first so that a receiver checks the signature, and learns every size and
digest, before it reads a byte of the (large) files.

**The form (N4/A17) is judged by content, never by file name.** `sniff_pdf` wants ``%PDF-1.`` or
``%PDF-2.`` in the first KiB and ``%%EOF`` in the last 2 KiB; `sniff_editable` recognises RTF
(``{\\rtf``), an OLE2 compound file with a ``WordDocument`` stream (doc), a ZIP with
``word/document.xml`` and ``[Content_Types].xml`` (docx), a ZIP with ``OFD.xml`` at its root
(ofd), and text (UTF-8 or GB18030, not empty, no NUL or other control bytes but tab, line
breaks, form feed and the DOS end-of-file mark). A PDF is never accepted as the editable file.
Kingsoft WPS Writer files are DOC-based (the same ``WordDocument`` stream plus extensions), so
their content cannot tell them from Word's: `sniff_editable` says "doc" for both, and `build`
labels such a file "wps" when the sender's file is named ``*.wps`` -- the name chooses only the
label, never whether the file is accepted.

**A38:** a classified document (secret, confidential, top-secret) is never packaged for, nor
accepted from, another unit: `build` and `read` both refuse it when sender != recipient.

**Who sent it:** a node certificate's subject CN is the unit id of the node's unit (the CA issues
node certificates with ``--name <unit-id>``; O keeps the unit's human-readable name). When the
caller of `read` passes ``expected_sender`` (the unit it knows the package came from: the
configured peer behind the TLS connection), the metadata's sender and the signer certificate's CN
must both be that unit. Without it, the caller must make that check itself (`signer_unit`).

**Bounds.** Everything an attacker controls is bounded: the manifest and the signature at 64 KiB
each, exactly four members and the end-of-archive blocks (then at most `MAX_TRAILER` zero bytes),
each file at ``max_file_size``. Files are copied and hashed in 64 KiB chunks, so memory does not
grow with their size. The tar headers are parsed one 512-byte block at a time with
`tarfile.TarInfo.frombuf` and anything but a plain regular file with the expected name is refused
before its data is read (no pax or GNU long-name headers, whose contents tarfile would buffer
whole; no links, devices, directories, absolute paths or ``..``). ZIPs are judged from their
central directory only (capped at 2 MiB), never extracted.

Errors are `PackageError` (an `ExchangedError`) with these codes:

==================  ===============================================================
``bad-form``        metadata invalid, or the editable file is not an allowed kind (N4)
``not-pdf``         the PDF scan is not a PDF (N4)
``classified``      a classified document to or from another unit (A38)
``too-large``       a file over ``max_file_size`` (or the ustar limit), a manifest or
                    signature over 64 KiB
``bad-package``     not a well-formed package: truncated, extra/odd members, bad manifest
``bad-signature``   the manifest's signature does not verify against the CA certificate
``digest-mismatch`` a file's size or SHA-256 differs from the signed manifest
``wrong-sender``    the sender is not ``expected_sender``, or the signer is not the sender
``wrong-recipient`` the recipient is not ``expected_recipient``
``key-mismatch``    `build`: the certificate is not for the token key
``unreadable``      a path given (files, package) that is not a readable regular file
``file-changed``    `build`: an input file changed while it was being packaged
==================  ===============================================================
"""

from __future__ import annotations

import codecs
import contextlib
import datetime as dt
import hashlib
import io
import json
import os
import re
import stat
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from exchanged.common import UUID_RE, canonical, new_id, stamp
from exchanged.errors import ExchangedError
from exchanged.pki.cms import CmsError, verify_detached
from exchanged.pki.keys import spki_der
from exchanged.pki.names import common_name
from exchanged.pki.token import TokenKey
from exchanged.store.files import fsync_dir

__all__ = [
    "CLASSIFICATIONS", "CLASSIFIED", "DEFAULT_MAX_FILE_SIZE", "EDITABLE_KINDS", "FORMAT",
    "FileEntry", "Manifest", "Metadata", "PackageError", "Received", "URGENCIES", "build",
    "new_id", "read", "signer_unit", "sniff_editable", "sniff_pdf",
]

FORMAT = "exchanged-package-1"
URGENCIES = ("normal", "urgent", "extra-urgent")
CLASSIFICATIONS = ("public", "internal", "secret", "confidential", "top-secret")
CLASSIFIED = frozenset({"secret", "confidential", "top-secret"})
EDITABLE_KINDS = ("txt", "doc", "docx", "wps", "ofd", "rtf")

CHUNK = 64 * 1024
MAX_MANIFEST = 64 * 1024
MAX_SIGNATURE = 64 * 1024
DEFAULT_MAX_FILE_SIZE = 1024**3
USTAR_MAX_SIZE = 8**11 - 1  # eleven octal digits
MAX_TRAILER = 64 * 1024  # zero padding after the end-of-archive blocks (tar pads to 10 KiB)
MAX_ZIP_DIRECTORY = 2 * 1024**2

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.cms"
PDF_NAME = "document.pdf"

_UNIT_RE = re.compile(r"[a-z0-9-]{1,64}")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# Bytes below 0x20 are always ASCII controls in UTF-8 and GB18030 (no trail byte is that low).
_BINARY_RE = re.compile(rb"[\x00-\x08\x0e-\x19\x1b-\x1f]")
_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_ZIP_MAGIC = b"PK\x03\x04"
_USTAR_MAGIC = b"ustar\x0000"
_BLOCK = 512


class PackageError(ExchangedError):
    code = "bad-package"


def _form(message: str) -> PackageError:
    return PackageError(message, code="bad-form")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _text(name: str, value: object, *, max_len: int, required: bool) -> str:
    if not isinstance(value, str):
        raise _form(f"{name} must be text, not {type(value).__name__}")
    if required and not value.strip():
        raise _form(f"{name} must not be empty")
    if len(value) > max_len:
        raise _form(f"{name} is too long ({len(value)} characters, {max_len} at most)")
    if _CONTROL_RE.search(value):
        raise _form(f"{name} contains a control character (line breaks included)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _form(f"{name} is not valid Unicode (lone surrogate)") from None
    return value


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise _form(f"{name} must be one of {', '.join(allowed)}, not {_short(value)}")
    return value


def _unit(name: str, value: object) -> str:
    if not isinstance(value, str) or not _UNIT_RE.fullmatch(value):
        raise _form(f"{name} must be a unit id (1 to 64 of a-z, 0-9 and -), not {_short(value)}")
    return value


def _deadline(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _form(f"deadline must be an ISO 8601 date or time, not {type(value).__name__}")
    try:
        return dt.date.fromisoformat(value).isoformat()
    except ValueError:
        pass
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        raise _form(f"deadline {_short(value)} is not an ISO 8601 date (2024-05-01) or time "
                    "with its offset (2024-05-01T17:00:00+08:00)") from None
    if t.tzinfo is None or t.utcoffset() is None:
        raise _form(f"deadline {_short(value)} needs a UTC offset (2024-05-01T17:00:00+08:00) "
                    "or must be a date")
    return t.isoformat()


def _created(value: object) -> str:
    if not isinstance(value, str):
        raise _form(f"created must be an ISO 8601 UTC time, not {type(value).__name__}")
    try:
        t = dt.datetime.fromisoformat(value)
        if t.tzinfo is None or t.utcoffset() is None:
            raise ValueError("no offset")
        return stamp(t)
    except (ValueError, OverflowError):
        raise _form(f"created {_short(value)} is not an ISO 8601 time with its offset "
                    "(2024-05-01T09:00:00Z)") from None


@dataclass(frozen=True, kw_only=True)
class Metadata:
    """What a document is, as the sender declares it; validated (and normalised) when built.

    `doc_id` is lower-cased; `deadline` becomes ``YYYY-MM-DD`` or an ISO time with its offset;
    `created` becomes UTC to the second, ``YYYY-MM-DDTHH:MM:SSZ``. Errors: code "bad-form"."""

    sender: str
    recipient: str
    title: str
    number: str = ""
    urgency: str = "normal"
    classification: str = "public"
    deadline: str | None = None
    paper_original: bool = False
    doc_id: str = field(default_factory=new_id)
    created: str = field(default_factory=stamp)
    division: str = ""  # the recipient's division it is addressed to ("": the unit's box)
    phoned: str = ""  # an urgent document sent outside office hours: "WHO, WHEN" (A20)
    corrects: str | None = None  # the doc_id of a returned document this one corrects (N4)

    FIELDS = ("doc_id", "sender", "recipient", "title", "number", "urgency", "classification",
              "deadline", "paper_original", "created", "division", "phoned", "corrects")
    # Written into the manifest only when set, so that a document without them is signed as
    # it always was.
    OPTIONAL = ("division", "phoned", "corrects")
    REQUIRED = frozenset({"doc_id", "sender", "recipient", "title", "urgency", "classification",
                          "created"})

    def __post_init__(self) -> None:
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        if not isinstance(self.doc_id, str) or not UUID_RE.fullmatch(self.doc_id):
            raise _form(f"doc_id must be a UUID (8-4-4-4-12 hex digits), not {_short(self.doc_id)}")
        put("doc_id", self.doc_id.lower())
        _unit("sender", self.sender)
        _unit("recipient", self.recipient)
        _text("title", self.title, max_len=500, required=True)
        _text("number", self.number, max_len=100, required=False)
        _choice("urgency", self.urgency, URGENCIES)
        _choice("classification", self.classification, CLASSIFICATIONS)
        put("deadline", _deadline(self.deadline))
        if not isinstance(self.paper_original, bool):
            raise _form(f"paper_original must be true or false, not {_short(self.paper_original)}")
        put("created", _created(self.created))
        _text("division", self.division, max_len=64, required=False)
        _text("phoned", self.phoned, max_len=200, required=False)
        if self.corrects is not None:
            if not isinstance(self.corrects, str) or not UUID_RE.fullmatch(self.corrects):
                raise _form(f"corrects must be a document id, not {_short(self.corrects)}")
            put("corrects", self.corrects.lower())

    @property
    def classified(self) -> bool:
        return self.classification in CLASSIFIED

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.FIELDS
                if name not in self.OPTIONAL or getattr(self, name)}

    @classmethod
    def from_dict(cls, data: object) -> Metadata:
        """Metadata from a JSON object; number, deadline and paper_original may be left out."""
        if not isinstance(data, dict):
            raise _form(f"metadata must be a JSON object, not {type(data).__name__}")
        unknown = sorted(repr(k) for k in data if k not in cls.FIELDS)
        if unknown:
            raise _form(f"unknown metadata field(s): {', '.join(unknown)[:200]}")
        missing = sorted(cls.REQUIRED - data.keys())
        if missing:
            raise _form(f"metadata lacks {', '.join(missing)}")
        return cls(**data)


@dataclass(frozen=True)
class FileEntry:
    """One file of the package as the manifest lists it. `kind` is None for the PDF."""

    role: str  # "pdf" or "editable"
    name: str
    size: int
    sha256: str
    kind: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"role": self.role, "name": self.name, "size": self.size,
                             "sha256": self.sha256}
        if self.kind is not None:
            d["kind"] = self.kind
        return d


@dataclass(frozen=True)
class Manifest:
    """The signed table of contents: metadata, and each file's name, size and SHA-256."""

    metadata: Metadata
    pdf: FileEntry
    editable: FileEntry

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "metadata": self.metadata.to_dict(),
                "files": [self.pdf.to_dict(), self.editable.to_dict()]}

    def to_bytes(self) -> bytes:
        return canonical(self.to_dict())

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse a manifest strictly: it must be exactly what `to_bytes` would write."""
        try:
            doc = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates,
                             parse_constant=_no_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise PackageError(f"manifest.json is not JSON: {e}") from None
        if not isinstance(doc, dict) or set(doc) != {"format", "metadata", "files"}:
            raise PackageError("manifest.json must hold exactly format, metadata and files")
        if doc["format"] != FORMAT:
            raise PackageError(f"unknown package format {_short(doc['format'])} "
                               f"(this node reads {FORMAT})")
        files = doc["files"]
        if not isinstance(files, list) or len(files) != 2:
            raise PackageError("manifest.json must list exactly two files")
        pdf = _entry(files[0], "pdf")
        editable = _entry(files[1], "editable")
        manifest = cls(Metadata.from_dict(doc["metadata"]), pdf, editable)
        if manifest.to_bytes() != data:
            raise PackageError("manifest.json is not in canonical form")
        return manifest


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise ValueError("duplicate key")
    return d


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _entry(d: object, role: str) -> FileEntry:
    keys = {"role", "name", "size", "sha256"} | ({"kind"} if role == "editable" else set())
    if not isinstance(d, dict) or set(d) != keys or d["role"] != role:
        raise PackageError(f"manifest.json: the {role} entry is malformed")
    kind = None
    if role == "editable":
        kind = d["kind"]
        if kind not in EDITABLE_KINDS:
            raise PackageError(f"manifest.json: unknown editable kind {_short(kind)}")
    if d["name"] != _member_name(role, kind):
        raise PackageError(f"manifest.json: the {role} file must be named "
                           f"{_member_name(role, kind)}")
    size = d["size"]
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= USTAR_MAX_SIZE:
        raise PackageError(f"manifest.json: bad size for the {role} file")
    if not isinstance(d["sha256"], str) or not _HEX64_RE.fullmatch(d["sha256"]):
        raise PackageError(f"manifest.json: bad sha256 for the {role} file")
    return FileEntry(role, d["name"], size, d["sha256"], kind)


def _member_name(role: str, kind: str | None) -> str:
    return PDF_NAME if role == "pdf" else f"editable.{kind}"


def signer_unit(cert: x509.Certificate) -> str:
    """The unit id a node certificate speaks for: its subject CN."""
    return common_name(cert)


# ---------------------------------------------------------------------------------------------
# Sniffing the form by content


def _open_regular(path: str | os.PathLike[str], what: str) -> tuple[BinaryIO, int]:
    """Open a regular file for reading: (file, size). Devices, FIFOs and directories are
    refused (a read of /dev/zero never ends)."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; cleared again below.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise PackageError(f"cannot read {what} {os.fspath(path)!r}: {e.strerror or e}",
                           code="unreadable") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise PackageError(f"{what} {os.fspath(path)!r} is not a regular file",
                           code="unreadable")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb"), st.st_size


def _pread(f: IO[bytes], offset: int, n: int) -> bytes:
    f.seek(offset)
    return f.read(n)


def _pdf_problem(f: IO[bytes], size: int) -> str | None:
    """Why this content is not a PDF, or None when it is one."""
    head = _pread(f, 0, 1024)
    if b"%PDF-1." not in head and b"%PDF-2." not in head:
        return f"it {_describe(head)}; a PDF starts with %PDF-"
    tail = _pread(f, max(0, size - 2048), 2048)
    if b"%%EOF" not in tail:
        return "it has no %%EOF mark at its end (the file is cut short?)"
    return None


def _describe(head: bytes) -> str:
    if not head:
        return "is empty"
    if head.startswith(_OLE_MAGIC):
        return "is an OLE2 compound file (a doc or wps?)"
    if head.startswith(_ZIP_MAGIC):
        return "is a ZIP file (a docx or ofd?)"
    if head.startswith(b"{\\rtf"):
        return "is an RTF file"
    return f"starts with {head[:16]!r}"


def _editable_kind(f: IO[bytes], size: int) -> str | None:
    head = _pread(f, 0, 1024)
    if not head or head.startswith(b"%PDF-") or _pdf_problem(f, size) is None:
        return None  # empty, or a PDF: the PDF may not stand in for the editable file
    if head.startswith(_OLE_MAGIC):
        return "doc" if _ole_has_stream(f, size, "WordDocument") else None
    if head.startswith(b"{\\rtf"):
        return "rtf"
    if head.startswith(_ZIP_MAGIC):
        names = _zip_names(f, size)
        if names is None:
            return None
        if "word/document.xml" in names and "[Content_Types].xml" in names:
            return "docx"
        if "OFD.xml" in names:
            return "ofd"
        return None
    return "txt" if _is_text(f) else None


def _is_text(f: IO[bytes]) -> bool:
    """UTF-8 or GB18030 throughout, checked in chunks (a multi-GB file is never held)."""
    for encoding in ("utf-8", "gb18030"):
        f.seek(0)
        decoder = codecs.getincrementaldecoder(encoding)("strict")
        try:
            while chunk := f.read(CHUNK):
                if _BINARY_RE.search(chunk):
                    return False
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
            return True
        except UnicodeDecodeError:
            continue
    return False


class _Refused(Exception):
    pass


def _ole_has_stream(f: IO[bytes], size: int, wanted: str) -> bool:
    """Whether an OLE2 compound file (MS-CFB) has a stream named `wanted`: the directory
    chain is followed through the FAT, reading at most a few thousand sectors."""
    hdr = _pread(f, 0, _BLOCK)
    if len(hdr) < _BLOCK:
        return False

    def u16(b: bytes, o: int) -> int:
        return int.from_bytes(b[o:o + 2], "little")

    def u32(b: bytes, o: int) -> int:
        return int.from_bytes(b[o:o + 4], "little")

    shift = u16(hdr, 0x1E)
    if hdr[0x1C:0x1E] != b"\xfe\xff" or shift not in (9, 12):
        return False
    ss = 1 << shift
    per = ss // 4
    budget = [4096]

    def sector(n: int) -> bytes:
        budget[0] -= 1
        if budget[0] < 0 or n > 0xFFFFFFFA or (n + 2) * ss > size:
            raise _Refused
        data = _pread(f, (n + 1) * ss, ss)
        if len(data) != ss:
            raise _Refused
        return data

    def difat(i: int) -> int:
        if i < 109:
            return u32(hdr, 0x4C + 4 * i)
        i -= 109
        s = u32(hdr, 0x44)
        while i >= per - 1:
            s = u32(sector(s), ss - 4)
            i -= per - 1
        return u32(sector(s), 4 * i)

    try:
        s = u32(hdr, 0x30)
        seen: set[int] = set()
        while s != 0xFFFFFFFE:  # ENDOFCHAIN
            if s in seen:
                return False
            seen.add(s)
            data = sector(s)
            for off in range(0, ss, 128):
                entry = data[off:off + 128]
                length = u16(entry, 64)
                if entry[66] == 2 and 2 <= length <= 64 and length % 2 == 0:  # a stream
                    if entry[:length - 2].decode("utf-16-le", "replace") == wanted:
                        return True
            s = u32(sector(difat(s // per)), 4 * (s % per))
    except _Refused:
        return False
    return False


class _CappedReader(io.RawIOBase):
    """A view of a file on which a read larger than `cap` fails: zipfile reads the whole
    central directory at once, as large as the end record claims."""

    def __init__(self, f: IO[bytes], size: int, cap: int) -> None:
        super().__init__()
        self._f, self._size, self._cap = f, size, cap

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:
            n = self._size - self._f.tell()
        if n > self._cap:
            raise _Refused
        return self._f.read(n)

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)


def _zip_names(f: IO[bytes], size: int) -> set[str] | None:
    """The names in a ZIP's central directory, or None if it is not a sane ZIP. Nothing is
    decompressed."""
    try:
        f.seek(0)
        capped = _CappedReader(f, size, MAX_ZIP_DIRECTORY)
        with zipfile.ZipFile(capped) as z:
            return set(z.namelist())
    except (_Refused, zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError,
            KeyError, IndexError, OverflowError, NotImplementedError):
        return None


def sniff_pdf(path: str | os.PathLike[str]) -> bool:
    """Whether the file is a PDF, by its content: ``%PDF-1.``/``%PDF-2.`` within the first KiB
    and ``%%EOF`` within the last 2 KiB. Raises PackageError("unreadable") for a path that is
    not a readable regular file."""
    f, size = _open_regular(path, "file")
    with f:
        return _pdf_problem(f, size) is None


def sniff_editable(path: str | os.PathLike[str]) -> str | None:
    """The kind of an editable file by its content: "txt", "rtf", "doc" (Word or Kingsoft WPS:
    OLE2 with a WordDocument stream), "docx" or "ofd"; None for anything else (a PDF too).
    Raises PackageError("unreadable") for a path that is not a readable regular file."""
    f, size = _open_regular(path, "file")
    with f:
        return _editable_kind(f, size)


# ---------------------------------------------------------------------------------------------
# Building


class _HashingReader:
    """Feeds tarfile exactly `size` bytes of `f` while hashing them; a short file is an error."""

    def __init__(self, f: IO[bytes], size: int, what: str) -> None:
        self._f, self._left, self._what = f, size, what
        self.sha = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        n = self._left if n is None or n < 0 else min(n, self._left)
        data = self._f.read(n)
        if len(data) < n:
            raise PackageError(f"{self._what} shrank while it was being packaged",
                               code="file-changed")
        self._left -= len(data)
        self.sha.update(data)
        return data


def _digest(f: IO[bytes], size: int) -> str:
    f.seek(0)
    sha = hashlib.sha256()
    left = size
    while left:
        chunk = f.read(min(CHUNK, left))
        if not chunk:
            raise PackageError("a file shrank while it was being packaged", code="file-changed")
        sha.update(chunk)
        left -= len(chunk)
    return sha.hexdigest()


def _check_size(what: str, size: int, limit: int) -> None:
    limit = min(limit, USTAR_MAX_SIZE)
    if size > limit:
        raise PackageError(f"{what} is too large ({size} bytes; {limit} at most)",
                           code="too-large")


def _check_classified(m: Metadata) -> None:
    if m.classified and m.sender != m.recipient:
        raise PackageError(f"document {m.doc_id} is {m.classification}: classified documents "
                           f"are not exchanged with other units (A38); {m.sender} may not send "
                           f"it to {m.recipient}", code="classified")


def build(metadata: Metadata, pdf_path: str | os.PathLike[str],
          editable_path: str | os.PathLike[str], *, key: TokenKey, cert: x509.Certificate,
          out_path: str | os.PathLike[str] | None = None, sink: _Sink | None = None,
          max_file_size: int = DEFAULT_MAX_FILE_SIZE) -> Manifest:
    """Package a document for sending and sign its manifest on the node's token.

    Refuses, before anything is written: a classified document for another unit ("classified"),
    a PDF scan that is not a PDF ("not-pdf"), an editable file of no allowed kind ("bad-form"),
    a file over `max_file_size` ("too-large"), a certificate not for `key` ("key-mismatch").
    The package is written to a temporary file beside `out_path`, fsynced, renamed into place
    and the directory fsynced: `out_path` is either the whole package or untouched. Or it is
    streamed into `sink` (anything with `write(bytes)`: the sending node's blob writer, which
    hashes and stores it durably itself; no file in between)."""
    if (out_path is None) == (sink is None):
        raise TypeError("give out_path or sink, one of them")
    if not isinstance(metadata, Metadata):
        raise TypeError("metadata must be a Metadata")
    _check_classified(metadata)
    if spki_der(key.public_key) != spki_der(cert.public_key()):
        raise PackageError(f"the certificate {cert.subject.rfc4514_string()} is not for token "
                           f"key {key.label!r}", code="key-mismatch")
    with contextlib.ExitStack() as stack:
        # Both files stay open from the first look to the last byte copied: every check is
        # on the same content, whatever happens to the names meanwhile.
        pdf, pdf_size = _open_regular(pdf_path, "the PDF scan")
        stack.enter_context(pdf)
        ed, ed_size = _open_regular(editable_path, "the editable file")
        stack.enter_context(ed)
        problem = _pdf_problem(pdf, pdf_size)
        if problem:
            raise PackageError(f"the PDF scan {os.fspath(pdf_path)!r} is not a PDF: {problem}",
                               code="not-pdf")
        kind = _editable_kind(ed, ed_size)
        if kind is None:
            found = _describe(_pread(ed, 0, 16))
            raise _form(f"the editable file {os.fspath(editable_path)!r} is not txt, doc, docx, "
                        f"wps, ofd or rtf (judged by its content: it {found})")
        if kind == "doc" and os.fspath(editable_path).lower().endswith(".wps"):
            kind = "wps"  # Kingsoft WPS: DOC inside (see the module docstring)
        _check_size("the PDF scan", pdf_size, max_file_size)
        _check_size("the editable file", ed_size, max_file_size)
        manifest = Manifest(
            metadata, FileEntry("pdf", PDF_NAME, pdf_size, _digest(pdf, pdf_size)),
            FileEntry("editable", _member_name("editable", kind), ed_size, _digest(ed, ed_size),
                      kind))
        data = manifest.to_bytes()
        signature = (pkcs7.PKCS7SignatureBuilder().set_data(data)
                     .add_signer(cert, key.signer(), hashes.SHA256())
                     .sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.DetachedSignature,
                                                        pkcs7.PKCS7Options.Binary]))
        mtime = int(dt.datetime.fromisoformat(metadata.created).timestamp())
        members: list[tuple[str, int, IO[bytes], str | None]] = [
            (MANIFEST_NAME, len(data), io.BytesIO(data), None),
            (SIGNATURE_NAME, len(signature), io.BytesIO(signature), None),
            (PDF_NAME, pdf_size, pdf, manifest.pdf.sha256),
            (manifest.editable.name, ed_size, ed, manifest.editable.sha256)]
        mtime = min(max(mtime, 0), 8**11 - 1)
        if sink is not None:
            _write_tar(sink, mtime, members)
        else:
            assert out_path is not None
            _write_atomically(Path(out_path), mtime, members)
    return manifest


class _Sink(Protocol):
    def write(self, data: bytes, /) -> Any: ...


def _write_tar(sink: _Sink, mtime: int,
               members: list[tuple[str, int, IO[bytes], str | None]]) -> None:
    """The tar, streamed into `sink`. A member with a digest is re-hashed as it is copied: it
    must not have changed."""
    with tarfile.open(fileobj=sink, mode="w|",  # type: ignore[call-overload]
                      format=tarfile.USTAR_FORMAT) as tar:
        for name, size, f, sha256 in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = size, mtime, 0o644
            f.seek(0)
            reader = _HashingReader(f, size, name)
            tar.addfile(info, reader)
            if sha256 is not None and reader.sha.hexdigest() != sha256:
                raise PackageError(f"{name} changed while it was being packaged",
                                   code="file-changed")


def _write_atomically(out: Path, mtime: int,
                      members: list[tuple[str, int, IO[bytes], str | None]]) -> None:
    """Write the tar to a temporary file beside `out`, fsync it, rename it into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as raw:
            _write_tar(raw, mtime, members)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(out.parent)


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class Received:
    """A package read and checked: its manifest, the signer's certificate, and where its files
    now are (``dest_dir/document.pdf``, ``dest_dir/editable.<kind>``, and the evidence
    ``dest_dir/manifest.json`` + ``dest_dir/manifest.cms`` that openssl can verify later)."""

    manifest: Manifest
    signer: x509.Certificate
    pdf: Path
    editable: Path
    manifest_path: Path
    signature_path: Path

    @property
    def metadata(self) -> Metadata:
        return self.manifest.metadata


class _Stream:
    """Bytes from a file object or an iterable of chunks, read in bounded pieces."""

    def __init__(self, read: Callable[[int], bytes]) -> None:
        self._read = read

    @classmethod
    def of_chunks(cls, chunks: Iterable[bytes]) -> _Stream:
        it: Iterator[bytes] = iter(chunks)
        view = memoryview(b"")

        def read(n: int) -> bytes:
            nonlocal view
            while not view:
                try:
                    view = memoryview(next(it))
                except StopIteration:
                    return b""
            out, view = bytes(view[:n]), view[n:]
            return out

        return cls(read)

    def read(self, n: int) -> bytes:
        """Up to n bytes; b"" only at the end."""
        return self._read(n)

    def exact(self, n: int, what: str) -> bytes:
        parts, left = [], n
        while left:
            chunk = self._read(min(left, CHUNK))
            if not chunk:
                raise PackageError(f"the package is truncated (in {what})")
            parts.append(chunk)
            left -= len(chunk)
        return b"".join(parts)

    def skip(self, n: int, what: str) -> None:
        while n:
            chunk = self._read(min(n, CHUNK))
            if not chunk:
                raise PackageError(f"the package is truncated (in {what})")
            n -= len(chunk)


_TYPE_NAMES = {tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link",
               tarfile.CHRTYPE: "a device", tarfile.BLKTYPE: "a device",
               tarfile.FIFOTYPE: "a FIFO", tarfile.DIRTYPE: "a directory",
               tarfile.XHDTYPE: "a pax header", tarfile.XGLTYPE: "a pax header",
               tarfile.SOLARIS_XHDTYPE: "a pax header", tarfile.GNUTYPE_LONGNAME: "a GNU header",
               tarfile.GNUTYPE_LONGLINK: "a GNU header", tarfile.GNUTYPE_SPARSE: "a sparse file",
               tarfile.CONTTYPE: "a contiguous file"}


def _header(src: _Stream, index: int, expected: str | None) -> tarfile.TarInfo:
    """The header of member `index` (1-based), which must be a plain regular file named
    `expected` (or any allowed editable name when `expected` is None)."""
    block = src.exact(_BLOCK, f"the header of member {index}")
    if block.count(0) == _BLOCK:
        raise PackageError(f"the package ends after {index - 1} members; it needs 4")
    try:
        info = tarfile.TarInfo.frombuf(block, "utf-8", "strict")
    except (tarfile.TarError, ValueError) as e:
        raise PackageError(f"member {index} has a malformed tar header ({e})") from None
    name = info.name
    if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        what = _TYPE_NAMES.get(info.type, f"of tar type {info.type!r}")
        raise PackageError(f"member {index} ({_short(name)}) is {what}; a package holds "
                           "regular files only")
    if block[257:265] != _USTAR_MAGIC:
        raise PackageError(f"member {index} ({_short(name)}) is not in POSIX ustar format")
    if name.startswith("/") or ".." in name.split("/"):
        raise PackageError(f"member {index} ({_short(name)}) has a path outside the package")
    allowed = [expected] if expected else [f"editable.{k}" for k in EDITABLE_KINDS]
    if name not in allowed:
        raise PackageError(f"member {index} is {_short(name)}; expected "
                           f"{' or '.join(allowed) if expected else 'editable.<kind>'}")
    if info.size < 0:
        raise PackageError(f"member {index} has a negative size")
    return info


def _small_member(src: _Stream, index: int, name: str, limit: int) -> bytes:
    info = _header(src, index, name)
    if info.size > limit:
        raise PackageError(f"{name} is too large ({info.size} bytes; {limit} at most)",
                           code="too-large")
    data = src.exact(info.size, name)
    src.skip(-info.size % _BLOCK, name)
    return data


def _file_member(src: _Stream, index: int, entry: FileEntry, max_file_size: int,
                 out: _Sink) -> None:
    info = _header(src, index, entry.name)
    if info.size != entry.size:
        raise PackageError(f"{entry.name} is {info.size} bytes but the signed manifest says "
                           f"{entry.size}", code="digest-mismatch")
    if info.size > max_file_size:  # checked on the manifest already; never trust one check
        raise PackageError(f"{entry.name} is too large", code="too-large")
    sha = hashlib.sha256()
    left = info.size
    while left:
        chunk = src.read(min(CHUNK, left))
        if not chunk:
            raise PackageError(f"the package is truncated (in {entry.name})")
        sha.update(chunk)
        out.write(chunk)
        left -= len(chunk)
    src.skip(-info.size % _BLOCK, entry.name)
    if sha.hexdigest() != entry.sha256:
        raise PackageError(f"{entry.name} does not match the SHA-256 in the signed manifest: "
                           "it was altered or damaged on the way", code="digest-mismatch")


def _end(src: _Stream) -> None:
    block = src.exact(_BLOCK, "the end-of-archive blocks")
    if block.count(0) != _BLOCK:
        raise PackageError("the package holds more than its four members")
    if src.exact(_BLOCK, "the end-of-archive blocks").count(0) != _BLOCK:
        raise PackageError("the package's end-of-archive marker is damaged")
    seen = 0
    while chunk := src.read(CHUNK):
        seen += len(chunk)
        if chunk.count(0) != len(chunk) or seen > MAX_TRAILER:
            raise PackageError("there is data after the end of the package")


def _as_stream(source: Any) -> tuple[_Stream, IO[bytes] | None]:
    if isinstance(source, str | os.PathLike):
        f, _ = _open_regular(source, "the package")
        return _Stream(f.read), f
    if isinstance(source, bytes | bytearray | memoryview):
        return _Stream(io.BytesIO(bytes(source)).read), None
    if hasattr(source, "read"):
        return _Stream(source.read), None
    return _Stream.of_chunks(source), None


def _head(src: _Stream, issuer: x509.Certificate, max_file_size: int,
          expected_sender: str | None, expected_recipient: str | None
          ) -> tuple[bytes, bytes, x509.Certificate, Manifest]:
    """The manifest and its signature (members 1 and 2), checked: (manifest bytes, signature,
    signer, manifest)."""
    data = _small_member(src, 1, MANIFEST_NAME, MAX_MANIFEST)
    signature = _small_member(src, 2, SIGNATURE_NAME, MAX_SIGNATURE)
    try:
        signer = verify_detached(signature, data, issuer)
    except CmsError as e:
        raise PackageError(f"the package's signature is not valid: {e}",
                           code="bad-signature") from None
    except (ValueError, TypeError, KeyError, IndexError, OverflowError) as e:
        raise PackageError(f"the package's signature is malformed: {e}",
                           code="bad-signature") from None
    manifest = Manifest.from_bytes(data)
    m = manifest.metadata
    if expected_recipient is not None and m.recipient != expected_recipient:
        raise PackageError(f"document {m.doc_id} is for {m.recipient}, not for "
                           f"{expected_recipient}", code="wrong-recipient")
    if expected_sender is not None:
        if m.sender != expected_sender:
            raise PackageError(f"document {m.doc_id} says it is from {m.sender}, but it came "
                               f"from {expected_sender}", code="wrong-sender")
        if signer_unit(signer) != m.sender:
            raise PackageError(f"document {m.doc_id} from {m.sender} is signed by "
                               f"{signer.subject.rfc4514_string()}, a node of another unit",
                               code="wrong-sender")
    _check_classified(m)
    for entry in (manifest.pdf, manifest.editable):
        _check_size(entry.name, entry.size, max_file_size)
    return data, signature, signer, manifest


def _check_form(manifest: Manifest, pdf: IO[bytes], pdf_size: int, ed: IO[bytes],
                ed_size: int) -> None:
    """N4: the received files' form, judged by their content."""
    problem = _pdf_problem(pdf, pdf_size)
    if problem:
        raise PackageError(f"document.pdf is not a PDF: {problem}", code="not-pdf")
    kind = _editable_kind(ed, ed_size)
    declared = manifest.editable.kind
    if kind is None or (kind != declared and not (kind == "doc" and declared == "wps")):
        found = f"its content is {kind}" if kind else "it is none of them by its content"
        raise _form(f"the editable file must be txt, doc, docx, wps, ofd or rtf, and "
                    f"{manifest.editable.name} was declared {declared}: {found}")


def read(source: str | os.PathLike[str] | BinaryIO | Iterable[bytes],
         dest_dir: str | os.PathLike[str], *, issuer: x509.Certificate,
         max_file_size: int = DEFAULT_MAX_FILE_SIZE, expected_sender: str | None = None,
         expected_recipient: str | None = None) -> Received:
    """Read a package in one pass (a path, a binary file object, or an iterable of chunks),
    check it and put its files into `dest_dir`.

    Checked, in this order: the tar structure member by member; the manifest's signature
    against the CA certificate `issuer` (only the issuing link: whether the signer's
    certificate is still good -- time, CRL -- is the caller's question); the manifest; the
    sender/recipient (when expected ones are given) and A38; each file's size and SHA-256
    against the manifest, while it is copied; the end of the archive; the form (N4) of the
    extracted files by content. Files are written under temporary names in `dest_dir` (made
    if missing) and renamed into place, fsynced, only when everything holds; on any error
    nothing is left behind. Raises PackageError. (`check` makes the same checks on a stored
    package without copying anything.)"""
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    src, owned = _as_stream(source)
    temps: list[str] = []

    def temp() -> IO[bytes]:
        fd, path = tempfile.mkstemp(prefix=".recv-", suffix=".tmp", dir=dest)
        temps.append(path)
        return os.fdopen(fd, "wb")

    try:
        data, signature, signer, manifest = _head(src, issuer, max_file_size,
                                                  expected_sender, expected_recipient)
        outputs = []
        for index, entry in ((3, manifest.pdf), (4, manifest.editable)):
            with temp() as out:
                _file_member(src, index, entry, max_file_size, out)
                out.flush()
                os.fsync(out.fileno())
            outputs.append(temps[-1])
        _end(src)
        pdf_tmp, ed_tmp = outputs
        pdf, pdf_size = _open_regular(pdf_tmp, "the received PDF")
        ed, ed_size = _open_regular(ed_tmp, "the received editable file")
        with pdf, ed:
            _check_form(manifest, pdf, pdf_size, ed, ed_size)
        evidence = []
        for blob in (data, signature):
            with temp() as out:
                out.write(blob)
                out.flush()
                os.fsync(out.fileno())
            evidence.append(temps[-1])
        final = [dest / PDF_NAME, dest / manifest.editable.name, dest / MANIFEST_NAME,
                 dest / SIGNATURE_NAME]
        for tmp, path in zip([pdf_tmp, ed_tmp, *evidence], final, strict=True):
            os.replace(tmp, path)
        temps.clear()
        fsync_dir(dest)
        return Received(manifest, signer, *final)
    finally:
        for name in temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
        if owned is not None:
            owned.close()


@dataclass(frozen=True)
class Checked:
    """A stored package that holds (`check`): its manifest and who signed it."""

    manifest: Manifest
    signer: x509.Certificate

    @property
    def metadata(self) -> Metadata:
        return self.manifest.metadata


class _Window(io.RawIOBase):
    """Bytes [start, start + size) of a file, as a file of its own (the sniffers seek)."""

    def __init__(self, f: IO[bytes], start: int, size: int) -> None:
        super().__init__()
        self._f, self._start, self._size, self._pos = f, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, min(self._size, base + offset))
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, n: int | None = -1) -> bytes:
        left = self._size - self._pos
        n = left if n is None or n < 0 else min(n, left)
        self._f.seek(self._start + self._pos)
        data = self._f.read(n)
        self._pos += len(data)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)


class _Discard(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        return len(data)


def check(path: str | os.PathLike[str], *, issuer: x509.Certificate,
          max_file_size: int = DEFAULT_MAX_FILE_SIZE, expected_sender: str | None = None,
          expected_recipient: str | None = None) -> Checked:
    """Every check of `read`, on a package stored at `path`, without copying a byte of it:
    one pass hashes the members where they lie, then the form is judged on the files inside
    the package itself (a tar stores each member whole, in one place). What a receiving node
    runs on each arriving package. Raises PackageError."""
    f, _ = _open_regular(path, "the package")
    with f:
        src = _Stream(f.read)
        _, _, signer, manifest = _head(src, issuer, max_file_size, expected_sender,
                                       expected_recipient)
        places = []
        for index, entry in ((3, manifest.pdf), (4, manifest.editable)):
            places.append(f.tell() + _BLOCK)  # the member's data, after its header
            _file_member(src, index, entry, max_file_size, _Discard())
        _end(src)
        with _Window(f, places[0], manifest.pdf.size) as pdf, \
                _Window(f, places[1], manifest.editable.size) as ed:
            _check_form(manifest, pdf, manifest.pdf.size,  # type: ignore[arg-type]
                        ed, manifest.editable.size)  # type: ignore[arg-type]
        return Checked(manifest, signer)
