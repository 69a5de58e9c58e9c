"""The garbage collector, set for a service that makes many short-lived objects.

Python's cyclic collector runs a young collection every 700 net allocations
and, every hundred of those, a full one that walks every object the process
holds. A service holds some 90,000 objects from its imports alone, and a job
in flight makes dozens more, so under load full collections came several
times a second and held the api's event loop for tens of milliseconds each,
the longest stalls a request saw (bench/README.md, "The api's heap").

Two settings, once a service has imported and built what it runs on: the
objects made so far are frozen (``gc.freeze``: modules, classes, schemas, the
app; they live as long as the process, and no collection walks them again),
and a young collection waits for ``YOUNG_THRESHOLD`` allocations instead of
700, so most of a request's or a message's objects are freed by their
reference counts before any collection looks at them. Memory is still freed
when the last reference goes; only reference cycles wait a little longer.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000


def settle_heap() -> None:
    """Freeze what exists now and space out young collections (see the module)."""
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, oldest)
