"""A lease on an output location, so two runs never interleave their writes in one store.

The lease is a small JSON file (``_lease.json``) in the output: who holds it and when it last
proved it was alive. A background thread renews the heartbeat; a run killed with SIGKILL stops
renewing, so its lease expires after ``ttl`` seconds and the next run takes it over and resumes.

Notes
-----
On a local or shared POSIX filesystem a fresh lease is created with an exclusive create, so two
starters cannot both win. Object stores have no such primitive in fsspec: there the lease is
written, then read back after a short pause, and the loser of a simultaneous start gives up.
Expiry compares wall clocks of different hosts, so keep them in sync (NTP), as usual.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from imgclust.io.storage import add_write_fence, is_local, open_fs, read_json, remove_write_fence, with_retries, write_json
from imgclust.runstore import RunStore

logger = logging.getLogger("imgclust")
LEASE_FILE = "_lease.json"


class LeaseHeld(RuntimeError):
    """Another live run holds the output; the message says who and how to proceed."""


class LeaseLost(RuntimeError):
    """Our lease was taken away (``--force-unlock`` by someone else); stop writing at once."""


def _describe(record: dict[str, Any], now: float) -> str:
    age = now - float(record.get("heartbeat_at", 0))
    return (f"{record.get('owner', '?')} ({record.get('purpose', 'run')}, started {record.get('acquired_at', '?')}, "
            f"last heartbeat {age:.0f} s ago, expires after {record.get('ttl_s', '?')} s of silence)")


def _is_live(record: dict[str, Any]) -> bool:
    """A holder is live while it renews, unless it is a process of this host that no longer exists."""
    if holder_is_dead(str(record.get("owner", ""))):
        return False
    return time.time() - float(record.get("heartbeat_at", 0)) <= float(record.get("ttl_s", 0))


def holder_is_dead(owner: str) -> bool:
    """True when ``owner`` (``host:pid:nonce``) names a process of this host that has exited."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _held(output: str, record: dict[str, Any]) -> LeaseHeld:
    return LeaseHeld(f"{output} is in use by another run: {_describe(record, time.time())}. Wait for it to "
                     "finish, or pass --force-unlock if you are sure it is gone.")


@dataclass
class Lease:
    """A held lease; renew it in the background with ``start`` and give it up with ``release``."""

    url: str
    storage_options: dict[str, Any]
    owner: str
    purpose: str
    ttl: float
    acquired_at: str
    lost: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _last_renewed: float = 0.0

    def record(self) -> dict[str, Any]:
        return {"owner": self.owner, "purpose": self.purpose, "acquired_at": self.acquired_at,
                "heartbeat_at": time.time(), "ttl_s": self.ttl}

    def _current(self) -> dict[str, Any] | None:
        try:
            return read_json(self.url, self.storage_options)
        except FileNotFoundError:
            return None

    def renew(self) -> None:
        """Write a fresh heartbeat, unless someone else took the lease, which marks it lost."""
        current = self._current()
        if current is None or current.get("owner") != self.owner:
            self._lose(f"taken over by {(current or {}).get('owner', 'nobody (file removed)')}")
            return
        write_json(self.url, self.record(), self.storage_options, fenced=False)
        self._last_renewed = time.monotonic()

    def _lose(self, why: str) -> None:
        if not self.lost.is_set():
            logger.error("lease on %s lost (%s); this run stops writing", self.url, why)
        self.lost.set()

    def check(self) -> None:
        """Raise when the lease was lost, so no more output is written."""
        if self.lost.is_set():
            raise LeaseLost(f"the lease on {self.url} was lost (taken over by another run, or not renewed "
                            "for its whole lifetime); stopped")

    def fence(self, url: str) -> None:
        """The write fence of this lease: writes under its output are refused once it is lost."""
        if self.lost.is_set() and (url == self.root or url.startswith(self.root + "/")):
            self.check()

    @property
    def root(self) -> str:
        return self.url.rsplit("/", 1)[0]

    def start(self) -> Lease:
        self._last_renewed = time.monotonic()
        add_write_fence(self.fence)
        _HELD[self.root] = self

        def beat() -> None:
            while not self._stop.wait(self.ttl / 4):
                try:
                    self.renew()
                except Exception as exc:  # a storage hiccup: try again at the next beat, up to the ttl
                    silent = time.monotonic() - self._last_renewed
                    logger.warning("lease heartbeat failed (%.0f s without renewal): %s", silent, exc)
                    if silent >= self.ttl:  # others may now take it: stop writing
                        self._lose(f"not renewed for {silent:.0f} s")

        self._thread = threading.Thread(target=beat, name="imgclust-lease", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        remove_write_fence(self.fence)
        if _HELD.get(self.root) is self:
            del _HELD[self.root]
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            current = self._current()
            if current is not None and current.get("owner") == self.owner:
                fs, path = open_fs(self.url, self.storage_options)
                with_retries(fs.rm, path)
        except Exception as exc:  # the work is done; a lease left behind expires after its ttl
            logger.warning("could not release the lease %s (%s: %s); it expires in %.0f s", self.url,
                           type(exc).__name__, exc, self.ttl)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


_HELD: dict[str, Lease] = {}  # output URL -> the lease this process holds on it


def held_lease(store: RunStore) -> tuple[str, str] | None:
    """(lease file URL, owner) of the lease this process holds on ``store``, if any: what workers
    compare the lease file with before they write (``ShardLedger.check_fence``)."""
    lease = _HELD.get(store.lease.rsplit("/", 1)[0])
    return (lease.url, lease.owner) if lease is not None else None


def verify_owner(lease_url: str, owner: str, storage_options: dict[str, Any]) -> None:
    """Raise ``LeaseLost`` unless ``owner`` still holds the lease at ``lease_url`` (run on workers)."""
    try:
        current = read_json(lease_url, storage_options)
    except FileNotFoundError:
        current = None
    except ValueError:  # being rewritten this instant: the next check decides
        return
    if current is None or current.get("owner") != owner:
        raise LeaseLost(f"the lease on {lease_url} is now held by "
                        f"{(current or {}).get('owner', 'nobody')}; this run's worker stops writing")


def _create_exclusive(url: str, data: bytes) -> bool:
    """Create a local file only if absent; False when it already exists."""
    fs, path = open_fs(url)
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return True


def _read_lease(url: str, so: dict[str, Any], tries: int = 3) -> dict[str, Any] | None:
    """The lease record, None if absent; a file still being written is read again shortly."""
    for attempt in range(tries):
        try:
            return read_json(url, so)
        except FileNotFoundError:
            return None
        except ValueError:
            if attempt == tries - 1:  # left half-written by a crash: treat it as expired
                return {"owner": "unknown (unreadable lease file)", "heartbeat_at": 0, "ttl_s": 0}
            time.sleep(0.2)
    return None


def acquire_lease(store: RunStore, purpose: str, ttl: float = 120.0, force: bool = False,
                  settle: float = 0.5) -> Lease:
    """Take the lease on ``store`` or raise ``LeaseHeld`` naming the holder.

    An expired lease (no heartbeat for ``ttl`` seconds) is taken over with a warning; ``force``
    takes over a live one (the holder notices at its next heartbeat and stops).
    """
    so, url, output = dict(store.storage_options), store.lease, store.url
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    lease = Lease(url, so, owner, purpose, float(ttl), time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    local = is_local(url)
    if local and _create_exclusive(url, json.dumps(lease.record()).encode()):
        return lease.start()
    current = _read_lease(url, so)
    if current is not None:
        live = _is_live(current)
        if live and not force:
            raise _held(output, current)
        logger.warning("taking over the %s lease of %s", "forced" if live else "expired",
                       _describe(current, time.time()))
    write_json(url, lease.record(), so, fenced=False)
    time.sleep(settle)  # a takeover or an object store: last writer wins, so check it was us
    holder = read_json(url, so)
    if holder.get("owner") != owner:
        raise LeaseHeld(f"{output} was taken at the same moment by {_describe(holder, time.time())}")
    return lease.start()


def check_free(store: RunStore) -> None:
    """Raise ``LeaseHeld`` now when a live run holds ``store``: a preflight that fails in seconds."""
    current = _read_lease(store.lease, dict(store.storage_options))
    if current is not None and _is_live(current):
        raise _held(store.url, current)


def force_unlock(store: RunStore) -> dict[str, Any] | None:
    """Remove the lease file; returns what it held (None if there was none)."""
    try:
        current = read_json(store.lease, store.storage_options)
    except FileNotFoundError:
        return None
    fs, path = open_fs(store.lease, store.storage_options)
    with_retries(fs.rm, path)
    return current
