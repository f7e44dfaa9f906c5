"""List the image files of a source, so that every entry ends up somewhere: listed, or refused with a reason.

Local folders are walked here rather than by fsspec, whose walk skips unreadable folders without a
word and does not follow symlinked folders. Here an unlistable folder becomes a refused entry, a
symlinked folder is followed once (a loop is cut where it closes), and entries that are not regular
files (FIFOs, devices, sockets, links to them) are refused instead of read: reading a FIFO blocks
forever and a link to ``/dev/zero`` never ends.

Paths are relative to the source with ``/`` separators. A local name that is not valid UTF-8 (old
zips, Samba shares) is written with its undecodable bytes as ``\\xHH`` (``table_path``);
``source_path`` maps such a path back to the file.
"""

from __future__ import annotations

import heapq
import os
import posixpath
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from imgclust.io.imagefile import IMAGE_EXTENSIONS

MAX_FILE_BYTES = 1 << 30  # larger files are refused unread (no image of the formats read is this large)
_ESCAPE = re.compile(r"\\x([89a-f][0-9a-f])|\\\\")


def table_path(name: str) -> str:
    """``name`` as the tables store it: unchanged when it is valid UTF-8; otherwise each undecodable
    byte (a surrogate from ``os.fsdecode``) becomes ``\\xHH`` and a backslash ``\\\\``."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return "".join(f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF else "\\\\" if c == "\\" else c
                       for c in name)


def source_path(path: str) -> str:
    """The file name (as ``os`` functions take it) of a table path: ``table_path``'s inverse."""
    if "\\x" not in path:
        return path
    name = _ESCAPE.sub(lambda m: chr(0xDC00 + int(m.group(1), 16)) if m.group(1) else "\\", path)
    return name if table_path(name) == path else path  # a valid UTF-8 name that merely looks escaped


def stamp_of(info: dict[str, Any]) -> str:
    """Size and modification mark of a listed file: what tells a changed file without reading it."""
    mark = info.get("mtime") or info.get("LastModified") or info.get("ETag") or info.get("last_modified") or ""
    return f"{info.get('size')}:{mark}"


@dataclass
class Listing:
    """What a source holds: image files to read, and entries refused with their reason."""

    files: list[tuple[str, str]] = field(default_factory=list)  # (path, stamp), sorted by path
    refused: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), sorted by path

    @property
    def paths(self) -> list[str]:
        return [p for p, _ in self.files]

    def __len__(self) -> int:
        return len(self.files) + len(self.refused)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _refuse_kind(mode: int) -> str:
    kind = ("FIFO" if stat.S_ISFIFO(mode) else "device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "socket" if stat.S_ISSOCK(mode) else "special file")
    return f"not a regular file ({kind}); not read"


Entry = tuple[str, str | None, str | None]  # (path, stamp, reason refused): a stamp for a file to read, a reason otherwise


def walk_local(root: str, max_bytes: int = MAX_FILE_BYTES) -> Iterator[Entry]:
    """Walk a local folder, one folder's entries in memory at a time: every image-named entry is
    listed or refused, every unlistable folder refused, symlinked folders followed once. Order:
    folder by folder (not sorted)."""
    seen_dirs: set[tuple[int, int]] = set()
    root = root.rstrip("/") or "/"

    def rel(path: str) -> str:
        return table_path(os.path.relpath(path, root).replace(os.sep, "/"))

    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
        except OSError as exc:
            yield rel(folder) + "/", None, f"folder not listable: {exc.strerror or exc}"
            continue
        if (st.st_dev, st.st_ino) in seen_dirs:
            continue  # a symlink loop (or a second link to a folder already listed)
        seen_dirs.add((st.st_dev, st.st_ino))
        try:
            with os.scandir(folder) as entries:
                items = list(entries)
        except OSError as exc:
            yield rel(folder) + "/", None, f"folder not listable: {exc.strerror or exc}"
            continue
        for entry in items:
            try:
                if entry.is_dir(follow_symlinks=True):
                    stack.append(entry.path)
                    continue
            except OSError:
                pass
            if not is_image_name(entry.name):
                continue
            try:
                st = entry.stat(follow_symlinks=True)
            except OSError as exc:
                yield rel(entry.path), None, f"unreadable: {exc.strerror or exc}"
                continue
            if not stat.S_ISREG(st.st_mode):
                yield rel(entry.path), None, _refuse_kind(st.st_mode)
            elif st.st_size > max_bytes:
                yield rel(entry.path), None, f"file larger than {max_bytes:,} bytes; not read"
            else:
                yield rel(entry.path), f"{st.st_size}:{st.st_mtime}", None


def walk_remote(fs: Any, root: str, max_bytes: int = MAX_FILE_BYTES) -> Iterator[Entry]:
    """An object store's or remote filesystem's files, one folder listing at a time (asked again
    while it fails transiently); each folder's cached listing is dropped once read, so memory is
    that of the largest folder, not of the archive. Objects above ``max_bytes`` are refused."""
    from imgclust.io.storage import with_retries

    top = fs._strip_protocol(root).rstrip("/") or "/"
    prefix = top.rstrip("/") + "/"
    stack = [top]
    while stack:
        folder = stack.pop()
        infos = with_retries(fs.ls, folder, detail=True)
        fs.invalidate_cache(folder)
        for info in infos:
            name = info["name"].rstrip("/")
            if info.get("type") == "directory":
                if name != folder:
                    stack.append(name)
                continue
            rel = name.removeprefix(prefix)
            if not is_image_name(rel):
                continue
            if (info.get("size") or 0) > max_bytes:
                yield rel, None, f"file larger than {max_bytes:,} bytes; not read"
            elif info.get("type", "file") != "file":
                yield rel, None, f"not a regular file ({info.get('type')}); not read"
            else:
                yield rel, stamp_of(info), None


def walk_files(fs: Any, root: str, max_bytes: int = MAX_FILE_BYTES) -> Iterator[Entry]:
    return walk_local(root, max_bytes) if isinstance(fs, LocalFileSystem) else walk_remote(fs, root, max_bytes)


def collect(entries: Iterable[Entry]) -> Listing:
    """A walk held in memory, sorted (for small sources and new files; a run streams it into
    ``ListingParts``)."""
    listing = Listing()
    for path, stamp, reason in entries:
        if reason is None:
            listing.files.append((path, stamp or ""))
        else:
            listing.refused.append((path, reason))
    listing.files.sort()
    listing.refused.sort()
    return listing


def list_local(root: str, max_bytes: int = MAX_FILE_BYTES) -> Listing:
    return collect(walk_local(root, max_bytes))


def list_remote(fs: Any, root: str, max_bytes: int = MAX_FILE_BYTES) -> Listing:
    return collect(walk_remote(fs, root, max_bytes))


def list_files(fs: Any, root: str, max_bytes: int = MAX_FILE_BYTES) -> Listing:
    return collect(walk_files(fs, root, max_bytes))


LISTING_SCHEMA = pa.schema([("path", pa.string()), ("stamp", pa.string()), ("reason", pa.string())])
RUN_ROWS = 131_072  # entries sorted in memory at a time (about 30 MB); longer listings are merged from runs
GROUP_ROWS = 1_024  # entries per row group of a listing part: the unit that discover hashes as one task
MERGE_BATCH = 1_024  # rows read ahead from each run while merging


@dataclass(frozen=True)
class ListingGroup:
    """One row group of a listing part: ``rows`` entries, ``key`` the fingerprint of their paths,
    stamps and reasons (what a finished hash of them is recorded under)."""

    part: str
    group: int
    rows: int
    key: str


@dataclass(frozen=True)
class ListingParts:
    """A listing written as Parquet parts sorted by path, read a row group at a time."""

    groups: tuple[ListingGroup, ...]
    n_files: int
    n_refused: int

    def __len__(self) -> int:
        return self.n_files + self.n_refused


def read_group(group: ListingGroup, storage_options: dict[str, Any] | None = None) -> pa.Table:
    """The entries of one row group of a listing part."""
    from imgclust.io.storage import open_fs, with_retries

    fs, path = open_fs(group.part, storage_options)

    def read() -> pa.Table:
        with fs.open(path, "rb") as fh:
            return pq.ParquetFile(fh).read_row_group(group.group)
    return with_retries(read)


def write_listing(entries: Iterable[Entry], url: str, storage_options: dict[str, Any] | None = None,
                  run_rows: int = RUN_ROWS, group_rows: int = GROUP_ROWS) -> ListingParts:
    """Stream ``entries`` into Parquet parts under the folder ``url``, sorted by path, in memory
    that does not grow with their number: runs of ``run_rows`` entries are sorted and written,
    then merged (``heapq.merge``, ``MERGE_BATCH`` rows of each run at a time) into parts of
    ``run_rows`` rows (rounded up to whole row groups) in row groups of ``group_rows``, every row
    group full but the last."""
    from imgclust.io.storage import open_fs, remove, with_retries

    remove(url, storage_options)
    fs, root = open_fs(url, storage_options)
    with_retries(fs.makedirs, root, exist_ok=True)
    runs: list[str] = []
    buffer: list[Entry] = []
    n_files = n_refused = 0

    def spill() -> None:
        buffer.sort(key=_path_of)
        name = posixpath.join(root, f"run-{len(runs):05d}.parquet")
        _write_rows(fs, name, buffer, group_rows)
        runs.append(name)
        buffer.clear()

    for entry in entries:
        buffer.append(entry)
        if entry[2] is None:
            n_files += 1
        else:
            n_refused += 1
        if len(buffer) >= run_rows:
            spill()
    if runs:
        if buffer:
            spill()
        merged: Iterable[Entry] = heapq.merge(*(_run_rows(fs, r) for r in runs), key=_path_of)
    else:
        buffer.sort(key=_path_of)
        merged = buffer
    groups: list[ListingGroup] = []
    chunk: list[Entry] = []
    n_parts, part_rows = 0, -(-run_rows // group_rows) * group_rows  # whole row groups only
    for entry in merged:
        chunk.append(entry)
        if len(chunk) >= part_rows:
            groups += _write_part(fs, url, root, n_parts, chunk, group_rows)
            chunk, n_parts = [], n_parts + 1
    if chunk:
        groups += _write_part(fs, url, root, n_parts, chunk, group_rows)
    for r in runs:
        with_retries(fs.rm_file, r)
    return ListingParts(tuple(groups), n_files, n_refused)


def _path_of(entry: Entry) -> str:
    return entry[0]


def _write_rows(fs: Any, path: str, rows: list[Entry], group_rows: int) -> None:
    from imgclust.io.storage import with_retries

    table = pa.Table.from_arrays([pa.array([r[i] for r in rows], pa.string()) for i in range(3)],
                                 schema=LISTING_SCHEMA)

    def write() -> None:
        with fs.open(path, "wb") as fh:
            pq.write_table(table, fh, row_group_size=group_rows)
    with_retries(write)


def _run_rows(fs: Any, path: str) -> Iterator[Entry]:
    with fs.open(path, "rb") as fh:
        for batch in pq.ParquetFile(fh).iter_batches(batch_size=MERGE_BATCH):
            yield from zip(*(batch.column(i).to_pylist() for i in range(3)))


def _write_part(fs: Any, url: str, root: str, number: int, rows: list[Entry],
                group_rows: int) -> list[ListingGroup]:
    """Write one sorted part; its row groups, each with the fingerprint of its entries."""
    from imgclust.state.resume import fingerprint

    name = f"part-{number:05d}.parquet"
    _write_rows(fs, posixpath.join(root, name), rows, group_rows)
    return [ListingGroup(posixpath.join(url.rstrip("/"), name), g, len(rows[a:a + group_rows]),
                         fingerprint(rows[a:a + group_rows])[:32])
            for g, a in enumerate(range(0, len(rows), group_rows))]


def peek_images(fs: Any, root: str, limit: int) -> list[str]:
    """Up to ``limit`` image files under ``root`` (full paths), stopping as soon as it has them: the
    checks before a run need to know there are images, not to hold a listing of every one.

    Local folders are walked with ``os.scandir``; other filesystems one folder listing at a time
    (an object store's flat prefix is one listing).
    """
    from imgclust.io.storage import with_retries

    found: list[str] = []
    stack, seen = [root.rstrip("/") or "/"], set()
    local = isinstance(fs, LocalFileSystem)
    while stack and len(found) < limit:
        folder = stack.pop()
        if folder in seen:
            continue
        seen.add(folder)
        if local:
            try:
                with os.scandir(folder) as entries:
                    items = [(e.path, e.is_dir(follow_symlinks=True)) for e in entries]
            except OSError:
                continue
        else:
            items = [(i["name"].rstrip("/"), i.get("type") == "directory")
                     for i in with_retries(fs.ls, folder, detail=True)]
        for path, is_dir in sorted(items):
            if is_dir:
                if path != folder:
                    stack.append(os.path.realpath(path) if local else path)
            elif is_image_name(path):
                found.append(path)
                if len(found) >= limit:
                    break
    return found
