"""Where things live: a location (URL + fsspec options), and the run store that knows every file of a run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import fsspec
import pandas as pd

from imgclust.io import tables
from imgclust.io.storage import exists, join, open_fs, read_json, remove


@dataclass(frozen=True)
class Location:
    """A folder or prefix on any fsspec filesystem, with the options needed to reach it.

    Parameters
    ----------
    url:
        Local path or fsspec URL (``s3://bucket/prefix``).
    storage_options:
        fsspec options (``endpoint_url``, ``key``, ...). Compared but never hashed.
    """

    url: str
    storage_options: dict[str, Any] = field(default_factory=dict, hash=False)

    def path(self, *parts: str) -> str:
        """URL of ``parts`` under this location, ``/``-joined."""
        return join(self.url, *parts) if parts else self.url

    def child(self, *parts: str) -> Location:
        return Location(self.path(*parts), self.storage_options)

    def fs(self) -> tuple[fsspec.AbstractFileSystem, str]:
        """Filesystem and protocol-less root path."""
        return open_fs(self.url, self.storage_options)

    def exists(self, *parts: str) -> bool:
        return exists(self.path(*parts), self.storage_options)


@dataclass(frozen=True)
class RunStore(Location):
    """The output of one run: the path of every file it writes, in one place.

    Stages take a ``RunStore`` instead of ``(output, storage_options)`` pairs, so a file's name is
    written down once (here) and every reader and writer agrees on it.
    """

    # Tables (imgclust.io.tables: folders of parts, a later row superseding a path) and the run record
    def table(self, name: str) -> str:
        if name not in tables.TABLES:
            raise KeyError(f"no table {name!r}; the tables are {', '.join(tables.TABLES)}")
        return self.path(f"{name}.parquet")

    @property
    def generations(self) -> tuple[int, int]:
        """(first, last) generation of table parts that count: (0, 0) until the run is finished,
        then as ``run.json`` says (one more per ``assign``; compaction moves the first)."""
        if not self.is_finished:
            return 0, 0
        run = read_json(self.run_record, self.storage_options)
        return int(run.get("tables_base", 0)), int(run.get("tables_generation", 0))

    def write_table(self, name: str, df: pd.DataFrame, generation: int = 0, rows_per_part: int | None = None) -> None:
        """``df`` as generation ``generation`` of table ``name`` (in parts of at most ``rows_per_part``
        rows), replacing whatever that generation held."""
        url = self.table(name)
        if generation == 0:
            try:
                tables.part_files(url, self.storage_options)
            except tables.TableFormatError:  # an older version's single file, which this stage replaces
                remove(url, self.storage_options)
        step = max(1, rows_per_part or len(df) or 1)
        starts = range(0, len(df), step) if len(df) else [0]
        for part, a in enumerate(starts):
            tables.write_part(url, df.iloc[a:a + step], generation, part, self.storage_options)
        tables.drop_parts(url, self.storage_options, lambda g, i: g == generation and i >= len(starts))

    def read_table(self, name: str, columns: list[str] | None = None) -> pd.DataFrame:
        """The current rows of table ``name`` (the rule of ``imgclust.io.tables``)."""
        since, upto = self.generations
        if since == upto:  # one generation: nothing can be superseded
            return tables.read_parts(self.table(name), self.storage_options, upto, columns, since)
        return self.tables()[name] if columns is None else self.tables()[name][columns]

    def tables(self) -> tables.RunTables:
        """The current rows of every table."""
        since, upto = self.generations
        return tables.current_rows({t: tables.read_parts(self.table(t), self.storage_options, upto, since=since)
                                    for t in tables.TABLES})

    @property
    def manifest(self) -> str:
        return self.path("manifest.parquet")

    @property
    def duplicates(self) -> str:
        return self.path("duplicates.parquet")

    @property
    def rejected(self) -> str:
        return self.path("rejected.parquet")

    @property
    def assignments(self) -> str:
        return self.path("assignments.parquet")

    @property
    def near_duplicates(self) -> str:
        """Groups of near-identical images: parts like a table's, written by each full run (not by
        ``assign``, not compacted); read with ``imgclust.io.tables.read_parts``."""
        return self.path("near_duplicates.parquet")

    @property
    def clusters(self) -> str:
        return self.path("clusters.json")

    @property
    def run_record(self) -> str:
        return self.path("run.json")

    @property
    def metrics(self) -> str:
        return self.path("metrics.json")

    # Arrays
    @property
    def images(self) -> str:
        return self.path("images.zarr")

    @property
    def thumbs(self) -> str:
        """Thumbnails for people to look at, (N, C, T, T) uint8, row i of images.zarr's image i."""
        return self.path("thumbs.zarr")

    @property
    def pictures(self) -> str:
        """The array to show people: thumbs.zarr, or images.zarr in a run made before thumbnails."""
        return self.thumbs if self.exists("thumbs.zarr") else self.images

    def members(self, name: str) -> str:
        """A file of the members layout (imgclust.members): every cluster's members by distance."""
        return self.path("members", name)

    @property
    def codes(self) -> str:
        return self.path("codes.zarr")

    # The fitted model (imgclust.runmodel.RunModel)
    @property
    def model(self) -> str:
        return self.path("model")

    # What people look at
    @property
    def report(self) -> str:
        return self.path("report")

    def report_file(self, name: str) -> str:
        return self.path("report", name)

    def neighbors_file(self, name: str) -> str:
        return self.path("neighbors", name)

    def recluster(self, cluster: int) -> RunStore:
        """The store of a re-clustering of one cluster (``recluster/cluster-<c>/``)."""
        return RunStore(self.path("recluster", f"cluster-{cluster}"), self.storage_options)

    def split(self, cluster: int) -> RunStore:
        """The store of the re-clustering behind a curation split of ``cluster``."""
        return RunStore(self.path("curation", "splits", f"cluster-{cluster}"), self.storage_options)

    # Intermediate work
    def work(self, *parts: str) -> str:
        """``_work/...``: intermediate arrays and tables of the stages."""
        return self.path("_work", *parts)

    def resume(self, *parts: str) -> str:
        """``_work/resume/...``: what an unfinished run has recorded as done."""
        return self.path("_work", "resume", *parts)

    @property
    def lease(self) -> str:
        return self.path("_lease.json")

    @property
    def is_finished(self) -> bool:
        """A finished run has its run record (written last)."""
        return self.exists("run.json")

    # Every file or folder a run writes, for ``--overwrite``
    OUTPUTS = ("manifest.parquet", "duplicates.parquet", "rejected.parquet", "images.zarr", "codes.zarr", "model",
               "assignments.parquet", "clusters.json", "run.json", "metrics.json", "report", "neighbors",
               "recluster", "_work")
