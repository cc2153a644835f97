#!/usr/bin/env python3
"""`exchanged`, with its receiving side broken on purpose: for `tools/simulate --break
ack-without-store` only. The simulator launches every daemon through this module instead of
`python -m exchanged`; production code has no switch for it.

ack-without-store: one arriving document in three (chosen by its id) is acknowledged with the
node's signed delivery receipt but never recorded: the store's transaction is skipped. The
sender, holding a receipt that verifies, marks it delivered; the recipient has no trace of it.
The simulator must find these documents lost and fail.
"""

from __future__ import annotations

import sys
import zlib
from typing import Any

from exchanged.node import inbound

_store_received = inbound.Inbound._store_received


def _acknowledge_without_storing(self: inbound.Inbound, doc: str, *args: Any) -> bool:
    if zlib.crc32(doc.encode()) % 3 == 0:
        return True  # "stored", says the receipt; nothing was
    return _store_received(self, doc, *args)


inbound.Inbound._store_received = _acknowledge_without_storing  # type: ignore[method-assign]

if __name__ == "__main__":
    from exchanged.cli import main

    sys.exit(main())
