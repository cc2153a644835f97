#!/usr/bin/env python3
"""A local demo network: SoftHSM tokens, the CA, two units' nodes on loopback.

Unit A (finance) sends a document to unit B (office); B's daemon stores it and acknowledges
with a receipt signed by B's node key; B's receiver signs for it with her personal token; the
signed receipt travels back to A; openssl verifies both receipts against the CA. Then B's node
certificate is revoked, the CRL published, and A refuses B. It stops what it started.

Usage: demo_network.py [WORKDIR]  (default: a new temporary directory). Exits non-zero at the
first step that does not behave.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import MutableMapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXCHANGED = [sys.executable, "-m", "exchanged"]


# Ports for the daemons to come are taken below the kernel's ephemeral range (32768 and up
# unless changed): a port the kernel hands out for "any free port" may be taken by an outgoing
# connection between the moment it is picked and the daemon's bind. Each pytest-xdist worker
# walks a slice of its own, so two workers (or two calls in one) never pick the same port.
PORTS = range(20000, 32000)
_walked = 0


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now, for a daemon about to be configured."""
    global _walked
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    size = len(PORTS) // workers
    first = PORTS.start + (worker % workers) * size
    offset = os.getpid() * 7919  # runs side by side (two checkouts) start apart
    for _ in range(size):
        port = first + (offset + _walked) % size
        _walked += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use (or in TIME_WAIT without SO_REUSEADDR): the next one
            return port
    raise RuntimeError(f"no free port on 127.0.0.1 in {first}..{first + size - 1}")


def keep_bytecode(env: MutableMapping[str, str], prefix: Path) -> bool:
    """Where PYTHONDONTWRITEBYTECODE is set (as on this project's machines), every `python -m
    exchanged` compiles the package's sources again: about a fifth of a second of CPU, and in a
    daemon 0.4 MiB of resident memory that stays. Let the processes started with `env` keep
    their byte-code under `prefix` instead, never beside the sources (what the variable is set
    to avoid); Python checks it against each source's mtime and size. Nothing changes if
    byte-code is kept already or the caller chose where. True if `env` was changed."""
    if not env.get("PYTHONDONTWRITEBYTECODE") or env.get("PYTHONPYCACHEPREFIX"):
        return False
    env["PYTHONPYCACHEPREFIX"] = str(prefix)
    del env["PYTHONDONTWRITEBYTECODE"]
    return True


class Demo:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.tok = work / "tokens"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGED_")}
        if keep_bytecode(self.env, work / "pycache"):
            # Byte-code under a prefix is looked for there for every module, the standard
            # library's and the dependencies' too: compiled once here, by importing what the
            # commands and the daemon import, so that no daemon compiles at its start.
            subprocess.run([sys.executable, "-c", "import exchanged.cli, exchanged.node.service"],
                           env=self.env, capture_output=True, check=False)
        self.daemons: dict[str, subprocess.Popen[bytes]] = {}
        self.step = 0
        self.ca_port = free_port()  # the CA's publication point (`exchanged ca serve`)

    def say(self, text: str) -> None:
        self.step += 1
        print(f"\n== {self.step}. {text}", flush=True)

    def run(self, argv: list[str], *, ok: bool | None = True, quiet: bool = False) -> str:
        """Run a command in the work directory; `ok`: it must succeed (True), must fail
        (False), or either (None)."""
        shown = " ".join(shlex.quote(a) for a in argv).replace(
            f"{sys.executable} -m exchanged", "exchanged")
        if not quiet:
            print(f"$ {shown}", flush=True)
        p = subprocess.run(argv, cwd=self.work, env=self.env, capture_output=True, text=True)
        out = (p.stdout + p.stderr).rstrip()
        if out and not quiet:
            print("  " + out.replace("\n", "\n  "), flush=True)
        if ok and p.returncode != 0:
            raise SystemExit(f"demo: step failed: {shown}\n{out}")
        if ok is False and p.returncode == 0:
            raise SystemExit(f"demo: this should have failed: {shown}")
        return out

    def x(self, *args: str, ok: bool | None = True, quiet: bool = False) -> str:
        return self.run(EXCHANGED + list(args), ok=ok, quiet=quiet)

    def pin(self, label: str) -> str:
        return str(self.tok / f"{label}.pin")

    def op(self, who: str) -> list[str]:
        return ["--operator", f"pkcs11:token={who};object=me", "--operator-pin-file",
                self.pin(who)]

    def init_ca(self, name: str) -> None:
        """The CA ceremony on the tokens ca, admin, officer and auditor."""
        people = []
        for role, person, div in (("admin", "Zhang Wei", "IT"),
                                  ("officer", "Wang Fang", "Security"),
                                  ("auditor", "Chen Jing", "Audit")):
            people += [f"--{role}", f"pkcs11:token={role};object=me", f"--{role}-name", person,
                       f"--{role}-division", div, f"--{role}-pin-file", self.pin(role)]
        self.x("ca", "init", "--dir", "ca", "--key", "pkcs11:token=ca;object=ca", "--name",
               name, "--unit", "General Office", *people, "--ca-pin-file", self.pin("ca"),
               "--crl-url", f"http://127.0.0.1:{self.ca_port}/ca.crl", quiet=True)

    def serve_ca(self) -> None:
        """The CA's publication point: nodes fetch its CRL from the URL in their
        certificates."""
        with open(self.work / "ca-serve.log", "ab") as log:
            self.daemons["ca"] = subprocess.Popen(
                EXCHANGED + ["ca", "serve", "--dir", "ca", "--listen",
                             f"127.0.0.1:{self.ca_port}"],
                cwd=self.work, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.wait_for("the CA's publication point", lambda: _listening(self.ca_port))
        print(f"  the CA publishes its CRL at http://127.0.0.1:{self.ca_port}/ca.crl")

    def issue(self, token: str, profile: str, name: str, unit: str, *extra: str) -> str:
        """Key on the token, CSR, request, approval by the officer, certificate on the token."""
        self.x("token", "keygen", f"pkcs11:token={token};object=me", "--pin-file",
               self.pin(token), quiet=True)
        self.x("csr", f"pkcs11:token={token};object=me", "--profile", profile, "--name", name,
               "--unit", unit, *extra, "--pin-file", self.pin(token), "-o", f"{token}.csr",
               quiet=True)
        rid = json.loads(self.x("ca", "request", "submit", "--dir", "ca", "--csr",
                                f"{token}.csr", "--profile", profile, "--name", name, "--unit",
                                unit, *extra, "--json", quiet=True))["id"]
        self.x("ca", "request", "approve", "--dir", "ca", str(rid), *self.op("officer"),
               quiet=True)
        self.x("ca", "issue", "--dir", "ca", str(rid), *self.op("officer"), "--ca-pin-file",
               self.pin("ca"), "-o", f"{token}.pem", quiet=True)
        self.x("token", "import-cert", f"pkcs11:token={token}", f"{token}.pem", "--pin-file",
               self.pin(token), quiet=True)
        serial = self.run(["openssl", "x509", "-noout", "-serial", "-in", f"{token}.pem"],
                          quiet=True).split("=")[1]
        print(f"  {name} ({unit}): certificate {serial.lower()} on token {token!r}")
        return serial

    def config(self, unit: str, name: str, token: str, port: int,
               peers: dict[str, tuple[int, str, str]], *,
               divisions: tuple[str, ...] = ("Secretariat", "Finance Division",
                                             "Personnel Division"),
               manages: tuple[str, ...] = ()) -> Path:
        d = self.work / unit
        d.mkdir(exist_ok=True)
        # Each node keeps a copy of its peers' signed audit checkpoints, and gives its own to
        # its (first) peer: a log cut back is found even if its own copy went with it.
        witness = [f'witness = "{next(iter(peers))}"',
                   f"witness_for = {json.dumps(sorted(peers))}"] if peers else []
        lines = ["[node]", f'unit = "{unit}"', f'name = "{name}"', f'data_dir = "{d}/data"',
                 f'listen = "127.0.0.1:{port}"', *witness, "", "[pkcs11]",
                 f'key = "pkcs11:token={token};object=me"', f'cert = "{self.work}/{token}.pem"',
                 f'pin_file = "{self.pin(token)}"', "", "[trust]",
                 f'ca = ["{self.work}/ca/ca.pem"]', f'crls = ["{d}/ca.crl"]', "", "[limits]",
                 "read_timeout = 10", "drain_timeout = 5"]
        # The node's first administrator and auditor, declared by its installer (A8) by their
        # person ids (`exchanged ca list`); every other role is granted by the administrator
        # and approved by the auditor.
        lines += ["", "[roles]", f'administrator = "{self.person_id("Zhang Wei")}"',
                  f'auditor = "{self.person_id("Chen Jing")}"']
        # The exchange box: divisions, and the units this one forwards to (A15). The demo's
        # office is always open, so that an urgent document goes at any hour it is run.
        lines += ["", "[box]", f"divisions = {json.dumps(list(divisions), ensure_ascii=False)}",
                  f"manages = {json.dumps(list(manages))}", "", "[office_hours]",
                  "days = [1, 2, 3, 4, 5, 6, 7]", 'start = "00:00"', 'end = "00:00"']
        for peer, (pport, pname, porg) in peers.items():
            lines += ["", f"[peers.{peer}]", f'address = "127.0.0.1:{pport}"',
                      f'name = "{pname}"', f'org = "{porg}"']
        (d / "exchanged.toml").write_text("\n".join(lines) + "\n")
        self.publish_crl(unit)
        return d / "exchanged.toml"

    def person_id(self, name: str) -> str:
        """The registered person id of `name` (the demo has no namesakes)."""
        listed = json.loads(self.x("ca", "list", "--dir", "ca", "--json", quiet=True))
        return str(next(c["person"] for c in listed if c["person"] and
                        f"CN={name}," in c["subject"]))

    def publish_crl(self, *units: str) -> None:
        for unit in units or sorted(p.parent.name for p in self.work.glob("*/exchanged.toml")):
            crl = (self.work / "ca" / "ca.crl").read_bytes()
            tmp = self.work / unit / ".ca.crl.tmp"
            tmp.write_bytes(crl)
            tmp.replace(self.work / unit / "ca.crl")

    def start(self, unit: str) -> None:
        cfg = str(self.work / unit / "exchanged.toml")
        with open(self.work / unit / "daemon.log", "ab") as log:  # the child keeps its own fd
            self.daemons[unit] = subprocess.Popen(EXCHANGED + ["serve", "--config", cfg],
                                                  cwd=self.work, env=self.env, stdout=log,
                                                  stderr=subprocess.STDOUT)
        sock = _control_socket(cfg)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.daemons[unit].poll() is not None:
                raise SystemExit(f"demo: the {unit} daemon exited; see {unit}/daemon.log:\n"
                                 + (self.work / unit / "daemon.log").read_text()[-2000:])
            # Up is when a command gets its answer; asked only once the control socket takes
            # connections (each command is a Python start, which the starting daemon would
            # otherwise have to share the CPU with).
            if sock is not None and not _answering(sock):
                time.sleep(0.05)
                continue
            r = subprocess.run(EXCHANGED + ["outbox", "--config", cfg, "--json"], env=self.env,
                               capture_output=True, cwd=self.work)
            if r.returncode == 0:
                print(f"  {unit}'s daemon is up (pid {self.daemons[unit].pid})")
                return
            time.sleep(0.2)
        raise SystemExit(f"demo: the {unit} daemon did not come up")

    def stop(self) -> None:
        for unit, p in self.daemons.items():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                print(f"  stopped {unit}'s daemon (exit {p.returncode})")

    def wait_for(self, what: str, check, timeout: float = 30) -> object:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            time.sleep(0.2)
        raise SystemExit(f"demo: timed out waiting for {what}")

    def item(self, unit: str, box: str, doc: str) -> dict:  # type: ignore[type-arg]
        cfg = str(self.work / unit / "exchanged.toml")
        args = [box, "--config", cfg, "--json"] if box == "inbox" else \
            [box, doc, "--config", cfg, "--json"]
        out = self.x(*args, quiet=True)
        data = json.loads(out)
        if isinstance(data, list):
            return next((i for i in data if i["doc_id"] == doc), {})
        return data  # type: ignore[no-any-return]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _control_socket(cfg: str) -> Path | None:
    """Where the daemon of configuration `cfg` will take local commands (None: unknown)."""
    try:
        from exchanged.node.config import Config
        return Config.load(cfg).socket_path
    except Exception:  # the daemon will say what is wrong with it; the command will too
        return None


def _answering(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        return s.connect_ex(str(path)) == 0


def main() -> int:
    work = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="exchanged-net-"))
    work.mkdir(parents=True, exist_ok=True)
    d = Demo(work)
    print(f"Working in {work}")
    try:
        return run(d)
    finally:
        d.stop()


# The third unit and the exchange box's people (setup(..., box=True)): office manages the
# district office; its divisions' receivers; district's registrar.
BOX_PEOPLE = (("fin-receiver", "Zhou Min", "Finance Division"),
              ("per-receiver", "Wu Lei", "Personnel Division"))


def setup(d: Demo, *, box: bool = False) -> dict[str, str]:
    """Tokens, the CA, certificates for the nodes and the people, the configurations (the
    daemons are not started). Finance and office; with `box`, also the district office (which
    office manages, A15) and the receivers of office's divisions. Returns the office node's
    serial and the configuration paths."""
    return configure(d, make_pki(d, box=box), box=box)


def make_pki(d: Demo, *, box: bool = False) -> str:
    """setup's first part: the tokens, the CA, the certificates; the office node's serial."""
    labels = ["ca", "admin", "officer", "auditor", "finance-node", "office-node", "receiver"]
    if box:
        labels += ["district-node", "district-registrar", *(t for t, _, _ in BOX_PEOPLE)]
    d.say("Tokens: the CA's, its three officials', the nodes', and the receivers'")
    out = d.run(["bash", str(ROOT / "softhsm-setup.sh"), str(d.tok), *labels], quiet=True)
    d.env["SOFTHSM2_CONF"] = re.search(r"SOFTHSM2_CONF=(\S+)", out).group(1)  # type: ignore[union-attr]
    print(f"  {len(labels)} SoftHSM tokens made; PINs in files of mode 600")

    d.say("The CA, and certificates for the nodes and for office's people")
    d.init_ca("Demo Root CA")
    print("  CA 'Demo Root CA' created (ca/)")
    d.issue("finance-node", "node", "node-finance", "Finance Bureau", "--ip", "127.0.0.1")
    office_serial = d.issue("office-node", "node", "node-office", "General Office Archives",
                            "--ip", "127.0.0.1")
    d.issue("receiver", "person", "Liu Yang", "General Office Archives", "--division",
            "Secretariat")
    if box:
        d.issue("district-node", "node", "district", "District Office", "--ip", "127.0.0.1")
        d.issue("district-registrar", "person", "Ma Li", "District Office", "--division",
                "Secretariat")
        for token, name, division in BOX_PEOPLE:
            d.issue(token, "person", name, "General Office Archives", "--division", division)
    return office_serial


def configure(d: Demo, office_serial: str, *, box: bool = False) -> dict[str, str]:
    """setup's second part: the nodes' configurations, on ports free now."""
    d.say("The nodes on loopback, each configured with its peers only (A13)")
    pa, pb, pc = free_port(), free_port(), free_port()
    office_peers = {"finance": (pa, "node-finance", "Finance Bureau")}
    if box:
        office_peers["district"] = (pc, "district", "District Office")
        d.config("district", "District Office", "district-node", pc,
                 {"office": (pb, "node-office", "General Office Archives"),
                  "finance": (pa, "node-finance", "Finance Bureau")},
                 divisions=("Secretariat",))
    finance_peers = {"office": (pb, "node-office", "General Office Archives")}
    if box:
        finance_peers["district"] = (pc, "district", "District Office")
    d.config("finance", "Finance Bureau", "finance-node", pa, finance_peers)
    d.config("office", "General Office Archives", "office-node", pb, office_peers,
             manages=("district",) if box else ())
    paths = {"office_serial": office_serial,
             "finance": str(d.work / "finance" / "exchanged.toml"),
             "office": str(d.work / "office" / "exchanged.toml")}
    if box:
        paths["district"] = str(d.work / "district" / "exchanged.toml")
    return paths


def run(d: Demo) -> int:
    net = setup(d, box=True)
    office_serial = net["office_serial"]
    events = d.work / "office" / "alerts.txt"
    office = Path(net["office"])  # office's alert command writes what it is told, for the demo
    office.write_text(office.read_text().replace(
        "[pkcs11]", f'alert_command = ["sh", "-c", "echo $EXCHANGED_EVENT $EXCHANGED_DOC_ID '
                    f'$EXCHANGED_TITLE >> {events}"]\n\n[pkcs11]'))
    d.serve_ca()
    d.start("finance")
    d.start("office")
    d.start("district")

    d.say("Finance sends a document: a PDF scan and an editable file")
    (d.work / "notice.pdf").write_bytes(b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\n"
                                        b"trailer<</Root 1 0 R>>\n%%EOF\n")
    (d.work / "notice.txt").write_text("Notice on the budget for 2027.\n")
    cfg_a = str(d.work / "finance" / "exchanged.toml")
    cfg_b = str(d.work / "office" / "exchanged.toml")
    sent = json.loads(d.x("send", "--config", cfg_a, "--to", "office", "--title",
                          "Notice on the 2027 budget", "--number", "Fin [2026] 17", "--pdf",
                          "notice.pdf", "--editable", "notice.txt", "--urgency", "urgent",
                          "--json"))
    doc = sent["doc_id"]
    d.wait_for("delivery", lambda: d.item("finance", "outbox", doc).get("state") == "delivered")
    d.x("outbox", "--config", cfg_a)
    d.x("inbox", "--config", cfg_b)

    d.say("Liu Yang may sign for documents only once she is office's registrar (its archives "
          "section, A15): "
          "granted by the administrator, approved by the auditor")
    d.x("inbox", "sign-for", doc, "--config", cfg_b, *d.op("receiver"), ok=False)
    grant = json.loads(d.x("role", "grant", "--config", cfg_b, "receiver.pem", "--role",
                           "registrar", *d.op("admin"), "--json"))
    d.x("role", "review", "--config", cfg_b, str(grant["id"]), "--approve", "--reason",
        "designated by the head of the secretariat", *d.op("auditor"))
    d.x("role", "list", "--config", cfg_b)

    d.say("Office's receiver signs for it with her personal token; the receipt goes back")
    d.x("inbox", "sign-for", doc, "--config", cfg_b, *d.op("receiver"))
    d.wait_for("the signed receipt at finance",
               lambda: d.item("finance", "outbox", doc).get("state") == "signed-for")
    d.x("outbox", doc, "--config", cfg_a)

    d.say("openssl verifies both receipts against the CA, without our code")
    item = d.item("finance", "outbox", doc)
    for name in ("delivery_receipt", "signed_for_receipt"):
        (d.work / f"{name}.der").write_bytes(base64.b64decode(item[name]))
        d.run(["openssl", "cms", "-verify", "-inform", "DER", "-in", f"{name}.der", "-CAfile",
               "ca/ca.pem", "-purpose", "any", "-out", f"{name}.json"])
        print("  signed: " + (d.work / f"{name}.json").read_text())
    d.x("inbox", "export", doc, str(d.work / "exported"), "--config", cfg_b)

    box(d, net, doc)

    d.say("Office's node certificate is revoked; the CA signs a new CRL and publishes it")
    d.x("ca", "revoke", "--dir", "ca", office_serial, "--reason", "keyCompromise",
        *d.op("officer"))
    out = d.x("ca", "crl", "--dir", "ca", "--ca-pin-file", d.pin("ca"))
    number = int(re.search(r"CRL number (\d+)", out).group(1))  # type: ignore[union-attr]

    d.say("Finance fetches it from the publication point (as it does every crl_refresh "
          "seconds by itself); then the CA's host goes down")
    d.x("crl", "fetch", "--config", cfg_a)
    ca_server = d.daemons.pop("ca")
    ca_server.terminate()
    ca_server.wait(10)
    print("  the CA's publication point is stopped")

    d.say("District never reached the CA: finance hands the CRL over in their next exchange")
    cfg_c = net["district"]
    d.wait_for("district to hold the new CRL", lambda: json.loads(d.x(
        "status", "--config", cfg_c, "--json", quiet=True, ok=None))["crls"][0]["number"]
        == number)
    d.x("status", "--config", cfg_c, ok=None)

    d.say("Both refuse office now; no CRL file was copied by hand")
    for cfg, unit in ((cfg_a, "finance"), (cfg_c, "district")):
        again = json.loads(d.x("send", "--config", cfg, "--to", "office", "--title",
                               f"Second notice from {unit}", "--pdf", "notice.pdf",
                               "--editable", "notice.txt", "--json"))
        def refused(unit: str = unit, doc: str = again["doc_id"]) -> str:
            error = d.item(unit, "outbox", doc).get("last_error") or ""
            return error if "revoked" in error else ""
        print(f"  {unit}: {d.wait_for(f'{unit} to refuse office', refused)}")
    d.say("Stopping the daemons")
    d.stop()
    print("\ndemo: every step behaved as expected")
    return 0


def box(d: Demo, net: dict[str, str], doc: str) -> None:
    """The exchange box at office: register, distribute, forward, return, remind, archive."""
    cfg_a, cfg_b, cfg_c = net["finance"], net["office"], net["district"]
    d.say("Office's divisions name their receivers (granted, then approved by the auditor)")
    for token, division in (("fin-receiver", "Finance Division"),
                            ("per-receiver", "Personnel Division")):
        gid = json.loads(d.x("role", "grant", "--config", cfg_b, f"{token}.pem", "--role",
                             "receiver", "--division", division, *d.op("admin"), "--json",
                             quiet=True))["id"]
        d.x("role", "review", "--config", cfg_b, str(gid), "--approve", *d.op("auditor"),
            quiet=True)
    gid = json.loads(d.x("role", "grant", "--config", cfg_c, "district-registrar.pem",
                         "--role", "registrar", *d.op("admin"), "--json", quiet=True))["id"]
    d.x("role", "review", "--config", cfg_c, str(gid), "--approve", *d.op("auditor"),
        quiet=True)
    d.x("role", "list", "--config", cfg_b)

    d.say("The archives section registers the document (A15): the next register number")
    d.x("inbox", "register", doc, "--config", cfg_b, *d.op("receiver"))
    d.say("... and distributes it to two divisions; each division's receiver signs for its "
          "copy, and the sender sees who signed for what")
    d.x("inbox", "distribute", doc, "--division", "Finance Division", "--division",
        "Personnel Division", "--config", cfg_b, *d.op("receiver"))
    d.x("inbox", "--division", "Finance Division", "--config", cfg_b)
    d.x("inbox", "sign-for", doc, "--division", "Finance Division", "--config", cfg_b,
        *d.op("fin-receiver"))
    d.x("inbox", "sign-for", doc, "--division", "Personnel Division", "--config", cfg_b,
        *d.op("per-receiver"))
    d.wait_for("three receipts at finance",
               lambda: len(d.item("finance", "outbox", doc).get("receipts", [])) == 3)
    for r in d.item("finance", "outbox", doc)["receipts"]:
        print(f"  signed for {'the unit' if not r['division'] else r['division']}: "
              f"{r['by_subject']}")

    d.say("A document for the district office, which office manages, is forwarded to it "
          "(A15): the original package, untouched, with a signed custody record")
    fwd = json.loads(d.x("send", "--config", cfg_a, "--to", "office", "--title",
                         "Circular for the districts", "--pdf", "notice.pdf", "--editable",
                         "notice.txt", "--json"))["doc_id"]
    d.wait_for("the circular at office", lambda: d.item("office", "inbox", fwd))
    d.x("inbox", "sign-for", fwd, "--config", cfg_b, *d.op("receiver"))
    d.x("inbox", "forward", fwd, "--to", "district", "--note", "for your action",
        "--config", cfg_b, *d.op("receiver"))
    d.wait_for("the circular at the district", lambda: d.item("district", "inbox", fwd))
    out = d.work / "district-export"
    d.x("inbox", "export", fwd, str(out), "--config", cfg_c)
    d.run(["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in",
           str(out / "manifest.cms"), "-content", str(out / "manifest.json"), "-CAfile",
           "ca/ca.pem", "-purpose", "any", "-out", "/dev/null"])
    print("  the district verified finance's own signature on the package, with openssl")
    d.x("inbox", "sign-for", fwd, "--config", cfg_c, *d.op("district-registrar"))

    d.say("A document in the wrong form goes back with the reason (N4); finance sees it")
    bad = json.loads(d.x("send", "--config", cfg_a, "--to", "office", "--title",
                         "Unsealed draft", "--pdf", "notice.pdf", "--editable", "notice.txt",
                         "--json"))["doc_id"]
    d.wait_for("the draft at office", lambda: d.item("office", "inbox", bad))
    d.x("inbox", "return", bad, "--reason", "the PDF is not the sealed copy", "--config",
        cfg_b, *d.op("receiver"))
    d.wait_for("the return at finance",
               lambda: d.item("finance", "outbox", bad).get("state") == "returned")
    item = d.item("finance", "outbox", bad)
    print(f"  returned by {item['returned_by']}: {item['return_reason']}")

    d.say("An extra-urgent document past its deadline is listed first and reminded (A16)")
    past = (time.strftime("%Y-%m-%d", time.gmtime(time.time() - 2 * 86400)))
    urgent = json.loads(d.x("send", "--config", cfg_a, "--to", "office", "--title",
                            "Flood warning", "--urgency", "extra-urgent", "--deadline", past,
                            "--pdf", "notice.pdf", "--editable", "notice.txt",
                            "--json"))["doc_id"]
    d.wait_for("the warning at office", lambda: d.item("office", "inbox", urgent))
    d.x("due", "--config", cfg_b)
    events = d.work / "office" / "alerts.txt"
    d.wait_for("the reminder", lambda: events.exists() and
               f"urgent-pending {urgent}" in events.read_text(), timeout=30)
    print("  the alert command ran: " + next(line for line in events.read_text().splitlines()
                                             if line.startswith("urgent-pending")))
    d.x("inbox", "sign-for", urgent, "--config", cfg_b, *d.op("receiver"))

    d.say("The archives section exports the finished documents with their evidence (A24); "
          "it verifies offline, and every signature in it with openssl alone")
    archive = d.work / "archive"
    d.x("archive", "export", str(archive), "--config", cfg_b, *d.op("receiver"))
    d.x("audit", "verify", str(archive))
    listed = json.loads((archive / "archive.json").read_text())
    count = 0
    for entry in listed["documents"]:
        for name in entry["signatures"]:
            d.run(["openssl", "cms", "-verify", "-inform", "DER", "-in",
                   str(archive / "documents" / entry["dir"] / name), "-CAfile", "ca/ca.pem",
                   "-purpose", "any", "-out", "/dev/null"], quiet=True)
            count += 1
    print(f"  openssl verified {count} receipts, notices and custody records in the archive")


if __name__ == "__main__":
    sys.exit(main())
