"""What the local commands do at the daemon: the handlers behind the control socket.

`LocalCommands.handlers()` is the table `exchanged.node.control.serve` dispatches to. Acts of
a person (signing for a document, a role change) arrive signed on that person's token by the
command line; here they are checked (`exchanged.receipts`, `exchanged.pki.verify`,
`exchanged.roles`) and recorded with their audit entry in one transaction.
"""

from __future__ import annotations

import base64
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import trio
from cryptography import x509

from exchanged import package as pkg
from exchanged import receipts
from exchanged.common import new_id, stamp
from exchanged.errors import ExchangedError
from exchanged.node.base import Node
from exchanged.node.control import Handler
from exchanged.node.outbound import Outbound
from exchanged.node.wire import ControlError
from exchanged.pki import verify
from exchanged.pki.operator import SignedOperator
from exchanged.store.audit import mirror_line


class LocalCommands:
    """The control socket's commands, over one running node."""

    def __init__(self, node: Node, outbound: Outbound) -> None:
        self.node = node
        self.outbound = outbound

    def handlers(self) -> dict[str, Handler]:
        return {"status": self.status, "send": self.send, "outbox": self.outbox,
                "inbox": self.inbox, "inbox-show": self.inbox_show,
                "outbox-show": self.outbox_show, "sign-for": self.sign_for,
                "export": self.export, "role": self.role, "role-list": self.role_list,
                "witnessed": self.witnessed}

    async def status(self, req: dict[str, Any]) -> dict[str, Any]:
        node = self.node
        return {"unit": node.config.unit, "port": node.port,
                "store": await node.db(node.store.statistics),
                "peers": node.peers.statistics()}

    # -- sending ----------------------------------------------------------------------------

    async def send(self, req: dict[str, Any]) -> dict[str, Any]:
        node = self.node
        to = req["to"]
        if to not in node.config.peers and to != node.config.unit:
            raise ControlError(f"{to} is not a configured peer (A13): add it to the "
                               "configuration", code="unknown-peer")
        meta = pkg.Metadata(
            doc_id=req.get("doc_id") or new_id(), sender=node.config.unit, recipient=to,
            title=req["title"], number=req.get("number") or "",
            urgency=req.get("urgency") or "normal",
            classification=req.get("classification") or "internal",
            deadline=req.get("deadline"), paper_original=bool(req.get("paper_original")),
            created=stamp())
        try:
            sha, size = await node.tok(self._package, meta, Path(req["pdf"]),
                                       Path(req["editable"]))
        except ExchangedError as e:
            await node.audit("document-send", meta.doc_id, outcome="refused",
                             details={"recipient": to, "code": e.code, "error": str(e)})
            raise
        await node.db(self._enqueue, meta, sha, size)
        self.outbound.poke(to)
        return {"doc_id": meta.doc_id, "sha256": sha, "size": size}

    def _package(self, meta: pkg.Metadata, pdf: Path, editable: Path) -> tuple[str, int]:
        """Build the package (signed on the node token), store it as a blob: (sha256, size)."""
        node = self.node
        tmp = Path(tempfile.mkstemp(dir=node.config.data_dir, prefix=".send-")[1])
        try:
            pkg.build(meta, pdf, editable, key=node.key, cert=node.cert, out_path=tmp)
            with node.store.blob_writer(max_size=node.config.limits.max_document_bytes) as w, \
                    open(tmp, "rb") as f:
                while chunk := f.read(65536):
                    w.write(chunk)
                sha = w.commit()
            return sha, tmp.stat().st_size
        finally:
            tmp.unlink(missing_ok=True)

    def _enqueue(self, meta: pkg.Metadata, sha: str, size: int) -> None:
        store = self.node.store
        with store.transaction():
            store.enqueue(doc_id=meta.doc_id, recipient=meta.recipient,
                          metadata=meta.to_dict(), package_sha256=sha, size=size)
            store.audit.append(action="document-sent", obj=meta.doc_id,
                               details={"recipient": meta.recipient, "title": meta.title,
                                        "sha256": sha, "urgency": meta.urgency})

    # -- the boxes --------------------------------------------------------------------------

    async def outbox(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"items": await self.node.db(self.node.store.outbox, req.get("state"))}

    async def inbox(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"items": await self.node.db(self.node.store.inbox, req.get("state"))}

    async def inbox_show(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"item": await self.node.db(self.node.store.in_item, req["doc_id"])}

    async def outbox_show(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"item": await self.node.db(self.node.store.out_item, req["doc_id"])}

    async def sign_for(self, req: dict[str, Any]) -> dict[str, Any]:
        """A receiver signed for an inbox document with their personal token (in the CLI,
        which holds their token): check the signature and the person, record it, send it
        back."""
        node = self.node
        doc = req["doc_id"]
        receipt = base64.b64decode(req["receipt"])
        item = await node.db(node.store.in_item, doc)
        signer, content, payload = receipts.open_signed(receipt, node.ca_cert)
        try:
            await trio.to_thread.run_sync(lambda: verify.validate(
                signer, trusted=node.trusted, crls=node.peers.crls, purpose="person"))
        except verify.ValidationError as e:
            raise ControlError(f"the receiver's certificate is not usable: {e}",
                               code="bad-receipt") from None
        receipts.check_signed_for(payload, doc_id=doc, sha256=item["package_sha256"],
                                  sender=item["sender"], recipient=node.config.unit)
        await node.db(self._record_sign_for, doc, SignedOperator(signer, content, receipt),
                      payload)
        self.outbound.poke(item["sender"])
        return {"doc_id": doc, "by": signer.subject.rfc4514_string()}

    def _record_sign_for(self, doc: str, op: SignedOperator, payload: dict[str, Any]) -> None:
        node = self.node
        # Only a designated receiver (or deputy) of this unit signs for documents (A11, A20).
        role = node.roles.require(op, "document-sign-for")
        assert op.presigned is not None
        receipt = op.presigned[1]
        with node.store.transaction():
            node.store.mark_in_signed_for(doc, receipt, op.serial)
            node.store.audit.append(action="document-signed-for", obj=doc, actor=op.serial,
                                    actor_subject=op.cert.subject.rfc4514_string(),
                                    role=role, details=payload, signature=receipt)

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
            for name in ("delivery_receipt", "signed_for_receipt"):
                if item.get(name):
                    (dest / f"{name}.cms").write_bytes(item[name])
                    files.append(f"{name}.cms")
            return sorted(files)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    # -- roles at this node (the same rules as at the CA: exchanged.roles) ------------------

    async def role(self, req: dict[str, Any]) -> dict[str, Any]:
        """A role change signed on the operator's token by the CLI; checked and applied here."""
        node = self.node
        op, grantee, digest = receipts.open_role_request(
            base64.b64decode(req["request"]), node.ca_cert, node=node.config.unit,
            grantee_pem=req.get("cert"))
        return {"id": await node.db(self._apply_role, op, grantee, digest)}

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
