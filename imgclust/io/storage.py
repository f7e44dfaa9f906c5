"""Everything that touches a location goes through fsspec, so local folders and s3:// behave alike."""

from __future__ import annotations

import io
import json
import posixpath
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
import pandas as pd
from fsspec.implementations.local import LocalFileSystem


class StorageError(RuntimeError):
    """A location could not be read or written; the message says which and why."""


def open_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Filesystem and protocol-less root path for ``url``."""
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, root.rstrip("/") if root != "/" else root


def is_local(url: str) -> bool:
    return isinstance(fsspec.core.url_to_fs(url)[0], LocalFileSystem)


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL with ``/``, keeping its protocol."""
    return posixpath.join(url.rstrip("/"), *parts)


def zarr_options(url: str, storage_options: dict[str, Any] | None) -> dict[str, Any] | None:
    """zarr refuses storage options for plain local paths; pass them only to remote stores."""
    if is_local(url) or not storage_options:
        return None
    return dict(storage_options)


def normalise_url(url: str) -> str:
    """Absolute local paths; remote URLs unchanged except trailing slashes."""
    if "://" in url and not url.startswith("file://"):
        return url.rstrip("/")
    fs, root = open_fs(url)
    return fs._strip_protocol(root).rstrip("/") or "/"


def resolved_location(url: str) -> str:
    """Where ``url`` really is: local paths with ``..``, doubled slashes and symlinks resolved
    (also for a path that does not exist yet: its existing part is resolved); remote URLs with
    repeated slashes collapsed."""
    import os
    import re

    if "://" in url and not url.startswith("file://"):
        scheme, rest = url.split("://", 1)
        return f"{scheme}://{re.sub('/+', '/', rest).rstrip('/')}"
    return os.path.realpath(normalise_url(url))


def lies_within(inner: str, outer: str) -> bool:
    """True when location ``inner`` is ``outer`` or inside it, however either is spelled."""
    a, b = resolved_location(inner), resolved_location(outer)
    return a == b or a.startswith(b.rstrip("/") + "/")


# Write fences: callables that raise when this process may no longer write to a URL (a lost lease).
_FENCES: list[Any] = []


def add_write_fence(fence: Any) -> None:
    """Register ``fence(url)``, called before every write of this module; it raises to refuse one."""
    _FENCES.append(fence)


def remove_write_fence(fence: Any) -> None:
    if fence in _FENCES:
        _FENCES.remove(fence)


def check_fences(url: str) -> None:
    """Raise (the fence's error) when a registered fence refuses writes to ``url``."""
    for fence in list(_FENCES):
        fence(url)


def write_bytes_atomic(url: str, data: bytes, storage_options: dict[str, Any] | None = None,
                       fenced: bool = True) -> None:
    """Write to a temporary name and move it into place, so readers never see half a file.

    Unless ``fenced`` is off (the lease's own file), a write the process's lease forbids is refused.
    """
    if fenced:
        check_fences(url)
    fs, path = open_fs(url, storage_options)
    parent = posixpath.dirname(path)

    def write() -> None:
        if parent:
            fs.makedirs(parent, exist_ok=True)
        tmp = posixpath.join(parent, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
        with fs.open(tmp, "wb") as fh:
            fh.write(data)
        fs.mv(tmp, path)

    with_retries(write)


def write_json(url: str, obj: Any, storage_options: dict[str, Any] | None = None, fenced: bool = True) -> None:
    write_bytes_atomic(url, json.dumps(obj, indent=2, default=str).encode(), storage_options, fenced)


def read_json(url: str, storage_options: dict[str, Any] | None = None) -> Any:
    fs, path = open_fs(url, storage_options)
    return json.loads(with_retries(fs.cat_file, path))


def write_parquet(url: str, df: pd.DataFrame, storage_options: dict[str, Any] | None = None,
                  row_group_size: int | None = None) -> None:
    """``df`` (without its index) as one Parquet file, in row groups of ``row_group_size`` rows
    when given (readers of a row group, or of a key range through the groups' statistics)."""
    buf = io.BytesIO()
    df.to_parquet(buf, index=False, row_group_size=row_group_size)
    write_bytes_atomic(url, buf.getvalue(), storage_options)


def read_parquet(url: str, storage_options: dict[str, Any] | None = None) -> pd.DataFrame:
    """A Parquet file (a run's tables are folders of parts: ``RunStore.read_table``)."""
    fs, path = open_fs(url, storage_options)
    return pd.read_parquet(io.BytesIO(with_retries(fs.cat_file, path)))


def read_parquet_filtered(url: str, storage_options: dict[str, Any] | None, columns: list[str] | None = None,
                          filters: list[tuple[str, str, Any]] | None = None) -> pd.DataFrame:
    """Rows of a Parquet file that pass ``filters``; row groups whose statistics rule them out are not read."""
    import pyarrow.parquet as pq

    fs, path = open_fs(url, storage_options)

    def read() -> pd.DataFrame:
        with fs.open(path, "rb") as fh:
            return pq.read_table(fh, columns=columns, filters=filters).to_pandas()
    return with_retries(read)


def read_parquet_folder(url: str, storage_options: dict[str, Any] | None = None,
                        columns: list[str] | None = None) -> pd.DataFrame:
    """Every ``*.parquet`` file of a folder, in name order, as one frame (empty, with ``columns``,
    when the folder is absent or empty)."""
    fs, path = open_fs(url, storage_options)
    try:
        names = sorted(n for n in with_retries(fs.ls, path, detail=False) if n.endswith(".parquet")
                       and not posixpath.basename(n).startswith("."))
    except FileNotFoundError:
        names = []
    frames = [pd.read_parquet(io.BytesIO(with_retries(fs.cat_file, n)), columns=columns) for n in names]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in columns or []})
    return pd.concat(frames, ignore_index=True)


def exists(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = open_fs(url, storage_options)
    return with_retries(fs.exists, path)


def remove(url: str, storage_options: dict[str, Any] | None = None) -> None:
    fs, path = open_fs(url, storage_options)
    if with_retries(fs.exists, path):
        with_retries(fs.rm, path, recursive=True)


GLOB_CHARS = set("[]*?")
RETRY_DELAYS = (0.1, 0.4, 1.6, 6.4)  # seconds before each new attempt after a transient failure


def is_transient(error: BaseException) -> bool:
    """Could asking again succeed? "Not there", "not allowed" and "not a file" are answers, not
    failures to ask: they are never retried."""
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    return isinstance(error, (OSError, TimeoutError, ConnectionError)) or type(error).__name__ in {
        "ClientError", "EndpointConnectionError", "ReadTimeoutError", "ServerDisconnectedError",
        "ClientOSError", "ClientPayloadError"}


def with_retries(fn: Any, *args: Any, delays: tuple[float, ...] = RETRY_DELAYS, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, asked again with backoff while it fails transiently (``is_transient``)."""
    import logging
    import time

    for attempt, delay in enumerate((*delays, None)):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if delay is None or not is_transient(exc):
                raise
            logging.getLogger("imgclust").warning("storage: %s: %s; retrying in %.1f s (attempt %d)",
                                                  type(exc).__name__, exc, delay, attempt + 2)
            time.sleep(delay)
    raise AssertionError("unreachable")


def find(fs: fsspec.AbstractFileSystem, root: str, detail: bool = False) -> Any:
    """Every file under ``root``, as ``fs.find`` gives them, each listing asked again while it
    fails transiently.

    fsspec's generic ``find`` walks folder by folder and silently leaves out a folder whose listing
    failed (its ``on_error`` does not reach the folders below the first): a lost folder of images.
    Filesystems without a ``find`` of their own are therefore walked here; object stores' own
    ``find`` is one flat listing that raises on failure, asked again as a whole.
    """
    from fsspec.spec import AbstractFileSystem

    if getattr(type(fs), "find", None) is not AbstractFileSystem.find:
        return with_retries(fs.find, root, withdirs=False, detail=detail)
    root = fs._strip_protocol(root).rstrip("/") or "/"
    out: dict[str, Any] = {}
    stack = [root]
    while stack:
        folder = stack.pop()
        for info in with_retries(fs.ls, folder, detail=True):
            name = info["name"].rstrip("/")
            if info.get("type") == "directory":
                if name != folder:
                    stack.append(name)
            else:
                out[name] = info
    names = sorted(out)
    return {n: out[n] for n in names} if detail else names


READ_BYTES, READ_FILES = 256 << 20, 64  # what one group of reads holds at most (a file may exceed it alone)
READ_SHARE = 8  # on a Dask worker, a group holds at most this fraction of its memory limit


def read_budget() -> int:
    """Bytes one group of reads may hold: ``READ_BYTES``, or an eighth of the memory limit of the
    Dask worker this runs on when that is less (a worker of 600 MB that holds 400 MB of libraries
    reads 75 MB at a time)."""
    try:
        from distributed import get_worker

        limit = get_worker().memory_manager.memory_limit
    except (ImportError, ValueError, AttributeError):  # not on a worker
        return READ_BYTES
    return min(READ_BYTES, max(1 << 20, int(limit) // READ_SHARE)) if limit else READ_BYTES


def read_file_groups(fs: fsspec.AbstractFileSystem, paths: list[str], max_bytes: int | None = None,
                     max_files: int | None = None) -> Iterator[list[tuple[str, bytes | BaseException | None]]]:
    """(path, contents or the exception that stopped it) of every path, in order, a group at a
    time, each group holding about ``max_bytes`` (default ``read_budget()``). Local files are read
    one by one until the group is full; remote ones at most ``max_files`` at a time (one concurrent
    request each), starting with a few and sizing later groups by the mean size read so far. A
    worker given a shard of large photos holds one group, not the shard.
    """
    max_bytes, max_files = max_bytes or read_budget(), max_files or READ_FILES
    if not isinstance(fs, LocalFileSystem):
        a, take, seen_bytes, seen_files = 0, min(4, max_files), 0, 0
        while a < len(paths):
            got = read_files(fs, paths[a:a + take])
            yield [(p, got.get(p)) for p in paths[a:a + take]]
            seen_bytes += sum(len(v) for v in got.values() if isinstance(v, bytes))
            seen_files += take
            a += take
            mean = max(1, seen_bytes // max(1, seen_files))
            take = max(1, min(max_files, max_bytes // mean))
        return
    group: list[tuple[str, bytes | BaseException | None]] = []
    held = 0
    for path in paths:
        data = read_files(fs, [path]).get(path)
        group.append((path, data))
        held += len(data) if isinstance(data, bytes) else 0
        if held >= max_bytes:
            yield group
            group, held = [], 0
    if group:
        yield group


def read_files(fs: fsspec.AbstractFileSystem, paths: list[str]) -> dict[str, bytes | BaseException]:
    """Contents of many files, or the exception that stopped each one: failures are per file, and a
    transient failure is asked again with backoff before it is reported."""
    out = _read_once(fs, paths)
    for delay in RETRY_DELAYS:
        again = [p for p, v in out.items() if isinstance(v, BaseException) and is_transient(v)]
        if not again:
            break
        import time

        time.sleep(delay)
        out.update(_read_once(fs, again))
    return out


def _read_once(fs: fsspec.AbstractFileSystem, paths: list[str]) -> dict[str, bytes | BaseException]:
    """Contents of many files, or the exception that stopped each one: failures are per file.

    Local files are read with plain ``open``, a third of fsspec's per-file cost (bench/ingest.py);
    remote ones with one batched ``cat``, which fetches them concurrently. ``cat`` reads ``[``, ``*``
    and ``?`` in a name as a glob pattern, so such names are fetched one by one with ``cat_file``.
    """
    if not isinstance(fs, LocalFileSystem):
        plain = [p for p in paths if not GLOB_CHARS & set(p)]
        out = fs.cat(plain, on_error="return") if plain else {}
        if len(plain) == 1 and not isinstance(out, dict):
            out = {plain[0]: out}
        for p in paths:
            if GLOB_CHARS & set(p):
                try:
                    out[p] = fs.cat_file(p)
                except Exception as exc:  # per file, as cat(on_error="return") reports them
                    out[p] = exc
        return out
    out: dict[str, bytes | BaseException] = {}
    for path in paths:
        try:
            with open(path, "rb") as f:
                out[path] = f.read()
        except OSError as exc:
            out[path] = exc
    return out


def unreadable_reason(error: BaseException | None) -> str:
    """Why a file could not be read, for ``rejected.parquet``: the error's kind and words, never the
    absolute path (the table's ``path`` column already names the file, relative to the source)."""
    if error is None:
        return "unreadable: missing"
    if isinstance(error, OSError) and error.strerror:
        return f"unreadable: {type(error).__name__}: {error.strerror}"
    return f"unreadable: {type(error).__name__}: {error}"


def move_tree(src: str, dst: str, storage_options: dict[str, Any] | None = None) -> None:
    """Replace ``dst`` by ``src`` (a rename on a local disk; a server-side copy on object stores)."""
    fs, a = open_fs(src, storage_options)
    _, b = open_fs(dst, storage_options)
    fs.invalidate_cache()  # other processes (the workers) wrote under src since this one listed it
    if with_retries(fs.exists, b):
        with_retries(fs.rm, b, recursive=True)
    if is_local(src):
        fs.mv(a, b, recursive=True)
        return
    # Object stores: copy the listed files only (s3fs's recursive mv also tries the "directories",
    # which are no keys, and fails), then delete the source.
    a, b = a.rstrip("/"), b.rstrip("/")
    files = find(fs, a)
    for f in files:
        with_retries(fs.copy, f, b + f[len(a):])
    with_retries(fs.rm, a, recursive=True)
