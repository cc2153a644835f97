"""Shared fixtures: real SoftHSM tokens made by softhsm-setup.sh, and a runner for the CLI."""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from demo_network import keep_bytecode  # noqa: E402

# Tokens made once per session; tests name their keys uniquely, so they never collide.
TOKEN_LABELS = ("ca", "admin", "officer1", "officer2", "auditor", "node", "person", "other")


_PYCACHE = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    """Let the processes the tests start keep their bytecode, in a directory of the run's own.
    The tests start `python -m exchanged` over and over (every command, every daemon, every
    poll of a daemon's state); with PYTHONDONTWRITEBYTECODE set (as it is in this project's
    machines' environment) each of them compiled the package's sources again, about a fifth
    of a second of CPU each. Bytecode now goes to PYTHONPYCACHEPREFIX, never beside the
    sources (what the variable is set to avoid), and is removed with the run; Python checks
    it against each source's mtime and size, so the children run exactly the code they would
    have compiled."""
    prefix = tempfile.mkdtemp(prefix="exchanged-pycache-")
    if keep_bytecode(os.environ, Path(prefix)):
        config.stash[_PYCACHE] = prefix
    else:  # bytecode is kept already, or the caller chose where
        os.rmdir(prefix)


def pytest_unconfigure(config: pytest.Config) -> None:
    prefix = config.stash.get(_PYCACHE, None)
    if prefix is not None:
        shutil.rmtree(prefix, ignore_errors=True)


@dataclass
class Tokens:
    dir: Path
    conf: str

    def pin(self, label: str) -> str:
        return str(self.dir / f"{label}.pin")


@pytest.fixture(scope="session")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Tokens:
    """SoftHSM tokens through the project's own setup script (the real path, not a mock)."""
    d = tmp_path_factory.mktemp("softhsm")
    out = subprocess.run(["bash", str(ROOT / "softhsm-setup.sh"), str(d), *TOKEN_LABELS],
                         capture_output=True, text=True, check=True).stdout
    conf = re.search(r"export SOFTHSM2_CONF=(\S+)", out).group(1)  # type: ignore[union-attr]
    # In-process PKCS#11 reads SOFTHSM2_CONF when the module is first loaded: set it now.
    os.environ["SOFTHSM2_CONF"] = conf
    return Tokens(d, conf)


@dataclass
class Result:
    rc: int
    out: str
    err: str


class Cli:
    """Runs `exchanged` as a user would: a separate process, PINs from files."""

    def __init__(self, tokens: Tokens, cwd: Path) -> None:
        self.tokens = tokens
        self.cwd = cwd
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("EXCHANGED_")}
        self.env["SOFTHSM2_CONF"] = tokens.conf

    def __call__(self, *args: str, ok: bool | None = True) -> Result:
        p = subprocess.run([sys.executable, "-m", "exchanged", *args], cwd=self.cwd,
                           env=self.env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        r = Result(p.returncode, p.stdout, p.stderr)
        if ok is True and p.returncode != 0:
            raise AssertionError(f"exchanged {' '.join(args)} failed: {p.stderr}")
        if ok is False and p.returncode == 0:
            raise AssertionError(f"exchanged {' '.join(args)} should have failed: {p.stdout}")
        return r


@pytest.fixture
def cli(tokens: Tokens, tmp_path: Path) -> Cli:
    return Cli(tokens, tmp_path)


def uid() -> str:
    return uuid.uuid4().hex[:10]


@dataclass
class CaSetup:
    """A CA with two officers, made through the CLI with fresh key labels on shared tokens."""

    cli: Cli
    dir: str
    tag: str

    def op(self, n: int) -> list[str]:
        """Security officer n (1: from the ceremony, 2: appointed afterwards)."""
        return self.as_(f"officer{n}")

    def as_(self, token: str) -> list[str]:
        """Act as the person whose key (labelled off-TAG) is on `token`."""
        return ["--operator", f"pkcs11:token={token};object=off-{self.tag}",
                "--operator-pin-file", self.cli.tokens.pin(token)]

    @property
    def admin(self) -> list[str]:
        return self.as_("admin")

    @property
    def auditor(self) -> list[str]:
        return self.as_("auditor")

    def serial_of(self, name: str) -> str:
        import json
        return next(c["serial"] for c in json.loads(self.cli("ca", "list", "--dir", self.dir,
                                                             "--json").out)
                    if f"CN={name}," in c["subject"])

    @property
    def ca_pin(self) -> list[str]:
        return ["--ca-pin-file", self.cli.tokens.pin("ca")]

    def key(self, token: str, kind: str = "ec") -> str:
        label = f"{token}-{uid()}"
        self.cli("token", "keygen", f"pkcs11:token={token};object={label}", "--type", kind,
                 "--pin-file", self.cli.tokens.pin(token))
        return f"pkcs11:token={token};object={label}"

    def csr(self, key_uri: str, token: str, profile: str = "node", name: str = "node-x",
            unit: str = "Finance Bureau", out: str | None = None) -> str:
        out = out or f"{uid()}.csr"
        extra = ["--division", "Archives"] if profile == "person" else ["--ip", "127.0.0.1"]
        self.cli("csr", key_uri, "--profile", profile, "--name", name, "--unit", unit, *extra,
                 "--pin-file", self.cli.tokens.pin(token), "-o", out)
        return out

    def submit(self, csr: str, profile: str = "node", name: str = "node-x",
               unit: str = "Finance Bureau") -> int:
        extra = ["--division", "Archives"] if profile == "person" else []
        r = self.cli("ca", "request", "submit", "--dir", self.dir, "--csr", csr, "--profile",
                     profile, "--name", name, "--unit", unit, *extra, "--json")
        import json
        return int(json.loads(r.out)["id"])

    def issue_node(self, name: str = "node-x") -> tuple[str, str]:
        """A node certificate, approved by officer 1: (PEM path, serial hex)."""
        key = self.key("node")
        rid = self.submit(self.csr(key, "node", name=name), name=name)
        self.cli("ca", "request", "approve", "--dir", self.dir, str(rid), *self.op(1))
        out = f"{name}-{uid()}.pem"
        self.cli("ca", "issue", "--dir", self.dir, str(rid), *self.op(1), *self.ca_pin,
                 "-o", out)
        serial = subprocess.run(["openssl", "x509", "-noout", "-serial", "-in", out],
                                cwd=self.cli.cwd, capture_output=True, text=True,
                                check=True).stdout.split("=")[1].strip().lower().lstrip("0")
        return out, serial

    def db_dump(self) -> str:
        """The CA's state: every row of every table but the audit log's."""
        conn = sqlite3.connect(str(self.cli.cwd / self.dir / "ca.db"))
        try:
            return "\n".join(line for line in conn.iterdump()
                             if not line.startswith(('INSERT INTO "audit"',
                                                     'INSERT INTO "audit_head"')))
        finally:
            conn.close()

    def audit(self, where: str = "", params: tuple = ()) -> list[tuple]:  # type: ignore[type-arg]
        conn = sqlite3.connect(str(self.cli.cwd / self.dir / "ca.db"))
        try:
            return conn.execute(f"SELECT seq, action, object, outcome, actor, details FROM audit "
                                f"{where} ORDER BY seq", params).fetchall()
        finally:
            conn.close()


def _ceremony(cli: Cli) -> CaSetup:
    """A CA from the ceremony (administrator Zhang Wei, officer Wang Fang, auditor Chen Jing),
    and a second officer, Li Wei, appointed by the administrator and approved by the auditor."""
    tag = uid()
    s = CaSetup(cli, "ca", tag)
    people = []
    for prefix, token, name, division in (("admin", "admin", "Zhang Wei", "IT"),
                                          ("officer", "officer1", "Wang Fang", "Security"),
                                          ("auditor", "auditor", "Chen Jing", "Audit")):
        people += [f"--{prefix}", f"pkcs11:token={token};object=off-{tag}",
                   f"--{prefix}-name", name, f"--{prefix}-division", division,
                   f"--{prefix}-pin-file", cli.tokens.pin(token)]
    cli("ca", "init", "--dir", "ca", "--key", f"pkcs11:token=ca;object=ca-{tag}",
        "--name", f"Test CA {tag}", "--unit", "General Office", *people,
        "--ca-pin-file", cli.tokens.pin("ca"))
    cli("token", "keygen", f"pkcs11:token=officer2;object=off-{tag}", "--pin-file",
        cli.tokens.pin("officer2"))
    csr = s.csr(f"pkcs11:token=officer2;object=off-{tag}", "officer2", profile="person",
                name="Li Wei", unit="General Office")
    rid = s.submit(csr, profile="person", name="Li Wei", unit="General Office")
    cli("ca", "request", "approve", "--dir", "ca", str(rid), *s.op(1))
    cli("ca", "issue", "--dir", "ca", str(rid), *s.op(1), *s.ca_pin, "-o", "li.pem")
    cli("token", "import-cert", "pkcs11:token=officer2", "li.pem", "--pin-file",
        cli.tokens.pin("officer2"))
    import json
    grant = json.loads(cli("role", "grant", "--dir", "ca", s.serial_of("Li Wei"), "--role",
                           "security-officer", *s.admin, "--json").out)["id"]
    cli("role", "review", "--dir", "ca", str(grant), "--approve", *s.auditor)
    return s


@pytest.fixture(scope="session")
def ca_made(tokens: Tokens, tmp_path_factory: pytest.TempPathFactory) -> CaSetup:
    """The ceremony, once: its keys stay on the session's tokens (labelled with its tag, which
    no test uses for a key of its own), its CA directory is copied for each test."""
    return _ceremony(Cli(tokens, tmp_path_factory.mktemp("ca-made")))


@pytest.fixture
def ca(cli: Cli, ca_made: CaSetup) -> CaSetup:
    """A CA of the test's own, as `_ceremony` leaves it: a copy of the CA directory (its
    database, audit log and checkpoint copies, CRLs) and of the files beside it. The officials'
    keys and certificates on the tokens are only read, never changed, by the tests."""
    shutil.copytree(ca_made.cli.cwd, cli.cwd, dirs_exist_ok=True)
    return CaSetup(cli, ca_made.dir, ca_made.tag)
