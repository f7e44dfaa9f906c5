"""A filesystem of generated objects, for measuring listing, hashing and the tables at sizes no disk
holds: ``synthetic://N`` holds N objects, ``d<folder>/<i>.png``, a thousand to a folder, whose bytes
are derived from their index (nothing is stored). Every ``DUPLICATE_EVERY``-th object repeats the
bytes of the one before it, so duplicate detection has work to do.

The bytes are not images (ingest rejects them); this is for discover and the table writers. The
protocol is registered with fsspec through the package's entry point, so ``imgclust`` commands,
Dask workers and ``fsspec.filesystem("synthetic")`` all find it.
"""

from __future__ import annotations

import io
from typing import Any

from fsspec.spec import AbstractFileSystem

PER_FOLDER = 1_000
DUPLICATE_EVERY = 50  # object i with i % DUPLICATE_EVERY == DUPLICATE_EVERY - 1 repeats object i - 1
MTIME = 1_700_000_000.0


def object_bytes(i: int) -> bytes:
    """Contents of object ``i``: distinct per object, except the planted duplicates."""
    if i % DUPLICATE_EVERY == DUPLICATE_EVERY - 1:
        i -= 1
    return b"synthetic object %012d " % i + bytes(range(256))[: 40 + i % 200]


def object_name(i: int) -> str:
    return f"d{i // PER_FOLDER:06d}/{i:09d}.png"


class SyntheticFileSystem(AbstractFileSystem):
    """Read-only: ``synthetic://N`` is a folder of N generated objects (see the module's doc)."""

    protocol = ("synthetic",)
    root_marker = ""

    def _parse(self, path: str) -> tuple[int, str]:
        path = self._strip_protocol(path).strip("/")
        top, _, rest = path.partition("/")
        try:
            return int(top), rest
        except ValueError:
            raise FileNotFoundError(path) from None

    def _index(self, n: int, rest: str) -> int | None:
        folder, _, name = rest.partition("/")
        if not (folder.startswith("d") and name.endswith(".png")):
            return None
        try:
            i = int(name[:-4])
        except ValueError:
            return None
        return i if 0 <= i < n and object_name(i) == rest else None

    def _file_info(self, n: int, i: int) -> dict[str, Any]:
        return {"name": f"{n}/{object_name(i)}", "size": len(object_bytes(i)), "type": "file", "mtime": MTIME}

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        n, rest = self._parse(path)
        if not rest:
            return {"name": str(n), "size": 0, "type": "directory"}
        i = self._index(n, rest)
        if i is not None:
            return self._file_info(n, i)
        folder = rest.rstrip("/")
        if folder.startswith("d") and folder[1:].isdigit() and int(folder[1:]) * PER_FOLDER < n:
            return {"name": f"{n}/{folder}", "size": 0, "type": "directory"}
        raise FileNotFoundError(path)

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        n, rest = self._parse(path)
        rest = rest.rstrip("/")
        if not rest:
            out = [{"name": f"{n}/d{f:06d}", "size": 0, "type": "directory"} for f in range(-(-n // PER_FOLDER))]
        else:
            if self.info(path)["type"] != "directory":
                out = [self.info(path)]
            else:
                f = int(rest[1:])
                out = [self._file_info(n, i) for i in range(f * PER_FOLDER, min(n, (f + 1) * PER_FOLDER))]
        return out if detail else [o["name"] for o in out]

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        n, rest = self._parse(path)
        i = self._index(n, rest)
        if i is None:
            raise FileNotFoundError(path)
        return object_bytes(i)[start:end]

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> io.BytesIO:
        if "r" not in mode:
            raise PermissionError("synthetic:// is read-only")
        return io.BytesIO(self.cat_file(path))
