"""Group commit (store/db.apply_group, Node.commit) on a real SQLite file: changes that arrive
together share one COMMIT; each caller returns only once its change is committed (another
connection sees it); a change that raises is undone alone; a COMMIT that fails fails them all
and leaves nothing behind."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from exchanged.node.base import Node
from exchanged.store.db import Change, Transaction, apply_group, connect


def open_db(path: Path) -> Any:
    db = connect(path)
    db.execute("CREATE TABLE IF NOT EXISTS doc (id INTEGER PRIMARY KEY, title TEXT NOT NULL)")
    db.execute("CREATE TABLE IF NOT EXISTS parent (id INTEGER PRIMARY KEY)")
    db.execute("CREATE TABLE IF NOT EXISTS child (pid INTEGER REFERENCES parent(id) "
               "DEFERRABLE INITIALLY DEFERRED)")
    return db


def seen_elsewhere(path: Path) -> set[int]:
    """What a second connection sees: only what is committed."""
    conn = sqlite3.connect(str(path))
    try:
        return {r[0] for r in conn.execute("SELECT id FROM doc")}
    finally:
        conn.close()


def fake_node(db: Any) -> Any:
    """What Node.commit uses of a node: its store's database and the database thread."""
    limiter = trio.CapacityLimiter(1)

    async def in_thread(fn: Any, *args: Any) -> Any:
        return await trio.to_thread.run_sync(lambda: fn(*args), limiter=limiter)

    return SimpleNamespace(store=SimpleNamespace(db=db), db=in_thread, commit_queue=[],
                           committing=False, commit_turn=trio.Event(),
                           commit_stats={"commits": 0, "changes": 0})


def test_changes_arriving_together_share_a_commit_and_return_after_it(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    db = open_db(path)
    commits: list[str] = []
    db.conn.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    node = fake_node(db)
    visible_on_return: dict[int, bool] = {}

    def store(i: int) -> int:
        with Transaction(db):  # as the stores' own methods do: nested, a savepoint
            db.execute("INSERT INTO doc (id, title) VALUES (?, ?)", [i, f"doc {i}"])
        return i * 10

    async def caller(i: int) -> None:
        assert await Node.commit(node, store, i) == i * 10
        visible_on_return[i] = i in seen_elsewhere(path)

    async def main() -> None:
        async with trio.open_nursery() as n:
            for i in range(20):
                n.start_soon(caller, i)

    trio.run(main)
    assert visible_on_return == {i: True for i in range(20)}
    assert node.commit_stats["changes"] == 20
    # The first caller commits alone; the 19 that queued meanwhile go in one or few commits.
    assert len(commits) == node.commit_stats["commits"] < 20


def test_a_change_that_raises_is_undone_alone(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    db = open_db(path)
    node = fake_node(db)
    outcome: dict[int, str] = {}

    def store(i: int) -> None:
        db.execute("INSERT INTO doc (id, title) VALUES (?, ?)", [i, f"doc {i}"])
        if i == 3:
            raise ValueError("refused after writing")

    async def caller(i: int) -> None:
        try:
            await Node.commit(node, store, i)
            outcome[i] = "ok"
        except ValueError as e:
            outcome[i] = str(e)

    async def main() -> None:
        async with trio.open_nursery() as n:
            for i in range(6):
                n.start_soon(caller, i)

    trio.run(main)
    assert outcome == {0: "ok", 1: "ok", 2: "ok", 3: "refused after writing", 4: "ok", 5: "ok"}
    assert seen_elsewhere(path) == {0, 1, 2, 4, 5}


def test_a_failed_commit_fails_every_change_of_it_and_keeps_none(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    db = open_db(path)
    db.execute("INSERT INTO doc (id, title) VALUES (100, 'stored before')")

    def good(i: int) -> int:
        db.execute("INSERT INTO doc (id, title) VALUES (?, 'x')", [i])
        return i

    def orphan() -> None:  # a deferred foreign key: fine in its savepoint, fatal at COMMIT
        db.execute("INSERT INTO child (pid) VALUES (42)")

    changes = [Change(good, (1,)), Change(orphan, ()), Change(good, (2,))]
    apply_group(db, changes)
    assert all(c.done for c in changes)
    assert all(isinstance(c.error, sqlite3.IntegrityError) for c in changes), changes
    assert [c.result for c in changes] == [None, None, None]
    assert not db.conn.in_transaction
    assert seen_elsewhere(path) == {100}
    # ... and the database goes on working.
    again = [Change(good, (3,))]
    apply_group(db, again)
    assert again[0].error is None and seen_elsewhere(path) == {100, 3}


def test_transaction_alone_still_commits_and_rolls_back(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    db = open_db(path)
    with Transaction(db):
        db.execute("INSERT INTO doc (id, title) VALUES (1, 'a')")
    with pytest.raises(RuntimeError), Transaction(db):
        db.execute("INSERT INTO doc (id, title) VALUES (2, 'b')")
        raise RuntimeError
    assert seen_elsewhere(path) == {1}
