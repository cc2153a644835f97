"""Separation of roles (A5, A7, A39), tried the way a careful attacker would, through the CLI."""

from __future__ import annotations

import json

from conftest import CaSetup
from test_bad_input import refused


def grant(ca: CaSetup, serial: str, role: str, *extra: str, ok: bool | None = True):  # type: ignore[no-untyped-def]
    return ca.cli("role", "grant", "--dir", ca.dir, serial, "--role", role, *extra, *ca.admin,
                  "--json", ok=ok)


def person_cert(ca: CaSetup, name: str, unit: str = "General Office") -> str:
    """A person certificate issued through the normal request flow; returns its serial."""
    key = ca.key("person")
    rid = ca.submit(ca.csr(key, "person", profile="person", name=name, unit=unit),
                    profile="person", name=name, unit=unit)
    ca.cli("ca", "request", "approve", "--dir", ca.dir, str(rid), *ca.op(2))
    if json.loads(ca.cli("ca", "request", "show", "--dir", ca.dir, str(rid), "--json").out
                  )["status"] == "pending":  # a namesake of someone registered: dual control
        ca.cli("ca", "request", "approve", "--dir", ca.dir, str(rid), *ca.op(1))
    ca.cli("ca", "issue", "--dir", ca.dir, str(rid), *ca.op(2), *ca.ca_pin, "-o",
           f"{name}.pem")
    certs = [c for c in json.loads(ca.cli("ca", "list", "--dir", ca.dir, "--json").out)
             if f"CN={name}," in c["subject"]]
    return certs[-1]["serial"]


def test_no_one_grants_a_role_to_themselves_even_with_a_second_certificate(ca: CaSetup) -> None:
    refused(ca, lambda: grant(ca, ca.serial_of("Zhang Wei"), "liaison", ok=None),
            "cannot grant a role to themselves")
    second = person_cert(ca, "Zhang Wei")  # the administrator's second certificate
    refused(ca, lambda: grant(ca, second, "liaison", ok=None),
            "cannot grant a role to themselves")


def test_the_auditor_is_never_administrator_or_security_officer(ca: CaSetup) -> None:
    refused(ca, lambda: grant(ca, ca.serial_of("Chen Jing"), "administrator", ok=None),
            "may never be held with it")
    refused(ca, lambda: grant(ca, ca.serial_of("Chen Jing"), "security-officer", ok=None),
            "may never be held with it")
    refused(ca, lambda: grant(ca, ca.serial_of("Wang Fang"), "auditor", ok=None),
            "may never be held with it")
    # ... nor through a pending grant: two grants that would clash once both approved.
    serial = person_cert(ca, "Sun Li")
    grant(ca, serial, "security-officer")
    refused(ca, lambda: grant(ca, serial, "auditor", ok=None), "may never be held with it")


def test_a_grant_takes_effect_only_after_an_auditor_approves(ca: CaSetup) -> None:
    serial = person_cert(ca, "Sun Li")
    gid = json.loads(grant(ca, serial, "receiver", "--division", "Archives").out)["id"]
    listed = {r["id"]: r for r in json.loads(ca.cli("role", "list", "--dir", ca.dir,
                                                    "--json").out)}
    assert listed[gid]["status"] == "pending"
    # The administrator cannot approve it (not an auditor) ...
    refused(ca, lambda: ca.cli("role", "review", "--dir", ca.dir, str(gid), "--approve",
                               *ca.admin, ok=None), "not an active auditor")
    # ... nor can an officer.
    refused(ca, lambda: ca.cli("role", "review", "--dir", ca.dir, str(gid), "--approve",
                               *ca.op(1), ok=None), "not an active auditor")
    ca.cli("role", "review", "--dir", ca.dir, str(gid), "--approve", *ca.auditor)
    listed = {r["id"]: r for r in json.loads(ca.cli("role", "list", "--dir", ca.dir,
                                                    "--json").out)}
    assert listed[gid]["status"] == "active"
    refused(ca, lambda: ca.cli("role", "review", "--dir", ca.dir, str(gid), "--approve",
                               *ca.auditor, ok=None), "not pending")


def test_a_pending_officer_cannot_act(ca: CaSetup) -> None:
    serial = person_cert(ca, "Sun Li")
    grant(ca, serial, "security-officer")
    ca.cli("token", "import-cert", "pkcs11:token=person", "Sun Li.pem", "--pin-file",
           ca.cli.tokens.pin("person"))
    rid = ca.submit(ca.csr(ca.key("node"), "node"))
    label = json.loads(ca.cli("token", "list", "pkcs11:token=person", "--pin-file",
                              ca.cli.tokens.pin("person"), "--json").out)
    cert_label = next(o["label"] for o in label if o["kind"] == "cert" and "Sun Li" in
                      (o["subject"] or ""))
    sun = ["--operator", f"pkcs11:token=person;object={cert_label}", "--operator-pin-file",
           ca.cli.tokens.pin("person")]
    refused(ca, lambda: ca.cli("ca", "request", "approve", "--dir", ca.dir, str(rid), *sun,
                               ok=None), "not an active security-officer")


def test_the_auditor_cannot_review_a_grant_that_concerns_them(ca: CaSetup) -> None:
    gid = json.loads(grant(ca, ca.serial_of("Chen Jing"), "liaison").out)["id"]
    refused(ca, lambda: ca.cli("role", "review", "--dir", ca.dir, str(gid), "--approve",
                               *ca.auditor, ok=None), "may not review a grant")


def test_suspension_takes_effect_at_once_and_only_an_auditor_lifts_it(ca: CaSetup) -> None:
    _, node_serial = ca.issue_node()
    wang = ca.serial_of("Wang Fang")
    ca.cli("role", "suspend", "--dir", ca.dir, wang, "--reason", "equipment sealed (A39)",
           *ca.admin)
    refused(ca, lambda: ca.cli("ca", "hold", "--dir", ca.dir, node_serial, *ca.op(1), ok=None),
            "suspended")
    # With a second certificate of his own, Wang is still suspended: persons, not certificates.
    # The administrator may not lift it; Wang may not lift it; the auditor may.
    refused(ca, lambda: ca.cli("role", "resume", "--dir", ca.dir, wang, "--reason", "x",
                               *ca.admin, ok=None), "not an active auditor")
    ca.cli("role", "resume", "--dir", ca.dir, wang, "--reason", "inquiry closed", *ca.auditor)
    ca.cli("ca", "hold", "--dir", ca.dir, node_serial, *ca.op(1))


def test_a_suspended_administrator_cannot_grant(ca: CaSetup) -> None:
    ca.cli("role", "suspend", "--dir", ca.dir, ca.serial_of("Zhang Wei"), "--reason", "inquiry",
           *ca.auditor)
    serial = person_cert(ca, "Sun Li")
    refused(ca, lambda: grant(ca, serial, "liaison", ok=None), "suspended")
    refused(ca, lambda: ca.cli("role", "suspend", "--dir", ca.dir, ca.serial_of("Chen Jing"),
                               "--reason", "revenge", *ca.admin, ok=None), "suspended")


def test_acting_with_a_revoked_certificate(ca: CaSetup) -> None:
    li = ca.serial_of("Li Wei")
    ca.cli("ca", "revoke", "--dir", ca.dir, li, "--reason", "affiliationChanged", *ca.op(1))
    rid = ca.submit(ca.csr(ca.key("node"), "node"))
    refused(ca, lambda: ca.cli("ca", "request", "approve", "--dir", ca.dir, str(rid),
                               *ca.op(2), ok=None), "revoked")


def test_revoking_a_role_is_immediate(ca: CaSetup) -> None:
    roles = json.loads(ca.cli("role", "list", "--dir", ca.dir, "--json").out)
    li_role = next(r["id"] for r in roles if "Li Wei" in r["holder_subject"])
    ca.cli("role", "revoke", "--dir", ca.dir, str(li_role), "--reason", "left the post",
           *ca.admin)
    rid = ca.submit(ca.csr(ca.key("node"), "node"))
    refused(ca, lambda: ca.cli("ca", "request", "approve", "--dir", ca.dir, str(rid),
                               *ca.op(2), ok=None), "not an active security-officer")


def test_receiver_roles_need_a_division(ca: CaSetup) -> None:
    serial = person_cert(ca, "Sun Li")
    refused(ca, lambda: grant(ca, serial, "receiver", ok=None), "needs --division")
    refused(ca, lambda: grant(ca, serial, "liaison", "--division", "X", ok=None),
            "takes no --division")
