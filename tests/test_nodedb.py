"""The node's store (exchanged/store/nodedb.py): blobs, outbox, inbox, crash safety.

Real SQLite files and real fsync in tmp_path; the crash test kills a real process with SIGKILL.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from exchanged.store.nodedb import (
    BACKOFF_CAP,
    BLOB_MODE,
    NodeStore,
    StoreError,
    backoff_delay,
)

ROOT = Path(__file__).resolve().parent.parent
FAR = 1e18  # a `now` after every scheduled attempt


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = NodeStore.open(tmp_path / "node", rng=random.Random(7))
    yield s
    s.close()


def put(s: NodeStore, data: bytes) -> str:
    with s.blob_writer() as w:
        w.write(data)
        return w.commit()


def temps(s: NodeStore) -> list[Path]:
    return list(s.blobs.glob(".tmp-*"))


def code_of(excinfo: pytest.ExceptionInfo[StoreError]) -> str:
    return excinfo.value.code


def enq(s: NodeStore, doc_id: str, data: bytes = b"package", urgency: str | None = None,
        recipient: str = "unit-b") -> bool:
    sha = put(s, data)
    meta = {"title": doc_id} | ({"urgency": urgency} if urgency else {})
    return s.enqueue(doc_id=doc_id, recipient=recipient, metadata=meta, package_sha256=sha,
                     size=len(data))


# -- opening ------------------------------------------------------------------------------------


def test_open_creates_store_with_durable_settings(tmp_path: Path) -> None:
    with pytest.raises(StoreError) as e:
        NodeStore.open(tmp_path / "nothing", create=False)
    assert code_of(e) == "no-store"
    with NodeStore.open(tmp_path / "n") as s:
        assert s.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert s.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert s.db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        tables = {r[0] for r in s.db.execute("SELECT name FROM sqlite_master")}
        assert {"outbox", "inbox", "meta", "audit", "audit_head", "roles",
                "suspensions"} <= tables
        assert s.blobs.is_dir()
        enq(s, "d1")
    with NodeStore.open(tmp_path / "n", create=False) as s:  # reopen keeps everything
        assert s.out_item("d1")["state"] == "queued"


# -- blobs --------------------------------------------------------------------------------------


def test_blob_commit_and_idempotency(store: NodeStore) -> None:
    data = os.urandom(300_000)
    with store.blob_writer() as w:
        for i in range(0, len(data), 4096):
            w.write(memoryview(data)[i:i + 4096])
        sha = w.commit()
    assert sha == hashlib.sha256(data).hexdigest() == w.sha256
    path = store.blob_path(sha)
    assert path == store.blobs / sha[:2] / sha and path.read_bytes() == data
    assert stat.S_IMODE(path.stat().st_mode) == BLOB_MODE
    before = path.stat()
    assert put(store, data) == sha  # same content, same name; the file is left alone
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert temps(store) == []
    store.check_blob(sha)
    with pytest.raises(StoreError) as e:
        w.write(b"more")
    assert code_of(e) == "closed"


def test_recommitting_repairs_a_damaged_blob(store: NodeStore) -> None:
    data = b"x" * 10_000
    sha = put(store, data)
    path = store.blob_path(sha)
    path.chmod(0o640)
    path.write_bytes(b"y" * 10_000)  # same size, other content
    with pytest.raises(StoreError):
        store.check_blob(sha)
    assert put(store, data) == sha
    store.check_blob(sha)
    assert temps(store) == []


def test_blob_streams_100_mb_in_constant_memory(store: NodeStore) -> None:
    chunk = os.urandom(64 * 1024)
    expect = hashlib.sha256()
    tracemalloc.start()
    try:
        with store.blob_writer(max_size=200 * 2**20) as w:
            for i in range(1600):  # 1600 x 64 KiB = 100 MiB
                piece = chunk[i % 64:] + chunk[:i % 64]  # every chunk different
                w.write(piece)
                expect.update(piece)
            sha = w.commit()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * 2**20, f"peak {peak} bytes while streaming 100 MiB"
    assert sha == expect.hexdigest()
    assert store.blob_path(sha).stat().st_size == 100 * 2**20


def test_abort_leaves_no_temporary_file(store: NodeStore) -> None:
    w = store.blob_writer()
    w.write(b"partial")
    assert len(temps(store)) == 1
    w.abort()
    w.abort()  # twice is harmless
    assert temps(store) == []
    with pytest.raises(RuntimeError), store.blob_writer() as w2:
        w2.write(b"partial")
        raise RuntimeError("connection dropped")
    with store.blob_writer() as w3:  # left without commit: abandoned too
        w3.write(b"never committed")
    assert temps(store) == []
    assert list(store.blobs.glob("*/*")) == []


def test_too_large_is_refused_and_cleaned_up(store: NodeStore) -> None:
    with store.blob_writer(max_size=10) as w:
        w.write(b"12345")
        w.write(b"67890")  # exactly the limit is fine
        w.commit()
    with pytest.raises(StoreError) as e, store.blob_writer(max_size=10) as w:
        w.write(b"123456")
        w.write(b"789012")
    assert code_of(e) == "too-large"
    assert temps(store) == []


def test_announced_hash_must_match(store: NodeStore) -> None:
    with pytest.raises(StoreError) as e, store.blob_writer() as w:
        w.write(b"damaged in transit")
        w.commit(expect_sha256="0" * 64)
    assert code_of(e) == "hash-mismatch"
    assert temps(store) == [] and list(store.blobs.glob("*/*")) == []
    with store.blob_writer() as w:
        w.write(b"ok")
        assert w.commit(hashlib.sha256(b"ok").hexdigest())


def test_corrupt_and_missing_blobs_are_detected(store: NodeStore) -> None:
    sha = put(store, os.urandom(5000))
    path = store.blob_path(sha)
    path.chmod(0o640)
    with open(path, "r+b") as f:  # flip one bit in the middle
        f.seek(2500)
        b = f.read(1)
        f.seek(2500)
        f.write(bytes([b[0] ^ 0x01]))
    with pytest.raises(StoreError) as e:
        store.check_blob(sha)
    assert code_of(e) == "corrupt-blob"
    assert str(path) in str(e.value) and "restore" in str(e.value)
    path.unlink()
    with pytest.raises(StoreError) as e:
        store.check_blob(sha)
    assert code_of(e) == "missing-blob" and str(path) in str(e.value)
    for bad in ("../../etc/passwd", "A" * 64, "ab", sha + "0"):
        with pytest.raises(StoreError) as e:
            store.blob_path(bad)
        assert code_of(e) == "bad-hash"


def test_rows_need_their_blob_in_place(store: NodeStore) -> None:
    for call in (store.enqueue, store.receive):
        content = f"never written for {call.__name__}".encode()
        absent = hashlib.sha256(content).hexdigest()
        kw = {"doc_id": "d", "metadata": {}, "package_sha256": absent, "size": len(content)}
        kw |= {"recipient": "b"} if call == store.enqueue else {"sender": "b"}
        with pytest.raises(StoreError) as e:
            call(**kw)  # type: ignore[arg-type]
        assert code_of(e) == "missing-blob"
        assert put(store, content) == absent
        kw["size"] = 99
        with pytest.raises(StoreError) as e:
            call(**kw)  # type: ignore[arg-type]
        assert code_of(e) == "size-mismatch"
    assert store.outbox() == [] and store.inbox() == []


def test_sweep_temp(store: NodeStore) -> None:
    w = store.blob_writer()
    w.write(b"left by a crash")
    w._file.close()  # the crash: the process is gone, the file stays
    (store.blobs / ".tmp-old.part").write_bytes(b"older")
    os.utime(store.blobs / ".tmp-old.part", (time.time() - 3600,) * 2)
    assert store.sweep_temp(older_than=600) == 1
    assert store.sweep_temp() == 1
    assert temps(store) == []


# -- outbox -------------------------------------------------------------------------------------

STATES = ("queued", "sending", "delivered", "signed-for", "rejected", "failed")
# method -> (states it may be called in, the state it leads to)
LEGAL = {
    "mark_sending": ({"queued"}, "sending"),
    "mark_delivered": ({"sending"}, "delivered"),
    "mark_signed_for": ({"delivered"}, "signed-for"),
    "mark_rejected": ({"sending", "delivered"}, "rejected"),
    "schedule_retry": ({"queued", "sending"}, "queued"),
    "requeue": ({"failed"}, "queued"),
}


def call(s: NodeStore, method: str, doc_id: str) -> None:
    args: dict[str, tuple[object, ...]] = {
        "mark_sending": (), "mark_delivered": (b"delivery-receipt",),
        "mark_signed_for": (b"signed-receipt",), "mark_rejected": ("refused", "wrong unit"),
        "schedule_retry": ("connection refused", time.time()), "requeue": (time.time(),)}
    getattr(s, method)(doc_id, *args[method])


def bring_to(s: NodeStore, doc_id: str, state: str) -> None:
    enq(s, doc_id)
    path = {"queued": [], "sending": ["mark_sending"],
            "delivered": ["mark_sending", "mark_delivered"],
            "signed-for": ["mark_sending", "mark_delivered", "mark_signed_for"],
            "rejected": ["mark_sending", "mark_rejected"]}
    if state == "failed":
        s.max_attempts, keep = 1, s.max_attempts
        assert s.schedule_retry(doc_id, "gave up", time.time()) is None
        s.max_attempts = keep
    else:
        for m in path[state]:
            call(s, m, doc_id)
    assert s.out_item(doc_id)["state"] == state


@pytest.mark.parametrize("method", sorted(LEGAL))
@pytest.mark.parametrize("state", STATES)
def test_outbox_transitions(store: NodeStore, method: str, state: str) -> None:
    bring_to(store, "doc", state)
    allowed, to = LEGAL[method]
    before = store.out_item("doc")
    if state in allowed:
        call(store, method, "doc")
        assert store.out_item("doc")["state"] == to
    else:
        with pytest.raises(StoreError) as e:
            call(store, method, "doc")
        assert code_of(e) == "bad-state"
        assert state in str(e.value)
        assert store.out_item("doc") == before  # nothing changed


@pytest.mark.parametrize("method", sorted(LEGAL))
def test_outbox_unknown_document(store: NodeStore, method: str) -> None:
    with pytest.raises(StoreError) as e:
        call(store, method, "nope")
    assert code_of(e) == "not-found"


def test_outbox_records_receipts_and_rejections(store: NodeStore) -> None:
    bring_to(store, "a", "signed-for")
    row = store.out_item("a")
    assert row["delivery_receipt"] == b"delivery-receipt"
    assert row["signed_for_receipt"] == b"signed-receipt"
    assert row["delivered_at"] <= row["signed_for_at"]
    bring_to(store, "b", "rejected")
    row = store.out_item("b")
    assert (row["reject_code"], row["reject_message"]) == ("refused", "wrong unit")
    enq(store, "c")
    store.mark_sending("c")
    store.mark_delivered("c", None)  # a peer without delivery receipts
    assert store.out_item("c")["delivery_receipt"] is None
    assert [r["doc_id"] for r in store.outbox("delivered")] == ["c"]
    with pytest.raises(StoreError) as e:
        store.outbox("lost")
    assert code_of(e) == "bad-state"


def test_enqueue_is_idempotent_by_doc_id(store: NodeStore) -> None:
    assert enq(store, "d1", b"first") is True
    assert enq(store, "d1", b"first") is False
    assert len(store.outbox()) == 1
    with pytest.raises(StoreError) as e:
        enq(store, "d1", b"second")
    assert code_of(e) == "id-conflict"
    with pytest.raises(StoreError) as e:
        enq(store, "d1", b"first", recipient="unit-c")
    assert code_of(e) == "id-conflict"
    with pytest.raises(StoreError) as e:
        enq(store, "d2", urgency="whenever")
    assert code_of(e) == "bad-metadata"
    assert [r["doc_id"] for r in store.outbox()] == ["d1"]
    assert store.out_item("d1")["metadata"] == {"title": "d1"}


def test_due_orders_by_urgency_then_age(store: NodeStore) -> None:
    assert store.due(FAR) == [] and store.next_due_time() is None
    order = [("n1", "normal"), ("u1", "urgent"), ("x1", "extra-urgent"), ("n2", None),
             ("u2", "urgent"), ("x2", "extra-urgent")]
    for doc_id, urgency in order:
        enq(store, doc_id, doc_id.encode(), urgency)
    now = time.time()
    items = store.due(now)
    assert [i.doc_id for i in items] == ["x1", "x2", "u1", "u2", "n1", "n2"]
    assert items[0].urgency == "extra-urgent" and items[-1].urgency == "normal"
    assert items[0].package_sha256 == hashlib.sha256(b"x1").hexdigest() and items[0].size == 2
    assert [i.doc_id for i in store.due(now, limit=2)] == ["x1", "x2"]
    first = store.out_item("n1")["created_at"]
    assert store.next_due_time() == first
    # a retried document waits for its time; what is sending is not due
    at = store.schedule_retry("x1", "timeout", now)
    assert at is not None and now <= at <= now + 2
    store.mark_sending("x2")
    assert "x1" not in [i.doc_id for i in store.due(now)]
    assert "x2" not in [i.doc_id for i in store.due(FAR)]
    assert [i.doc_id for i in store.due(at)][0] == "x1"
    for doc_id in ("u1", "u2", "n1", "n2"):
        store.mark_sending(doc_id)
    assert store.next_due_time() == at


def test_backoff_delay_is_exponential_with_full_jitter() -> None:
    rng = random.Random(1)
    for attempts in range(1, 15):
        ceiling = min(BACKOFF_CAP, 2.0 * 2 ** (attempts - 1))
        samples = [backoff_delay(attempts, rng) for _ in range(400)]
        assert all(0 <= d <= ceiling for d in samples)
        assert max(samples) > 0.9 * ceiling  # spread over the whole range ...
        assert min(samples) < 0.1 * ceiling  # ... down to zero (full jitter)
    assert backoff_delay(100_000, rng) <= BACKOFF_CAP  # no overflow, capped


def test_schedule_retry_persists_and_gives_up(tmp_path: Path) -> None:
    d = tmp_path / "node"
    with NodeStore.open(d, max_attempts=5, rng=random.Random(3)) as s:
        enq(s, "doc")
        now = time.time()
        delays = []
        for n in range(1, 5):
            s.mark_sending("doc")
            at = s.schedule_retry("doc", f"refused #{n}", now)
            assert at is not None
            delays.append(at - now)
            assert 0 <= at - now <= min(BACKOFF_CAP, 2.0 * 2 ** (n - 1))
        row = s.out_item("doc")
        assert (row["state"], row["attempts"], row["last_error"]) == ("queued", 4, "refused #4")
        assert row["next_attempt_at"] == at
    with NodeStore.open(d, create=False, max_attempts=5) as s:  # persisted
        row = s.out_item("doc")
        assert (row["attempts"], row["next_attempt_at"]) == (4, at)
        assert s.next_due_time() == at
        assert s.schedule_retry("doc", "refused #5", now) is None  # the 5th attempt: give up
        row = s.out_item("doc")
        assert (row["state"], row["attempts"], row["last_error"]) == ("failed", 5, "refused #5")
        assert s.due(FAR) == [] and s.next_due_time() is None
        s.requeue("doc", now)  # an operator tries again: attempts counted afresh
        row = s.out_item("doc")
        assert (row["state"], row["attempts"], row["last_error"]) == ("queued", 0, None)
        assert row["next_attempt_at"] == now


def test_schedule_retry_gives_up_after_max_age(tmp_path: Path) -> None:
    with NodeStore.open(tmp_path / "n", max_age=3600) as s:
        enq(s, "doc")
        queued = s.out_item("doc")["queued_at"]
        assert s.schedule_retry("doc", "down", queued + 3599) is not None
        assert s.schedule_retry("doc", "still down", queued + 3600) is None
        assert s.out_item("doc")["state"] == "failed"


def test_recover_requeues_what_a_crash_left_sending(tmp_path: Path) -> None:
    d = tmp_path / "node"
    s = NodeStore.open(d)
    for doc_id in ("a", "b", "c"):
        enq(s, doc_id, doc_id.encode())
    s.mark_sending("a")
    s.mark_sending("b")
    s.mark_delivered("b", b"r")
    s.mark_sending("c")
    s.db.conn.close()  # the crash: no state change on the way out
    with NodeStore.open(d) as s:
        before = time.time()
        assert s.recover() == 2
        assert {r["doc_id"]: r["state"] for r in s.outbox()} == {
            "a": "queued", "b": "delivered", "c": "queued"}
        assert [i.doc_id for i in s.due(time.time())] == ["a", "c"]
        assert s.out_item("a")["attempts"] == 0  # a crash is not the peer's failure
        assert before <= s.out_item("a")["next_attempt_at"] <= time.time()
        assert s.recover() == 0


# -- inbox --------------------------------------------------------------------------------------


def recv(s: NodeStore, doc_id: str, data: bytes = b"pkg", sender: str = "unit-a") -> bool:
    sha = put(s, data)
    return s.receive(doc_id=doc_id, sender=sender, metadata={"urgency": "urgent"},
                     package_sha256=sha, size=len(data), delivery_receipt=b"dr-" + data)


def test_inbox_is_idempotent_by_sender_and_doc_id(store: NodeStore) -> None:
    assert recv(store, "d1") is True
    assert recv(store, "d1") is False
    assert len(store.inbox()) == 1
    row = store.in_item("d1")
    assert (row["sender"], row["state"], row["urgency"]) == ("unit-a", "received", "urgent")
    assert row["delivery_receipt"] == b"dr-pkg"  # what to acknowledge a repeat with
    with pytest.raises(StoreError) as e:
        recv(store, "d1", b"other package")
    assert code_of(e) == "id-conflict"
    assert len(store.inbox()) == 1
    # another sender may choose the same id: a different document
    assert recv(store, "d1", b"other package", sender="unit-c") is True
    with pytest.raises(StoreError) as e:
        store.in_item("d1")
    assert code_of(e) == "ambiguous"
    assert store.in_item("d1", sender="unit-c")["package_sha256"] == \
        hashlib.sha256(b"other package").hexdigest()
    with pytest.raises(StoreError) as e:
        store.in_item("d9")
    assert code_of(e) == "not-found"


def test_inbox_signed_for(store: NodeStore) -> None:
    recv(store, "d1")
    store.mark_in_signed_for("d1", b"receipt", "1a2b")
    row = store.in_item("d1")
    assert (row["state"], row["signed_for_receipt"], row["signed_for_by"]) == \
        ("signed-for", b"receipt", "1a2b")
    assert row["signed_for_at"] >= row["received_at"]
    with pytest.raises(StoreError) as e:
        store.mark_in_signed_for("d1", b"again", "1a2b")
    assert code_of(e) == "bad-state"
    with pytest.raises(StoreError) as e:
        store.mark_in_signed_for("nope", b"r", "1a2b")
    assert code_of(e) == "not-found"
    recv(store, "d1", b"x", sender="unit-c")
    with pytest.raises(StoreError) as e:
        store.mark_in_signed_for("d1", b"r", "1a2b")
    assert code_of(e) == "ambiguous"
    store.mark_in_signed_for("d1", b"r", "1a2b", sender="unit-c")
    assert [r["sender"] for r in store.inbox("signed-for")] == ["unit-a", "unit-c"]
    assert store.inbox("received") == []


def test_signed_for_receipts_go_back_store_and_forward(store: NodeStore) -> None:
    recv(store, "d1")
    recv(store, "d2", b"two")
    recv(store, "d3", b"three", sender="unit-c")
    assert store.receipts_to_return() == [] and store.next_due_time() is None
    with pytest.raises(StoreError) as e:
        store.mark_receipt_returned(1, True)
    assert code_of(e) == "bad-state"  # nothing signed for yet
    store.mark_in_signed_for("d1", b"receipt-1", "1a2b")
    store.mark_in_signed_for("d3", b"receipt-3", "1a2b")
    now = time.time()
    [first] = store.receipts_to_return("unit-a", now)
    assert {k: first[k] for k in ("doc_id", "sender", "kind", "receipt", "attempts")} == \
        {"doc_id": "d1", "sender": "unit-a", "kind": "signed-for", "receipt": b"receipt-1",
         "attempts": 0}
    assert [r["doc_id"] for r in store.receipts_to_return(now=now)] == ["d1", "d3"]
    assert store.next_due_time(recipient="unit-a") == store.in_item("d1")["signed_for_at"]
    # refused: tried again later, with backoff
    at = store.mark_receipt_returned(first["id"], False, error="unknown-document", now=now)
    assert at is not None and now <= at <= now + 2
    assert store.receipts_to_return("unit-a", now) == []
    assert store.next_due_time(recipient="unit-a") == at
    row = store.receipts_to_return("unit-a", at)[0]
    assert row["attempts"] == 1 and store.receipts_for("d1")[0]["error"] == "unknown-document"
    assert store.mark_receipt_returned(first["id"], True, now=at) is None
    assert store.receipts_to_return("unit-a", FAR) == []
    assert store.next_due_time(recipient="unit-a") is None
    assert store.receipts_for("d1")[0]["returned_at"] == at
    with pytest.raises(StoreError) as e:
        store.mark_receipt_returned(first["id"], True)
    assert code_of(e) == "bad-state"  # already accepted
    [third] = store.receipts_to_return("unit-c", FAR)
    store.mark_receipt_returned(third["id"], True)
    assert store.receipts_to_return(now=FAR) == []


def test_due_and_next_due_time_per_recipient(store: NodeStore) -> None:
    enq(store, "b1", b"1", recipient="unit-b")
    enq(store, "c1", b"2", recipient="unit-c", urgency="extra-urgent")
    assert [i.doc_id for i in store.due(FAR)] == ["c1", "b1"]
    assert [i.doc_id for i in store.due(FAR, recipient="unit-b")] == ["b1"]
    assert store.due(FAR, recipient="unit-x") == []
    at = store.schedule_retry("c1", "down", time.time() + 100)
    assert store.next_due_time(recipient="unit-c") == at
    assert store.next_due_time(recipient="unit-b") == store.out_item("b1")["next_attempt_at"]
    assert store.next_due_time(recipient="unit-x") is None
    assert store.next_due_time() == store.out_item("b1")["next_attempt_at"]


# -- atomicity with the audit log, statistics ---------------------------------------------------


def test_change_and_audit_entry_commit_together(store: NodeStore) -> None:
    enq(store, "d")
    store.mark_sending("d")
    with pytest.raises(RuntimeError), store.transaction():
        store.mark_delivered("d", b"r")
        store.audit.append(action="document-delivered", obj="d")
        raise RuntimeError("crash before commit")
    assert store.out_item("d")["state"] == "sending"
    assert list(store.audit.rows()) == []
    with store.transaction():
        store.mark_delivered("d", b"r")
        store.audit.append(action="document-delivered", obj="d")
        # a refused change inside the caller's transaction undoes only itself
        with pytest.raises(StoreError):
            store.mark_sending("d")
        with pytest.raises(StoreError):
            enq(store, "d", b"another package")
    assert store.out_item("d")["state"] == "delivered"
    assert [r["action"] for r in store.audit.rows()] == ["document-delivered"]


def test_statistics(store: NodeStore) -> None:
    enq(store, "a", b"1234")
    enq(store, "b", b"1234")  # the same package: one blob
    recv(store, "c", b"123456")
    store.mark_sending("a")
    st_ = store.statistics()
    assert st_["outbox"]["queued"] == 1 and st_["outbox"]["sending"] == 1
    assert st_["outbox"]["failed"] == 0
    assert st_["inbox"] == {"received": 1, "signed-for": 0, "registered": 0, "distributed": 0,
                            "returned": 0, "forwarded": 0}
    assert (st_["blobs"], st_["blob_bytes"]) == (2, 10)


# -- crash safety -------------------------------------------------------------------------------

WORKER = textwrap.dedent("""
    import random, sys
    from pathlib import Path
    from exchanged.store.nodedb import NodeStore

    d, seed = Path(sys.argv[1]), int(sys.argv[2])
    r = random.Random(seed)
    s = NodeStore.open(d)
    s.sweep_temp()
    s.recover()
    print("ready", flush=True)
    i = 0
    while True:
        size = r.choice([1, 100, 70_000, 1_500_000, 4_000_000])
        with s.blob_writer() as w:  # the data is made while the blob is written
            for k in range(0, size, 65536):
                w.write(r.randbytes(min(65536, size - k)))
            sha = w.commit()
        size = w.size
        doc = f"{seed}-{i}"
        meta = {"urgency": r.choice(["normal", "urgent"])}
        if i % 2:
            s.receive(doc_id=doc, sender="peer", metadata=meta, package_sha256=sha,
                      size=size)
            print("in", doc, sha, flush=True)
        else:
            with s.transaction():
                s.enqueue(doc_id=doc, recipient="peer", metadata=meta, package_sha256=sha,
                          size=size)
                s.audit.append(action="document-enqueue", obj=doc)
            print("out", doc, sha, flush=True)
            if i % 4 == 0:
                s.mark_sending(doc)
        i += 1
""")


def test_sigkill_at_a_random_moment_loses_nothing_acknowledged(tmp_path: Path) -> None:
    d = tmp_path / "node"
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    rng = random.Random()
    acked: dict[tuple[str, str], str] = {}
    for round_ in range(6):
        seed = rng.randrange(1 << 30)
        p = subprocess.Popen([sys.executable, str(script), str(d), str(seed)], env=env,
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None
        assert p.stdout.readline() == "ready\n", "the worker did not start"
        for _ in range(rng.randint(1, 6)):
            line = p.stdout.readline()
            kind, doc, sha = line.split()
            acked[kind, doc] = sha
        time.sleep(rng.uniform(0, 0.08))
        p.send_signal(signal.SIGKILL)
        for line in p.stdout:  # acknowledged before it died
            kind, doc, sha = line.split()
            acked[kind, doc] = sha
        p.stdout.close()
        assert p.wait() == -signal.SIGKILL
        conn = sqlite3.connect(str(d / "node.db"))
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok", f"seed {seed}"
        conn.close()
        with NodeStore.open(d, create=False) as s:
            have = {("out", r["doc_id"]): r["package_sha256"] for r in s.outbox()}
            have |= {("in", r["doc_id"]): r["package_sha256"] for r in s.inbox()}
            missing = {k for k in acked if have.get(k) != acked[k]}
            assert not missing, f"round {round_}, seed {seed}: lost {missing}"
            for sha in set(have.values()):
                s.check_blob(sha)
            for f in s.blobs.glob("*/*"):  # nothing half-written under a final name
                assert hashlib.sha256(f.read_bytes()).hexdigest() == f.name, f
            n_temps = len(temps(s))
            assert s.sweep_temp() == n_temps and temps(s) == []
            sending = len(s.outbox("sending"))
            assert s.recover() == sending
            assert s.outbox("sending") == []
            assert len(list(s.audit.rows())) == sum(1 for k in have if k[0] == "out")
    assert len(acked) >= 4


# -- the outbox against a model (hypothesis) ----------------------------------------------------

DOCS = ("d0", "d1", "d2", "d3")


class OutboxMachine(RuleBasedStateMachine):
    """Random sequences of outbox operations, checked against a dict of states."""

    MAX_ATTEMPTS = 3

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="nodedb-sm-"))
        self.store = self._open()
        self.sha = put(self.store, b"the package")
        self.state: dict[str, str] = {}
        self.attempts: dict[str, int] = {}

    def _open(self) -> NodeStore:
        return NodeStore.open(self.dir, max_attempts=self.MAX_ATTEMPTS, rng=random.Random(0))

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir)

    @rule(doc=st.sampled_from(DOCS))
    def enqueue(self, doc: str) -> None:
        new = self.store.enqueue(doc_id=doc, recipient="b", metadata={},
                                 package_sha256=self.sha, size=11)
        assert new == (doc not in self.state)
        if new:
            self.state[doc], self.attempts[doc] = "queued", 0

    @rule(doc=st.sampled_from(DOCS), method=st.sampled_from(sorted(LEGAL)))
    def transition(self, doc: str, method: str) -> None:
        if doc not in self.state:
            with pytest.raises(StoreError, match="no document"):
                call(self.store, method, doc)
            return
        allowed, to = LEGAL[method]
        if self.state[doc] not in allowed:
            with pytest.raises(StoreError) as e:
                call(self.store, method, doc)
            assert e.value.code == "bad-state"
            return
        call(self.store, method, doc)
        if method == "schedule_retry":
            self.attempts[doc] += 1
            if self.attempts[doc] >= self.MAX_ATTEMPTS:
                to = "failed"
        elif method == "requeue":
            self.attempts[doc] = 0
        self.state[doc] = to

    @rule()
    def crash_and_recover(self) -> None:
        self.store.close()
        self.store = self._open()
        sending = [d for d, s in self.state.items() if s == "sending"]
        assert self.store.recover() == len(sending)
        for d in sending:
            self.state[d] = "queued"

    @invariant()
    def matches_model(self) -> None:
        rows = {r["doc_id"]: (r["state"], r["attempts"]) for r in self.store.outbox()}
        assert rows == {d: (s, self.attempts[d]) for d, s in self.state.items()}
        queued = {d for d, s in self.state.items() if s == "queued"}
        assert {i.doc_id for i in self.store.due(FAR)} == queued
        assert (self.store.next_due_time() is None) == (not queued)


OutboxMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=30,
                                           deadline=None, database=None)
TestOutboxModel = OutboxMachine.TestCase


def test_a_corrupted_database_file_is_a_clear_error(tmp_path: Path) -> None:
    """Regression: opening moved into cadb.connect, whose pragmas read the file first."""
    (tmp_path / "node.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError) as e:
        NodeStore.open(tmp_path)
    assert e.value.code == "corrupt-db" and "restore it from a backup" in str(e.value)


def test_a_schema_2_database_is_migrated_to_3_keeping_every_row(tmp_path: Path) -> None:
    """Relay (A12) added columns and a table: a node.db of schema 2 is brought up to date in
    place when opened, its rows kept; a new column takes its default."""
    store = NodeStore.open(tmp_path)
    enq(store, "d", recipient="office")
    sha = put(store, b"package")
    store.receive(doc_id="e", sender="office", metadata={"title": "u"}, package_sha256=sha,
                  size=7)
    store.db.conn.executescript(
        "ALTER TABLE outbox DROP COLUMN relay; ALTER TABLE outbox DROP COLUMN relay_receipt; "
        "ALTER TABLE inbox DROP COLUMN relay_path; DROP TABLE relay; "
        "UPDATE meta SET value = '2' WHERE key = 'schema_version';")
    store.close()
    store = NodeStore.open(tmp_path, create=False)
    assert store.db.execute("SELECT value FROM meta WHERE key = 'schema_version'"
                            ).fetchone()[0] == "3"
    assert store.out_item("d")["relay"] == "" and store.out_item("d")["state"] == "queued"
    assert store.in_item("e")["relay_path"] == []
    assert store.relay_rows() == []
    store.close()


# -- relaying (A12) -----------------------------------------------------------------------------


def take(s: NodeStore, doc_id: str, data: bytes = b"relayed", sender: str = "unit-a") -> bool:
    sha = put(s, data)
    return s.relay_take(doc_id=doc_id, sender=sender, recipient="unit-c", handed_by=sender,
                        metadata={"urgency": "urgent"}, package_sha256=sha, size=len(data),
                        path=["hop"])


def test_a_relayed_document_is_kept_once_and_goes_on_with_backoff(store: NodeStore) -> None:
    assert take(store, "r") and not take(store, "r")
    with pytest.raises(StoreError) as e:
        take(store, "r", b"other content")
    assert code_of(e) == "id-conflict"
    assert take(store, "r", b"other content", sender="unit-b")  # ids are the senders'
    [row, _] = store.relay_due(time.time(), "unit-c")
    assert (row["urgency"], row["path"], row["state"]) == ("urgent", ["hop"], "queued")
    assert store.relay_due(time.time(), "unit-a") == []
    store.relay_sending(row["id"])
    assert store.recover() == 1  # a crash while passing it on: queued again
    store.relay_sending(row["id"])
    at = store.relay_retry(row["id"], "unreachable", time.time())
    assert at is not None and store.relay_row("unit-a", "r")["attempts"] == 1
    assert store.next_due_time(recipient="unit-c") is not None
    store.max_age = 0.0
    assert store.relay_retry(row["id"], "still unreachable", time.time()) is None
    assert store.relay_row("unit-a", "r")["state"] == "failed"


def test_a_relayed_blob_is_named_until_passed_on(store: NodeStore) -> None:
    take(store, "r")
    row = store.relay_row("unit-a", "r")
    assert store.pending_bytes("unit-a") == len(b"relayed")  # the hander's quota
    assert (row["package_sha256"], 7) in store.blob_refs()
    assert store.sweep_orphans() == 0
    store.relay_sending(row["id"])
    store.relay_delivered(row["id"], b"receipt")
    assert store.pending_bytes("unit-a") == 0
    assert store.blob_refs() == [] and store.sweep_orphans() == 1  # removed at the next start
    with pytest.raises(StoreError) as e:
        store.relay_delivered(row["id"], b"again")
    assert code_of(e) == "bad-state"


def test_our_document_handed_to_a_relay_stays_queued_for_the_direct_path(
        store: NodeStore) -> None:
    enq(store, "d")
    enq(store, "f", b"forwarded")
    store.db.execute("UPDATE outbox SET custody = '[\"record\"]' WHERE doc_id = 'f'")
    assert [i.doc_id for i in store.relay_candidates("unit-b")] == ["d"]  # not forwarded ones
    store.mark_sending("d")
    store.mark_relayed("d", "unit-r", b"hop record", time.time() + 60)
    item = store.out_item("d")
    assert (item["state"], item["relay"], item["relay_receipt"]) == ("queued", "unit-r",
                                                                    b"hop record")
    assert store.relay_candidates("unit-b") == [] and "d" not in {
        i.doc_id for i in store.due(time.time())}
    assert store.mark_delivered_via("d", b"delivery receipt")
    assert not store.mark_delivered_via("d", b"delivery receipt")  # both ways got through
    assert store.out_item("d")["delivery_receipt"] == b"delivery receipt"
    enq(store, "g", b"g")
    store.mark_sending("g")
    store.release("g", "the relay would not take it")
    assert store.out_item("g")["state"] == "queued" and store.out_item("g")["attempts"] == 0
