"""The card comes and goes, on a real PKCS#11 path that can vanish: finance's node reaches its
SoftHSM token through p11-kit's remote module (`p11-kit server` in front of SoftHSM, the node
loading p11-kit-client.so). Stopping the server is pulling the card; starting it again on the
same socket is putting it back. The daemon stays up, says so, keeps documents waiting, refuses
connections that need its key, and carries on by itself once the card is back."""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from demo_network import Demo  # noqa: E402
from demo_pki import setup  # noqa: E402  (demo_network.setup, its PKI made once per run)

CLIENT = next(iter(sorted(glob.glob("/usr/lib/*/pkcs11/p11-kit-client.so"))), "")
SOFTHSM = next(iter(sorted(glob.glob("/usr/lib/softhsm/libsofthsm2.so") +
                           glob.glob("/usr/lib/*/softhsm/libsofthsm2.so"))), "")


class Card:
    """`p11-kit server` for one SoftHSM token on a fixed socket, in its own process group
    (the server forks a child per client connection: the whole group is the card)."""

    def __init__(self, d: Demo, token: str) -> None:
        self.d, self.token = d, token
        self.socket = d.work / "p11kit.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def insert(self) -> None:
        log = open(self.d.work / "p11kit.log", "ab")  # noqa: SIM115 — the child keeps it
        self.proc = subprocess.Popen(
            ["p11-kit", "server", "-f", "-n", str(self.socket), "--provider", SOFTHSM,
             f"pkcs11:token={self.token}"], env=self.d.env, stdout=log, stderr=log,
            start_new_session=True)
        log.close()
        self.d.wait_for("p11-kit's socket", self.socket.exists)

    def pull(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(10)
        self.proc = None
        self.socket.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Demo, Card]]:
    assert CLIENT and SOFTHSM, "p11-kit-modules and softhsm2 are installed by tools/setup"
    d = Demo(tmp_path_factory.mktemp("vanish"))
    with contextlib.redirect_stdout(io.StringIO()):
        setup(d)
    card = Card(d, "finance-node")
    card.insert()
    d.env["P11_KIT_SERVER_ADDRESS"] = f"unix:path={card.socket}"
    cfg = d.work / "finance" / "exchanged.toml"
    events = d.work / "finance" / "alerts.txt"
    cfg.write_text(cfg.read_text().replace(
        "[pkcs11]\n", f'alert_command = ["sh", "-c", "echo $EXCHANGED_EVENT >> {events}"]\n\n'
                      f'[pkcs11]\nmodule = "{CLIENT}"\n'))
    with contextlib.redirect_stdout(io.StringIO()):
        d.start("finance")
        d.start("office")
    yield d, card
    with contextlib.redirect_stdout(io.StringIO()):
        d.stop()
    if card.proc is not None:
        card.pull()


def status(d: Demo, unit: str) -> dict[str, Any]:
    p = subprocess.run([sys.executable, "-m", "exchanged", "status", "--config",
                        str(d.work / unit / "exchanged.toml"), "--json"], cwd=d.work,
                       env=d.env, capture_output=True, text=True)
    return json.loads(p.stdout)  # type: ignore[no-any-return]


def send(d: Demo, unit: str, to: str, title: str, ok: bool = True) -> str:
    (d.work / "v.pdf").write_bytes(b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root "
                                   b"1 0 R>>\n%%EOF\n")
    (d.work / "v.txt").write_text("text\n")
    return d.x("send", "--config", str(d.work / unit / "exchanged.toml"), "--to", to,
               "--title", title, "--pdf", "v.pdf", "--editable", "v.txt", "--json",
               ok=ok, quiet=True)


def state(d: Demo, unit: str, doc: str) -> str:
    return str(d.item(unit, "outbox", doc).get("state"))


def test_the_card_goes_and_comes_back(net: tuple[Demo, Card]) -> None:
    d, card = net
    log = d.work / "finance" / "daemon.log"
    first = json.loads(send(d, "finance", "office", "before"))["doc_id"]
    d.wait_for("the first delivery", lambda: state(d, "finance", first) == "delivered")
    assert status(d, "finance")["token"]["present"]
    # A document queued while office is down, to be waiting when the card goes.
    d.daemons["office"].terminate()
    d.daemons["office"].wait(30)
    waiting = json.loads(send(d, "finance", "office", "queued before the card went"))["doc_id"]
    d.wait_for("a failed attempt", lambda: d.item("finance", "outbox", waiting)["attempts"])

    card.pull()
    s = d.wait_for("finance to notice", lambda: (s := status(d, "finance")) and
                   not s["token"]["present"] and s, timeout=30)
    assert any("token is not present" in p for p in s["problems"]), s["problems"]  # type: ignore[index]
    assert d.daemons["finance"].poll() is None  # still up
    d.wait_for("the alert", lambda: "token-missing" in (d.work / "finance" /
                                                        "alerts.txt").read_text())
    with contextlib.redirect_stdout(io.StringIO()):
        d.start("office")
    # What needs the key is refused with the reason; nothing is lost.
    out = send(d, "finance", "office", "while the card is out", ok=False)
    assert "token is not present" in out, out
    doc = json.loads(send(d, "office", "finance", "to a node without its card"))["doc_id"]
    time.sleep(3)
    assert state(d, "office", doc) == "queued"
    assert state(d, "finance", waiting) == "queued"  # it waits for the card
    audit = subprocess.run([sys.executable, "-c", "import sqlite3,sys; print(sqlite3.connect("
                            "sys.argv[1]).execute(\"SELECT count(*) FROM audit WHERE action = "
                            "'tls-failed' AND details LIKE '%token-missing%'\").fetchone()[0])",
                            str(d.work / "finance" / "data" / "node.db")],
                           capture_output=True, text=True)
    assert int(audit.stdout) >= 1, "the refused connection is recorded with its reason"

    card.insert()
    d.wait_for("finance to log in again", lambda: status(d, "finance")["token"]["present"],
               timeout=30)
    assert "the node's token is back" in log.read_text()
    d.wait_for("office's document", lambda: state(d, "office", doc) == "delivered", timeout=60)
    d.wait_for("finance's waiting document", lambda: state(d, "finance", waiting) ==
               "delivered", timeout=60)
    after = json.loads(send(d, "finance", "office", "after"))["doc_id"]
    d.wait_for("a new document", lambda: state(d, "finance", after) == "delivered")
    assert "token-back" in (d.work / "finance" / "alerts.txt").read_text()
    assert "the node's token is gone" in log.read_text()
    # Twice more: the recovery does not wear out.
    for i in range(2):
        card.pull()
        d.wait_for("gone", lambda: not status(d, "finance")["token"]["present"], timeout=30)
        card.insert()
        d.wait_for("back", lambda: status(d, "finance")["token"]["present"], timeout=30)
        doc = json.loads(send(d, "finance", "office", f"round {i}"))["doc_id"]
        d.wait_for("delivered", lambda doc=doc: state(d, "finance", doc) == "delivered")
