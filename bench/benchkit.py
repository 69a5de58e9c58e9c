"""What both benchmarks share: signals, machine facts."""

from __future__ import annotations

import os
import platform
import signal
import subprocess
from pathlib import Path
from types import FrameType


def machine() -> str:
    return f"{os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()}"


def code_version() -> str:
    """The commit measured, and whether the working tree differs from it."""
    repo = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{commit} + uncommitted changes" if dirty else commit


def _as_ctrl_c(signum: int, frame: FrameType | None) -> None:
    signal.raise_signal(signal.SIGINT)


def stop_cleanly_on_signals() -> None:
    """Ctrl-C and SIGTERM raise ``KeyboardInterrupt`` so that cleanup runs, even when
    the process started with SIGINT ignored (as ``cmd &`` does); inside
    ``asyncio.run`` the running task is cancelled first."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _as_ctrl_c)
