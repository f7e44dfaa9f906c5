"""Wall time and peak memory of a whole process tree (client, scheduler, workers together)."""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass

import psutil


@dataclass
class Measured:
    returncode: int
    seconds: float
    peak_rss_mb: float
    stdout: str
    stderr: str


def run_measured(cmd: list[str], env: dict[str, str] | None = None, timeout: float | None = None) -> Measured:
    """Run ``cmd``; sample the summed RSS of it and all its descendants every 0.2 s."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = 0.0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                peak = max(peak, total / 2**20)
            except psutil.Error:
                pass
            stop.wait(0.2)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = proc.communicate(timeout=timeout)
    stop.set()
    t.join()
    return Measured(proc.returncode, time.perf_counter() - t0, peak, out, err)
