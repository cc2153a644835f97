"""Small helpers every layer uses, one place each: canonical JSON, UTC time stamps, document ids.

This module and `errors` are the leaves of the package: they import nothing of ours.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime as dt
import functools
import gc
import json
import re
import uuid
from typing import Any

# -- canonical JSON ---------------------------------------------------------------------------


def canonical(obj: Any) -> bytes:
    """The one byte form of a JSON value that we sign, hash and store: keys sorted, no spaces,
    UTF-8 (not \\u escapes). Signatures and the audit chain depend on every writer agreeing."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# -- time -------------------------------------------------------------------------------------

_SECONDS = "%Y-%m-%dT%H:%M:%SZ"
_MICROSECONDS = "%Y-%m-%dT%H:%M:%S.%fZ"


def utc_now() -> dt.datetime:
    """Now, in UTC, to the second (what certificates, CRLs and signed acts carry)."""
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def stamp(t: dt.datetime | None = None) -> str:
    """A UTC time stamp to the second, `2026-11-25T12:00:00Z` (signed payloads, records)."""
    return (t or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).strftime(_SECONDS)


def stamp_precise(t: dt.datetime | None = None) -> str:
    """A UTC time stamp to the microsecond, `2026-11-25T12:00:00.123456Z` (audit entries,
    whose order within a second matters to a reader)."""
    return (t or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).strftime(_MICROSECONDS)


def parse_time(text: str) -> dt.datetime:
    """An ISO 8601 time (a trailing Z allowed; no zone means UTC); ValueError if it is not one.

    `datetime.fromisoformat` (C, accepts "Z" since 3.11) is ~30x faster than strptime, which
    matters when 100,000 CRL entries are read back."""
    t = dt.datetime.fromisoformat(text)
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


# -- ids --------------------------------------------------------------------------------------

UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                     r"[0-9a-fA-F]{12}")


def new_id() -> str:
    """A new document id: a random UUID."""
    return str(uuid.uuid4())


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 256 * 1024


@functools.cache
def _c_library() -> ctypes.CDLL:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else ctypes.CDLL(None)


def keep_large_buffers_apart() -> None:
    """Large buffers (over 256 KiB: a CRL of 100,000 entries is 5 MB, and read, checked and
    re-read as a whole) get pages of their own that go back to the system when freed. glibc
    decides that by a threshold it raises each time such a buffer is freed, up to 32 MiB; after
    that, they came from the heap and left it fragmented: taking a 100,000-entry CRL grew the
    benchmark's nodes by 33-50 MiB, with this 24-27, and they ended its run at 96-115 MiB
    rather than 79-86 (`tools/bench-exchange --quick`, with MALLOC_MMAP_THRESHOLD_=262144,
    which is what this sets). The daemon calls it first. Nothing where there is no glibc."""
    mallopt = getattr(_c_library(), "mallopt", None)
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def give_back_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim): the daemon calls
    it when it has just freed much at once (after start-up, after taking a CRL). Memory freed
    by Python stays in the process otherwise and counts in its resident size (measured on an
    idle node: 63.4 -> 60.5 MiB after start-up). Does nothing where there is no glibc."""
    trim = getattr(_c_library(), "malloc_trim", None)
    if trim is not None:
        gc.collect()
        trim(0)
