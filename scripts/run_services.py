"""`make run`: the Procfile's services under honcho, judged by how each one stopped.

The honcho command exits 130 after Ctrl-C whatever the services did, so this
runs the Procfile with honcho's Manager and exits 0 only if every service
exited 0 (else 1, naming the others). On a terminal it first moves into a
process group of its own and makes that the terminal's foreground: Ctrl-C
then reaches honcho, which stops the services with SIGTERM, and not make,
which would end with "Error 130" or "Interrupt" however cleanly they stopped.
It gives the terminal back before it exits. The services read .env
themselves (the environment wins); honcho's own .env loading, which would
override the environment, is not used.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from honcho.environ import parse_procfile
from honcho.manager import Manager


def take_the_terminal() -> int | None:
    """Make this process's own group the terminal's foreground; the group to give it back
    to, or None when not on a terminal."""
    make_group = os.getpgrp()
    try:
        on_terminal = os.tcgetpgrp(0) == make_group
    except OSError:
        return None
    if not on_terminal:
        return None
    os.setpgid(0, 0)
    ignored = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    os.tcsetpgrp(0, os.getpgrp())
    signal.signal(signal.SIGTTOU, ignored)
    # Ctrl-Z would stop honcho alone, with make waiting for it and the shell
    # unable to take the terminal back: it does nothing instead.
    signal.signal(signal.SIGTSTP, signal.SIG_IGN)
    return make_group


def main() -> int:
    manager = Manager()
    for name, command in parse_procfile(Path("Procfile").read_text()).processes.items():
        manager.add_process(name, command)
    signal.signal(signal.SIGHUP, lambda signum, frame: manager.terminate())

    make_group = take_the_terminal()
    try:
        manager.loop()
    finally:
        if make_group is not None:
            signal.signal(signal.SIGTTOU, signal.SIG_IGN)
            os.tcsetpgrp(0, make_group)

    # honcho 2.0 keeps each process's exit code here (None: it never stopped).
    codes = {name: process.get("returncode") for name, process in manager._processes.items()}
    unclean = sorted(name for name, code in codes.items() if code != 0)
    if unclean:
        print("make run: not stopped cleanly: " + ", ".join(unclean), file=sys.stderr)
    return 1 if unclean else 0


if __name__ == "__main__":
    sys.exit(main())
