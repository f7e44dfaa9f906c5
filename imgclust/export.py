"""A finished run's clusters taken elsewhere, with its curation applied: a table, or folders."""

from __future__ import annotations

import os
import posixpath
import re
from typing import Any

import numpy as np
import pandas as pd

from imgclust.curation import Curation
from imgclust.io.listing import source_path
from imgclust.io.storage import is_local, read_json, with_retries, write_bytes_atomic
from imgclust.progress import track
from imgclust.runstore import Location, RunStore

FORMATS = ("csv", "parquet", "folders")


class ExportError(ValueError):
    """An export that cannot be made as asked (``str`` says why and what to do)."""


def curated_assignments(store: RunStore) -> pd.DataFrame:
    """Every image of the run once: path, sha256, cluster (curated), name, model_cluster, distance."""
    table = store.read_table("assignments")[["path", "sha256", "cluster", "distance"]]
    cur = Curation.of(store)
    if cur.splits:  # images added to a split cluster after its split are placed by their codes
        index = store.read_table("manifest", ["path", "index"]).drop_duplicates("path", keep="last")
        table = table.merge(index, on="path", how="left")
        table = table.assign(index=table["index"].fillna(-1).astype(np.int64))
    out = cur.apply(table).drop(columns=["index"], errors="ignore")
    return out.sort_values(["cluster", "distance", "path"], kind="stable").reset_index(drop=True)


def folder_name(cluster: int, name: str) -> str:
    """``<cluster>`` or ``<cluster>-<name as a safe folder name>``."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:60]
    return f"{cluster}" if not slug or slug == f"cluster-{cluster}" else f"{cluster}-{slug}"


def export_run(store: RunStore, dest: Location, fmt: str, cluster: int | None = None, link: bool = False,
               source: Location | None = None) -> dict[str, Any]:
    """Write the run's (curated) clusters to ``dest``.

    Parameters
    ----------
    fmt:
        ``csv`` or ``parquet``: one table (``dest`` is the file); ``folders``: ``dest/<cluster>-<name>/``
        holding each member at its path relative to the source, copied or (``link``) symlinked.
    cluster:
        Only this (curated) cluster.
    source:
        Where the images are (default: the run's own source).

    Returns
    -------
    dict
        ``rows`` written and, for folders, ``clusters``.
    """
    if fmt not in FORMATS:
        raise ExportError(f"format is one of {', '.join(FORMATS)} (got {fmt!r})")
    table = curated_assignments(store)
    if cluster is not None:
        if cluster not in set(table["cluster"]):
            raise ExportError(f"there is no cluster {cluster} in this run (after curation)")
        table = table[table["cluster"] == cluster].reset_index(drop=True)
    if fmt == "csv":
        write_bytes_atomic(dest.url, table.to_csv(index=False).encode(), dest.storage_options)
        return {"rows": len(table)}
    if fmt == "parquet":
        write_bytes_atomic(dest.url, table.to_parquet(index=False), dest.storage_options)
        return {"rows": len(table)}
    if source is None:
        run = read_json(store.run_record, store.storage_options)
        cfg = run.get("config", {})
        source = Location(cfg["source"], cfg.get("storage_options") or {})
    if link and not (is_local(source.url) and is_local(dest.url)):
        raise ExportError("--link needs SOURCE and DEST both on the local disk; use --copy")
    src_fs, src_root = source.fs()
    _, dst_root = dest.fs()
    names = {c: folder_name(int(c), str(n)) for c, n in zip(table["cluster"], table["name"])}
    for row in track(list(table.itertuples()), total=len(table), desc="export", unit="image"):
        rel = source_path(str(row.path))
        target = posixpath.join(dst_root.rstrip("/"), names[row.cluster], rel)
        origin = posixpath.join(src_root.rstrip("/"), rel)
        if link:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if os.path.lexists(target):
                os.remove(target)
            os.symlink(os.path.abspath(origin), target)
        else:
            data = with_retries(src_fs.cat_file, origin)
            write_bytes_atomic(f"{dest.url.rstrip('/')}/{names[row.cluster]}/{rel}", data, dest.storage_options,
                               fenced=False)
    return {"rows": len(table), "clusters": len(names)}

