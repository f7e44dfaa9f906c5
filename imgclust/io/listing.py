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

import os
import re
import stat
from dataclasses import dataclass, field
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from imgclust.io.imagefile import IMAGE_EXTENSIONS
from imgclust.io.storage import find

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


def list_local(root: str, max_bytes: int = MAX_FILE_BYTES) -> Listing:
    """Walk a local folder: every image-named entry is listed or refused, every unlistable folder
    refused, symlinked folders followed once."""
    listing = Listing()
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
            listing.refused.append((rel(folder) + "/", f"folder not listable: {exc.strerror or exc}"))
            continue
        if (st.st_dev, st.st_ino) in seen_dirs:
            continue  # a symlink loop (or a second link to a folder already listed)
        seen_dirs.add((st.st_dev, st.st_ino))
        try:
            with os.scandir(folder) as entries:
                items = list(entries)
        except OSError as exc:
            listing.refused.append((rel(folder) + "/", f"folder not listable: {exc.strerror or exc}"))
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
                listing.refused.append((rel(entry.path), f"unreadable: {exc.strerror or exc}"))
                continue
            if not stat.S_ISREG(st.st_mode):
                listing.refused.append((rel(entry.path), _refuse_kind(st.st_mode)))
            elif st.st_size > max_bytes:
                listing.refused.append((rel(entry.path), f"file larger than {max_bytes:,} bytes; not read"))
            else:
                listing.files.append((rel(entry.path), f"{st.st_size}:{st.st_mtime}"))
    listing.files.sort()
    listing.refused.sort()
    return listing


def list_remote(fs: Any, root: str, max_bytes: int = MAX_FILE_BYTES) -> Listing:
    """An object store's listing (no FIFOs or links there); objects above ``max_bytes`` are refused."""
    listing = Listing()
    prefix = root.rstrip("/") + "/"
    for p, info in find(fs, root, detail=True).items():
        rel = p.removeprefix(prefix)
        if not is_image_name(rel):
            continue
        if (info.get("size") or 0) > max_bytes:
            listing.refused.append((rel, f"file larger than {max_bytes:,} bytes; not read"))
        elif info.get("type", "file") not in ("file",):
            listing.refused.append((rel, f"not a regular file ({info.get('type')}); not read"))
        else:
            listing.files.append((rel, stamp_of(info)))
    listing.files.sort()
    listing.refused.sort()
    return listing


def list_files(fs: Any, root: str, max_bytes: int = MAX_FILE_BYTES) -> Listing:
    return list_local(root, max_bytes) if isinstance(fs, LocalFileSystem) else list_remote(fs, root, max_bytes)


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
