"""The collector settings every service starts with (``pipeline_shared.heap``)."""

from __future__ import annotations

import subprocess
import sys


def test_settle_heap_freezes_what_exists_and_spaces_out_young_collections() -> None:
    # In a process of its own: freezing this one would keep every test's objects.
    script = (
        "import gc\n"
        "from pipeline_shared.heap import YOUNG_THRESHOLD, settle_heap\n"
        "before = gc.get_threshold()\n"
        "assert gc.get_freeze_count() == 0\n"
        "settle_heap()\n"
        "assert gc.get_freeze_count() > 1000, gc.get_freeze_count()\n"
        "assert gc.get_threshold() == (YOUNG_THRESHOLD, *before[1:]), gc.get_threshold()\n"
        "assert gc.isenabled()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
