"""Wall time and peak memory of a whole process tree (client, scheduler, workers together)."""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import IO

import psutil


@dataclass
class Measured:
    returncode: int
    seconds: float
    peak_rss_mb: float
    stdout: str
    stderr: str
    # With ``timeline=True``: (seconds since start, summed RSS MB) per sample and
    # (seconds since start, line) for every output line as it arrived, stdout and stderr merged.
    samples: list[tuple[float, float]] = field(default_factory=list)
    lines: list[tuple[float, str]] = field(default_factory=list)
    # With ``timeline=True``: (seconds since start, CPU seconds used so far by the live processes of the tree).
    cpu: list[tuple[float, float]] = field(default_factory=list)
    # With ``timeline=True``: per process (pid -> command line), its own peak RSS MB.
    process_peaks: dict[int, tuple[str, float]] = field(default_factory=dict)


def run_measured(cmd: list[str], env: dict[str, str] | None = None, timeout: float | None = None,
                 timeline: bool = False) -> Measured:
    """Run ``cmd``; sample the summed RSS of it and all its descendants every 0.2 s."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = 0.0
    stop = threading.Event()
    samples: list[tuple[float, float]] = []
    lines: list[tuple[float, str]] = []
    process_peaks: dict[int, tuple[str, float]] = {}
    cpu: list[tuple[float, float]] = []

    def sample() -> None:
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                total, cpu_s = 0, 0.0
                for p in procs:
                    try:
                        rss = p.memory_info().rss
                        total += rss
                        if timeline:
                            c = p.cpu_times()
                            cpu_s += c.user + c.system
                            name, top = process_peaks.get(p.pid) or (" ".join(p.cmdline())[:300], 0.0)
                            process_peaks[p.pid] = (name, max(top, rss / 2**20))
                    except psutil.Error:
                        pass
                peak = max(peak, total / 2**20)
                if timeline:
                    now = time.perf_counter() - t0
                    samples.append((now, total / 2**20))
                    cpu.append((now, cpu_s))
            except psutil.Error:
                pass
            stop.wait(0.2)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    if not timeline:
        out, err = proc.communicate(timeout=timeout)
    else:
        chunks: dict[str, list[str]] = {"out": [], "err": []}

        def read(stream: IO[str], key: str) -> None:
            for line in stream:
                chunks[key].append(line)
                lines.append((time.perf_counter() - t0, line.rstrip("\n")))

        readers = [threading.Thread(target=read, args=(s, k), daemon=True)
                   for s, k in ((proc.stdout, "out"), (proc.stderr, "err"))]
        for r in readers:
            r.start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in [*psutil.Process(proc.pid).children(recursive=True), proc]:
                try:
                    p.kill()
                except (psutil.Error, OSError):
                    pass
            stop.set()
            raise
        for r in readers:
            r.join()
        out, err = "".join(chunks["out"]), "".join(chunks["err"])
    stop.set()
    t.join()
    return Measured(proc.returncode, time.perf_counter() - t0, peak, out, err, samples, lines, cpu, process_peaks)
