"""Every cluster's members in order of distance to its centre, readable a page at a time.

``RUN/members/`` holds one Parquet file sorted by (cluster, distance, path) in row groups of
``ROWS_PER_GROUP`` rows, ``layout.json`` with each cluster's first row and size in it, and
``position.zarr``, the row of the file that holds each image (images.zarr row -> file row). A
page of a cluster is one or two row groups, whatever the run's size; an image's cluster and path
are one lookup in ``position.zarr`` and one row group. The layout is written by ``publish`` and
``imgclust compact``; rows that ``assign`` added since are read from the assignments table's
newer parts (``MemberLayout.generation`` says which).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from imgclust.io.arrays import create_array, open_if_exists, read_rows
from imgclust.io.storage import open_fs, read_json, remove, with_retries, write_bytes_atomic, write_json
from imgclust.runstore import RunStore

ROWS_PER_GROUP = 1024
COLUMNS = ["cluster", "distance", "path", "index"]
OUTLIER = "outlier"  # the assignments' outlier score, in layouts of runs that have it


def write_members(store: RunStore, assignments: pd.DataFrame, index: np.ndarray, generation: int) -> None:
    """Write the layout of ``assignments`` (path, cluster, distance), whose images.zarr rows are
    ``index``, as of tables generation ``generation``. ``layout.json`` is written last: a layout
    without it is an unfinished one, and ``MemberLayout.open`` ignores it."""
    so = store.storage_options
    remove(store.members("layout.json"), so)
    df = pd.DataFrame({"cluster": assignments["cluster"].to_numpy(np.int64),
                       "distance": assignments["distance"].to_numpy(np.float64),
                       "path": assignments["path"].to_numpy(object), "index": np.asarray(index, np.int64)})
    if OUTLIER in assignments.columns:
        df[OUTLIER] = assignments[OUTLIER].to_numpy(np.float64)
    df = df.sort_values(["cluster", "distance", "path"], kind="stable").reset_index(drop=True)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), sink, row_group_size=ROWS_PER_GROUP)
    write_bytes_atomic(store.members("members.parquet"), sink.getvalue().to_pybytes(), so)
    n_images = int(df["index"].max()) + 1 if len(df) else 0
    position = np.full(n_images, -1, np.int64)
    position[df["index"].to_numpy()] = np.arange(len(df))
    arr = create_array(store.members("position.zarr"), (n_images,), 1 << 16, "int64", so)
    if n_images:
        arr[:] = position
    sizes = df.groupby("cluster", sort=True).size()
    starts = np.concatenate([[0], np.cumsum(sizes.to_numpy())[:-1]]) if len(sizes) else []
    write_json(store.members("layout.json"), {
        "generation": int(generation), "rows": len(df), "rows_per_group": ROWS_PER_GROUP,
        "clusters": {str(int(c)): [int(a), int(s)] for c, a, s in zip(sizes.index, starts, sizes.to_numpy())},
    }, so)


@dataclass
class MemberLayout:
    """Reader of ``RUN/members/`` (see the module's docstring)."""

    store: RunStore
    generation: int
    rows: int
    rows_per_group: int
    clusters: dict[int, tuple[int, int]]  # cluster -> (first row, size)
    _meta: Any = field(default=None, init=False, repr=False, compare=False)  # the Parquet footer, parsed once

    @classmethod
    def open(cls, store: RunStore) -> MemberLayout | None:
        """The run's layout, or None when it has none (a run made before layouts existed)."""
        try:
            layout = read_json(store.members("layout.json"), store.storage_options)
        except FileNotFoundError:
            return None
        return cls(store, int(layout["generation"]), int(layout["rows"]), int(layout["rows_per_group"]),
                   {int(c): (int(a), int(s)) for c, (a, s) in layout["clusters"].items()})

    def _file(self) -> Any:
        fs, path = open_fs(self.store.members("members.parquet"), self.store.storage_options)
        return with_retries(fs.open, path, "rb")

    def _parquet(self, f: Any) -> pq.ParquetFile:
        """``f`` as a Parquet file, its footer parsed once per layout (thousands of row groups at 1M rows)."""
        pf = pq.ParquetFile(f, metadata=self._meta)
        self._meta = pf.metadata
        return pf

    def read(self, start: int, stop: int) -> pd.DataFrame:
        """Rows [start, stop) of the layout (cluster, distance, path, index), reading only the row
        groups that hold them."""
        start, stop = max(0, start), min(self.rows, stop)
        if stop <= start:
            return pd.DataFrame({c: [] for c in COLUMNS})
        first, last = start // self.rows_per_group, (stop - 1) // self.rows_per_group
        with self._file() as f:
            table = self._parquet(f).read_row_groups(list(range(first, last + 1)), columns=COLUMNS)
        df = table.to_pandas()
        lo = start - first * self.rows_per_group
        return df.iloc[lo:lo + stop - start].reset_index(drop=True)

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
        with self._file() as f:
            return OUTLIER in self._parquet(f).schema_arrow.names

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
        group_of = pos // self.rows_per_group
        frames = []
        with self._file() as f:  # one row group in memory at a time, however many are asked
            pf = self._parquet(f)
            for g in np.unique(group_of).tolist():
                asked = np.flatnonzero(group_of == g)
                rows = pf.read_row_group(g, columns=columns).to_pandas()
                frames.append(rows.iloc[pos[asked] % self.rows_per_group].assign(_at=asked))
        return pd.concat(frames).sort_values("_at").drop(columns="_at")[columns].reset_index(drop=True)

