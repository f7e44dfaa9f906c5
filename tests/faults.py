"""A storage layer that fails: the local disk behind an fsspec filesystem (``faulty://``) whose reads,
writes and listings fail transiently at a given rate, and which can log every file it reads.

It has no retries of its own, so whatever survives the faults is the product's handling. Each
injected fault is appended as one line to ``fault_log`` (by every process: the flow and the Dask
workers), so a test can count them. Importing this module registers the protocol; workers get it
with ``client.run(tests.faults.register)``.
"""

from __future__ import annotations

import os
import random
import threading

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractFileSystem

PROTOCOL = "faulty"


class InjectedFault(ConnectionError):
    """What a flaky network or an overloaded object store gives: ask again and it may work."""


class FaultyFileSystem(AbstractFileSystem):
    """Local files behind fsspec calls that fail with ``InjectedFault`` at ``fault_rate``."""

    protocol = PROTOCOL
    root_marker = "/"
    cachable = True

    def __init__(self, fault_rate: float = 0.05, fault_log: str | None = None, fault_seed: int | None = None,
                 read_log: str | None = None, **kwargs) -> None:
        kwargs.pop("asynchronous", None)  # zarr asks for it; the async wrapper it applies does the rest
        super().__init__(**kwargs)
        self.fault_rate, self.fault_log, self.read_log = float(fault_rate), fault_log, read_log
        self._rng = random.Random(fault_seed if fault_seed is not None else os.getpid())
        self._lock = threading.Lock()
        self.local = LocalFileSystem()

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        path = path[len(PROTOCOL) + 3:] if path.startswith(f"{PROTOCOL}://") else path
        return LocalFileSystem._strip_protocol(path)

    def _maybe_fail(self, op: str, path: object) -> None:
        with self._lock:
            fail = self._rng.random() < self.fault_rate
        if fail:
            if self.fault_log:
                with open(self.fault_log, "a") as fh:
                    fh.write(f"{os.getpid()} {op} {path}\n")
            raise InjectedFault(f"injected fault: {op} {path}")

    # Listings
    def ls(self, path, detail=True, **kwargs):
        self._maybe_fail("ls", path)
        return self.local.ls(self._strip_protocol(path), detail=detail, **kwargs)

    def info(self, path, **kwargs):
        self._maybe_fail("info", path)
        return self.local.info(self._strip_protocol(path), **kwargs)

    def exists(self, path, **kwargs):
        self._maybe_fail("exists", path)
        return self.local.exists(self._strip_protocol(path))

    # Reads
    def _log_read(self, path) -> None:
        if self.read_log:
            with open(self.read_log, "a") as fh:
                fh.write(f"{self._strip_protocol(path)}\n")

    def cat_file(self, path, start=None, end=None, **kwargs):
        self._maybe_fail("read", path)
        self._log_read(path)
        return self.local.cat_file(self._strip_protocol(path), start=start, end=end)

    def _open(self, path, mode="rb", **kwargs):
        self._maybe_fail("open", path)
        if "r" in mode:
            self._log_read(path)
        return self.local._open(self._strip_protocol(path), mode=mode, **kwargs)

    # Writes
    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        self._maybe_fail("write", path)
        p = self._strip_protocol(path)
        self.local.makedirs(os.path.dirname(p), exist_ok=True)
        return self.local.pipe_file(p, value, **kwargs)

    def mv(self, path1, path2, recursive=False, maxdepth=None, **kwargs):
        self._maybe_fail("move", path1)
        return self.local.mv(self._strip_protocol(path1), self._strip_protocol(path2), recursive=recursive)

    def cp_file(self, path1, path2, **kwargs):
        self._maybe_fail("copy", path1)
        return self.local.cp_file(self._strip_protocol(path1), self._strip_protocol(path2))

    def rm_file(self, path):
        self._maybe_fail("delete", path)
        return self.local.rm_file(self._strip_protocol(path))

    def rm(self, path, recursive=False, maxdepth=None):
        self._maybe_fail("delete", path)
        paths = path if isinstance(path, list) else [path]
        return self.local.rm([self._strip_protocol(p) for p in paths], recursive=recursive, maxdepth=maxdepth)

    def _rm(self, path):
        return self.local._rm(self._strip_protocol(path))

    def makedirs(self, path, exist_ok=False):
        return self.local.makedirs(self._strip_protocol(path), exist_ok=exist_ok)

    def mkdir(self, path, create_parents=True, **kwargs):
        return self.local.mkdir(self._strip_protocol(path), create_parents=create_parents, **kwargs)

    def rmdir(self, path):
        return self.local.rmdir(self._strip_protocol(path))

    def modified(self, path):
        return self.local.modified(self._strip_protocol(path))

    def created(self, path):
        return self.local.created(self._strip_protocol(path))


def register() -> None:
    fsspec.register_implementation(PROTOCOL, FaultyFileSystem, clobber=True)


def injected(log: str) -> int:
    """How many faults were injected so far, by every process."""
    try:
        with open(log) as fh:
            return sum(1 for _ in fh)
    except FileNotFoundError:
        return 0


register()
