"""Every cluster's members in order of distance to its centre, readable a page at a time.

``RUN/members/`` holds Parquet parts that together are sorted by (cluster, distance, path), each in
row groups of ``ROWS_PER_GROUP`` rows; ``layout.json`` with the parts (name, first row, rows) and
each cluster's first row and size; and ``position.zarr``, the row of the layout that holds each
image (images.zarr row -> layout row). A page of a cluster is one or two row groups, whatever the
run's size; an image's cluster and path are one lookup in ``position.zarr`` and one row group.
``publish`` writes the layout on the workers, one part per band of clusters and distances
(``imgclust.stages.publish``); ``imgclust compact`` rewrites it from the tables. Rows that
``assign`` added since are read from the assignments table's newer parts (``MemberLayout.generation``
says which).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from imgclust.io.arrays import create_array, open_if_exists, read_rows
from imgclust.io.storage import open_fs, read_json, remove, with_retries, write_json, write_parquet
from imgclust.runstore import RunStore

ROWS_PER_GROUP = 1024
POSITION_CHUNK = 1 << 16  # images per chunk of position.zarr
COLUMNS = ["cluster", "distance", "path", "index"]
OUTLIER = "outlier"  # the assignments' outlier score, in layouts of runs that have it


def part_file(number: int) -> str:
    return f"part-{number:05d}.parquet"


def members_frame(assignments: pd.DataFrame, index: np.ndarray) -> pd.DataFrame:
    """The layout's rows of ``assignments`` (path, cluster, distance[, outlier]) whose images.zarr
    rows are ``index``, sorted by (cluster, distance, path)."""
    df = pd.DataFrame({"cluster": assignments["cluster"].to_numpy(np.int64),
                       "distance": assignments["distance"].to_numpy(np.float64),
                       "path": assignments["path"].to_numpy(object), "index": np.asarray(index, np.int64)})
    if OUTLIER in assignments.columns:
        df[OUTLIER] = assignments[OUTLIER].to_numpy(np.float64)
    return df.sort_values(["cluster", "distance", "path"], kind="stable").reset_index(drop=True)


def write_members_part(store: RunStore, number: int, rows: pd.DataFrame) -> None:
    """One part of the layout (rows already in layout order), in row groups of ``ROWS_PER_GROUP``."""
    write_parquet(store.members(part_file(number)), rows, store.storage_options, ROWS_PER_GROUP)


def write_layout(store: RunStore, generation: int, parts: list[tuple[str, int, int]],
                 clusters: dict[int, tuple[int, int]]) -> None:
    """``layout.json`` (the commit of a layout: written after its parts and positions), then the
    removal of members files no part of it names."""
    so = store.storage_options
    write_json(store.members("layout.json"), {
        "generation": int(generation), "rows": int(sum(p[2] for p in parts)), "rows_per_group": ROWS_PER_GROUP,
        "parts": [[name, int(first), int(rows)] for name, first, rows in parts],
        "clusters": {str(int(c)): [int(a), int(n)] for c, (a, n) in sorted(clusters.items())},
    }, so)
    fs, root = open_fs(store.members(""), so)
    keep = {name for name, _, _ in parts}
    for name in with_retries(fs.ls, root.rstrip("/"), detail=False):
        base = posixpath.basename(name)
        if base.endswith(".parquet") and base not in keep:
            with_retries(fs.rm_file, name)


def write_members(store: RunStore, assignments: pd.DataFrame, index: np.ndarray, generation: int) -> None:
    """Write the layout of ``assignments`` (path, cluster, distance), whose images.zarr rows are
    ``index``, as of tables generation ``generation``, as one part, in this process (``publish``
    writes a run's layout on the workers). ``layout.json`` is written last: a layout without it is
    an unfinished one, and ``MemberLayout.open`` ignores it."""
    so = store.storage_options
    remove(store.members("layout.json"), so)
    df = members_frame(assignments, index)
    write_members_part(store, 0, df)
    n_images = int(df["index"].max()) + 1 if len(df) else 0
    position = np.full(n_images, -1, np.int64)
    position[df["index"].to_numpy()] = np.arange(len(df))
    arr = create_array(store.members("position.zarr"), (n_images,), POSITION_CHUNK, "int64", so)
    if n_images:
        arr[:] = position
    sizes = df.groupby("cluster", sort=True).size()
    starts = np.concatenate([[0], np.cumsum(sizes.to_numpy())[:-1]]) if len(sizes) else []
    write_layout(store, generation, [(part_file(0), 0, len(df))],
                 {int(c): (int(a), int(n)) for c, a, n in zip(sizes.index, starts, sizes.to_numpy())})


@dataclass
class MemberLayout:
    """Reader of ``RUN/members/`` (see the module's docstring)."""

    store: RunStore
    generation: int
    rows: int
    rows_per_group: int
    clusters: dict[int, tuple[int, int]]  # cluster -> (first row, size)
    parts: tuple[tuple[str, int, int], ...] = ()  # (file name, first row, rows), in row order
    _meta: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)  # footers, parsed once

    @classmethod
    def open(cls, store: RunStore) -> MemberLayout | None:
        """The run's layout, or None when it has none (a run made before layouts existed)."""
        try:
            layout = read_json(store.members("layout.json"), store.storage_options)
        except FileNotFoundError:
            return None
        rows = int(layout["rows"])
        parts = layout.get("parts") or [["members.parquet", 0, rows]]  # a one-file layout of an older version
        return cls(store, int(layout["generation"]), rows, int(layout["rows_per_group"]),
                   {int(c): (int(a), int(s)) for c, (a, s) in layout["clusters"].items()},
                   tuple((str(n), int(a), int(r)) for n, a, r in parts))

    def _file(self, name: str) -> Any:
        fs, path = open_fs(self.store.members(name), self.store.storage_options)
        return with_retries(fs.open, path, "rb")

    def _parquet(self, name: str, f: Any) -> pq.ParquetFile:
        """Part ``name`` open as ``f``, its footer parsed once per layout (thousands of row groups at 1M rows)."""
        pf = pq.ParquetFile(f, metadata=self._meta.get(name))
        self._meta[name] = pf.metadata
        return pf

    def _part_of(self, rows: np.ndarray) -> np.ndarray:
        """The number (in ``parts``) of the part that holds each layout row."""
        firsts = np.array([a for _, a, _ in self.parts], np.int64)
        return np.searchsorted(firsts, rows, side="right") - 1

    def read(self, start: int, stop: int) -> pd.DataFrame:
        """Rows [start, stop) of the layout (cluster, distance, path, index), reading only the row
        groups that hold them."""
        start, stop = max(0, start), min(self.rows, stop)
        if stop <= start:
            return pd.DataFrame({c: [] for c in COLUMNS})
        frames = []
        for name, first, rows in self.parts:
            a, b = max(start, first) - first, min(stop, first + rows) - first
            if b <= a:
                continue
            g0, g1 = a // self.rows_per_group, (b - 1) // self.rows_per_group
            with self._file(name) as f:
                table = self._parquet(name, f).read_row_groups(list(range(g0, g1 + 1)), columns=COLUMNS)
            lo = a - g0 * self.rows_per_group
            frames.append(table.to_pandas().iloc[lo:lo + b - a])
        return pd.concat(frames, ignore_index=True)

    def members(self, cluster: int, start: int, stop: int) -> pd.DataFrame:
        """Members [start, stop) of ``cluster`` in order of distance (an empty frame past its end)."""
        first, size = self.clusters.get(cluster, (0, 0))
        return self.read(first + max(0, start), first + min(size, stop))

    def outlier_of(self, index: int) -> float | None:
        """Image ``index``'s outlier score, or None (a layout without scores, or no such row)."""
        rows = self.rows_of(np.array([index]), [*COLUMNS, OUTLIER]) if self.has_outliers else None
        if rows is None or not len(rows) or not np.isfinite(rows[OUTLIER].iloc[0]):
            return None
        return float(rows[OUTLIER].iloc[0])

    @cached_property
    def has_outliers(self) -> bool:
        """Whether the layout carries outlier scores (runs made before them do not)."""
        if not self.parts:
            return False
        name = self.parts[0][0]
        with self._file(name) as f:
            return OUTLIER in self._parquet(name, f).schema_arrow.names

    def rows_of(self, index: np.ndarray, columns: list[str] = COLUMNS) -> pd.DataFrame:
        """The layout's rows of images.zarr rows ``index``, in that order (rows it lacks are left out)."""
        index = np.asarray(index, np.int64)
        pos_arr = open_if_exists(self.store.members("position.zarr"), self.store.storage_options)
        if pos_arr is None or len(index) == 0:
            return pd.DataFrame({c: [] for c in columns})
        pos = read_rows(pos_arr, index[(index >= 0) & (index < pos_arr.shape[0])])  # in the order asked
        return self.at(pos[pos >= 0], columns)

    def at(self, positions: np.ndarray, columns: list[str] = COLUMNS) -> pd.DataFrame:
        """Rows at ``positions`` of the layout, in that order, reading each row group once."""
        pos = np.asarray(positions, np.int64)
        if len(pos) == 0:
            return pd.DataFrame({c: [] for c in columns})
        part_of = self._part_of(pos)
        frames = []
        for p in np.unique(part_of).tolist():
            name, first, _ = self.parts[p]
            in_part = np.flatnonzero(part_of == p)
            local = pos[in_part] - first
            group_of = local // self.rows_per_group
            with self._file(name) as f:  # one row group in memory at a time, however many are asked
                pf = self._parquet(name, f)
                for g in np.unique(group_of).tolist():
                    asked = group_of == g
                    rows = pf.read_row_group(g, columns=columns).to_pandas()
                    frames.append(rows.iloc[local[asked] % self.rows_per_group].assign(_at=in_part[asked]))
        return pd.concat(frames).sort_values("_at").drop(columns="_at")[columns].reset_index(drop=True)
