"""The `exchanged` command: git-style subcommands over the tokens, the CA and validation.

Conventions every subcommand keeps: `--help`; on failure one line on stderr
("exchanged: error: ...") and exit status 1 (2 for a usage error); `--json` where it lists.
PINs come from --*-pin-file options, the environment or a prompt, never from an argument.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from exchanged import __version__, archive, client, receipts
from exchanged import ca as camod
from exchanged.common import parse_time
from exchanged.errors import ExchangedError, reported
from exchanged.node.config import Config, config_option
from exchanged.pki import csr as csrmod
from exchanged.pki import profiles
from exchanged.pki.crl import REASONS
from exchanged.pki.names import common_name, organization, person_of
from exchanged.pki.operator import Operator
from exchanged.pki.pin import PinSource
from exchanged.pki.token import Token, TokenKey, list_tokens
from exchanged.pki.uri import Pkcs11Uri, parse
from exchanged.roles import ADMIN, AUDITOR, OFFICER, ROLES
from exchanged.store import evidence, nodedb

Handler = Callable[[argparse.Namespace, ExitStack], int]

PIN_ROLES = {  # role -> (option dest, environment variable, what the prompt calls it)
    "token": ("pin_file", "EXCHANGED_PIN", "token"),
    "ca": ("ca_pin_file", "EXCHANGED_CA_PIN", "CA"),
    "operator": ("operator_pin_file", "EXCHANGED_OPERATOR_PIN", "operator"),
}


class UsageError(ExchangedError):
    code = "usage"


# -- helpers ---------------------------------------------------------------------------------

def _pin(args: argparse.Namespace, role: str) -> PinSource:
    dest, env, name = PIN_ROLES[role]
    return PinSource(role=name, env=env, file=getattr(args, dest, None))


def _uri(text: str) -> Pkcs11Uri:
    uri = parse(text)
    if "pin-value" in uri.query:
        raise UsageError("pin-value in a pkcs11: URI is refused: a PIN in an argument is "
                         "visible to every user through ps; use a PIN file or the environment")
    return uri


def _open(stack: ExitStack, uri: Pkcs11Uri, args: argparse.Namespace, role: str,
          module: str | None = None) -> Token:
    token = Token.open(uri, _pin(args, role), module=module or getattr(args, "module", None))
    stack.callback(token.close)
    return token


def _operator(stack: ExitStack, args: argparse.Namespace, attr: str = "operator") -> Operator:
    uri = _uri(getattr(args, attr))
    token = _open(stack, uri, args, "operator")
    return Operator.from_token(token.key_from_uri(uri))


def _ca(stack: ExitStack, args: argparse.Namespace) -> camod.CA:
    ca = camod.CA(args.dir)
    stack.callback(ca.close)
    return ca


def _ca_key(stack: ExitStack, args: argparse.Namespace, ca: camod.CA) -> TokenKey:
    uri = _uri(ca.config.key)
    token = _open(stack, uri, args, "ca", module=ca.config.module)
    return token.key_from_uri(uri)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(16 * 1024 * 1024)
    except OSError as e:
        raise ExchangedError(f"cannot read {what} {path}: {e.strerror}", code="io") from None


def _load_certs(path: str, what: str) -> list[x509.Certificate]:
    data = _read(path, what)
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except ValueError as e:
        raise ExchangedError(f"{what} {path} is not a certificate: {str(e).splitlines()[0]}",
                             code="bad-cert") from None


def _write_out(path: str | None, data: bytes) -> None:
    if path in (None, "-"):
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    assert path is not None
    try:
        Path(path).write_bytes(data)
    except OSError as e:
        raise ExchangedError(f"cannot write {path}: {e.strerror}", code="io") from None


def _emit(args: argparse.Namespace, data: Any, text: Callable[[Any], str]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, default=str, ensure_ascii=False))
    else:
        out = text(data)
        if out:
            print(out)


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[str(r.get(c) if r.get(c) is not None else "") for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
              for row in cells]
    return "\n".join(lines)


def _form(args: argparse.Namespace) -> profiles.Form:
    return profiles.Form(name=args.name, unit=args.unit, division=args.division or "",
                         post=args.post or "", reason=getattr(args, "reason", "") or "",
                         dns=tuple(args.dns or ()), ip=tuple(args.ip or ()))


def _parse_time(text: str) -> dt.datetime:
    try:
        return parse_time(text)
    except ValueError:
        raise UsageError(f"not an ISO 8601 time: {text!r} (e.g. 2026-11-25T12:00:00Z)") from None


# -- token -----------------------------------------------------------------------------------

def cmd_token_list(args: argparse.Namespace, stack: ExitStack) -> int:
    if args.uri is None:
        found = list_tokens(args.module)
        _emit(args, found, lambda r: _table(r, ["label", "serial", "manufacturer", "model"]))
        return 0
    token = _open(stack, _uri(args.uri), args, "token")
    objs = [o.__dict__ for o in token.list_objects()]
    for o in objs:
        o["uri"] = str(token.uri.with_object(o["label"], bytes.fromhex(o["id"]), o["kind"]))
    _emit(args, objs, lambda r: _table(r, ["kind", "label", "key_type", "key_size",
                                           "sensitive", "extractable", "subject", "uri"]))
    return 0


def cmd_token_keygen(args: argparse.Namespace, stack: ExitStack) -> int:
    uri = _uri(args.uri)
    if not uri.object:
        raise UsageError("name the new key in the URI: pkcs11:token=NAME;object=LABEL")
    token = _open(stack, uri, args, "token")
    key = token.generate_keypair(uri.object, key_type=args.type, bits=args.bits)
    _emit(args, {"uri": str(key.uri), "type": key.key_type},
          lambda d: f"generated {d['type']} key {d['uri']}")
    return 0


def cmd_token_import_cert(args: argparse.Namespace, stack: ExitStack) -> int:
    uri = _uri(args.uri)
    (cert, *_rest) = _load_certs(args.cert, "certificate")
    token = _open(stack, uri, args, "token")
    key = token.store_certificate(cert, label=uri.object)
    print(f"stored the certificate beside key {key.label!r} on token {token.label!r}")
    return 0


# -- csr -------------------------------------------------------------------------------------

def cmd_csr(args: argparse.Namespace, stack: ExitStack) -> int:
    uri = _uri(args.uri)
    token = _open(stack, uri, args, "token")
    key = token.key_from_uri(uri)
    req = csrmod.build(key, args.profile, _form(args))
    _write_out(args.out, req.public_bytes(serialization.Encoding.PEM))
    return 0


# -- ca --------------------------------------------------------------------------------------

def cmd_ca_init(args: argparse.Namespace, stack: ExitStack) -> int:
    ca_uri = _uri(args.key)
    ca_token = _open(stack, ca_uri, args, "ca")
    ca_key = _key_or_new(ca_token, ca_uri, args.key_type, "ca")
    people: dict[str, tuple[TokenKey, profiles.Form]] = {}
    for role, prefix in ((ADMIN, "admin"), (OFFICER, "officer"), (AUDITOR, "auditor")):
        uri = _uri(getattr(args, prefix))
        pin = PinSource(role=role, env=f"EXCHANGED_{prefix.upper()}_PIN",
                        file=getattr(args, f"{prefix}_pin_file"))
        token = Token.open(uri, pin, module=args.module)
        stack.callback(token.close)
        people[role] = (_key_or_new(token, uri, "ec", prefix), profiles.Form(
            name=getattr(args, f"{prefix}_name"), unit=args.unit,
            division=getattr(args, f"{prefix}_division"), reason=f"first {role}"))
    name_attrs = [x509.NameAttribute(x509.oid.NameOID.ORGANIZATION_NAME, args.org)] \
        if args.org else []
    name = x509.Name(name_attrs + [x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, args.name)])
    ca = camod.CA.init(args.dir, ca_key=ca_key, name=name, people=people, days=args.days,
                       crl_url=args.crl_url, crl_hours=args.crl_hours,
                       cert_days=args.cert_days, module=args.module)
    stack.callback(ca.close)
    print(f"CA {ca.cert.subject.rfc4514_string()} created in {args.dir}")
    print(f"  CA key      {ca_key.uri}")
    for r in ca.roles.list():
        print(f"  {r['role']:17} {r['person']} serial {r['holder_serial']} (certificate on "
              "their token)")
    print(f"  first CRL   {Path(args.dir) / camod.LATEST_CRL}")
    return 0


def _key_or_new(token: Token, uri: Pkcs11Uri, key_type: str, default_label: str) -> TokenKey:
    label = uri.object or default_label
    try:
        return token.key(label=label, id=uri.id)
    except ExchangedError as e:
        if e.code != "no-key" or uri.id is not None:
            raise
    return token.generate_keypair(label, key_type=key_type)


def cmd_request_submit(args: argparse.Namespace, stack: ExitStack) -> int:
    ca = _ca(stack, args)
    applicant = _operator(stack, args, "applicant") if args.applicant else None
    rid = ca.submit(_read(args.csr, "CSR"), args.profile, _form(args), applicant=applicant,
                    source=args.csr)
    _emit(args, {"id": rid, "status": "pending"}, lambda d: f"request {d['id']} submitted "
          "(pending review by a security officer)")
    return 0


def cmd_request_list(args: argparse.Namespace, stack: ExitStack) -> int:
    ca = _ca(stack, args)
    _emit(args, ca.requests(args.status), lambda r: _table(
        r, ["id", "status", "approvals", "profile", "name", "unit", "division", "post",
            "submitted_at", "cert_serial"]))
    return 0


def cmd_request_show(args: argparse.Namespace, stack: ExitStack) -> int:
    ca = _ca(stack, args)
    req = ca.request(args.id)
    _emit(args, req, lambda r: "\n".join(f"{k:16} {v}" for k, v in r.items()
                                         if k != "csr_pem") + "\n" + r["csr_pem"].rstrip())
    return 0


def cmd_request_approve(args: argparse.Namespace, stack: ExitStack) -> int:
    ca = _ca(stack, args)
    op = _operator(stack, args)
    left = ca.approve(args.id, op, args.reason or "")
    if left:
        print(f"request {args.id}: approved by {op.name}; under dual control it needs {left} "
              "more approval(s) by another security officer")
    else:
        print(f"request {args.id} approved by {op.name}")
    return 0


def cmd_request_reject(args: argparse.Namespace, stack: ExitStack) -> int:
    ca = _ca(stack, args)
    op = _operator(stack, args)
    ca.reject(args.id, op, args.reason)
    print(f"request {args.id} rejected by {op.name}: {args.reason}")
    return 0


def cmd_ca_issue(args: argparse.Namespace, stack: ExitStack) -> int:
    ca = _ca(stack, args)
    op = _operator(stack, args)
    cert = ca.issue(args.id, _ca_key(stack, args, ca), op)
    _write_out(args.out, cert.public_bytes(serialization.Encoding.PEM))
    print(f"issued {cert.subject.rfc4514_string()} serial {camod.serial_hex(cert.serial_number)}",
          file=sys.stderr if args.out in (None, "-") else sys.stdout)
    return 0


def cmd_ca_reissue(args: argparse.Namespace, stack: ExitStack) -> int:
    ca = _ca(stack, args)
    op = _operator(stack, args)
    rid = ca.reissue(args.serial, _read(args.csr, "CSR"), op, post=args.post,
                     division=args.division, reason=args.reason, source=args.csr)
    req = ca.request(rid)
    _emit(args, {"id": rid, "status": "pending", "approvals_needed": req["approvals_needed"],
                 "flags": req["flags"]},
          lambda d: f"re-issue request {rid} submitted by {op.name}: "
                    f"{d['approvals_needed']} other security officer(s) approve it "
                    f"(exchanged ca request approve {rid}), then it is issued (exchanged ca "
                    f"issue {rid}) and {camod.parse_serial(args.serial)} is revoked "
                    "(superseded)" + "".join(f"\n  flagged: {f}" for f in d["flags"]))
    return 0


def cmd_ca_status(args: argparse.Namespace, stack: ExitStack) -> int:
    ca = _ca(stack, args)
    op = _operator(stack, args)
    if args.action == "revoke":
        ca.revoke(args.serial, op, args.reason, args.note or "")
    else:
        getattr(ca, args.action)(args.serial, op, args.note or "")
    done = {"hold": "put on hold", "release": "released from hold",
            "revoke": f"revoked ({getattr(args, 'reason', '')})"}[args.action]
    print(f"certificate {camod.parse_serial(args.serial)} {done} by {op.name}; publish a new "
          "CRL (exchanged ca crl) for nodes to learn of it")
    return 0


def cmd_ca_crl(args: argparse.Namespace, stack: ExitStack) -> int:
    ca = _ca(stack, args)
    number, path = ca.make_crl(_ca_key(stack, args, ca), args.hours)
    if args.out:
        _write_out(args.out, path.read_bytes())
    print(f"CRL number {number} written to {path} and {ca.dir / camod.LATEST_CRL}")
    return 0


def cmd_ca_list(args: argparse.Namespace, stack: ExitStack) -> int:
    ca = _ca(stack, args)
    _emit(args, ca.certificates(args.status), lambda r: _table(
        r, ["serial", "status", "reason", "profile", "person", "subject", "not_after"]))
    return 0


def cmd_ca_show(args: argparse.Namespace, stack: ExitStack) -> int:
    ca = _ca(stack, args)
    _write_out(args.out, ca.certificate(args.serial).public_bytes(serialization.Encoding.PEM))
    return 0


# -- roles -----------------------------------------------------------------------------------

def _node_role(args: argparse.Namespace, stack: ExitStack, action: str, obj: str,
               cert: x509.Certificate | None = None, **extra: Any) -> dict[str, Any]:
    """A role change at a node: signed here, on the operator's token, and sent to the daemon,
    which checks the signature, the person and the rules (exchanged.roles) and applies it."""
    op = _operator(stack, args)
    return _ask(args, "role", **receipts.signed_request(
        op, action=action, obj=obj, node=_node_config(args).unit, grantee=cert, **extra))


def _person_cert(path: str) -> x509.Certificate:
    return _load_certs(path, "the person's certificate")[0]


def cmd_role_list(args: argparse.Namespace, stack: ExitStack) -> int:
    if args.config:
        items = _ask(args, "role-list", status=args.status)["items"]
    else:
        items = _ca(stack, args).roles.list(args.status)
    _emit(args, items, lambda r: _table(
        r, ["id", "role", "division", "status", "suspended", "person", "holder_subject",
            "granted_by", "reviewed_by"]))
    return 0


def cmd_role_grant(args: argparse.Namespace, stack: ExitStack) -> int:
    if args.config:
        cert = _person_cert(args.serial)
        rid = _node_role(args, stack, "role-grant", person_of(cert.subject), cert,
                         grant=args.role, division=args.division or "",
                         holder_serial=format(cert.serial_number, "x"))["id"]
        _emit(args, {"id": rid, "status": "pending"}, lambda d: f"role grant {d['id']} "
              f"({args.role}) is pending an auditor's review")
        return 0
    ca = _ca(stack, args)
    rid = ca.grant_role(_operator(stack, args), args.serial, args.role, args.division or "")
    _emit(args, {"id": rid, "status": "pending"}, lambda d: f"role grant {d['id']} "
          f"({args.role}) is pending an auditor's review")
    return 0


def cmd_role_review(args: argparse.Namespace, stack: ExitStack) -> int:
    if args.config:
        _node_role(args, stack, "role-approve" if args.approve else "role-refuse",
                   str(args.id), reason=args.reason or "")
        print(f"role grant {args.id} {'approved' if args.approve else 'refused'}")
        return 0
    ca = _ca(stack, args)
    op = _operator(stack, args)
    ca.review_role(op, args.id, args.approve, args.reason or "")
    print(f"role grant {args.id} {'approved' if args.approve else 'refused'} by {op.name}")
    return 0


def cmd_role_revoke(args: argparse.Namespace, stack: ExitStack) -> int:
    if args.config:
        _node_role(args, stack, "role-revoke", str(args.id), reason=args.reason)
        print(f"role {args.id} revoked")
        return 0
    ca = _ca(stack, args)
    op = _operator(stack, args)
    ca.revoke_role(op, args.id, args.reason)
    print(f"role {args.id} revoked by {op.name}")
    return 0


def cmd_role_suspend(args: argparse.Namespace, stack: ExitStack) -> int:
    if args.config:
        person = person_of(_person_cert(args.serial).subject)
        _node_role(args, stack, f"person-{args.action}", person, reason=args.reason)
        print(f"{person}: rights {'suspended' if args.action == 'suspend' else 'restored'}")
        return 0
    ca = _ca(stack, args)
    op = _operator(stack, args)
    person = ca.suspend_person(op, args.serial, args.reason, resume=args.action == "resume")
    print(f"{person}: rights {'suspended' if args.action == 'suspend' else 'restored'} by "
          f"{op.name}")
    return 0


# -- audit -----------------------------------------------------------------------------------

def _audit_query(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k, None) for k in camod.AUDIT_FILTERS if getattr(args, k, None)}


def _node_audit(args: argparse.Namespace, stack: ExitStack, action: str,
                **extra: Any) -> dict[str, Any]:
    """The node's audit log, for its auditors: the request signed here on their token."""
    op = _operator(stack, args)  # the filters apart: "action", "actor" name the request's own
    return _ask(args, "act", **receipts.signed_request(
        op, action=action, obj="", node=_node_config(args).unit, limit=args.limit,
        filters=_audit_query(args), **extra))


def cmd_audit_show(args: argparse.Namespace, stack: ExitStack) -> int:
    if args.config:
        found = _node_audit(args, stack, "audit-show")["items"]
    else:
        ca = _ca(stack, args)
        ca.audit_access(_operator(stack, args), "audit-show", _audit_query(args))
        found = ca.audit_rows(_audit_query(args), args.limit)
        for r in found:
            r["signed"] = r.pop("signature") is not None
    _emit(args, found, lambda r: _table(r, ["seq", "at", "action", "object", "outcome", "role",
                                            "actor_subject", "signed"]))
    return 0


def cmd_audit_verify(args: argparse.Namespace, stack: ExitStack) -> int:
    trusted = _load_certs(args.ca, "CA certificate")[0] if args.ca else None
    copies = [Path(p) for p in args.checkpoints or ()]
    for p in copies:
        if not p.is_file():
            raise UsageError(f"no checkpoint copy at {p}")
    if args.bundle and (Path(args.bundle) / "archive.json").exists():
        findings = archive.verify(Path(args.bundle), trusted)
        data = {"ok": not findings, "findings": [str(f) for f in findings]}
        _emit(args, data, lambda d: "\n".join(
            [f"{args.bundle}: an archive; its signed list, files, packages, signatures and "
             "evidence bundle checked"] + [f"  {f}" for f in d["findings"]]
            + ([f"{args.bundle}: OK"] if d["ok"] else [])))
        if findings:
            raise ExchangedError(f"{args.bundle}: the archive was tampered with: {findings[0]}",
                                 code="tampered")
        return 0
    if args.bundle:
        report = evidence.verify(Path(args.bundle), trusted)
        where = args.bundle
    elif args.node_config:
        # A node's log, checked against the node certificate whose token signs its
        # checkpoints. Read-only, beside the running daemon (WAL readers do not block it).
        cfg = _node_config(argparse.Namespace(config=args.node_config))
        signer = trusted or x509.load_pem_x509_certificates(cfg.cert.read_bytes())[0]
        issuer = _load_certs(str(cfg.ca[0]), "CA certificate")[0]
        report = nodedb.verify_log(cfg.data_dir, signer, issuer, copies)
        where = str(cfg.data_dir / nodedb.DB_NAME)
    else:
        ca = _ca(stack, args)
        ca.audit_access(_operator(stack, args), "audit-verify", _audit_query(args))
        report = ca.verify_audit(trusted, copies)
        where = str(ca.dir / camod.DB)
    data = {"ok": report.ok, "entries": report.entries, "checkpoints": report.checkpoints,
            "last_checkpoint": report.last_checkpoint,
            "findings": [str(f) for f in report.findings]}
    _emit(args, data, lambda d: "\n".join(
        [f"{where}: {d['entries']} entries, {d['checkpoints']} checkpoints, last signed "
         f"checkpoint at entry {d['last_checkpoint']}"] + [f"  {f}" for f in d["findings"]]
        + ([f"{where}: OK"] if d["ok"] else [])))
    if not report.ok:
        raise ExchangedError(f"{where}: the audit log was tampered with: "
                             f"{report.findings[0]}", code="tampered")
    return 0


def cmd_audit_export(args: argparse.Namespace, stack: ExitStack) -> int:
    if args.config:
        answer = _node_audit(args, stack, "audit-export", out=str(Path(args.out).resolve()))
        print(f"evidence bundle {args.out}: {answer['entries']} entries of the matter; check it "
              f"with `exchanged audit verify {args.out}`")
        return 0
    ca = _ca(stack, args)
    ca.audit_access(_operator(stack, args), "audit-export", _audit_query(args))
    manifest = ca.export_evidence(_audit_query(args), Path(args.out), args.limit)
    print(f"evidence bundle {args.out}: {len(manifest['matter'])} entries of the matter, up "
          f"to checkpoint {manifest['checkpoint']}; check it with `exchanged audit verify "
          f"{args.out}`")
    return 0


def cmd_audit_witnessed(args: argparse.Namespace, stack: ExitStack) -> int:
    """The checkpoints this node keeps for a peer it witnesses (one record a line)."""
    records = _ask(args, "witnessed", unit=args.unit)["records"]
    _write_out(args.out, "".join(records).encode())
    if args.out not in (None, "-"):
        print(f"{len(records)} checkpoint(s) of {args.unit} written to {args.out}; compare "
              f"them with its log: exchanged audit verify --node-config ... --checkpoints "
              f"{args.out}")
    return 0


def cmd_audit_checkpoint(args: argparse.Namespace, stack: ExitStack) -> int:
    ca = _ca(stack, args)
    seq = ca.checkpoint(_ca_key(stack, args, ca))
    print(f"checkpoint signed at entry {seq}")
    return 0


# -- cert verify -----------------------------------------------------------------------------

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", re.DOTALL)


def _read_certs(path: str, what: str, first_required: bool = False
                ) -> tuple[list[x509.Certificate], list[str]]:
    """The certificates of a file (PEM blocks or one DER), and why those that cryptography
    cannot parse are refused (exchanged.pki.path.unreadable_reason)."""
    from exchanged.pki.path import unreadable_reason
    data = _read(path, what)
    if b"-----BEGIN" in data:
        ders = [base64.b64decode(b) for b in _PEM_CERT.findall(data)]
        if not ders:
            raise ExchangedError(f"{what} {path} holds no CERTIFICATE PEM block",
                                 code="bad-cert")
    else:
        ders = [data]
    certs: list[x509.Certificate] = []
    problems: list[str] = []
    for i, der in enumerate(ders, 1):
        try:
            certs.append(x509.load_der_x509_certificate(der))
        except ValueError as e:
            where = path if len(ders) == 1 else f"{path} #{i}"
            problems.append(f"{what} {where}: {unreadable_reason(der, str(e))}")
            if i == 1 and first_required:
                raise ExchangedError(f"{problems[0]}; not validated", code="bad-cert") from None
    return certs, problems


def cmd_cert_verify(args: argparse.Namespace, stack: ExitStack) -> int:
    from exchanged.pki import verify

    (leaf, *extra), problems = _read_certs(args.cert, "certificate", first_required=True)
    trusted = [c for p in args.ca for c in _load_certs(p, "CA certificate")]
    untrusted = list(extra)
    for p in args.untrusted or ():
        more, why = _read_certs(p, "intermediate certificate")
        untrusted += more
        problems += why  # unreadable intermediates are left out of the search, and said so
    crls = verify.CrlSet.load(args.crl or ())
    at = _parse_time(args.at) if args.at else None
    try:
        chain = verify.validate(leaf, trusted=trusted, untrusted=untrusted, crls=crls, at=at,
                                purpose=args.purpose, check_revocation=not args.no_crl_check)
    except verify.ValidationError as e:
        if not problems:
            raise
        raise verify.ValidationError(e.code, f"{e} (left out, unreadable: "
                                     f"{'; '.join(problems)})", certificate=e.certificate,
                                     crl_reason=e.crl_reason) from None
    _emit(args, {"ok": True, "chain": [c.subject.rfc4514_string() for c in chain]},
          lambda d: f"{args.cert}: OK ({' <- '.join(d['chain'])})")
    return 0


def cmd_config_check(args: argparse.Namespace, stack: ExitStack) -> int:
    """Check a node configuration without the daemon; exit 1 if anything is a problem."""
    from exchanged.node import check
    findings = check.check_config(args.file)
    _emit(args, [f.as_dict() for f in findings], lambda _: check.text(findings))
    return 1 if check.has_problems(findings) else 0


# -- the node: serve, send, outbox, inbox -----------------------------------------------------

def _node_config(args: argparse.Namespace) -> Config:
    return Config.load(args.config)


def _ask(args: argparse.Namespace, cmd: str, **kw: Any) -> dict[str, Any]:
    return client.request(_node_config(args).socket_path, cmd, **kw)


def cmd_serve(args: argparse.Namespace, stack: ExitStack) -> int:
    from exchanged.node import service  # trio and the TLS bridge: only the daemon needs them
    return service.run(_node_config(args))


def cmd_send(args: argparse.Namespace, stack: ExitStack) -> int:
    import threading
    import time
    done = threading.Event()

    def progress() -> None:  # only when a send takes more than a moment, only on a terminal
        start = time.monotonic()
        frames = "|/-\\"
        i = 0
        while not done.wait(0.2):
            if time.monotonic() - start > 0.5:
                print(f"\rsigning and storing the package {frames[i % 4]} "
                      f"{time.monotonic() - start:5.1f}s", end="", file=sys.stderr, flush=True)
                i += 1
        if i:
            print("\r" + " " * 50 + "\r", end="", file=sys.stderr, flush=True)

    if sys.stderr.isatty():
        threading.Thread(target=progress, daemon=True).start()
    try:
        answer = _ask(args, "send", to=args.to, title=args.title,
                      pdf=str(Path(args.pdf).resolve()),
                      editable=str(Path(args.editable).resolve()), urgency=args.urgency,
                      classification=args.classification, number=args.number,
                      deadline=args.deadline, paper_original=args.paper_original,
                      doc_id=args.id, phoned=args.phoned, division=args.division,
                      corrects=args.corrects)
    finally:
        done.set()
    _emit(args, answer, lambda d: f"queued {d['doc_id']} for {args.to} ({d['size']:,} bytes, "
          f"sha256 {d['sha256'][:16]}...)" + (f", number {d['number']}" if d['number'] else ""))
    return 0


def _when(v: Any) -> Any:
    if isinstance(v, int | float):
        return dt.datetime.fromtimestamp(v, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    return v


def _readable(item: dict[str, Any]) -> str:
    """An outbox/inbox entry for people: times in UTC, receipts by size, metadata spread out."""
    lines = []
    for k, v in item.items():
        if k == "metadata" and isinstance(v, dict):
            lines += [f"  {mk:16} {mv}" for mk, mv in v.items()]
            continue
        if isinstance(v, list):  # receipts, copies, custody: one line each
            lines.append(f"{k:18} {len(v)}")
            for e in v:
                shown = {ek: _when(ev) if ek.endswith("at") else ev for ek, ev in e.items()
                         if ek != "receipt"} if isinstance(e, dict) else f"{str(e)[:40]}..."
                lines.append(f"  {shown}")
            continue
        if k.endswith("_at") and isinstance(v, int | float):
            v = _when(v)
        elif k.endswith("receipt") and isinstance(v, str):
            v = f"signed receipt, {len(v) * 3 // 4:,} bytes (--json for the CMS)"
        lines.append(f"{k:18} {v if v is not None else ''}")
    return "\n".join(lines)


def cmd_outbox(args: argparse.Namespace, stack: ExitStack) -> int:
    if args.id:
        item = _ask(args, "outbox-show", doc_id=args.id)["item"]
        _emit(args, item, _readable)
        return 0
    items = _ask(args, "outbox", state=args.state)["items"]
    _emit(args, items, lambda r: _table(r, ["doc_id", "recipient", "state", "attempts",
                                            "last_error"]))
    return 0


def cmd_inbox(args: argparse.Namespace, stack: ExitStack) -> int:
    items = _ask(args, "inbox", state=args.state, division=args.division)["items"]
    for r in items:  # what a reader of the box wants at a glance
        meta = r.get("metadata") or {}
        r["title"] = meta.get("title", "")
        r["urgency"] = meta.get("urgency", "")
        r["paper"] = ("received" if r.get("paper_received_at") else "awaited") \
            if meta.get("paper_original") else ""
        if r.get("copy_state"):
            r["state"] = f"copy {r['copy_state']}"
    _emit(args, items, lambda r: _table(r, ["doc_id", "sender", "state", "box", "urgency",
                                            "register_number", "paper", "title"]))
    return 0


def _box_act(args: argparse.Namespace, stack: ExitStack, action: str,
             **extra: Any) -> dict[str, Any]:
    """An act on the exchange box, signed here on the operator's token and sent to the daemon
    (which checks the person, the role and the rules, and records it)."""
    op = _operator(stack, args)
    return _ask(args, "act", **receipts.signed_request(
        op, action=action, obj=args.id, node=_node_config(args).unit, **extra))


def cmd_inbox_register(args: argparse.Namespace, stack: ExitStack) -> int:
    answer = _box_act(args, stack, "document-register")
    _emit(args, answer, lambda d: f"{args.id} registered as {d['number']}")
    return 0


def cmd_inbox_distribute(args: argparse.Namespace, stack: ExitStack) -> int:
    answer = _box_act(args, stack, "document-distribute", divisions=args.division)
    _emit(args, answer, lambda d: f"{args.id} distributed to {', '.join(d['divisions'])}: each "
          "division's receiver signs for its copy (exchanged inbox sign-for ID --division D)")
    return 0


def cmd_inbox_forward(args: argparse.Namespace, stack: ExitStack) -> int:
    if args.to_registrar:
        answer = _box_act(args, stack, "document-to-registrar")
        _emit(args, answer, lambda d: f"{args.id} passed to the archives section (the unit's "
              "box) for registration")
        return 0
    item = _ask(args, "inbox-show", doc_id=args.id)["item"]
    answer = _box_act(args, stack, "document-forward", to=args.to, note=args.note or "",
                      sha256=item["package_sha256"], origin=item["origin"],
                      origin_signer=item["signer_sha256"])
    _emit(args, answer, lambda d: f"{args.id} forwarded to {d['to']}, the original package "
          "with its custody record")
    return 0


def cmd_inbox_return(args: argparse.Namespace, stack: ExitStack) -> int:
    import base64
    if not args.reason.strip():
        raise UsageError("a return needs a reason the sender can act on")
    item = _ask(args, "inbox-show", doc_id=args.id)["item"]
    notice = receipts.return_notice(_operator(stack, args), doc_id=args.id,
                                    sha256=item["package_sha256"], sender=item["sender"],
                                    recipient=_node_config(args).unit, reason=args.reason)
    answer = _ask(args, "return", doc_id=args.id, notice=base64.b64encode(notice).decode())
    _emit(args, answer, lambda d: f"{args.id} returned to {item['sender']} by {d['by']}: "
          f"{d['reason']}")
    return 0


def cmd_inbox_paper(args: argparse.Namespace, stack: ExitStack) -> int:
    answer = _box_act(args, stack, "document-paper-received")
    _emit(args, answer, lambda d: f"{args.id}: the paper original is recorded as received")
    return 0


def cmd_archive_export(args: argparse.Namespace, stack: ExitStack) -> int:
    """Finished documents with their evidence (A24), by the archives section or an auditor."""
    op = _operator(stack, args)
    for t in (args.since, args.until):
        if t:
            _parse_time(t)
    out = str(Path(args.dir).resolve())
    answer = _ask(args, "act", **receipts.signed_request(
        op, action="archive-export", obj=out, node=_node_config(args).unit, since=args.since,
        until=args.until, division=args.division))
    _emit(args, answer, lambda d: f"{len(d['documents'])} finished document(s) archived in "
          f"{d['dir']}; check it with `exchanged audit verify {d['dir']}` (and openssl: "
          "VERIFY.txt there)")
    return 0


def cmd_reload(args: argparse.Namespace, stack: ExitStack) -> int:
    """What SIGHUP does (systemctl reload exchanged), with the answer: what changed."""
    answer = _ask(args, "reload")
    _emit(args, answer, lambda d: "\n".join(
        [f"changed: {c}" for c in d["changed"]] + [f"NOT applied: {r}" for r in d["refused"]]
        or ["nothing changed"]))
    return 1 if answer["refused"] else 0


def cmd_renew(args: argparse.Namespace, stack: ExitStack) -> int:
    """A new key on the node's token and a CSR for it (by the node's administrator); or,
    with --install, the issued certificate put in place and taken into use."""
    if args.install:
        return _install_cert(args)
    if not args.operator:
        raise ExchangedError("renew needs --operator (the node's administrator signs the "
                             "request), or --install CERT", code="usage")
    op = _operator(stack, args)
    config = _node_config(args)
    answer = _ask(args, "act", **receipts.signed_request(
        op, action="node-renew", obj=args.label or "", node=config.unit))
    _write_out(args.out, answer["csr"].encode())
    where = args.out if args.out not in (None, "-") else "stdout"
    print(f"new key {answer['key']} made on the node's token; its CSR ({answer['subject']}) "
          f"is on {where}.\nThe node goes on with its current certificate (valid until "
          f"{answer['current_not_after']}). Next: submit the CSR to the CA (exchanged ca "
          "request submit --profile node ...), have it approved and issued, then `exchanged "
          f"renew --install CERT --config {args.config}`.", file=sys.stderr)
    return 0


def _install_cert(args: argparse.Namespace) -> int:
    """Replace the configured certificate file (intermediates kept) with the issued one and
    ask the daemon to take it; if the daemon refuses it, the old file is put back."""
    from exchanged.store.files import write_atomic
    config = _node_config(args)
    data = Path(args.install).read_bytes()
    try:
        new = (x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data
               else x509.load_der_x509_certificate(data))
    except ValueError as e:
        raise ExchangedError(f"{args.install} is not a certificate: {e}", code="bad-cert") \
            from None
    old_bytes = config.cert.read_bytes()
    old_chain = x509.load_pem_x509_certificates(old_bytes)
    if (common_name(new), organization(new)) != (common_name(old_chain[0]),
                                                 organization(old_chain[0])):
        raise ExchangedError(f"{args.install} is for {new.subject.rfc4514_string()}, not for "
                             f"this node ({old_chain[0].subject.rfc4514_string()})",
                             code="wrong-identity")
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in [new, *old_chain[1:]])
    saved = config.cert.with_name(f"{config.cert.name}.{old_chain[0].serial_number:x}.old")
    write_atomic(saved, old_bytes)
    write_atomic(config.cert, pem)
    try:
        answer = _ask(args, "reload")
    except ExchangedError as e:
        write_atomic(config.cert, old_bytes)
        raise ExchangedError(f"the daemon did not take the new certificate ({e}); "
                             f"{config.cert} is as it was", code=e.code) from None
    changed = [c for c in answer["changed"] if c.startswith("node certificate")]
    _emit(args, answer, lambda d: (changed[0] if changed else "the daemon reports no change "
                                   "of certificate") + f"; the old one is kept in {saved}")
    return 0


def cmd_backup(args: argparse.Namespace, stack: ExitStack) -> int:
    """A consistent backup of the running node, by its administrator: the act is signed here
    on their token; the daemon writes the backup (exchanged.node.backup)."""
    op = _operator(stack, args)
    out = str(Path(args.dir).resolve())
    answer = _ask(args, "act", **receipts.signed_request(
        op, action="node-backup", obj=out, node=_node_config(args).unit))
    _emit(args, answer, lambda d: f"backup written to {d['dir']}: {d['documents']['outbox']} "
          f"sent and {d['documents']['inbox']} received document(s), {d['blobs']} package(s), "
          f"{d['bytes']:,} bytes, the audit log up to entry {d['audit']['head_seq']}; its list "
          f"is signed by the node (VERIFY.txt there); restore it, the daemon stopped, with "
          f"`exchanged restore {d['dir']}`")
    return 0


def cmd_restore(args: argparse.Namespace, stack: ExitStack) -> int:
    """Install a backup as the node's store, offline (the daemon stopped); everything is
    checked before anything is installed."""
    from exchanged.node import backup
    cfg = _node_config(args)
    done = backup.restore(Path(args.dir).resolve(), cfg, force=args.force)

    def text(d: dict[str, Any]) -> str:
        states = [f"  {box:6} " + (", ".join(f"{n} {s}" for s, n in d[box].items() if n)
                                   or "empty") for box in ("outbox", "inbox")]
        lines = [f"restored {d['data_dir']} from {d['from']} (the backup of {d['created']}, "
                 f"by {d['by']})",
                 f"  documents: {d['documents']['outbox']} sent, {d['documents']['inbox']} "
                 f"received; {d['blobs']} package(s), {d['blob_bytes']:,} bytes", *states,
                 f"  audit log: head at entry {d['audit']['head_seq']} "
                 f"({d['audit']['head_hash'][:16]}...), checked; the restore recorded as entry "
                 f"{d['audit']['restore_entry']}"]
        if d["moved_aside"]:
            lines.append(f"  the store that was there is in {d['moved_aside']}")
        lines.append("start the daemon: what was queued or in flight at the backup is sent "
                     "again (a recipient that has it already acknowledges it once)")
        if d["witness"]:
            lines.append(f"note: the witness {d['witness']} holds checkpoints this store never "
                         "had if the log went on after the backup; it will report this log as "
                         "cut back (witness-conflict), which is what a restore is")
        return "\n".join(lines)

    _emit(args, done, text)
    return 0


def cmd_status(args: argparse.Namespace, stack: ExitStack) -> int:
    """The running node's state; exit 0 if all is well, 1 if something needs attention, 3 if
    the daemon does not answer."""
    try:
        answer = _ask(args, "status")
    except ExchangedError as e:
        if e.code != "no-daemon":
            raise
        _emit(args, {"up": False, "error": str(e)}, lambda d: f"not running: {d['error']}")
        return 3
    _emit(args, answer, _status_text)
    return 1 if answer["problems"] else 0


def _status_text(d: dict[str, Any]) -> str:
    cert, disk, audit = d["certificate"], d["disk"], d["audit"]
    lines = [f"{d['unit']}: up since {d['started']} (pid {d['pid']}, exchanged {d['version']}), "
             f"listening on {d['listen']}",
             f"  certificate  {cert['serial']} valid until {cert['not_after']} "
             f"({cert['days_left']} days)",
             f"  token        {'present' if d['token']['present'] else 'MISSING'} "
             f"({d['token']['uri']})",
             f"  disk         {disk['free_bytes'] / 2**30:.1f} GiB free (reserve "
             f"{disk['reserve_bytes'] / 2**20:.0f} MiB)",
             f"  audit        head entry {audit['seq']} ({audit['hash'][:16]}...)"]
    for c in d["crls"]:
        if c["number"] is None:
            lines.append(f"  CRL          none held for {c['ca']}")
        else:
            age = c["age_seconds"] / 3600
            lines.append(f"  CRL          number {c['number']} of {c['ca']}: {age:.1f} h old, "
                         f"next update {c['next_update']}{' (STALE)' if c['stale'] else ''}")
    taken = d.get("crl_taken") or {}
    if taken:
        lines.append(f"  CRL taken    number {taken['number']} from {taken['source']} at "
                     f"{taken['time']}")
    fetch = d.get("crl_fetch") or {}
    lines.append(f"  CRL source   {d.get('crl_url') or '(no publication point)'}"
                 + (f"; last fetch {fetch['time']}: "
                    f"{'ok' if fetch.get('ok') else fetch.get('error')}" if fetch else ""))
    oldest = d.get("oldest_queued")
    if oldest:
        lines.append(f"  oldest queued document {oldest['doc_id']} for {oldest['unit']}, "
                     f"{oldest['seconds']} s")
    lines.append("  peers:")
    lines.append("    " + _table(d["peers"], ["unit", "address", "connections", "queued",
                                               "receipts_owed", "last_success", "last_error"]
                                  ).replace("\n", "\n    "))
    if d["persons"]:
        lines.append("  persons' certificates:")
        lines.append("    " + _table(d["persons"], ["person", "serial", "not_after", "days_left"]
                                      ).replace("\n", "\n    "))
    if d["problems"]:
        lines.append("problems:")
        lines += [f"  - {p}" for p in d["problems"]]
    else:
        lines.append("no problems")
    return "\n".join(lines)


def cmd_crl_fetch(args: argparse.Namespace, stack: ExitStack) -> int:
    answer = _ask(args, "crl-fetch")
    _emit(args, answer, lambda d: f"CRL number {d['number']} held ("
          f"{'newly taken' if d['installed'] else 'no newer one'}) from {d['url']}")
    return 0


def cmd_crl_install(args: argparse.Namespace, stack: ExitStack) -> int:
    data = Path(args.file).read_bytes()
    answer = _ask(args, "crl-install", crl=base64.b64encode(data).decode(),
                  file=str(Path(args.file).resolve()))
    numbers = ", ".join(str(c["number"]) for c in answer["crls"])
    _emit(args, answer, lambda d: ("installed" if d["installed"] else "no newer than the CRL "
                                   "held; nothing changed") + f" (CRL number held: {numbers})")
    return 0


def cmd_ca_serve(args: argparse.Namespace, stack: ExitStack) -> int:
    """The CA's publication point: its ca.crl, crl/N.crl and ca.pem over plain HTTP."""
    import logging

    import trio

    from exchanged.node.config import parse_address
    from exchanged.transport import publish
    ca_dir = Path(args.dir).resolve()
    if not (ca_dir / "ca.pem").is_file():
        raise ExchangedError(f"{ca_dir} is not a CA directory (no ca.pem)", code="usage")
    host, port = parse_address(args.listen)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    async def run() -> None:
        async with trio.open_nursery() as n:
            bound = await n.start(publish.serve, ca_dir, host, port)
            logging.getLogger("exchanged").info(
                "publishing %s at http://%s:%d/ca.crl (and /crl/N.crl, /ca.pem)", ca_dir, host,
                bound)

    try:
        trio.run(run)
    except KeyboardInterrupt:
        pass
    return 0


def cmd_due(args: argparse.Namespace, stack: ExitStack) -> int:
    items = _ask(args, "due", division=args.division)["items"]
    _emit(args, items, lambda r: _table(r, ["status", "doc_id", "urgency", "deadline", "box",
                                            "waiting_for", "sender", "title"]))
    return 0


def cmd_inbox_show(args: argparse.Namespace, stack: ExitStack) -> int:
    item = _ask(args, "inbox-show", doc_id=args.id)["item"]
    _emit(args, item, _readable)
    return 0


def cmd_inbox_sign_for(args: argparse.Namespace, stack: ExitStack) -> int:
    """The designated receiver signs for a document with their personal token."""
    import base64
    cfg = _node_config(args)
    item = _ask(args, "inbox-show", doc_id=args.id)["item"]
    receipt = receipts.signed_for(_operator(stack, args), doc_id=args.id,
                                  sha256=item["package_sha256"], sender=item["sender"],
                                  recipient=cfg.unit, division=args.division or "")
    answer = _ask(args, "sign-for", doc_id=args.id, division=args.division or "",
                  receipt=base64.b64encode(receipt).decode())
    _emit(args, answer, lambda d: f"{args.id} signed for by {d['by']} ({d['role']}"
          f"{', ' + d['division'] + ' copy' if d['division'] else ''}); the receipt goes back "
          f"to {item['sender']}")
    return 0


def cmd_inbox_export(args: argparse.Namespace, stack: ExitStack) -> int:
    answer = _ask(args, "export", doc_id=args.id, dir=str(Path(args.dir).resolve()))
    _emit(args, answer, lambda d: f"{args.id} exported to {d['dir']}: {', '.join(d['files'])}")
    return 0


# -- the parser ------------------------------------------------------------------------------

def _add_pin(p: argparse.ArgumentParser, role: str) -> None:
    dest, env, name = PIN_ROLES[role]
    flag = "--" + dest.replace("_", "-")
    p.add_argument(flag, dest=dest, metavar="FILE",
                   help=f"file holding the {name} token's PIN (else ${env}, else a prompt)")


def _add_form(p: argparse.ArgumentParser, *, reason: bool = True) -> None:
    p.add_argument("--profile", required=True, choices=profiles.PROFILES)
    p.add_argument("--name", required=True, help="person's name, or the node's name")
    p.add_argument("--unit", required=True, help="the unit (office, department)")
    p.add_argument("--division", help="division within the unit (required for a person)")
    p.add_argument("--post", help="the person's post")
    if reason:
        p.add_argument("--reason", help="why the certificate is needed")
    p.add_argument("--dns", action="append", help="DNS name for a node (repeatable)")
    p.add_argument("--ip", action="append", help="IP address for a node (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="exchanged", description=__doc__.splitlines()[0])
    top.add_argument("--version", action="version", version=f"exchanged {__version__}")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(parent: Any, name: str, handler: Handler, help: str,
            **kw: Any) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help, description=help, **kw)
        p.set_defaults(handler=handler)
        return p

    def module(p: argparse.ArgumentParser) -> None:
        p.add_argument("--module", help="PKCS#11 module path (default: $EXCHANGED_PKCS11_MODULE "
                                        "or SoftHSM)")

    def ca_dir(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dir", default=os.environ.get("EXCHANGED_CA_DIR", "."),
                       help="the CA directory (default: $EXCHANGED_CA_DIR or .)")

    def json_opt(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="print JSON")

    # token
    tok = sub.add_parser("token", help="PKCS#11 tokens: list, keygen, import-cert")
    tsub = tok.add_subparsers(dest="sub", required=True, metavar="SUBCOMMAND")
    p = cmd(tsub, "list", cmd_token_list, "list tokens, or the objects on one token")
    p.add_argument("uri", nargs="?", help="pkcs11: URI of a token to list the objects of")
    module(p); _add_pin(p, "token"); json_opt(p)  # noqa: E702
    p = cmd(tsub, "keygen", cmd_token_keygen,
            "generate a key pair on a token (sensitive, never extractable)")
    p.add_argument("uri", help="pkcs11:token=NAME;object=LABEL")
    p.add_argument("--type", choices=("ec", "rsa"), default="ec", help="EC P-256 (default) "
                   "or RSA")
    p.add_argument("--bits", type=int, default=3072, help="RSA size (default 3072)")
    module(p); _add_pin(p, "token"); json_opt(p)  # noqa: E702
    p = cmd(tsub, "import-cert", cmd_token_import_cert,
            "store a certificate on the token beside its private key")
    p.add_argument("uri", help="pkcs11: URI of the token (object= sets the label)")
    p.add_argument("cert", help="certificate file (PEM or DER)")
    module(p); _add_pin(p, "token")  # noqa: E702

    # csr
    p = cmd(sub, "csr", cmd_csr, "make a PKCS#10 request signed by a key on a token")
    p.add_argument("uri", help="pkcs11: URI of the key")
    _add_form(p, reason=False)
    p.add_argument("--out", "-o", help="output file (default: stdout)")
    module(p); _add_pin(p, "token")  # noqa: E702

    # ca
    ca = sub.add_parser("ca", help="the certificate authority")
    csub = ca.add_subparsers(dest="sub", required=True, metavar="SUBCOMMAND")
    p = cmd(csub, "init", cmd_ca_init, "create the CA and issue the first security officer's "
            "certificate onto the officer's token")
    ca_dir(p)
    p.add_argument("--key", required=True, help="pkcs11: URI of the CA key (made if absent)")
    p.add_argument("--key-type", choices=("ec", "rsa"), default="ec")
    p.add_argument("--name", required=True, help="the CA's common name")
    p.add_argument("--org", help="the CA's organisation")
    p.add_argument("--days", type=int, default=7300, help="CA certificate validity")
    p.add_argument("--crl-url", help="CRL distribution point put into issued certificates")
    p.add_argument("--crl-hours", type=int, default=168, help="CRL validity (nextUpdate)")
    p.add_argument("--cert-days", type=int, default=730, help="issued certificates' validity")
    p.add_argument("--unit", required=True, help="the unit the first three people belong to")
    for prefix, role in (("admin", "administrator"), ("officer", "security officer"),
                         ("auditor", "auditor")):
        p.add_argument(f"--{prefix}", required=True,
                       help=f"pkcs11: URI of the first {role}'s key on their own token "
                            "(made if absent)")
        p.add_argument(f"--{prefix}-name", required=True, help=f"the {role}'s name")
        p.add_argument(f"--{prefix}-division", required=True)
        p.add_argument(f"--{prefix}-pin-file", metavar="FILE",
                       help=f"the {role}'s PIN file (else $EXCHANGED_{prefix.upper()}_PIN)")
    module(p); _add_pin(p, "ca")  # noqa: E702

    req = csub.add_parser("request", help="issuance requests: submit, list, show, approve, "
                                          "reject")
    rsub = req.add_subparsers(dest="subsub", required=True, metavar="SUBCOMMAND")
    p = cmd(rsub, "submit", cmd_request_submit, "submit a CSR with the application form")
    ca_dir(p)
    p.add_argument("--csr", required=True, help="the CSR file (PEM or DER)")
    _add_form(p)
    p.add_argument("--applicant", help="pkcs11: URI of the applicant's own officer key, to sign "
                                       "the submission")
    _add_pin(p, "operator"); json_opt(p)  # noqa: E702
    p = cmd(rsub, "list", cmd_request_list, "list requests")
    ca_dir(p)
    p.add_argument("--status", choices=("pending", "approved", "rejected", "issued"))
    json_opt(p)
    p = cmd(rsub, "show", cmd_request_show, "show one request")
    ca_dir(p); p.add_argument("id", type=int); json_opt(p)  # noqa: E702
    for name, handler, helptext in (("approve", cmd_request_approve, "approve a request"),
                                    ("reject", cmd_request_reject, "reject a request")):
        p = cmd(rsub, name, handler, helptext + " (signed on the officer's token)")
        ca_dir(p)
        p.add_argument("id", type=int)
        p.add_argument("--operator", required=True, help="pkcs11: URI of your officer key")
        p.add_argument("--reason", required=(name == "reject"))
        _add_pin(p, "operator")

    p = cmd(csub, "issue", cmd_ca_issue, "issue the certificate of an approved request")
    ca_dir(p)
    p.add_argument("id", type=int)
    p.add_argument("--operator", required=True, help="pkcs11: URI of your officer key")
    p.add_argument("--out", "-o", help="write the certificate here (default: stdout)")
    _add_pin(p, "ca"); _add_pin(p, "operator")  # noqa: E702

    p = cmd(csub, "reissue", cmd_ca_reissue, "request a new certificate for the same person "
            "on a change of post (A29); another officer approves it, then it is issued and "
            "the old certificate revoked as superseded")
    ca_dir(p)
    p.add_argument("serial")
    p.add_argument("--csr", required=True, help="CSR for the new certificate")
    p.add_argument("--post"); p.add_argument("--division")  # noqa: E702
    p.add_argument("--reason", default="change of post")
    p.add_argument("--operator", required=True, help="pkcs11: URI of your officer key")
    _add_pin(p, "operator"); json_opt(p)  # noqa: E702

    for action, helptext in (("hold", "suspend a certificate (certificateHold)"),
                             ("release", "release a held certificate"),
                             ("revoke", "revoke a certificate, for good")):
        p = cmd(csub, action, cmd_ca_status, helptext)
        p.set_defaults(action=action)
        ca_dir(p)
        p.add_argument("serial", help="certificate serial (hex)")
        if action == "revoke":
            p.add_argument("--reason", required=True, choices=camod.REVOKE_REASONS,
                           metavar="REASON", help="RFC 5280 reason: " +
                           ", ".join(r for r in REASONS if r in camod.REVOKE_REASONS))
        p.add_argument("--note", help="free text kept with the signed action")
        p.add_argument("--operator", required=True, help="pkcs11: URI of your officer key")
        _add_pin(p, "operator")

    p = cmd(csub, "crl", cmd_ca_crl, "sign and publish a new CRL")
    ca_dir(p)
    p.add_argument("--hours", type=int, help="validity (default from ca.toml)")
    p.add_argument("--out", "-o", help="also copy the CRL (DER) here")
    _add_pin(p, "ca")

    p = cmd(csub, "serve", cmd_ca_serve, "the CA's publication point: serve ca.crl, crl/N.crl "
            "and ca.pem of the CA directory over plain HTTP (read-only; any web server "
            "serving those files does as well)")
    ca_dir(p)
    p.add_argument("--listen", default="127.0.0.1:8090", help="HOST:PORT (default "
                   "127.0.0.1:8090); the URL given to ca init --crl-url must reach it")
    p = cmd(csub, "list", cmd_ca_list, "list issued certificates")
    ca_dir(p)
    p.add_argument("--status", choices=("good", "held", "revoked"))
    json_opt(p)
    p = cmd(csub, "show", cmd_ca_show, "print an issued certificate (PEM)")
    ca_dir(p); p.add_argument("serial"); p.add_argument("--out", "-o")  # noqa: E702

    # role
    def role_node(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="act on a node's roles (its configuration file) "
                                        "instead of the CA's")

    roles = sub.add_parser("role", help="roles: grant, review, revoke, suspend, resume, list")
    rosub = roles.add_subparsers(dest="sub", required=True, metavar="SUBCOMMAND")
    p = cmd(rosub, "list", cmd_role_list, "who holds which role")
    ca_dir(p); role_node(p)  # noqa: E702
    p.add_argument("--status", choices=("pending", "active", "rejected", "revoked"))
    json_opt(p)
    p = cmd(rosub, "grant", cmd_role_grant, "an administrator proposes a role for the holder "
            "of a certificate; it takes effect when an auditor approves it")
    ca_dir(p); role_node(p)  # noqa: E702
    p.add_argument("serial", help="serial of the person's certificate (at a node: the "
                                  "certificate file)")
    p.add_argument("--role", required=True, choices=ROLES)
    p.add_argument("--division", help="for receiver and deputy-receiver")
    p.add_argument("--operator", required=True, help="pkcs11: URI of your (administrator) key")
    _add_pin(p, "operator"); json_opt(p)  # noqa: E702
    p = cmd(rosub, "review", cmd_role_review, "an auditor approves or refuses a pending grant")
    ca_dir(p); role_node(p)  # noqa: E702
    p.add_argument("id", type=int)
    verdict = p.add_mutually_exclusive_group(required=True)
    verdict.add_argument("--approve", action="store_true")
    verdict.add_argument("--refuse", dest="approve", action="store_false")
    p.add_argument("--reason")
    p.add_argument("--operator", required=True, help="pkcs11: URI of your (auditor) key")
    _add_pin(p, "operator")
    p = cmd(rosub, "revoke", cmd_role_revoke, "an administrator takes a role away, at once")
    ca_dir(p); role_node(p)  # noqa: E702
    p.add_argument("id", type=int)
    p.add_argument("--reason", required=True)
    p.add_argument("--operator", required=True, help="pkcs11: URI of your (administrator) key")
    _add_pin(p, "operator")
    for action, helptext in (("suspend", "suspend every right of a person at once (A39)"),
                             ("resume", "an auditor lifts a suspension")):
        p = cmd(rosub, action, cmd_role_suspend, helptext)
        p.set_defaults(action=action)
        ca_dir(p); role_node(p)  # noqa: E702
        p.add_argument("serial", help="serial of one of the person's certificates (at a node: "
                                      "a certificate file)")
        p.add_argument("--reason", required=True)
        p.add_argument("--operator", required=True, help="pkcs11: URI of your key")
        _add_pin(p, "operator")

    # audit
    audit = sub.add_parser("audit", help="the audit log: show, verify, export, checkpoint")
    asub = audit.add_subparsers(dest="sub", required=True, metavar="SUBCOMMAND")

    def audit_filters(p: argparse.ArgumentParser) -> None:
        p.add_argument("--actor", help="certificate serial of the actor")
        p.add_argument("--action", help="e.g. certificate-revoke, role-grant")
        p.add_argument("--object", help="e.g. a serial, a request id")
        p.add_argument("--since", help="ISO 8601 time")
        p.add_argument("--until", help="ISO 8601 time")
        p.add_argument("--limit", type=int)

    def node_audit(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="a node's log instead of the CA's (its configuration "
                                        "file; the daemon answers)")

    p = cmd(asub, "show", cmd_audit_show, "audit entries (auditors only)")
    ca_dir(p); audit_filters(p); node_audit(p)  # noqa: E702
    p.add_argument("--operator", required=True, help="pkcs11: URI of your (auditor) key")
    _add_pin(p, "operator"); json_opt(p)  # noqa: E702
    p = cmd(asub, "verify", cmd_audit_verify, "check the audit chain (auditors only), or an "
            "evidence bundle or an archive offline")
    p.add_argument("bundle", nargs="?", help="an evidence bundle or archive directory "
                                             "(offline check)")
    ca_dir(p)
    p.add_argument("--ca", help="your own copy of the certificate that signs checkpoints")
    p.add_argument("--node-config", metavar="FILE",
                   help="check a node's audit log instead (the node's configuration file)")
    p.add_argument("--checkpoints", action="append", metavar="FILE",
                   help="another copy of the log's signed checkpoints (a witness's, "
                        "`exchanged audit witnessed`), compared with the log; repeatable")
    p.add_argument("--operator", help="pkcs11: URI of your (auditor) key; for the live log")
    _add_pin(p, "operator"); json_opt(p)  # noqa: E702
    p = cmd(asub, "export", cmd_audit_export, "write an evidence bundle for one matter "
            "(auditors only)")
    ca_dir(p); audit_filters(p); node_audit(p)  # noqa: E702
    p.add_argument("--out", "-o", required=True, help="new directory for the bundle")
    p.add_argument("--operator", required=True, help="pkcs11: URI of your (auditor) key")
    _add_pin(p, "operator")
    p = cmd(asub, "witnessed", cmd_audit_witnessed, "the signed audit checkpoints this node "
            "keeps for a peer it witnesses (for audit verify --checkpoints)")
    p.add_argument("--config", "-c", default=os.environ.get("EXCHANGED_CONFIG",
                                                            "/etc/exchanged/exchanged.toml"),
                   help="this (the witness's) node configuration")
    p.add_argument("--unit", required=True, help="the witnessed peer unit")
    p.add_argument("--out", "-o", help="write the records here (default: stdout)")
    p = cmd(asub, "checkpoint", cmd_audit_checkpoint, "sign the head of the audit log on the "
            "CA token")
    ca_dir(p); _add_pin(p, "ca")  # noqa: E702

    # node
    p = cmd(sub, "serve", cmd_serve, "run the node's exchange daemon")
    config_option(p)
    p = cmd(sub, "send", cmd_send, "send a document to another unit")
    config_option(p)
    p.add_argument("--to", required=True, help="the recipient unit's id")
    p.add_argument("--title", required=True)
    p.add_argument("--pdf", required=True, help="the PDF scan of the sealed document")
    p.add_argument("--editable", required=True,
                   help="the editable file (txt, doc, docx, wps, ofd, rtf)")
    p.add_argument("--number", help="the issuing number (A24): 'auto' takes the unit's next "
                                    "(per year, gap-free, [box] outgoing_number); an explicit "
                                    "one must be unused")
    p.add_argument("--urgency", choices=("normal", "urgent", "extra-urgent"), default="normal")
    p.add_argument("--classification", default="internal",
                   choices=("public", "internal", "secret", "confidential", "top-secret"))
    p.add_argument("--deadline", help="handling deadline (ISO 8601)")
    p.add_argument("--paper-original", action="store_true",
                   help="a paper original travels too (dual track, N2)")
    p.add_argument("--id", help="the document id (a UUID; default: a new one)")
    p.add_argument("--division", help="the recipient's division it is addressed to (default: "
                                      "the unit's box, its archives section)")
    p.add_argument("--phoned", metavar="'WHO, WHEN'",
                   help="an urgent document outside office hours: whom you phoned first, and "
                        "when (A20); recorded and signed with the document")
    p.add_argument("--corrects", metavar="ID", help="a returned document this one corrects")
    json_opt(p)
    p = cmd(sub, "outbox", cmd_outbox, "documents this unit sent, and their state")
    config_option(p)
    p.add_argument("id", nargs="?", help="show one document")
    p.add_argument("--state")
    json_opt(p)
    inbox = cmd(sub, "inbox", cmd_inbox, "this unit's exchange box (or a division's)")
    config_option(inbox)
    inbox.add_argument("--state")
    inbox.add_argument("--division", help="a division's box: its documents and its copies")
    json_opt(inbox)
    isub = inbox.add_subparsers(dest="sub", required=False, metavar="SUBCOMMAND")
    p = cmd(isub, "show", cmd_inbox_show, "one incoming document")
    config_option(p); p.add_argument("id"); json_opt(p)  # noqa: E702

    def person_act(name: str, handler: Handler, helptext: str) -> argparse.ArgumentParser:
        p = cmd(isub, name, handler, helptext)
        config_option(p)
        p.add_argument("id")
        p.add_argument("--operator", required=True, help="pkcs11: URI of your personal key")
        _add_pin(p, "operator"); json_opt(p)  # noqa: E702
        return p

    p = person_act("sign-for", cmd_inbox_sign_for, "sign for a document (the archives "
                   "section for the unit's box, a division's receiver for its box or copy) "
                   "with your personal token; the signed receipt goes back to the sender")
    p.add_argument("--division", help="sign for the copy this division was given")
    person_act("register", cmd_inbox_register, "the archives section registers a document "
               "it signed for: the next register number (per unit and year, gap-free)")
    p = person_act("distribute", cmd_inbox_distribute, "the archives section passes a "
                   "registered document to divisions; each signs for its copy")
    p.add_argument("--division", action="append", required=True, help="repeatable")
    p = person_act("forward", cmd_inbox_forward, "forward a document to a unit this one "
                   "manages (the original package and a signed custody record), or, from a "
                   "division, to the archives section for registration")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--to", help="the managed unit")
    where.add_argument("--to-registrar", action="store_true",
                       help="to the unit's box (A19)")
    p.add_argument("--note", help="kept in the signed custody record")
    p = person_act("return", cmd_inbox_return, "send a document back to its sender with the "
                   "reason (N4); the sender sees it")
    p.add_argument("--reason", required=True)
    person_act("paper-received", cmd_inbox_paper, "record that the paper original arrived "
               "(N2)")
    arch = sub.add_parser("archive", help="archives of finished documents (A24)")
    arsub = arch.add_subparsers(dest="sub", required=True, metavar="SUBCOMMAND")
    p = cmd(arsub, "export", cmd_archive_export, "write the finished documents, each with its "
            "evidence (package, every signature, audit entries, certificates, CRLs), into a new "
            "directory that `audit verify` and openssl check offline")
    config_option(p)
    p.add_argument("dir", help="a new directory (the daemon writes it)")
    p.add_argument("--since", help="received (or sent) at or after this time, ISO 8601")
    p.add_argument("--until", help="... and at or before this time")
    p.add_argument("--division", help="only what is in, or was given to, this division")
    p.add_argument("--operator", required=True, help="pkcs11: URI of your (registrar or "
                                                     "auditor) key")
    _add_pin(p, "operator"); json_opt(p)  # noqa: E702
    p = cmd(sub, "reload", cmd_reload, "what SIGHUP does, answered: read the configuration "
            "again, apply what may change while running, say what needs a restart")
    config_option(p); json_opt(p)  # noqa: E702
    p = cmd(sub, "renew", cmd_renew, "renew the node certificate: a new key on the node's "
            "token and a CSR for it (the administrator), then --install the issued "
            "certificate (taken into use at once, no restart)")
    config_option(p)
    p.add_argument("--operator", help="pkcs11: URI of your (administrator) key")
    p.add_argument("--label", help="the new key's label (default: the current one with "
                                   "-renewed-TIME)")
    p.add_argument("--out", "-o", help="write the CSR here (default: stdout)")
    p.add_argument("--install", metavar="CERT", help="the issued certificate: replace the "
                   "configured certificate file with it (the old one is kept beside) and "
                   "have the daemon take it")
    _add_pin(p, "operator"); json_opt(p)  # noqa: E702
    p = cmd(sub, "backup", cmd_backup, "a consistent backup of the running node (database, "
            "packages, the checkpoints' copy) into a new directory, its list signed by the "
            "node (the node's administrator)")
    config_option(p)
    p.add_argument("dir", help="a new or empty directory (the daemon writes it)")
    p.add_argument("--operator", required=True, help="pkcs11: URI of your (administrator) key")
    _add_pin(p, "operator"); json_opt(p)  # noqa: E702
    p = cmd(sub, "restore", cmd_restore, "install a backup as the node's store, the daemon "
            "stopped: its signature, every file and the audit chain are checked first")
    config_option(p)
    p.add_argument("dir", help="the backup directory")
    p.add_argument("--force", action="store_true",
                   help="replace an existing store (it is moved aside into the data directory's "
                        "replaced-TIME/, not deleted)")
    json_opt(p)
    p = cmd(sub, "status", cmd_status, "the running node: peers, queues, CRLs, certificates, "
            "token, disk, audit head, and what needs attention (exit 1: problems, 3: not "
            "running)")
    config_option(p); json_opt(p)  # noqa: E702
    crl = sub.add_parser("crl", help="the node's CRLs: fetch from the CA's publication point, "
                                     "install a file")
    crlsub = crl.add_subparsers(dest="sub", required=True, metavar="SUBCOMMAND")
    p = cmd(crlsub, "fetch", cmd_crl_fetch, "fetch the CRL from the CA's publication point now "
            "(the daemon does so every crl_refresh seconds)")
    config_option(p); json_opt(p)  # noqa: E702
    p = cmd(crlsub, "install", cmd_crl_install, "hand the daemon a CRL file (DER or PEM); held "
            "if it verifies against the CA and is newer than the one held")
    config_option(p); p.add_argument("file"); json_opt(p)  # noqa: E702
    p = cmd(sub, "due", cmd_due, "what is overdue or due soon, urgent first, per box")
    config_option(p)
    p.add_argument("--division", help="one division's box")
    json_opt(p)
    p = cmd(isub, "export", cmd_inbox_export, "write a document's files, metadata and receipts "
            "to a directory")
    config_option(p); p.add_argument("id"); p.add_argument("dir"); json_opt(p)  # noqa: E702

    # cert
    cert = sub.add_parser("cert", help="certificates: verify")
    esub = cert.add_subparsers(dest="sub", required=True, metavar="SUBCOMMAND")
    p = cmd(esub, "verify", cmd_cert_verify, "validate a certificate chain with CRLs")
    p.add_argument("cert", help="the certificate (PEM/DER; further PEM certs are intermediates)")
    p.add_argument("--ca", required=True, action="append", help="trusted CA certificate(s)")
    p.add_argument("--untrusted", action="append", help="intermediate certificates")
    p.add_argument("--crl", action="append", help="CRL file (PEM or DER), repeatable")
    p.add_argument("--at", help="validate at this time (ISO 8601; default now)")
    p.add_argument("--purpose", choices=profiles.PROFILES,
                   help="also require the profile's key usage and extended key usage")
    p.add_argument("--no-crl-check", action="store_true",
                   help="skip revocation checking (path validation only)")
    json_opt(p)

    # config
    conf = sub.add_parser("config", help="node configurations: check")
    confsub = conf.add_subparsers(dest="sub", required=True, metavar="SUBCOMMAND")
    p = cmd(confsub, "check", cmd_config_check, "check a node configuration without starting "
            "(or stopping) the daemon: its paths and modes, the token (PIN, key, a test "
            "signature), the certificate against the CA and CRLs, peers and roles; one line "
            "per check, exit 1 if any is a problem")
    p.add_argument("file", nargs="?", default=os.environ.get("EXCHANGED_CONFIG",
                                                             "/etc/exchanged/exchanged.toml"),
                   help="the configuration (default: $EXCHANGED_CONFIG or "
                        "/etc/exchanged/exchanged.toml)")
    json_opt(p)
    return top


def _audit_refusal(args: argparse.Namespace, error: ExchangedError) -> None:
    """A refused CA, role or audit command (wrong PIN, forbidden act, bad input) is itself an
    audit entry, so failed logins and attempts are on record."""
    directory = getattr(args, "dir", None)
    if args.command not in ("ca", "role", "audit") or directory is None or \
            not (Path(directory) / camod.DB).exists() or error.code in ("no-ca", "corrupt-db"):
        return
    words = [args.command, getattr(args, "sub", None), getattr(args, "subsub", None)]
    action = "-".join(w for w in words if w) + ("-login-failed" if error.code in
                                                 ("wrong-pin", "pin-locked") else "")
    obj = camod.maybe_serial(str(next((getattr(args, k) for k in ("serial", "id")
                                  if getattr(args, k, None) is not None), "")))
    who = getattr(args, "operator", None) or getattr(args, "applicant", None)
    try:
        ca = camod.CA(directory)
        try:
            ca.record_refusal(action, error, obj=obj,
                              actor=str(parse(who).public()) if who else None)
        finally:
            ca.close()
    except Exception:  # auditing a refusal must never hide the refusal itself
        pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    def command() -> int:
        with ExitStack() as stack:
            return int(args.handler(args, stack))

    return reported(command, lambda e: _audit_refusal(args, e))
