"""A run's tables: append-only Parquet datasets in which a later row supersedes a path.

Each table (``manifest``, ``duplicates``, ``rejected``, ``assignments``) is a folder of Parquet
parts, ``<table>.parquet/part-<generation>-<part>.parquet``, readable as one table by pandas,
pyarrow, Dask and DuckDB. Every row carries the ``generation`` that wrote it: 0 for the run, then
one more for each ``assign``. Parts are only ever added; a correction (a file edited in place, a
once-rejected file that now decodes) is a new row in a later generation, and readers take, for
each path, its row of the highest generation across the three file tables. A path's assignment
is the one written with its current manifest row.

A generation counts once ``run.json`` names it (``tables_generation``); parts of a later one are
what a crashed ``assign`` left, ignored by readers and removed by the next ``assign``, which
writes that generation again. So a crash at any write leaves the tables as they were. Compaction
(``imgclust compact``) writes the current rows as one new generation and names it the base
(``tables_base``): parts of earlier generations no longer count, and are removed.
"""

from __future__ import annotations

import io
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd

from imgclust.io.storage import check_fences, open_fs, with_retries, write_bytes_atomic

FILE_TABLES = ("manifest", "duplicates", "rejected")  # every file found is in exactly one of these
TABLES = (*FILE_TABLES, "assignments")
GENERATION = "generation"


def part_name(generation: int, part: int = 0) -> str:
    return f"part-{generation:06d}-{part:05d}.parquet"


def part_generation(name: str) -> int | None:
    """Generation of a part file's name, None for anything else in the folder."""
    stem = posixpath.basename(name)
    if not (stem.startswith("part-") and stem.endswith(".parquet")):
        return None
    try:
        return int(stem.split("-")[1])
    except (IndexError, ValueError):
        return None


def write_part(url: str, df: pd.DataFrame, generation: int, part: int = 0,
               storage_options: dict[str, Any] | None = None) -> None:
    """Write ``df`` as one part of the table at ``url`` (its folder), each row stamped with ``generation``."""
    buf = io.BytesIO()
    df.assign(**{GENERATION: generation}).to_parquet(buf, index=False)
    write_bytes_atomic(posixpath.join(url, part_name(generation, part)), buf.getvalue(), storage_options)


class TableFormatError(ValueError):
    """A table in a layout this version does not read (a single file, from an older version)."""


def part_files(url: str, storage_options: dict[str, Any] | None = None) -> list[tuple[int, str]]:
    """(generation, path) of every part of a table, in write order; none when the table is absent."""
    fs, root = open_fs(url, storage_options)
    try:
        info = with_retries(fs.info, root)
    except FileNotFoundError:
        return []
    if info.get("type") != "directory":
        raise TableFormatError(f"{url} is a single file, written by an older version of imgclust; this version "
                               "keeps tables as folders of parts: run the same command again with --overwrite")
    names = with_retries(fs.ls, root, detail=False)
    parts = [(part_generation(n), n) for n in names]
    return sorted((g, n) for g, n in parts if g is not None)


def read_parts(url: str, storage_options: dict[str, Any] | None = None, upto: int | None = None,
               columns: list[str] | None = None, since: int = 0) -> pd.DataFrame:
    """Every row of the parts of generations ``since..upto`` (all when ``upto`` is None), oldest
    first; no rule applied."""
    fs, _ = open_fs(url, storage_options)
    frames = []
    for generation, name in part_files(url, storage_options):
        if generation < since or (upto is not None and generation > upto):
            continue
        data = with_retries(fs.cat_file, name)
        frames.append(pd.read_parquet(io.BytesIO(data), columns=columns))
    if not frames:
        return pd.DataFrame(columns=columns) if columns else pd.DataFrame()
    return pd.concat(frames, ignore_index=True)


def drop_parts(url: str, storage_options: dict[str, Any] | None, drop: Callable[[int, int], bool]) -> int:
    """Remove the parts whose (generation, part number) ``drop`` selects; how many."""
    fs, _ = open_fs(url, storage_options)
    doomed = [n for g, n in part_files(url, storage_options) if drop(g, part_index(n))]
    for name in doomed:
        check_fences(name)
        with_retries(fs.rm_file, name)
    return len(doomed)


def part_index(name: str) -> int:
    return int(posixpath.basename(name).split("-")[2].split(".")[0])


@dataclass(frozen=True)
class RunTables:
    """The current rows of a run's tables: one row per path across the file tables, and the
    assignment of every manifest row."""

    manifest: pd.DataFrame
    duplicates: pd.DataFrame
    rejected: pd.DataFrame
    assignments: pd.DataFrame

    def __getitem__(self, name: str) -> pd.DataFrame:
        return getattr(self, name)


def current_rows(raw: dict[str, pd.DataFrame]) -> RunTables:
    """Apply the rule to raw rows (``read_parts`` of each table): per path, the row of the highest
    generation across the file tables wins; an assignment counts with its manifest row."""
    owner = pd.concat([raw[t][["path", GENERATION]].assign(_table=t) for t in FILE_TABLES if len(raw[t])],
                      ignore_index=True) if any(len(raw[t]) for t in FILE_TABLES) else None
    out: dict[str, pd.DataFrame] = {}
    if owner is None:
        out = {t: raw[t] for t in FILE_TABLES}
    else:
        latest = owner.sort_values(GENERATION, kind="stable").drop_duplicates("path", keep="last")
        for t in FILE_TABLES:
            win = latest.loc[latest["_table"] == t, ["path", GENERATION]]
            out[t] = raw[t].merge(win, on=["path", GENERATION], how="inner") if len(raw[t]) else raw[t]
    assignments = raw["assignments"]
    if len(assignments):
        assignments = assignments.merge(out["manifest"][["path", GENERATION]], on=["path", GENERATION], how="inner")
    return RunTables(*(out[t].reset_index(drop=True) for t in FILE_TABLES), assignments.reset_index(drop=True))
