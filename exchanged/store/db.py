"""SQLite plumbing shared by every store of ours (the CA's `ca.db`, a node's `node.db`).

One connection setting for all (WAL, synchronous=FULL, foreign keys on, transactions managed by
us), one transaction helper, and row readers that return dictionaries.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from exchanged.errors import ExchangedError


class StoreError(ExchangedError):
    code = "store"


def connect(path: Path) -> sqlite_utils.Database:
    """A connection as every store of ours wants it: WAL, synchronous=FULL (a committed
    transaction survives power loss), foreign keys on, transactions managed by us."""
    # check_same_thread=False: the daemon reaches its database from worker threads, one at a
    # time (a trio CapacityLimiter(1) per database serialises every call).
    conn = sqlite3.connect(str(path), isolation_level=None, timeout=30, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    return sqlite_utils.Database(conn)


class Transaction:
    """`with Transaction(db):` — BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception.

    Inside a transaction already open (a group commit, `apply_group`) it is a SAVEPOINT
    instead: its changes go with the enclosing COMMIT, and an exception undoes only them."""

    def __init__(self, db: sqlite_utils.Database) -> None:
        self.db = db
        self.nested = False

    def __enter__(self) -> sqlite_utils.Database:
        self.nested = self.db.conn.in_transaction
        self.db.execute("SAVEPOINT tx" if self.nested else "BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if self.nested:
            if exc_type is not None:
                self.db.execute("ROLLBACK TO tx")
            self.db.execute("RELEASE tx")
        elif exc_type is None:
            try:
                self.db.execute("COMMIT")
            except BaseException:  # SQLITE_FULL, I/O error: the transaction stays open
                if self.db.conn.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
        else:
            self.db.execute("ROLLBACK")


@dataclass
class Change:
    """One caller's change in a group commit: `fn(*args)`, and what came of it."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    result: Any = None
    error: BaseException | None = None
    done: bool = False


def apply_group(db: sqlite_utils.Database, changes: Sequence[Change]) -> None:
    """Apply `changes` in one transaction, each in its own savepoint (a change that raises is
    undone alone and keeps its exception), with one COMMIT: one fsync of the WAL for all. If
    the COMMIT fails, none of them holds and each gets that error. Raises nothing."""
    try:
        with Transaction(db):
            for c in changes:
                try:
                    with Transaction(db):
                        c.result = c.fn(*c.args)
                except Exception as e:
                    c.error = e
    except Exception as e:
        for c in changes:
            c.result, c.error = None, c.error or e
    for c in changes:
        c.done = True


@contextmanager
def change(db: sqlite_utils.Database, name: str = "change") -> Iterator[None]:
    """A transaction of our own, or a savepoint inside the caller's: a refused change leaves
    the caller's transaction as it was."""
    if not db.conn.in_transaction:
        with Transaction(db):
            yield
        return
    db.execute(f"SAVEPOINT {name}")
    try:
        yield
    except BaseException:
        db.execute(f"ROLLBACK TO {name}")
        db.execute(f"RELEASE {name}")
        raise
    db.execute(f"RELEASE {name}")


def rows(db: sqlite_utils.Database, sql: str, params: Any = ()) -> list[dict[str, Any]]:
    cur = db.execute(sql, params)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def one(db: sqlite_utils.Database, sql: str, params: Any = ()) -> dict[str, Any] | None:
    found = rows(db, sql, params)
    return found[0] if found else None


def insert(db: sqlite_utils.Database, table: str, values: dict[str, Any]) -> int:
    """INSERT one row (plain SQL: sqlite-utils' insert() inspects the table on every call);
    returns its rowid."""
    cur = db.execute(f"INSERT INTO {table} ({', '.join(values)}) "
                     f"VALUES ({', '.join('?' * len(values))})", list(values.values()))
    return int(cur.lastrowid or 0)


def update(db: sqlite_utils.Database, table: str, key: str, key_value: Any,
           values: dict[str, Any]) -> None:
    """UPDATE one row by its key column."""
    db.execute(f"UPDATE {table} SET {', '.join(f'{k} = ?' for k in values)} WHERE {key} = ?",
               [*values.values(), key_value])
