"""Class 3: a person is an identity, not a name. One security officer, alone, cannot come to
hold, or act as, a role held by someone else — by any path we could think of.

Regression: roles belonged to a name string. The officer submitted, approved and issued a
person certificate with the auditor's exact name and unit on a new token, read the
auditor-only log with it, and suspended a person at a node "as the auditor".

The demo CA has one security officer (Wang Fang, token `officer`), an administrator (Zhang
Wei) and an auditor (Chen Jing). Each path is tried on a copy of the CA directory.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest

from hostile.conftest import Net


class Officer:
    """Wang Fang at her own token, on a copy of the demo CA."""

    def __init__(self, net: Net, ca_dir: Path) -> None:
        self.net, self.dir = net, str(ca_dir)

    def x(self, *args: str, ok: bool = True) -> str:
        return self.net.d.x(*args, ok=ok, quiet=True)

    def ca(self, *args: str, ok: bool = True) -> str:
        return self.x("ca", *args, "--dir", self.dir, ok=ok)

    def me(self, label: str = "me") -> list[str]:
        return ["--operator", f"pkcs11:token=officer;object={label}", "--operator-pin-file",
                self.net.d.pin("officer")]

    def new_key(self) -> str:
        label = f"x-{uuid.uuid4().hex[:8]}"
        self.x("token", "keygen", f"pkcs11:token=officer;object={label}", "--pin-file",
               self.net.d.pin("officer"))
        return label

    def csr(self, label: str, profile: str, name: str, unit: str) -> str:
        out = f"{label}.csr"
        extra = ["--division", "Audit"] if profile == "person" else ["--ip", "127.0.0.1"]
        self.x("csr", f"pkcs11:token=officer;object={label}", "--profile", profile, "--name",
               name, "--unit", unit, *extra, "--pin-file", self.net.d.pin("officer"), "-o", out)
        return out

    def submit(self, csr: str, profile: str, name: str, unit: str) -> int:
        extra = ["--division", "Audit"] if profile == "person" else []
        return int(json.loads(self.ca("request", "submit", "--csr", csr, "--profile", profile,
                                      "--name", name, "--unit", unit, *extra, "--json"))["id"])

    def serial_of(self, name: str) -> str:
        return str(next(c["serial"] for c in json.loads(self.ca("list", "--json"))
                        if f"CN={name}," in c["subject"] and c["status"] == "good"))

    def as_auditor_reads_the_log(self, label: str) -> str:
        return self.x("audit", "show", "--dir", self.dir, *self.me(label), ok=False)


@pytest.fixture
def officer(net: Net, tmp_path: Path) -> Officer:
    shutil.copytree(net.d.work / "ca", tmp_path / "ca")
    return Officer(net, tmp_path / "ca")


AUDITOR = ("Chen Jing", "General Office")


def test_a_namesake_of_the_auditor_needs_two_officers(officer: Officer) -> None:
    for name in ("Chen Jing", "chen  JING", "Ｃｈｅｎ Ｊｉｎｇ"):  # folded: one name to a reader
        label = officer.new_key()
        rid = officer.submit(officer.csr(label, "person", name, AUDITOR[1]), "person", name,
                             AUDITOR[1])
        out = officer.ca("request", "approve", str(rid), *officer.me())
        assert "needs 1 more approval" in out, out
        again = officer.ca("request", "approve", str(rid), *officer.me(), ok=False)
        assert "another security officer" in again
        refused = officer.ca("issue", str(rid), *officer.me(), "--ca-pin-file",
                             officer.net.d.pin("ca"), ok=False)
        assert "dual control" in refused, refused
    # The auditor sees each flag.
    shown = officer.x("audit", "show", "--dir", officer.dir, "--action", "request-flagged",
                      "--operator", "pkcs11:token=auditor;object=me", "--operator-pin-file",
                      officer.net.d.pin("auditor"), "--json")
    assert len(json.loads(shown)) >= 3


def test_a_reissue_of_the_auditors_certificate_onto_her_key_needs_others(officer: Officer
                                                                        ) -> None:
    label = officer.new_key()
    csr = officer.csr(label, "person", *AUDITOR)
    rid = json.loads(officer.ca("reissue", officer.serial_of("Chen Jing"), "--csr", csr,
                                *officer.me(), "--json"))
    assert rid["approvals_needed"] == 2 and rid["flags"]  # the auditor holds a role
    refused = officer.ca("request", "approve", str(rid["id"]), *officer.me(), ok=False)
    assert "another security officer must review it" in refused


def test_a_node_certificate_in_the_auditors_name_is_no_one(officer: Officer) -> None:
    label = officer.new_key()
    rid = officer.submit(officer.csr(label, "node", *AUDITOR), "node", *AUDITOR)
    officer.ca("request", "approve", str(rid), *officer.me())
    officer.ca("issue", str(rid), *officer.me(), "--ca-pin-file", officer.net.d.pin("ca"),
               "-o", f"{label}.pem")
    officer.x("token", "import-cert", "pkcs11:token=officer", f"{label}.pem", "--pin-file",
              officer.net.d.pin("officer"))
    out = officer.as_auditor_reads_the_log(label)
    assert "names no registered person" in out, out
    # ... nor at a node: suspending office's receiver "as the auditor" with it.
    shutil.copyfile(officer.net.d.work / "receiver.pem", Path(officer.dir) / "receiver.pem")
    out = officer.x("role", "suspend", str(officer.net.d.work / "receiver.pem"), "--reason",
                    "as the auditor", "--config", str(officer.net.cfg("office")),
                    *officer.me(label), ok=False)
    assert "not a person certificate" in out or "names no registered person" in out, out


def test_she_cannot_grant_herself_or_a_namesake_a_role(officer: Officer) -> None:
    out = officer.x("role", "grant", "--dir", officer.dir, officer.serial_of("Wang Fang"),
                    "--role", "auditor", *officer.me(), ok=False)
    assert "not an active administrator" in out


def test_each_path_leaves_her_unable_to_read_the_auditors_log(officer: Officer) -> None:
    """After all of the above, with every certificate she holds: refused."""
    out = officer.as_auditor_reads_the_log("me")
    assert "not an active auditor" in out

