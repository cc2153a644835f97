"""The local control socket: how `exchanged send`, `outbox` and `inbox` talk to the daemon.

The daemon is the only writer of its store; local commands ask it over a Unix socket in the
data directory (mode 600, in a directory of mode 700: only the service's own user reaches
it). One JSON object per line each way; binary values (receipts) travel as base64. A request
is {"cmd": ..., ...}; an answer is {"ok": true, ...} or {"ok": false, "code": ..., "error": ...}.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import shutil
import socket
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from cryptography import x509

from exchanged import package as pkg
from exchanged.errors import ExchangedError
from exchanged.pki import verify
from exchanged.pki.cms import CmsError, cms_content, verify_detached
from exchanged.pki.operator import person_of
from exchanged.roles import DEPUTY, RECEIVER, SignedOperator

if TYPE_CHECKING:
    from exchanged.daemon import Node

MAX_LINE = 1024 * 1024


class ControlError(ExchangedError):
    code = "control"


# -- the daemon's side -----------------------------------------------------------------------

async def serve(node: Node, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    path = node.config.socket_path
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.exists() or path.is_symlink():
        path.unlink()
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket is born mode 600: no window where others may connect
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    task_status.started(path)
    try:
        await trio.serve_listeners(lambda s: _client(node, s), [listener])
    finally:
        path.unlink(missing_ok=True)


async def _client(node: Node, stream: trio.SocketStream) -> None:
    try:
        await _converse(node, stream)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the local command went away (Ctrl-C): nothing to answer


async def _converse(node: Node, stream: trio.SocketStream) -> None:
    buf = b""
    async with stream:
        while True:
            try:
                with trio.fail_after(600):
                    data = await stream.receive_some(65536)
            except (trio.TooSlowError, trio.BrokenResourceError):
                return
            if not data:
                return
            buf += data
            if len(buf) > MAX_LINE:
                await stream.send_all(_line({"ok": False, "code": "too-large",
                                             "error": "request too large"}))
                return
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                answer = await _dispatch(node, line)
                await stream.send_all(_line(answer))


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, default=_json_default).encode() + b"\n"


def _json_default(o: Any) -> Any:
    if isinstance(o, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(o)).decode()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


async def _dispatch(node: Node, line: bytes) -> dict[str, Any]:
    try:
        req = json.loads(line)
        handler = HANDLERS.get(req.get("cmd")) if isinstance(req, dict) else None
        if handler is None:
            raise ControlError(f"unknown command {req.get('cmd')!r}" if isinstance(req, dict)
                               else "a request is a JSON object", code="bad-request")
        return {"ok": True, **(await handler(node, req))}
    except ExchangedError as e:
        return {"ok": False, "code": e.code, "error": str(e)}
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        return {"ok": False, "code": "bad-request", "error": f"bad request: {e}"}
    except Exception as e:  # a local request must never take the daemon down
        import logging
        logging.getLogger("exchanged").exception("control request failed")
        return {"ok": False, "code": "internal-error", "error": f"{type(e).__name__}: {e}"}


async def _status(node: Node, req: dict[str, Any]) -> dict[str, Any]:
    return {"unit": node.config.unit, "port": node.port,
            "store": await node.db(node.store.statistics), "peers": node.peers.statistics()}


async def _send(node: Node, req: dict[str, Any]) -> dict[str, Any]:
    to = req["to"]
    if to not in node.config.peers and to != node.config.unit:
        raise ControlError(f"{to} is not a configured peer (A13): add it to the configuration",
                           code="unknown-peer")
    meta = pkg.Metadata(
        doc_id=req.get("doc_id") or str(uuid.uuid4()), sender=node.config.unit, recipient=to,
        title=req["title"], number=req.get("number") or "",
        urgency=req.get("urgency") or "normal",
        classification=req.get("classification") or "internal",
        deadline=req.get("deadline"), paper_original=bool(req.get("paper_original")),
        created=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    try:
        sha, size = await node.tok(_package, node, meta, Path(req["pdf"]),
                                   Path(req["editable"]))
    except ExchangedError as e:
        await node.audit("document-send", meta.doc_id, outcome="refused",
                         details={"recipient": to, "code": e.code, "error": str(e)})
        raise
    await node.db(_enqueue, node, meta, sha, size)
    node.poke(to)
    return {"doc_id": meta.doc_id, "sha256": sha, "size": size}


def _package(node: Node, meta: Any, pdf: Path, editable: Path) -> tuple[str, int]:
    """Build the package (signed on the node token) and store it as a blob: (sha256, size)."""
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


def _enqueue(node: Node, meta: Any, sha: str, size: int) -> None:
    with node.store.transaction():
        node.store.enqueue(doc_id=meta.doc_id, recipient=meta.recipient,
                           metadata=meta.to_dict(), package_sha256=sha, size=size)
        node.store.audit.append(action="document-sent", obj=meta.doc_id,
                                details={"recipient": meta.recipient, "title": meta.title,
                                         "sha256": sha, "urgency": meta.urgency})


async def _outbox(node: Node, req: dict[str, Any]) -> dict[str, Any]:
    return {"items": await node.db(node.store.outbox, req.get("state"))}


async def _inbox(node: Node, req: dict[str, Any]) -> dict[str, Any]:
    return {"items": await node.db(node.store.inbox, req.get("state"))}


async def _inbox_show(node: Node, req: dict[str, Any]) -> dict[str, Any]:
    return {"item": await node.db(node.store.in_item, req["doc_id"])}


async def _out_show(node: Node, req: dict[str, Any]) -> dict[str, Any]:
    return {"item": await node.db(node.store.out_item, req["doc_id"])}


async def _sign_for(node: Node, req: dict[str, Any]) -> dict[str, Any]:
    """A receiver signed for an inbox document with their personal token (in the CLI, which
    holds their token): check the signature and the person, record it, send it back."""
    doc = req["doc_id"]
    receipt = base64.b64decode(req["receipt"])
    item = await node.db(node.store.in_item, doc)
    try:
        payload = json.loads(cms_content(receipt))
        signer = verify_detached(receipt, cms_content(receipt), node.ca_cert)
    except (CmsError, ValueError) as e:
        raise ControlError(f"the receipt does not verify: {e}", code="bad-receipt") from None
    try:
        await trio.to_thread.run_sync(lambda: verify.validate(
            signer, trusted=node.trusted, crls=node.peers.crls, purpose="person"))
    except verify.ValidationError as e:
        raise ControlError(f"the receiver's certificate is not usable: {e}",
                           code="bad-receipt") from None
    want = {"type": "signed-for", "doc_id": doc, "sha256": item["package_sha256"],
            "sender": item["sender"], "recipient": node.config.unit}
    if any(payload.get(k) != v for k, v in want.items()):
        raise ControlError("the receipt is for another document", code="bad-receipt")
    await node.db(_record_sign_for, node, doc, receipt, signer, payload,
                  cms_content(receipt))
    node.poke(item["sender"])
    return {"doc_id": doc, "by": signer.subject.rfc4514_string()}


def _record_sign_for(node: Node, doc: str, receipt: bytes, signer: Any,
                     payload: dict[str, Any], signed: bytes) -> None:
    # Only a designated receiver (or deputy) of this unit signs for documents (A11, A20).
    node.roles.require(SignedOperator(signer, signed, receipt), RECEIVER, DEPUTY)
    with node.store.transaction():
        node.store.mark_in_signed_for(doc, receipt, format(signer.serial_number, "x"))
        node.store.audit.append(action="document-signed-for", obj=doc,
                                actor=format(signer.serial_number, "x"),
                                actor_subject=signer.subject.rfc4514_string(),
                                role="receiver", details=payload, signature=receipt)


async def _export(node: Node, req: dict[str, Any]) -> dict[str, Any]:
    doc, dest = req["doc_id"], Path(req["dir"])
    item = await node.db(node.store.in_item, doc)
    await node.db(node.store.check_blob, item["package_sha256"])
    files = await trio.to_thread.run_sync(_export_files, node, item, dest)
    await node.audit("document-exported", doc, details={"dir": str(dest)})
    return {"doc_id": doc, "dir": str(dest), "files": files}


def _export_files(node: Node, item: dict[str, Any], dest: Path) -> list[str]:
    """Unpack (and so re-check) the package into DEST, with its metadata and receipts."""
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
        (dest / "metadata.json").write_text(json.dumps(received.metadata.to_dict(), indent=2,
                                                       ensure_ascii=False) + "\n")
        files.append("metadata.json")
        for name in ("delivery_receipt", "signed_for_receipt"):
            if item.get(name):
                (dest / f"{name}.cms").write_bytes(item[name])
                files.append(f"{name}.cms")
        return sorted(files)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- roles at this node (the same rules as at the CA: exchanged.roles) -------------------------

REQUEST_MAX_AGE = 300  # seconds: a signed role request older than this is refused
CLOCK_SKEW = 30  # seconds a request may seem to come from the future (clocks differ)


async def _role(node: Node, req: dict[str, Any]) -> dict[str, Any]:
    """A role change signed on the operator's token by the CLI; checked and applied here."""
    cms = base64.b64decode(req["request"])
    try:
        signed = cms_content(cms)
        signer = verify_detached(cms, signed, node.ca_cert)
    except CmsError as e:
        raise ControlError(f"the signed request does not verify: {e}",
                           code="bad-signature") from None
    op = SignedOperator(signer, signed, cms)
    payload = op.request
    if payload.get("node") != node.config.unit:
        raise ControlError(f"the request is addressed to node {payload.get('node')!r}",
                           code="bad-request")
    at = dt.datetime.fromisoformat(str(payload["at"]).replace("Z", "+00:00"))
    age = (dt.datetime.now(dt.UTC) - at).total_seconds()
    if not -CLOCK_SKEW <= age <= REQUEST_MAX_AGE:
        raise ControlError("the signed request is stale (or from the future): sign it again",
                           code="stale")
    grantee = None
    if req.get("cert"):
        grantee = x509.load_pem_x509_certificate(req["cert"].encode())
        if format(grantee.serial_number, "x") != payload.get("holder_serial"):
            raise ControlError("the certificate sent is not the one the request names",
                               code="bad-request")
    return await node.db(_apply_role, node, op, payload, grantee, hashlib.sha256(cms).digest())


def _apply_role(node: Node, op: SignedOperator, p: dict[str, Any],
                grantee: x509.Certificate | None, digest: bytes) -> dict[str, Any]:
    roles, action, obj = node.roles, p["action"], p["object"]
    with node.store.transaction():
        # Each signed request is applied once: a replay (say, of an old resume after a new
        # suspension) is refused. The digests live beside the roles, in the same transaction.
        if node.store.db.execute("SELECT 1 FROM role_requests WHERE sha256 = ?",
                                 [digest]).fetchone():
            raise ControlError("this signed request was already applied: sign a new one",
                               code="replay")
        node.store.db.execute("INSERT INTO role_requests VALUES (?, ?)", [digest, p["at"]])
        if action == "role-grant":
            if grantee is None or person_of(grantee.subject) != obj:
                raise ControlError("a grant carries the grantee's certificate", code="bad-request")
            return {"id": roles.grant(op, grantee, p["grant"], p.get("division") or "")}
        if action in ("role-approve", "role-refuse"):
            roles.review(op, int(obj), action == "role-approve", p.get("reason") or "")
        elif action == "role-revoke":
            roles.revoke(op, int(obj), p.get("reason") or "")
        elif action == "person-suspend":
            roles.suspend(op, obj, p.get("reason") or "")
        elif action == "person-resume":
            roles.resume(op, obj, p.get("reason") or "")
        else:
            raise ControlError(f"unknown role action {action!r}", code="bad-request")
    return {"id": obj}


async def _role_list(node: Node, req: dict[str, Any]) -> dict[str, Any]:
    return {"items": await node.db(node.roles.list, req.get("status"))}


HANDLERS = {"status": _status, "send": _send, "outbox": _outbox, "inbox": _inbox,
            "inbox-show": _inbox_show, "outbox-show": _out_show, "sign-for": _sign_for,
            "export": _export, "role": _role, "role-list": _role_list}


# -- the command line's side -----------------------------------------------------------------

def request(path: Path, cmd: str, **args: Any) -> dict[str, Any]:
    """Send one request to the daemon and return its answer; ControlError on refusal."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(600)
            s.connect(str(path))
            s.sendall(_line({"cmd": cmd, **args}))
            buf = b""
            while b"\n" not in buf:
                data = s.recv(65536)
                if not data:
                    raise ControlError("the daemon closed the connection without answering")
                buf += data
                if len(buf) > 64 * MAX_LINE:
                    raise ControlError("the daemon's answer is too large")
    except FileNotFoundError:
        raise ControlError(f"no daemon socket at {path}: is `exchanged serve` running with "
                           "this configuration?", code="no-daemon") from None
    except PermissionError:
        raise ControlError(f"no permission for {path}: run as the service's user",
                           code="no-daemon") from None
    except (ConnectionRefusedError, TimeoutError) as e:
        raise ControlError(f"the daemon at {path} does not answer: {e}",
                           code="no-daemon") from None
    answer = json.loads(buf.split(b"\n", 1)[0])
    if not answer.get("ok"):
        raise ExchangedError(answer.get("error", "refused"), code=answer.get("code"))
    return dict(answer)
