"""The exchange box through real daemons, tokens and TLS: three units (finance sends; office,
with its archives section and two divisions, receives; the district office, which office
manages, gets what office forwards), each act done by a person with their own token."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import io
import json
import re
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


class Box:
    """The network, with helpers that act as its people."""

    def __init__(self, d: Demo, paths: dict[str, str]) -> None:
        self.d, self.paths = d, paths
        (d.work / "doc.pdf").write_bytes(b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\n"
                                         b"trailer<</Root 1 0 R>>\n%%EOF\n")
        (d.work / "doc.txt").write_text("A notice.\n")

    def x(self, *args: str, ok: bool = True) -> str:
        return self.d.x(*args, ok=ok, quiet=True)

    def at(self, unit: str) -> list[str]:
        return ["--config", self.paths[unit]]

    def send(self, *extra: str, unit: str = "finance", to: str = "office") -> dict[str, Any]:
        out = self.x("send", *self.at(unit), "--to", to, "--title", "A notice", "--pdf",
                     "doc.pdf", "--editable", "doc.txt", "--json", *extra)
        return json.loads(out)  # type: ignore[no-any-return]

    def arrived(self, doc: str, unit: str = "office") -> dict[str, Any]:
        return self.d.wait_for(f"{doc} at {unit}", lambda: self.show(doc, unit))  # type: ignore[return-value]

    def show(self, doc: str, unit: str = "office") -> dict[str, Any] | None:
        r = subprocess.run([sys.executable, "-m", "exchanged", "inbox", "show", doc,
                            *self.at(unit), "--json"], cwd=self.d.work, env=self.d.env,
                           capture_output=True, text=True)
        return json.loads(r.stdout) if r.returncode == 0 else None

    def outbox(self, doc: str, unit: str = "finance") -> dict[str, Any]:
        return json.loads(self.x("outbox", doc, *self.at(unit), "--json"))  # type: ignore[no-any-return]

    def act(self, who: str, *args: str, unit: str = "office", ok: bool = True) -> str:
        return self.x("inbox", *args, *self.at(unit), *self.d.op(who), ok=ok)


def _grant(d: Demo, cfg: str, pem: str, role: str, *division: str) -> None:
    gid = json.loads(d.x("role", "grant", "--config", cfg, pem, "--role", role, *division,
                         *d.op("admin"), "--json", quiet=True))["id"]
    d.x("role", "review", "--config", cfg, str(gid), "--approve", *d.op("auditor"), quiet=True)


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    d = Demo(tmp_path_factory.mktemp("box"))
    with contextlib.redirect_stdout(io.StringIO()):
        paths = setup(d, box=True)
        events = d.work / "office-events.txt"
        cfg = Path(paths["office"])
        cfg.write_text(cfg.read_text().replace(
            "[pkcs11]", f'alert_command = ["sh", "-c", "echo $EXCHANGED_EVENT '
                        f'$EXCHANGED_DOC_ID >> {events}"]\n\n[pkcs11]').replace(
            "[office_hours]", "[reminders]\nurgent_every_minutes = 1\n\n[office_hours]"))
        for unit in ("finance", "office", "district"):
            d.start(unit)
    _grant(d, paths["office"], "receiver.pem", "registrar")
    _grant(d, paths["office"], "fin-receiver.pem", "receiver", "--division", "Finance Division")
    _grant(d, paths["office"], "per-receiver.pem", "receiver", "--division",
           "Personnel Division")
    _grant(d, paths["district"], "district-registrar.pem", "registrar")
    yield Box(d, paths)
    with contextlib.redirect_stdout(io.StringIO()):
        d.stop()


def openssl_verify(b: Box, cms: bytes) -> dict[str, Any]:
    path = b.d.work / "check.cms"
    path.write_bytes(cms)
    out = subprocess.run(["openssl", "cms", "-verify", "-inform", "DER", "-in", str(path),
                          "-CAfile", str(b.d.work / "ca" / "ca.pem"), "-purpose", "any"],
                         capture_output=True, check=True).stdout
    return json.loads(out)  # type: ignore[no-any-return]


def test_register_distribute_and_each_division_signs_for_its_copy(box: Box) -> None:
    doc = box.send()["doc_id"]
    box.arrived(doc)
    # Only the archives section signs for what is in the unit's box.
    assert "not an active registrar" in box.act("fin-receiver", "sign-for", doc, ok=False)
    box.act("receiver", "sign-for", doc)
    out = box.act("receiver", "register", doc, "--json")
    number = json.loads(out)["number"]
    year = dt.datetime.now(dt.timezone(dt.timedelta(hours=8))).year
    assert re.fullmatch(rf"收文〔{year}〕\d{{4}}", number), number
    assert "registered, not signed-for" in box.act("receiver", "register", doc, ok=False)
    box.act("receiver", "distribute", doc, "--division", "Finance Division", "--division",
            "Personnel Division")
    # Each division's own receiver signs for its copy, and no one else's.
    refused = box.act("fin-receiver", "sign-for", doc, "--division", "Personnel Division",
                      ok=False)
    assert "not an active receiver or deputy-receiver of Personnel Division" in refused
    box.act("fin-receiver", "sign-for", doc, "--division", "Finance Division")
    box.act("per-receiver", "sign-for", doc, "--division", "Personnel Division")
    listed = json.loads(box.x("inbox", *box.at("office"), "--division", "Finance Division",
                              "--json"))
    assert any(r["doc_id"] == doc and r["copy_state"] == "signed-for" for r in listed)
    # The sender sees who signed for what, each receipt checked by openssl alone.
    got = box.d.wait_for("three receipts at finance",
                         lambda: len(box.outbox(doc)["receipts"]) == 3 and box.outbox(doc))
    divisions = sorted(r["division"] for r in got["receipts"])  # type: ignore[index]
    assert divisions == ["", "Finance Division", "Personnel Division"]
    assert got["state"] == "signed-for"  # type: ignore[index]
    copy = next(r for r in got["receipts"] if r["division"] == "Finance Division")  # type: ignore[index]
    signed = openssl_verify(box, base64.b64decode(copy["receipt"]))
    assert signed["division"] == "Finance Division" and signed["doc_id"] == doc
    assert "Zhou Min" in copy["by_subject"]


def test_register_numbers_are_gap_free_under_concurrency_and_sigkill(box: Box) -> None:
    docs = [box.send()["doc_id"] for _ in range(8)]
    for doc in docs:
        box.arrived(doc)
        box.act("receiver", "sign-for", doc)

    def register(doc: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "exchanged", "inbox", "register", doc,
                                 *box.at("office"), *box.d.op("receiver"), "--json"],
                                cwd=box.d.work, env=box.d.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    first = [register(doc) for doc in docs[:4]]  # at once
    for p in first:
        p.communicate(timeout=60)
    # A SIGKILL of the daemon while registrations are under way: each is all or nothing.
    racing = [register(doc) for doc in docs[4:]]
    time.sleep(0.3)
    box.d.daemons["office"].send_signal(signal.SIGKILL)
    box.d.daemons["office"].wait()
    for p in racing:
        p.communicate(timeout=60)
    with contextlib.redirect_stdout(io.StringIO()):
        box.d.start("office")
    for doc in docs:
        if box.show(doc)["state"] == "signed-for":  # type: ignore[index]
            register(doc).communicate(timeout=60)
    numbers = sorted(int(box.show(doc)["register_number"][-4:]) for doc in docs)  # type: ignore[index]
    everything = sorted(int(r["register_number"][-4:]) for r in json.loads(
        box.x("inbox", *box.at("office"), "--json")) if r["register_number"])
    assert everything == list(range(1, len(everything) + 1)), everything  # no gap, no repeat
    assert len(set(numbers)) == len(docs)


def test_forward_to_a_managed_unit_keeps_the_original_and_its_custody(box: Box,
                                                                     tmp_path: Path) -> None:
    doc = box.send()["doc_id"]
    box.arrived(doc)
    box.act("receiver", "sign-for", doc)
    assert "manages" in box.act("receiver", "forward", doc, "--to", "finance", ok=False)
    box.act("receiver", "forward", doc, "--to", "district", "--note", "for your action")
    at_district = box.arrived(doc, "district")
    assert at_district["sender"] == "office" and at_district["origin"] == "finance"
    assert len(at_district["custody"]) == 1
    record = openssl_verify(box, base64.b64decode(at_district["custody"][0]))
    assert (record["action"], record["node"], record["to"], record["note"]) == \
        ("document-forward", "office", "district", "for your action")
    # The original sender's signature verifies at the final recipient, with openssl alone.
    out = tmp_path / "export"
    box.x("inbox", "export", doc, str(out), *box.at("district"))
    subprocess.run(["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in",
                    str(out / "manifest.cms"), "-content", str(out / "manifest.json"),
                    "-CAfile", str(box.d.work / "ca" / "ca.pem"), "-purpose", "any",
                    "-out", "/dev/null"], check=True, capture_output=True)
    signer = subprocess.run(["openssl", "cms", "-cmsout", "-print", "-inform", "DER", "-in",
                             str(out / "manifest.cms")], capture_output=True, text=True).stdout
    assert "node-finance" in signer
    box.act("district-registrar", "sign-for", doc, unit="district")
    assert box.show(doc)["state"] == "forwarded"  # type: ignore[index]


def test_a_classified_document_is_never_forwarded_outside(box: Box) -> None:
    doc = box.send("--classification", "secret", unit="office", to="office")["doc_id"]
    box.arrived(doc)
    box.act("receiver", "sign-for", doc)
    assert "A38" in box.act("receiver", "forward", doc, "--to", "district", ok=False)


def test_a_division_passes_a_document_to_the_archives_section(box: Box) -> None:
    doc = box.send("--division", "Finance Division")["doc_id"]
    assert box.arrived(doc)["box"] == "Finance Division"
    # The division's box is its receiver's, not the archives section's.
    assert "receiver or deputy-receiver of Finance Division" in box.act(
        "receiver", "sign-for", doc, ok=False)
    box.act("fin-receiver", "sign-for", doc)
    assert "archives section registers" in box.act("receiver", "register", doc, ok=False)
    box.act("fin-receiver", "forward", doc, "--to-registrar")
    assert box.show(doc)["box"] == ""  # type: ignore[index]
    box.act("receiver", "register", doc)
    assert box.show(doc)["state"] == "registered"  # type: ignore[index]


def test_a_return_reaches_the_sender_with_its_reason_and_a_correction_follows(box: Box
                                                                                ) -> None:
    doc = box.send()["doc_id"]
    box.arrived(doc)
    box.act("receiver", "return", doc, "--reason", "the PDF is not the sealed copy")
    got = box.d.wait_for("the return at finance",
                         lambda: box.outbox(doc)["state"] == "returned" and box.outbox(doc))
    assert got["return_reason"] == "the PDF is not the sealed copy"  # type: ignore[index]
    assert "Liu Yang" in got["returned_by"]  # type: ignore[index]
    fixed = box.send("--corrects", doc)["doc_id"]
    assert box.arrived(fixed)["metadata"]["corrects"] == doc
    other = box.send()["doc_id"]  # not returned: nothing to correct
    assert "not returned" in box.x("send", *box.at("finance"), "--to", "office", "--title",
                                   "x", "--pdf", "doc.pdf", "--editable", "doc.txt",
                                   "--corrects", other, ok=False)


def test_urgent_outside_office_hours_needs_a_phone_call(box: Box) -> None:
    cfg = Path(box.paths["finance"])
    original = cfg.read_text()
    now = dt.datetime.now(dt.timezone(dt.timedelta(hours=8)))
    closed = (now + dt.timedelta(hours=2)).strftime("%H:00")
    cfg.write_text(original.replace('start = "00:00"', f'start = "{closed}"').replace(
        'end = "00:00"', f'end = "{(now + dt.timedelta(hours=3)).strftime("%H:00")}"'))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            box.d.daemons["finance"].terminate()
            box.d.daemons["finance"].wait(30)
            box.d.start("finance")
        out = box.x("send", *box.at("finance"), "--to", "office", "--title", "x", "--pdf",
                    "doc.pdf", "--editable", "doc.txt", "--urgency", "urgent", ok=False)
        assert "phone call" in out and "A20" in out
        doc = box.send("--urgency", "urgent", "--phoned", "Liu Yang, 21:05")["doc_id"]
        assert box.arrived(doc)["metadata"]["phoned"] == "Liu Yang, 21:05"
    finally:
        cfg.write_text(original)
        with contextlib.redirect_stdout(io.StringIO()):
            box.d.daemons["finance"].terminate()
            box.d.daemons["finance"].wait(30)
            box.d.start("finance")


def test_overdue_urgent_documents_come_first_and_are_reminded(box: Box) -> None:
    past = (dt.date.today() - dt.timedelta(days=2)).isoformat()
    doc = box.send("--urgency", "extra-urgent", "--deadline", past)["doc_id"]
    box.arrived(doc)
    due = json.loads(box.x("due", *box.at("office"), "--json"))
    assert due[0]["doc_id"] == doc and due[0]["status"] == "overdue"
    events = box.d.work / "office-events.txt"
    box.d.wait_for("the reminder", lambda: events.exists() and
                   f"urgent-pending {doc}" in events.read_text(), timeout=30)


def test_outgoing_numbers_auto_and_unique(box: Box) -> None:
    a = box.send("--number", "auto")
    b = box.send("--number", "auto")
    na, nb = int(a["number"][-4:]), int(b["number"][-4:])
    assert nb == na + 1 and a["number"].startswith("finance发〔")
    assert "numbers are unique" in box.x("send", *box.at("finance"), "--to", "office",
                                         "--title", "x", "--pdf", "doc.pdf", "--editable",
                                         "doc.txt", "--number", a["number"], ok=False)


def test_a_paper_original_is_awaited_until_received(box: Box) -> None:
    doc = box.send("--paper-original")["doc_id"]
    box.arrived(doc)
    listed = {r["doc_id"]: r for r in json.loads(box.x("inbox", *box.at("office"), "--json"))}
    assert listed[doc]["paper_received_at"] is None
    box.act("receiver", "paper-received", doc)
    assert box.show(doc)["paper_received_by"]  # type: ignore[index]
    assert "recorded already" in box.act("receiver", "paper-received", doc, ok=False)


def test_an_archive_of_finished_documents_verifies_offline_and_with_openssl(box: Box,
                                                                           tmp_path: Path
                                                                           ) -> None:
    out = tmp_path / "archive"
    refused = box.x("archive", "export", str(out), *box.at("office"),
                    *box.d.op("fin-receiver"), ok=False)
    assert "not an active registrar or auditor" in refused
    box.x("archive", "export", str(out), *box.at("office"), *box.d.op("receiver"))
    listed = json.loads((out / "archive.json").read_text())
    assert listed["documents"] and listed["unit"] == "office"
    box.x("audit", "verify", str(out))
    # Every signature in it, by openssl alone: the archive's list, each package, each receipt.
    ca = str(box.d.work / "ca" / "ca.pem")
    subprocess.run(["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in",
                    str(out / "archive.cms"), "-content", str(out / "archive.json"), "-CAfile",
                    ca, "-purpose", "any", "-out", "/dev/null"], check=True, capture_output=True)
    checked = 0
    for d in listed["documents"]:
        base = out / "documents" / d["dir"]
        subprocess.run(["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in",
                        str(base / "manifest.cms"), "-content", str(base / "manifest.json"),
                        "-CAfile", ca, "-purpose", "any", "-out", "/dev/null"], check=True,
                       capture_output=True)
        for name in d["signatures"]:
            subprocess.run(["openssl", "cms", "-verify", "-inform", "DER", "-in",
                            str(base / name), "-CAfile", ca, "-purpose", "any", "-out",
                            "/dev/null"], check=True, capture_output=True)
            checked += 1
    assert checked >= 5
    # One byte changed anywhere is found.
    victim = out / "documents" / listed["documents"][0]["dir"] / "document.pdf"
    victim.write_bytes(victim.read_bytes() + b" ")
    out_ = box.x("audit", "verify", str(out), ok=False)
    assert "changed" in out_ or "tampered" in out_


def test_a_nodes_log_is_shown_and_exported_to_its_auditors_only(box: Box,
                                                                tmp_path: Path) -> None:
    refused = box.x("audit", "show", *box.at("office"), *box.d.op("receiver"), ok=False)
    assert "not an active auditor" in refused
    rows = json.loads(box.x("audit", "show", *box.at("office"), "--action",
                            "document-register", *box.d.op("auditor"), "--json"))
    assert rows and all(r["action"] == "document-register" for r in rows)
    out = tmp_path / "evidence"
    box.x("audit", "export", *box.at("office"), "--action", "document-forward", "--out",
          str(out), *box.d.op("auditor"))
    box.x("audit", "verify", str(out))
    one = next((out / "openssl").glob("*.cms.der"))
    subprocess.run(["openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in", str(one),
                    "-content", str(one).replace(".cms.der", ".json"), "-CAfile",
                    str(out / "issuer.pem"), "-purpose", "any", "-out", "/dev/null"],
                   check=True, capture_output=True)
