#!/usr/bin/env python3
"""The certificate walk-through on fresh SoftHSM tokens, as an operator would type it.

tokens -> CA init -> a second officer -> a node key pair on its own token -> CSR -> submit ->
self-approval refused -> approval by the other officer -> issue -> openssl verify accepts ->
hold -> CRL -> openssl reports it revoked (certificateHold) -> release -> new CRL, higher number
-> accepted -> revoke (keyCompromise) -> rejected.

Every step prints the command it runs and what came of it, and checks the outcome: the script
exits non-zero at the first surprise. Every CRL is checked with `openssl crl -verify`, every CSR
with `openssl req -verify`. Usage: walkthrough.py [WORKDIR] (default: a new temporary directory).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXCHANGED = [sys.executable, "-m", "exchanged"]


class Walk:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.tokens = work / "tokens"
        self.env = dict(os.environ)
        self.step_no = 0

    def say(self, text: str) -> None:
        self.step_no += 1
        print(f"\n== {self.step_no}. {text}", flush=True)

    def run(self, argv: list[str], *, expect_ok: bool = True, show: bool = True,
            expect: str | None = None) -> str:
        """Run a command; with expect_ok=False it must fail, and its output contain `expect`."""
        printable = " ".join(shlex.quote(a) for a in argv)
        printable = printable.replace(sys.executable + " -m exchanged", "exchanged")
        print(f"$ {printable}", flush=True)
        p = subprocess.run(argv, cwd=self.work, env=self.env, capture_output=True, text=True)
        out = (p.stdout + p.stderr).rstrip()
        if show and out:
            print("  " + out.replace("\n", "\n  "), flush=True)
        if expect_ok and p.returncode != 0:
            sys.exit(f"walkthrough: step failed (exit {p.returncode}): {printable}")
        if not expect_ok and p.returncode == 0:
            sys.exit(f"walkthrough: this should have been refused: {printable}")
        if expect is not None and expect not in out:
            sys.exit(f"walkthrough: expected {expect!r} in the output of: {printable}")
        return out

    def id_of(self, out: str) -> str:
        """The number a submit or grant printed ("request 4 submitted", "role grant 4 ...")."""
        return re.search(r"(?:request|grant) (\d+)", out).group(1)  # type: ignore[union-attr]

    def x(self, *args: str, expect: str | None = None) -> str:
        """Run `exchanged ARGS`; when `expect` is given it must fail with that text."""
        return self.run(EXCHANGED + list(args), expect_ok=expect is None, expect=expect)

    def pin(self, label: str) -> str:
        return str(self.tokens / f"{label}.pin")

    def officer(self, n: int) -> list[str]:
        return ["--operator", f"pkcs11:token=officer{n};object=officer",
                "--operator-pin-file", self.pin(f"officer{n}")]

    def crl_pem(self) -> Path:
        """Check the published CRL with openssl; return it as PEM for `openssl verify`."""
        self.run(["openssl", "crl", "-verify", "-noout", "-inform", "DER",
                  "-in", "ca/ca.crl", "-CAfile", "ca/ca.pem"])
        self.run(["openssl", "crl", "-inform", "DER", "-in", "ca/ca.crl", "-out", "crl.pem"])
        return self.work / "crl.pem"

    def crl_number(self) -> int:
        text = self.run(["openssl", "crl", "-inform", "DER", "-in", "ca/ca.crl", "-noout",
                         "-crlnumber"], show=False)
        return int(text.split("=", 1)[1], 16)


def main() -> int:
    work = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="exchanged-ca-"))
    work.mkdir(parents=True, exist_ok=True)
    w = Walk(work)
    print(f"Working in {work}")

    w.say("SoftHSM tokens stand in for smart cards: the CA's, each person's, a node's")
    out = w.run(["bash", str(ROOT / "softhsm-setup.sh"), str(w.tokens),
                 "ca", "admin", "officer1", "officer2", "auditor", "node-a"])
    w.env["SOFTHSM2_CONF"] = re.search(r"export SOFTHSM2_CONF=(\S+)", out).group(1)  # type: ignore[union-attr]

    w.say("CA ceremony: the CA key on the CA token; the administrator, the security officer and "
          "the auditor (three people, A5) each get a key and certificate on their own token")
    w.x("ca", "init", "--dir", "ca", "--key", "pkcs11:token=ca;object=ca",
        "--name", "Demo Province Root CA", "--org", "Demo Province", "--unit", "General Office",
        "--admin", "pkcs11:token=admin;object=me", "--admin-name", "Zhang Wei",
        "--admin-division", "Information Technology", "--admin-pin-file", w.pin("admin"),
        "--officer", "pkcs11:token=officer1;object=officer", "--officer-name", "Wang Fang",
        "--officer-division", "Security", "--officer-pin-file", w.pin("officer1"),
        "--auditor", "pkcs11:token=auditor;object=me", "--auditor-name", "Chen Jing",
        "--auditor-division", "Audit", "--auditor-pin-file", w.pin("auditor"),
        "--crl-url", "http://127.0.0.1:8080/ca.crl", "--ca-pin-file", w.pin("ca"))
    w.x("token", "list", "pkcs11:token=ca", "--pin-file", w.pin("ca"))

    w.say("A second security officer: certificate from the first, role granted by the "
          "administrator, in force once the auditor approves (A7)")
    w.x("token", "keygen", "pkcs11:token=officer2;object=officer", "--pin-file",
        w.pin("officer2"))
    w.x("csr", "pkcs11:token=officer2;object=officer", "--profile", "person",
        "--name", "Li Wei", "--unit", "General Office", "--division", "Security",
        "--post", "Security Officer", "--pin-file", w.pin("officer2"), "-o", "li.csr")
    w.run(["openssl", "req", "-verify", "-noout", "-in", "li.csr"])
    li_req = w.id_of(w.x(
        "ca", "request", "submit", "--dir", "ca", "--csr", "li.csr", "--profile", "person",
        "--name", "Li Wei", "--unit", "General Office", "--division", "Security",
        "--post", "Security Officer", "--reason", "second security officer"))
    w.x("ca", "request", "approve", "--dir", "ca", li_req, *w.officer(1))
    w.x("ca", "issue", "--dir", "ca", li_req, *w.officer(1), "--ca-pin-file", w.pin("ca"),
        "-o", "li.pem")
    w.x("token", "import-cert", "pkcs11:token=officer2", "li.pem", "--pin-file",
        w.pin("officer2"))
    li_serial = w.run(["openssl", "x509", "-noout", "-serial", "-in", "li.pem"],
                      show=False).split("=")[1]
    admin = ["--operator", "pkcs11:token=admin;object=me", "--operator-pin-file", w.pin("admin")]
    auditor = ["--operator", "pkcs11:token=auditor;object=me", "--operator-pin-file",
               w.pin("auditor")]
    grant = w.id_of(w.x("role", "grant", "--dir", "ca", li_serial, "--role", "security-officer",
                        *admin))
    w.x("role", "review", "--dir", "ca", grant, "--approve", "--reason", "appointment letter",
        *auditor)
    w.x("role", "list", "--dir", "ca")

    w.say("The node's key pair is made on the node's own token; the CSR is signed there")
    w.x("token", "keygen", "pkcs11:token=node-a;object=node", "--pin-file", w.pin("node-a"))
    w.x("csr", "pkcs11:token=node-a;object=node", "--profile", "node", "--name", "node-a",
        "--unit", "Finance Bureau", "--dns", "node-a.finance.local", "--ip", "127.0.0.1",
        "--pin-file", w.pin("node-a"), "-o", "node-a.csr")
    w.run(["openssl", "req", "-verify", "-noout", "-in", "node-a.csr"])

    w.say("Officer Li submits the node's request, signed on Li's token")
    node_req = w.id_of(w.x(
        "ca", "request", "submit", "--dir", "ca", "--csr", "node-a.csr", "--profile", "node",
        "--name", "node-a", "--unit", "Finance Bureau", "--dns", "node-a.finance.local",
        "--ip", "127.0.0.1", "--reason", "exchange node of the Finance Bureau",
        "--applicant", "pkcs11:token=officer2;object=officer",
        "--operator-pin-file", w.pin("officer2")))

    w.say("Li may not approve Li's own request; issuing before approval is refused too")
    w.x("ca", "request", "approve", "--dir", "ca", node_req, *w.officer(2),
        expect="another security officer must review it")
    w.x("ca", "issue", "--dir", "ca", node_req, *w.officer(1), "--ca-pin-file", w.pin("ca"),
        expect="only an approved request is issued")

    w.say("Officer Wang approves; the CA issues; openssl accepts the certificate")
    w.x("ca", "request", "approve", "--dir", "ca", node_req, *w.officer(1), "--reason",
        "unit head's letter on file")
    w.x("ca", "issue", "--dir", "ca", node_req, *w.officer(1), "--ca-pin-file", w.pin("ca"),
        "-o", "node-a.pem")
    serial = w.run(["openssl", "x509", "-noout", "-serial", "-in", "node-a.pem"],
                   show=False).split("=")[1]
    w.run(["openssl", "verify", "-CAfile", "ca/ca.pem", "node-a.pem"])
    w.run(["openssl", "verify", "-crl_check", "-CAfile", "ca/ca.pem", "-CRLfile",
           str(w.crl_pem()), "node-a.pem"])

    w.say("The node's key is reported lost: suspend it at once and publish a CRL")
    w.x("ca", "hold", "--dir", "ca", serial, *w.officer(2), "--note", "USB key reported lost")
    w.x("ca", "crl", "--dir", "ca", "--ca-pin-file", w.pin("ca"))
    held_number = w.crl_number()
    w.run(["openssl", "verify", "-crl_check", "-CAfile", "ca/ca.pem", "-CRLfile",
           str(w.crl_pem()), "node-a.pem"], expect_ok=False, expect="certificate revoked")
    text = w.run(["openssl", "crl", "-inform", "DER", "-in", "ca/ca.crl", "-noout", "-text"],
                 show=False)
    if "Certificate Hold" not in text:
        sys.exit("walkthrough: the CRL does not carry the certificateHold reason")
    print("  (the CRL entry's reason is Certificate Hold)")
    w.x("cert", "verify", "node-a.pem", "--ca", "ca/ca.pem", "--crl", "ca/ca.crl",
        "--purpose", "node", expect="suspended")

    w.say("The key is found: release the hold; the next CRL has a higher number")
    w.x("ca", "release", "--dir", "ca", serial, *w.officer(2), "--note", "found in the safe")
    w.x("ca", "crl", "--dir", "ca", "--ca-pin-file", w.pin("ca"))
    released_number = w.crl_number()
    if released_number <= held_number:
        sys.exit("walkthrough: the CRL number did not increase")
    print(f"  (CRL number {released_number} > {held_number})")
    w.run(["openssl", "verify", "-crl_check", "-CAfile", "ca/ca.pem", "-CRLfile",
           str(w.crl_pem()), "node-a.pem"])
    w.x("cert", "verify", "node-a.pem", "--ca", "ca/ca.pem", "--crl", "ca/ca.crl",
        "--purpose", "node")

    w.say("The key is compromised after all: revoke it (keyCompromise), for good")
    w.x("ca", "revoke", "--dir", "ca", serial, "--reason", "keyCompromise", *w.officer(1))
    w.x("ca", "crl", "--dir", "ca", "--ca-pin-file", w.pin("ca"))
    w.run(["openssl", "verify", "-crl_check", "-CAfile", "ca/ca.pem", "-CRLfile",
           str(w.crl_pem()), "node-a.pem"], expect_ok=False, expect="certificate revoked")
    w.x("cert", "verify", "node-a.pem", "--ca", "ca/ca.pem", "--crl", "ca/ca.crl",
        expect="keyCompromise")
    w.x("ca", "release", "--dir", "ca", serial, *w.officer(2), expect="already revoked")

    w.say("What the CA holds now")
    w.x("ca", "list", "--dir", "ca")
    w.x("ca", "request", "list", "--dir", "ca")

    w.say("The auditor checks the tamper-evident audit log; an officer may not read it")
    w.x("audit", "show", "--dir", "ca", "--object", serial, *auditor)
    w.x("audit", "verify", "--dir", "ca", *auditor)
    w.x("audit", "show", "--dir", "ca", *w.officer(1), expect="not an active auditor")
    print("\nwalkthrough: all steps behaved as expected")
    return 0


if __name__ == "__main__":
    sys.exit(main())
