"""What the local commands do at the daemon: the handlers behind the control socket.

`LocalCommands.handlers()` is the table `exchanged.node.control.serve` dispatches to. Acts of
a person (signing for a document, a role change) arrive signed on that person's token by the
command line; here they are checked (`exchanged.receipts`, `exchanged.pki.verify`,
`exchanged.roles`) and recorded with their audit entry in one transaction.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from exchanged import archive, box, receipts
from exchanged import package as pkg
from exchanged.box import URGENT
from exchanged.common import new_id, parse_time, stamp
from exchanged.errors import ExchangedError
from exchanged.node import backup, status
from exchanged.node.base import Node
from exchanged.node.control import Handler
from exchanged.node.outbound import Outbound
from exchanged.node.wire import ControlError
from exchanged.pki import csr as csrmod
from exchanged.pki import verify
from exchanged.pki.operator import SignedOperator
from exchanged.roles import act
from exchanged.store import evidence
from exchanged.store.audit import MIRROR, mirror_line


def _epoch(text: Any) -> float | None:
    t = _when(text)
    return None if t is None else t.timestamp()


def _when(text: Any) -> dt.datetime | None:
    if not text:
        return None
    try:
        return parse_time(str(text))
    except ValueError:
        raise ControlError(f"not an ISO 8601 time: {text!r}", code="usage") from None


def _decoded(row: dict[str, Any]) -> dict[str, Any]:
    row = dict(row)
    row["metadata"] = json.loads(row["metadata"])
    return row


class LocalCommands:
    """The control socket's commands, over one running node."""

    def __init__(self, node: Node, outbound: Outbound,
                 reload: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        self.node = node
        self.outbound = outbound
        self.reload_hook = reload
        # Numbered sends one at a time: the number is read, signed into the package, then
        # taken with the enqueue; a send that fails in between takes none (gap-free).
        self.numbering = trio.Lock()

    def handlers(self) -> dict[str, Handler]:
        return {"status": self.status, "send": self.send, "outbox": self.outbox,
                "inbox": self.inbox, "inbox-show": self.inbox_show,
                "outbox-show": self.outbox_show, "sign-for": self.sign_for,
                "return": self.return_, "due": self.due, "export": self.export,
                "act": self.act, "role": self.act, "role-list": self.role_list,
                "witnessed": self.witnessed, "crl-fetch": self.crl_fetch,
                "crl-install": self.crl_install, "reload": self.reload}

    async def status(self, req: dict[str, Any]) -> dict[str, Any]:
        return await status.gather(self.node, self.outbound)

    # -- CRLs -------------------------------------------------------------------------------

    async def crl_fetch(self, req: dict[str, Any]) -> dict[str, Any]:
        """Fetch from the CA's publication point now (the daemon also does every
        crl_refresh seconds)."""
        result = await self.node.fetch_crl()
        if not result["ok"]:
            raise ControlError(f"no CRL fetched: {result['error']}", code="crl-fetch")
        return result

    async def crl_install(self, req: dict[str, Any]) -> dict[str, Any]:
        """An operator hands the daemon a CRL file (DER or PEM, as base64 of its bytes)."""
        node = self.node
        data = base64.b64decode(str(req.get("crl") or ""), validate=True)
        try:
            der = verify.crl_der(data)
            installed = await node.take_crl(der, f"operator ({req.get('file') or 'a file'})")
        except verify.ValidationError as e:
            await node.audit("crl-refused", str(req.get("file") or "-"), outcome="refused",
                             details={"code": e.code, "error": str(e)})
            raise
        return {"installed": installed, "crls": node.crls.status()}

    # -- sending ----------------------------------------------------------------------------

    async def send(self, req: dict[str, Any]) -> dict[str, Any]:
        node = self.node
        to = req["to"]
        doc_id = req.get("doc_id") or new_id()
        try:
            if to not in node.config.peers and to != node.config.unit:
                raise ControlError(f"{to} is not a configured peer (A13): add it to the "
                                   "configuration", code="unknown-peer")
            urgency = req.get("urgency") or "normal"
            phoned = str(req.get("phoned") or "").strip()
            hours = node.config.box.office_hours
            if urgency in URGENT and not phoned and not hours.open_at(dt.datetime.now(dt.UTC)):
                raise ControlError(f"it is outside {node.config.unit}'s office hours: an urgent "
                                   f"document needs a phone call to {to} first (A20); say who "
                                   "you spoke to and when with --phoned 'WHO, WHEN'",
                                   code="phone-first")
            if req.get("corrects"):
                await node.db(self._check_corrects, str(req["corrects"]))
            number = str(req.get("number") or "")
            if number == "auto":
                async with self.numbering:
                    return await self._send(req, doc_id, to, urgency, phoned, auto=True)
            used = await node.db(node.box.rows.outgoing_number_used, number) if number else None
            if used:
                raise ControlError(f"the number {number!r} is used by another document of "
                                   f"{node.config.unit}; numbers are unique", code="number-used")
            return await self._send(req, doc_id, to, urgency, phoned, auto=False)
        except ExchangedError as e:
            await node.audit("document-send", doc_id, outcome="refused",
                             details={"recipient": to, "code": e.code, "error": str(e)})
            raise

    async def _send(self, req: dict[str, Any], doc_id: str, to: str, urgency: str,
                    phoned: str, *, auto: bool) -> dict[str, Any]:
        node = self.node
        year = node.config.box.office_hours.local(dt.datetime.now(dt.UTC)).year
        number = str(req.get("number") or "")
        seq = 0
        if auto:
            seq = await node.db(node.box.rows.peek_number, "outgoing", year)
            number = box.number(node.config.box.outgoing_number, node.config.unit, year, seq)
        meta = pkg.Metadata(
            doc_id=doc_id, sender=node.config.unit, recipient=to, title=req["title"],
            number=number, urgency=urgency,
            classification=req.get("classification") or "internal",
            deadline=req.get("deadline"), paper_original=bool(req.get("paper_original")),
            created=stamp(), division=str(req.get("division") or ""), phoned=phoned,
            corrects=req.get("corrects") or None)
        sha, size = await node.tok(self._package, meta, Path(req["pdf"]), Path(req["editable"]))
        await node.db(self._enqueue, meta, sha, size, (year, seq) if auto else None)
        self.outbound.poke(to)
        return {"doc_id": meta.doc_id, "sha256": sha, "size": size, "number": number}

    def _check_corrects(self, doc_id: str) -> None:
        item = self.node.store.out_item(doc_id)
        if item["state"] != "returned":
            raise ControlError(f"{doc_id} was not returned (it is {item['state']}); --corrects "
                               "names a document the recipient sent back", code="bad-state")

    def _package(self, meta: pkg.Metadata, pdf: Path, editable: Path) -> tuple[str, int]:
        """Build the package (signed on the node token) straight into the blob store, where it
        is hashed and made durable: (sha256, size)."""
        node = self.node
        with node.store.blob_writer(max_size=node.config.limits.max_document_bytes) as w:
            pkg.build(meta, pdf, editable, key=node.key, cert=node.cert, sink=w)
            return w.commit(), w.size

    def _enqueue(self, meta: pkg.Metadata, sha: str, size: int,
                 numbered: tuple[int, int] | None) -> None:
        store = self.node.store
        with store.transaction():
            if numbered is not None:  # the number read before packaging is taken now
                year, seq = numbered
                if self.node.box.rows.take_number("outgoing", year) != seq:
                    raise ControlError("the outgoing number moved while packaging; send again",
                                       code="busy")
            if meta.recipient == self.node.config.unit:  # within the unit: into its own box
                if meta.division and meta.division not in self.node.config.box.divisions:
                    raise ControlError(f"{meta.recipient} has no division {meta.division!r}",
                                       code="no-division")
                store.receive(doc_id=meta.doc_id, sender=meta.sender, metadata=meta.to_dict(),
                              package_sha256=sha, size=size, box=meta.division,
                              signer_sha256=self.node.cert.fingerprint(hashes.SHA256()).hex())
            else:
                store.enqueue(doc_id=meta.doc_id, recipient=meta.recipient,
                              metadata=meta.to_dict(), package_sha256=sha, size=size)
            store.audit.append(action="document-sent", obj=meta.doc_id,
                               details={"recipient": meta.recipient, "title": meta.title,
                                        "sha256": sha, "urgency": meta.urgency,
                                        "number": meta.number, "phoned": meta.phoned,
                                        "division": meta.division,
                                        "corrects": meta.corrects})

    # -- the boxes --------------------------------------------------------------------------

    async def outbox(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"items": await self.node.db(self.node.store.outbox, req.get("state"))}

    async def inbox(self, req: dict[str, Any]) -> dict[str, Any]:
        if req.get("division"):
            division = str(req["division"])
            if division not in self.node.config.box.divisions:
                raise ControlError(f"{self.node.config.unit} has no division {division!r}",
                                   code="no-division")
            rows = await self.node.db(self.node.box.rows.box, division)
            return {"items": [_decoded(r) for r in rows
                              if not req.get("state") or r["state"] == req["state"]]}
        return {"items": await self.node.db(self.node.store.inbox, req.get("state"))}

    async def inbox_show(self, req: dict[str, Any]) -> dict[str, Any]:
        def show() -> dict[str, Any]:
            item = self.node.store.in_item(req["doc_id"])
            rows = self.node.box.rows
            item["copies"] = [{k: v for k, v in c.items() if k != "receipt"}
                              for c in rows.copies(rows.item(req["doc_id"]))]
            item["receipts_out"] = self.node.store.receipts_for(req["doc_id"])
            return item
        return {"item": await self.node.db(show)}

    async def outbox_show(self, req: dict[str, Any]) -> dict[str, Any]:
        def show() -> dict[str, Any]:
            item = self.node.store.out_item(req["doc_id"])
            item["receipts"] = self.node.box.rows.receipts(req["doc_id"])
            return item
        return {"item": await self.node.db(show)}

    async def due(self, req: dict[str, Any]) -> dict[str, Any]:
        division = req.get("division") or None
        return {"items": await self.node.db(self.node.box.due, dt.datetime.now(dt.UTC),
                                            division)}

    async def sign_for(self, req: dict[str, Any]) -> dict[str, Any]:
        """A receiver signed for a document (or the copy their division was given) with their
        personal token (in the CLI, which holds their token): check the signature and the
        person, record it, send it back. Who may sign for what is the box's and the roles'."""
        node = self.node
        doc, division = req["doc_id"], str(req.get("division") or "")
        op, payload = await self._signed(base64.b64decode(req["receipt"]), "receipt")
        role = await node.db(node.box.sign_for, op, doc, payload, division)
        self.outbound.poke(str(payload["sender"]))
        return {"doc_id": doc, "by": op.cert.subject.rfc4514_string(), "role": role,
                "division": division}

    async def return_(self, req: dict[str, Any]) -> dict[str, Any]:
        """A document sent back to its sender with the reason (N4), the notice signed on the
        returner's token."""
        node = self.node
        doc = req["doc_id"]
        op, payload = await self._signed(base64.b64decode(req["notice"]), "return notice")
        reason = await node.db(node.box.return_, op, doc, payload)
        node.metrics.returned.labels(direction="out").inc()
        self.outbound.poke(str(payload["sender"]))
        return {"doc_id": doc, "by": op.cert.subject.rfc4514_string(), "reason": reason}

    async def _signed(self, cms: bytes, what: str) -> tuple[SignedOperator, dict[str, Any]]:
        """Something a person signed that travels: verified, by a person certificate good per
        our CRLs."""
        node = self.node
        signer, content, payload = receipts.open_signed(cms, node.ca_cert, what)
        try:
            await trio.to_thread.run_sync(lambda: verify.validate(
                signer, trusted=node.trusted, crls=node.peers.crls, purpose="person"))
        except verify.ValidationError as e:
            raise ControlError(f"the signer's certificate is not usable: {e}",
                               code="bad-receipt") from None
        return SignedOperator(signer, content, cms), payload

    async def export(self, req: dict[str, Any]) -> dict[str, Any]:
        node = self.node
        doc, dest = req["doc_id"], Path(req["dir"])
        item = await node.db(node.store.in_item, doc)
        await node.db(node.store.check_blob, item["package_sha256"])
        files = await trio.to_thread.run_sync(self._export_files, item, dest)
        await node.audit("document-exported", doc, details={"dir": str(dest)})
        return {"doc_id": doc, "dir": str(dest), "files": files}

    def _export_files(self, item: dict[str, Any], dest: Path) -> list[str]:
        """Unpack (and so re-check) the package into DEST, with its metadata and receipts."""
        node = self.node
        dest.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=node.config.data_dir, prefix=".export-"))
        try:
            received = pkg.read(node.store.blob_path(item["package_sha256"]), work,
                                issuer=node.ca_cert,
                                max_file_size=node.config.limits.max_document_bytes)
            files = []
            for f in work.iterdir():
                shutil.copyfile(f, dest / f.name)
                files.append(f.name)
            (dest / "metadata.json").write_text(json.dumps(
                received.metadata.to_dict(), indent=2, ensure_ascii=False) + "\n")
            files.append("metadata.json")
            for name in ("delivery_receipt", "signed_for_receipt", "relay_receipt"):
                if item.get(name):
                    (dest / f"{name}.cms").write_bytes(item[name])
                    files.append(f"{name}.cms")
            for n, hop in enumerate(item.get("relay_path") or (), 1):  # relays it came through
                (dest / f"relay-{n}.cms").write_bytes(base64.b64decode(hop))
                files.append(f"relay-{n}.cms")
            return sorted(files)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    # -- acts signed on a person's token (roles: the same rules as at the CA) ----------------

    async def act(self, req: dict[str, Any]) -> dict[str, Any]:
        """An act signed on the operator's token by the CLI — a role change, or an act on the
        exchange box — checked (fresh, once, by whom) and applied here."""
        node = self.node
        op, grantee, digest = receipts.open_request(
            base64.b64decode(req["request"]), node.ca_cert, node=node.config.unit,
            grantee_pem=req.get("cert"))
        action, doc = str(op.request.get("action")), str(op.request.get("object"))
        b = node.box
        if action == "document-register":
            return {"number": await node.db(b.register, op, doc, digest)}
        if action == "document-distribute":
            await node.db(b.distribute, op, doc, list(op.request.get("divisions") or []),
                          digest)
            return {"divisions": op.request.get("divisions")}
        if action == "document-forward":
            to = str(op.request.get("to"))
            await node.db(b.forward, op, doc, to, digest)
            self.outbound.poke(to)
            return {"to": to}
        if action == "document-to-registrar":
            await node.db(b.to_registrar, op, doc, digest)
            return {}
        if action == "document-paper-received":
            await node.db(b.paper_received, op, doc, digest)
            return {}
        if action == "archive-export":
            return await node.db(self._archive, op, digest)
        if action in ("audit-show", "audit-export"):
            return await node.db(self._audit, op, digest)
        if action == "node-backup":
            return await self._backup(op, digest)
        if action == "node-renew":
            return await self._renew(op, digest)
        return {"id": await node.db(self._apply_role, op, grantee, digest)}

    def _archive(self, op: SignedOperator, digest: bytes) -> dict[str, Any]:
        """The archive of finished documents (A24), by the archives section or an auditor:
        the act is recorded and a checkpoint signed first, so that the archive's evidence
        covers it."""
        node, p = self.node, op.request
        out = Path(str(p["object"]))
        query = {k: p.get(k) for k in ("since", "until", "division") if p.get(k)}
        with node.store.transaction():
            node.roles.accept_request(op, digest)
            role = node.roles.require(op, "archive-export")
            act(node.store.audit, op, role, "archive-export", str(out))
        docs = archive.finished(node.store, node.box.rows, since=_epoch(p.get("since")),
                                until=_epoch(p.get("until")), division=p.get("division"))
        node.audit_event("archive-checkpoint", str(out), checkpoint=True)
        manifest = archive.export(out, docs, unit=node.config.unit, store=node.store,
                                  rows=node.box.rows, node=node.signer, ca=node.ca_cert,
                                  crls=list(node.config.crls), query=query,
                                  by=op.cert.subject.rfc4514_string(),
                                  max_file_size=node.config.limits.max_document_bytes)
        return {"dir": str(out), "documents": [d["doc_id"] for d in manifest["documents"]]}

    async def _renew(self, op: SignedOperator, digest: bytes) -> dict[str, Any]:
        """A new key pair on the node's token and a CSR for it asking for what the current
        certificate says, by the node's administrator. The node goes on with its current key
        until the new certificate is installed (exchanged renew --install, or the certificate
        file replaced and SIGHUP)."""
        node = self.node
        base = node.key.label.rsplit("-renewed-", 1)[0]
        label = str(op.request.get("object") or
                    f"{base}-renewed-{dt.datetime.now(dt.UTC):%Y%m%d%H%M%S}")

        def accept() -> None:
            with node.store.transaction():
                node.roles.accept_request(op, digest)
                role = node.roles.require(op, "node-renew")
                act(node.store.audit, op, role, "node-renew", str(op.request.get("object")))

        await node.db(accept)
        key = await node.tok(node.token.generate_keypair, label,
                             key_type=node.key.key_type)
        req = await node.tok(csrmod.renewal, key, node.cert)
        await node.audit("node-renew-csr", label, details={
            "key": str(key.uri.public()), "subject": node.cert.subject.rfc4514_string()})
        return {"csr": req.public_bytes(serialization.Encoding.PEM).decode(),
                "key": str(key.uri.public()), "label": label,
                "subject": node.cert.subject.rfc4514_string(),
                "current_not_after": stamp(node.cert.not_valid_after_utc)}

    async def reload(self, req: dict[str, Any]) -> dict[str, Any]:
        """What SIGHUP does, asked for on the control socket (and answered)."""
        return await self.reload_hook()

    async def _backup(self, op: SignedOperator, digest: bytes) -> dict[str, Any]:
        """A consistent backup of the running node, by its administrator (exchanged.node.backup):
        the act, a signed checkpoint and the database's snapshot in one hold of the database;
        then the blobs it names, copied in a thread without holding it; then the list, signed
        on the node token. A refusal or a failure is recorded; a failure removes the
        directory."""
        node, out = self.node, Path(str(op.request["object"]))
        acted = False

        def begin() -> backup.Snapshot:
            nonlocal acted
            backup.check_target(out)
            with node.store.transaction():
                node.roles.accept_request(op, digest)
                role = node.roles.require(op, "node-backup")
                act(node.store.audit, op, role, "node-backup", str(out))
            acted = True
            node.audit_event("backup-checkpoint", str(out), checkpoint=True)
            return backup.snapshot(node.store, out, node.config.data_dir / MIRROR)

        by = op.cert.subject.rfc4514_string()
        snap: backup.Snapshot | None = None
        try:
            snap = await node.db(begin)
            await trio.to_thread.run_sync(backup.copy_blobs, snap, node.store.blobs)
            manifest = await node.tok(backup.seal, snap, unit=node.config.unit,
                                      signer=node.signer, by=by)
        except BaseException as e:
            refused = not acted and isinstance(e, ExchangedError)
            with trio.CancelScope(shield=True):
                if snap is not None:
                    await trio.to_thread.run_sync(backup.discard, snap.out, snap.created)
                await node.audit("node-backup", str(out), actor=by,
                                 outcome="refused" if refused else "failed",
                                 details={"error": str(e) or type(e).__name__})
            raise
        await node.audit("node-backup-written", str(out), details={
            "manifest_sha256": manifest["manifest_sha256"], "files": len(manifest["files"]),
            "audit_head": manifest["audit"]["head_seq"]})
        return {"dir": str(out), "documents": manifest["documents"], "blobs": manifest["blobs"],
                "bytes": sum(f["size"] for f in manifest["files"]), "audit": manifest["audit"],
                "manifest_sha256": manifest["manifest_sha256"]}

    def _audit(self, op: SignedOperator, digest: bytes) -> dict[str, Any]:
        """The node's audit log, for its auditors only (A7): shown, or exported as an
        evidence bundle. Reading it is itself a signed entry."""
        node, p = self.node, op.request
        action = str(p["action"])
        given = p.get("filters")
        filters: dict[str, Any] = given if isinstance(given, dict) else {}
        query = {k: filters[k] for k in ("actor", "action", "object", "since", "until")
                 if filters.get(k)}
        with node.store.transaction():
            node.roles.accept_request(op, digest)
            role = node.roles.require(op, "audit-read")
            act(node.store.audit, op, role, action, str(p["object"]), {})
        match = {k: [str(query[k])] for k in ("actor", "action", "object") if query.get(k)}
        rows = node.store.audit.query(match, since=_when(query.get("since")),
                                      until=_when(query.get("until")),
                                      limit=int(p["limit"]) if p.get("limit") else None)
        if action == "audit-show":
            for r in rows:
                r["signed"] = r.pop("signature") is not None
            return {"items": rows}
        node.audit_event("audit-export-checkpoint", str(p["object"]), checkpoint=True)
        evidence.export(node.store.audit, rows, Path(str(p["out"])),
                        signer=node.checkpoint_signers(), certs={},
                        crls=node.crls.paths(), query=query, issuer=node.ca_cert)
        return {"dir": str(p["out"]), "entries": len(rows)}

    def _apply_role(self, op: SignedOperator, grantee: x509.Certificate | None,
                    digest: bytes) -> int | str:
        with self.node.store.transaction():
            return self.node.roles.apply_request(op, grantee, digest)

    async def witnessed(self, req: dict[str, Any]) -> dict[str, Any]:
        """The audit checkpoints this node keeps for a peer it witnesses, as lines that
        `exchanged audit verify --checkpoints` compares with that peer's log."""
        unit = str(req["unit"])
        if unit not in self.node.config.witness_for:
            raise ControlError(f"{self.node.config.unit} does not witness {unit} (witness_for)",
                               code="not-found")
        found = await self.node.db(self.node.store.witnessed, unit)
        return {"unit": unit, "records": [mirror_line(r).decode() for r in found]}

    async def role_list(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"items": await self.node.db(self.node.roles.list, req.get("status"))}
