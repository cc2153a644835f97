"""Archives (A24): finished documents, each with its evidence, in a directory that can be
checked offline — by `exchanged audit verify DIR`, and every signature in it by `openssl`
alone.

An archive is a directory:

    archive.json        what is in it: the unit, when, by whom, the filter, and for each document
                        its files with their SHA-256; signed by the node (archive.cms)
    archive.cms         detached CMS over archive.json, made on the node token
    ca.pem, node.pem    the CA certificate and the node's certificate
    crls/               the CRLs in force at export
    documents/in-ID/, documents/out-ID/   per document received (in) or sent (out; a forwarded
                        document is both): package.tar (as sent), its files unpacked (manifest.json,
                        manifest.cms, document.pdf, editable.*), metadata.json (with what
                        happened to it here), and every signature about it, each an attached
                        CMS: delivery.cms, signed-for.cms, copy-N.cms (the divisions'),
                        return.cms, custody-N.cms (forwards), receipt-N.cms (what came back
                        for a document we sent), relay-N.cms (the hop records of the relays a
                        document came through, or the relay's that took ours, A12)
    evidence/           an evidence bundle (store/evidence.py) of the documents' audit entries
                        up to a signed checkpoint
    VERIFY.txt          the openssl commands

A document is finished when nothing is left to do with it here: incoming, signed for (in a
division's box), registered with every copy signed for, forwarded or returned; outgoing,
signed for or returned.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from exchanged import package as pkg
from exchanged.common import stamp
from exchanged.errors import ExchangedError
from exchanged.pki.cms import CmsError, cms_content, verify_detached
from exchanged.pki.operator import Operator
from exchanged.store import audit, evidence
from exchanged.store.audit import Finding
from exchanged.store.boxdb import BoxStore
from exchanged.store.nodedb import NodeStore

FORMAT = "exchanged-archive-1"
VERIFY_TXT = """How to check this archive with openssl alone (from this directory):

The archive's own list of files and digests, signed by the node that wrote it:
  openssl cms -verify -binary -inform DER -in archive.cms -content archive.json \\
      -CAfile ca.pem -purpose any -out /dev/null

A document's package, signed by the sending node (D: a directory under documents/):
  openssl cms -verify -binary -inform DER -in documents/D/manifest.cms \\
      -content documents/D/manifest.json -CAfile ca.pem -purpose any -out /dev/null

Every receipt, notice and custody record (each carries what was signed):
  openssl cms -verify -inform DER -in documents/D/NAME.cms -CAfile ca.pem -purpose any

The files' digests (sha256sum), the manifests' and the audit chain are checked together by
`exchanged audit verify .`; the audit entries alone as in evidence/VERIFY.txt.
"""


class ArchiveError(ExchangedError):
    code = "archive"


def finished(store: NodeStore, rows: BoxStore, *, since: float | None = None,
             until: float | None = None, division: str | None = None) -> list[dict[str, Any]]:
    """The finished documents, incoming and outgoing, oldest first; `division` keeps those
    in that division's box or given to it."""
    out = []
    for r in store.inbox():
        copies = rows.copies(r)
        done = (r["state"] in ("registered", "distributed", "forwarded", "returned")
                or (r["state"] == "signed-for" and r["box"])) and \
            all(c["state"] == "signed-for" for c in copies)
        if division and r["box"] != division and division not in {c["division"]
                                                                   for c in copies}:
            continue
        if done and _within(r["received_at"], since, until):
            out.append({**r, "direction": "incoming", "copies": copies})
    if not division:
        for r in store.outbox():
            if r["state"] in ("signed-for", "returned") and \
                    _within(r["created_at"], since, until):
                out.append({**r, "direction": "outgoing"})
    return out


def _within(t: float, since: float | None, until: float | None) -> bool:
    return (since is None or t >= since) and (until is None or t <= until)


def export(out: Path, docs: list[dict[str, Any]], *, unit: str, store: NodeStore,
           rows: BoxStore, node: Operator, ca: x509.Certificate, crls: list[Path],
           query: dict[str, Any], by: str, max_file_size: int) -> dict[str, Any]:
    """Write the archive of `docs` into the new directory `out` (see the module's doc)."""
    if not docs:
        raise ArchiveError("no finished document matches: nothing to archive", code="empty")
    if out.exists():
        raise ArchiveError(f"{out} exists; choose a new directory", code="exists")
    (out / "documents").mkdir(parents=True)
    (out / "crls").mkdir()
    pem = serialization.Encoding.PEM
    (out / "ca.pem").write_bytes(ca.public_bytes(pem))
    (out / "node.pem").write_bytes(node.cert.public_bytes(pem))
    for crl in crls:
        if crl.exists():
            shutil.copyfile(crl, out / "crls" / crl.name)
    listed = []
    for d in docs:
        listed.append(_document(out, d, store=store, rows=rows, ca=ca,
                                max_file_size=max_file_size))
    matter = list(store.audit.rows(f"WHERE object IN ({', '.join('?' * len(docs))})",
                                   [d["doc_id"] for d in docs]))
    every = audit.signers(store.audit.rows("WHERE action = ?", [audit.NODE_CERTIFICATE]),
                          node.cert, ca)
    evidence.export(store.audit, matter, out / "evidence", signer=every, certs={},
                    crls=[out / "crls" / p.name for p in (out / "crls").iterdir()],
                    query=query, issuer=ca)
    manifest = {"format": FORMAT, "unit": unit, "exported_at": stamp(), "by": by,
                "query": query, "documents": listed}
    data, cms = node.sign(manifest, detached=True)
    (out / "archive.json").write_bytes(data)
    (out / "archive.cms").write_bytes(cms)
    (out / "VERIFY.txt").write_text(VERIFY_TXT)
    return manifest


def _document(out: Path, d: dict[str, Any], *, store: NodeStore, rows: BoxStore,
              ca: x509.Certificate, max_file_size: int) -> dict[str, Any]:
    doc = d["doc_id"]
    folder = f"{'in' if d['direction'] == 'incoming' else 'out'}-{doc}"
    where = out / "documents" / folder
    where.mkdir()
    blob = store.blob_path(d["package_sha256"])
    store.check_blob(d["package_sha256"])
    shutil.copyfile(blob, where / "package.tar")
    work = Path(tempfile.mkdtemp(dir=out, prefix=".unpack-"))
    try:
        pkg.read(blob, work, issuer=ca, max_file_size=max_file_size)
        for f in work.iterdir():
            shutil.move(str(f), where / f.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    signatures: dict[str, bytes] = {}
    if d.get("delivery_receipt"):
        signatures["delivery.cms"] = d["delivery_receipt"]
    if d["direction"] == "incoming":
        if d.get("signed_for_receipt"):
            signatures["signed-for.cms"] = d["signed_for_receipt"]
        for n, c in enumerate(d["copies"], 1):
            signatures[f"copy-{n}.cms"] = c["receipt"]
        for n, c in enumerate(d.get("custody") or [], 1):
            signatures[f"custody-{n}.cms"] = base64.b64decode(c)
        for n, h in enumerate(d.get("relay_path") or [], 1):  # the relays it came through
            signatures[f"relay-{n}.cms"] = base64.b64decode(h)
        for r in store.receipts_for(doc, with_receipts=True):
            if r["kind"] == "return":
                signatures["return.cms"] = r["receipt"]
    else:
        for n, r in enumerate(rows.receipts(doc), 1):
            signatures[f"receipt-{n}.cms"] = r["receipt"]
        if d.get("relay_receipt"):  # the relay's hop record: it took the document from us
            signatures["relay-1.cms"] = d["relay_receipt"]
    for name, cms in signatures.items():
        (where / name).write_bytes(cms)
    kept = {k: v for k, v in d.items() if not isinstance(v, bytes | bytearray)
            and k not in ("copies", "custody", "relay_path")}
    kept["copies"] = [{k: v for k, v in c.items() if k != "receipt"} for c in d.get("copies", ())]
    (where / "metadata.json").write_text(json.dumps(kept, indent=2, ensure_ascii=False,
                                                    default=str) + "\n")
    files = {p.name: _sha256(p) for p in sorted(where.iterdir())}
    return {"doc_id": doc, "dir": folder, "direction": d["direction"], "state": d["state"],
            "package_sha256": d["package_sha256"], "files": files,
            "signatures": sorted(signatures)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def verify(where: Path, trusted: x509.Certificate | None = None) -> list[Finding]:
    """Check an archive offline: its signed list, every file's digest, every package's
    signature and every receipt's, notice's and custody record's, and its evidence bundle.
    `trusted` is the auditor's own copy of the CA certificate."""
    try:
        data = (where / "archive.json").read_bytes()
        manifest = json.loads(data)
        ca = trusted or x509.load_pem_x509_certificate((where / "ca.pem").read_bytes())
    except (OSError, ValueError) as e:
        raise ArchiveError(f"{where} is not a readable archive: {e}") from None
    if manifest.get("format") != FORMAT:
        raise ArchiveError(f"{where}: unknown archive format {manifest.get('format')!r}")
    findings: list[Finding] = []
    try:
        verify_detached((where / "archive.cms").read_bytes(), data, ca)
    except (OSError, CmsError) as e:
        findings.append(Finding(None, f"archive.json's signature: {e}", "the archive"))
    for d in manifest.get("documents", []):
        base = where / "documents" / d["dir"]
        present = {p.name for p in base.iterdir()} if base.is_dir() else set()
        for name, digest in d["files"].items():
            if name not in present or _sha256(base / name) != digest:
                findings.append(Finding(None, f"{name} is missing or changed", d["dir"]))
        if d["files"].get("package.tar") != d["package_sha256"]:
            findings.append(Finding(None, "package.tar is not the document's package",
                                    d["dir"]))
        try:
            verify_detached((base / "manifest.cms").read_bytes(),
                            (base / "manifest.json").read_bytes(), ca)
        except (OSError, CmsError) as e:
            findings.append(Finding(None, f"the package's signature: {e}", d["dir"]))
        for name in d["signatures"]:
            try:
                cms = (base / name).read_bytes()
                verify_detached(cms, cms_content(cms), ca)
            except (OSError, CmsError) as e:
                findings.append(Finding(None, f"{name}: {e}", d["dir"]))
    findings += evidence.verify(where / "evidence", None).findings
    return findings


__all__ = ["ArchiveError", "export", "finished", "verify"]

