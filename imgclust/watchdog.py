"""Nothing outlives a killed run: a small process that cleans up after the command if it dies.

A run starts helpers of its own: Prefect's temporary API server (a ``uvicorn`` process) and the
local Dask cluster's workers. They are stopped on every normal exit, on Ctrl-C and on SIGTERM, but a
SIGKILL (or the out-of-memory killer) gives the command no chance to, and they kept running (a
server still listening long after). The watchdog, started by the CLI, notes the command's
descendants every second; once the command is gone it terminates those still running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

INTERVAL_S = 1.0
GRACE_S = 10.0


def watch(parent: int, interval: float = INTERVAL_S, grace: float = GRACE_S) -> list[int]:
    """Follow ``parent``'s descendants until it exits, then stop those left; returns their pids."""
    import psutil

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the command, which cleans up itself
    me = os.getpid()
    known: dict[int, psutil.Process] = {}
    while True:
        try:
            proc = psutil.Process(parent)
            if proc.status() == psutil.STATUS_ZOMBIE:
                break
            for child in proc.children(recursive=True):
                if child.pid != me:
                    known.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            break
        time.sleep(interval)
    left = [p for p in known.values() if _alive(p)]
    for p in left:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(left, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    return [p.pid for p in left]


def _alive(p: object) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE  # type: ignore[attr-defined]
    except psutil.Error:
        return False


def start_watchdog() -> subprocess.Popen | None:
    """Start the watchdog for this process (off with ``IMGCLUST_WATCHDOG=0``)."""
    if os.environ.get("IMGCLUST_WATCHDOG", "1") == "0":
        return None
    code = "import sys; from imgclust.watchdog import watch; watch(int(sys.argv[1]))"
    return subprocess.Popen([sys.executable, "-c", code, str(os.getpid())], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
