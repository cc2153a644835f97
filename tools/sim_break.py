#!/usr/bin/env python3
"""`exchanged`, with its receiving side broken on purpose: for `tools/simulate --break
ack-without-store` only. The simulator launches every daemon through this module instead of
`python -m exchanged`; production code has no switch for it.

ack-without-store: every other document arriving at a daemon (the first, the third, ...) is
acknowledged with the node's signed delivery receipt but never recorded: the store's
transaction is skipped. The
sender, holding a receipt that verifies, marks it delivered; the recipient has no trace of it.
The simulator must find these documents lost and fail.
"""

from __future__ import annotations

import sys
from typing import Any

from exchanged.node import inbound

_store_received = inbound.Inbound._store_received


_arrived = [0]


def _acknowledge_without_storing(self: inbound.Inbound, doc: str, *args: Any) -> bool:
    _arrived[0] += 1
    if _arrived[0] % 2 == 1:
        return True  # "stored", says the receipt; nothing was
    return _store_received(self, doc, *args)


inbound.Inbound._store_received = _acknowledge_without_storing  # type: ignore[method-assign]

if __name__ == "__main__":
    from exchanged.cli import main

    sys.exit(main())
