"""Evidence bundles: the audit entries of one matter, with what is needed to check them offline.

A bundle is a directory:

    manifest.json        what was asked for, which entries are the matter's, where the run starts
    entries.jsonl        every entry from the matter's first to the first checkpoint after its
                         last, in full: the checkpoint's signature covers them all by hash links
    signer.pem           the certificate whose key signs checkpoints (the CA's, or a node's;
                         a node whose certificate was renewed: the current one first, then
                         the earlier ones that signed checkpoints of this run)
    issuer.pem           the CA certificate that issued the operators' certificates
    certs/SERIAL.pem     the certificates of the operators who signed the matter's entries
    crls/                the CRLs in force when the bundle was made
    openssl/             each signature as files openssl checks by itself (see VERIFY.txt)

`exchanged audit verify BUNDLE` checks the hashes, links and checkpoint signatures, and every
operator signature against the signer's CA certificate.
"""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from exchanged.errors import ExchangedError
from exchanged.pki.cms import CmsError, verify_detached
from exchanged.store.audit import (
    NODE_CERTIFICATE,
    AuditLog,
    Finding,
    Report,
    checkpoint_message,
    signers,
    verify_rows,
)

FORMAT = "exchanged-evidence-1"

VERIFY_TXT = """How to check this bundle with openssl alone (from this directory):

Operator signatures (each SEQ.json is exactly what the operator signed):
  openssl cms -verify -binary -inform DER -in openssl/SEQ.cms.der -content openssl/SEQ.json \\
      -CAfile issuer.pem -purpose any -out /dev/null

Checkpoint signatures (signed on the CA's / node's token; cp-SEQ.pubkey.pem is the public key
of the certificate in signer.pem that signed checkpoint SEQ, signer-pubkey.pem the current one):
  openssl dgst -sha256 -verify openssl/cp-SEQ.pubkey.pem -signature openssl/cp-SEQ.sig \\
      openssl/cp-SEQ.msg

The hash chain itself (each entry's hash and link) is checked by `exchanged audit verify .`.
"""


class EvidenceError(ExchangedError):
    code = "evidence"


def export(log: AuditLog, matter: list[dict[str, Any]], out: Path, *,
           signer: x509.Certificate | Sequence[x509.Certificate],
           certs: dict[str, x509.Certificate], crls: Iterable[Path], query: dict[str, Any],
           issuer: x509.Certificate | None = None) -> dict[str, Any]:
    """Write the bundle for the `matter` entries (rows of `log`) into the new directory `out`.
    `signer`: the certificate that signs checkpoints, or (a renewed node) all that did,
    the current one first. `issuer` is the CA of the operators who signed entries (default:
    the signer, the CA's own log)."""
    signer_certs = [signer] if isinstance(signer, x509.Certificate) else list(signer)
    by_sha = {c.fingerprint(hashes.SHA256()).hex(): c for c in signer_certs}
    signer = signer_certs[0]
    if not matter:
        raise EvidenceError("no audit entry matches: nothing to export", code="empty")
    first, last = matter[0]["seq"], matter[-1]["seq"]
    cover = next(log.rows("WHERE seq > ? AND action = 'checkpoint'", [last], limit=1), None)
    if cover is None:
        raise EvidenceError("no checkpoint follows these entries yet: sign one first "
                            "(exchanged audit checkpoint), then export", code="no-checkpoint")
    run = list(log.rows("WHERE seq >= ? AND seq <= ?", [first, cover["seq"]]))
    if out.exists():
        raise EvidenceError(f"{out} exists; choose a new directory", code="exists")
    (out / "certs").mkdir(parents=True)
    (out / "crls").mkdir()
    (out / "openssl").mkdir()
    matter_seqs = [r["seq"] for r in matter]
    manifest = {"format": FORMAT, "query": query, "matter": matter_seqs, "first_seq": first,
                "first_prev": run[0]["prev"], "checkpoint": cover["seq"],
                "signer_sha256": signer.fingerprint(hashes.SHA256()).hex()}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    with open(out / "entries.jsonl", "w") as f:
        for r in run:
            f.write(json.dumps(_encode(r), ensure_ascii=False) + "\n")
    used = [signer] + [c for sha, c in by_sha.items() if c is not signer and any(
        r["action"] == "checkpoint" and sha in str(r["details"]) for r in run)]
    (out / "signer.pem").write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM)
                                              for c in used))
    (out / "issuer.pem").write_bytes((issuer or signer).public_bytes(serialization.Encoding.PEM))
    (out / "openssl" / "signer-pubkey.pem").write_bytes(signer.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    for serial, cert in certs.items():
        (out / "certs" / f"{serial}.pem").write_bytes(cert.public_bytes(
            serialization.Encoding.PEM))
    for crl in crls:
        shutil.copyfile(crl, out / "crls" / crl.name)
    for r in run:
        if r["action"] == "checkpoint":
            (out / "openssl" / f"cp-{r['seq']}.msg").write_bytes(
                checkpoint_message(r["seq"], r["at"], r["prev"]))
            (out / "openssl" / f"cp-{r['seq']}.sig").write_bytes(r["signature"])
            named = json.loads(r["details"]).get("signer_sha256")
            (out / "openssl" / f"cp-{r['seq']}.pubkey.pem").write_bytes(
                by_sha.get(named, signer).public_key().public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        elif r["seq"] in matter_seqs and r["signature"] is not None:
            (out / "openssl" / f"{r['seq']}.json").write_bytes(r["details"].encode())
            (out / "openssl" / f"{r['seq']}.cms.der").write_bytes(r["signature"])
    (out / "VERIFY.txt").write_text(VERIFY_TXT)
    return manifest


def verify(bundle: Path, trusted: x509.Certificate | None = None) -> Report:
    """Check a bundle offline. `trusted` is the auditor's own copy of the signer's certificate;
    without it the bundle's signer.pem is used (and the report says so)."""
    try:
        manifest = json.loads((bundle / "manifest.json").read_text())
        rows = [_decode(json.loads(line)) for line in
                (bundle / "entries.jsonl").read_text().splitlines() if line.strip()]
        signer_certs = x509.load_pem_x509_certificates((bundle / "signer.pem").read_bytes())
        signer = signer_certs[0]
        issuer = x509.load_pem_x509_certificate((bundle / "issuer.pem").read_bytes()) \
            if (bundle / "issuer.pem").exists() else signer
    except (OSError, ValueError, KeyError) as e:
        raise EvidenceError(f"{bundle} is not a readable evidence bundle: {e}") from None
    if manifest.get("format") != FORMAT:
        raise EvidenceError(f"{bundle}: unknown bundle format {manifest.get('format')!r}")
    findings: list[Finding] = []
    if trusted is not None and trusted.fingerprint(hashes.SHA256()) != \
            signer.fingerprint(hashes.SHA256()):
        findings.append(Finding(None, "the bundle's signer.pem is not the trusted certificate"))
        if issuer is signer:
            issuer = trusted
        signer = trusted
        signer_certs = [trusted]
    # Earlier certificates of a renewed node count only if the issuer issued them to the same
    # node as the current one (audit.signers); the CA's own log has a single signer.
    every = signers_of(signer, signer_certs[1:], issuer) if issuer is not signer else [signer]
    report = verify_rows(rows, every, first_prev=manifest["first_prev"],
                         first_seq=manifest["first_seq"], issuer=issuer)
    findings += report.findings
    if not rows or rows[-1]["seq"] != manifest["checkpoint"] or \
            report.last_checkpoint != manifest["checkpoint"]:
        findings.append(Finding(manifest.get("checkpoint"), "the bundle does not end with its "
                                                            "signed checkpoint"))
    matter = set(manifest["matter"])
    present = {r["seq"] for r in rows}
    for seq in sorted(matter - present):
        findings.append(Finding(seq, "a matter entry is missing from the bundle"))
    for r in rows:
        if r["seq"] in matter and r["signature"] is not None and r["action"] != "checkpoint":
            try:
                verify_detached(r["signature"], r["details"].encode(), issuer)
            except CmsError as e:
                findings.append(Finding(r["seq"], f"operator signature: {e}"))
    return Report(report.entries, report.checkpoints, report.last_checkpoint, findings)


def signers_of(current: x509.Certificate, earlier: list[x509.Certificate],
               issuer: x509.Certificate) -> list[x509.Certificate]:
    """`current` and those of `earlier` that `issuer` issued to the same node."""
    rows = [{"action": NODE_CERTIFICATE, "details": json.dumps(
        {"certificate": c.public_bytes(serialization.Encoding.PEM).decode()})} for c in earlier]
    return signers(rows, current, issuer)


def _encode(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    if out["signature"] is not None:
        out["signature"] = base64.b64encode(out["signature"]).decode()
    return out


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    if row.get("signature") is not None:
        row["signature"] = base64.b64decode(row["signature"])
    return row
