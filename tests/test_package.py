"""The document package: built with a node key on SoftHSM, read back, judged by openssl, and
refused -- with the code and a reason the sender can act on -- in every wrong form."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import subprocess
import tarfile
import time
import tracemalloc
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from conftest import Tokens, uid
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from exchanged import package
from exchanged.common import canonical
from exchanged.errors import ExchangedError
from exchanged.package import Manifest, Metadata, PackageError, sniff_editable, sniff_pdf
from exchanged.pki import profiles
from exchanged.pki.pin import PinSource
from exchanged.pki.token import Token, TokenKey
from exchanged.pki.uri import parse

# -- test material ----------------------------------------------------------------------------


def minimal_pdf(extra: bytes = b"") -> bytes:
    """A one-page PDF written by hand, with a correct cross-reference table."""
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>",
            b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] >>"]
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for i, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (i, body)
    out += extra
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    for off in offsets:
        out += b"%010d 00000 n \n" % off
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1,
                                                                               xref)
    return bytes(out)


def zip_bytes(names: list[str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name in names:
            z.writestr(name, f"<x>{name}</x>")
    return buf.getvalue()


def docx_bytes() -> bytes:
    return zip_bytes(["[Content_Types].xml", "_rels/.rels", "word/document.xml"])


def ofd_bytes() -> bytes:
    return zip_bytes(["OFD.xml", "Doc_0/Document.xml", "Doc_0/Pages/Page_0/Content.xml"])


def ole2_bytes(streams: list[str], shift: int = 9) -> bytes:
    """A minimal MS-CFB compound file: header, one FAT sector, one directory sector."""
    ss = 1 << shift
    end, free, fatsect, nostream = 0xFFFFFFFE, 0xFFFFFFFF, 0xFFFFFFFD, 0xFFFFFFFF

    def u16(v: int) -> bytes:
        return v.to_bytes(2, "little")

    def u32(v: int) -> bytes:
        return v.to_bytes(4, "little")

    hdr = bytearray(ss)
    hdr[0:8] = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
    hdr[0x18:0x1A] = u16(0x3E)
    hdr[0x1A:0x1C] = u16(3 if shift == 9 else 4)
    hdr[0x1C:0x1E] = b"\xfe\xff"
    hdr[0x1E:0x20] = u16(shift)
    hdr[0x20:0x22] = u16(6)
    hdr[0x2C:0x30] = u32(1)  # one FAT sector
    hdr[0x30:0x34] = u32(1)  # the directory starts at sector 1
    hdr[0x38:0x3C] = u32(4096)
    hdr[0x3C:0x40] = u32(end)
    hdr[0x44:0x48] = u32(end)
    hdr[0x4C:0x200] = u32(0) + u32(free) * 108  # DIFAT: the FAT is sector 0
    fat = bytearray(u32(free) * (ss // 4))
    fat[0:8] = u32(fatsect) + u32(end)
    entries = b""
    for i, (name, kind) in enumerate([("Root Entry", 5)] + [(s, 2) for s in streams]):
        raw = (name + "\0").encode("utf-16-le")
        e = bytearray(128)
        e[0:len(raw)] = raw
        e[64:66] = u16(len(raw))
        e[66] = kind
        e[68:80] = u32(nostream) * 2 + u32(2 if i == 0 and streams else nostream)
        e[116:120] = u32(end)
        entries += bytes(e)
    assert len(entries) <= ss
    directory = entries.ljust(ss, b"\0")
    return bytes(hdr) + bytes(fat) + directory


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# -- PKI: a CA, and a node certificate for a key on the SoftHSM token "node" -----------------


@dataclass
class Pki:
    key: TokenKey
    ca: x509.Certificate
    cert: x509.Certificate  # CN=finance (the unit id), O=Finance Bureau
    rogue_cert: x509.Certificate  # the same key, certified by another CA


def make_ca(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    cert = profiles.ca_root(name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]),
                            public_key=key.public_key(), not_before=now,
                            days=365).sign(key, hashes.SHA256())
    return key, cert


def node_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, public_key: Any,
              unit_id: str) -> x509.Certificate:
    return profiles.end_entity(
        "node", form=profiles.Form(name=unit_id, unit="Finance Bureau"), public_key=public_key,
        ca_cert=ca_cert, serial=profiles.random_serial(),
        not_before=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1), days=30,
        crl_url=None).sign(ca_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tokens: Tokens) -> Iterator[Pki]:
    with Token.open(parse("pkcs11:token=node"),
                    PinSource("node", "EXCHANGED_TEST_PIN", tokens.pin("node"))) as tok:
        key = tok.generate_keypair(f"pkg-{uid()}")
        ca_key, ca = make_ca("Package Test CA")
        rogue_key, rogue = make_ca("Rogue CA")
        yield Pki(key, ca, node_cert(ca_key, ca, key.public_key, "finance"),
                  node_cert(rogue_key, rogue, key.public_key, "finance"))


def meta(**changes: Any) -> Metadata:
    base: dict[str, Any] = dict(
        sender="finance", recipient="justice", title="关于做好2012年春节期间值班工作的通知",
        number="财办〔2012〕12号", urgency="urgent", classification="internal",
        deadline="2012-01-20", paper_original=True)
    base.update(changes)
    return Metadata(**base)


@dataclass
class Files:
    pdf: Path
    docx: Path


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return Files(write(tmp_path / "scan.pdf", minimal_pdf()),
                 write(tmp_path / "draft.docx", docx_bytes()))


def build(pki: Pki, files: Files, out: Path, m: Metadata | None = None, **kw: Any) -> Manifest:
    return package.build(m or meta(), files.pdf, files.docx, key=pki.key, cert=pki.cert,
                         out_path=out, **kw)


def members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]  # type: ignore[union-attr]


def write_tar(path: Path, items: list[tuple[str, bytes]], *,
              tweak: Callable[[tarfile.TarInfo], None] | None = None,
              fmt: int = tarfile.USTAR_FORMAT) -> Path:
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if tweak:
                tweak(info)
            tar.addfile(info, io.BytesIO(data))
    return path


def sign(pki: Pki, data: bytes, cert: x509.Certificate | None = None) -> bytes:
    signer = pki.key.signer()
    return (pkcs7.PKCS7SignatureBuilder().set_data(data)
            .add_signer(cert or pki.cert, signer, hashes.SHA256())  # type: ignore[arg-type]
            .sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.DetachedSignature,
                                               pkcs7.PKCS7Options.Binary]))


def forge(pki: Pki, path: Path, m: Metadata, pdf: bytes, editable: bytes, kind: str) -> Path:
    """A package signed on the token, but put together by hand (what build would refuse)."""
    manifest = Manifest(m, package.FileEntry("pdf", "document.pdf", len(pdf),
                                             hashlib.sha256(pdf).hexdigest()),
                        package.FileEntry("editable", f"editable.{kind}", len(editable),
                                          hashlib.sha256(editable).hexdigest(), kind))
    data = manifest.to_bytes()
    return write_tar(path, [("manifest.json", data), ("manifest.cms", sign(pki, data)),
                            ("document.pdf", pdf), (f"editable.{kind}", editable)])


def refused(code: str, fn: Callable[[], object], match: str = "") -> PackageError:
    with pytest.raises(PackageError) as info:
        fn()
    assert info.value.code == code, f"{info.value.code}: {info.value}"
    if match:
        assert match in str(info.value), str(info.value)
    return info.value


def openssl_verify(tmp: Path, manifest: Path, cms: Path, ca: x509.Certificate) -> None:
    ca_pem = write(tmp / f"ca-{uid()}.pem", ca.public_bytes(serialization.Encoding.PEM))
    p = subprocess.run(["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in", str(cms),
                        "-content", str(manifest), "-CAfile", str(ca_pem), "-purpose", "any",
                        "-out", os.devnull], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "Verification successful" in p.stderr


# -- round trip --------------------------------------------------------------------------------


def test_round_trip_token_signature_and_openssl(pki: Pki, files: Files, tmp_path: Path) -> None:
    m = meta()
    out = tmp_path / "out" / "pkg.tar"
    out.parent.mkdir()
    manifest = build(pki, files, out, m)
    assert manifest.metadata == m
    assert manifest.pdf.sha256 == hashlib.sha256(files.pdf.read_bytes()).hexdigest()
    assert manifest.editable.kind == "docx" and manifest.editable.name == "editable.docx"
    assert os.listdir(out.parent) == ["pkg.tar"]  # no temporary file left

    # A plain POSIX ustar tar, members in order, that GNU tar reads.
    listing = subprocess.run(["tar", "-tf", str(out)], capture_output=True, text=True,
                             check=True).stdout.split()
    assert listing == ["manifest.json", "manifest.cms", "document.pdf", "editable.docx"]
    with tarfile.open(out) as tar:
        assert all(t.isreg() for t in tar.getmembers())
    assert out.read_bytes()[257:265] == b"ustar\x0000"
    x = tmp_path / "x"
    x.mkdir()
    subprocess.run(["tar", "-xf", str(out), "-C", str(x)], check=True)
    doc = json.loads((x / "manifest.json").read_bytes())
    assert doc["format"] == "exchanged-package-1"
    assert doc["files"][1] == {"role": "editable", "kind": "docx", "name": "editable.docx",
                               "size": files.docx.stat().st_size,
                               "sha256": manifest.editable.sha256}
    assert (x / "manifest.json").read_bytes() == canonical(doc)
    openssl_verify(tmp_path, x / "manifest.json", x / "manifest.cms", pki.ca)

    got = package.read(out, tmp_path / "in", issuer=pki.ca, expected_sender="finance",
                       expected_recipient="justice")
    assert got.metadata == m and got.manifest == manifest
    assert got.signer == pki.cert
    assert got.pdf.read_bytes() == files.pdf.read_bytes()
    assert got.editable == tmp_path / "in" / "editable.docx"
    assert got.editable.read_bytes() == files.docx.read_bytes()
    assert sorted(os.listdir(tmp_path / "in")) == ["document.pdf", "editable.docx",
                                                   "manifest.cms", "manifest.json"]
    openssl_verify(tmp_path, got.manifest_path, got.signature_path, pki.ca)


def test_read_from_a_file_object_and_from_chunks(pki: Pki, files: Files, tmp_path: Path) -> None:
    out = tmp_path / "pkg.tar"
    manifest = build(pki, files, out)
    with open(out, "rb") as f:
        assert package.read(f, tmp_path / "a", issuer=pki.ca).manifest == manifest
    raw = out.read_bytes()
    for size in (1, 511, 513, 70000, len(raw)):
        chunks = (raw[i:i + size] for i in range(0, len(raw), size))
        assert package.read(chunks, tmp_path / f"c{size}", issuer=pki.ca).manifest == manifest


def test_a_package_streamed_into_a_sink_is_the_same_package(pki: Pki, files: Files,
                                                            tmp_path: Path) -> None:
    """What the sending node does: build straight into its blob writer, no file between."""
    sink, m = io.BytesIO(), meta()
    manifest = package.build(m, files.pdf, files.docx, key=pki.key, cert=pki.cert, sink=sink)
    on_disk = build(pki, files, tmp_path / "p", m)
    assert manifest == on_disk
    got = package.read(io.BytesIO(sink.getvalue()), tmp_path / "in", issuer=pki.ca)
    assert got.manifest == manifest
    # ... and what a receiving node runs on it, stored: the same, nothing copied out.
    (tmp_path / "stored").write_bytes(sink.getvalue())
    before = sorted(tmp_path.iterdir())
    checked = package.check(tmp_path / "stored", issuer=pki.ca, expected_sender="finance")
    assert checked.manifest == manifest and checked.signer == got.signer
    assert sorted(tmp_path.iterdir()) == before
    for both_or_neither in ({"out_path": tmp_path / "q", "sink": io.BytesIO()}, {}):
        with pytest.raises(TypeError, match="one of them"):
            package.build(meta(), files.pdf, files.docx, key=pki.key, cert=pki.cert,
                          **both_or_neither)  # type: ignore[arg-type]


def test_metadata_survives_every_field(pki: Pki, tmp_path: Path) -> None:
    pdf = write(tmp_path / "a.pdf", minimal_pdf())
    txt = write(tmp_path / "a.txt", "正文\n".encode("gb18030"))
    m = meta(urgency="extra-urgent", classification="public", deadline="2012-01-20T17:30:00+08:00",
             paper_original=False, number="")
    package.build(m, pdf, txt, key=pki.key, cert=pki.cert, out_path=tmp_path / "p")
    got = package.read(tmp_path / "p", tmp_path / "in", issuer=pki.ca)
    assert got.metadata == m and got.manifest.editable.kind == "txt"


def test_wps_label_comes_from_the_name_but_acceptance_from_content(pki: Pki,
                                                                  tmp_path: Path) -> None:
    pdf = write(tmp_path / "a.pdf", minimal_pdf())
    wps = write(tmp_path / "公文.wps", ole2_bytes(["WordDocument", "1Table"]))
    manifest = package.build(meta(), pdf, wps, key=pki.key, cert=pki.cert,
                             out_path=tmp_path / "p")
    assert manifest.editable.kind == "wps" and manifest.editable.name == "editable.wps"
    assert package.read(tmp_path / "p", tmp_path / "in", issuer=pki.ca).editable.name == \
        "editable.wps"
    fake = write(tmp_path / "fake.wps", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x01" * 600)
    refused("bad-form", lambda: package.build(meta(), pdf, fake, key=pki.key, cert=pki.cert,
                                              out_path=tmp_path / "q"))


# -- sniffers ----------------------------------------------------------------------------------


def test_sniff_pdf_by_content(tmp_path: Path) -> None:
    assert sniff_pdf(write(tmp_path / "scan.doc", minimal_pdf()))  # the name does not matter
    assert sniff_pdf(write(tmp_path / "p2", minimal_pdf().replace(b"%PDF-1.4", b"%PDF-2.0")))
    assert sniff_pdf(write(tmp_path / "junk-first", b"\0" * 100 + minimal_pdf()))
    assert sniff_pdf(write(tmp_path / "trailing", minimal_pdf() + b"\n" * 1000))
    assert not sniff_pdf(write(tmp_path / "text.pdf", "这不是PDF\n".encode()))
    assert not sniff_pdf(write(tmp_path / "late.pdf", b" " * 1024 + minimal_pdf()))
    assert not sniff_pdf(write(tmp_path / "cut.pdf", minimal_pdf()[:-30]))
    assert not sniff_pdf(write(tmp_path / "eof-early.pdf", minimal_pdf() + b"x" * 3000))
    assert not sniff_pdf(write(tmp_path / "empty.pdf", b""))
    assert not sniff_pdf(write(tmp_path / "docx.pdf", docx_bytes()))
    assert not sniff_pdf(write(tmp_path / "pdf3", minimal_pdf().replace(b"%PDF-1.4", b"%PDF-3.0")))


@pytest.mark.parametrize(("name", "data", "kind"), [
    ("a.txt", "关于春节值班的通知\n一、值班安排\n".encode(), "txt"),
    ("a.txt", "\ufeffUTF-8 with a BOM\r\n\tand tabs\x0c\x1a".encode(), "txt"),
    ("gb.txt", "关于春节值班的通知\n一、值班安排\n".encode("gb18030"), "txt"),
    ("a.rtf", b"{\\rtf1\\ansi\\deff0 {\\fonttbl {\\f0 Times;}} Hello}", "rtf"),
    ("a.doc", ole2_bytes(["WordDocument", "1Table", "\x05SummaryInformation"]), "doc"),
    ("big-sectors.doc", ole2_bytes(["WordDocument"], shift=12), "doc"),
    ("a.docx", docx_bytes(), "docx"),
    ("a.ofd", ofd_bytes(), "ofd"),
    # Renamed files are judged by their content.
    ("notes.txt", docx_bytes(), "docx"),
    ("scan.pdf", ofd_bytes(), "ofd"),
    ("x.docx", "纯文本\n".encode(), "txt"),
    ("x.wps", b"{\\rtf1 hi}", "rtf"),
])
def test_sniff_editable_by_content(tmp_path: Path, name: str, data: bytes, kind: str) -> None:
    assert sniff_editable(write(tmp_path / name, data)) == kind
    assert in_window(data) == kind


def in_window(data: bytes) -> str | None:
    """The kind judged as `package.check` judges it: the bytes where they lie inside a bigger
    file (a stored package), through a window on it."""
    f = io.BytesIO(b"\x01" * 700 + data + b"%%EOF trailing bytes\n" * 50)
    return package._editable_kind(package._Window(f, 700, len(data)), len(data))  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "data"), [
    ("empty.txt", b""),
    ("junk.txt", bytes(range(256)) * 8),
    ("invalid.txt", b"\xff\xfe\xfd\x80" * 100),  # no NUL, but neither UTF-8 nor GB18030
    ("ctrl.txt", b"text with an escape \x1b[31m inside\n"),
    ("utf16.txt", "UTF-16 text".encode("utf-16")),
    ("zip.docx", zip_bytes(["a.txt", "b.xml"])),
    ("half.docx", zip_bytes(["word/document.xml"])),
    ("nested.ofd", zip_bytes(["sub/OFD.xml"])),
    ("broken.docx", docx_bytes()[:100]),
    ("sheet.doc", ole2_bytes(["Workbook"])),
    ("header-only.doc", ole2_bytes([])[:512]),
    ("scan.txt", minimal_pdf()),  # the PDF may not stand in for the editable file
    ("png.doc", b"\x89PNG\r\n\x1a\n" + b"\0" * 100),
])
def test_sniff_editable_refuses(tmp_path: Path, name: str, data: bytes) -> None:
    assert sniff_editable(write(tmp_path / name, data)) is None
    assert in_window(data) is None


def test_sniffers_refuse_what_is_not_a_regular_file(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for fn in (sniff_pdf, sniff_editable):
        for path, match in ((tmp_path, ""), (fifo, "not a regular file"),
                            (tmp_path / "missing", "cannot read"),
                            (Path("/dev/zero"), "not a regular file")):
            refused("unreadable", lambda: fn(path), match)  # noqa: B023


def test_zip_with_a_huge_central_directory_is_not_read(tmp_path: Path) -> None:
    """An end record claiming a 50 MB central directory: zipfile would read it all at once."""
    path = tmp_path / "bomb.docx"
    cd_size = 50 * 1024**2
    with open(path, "wb") as f:
        f.write(b"PK\x03\x04" + b"\0" * 26)
        f.truncate(cd_size + 4096)
        f.seek(0, 2)
        f.write(b"PK\x05\x06" + b"\0" * 4 + (60000).to_bytes(2, "little") * 2
                + cd_size.to_bytes(4, "little") + (4096).to_bytes(4, "little") + b"\0\0")
    tracemalloc.start()
    try:
        assert sniff_editable(path) is None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024**2


# -- refusals at build -------------------------------------------------------------------------


def test_build_refuses_a_pdf_that_is_not_one(pki: Pki, files: Files, tmp_path: Path) -> None:
    files.pdf = write(tmp_path / "scan.pdf", "扫描件\n".encode())
    e = refused("not-pdf", lambda: build(pki, files, tmp_path / "p"), "is not a PDF")
    assert "starts with" in str(e) and "%PDF-" in str(e)
    files.pdf = write(tmp_path / "scan2.pdf", docx_bytes())
    refused("not-pdf", lambda: build(pki, files, tmp_path / "p"), "is a ZIP file")
    assert not (tmp_path / "p").exists()


def test_build_refuses_an_editable_of_no_allowed_kind(pki: Pki, files: Files,
                                                     tmp_path: Path) -> None:
    files.docx = write(tmp_path / "draft.docx", b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    refused("bad-form", lambda: build(pki, files, tmp_path / "p"),
            "is not txt, doc, docx, wps, ofd or rtf")
    files.docx = files.pdf  # the scan twice is not scan + editable
    refused("bad-form", lambda: build(pki, files, tmp_path / "p"), "is not txt, doc")
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("level", ["secret", "confidential", "top-secret"])
def test_classified_never_leaves_the_unit(pki: Pki, files: Files, tmp_path: Path,
                                          level: str) -> None:
    e = refused("classified", lambda: build(pki, files, tmp_path / "p",
                                            meta(classification=level)), "A38")
    assert "justice" in str(e)
    assert not (tmp_path / "p").exists()
    m = meta(classification=level, recipient="finance")
    build(pki, files, tmp_path / "p", m)  # inside the unit it may travel
    got = package.read(tmp_path / "p", tmp_path / "in", issuer=pki.ca, expected_sender="finance")
    assert got.metadata == m and got.metadata.classified


def test_build_refuses_a_certificate_for_another_key(pki: Pki, files: Files,
                                                     tmp_path: Path) -> None:
    ca_key, ca = make_ca("Other")
    other = node_cert(ca_key, ca, ec.generate_private_key(ec.SECP256R1()).public_key(), "finance")
    refused("key-mismatch", lambda: package.build(meta(), files.pdf, files.docx, key=pki.key,
                                                  cert=other, out_path=tmp_path / "p"))


def test_build_refuses_too_large_files(pki: Pki, files: Files, tmp_path: Path) -> None:
    refused("too-large", lambda: build(pki, files, tmp_path / "p", max_file_size=100),
            "too large")


@pytest.mark.parametrize("change", ["altered", "shrunk"])
def test_build_notices_a_file_changed_while_packaging(pki: Pki, files: Files, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      change: str) -> None:
    real = package._digest
    pdf_size = files.pdf.stat().st_size
    assert pdf_size != files.docx.stat().st_size

    def digest_then_change(f: Any, size: int) -> str:
        result = real(f, size)
        if size == pdf_size:  # the PDF: change it behind build's back
            with open(files.pdf, "r+b") as g:
                if change == "altered":
                    g.seek(20)
                    g.write(b"X")
                else:
                    g.truncate(size - 10)
        return result

    monkeypatch.setattr(package, "_digest", digest_then_change)
    refused("file-changed", lambda: build(pki, files, tmp_path / "p"),
            "changed while" if change == "altered" else "shrank")
    assert not (tmp_path / "p").exists()
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []


# -- refusals at read --------------------------------------------------------------------------


@pytest.fixture
def pkg(pki: Pki, files: Files, tmp_path: Path) -> Path:
    build(pki, files, tmp_path / "pkg.tar")
    return tmp_path / "pkg.tar"


def read_refused(pki: Pki, source: Any, dest: Path, code: str, match: str = "",
                 **kw: Any) -> PackageError:
    """Refused by `read` (nothing left behind) and, for what can be stored, by `check` (what
    a receiving node runs on a stored package) with the same reason."""
    e = refused(code, lambda: package.read(source, dest, issuer=pki.ca, **kw), match)
    assert not dest.exists() or os.listdir(dest) == []  # nothing left behind
    if isinstance(source, bytes | Path):
        stored = source if isinstance(source, Path) else dest.parent / f"{dest.name}.stored"
        if isinstance(source, bytes):
            stored.write_bytes(source)
        e2 = refused(code, lambda: package.check(stored, issuer=pki.ca, **kw), match)
        assert str(e2) == str(e)
    return e


def test_tampered_document_bytes(pki: Pki, pkg: Path, tmp_path: Path) -> None:
    with tarfile.open(pkg) as tar:
        pdf = tar.getmember("document.pdf")
    raw = bytearray(pkg.read_bytes())
    raw[pdf.offset_data + pdf.size // 2] ^= 0x01
    read_refused(pki, bytes(raw), tmp_path / "in", "digest-mismatch", "altered")


def test_tampered_document_size(pki: Pki, pkg: Path, tmp_path: Path) -> None:
    items = members(pkg)
    items[2] = ("document.pdf", items[2][1] + b"%%EOF\n")
    read_refused(pki, write_tar(tmp_path / "t.tar", items), tmp_path / "in", "digest-mismatch",
                 "signed manifest says")


def test_tampered_manifest(pki: Pki, pkg: Path, tmp_path: Path) -> None:
    items = members(pkg)
    items[0] = ("manifest.json", items[0][1].replace(b'"urgent"', b'"normal"'))
    read_refused(pki, write_tar(tmp_path / "t.tar", items), tmp_path / "in", "bad-signature",
                 "altered")
    items = members(pkg)
    items[1] = ("manifest.cms", items[1][1][:-10])
    read_refused(pki, write_tar(tmp_path / "t2.tar", items), tmp_path / "in", "bad-signature")


def test_signer_not_certified_by_the_ca(pki: Pki, files: Files, tmp_path: Path) -> None:
    package.build(meta(), files.pdf, files.docx, key=pki.key, cert=pki.rogue_cert,
                  out_path=tmp_path / "rogue.tar")
    read_refused(pki, tmp_path / "rogue.tar", tmp_path / "in", "bad-signature",
                 "was not certified by")


@pytest.mark.parametrize("attack", ["extra", "traversal", "absolute", "symlink", "hardlink",
                                    "device", "directory", "pax", "gnu", "renamed", "reordered",
                                    "missing", "trailing-data", "not-tar"])
def test_malformed_packages(pki: Pki, pkg: Path, tmp_path: Path, attack: str) -> None:
    items = members(pkg)
    t = tmp_path / "t.tar"
    expect = ""
    if attack == "extra":
        write_tar(t, [*items, ("evil.sh", b"rm -rf /\n")])
        expect = "more than its four members"
    elif attack == "traversal":
        write_tar(t, [("../../manifest.json", items[0][1]), *items[1:]])
        expect = "outside the package"
    elif attack == "absolute":
        write_tar(t, [("/etc/manifest.json", items[0][1]), *items[1:]])
        expect = "outside the package"
    elif attack in ("symlink", "hardlink", "device", "directory"):
        typ = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
               "device": tarfile.CHRTYPE, "directory": tarfile.DIRTYPE}[attack]

        def tweak(info: tarfile.TarInfo) -> None:
            if info.name == "document.pdf":
                info.type, info.linkname, info.size = typ, "/etc/passwd", 0
        write_tar(t, items, tweak=tweak)
        expect = {"symlink": "symbolic link", "hardlink": "hard link", "device": "a device",
                  "directory": "a directory"}[attack]
    elif attack == "pax":
        write_tar(t, [(items[0][0], items[0][1])], fmt=tarfile.PAX_FORMAT,
                  tweak=lambda i: i.pax_headers.update({"comment": "x" * 100}))
        expect = "pax header"
    elif attack == "gnu":
        write_tar(t, [("a" * 120, b"x"), *items], fmt=tarfile.GNU_FORMAT)
        expect = "GNU header"
    elif attack == "renamed":
        write_tar(t, [items[0], items[1], ("scan.pdf", items[2][1]), items[3]])
        expect = "expected document.pdf"
    elif attack == "reordered":
        write_tar(t, [items[1], items[0], *items[2:]])
        expect = "expected manifest.json"
    elif attack == "missing":
        write_tar(t, items[:3])
        expect = "ends after 3 members"
    elif attack == "trailing-data":
        write(t, pkg.read_bytes() + b"more")
        expect = "after the end"
    elif attack == "not-tar":
        write(t, minimal_pdf(b"% padding\n" * 100))
        expect = "malformed tar header"
    read_refused(pki, t, tmp_path / "in", "bad-package", expect)


def test_truncated_packages(pki: Pki, pkg: Path, tmp_path: Path) -> None:
    raw = pkg.read_bytes()
    with tarfile.open(pkg) as tar:
        pdf = tar.getmember("document.pdf")
        ed = tar.getmember("editable.docx")
    end = ed.offset_data + ed.size + (-ed.size % 512)
    for cut in (0, 100, 512 + 10, pdf.offset_data + 7, ed.offset_data, end, end + 512):
        read_refused(pki, raw[:cut], tmp_path / "in", "bad-package", "truncated" if cut else "")


def test_oversized_files(pki: Pki, pkg: Path, tmp_path: Path) -> None:
    read_refused(pki, pkg, tmp_path / "in", "too-large", "too large", max_file_size=100)
    items = members(pkg)
    big = b"x" * (64 * 1024 + 1)
    read_refused(pki, write_tar(tmp_path / "t.tar", [("manifest.json", big), *items[1:]]),
                 tmp_path / "in", "too-large", "manifest.json is too large")


def test_wrong_sender_and_recipient(pki: Pki, files: Files, pkg: Path, tmp_path: Path) -> None:
    read_refused(pki, pkg, tmp_path / "in", "wrong-sender", "came from justice",
                 expected_sender="justice")
    read_refused(pki, pkg, tmp_path / "in", "wrong-recipient", "not for finance",
                 expected_recipient="finance")
    # A finance node signs a document claiming to come from justice.
    build(pki, files, tmp_path / "claim.tar", meta(sender="justice", recipient="police"))
    read_refused(pki, tmp_path / "claim.tar", tmp_path / "in", "wrong-sender",
                 "a node of another unit", expected_sender="justice")
    assert package.signer_unit(pki.cert) == "finance"


def test_read_rechecks_the_form_and_a38(pki: Pki, tmp_path: Path) -> None:
    """Signed packages that `build` would never write: the receiver refuses them itself."""
    pdf, txt = minimal_pdf(), "正文\n".encode()
    forge(pki, tmp_path / "a.tar", meta(), b"not a pdf at all\n", txt, "txt")
    read_refused(pki, tmp_path / "a.tar", tmp_path / "in", "not-pdf", "is not a PDF")
    forge(pki, tmp_path / "b.tar", meta(), pdf, b"\x89PNG\r\n\x1a\n\0\0", "txt")
    read_refused(pki, tmp_path / "b.tar", tmp_path / "in", "bad-form", "none of them")
    forge(pki, tmp_path / "c.tar", meta(), pdf, txt, "docx")
    read_refused(pki, tmp_path / "c.tar", tmp_path / "in", "bad-form", "its content is txt")
    forge(pki, tmp_path / "d.tar", meta(classification="secret"), pdf, txt, "txt")
    read_refused(pki, tmp_path / "d.tar", tmp_path / "in", "classified", "A38")
    forge(pki, tmp_path / "e.tar", meta(), pdf, pdf, "txt")
    read_refused(pki, tmp_path / "e.tar", tmp_path / "in", "bad-form")
    forge(pki, tmp_path / "ok.tar", meta(), pdf, ole2_bytes(["WordDocument"]), "wps")
    assert package.read(tmp_path / "ok.tar", tmp_path / "ok", issuer=pki.ca).editable.name == \
        "editable.wps"


def test_read_refuses_a_signed_but_malformed_manifest(pki: Pki, pkg: Path,
                                                      tmp_path: Path) -> None:
    items = members(pkg)
    doc = json.loads(items[0][1])
    cases: list[tuple[bytes, str, str]] = [
        (json.dumps(doc, indent=1).encode(), "bad-package", "canonical"),
        (canonical({**doc, "format": "exchanged-package-2"}), "bad-package", "unknown package"),
        (canonical({**doc, "extra": 1}), "bad-package", "exactly format"),
        (canonical({**doc, "files": doc["files"][:1]}), "bad-package", "two files"),
        (canonical({**doc, "metadata": {**doc["metadata"], "sender": "Finance!"}}), "bad-form",
         "unit id"),
        (canonical({**doc, "files": [{**doc["files"][0], "name": "../x"}, doc["files"][1]]}),
         "bad-package", "must be named"),
        (canonical({**doc, "files": [doc["files"][0], {**doc["files"][1], "kind": "exe"}]}),
         "bad-package", "unknown editable kind"),
        (canonical({**doc, "files": [{**doc["files"][0], "size": -1}, doc["files"][1]]}),
         "bad-package", "bad size"),
        (b"[1,2", "bad-package", "not JSON"),
        (b'{"format":1,"format":2}', "bad-package", "not JSON"),
    ]
    for i, (data, code, match) in enumerate(cases):
        t = write_tar(tmp_path / f"m{i}.tar", [("manifest.json", data),
                                               ("manifest.cms", sign(pki, data)), *items[2:]])
        read_refused(pki, t, tmp_path / "in", code, match)


# -- memory does not grow with the file ----------------------------------------------------------


@pytest.mark.slow
def test_a_200_mb_scan_streams_in_bounded_memory(pki: Pki, tmp_path: Path) -> None:
    size = 200 * 1024**2
    pdf = tmp_path / "big.pdf"
    head = minimal_pdf()
    with open(pdf, "wb") as f:
        f.write(head[:100])
        f.truncate(size - (len(head) - 100))  # a zero-filled middle, sparse on disk
        f.seek(0, 2)
        f.write(head[100:])
    assert pdf.stat().st_size == size and sniff_pdf(pdf)
    txt = write(tmp_path / "a.txt", "正文\n".encode())
    start = time.monotonic()
    tracemalloc.start()
    try:
        manifest = package.build(meta(), pdf, txt, key=pki.key, cert=pki.cert,
                                 out_path=tmp_path / "big.tar")
        build_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        got = package.read(tmp_path / "big.tar", tmp_path / "in", issuer=pki.ca)
        read_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    elapsed = time.monotonic() - start
    assert got.manifest == manifest and got.pdf.stat().st_size == size
    assert build_peak < 4 * 1024**2, build_peak
    assert read_peak < 4 * 1024**2, read_peak
    assert elapsed < 30, elapsed
    print(f"200 MB: build+read {elapsed:.1f} s, peak {build_peak // 1024} KiB (build), "
          f"{read_peak // 1024} KiB (read)")


# -- metadata ------------------------------------------------------------------------------------


def test_metadata_validation_and_normalisation() -> None:
    m = meta(doc_id="5F0C6F4E-0D7A-4C8E-9A51-7F5B1C1D2E3F", created="2012-01-10T17:00:00.5+08:00",
             deadline="2012-01-20T17:00+08:00")
    assert m.doc_id == "5f0c6f4e-0d7a-4c8e-9a51-7f5b1c1d2e3f"
    assert m.created == "2012-01-10T09:00:00Z"
    assert m.deadline == "2012-01-20T17:00:00+08:00"
    assert Metadata.from_dict(m.to_dict()) == m
    assert not m.classified and meta(classification="top-secret").classified
    fresh = meta()
    assert fresh.doc_id != meta().doc_id and fresh.created.endswith("Z")
    d = {k: v for k, v in fresh.to_dict().items() if k not in ("number", "deadline",
                                                               "paper_original")}
    assert Metadata.from_dict(d) == replace(fresh, number="", deadline=None, paper_original=False)
    bad: list[tuple[dict[str, Any], str]] = [
        ({"doc_id": "not-a-uuid"}, "doc_id"),
        ({"doc_id": "{5f0c6f4e-0d7a-4c8e-9a51-7f5b1c1d2e3f}"}, "doc_id"),
        ({"sender": "Finance"}, "sender"),
        ({"recipient": "a" * 65}, "recipient"),
        ({"title": " "}, "title must not be empty"),
        ({"title": "x" * 501}, "too long"),
        ({"title": "two\nlines"}, "control character"),
        ({"title": "\ud800"}, "surrogate"),
        ({"urgency": "asap"}, "urgency must be one of"),
        ({"classification": "restricted"}, "classification"),
        ({"deadline": "tomorrow"}, "deadline"),
        ({"deadline": "2012-01-20T17:00"}, "UTC offset"),
        ({"deadline": 20120120}, "deadline"),
        ({"paper_original": 1}, "paper_original"),
        ({"created": "2012-01-10T09:00:00"}, "created"),
    ]
    for change, match in bad:
        with pytest.raises(PackageError, match=match) as e:
            meta(**change)
        assert e.value.code == "bad-form"
    for data, match in [([], "JSON object"), ({**d, "colour": "red"}, "unknown"),
                        ({"sender": "finance"}, "lacks")]:
        with pytest.raises(PackageError, match=match):
            Metadata.from_dict(data)


_VALID = meta(doc_id="5f0c6f4e-0d7a-4c8e-9a51-7f5b1c1d2e3f",
              created="2012-01-10T09:00:00Z").to_dict()
_values = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20),
    st.sampled_from(["finance", "2012-01-20", "2012-01-20T17:00:00+08:00", "urgent", "secret",
                     "5f0c6f4e-0d7a-4c8e-9a51-7f5b1c1d2e3f", "2012-01-10T09:00:00Z",
                     "9999-12-31T23:59:59-12:00", "0001-01-01T00:00:00+14:00", "", "a" * 501]),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(),
                                                        max_size=2))
_keys = st.one_of(st.sampled_from(Metadata.FIELDS), st.text(max_size=8))


@settings(max_examples=400, deadline=None, database=None)
@given(st.one_of(
    st.dictionaries(_keys, _values, max_size=12),
    st.dictionaries(st.sampled_from(Metadata.FIELDS), _values).map(lambda d: {**_VALID, **d}),
    _values))
def test_from_dict_builds_valid_metadata_or_says_bad_form(data: Any) -> None:
    try:
        m = Metadata.from_dict(data)
    except ExchangedError as e:
        assert e.code == "bad-form", (e.code, str(e))
        return
    assert Metadata.from_dict(m.to_dict()) == m  # normalised values are stable
    canonical(m.to_dict())  # and always encodable
