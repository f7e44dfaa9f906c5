"""What the app shows, read from a finished run without loading its tables whole.

``RunCatalog`` answers the app's questions: the clusters (sizes, cohesion, names after curation),
a page of a cluster's members in order of distance, an image's row, its thumbnail, its nearest
neighbours and a 2-D map of a sample. Pages come from the members layout (``imgclust.members``):
one or two row groups per page whatever the run's size. Rows that ``assign`` added after the
layout was written, and images that curation moved, follow a cluster's layout rows.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from imgclust.codeindex import CodeIndex
from imgclust.curation import UNASSIGNED, Curation
from imgclust.io.arrays import chunk_spans, open_array, read_rows
from imgclust.io.imagefile import ImageRejected
from imgclust.io.storage import read_json
from imgclust.io.tables import read_parts
from imgclust.members import COLUMNS, MemberLayout
from imgclust.runstore import Location, RunStore

CODES_IN_MEMORY = 512 << 20  # standardised codes (float16) up to this size are held for similar-image queries
SCAN_ROWS = 65536  # rows a similar-image query compares at once
MAP_SAMPLE, MAP_GROUPS = 3000, 200  # points on the map, row groups they are read from


class NotFound(LookupError):
    """A cluster, image or page the run does not have; ``str`` says which."""


class NotARun(ValueError):
    """The folder is not a finished run the app can show."""


@dataclass(frozen=True)
class ClusterInfo:
    id: int
    name: str
    size: int
    cohesion: float  # mean distance of members to the centre (smaller: tighter)
    parts: tuple[int, ...]  # the model's clusters merged into it, itself first


class RunCatalog:
    """Read-side of a finished run for ``imgclust serve``."""

    def __init__(self, store: RunStore) -> None:
        so = store.storage_options
        self.store = store
        try:
            self.run = read_json(store.run_record, so)
            self.model_clusters = {int(c["id"]): c for c in read_json(store.clusters, so)}
        except FileNotFoundError:
            raise NotARun(f"{store.url} is not a finished run (no run.json or clusters.json); "
                          "run `imgclust run SOURCE OUTPUT` first") from None
        layout = MemberLayout.open(store)
        if layout is None:
            raise NotARun(f"{store.url} has no members layout (a run made by an older release); "
                          f"`imgclust compact {store.url}` writes it")
        self.layout = layout
        self.thumbs = open_array(store.pictures, so)
        self.codes = open_array(store.codes, so)
        self.index = CodeIndex.open(store)  # None: a run made before indexes (scanned)
        self._index_generation: int | None = None  # tables generation the index was opened at
        self._lock = threading.RLock()
        self._model: Any = None
        self._codes_cache: list[tuple[int, np.ndarray, np.ndarray]] | None = None
        self._map: dict[str, Any] | None = None
        self._dups: pd.DataFrame | None = None
        self._group_starts = np.zeros(1, np.int64)
        self._split_layouts: dict[int, MemberLayout] = {}  # split cluster -> its parts' layout
        self.refresh()
        threading.Thread(target=self._warm, daemon=True).start()  # seconds: not on the first query

    def _warm(self) -> None:
        """Load the model and the codes for similar-image queries (run in the background at start)."""
        try:
            self.model()
            if self.index is None:
                for _ in self._code_blocks():
                    pass
        except Exception:  # a query will meet the same error and report it
            pass

    # -- state that changes while the app runs: curation and assign's additions ----------------
    def refresh(self) -> None:
        """Re-read the curation and the rows added since the layout (cheap: both are small)."""
        so = self.store.storage_options
        self.curation = Curation.of(self.store)
        run = read_json(self.store.run_record, so)
        committed = int(run.get("tables_generation", 0))
        if self._index_generation is not None and committed != self._index_generation:  # assign extended it
            self.index = CodeIndex.open(self.store)
        self._index_generation = committed
        newer = pd.DataFrame({"path": pd.Series([], dtype=object), "cluster": pd.Series([], dtype=np.int64),
                              "distance": pd.Series([], dtype=np.float64), "index": pd.Series([], dtype=np.int64)})
        if committed > self.layout.generation:
            newer = read_parts(self.store.table("assignments"), so, committed, ["path", "cluster", "distance"],
                               self.layout.generation + 1).drop_duplicates("path", keep="last")
            manifest = read_parts(self.store.table("manifest"), so, committed, ["path", "index"],
                                  self.layout.generation + 1).drop_duplicates("path", keep="last")
            newer = newer.merge(manifest, on="path", how="inner")
        self.added = newer.reset_index(drop=True)  # path, cluster, distance, index
        self.hidden = set(self.added["path"]) | set(self.curation.moved)  # layout rows that no longer say where
        self.moved = self._moved_rows()
        self._clusters = self._count_clusters()

    def _moved_rows(self) -> pd.DataFrame:
        """Rows of the images curation moved (their model cluster and distance, from the layout)."""
        moved = [e for e in self.curation.edits if e.get("action") in ("move", "reject")]
        index = np.array(sorted({int(i) for e in moved for i in e.get("indices", [])}), np.int64)
        rows = self.layout.rows_of(index) if len(index) else pd.DataFrame(columns=COLUMNS)
        extra = self.added[self.added["path"].isin(self.curation.moved.keys())]
        rows = pd.concat([rows, extra[COLUMNS]], ignore_index=True) if len(extra) else rows
        return rows[rows["path"].isin(self.curation.moved.keys())].drop_duplicates("path", keep="last")

    # -- clusters -----------------------------------------------------------------------------
    def clusters(self) -> list[ClusterInfo]:
        """The (curated) clusters as of the last ``refresh``."""
        return list(self._clusters)

    def _count_clusters(self) -> list[ClusterInfo]:
        cur = self.curation
        units = cur.units(self.model_clusters)
        moved = self.moved
        out_of = pd.Series(cur.units_of(moved)).value_counts().to_dict() if len(moved) else {}
        into: dict[int, int] = {}
        for p in moved["path"]:
            c = cur.moved[p]
            into[c] = into.get(c, 0) + 1
        added_to_part: dict[int, int] = {}  # assign's additions to a split cluster's parts, since its layout
        if cur.splits and len(self.added):
            fresh = self.added[~self.added["path"].isin(cur.moved.keys()) & self.added["cluster"].isin(cur.splits)]
            added_to_part = pd.Series(cur.units_of(fresh)).value_counts().to_dict() if len(fresh) else {}
        out = []
        for c in units:
            if cur.target(c) != c:
                continue
            parts = cur.parts(c, units)
            sizes = [self._unit_size(p) for p in parts]
            size = sum(sizes) - sum(int(out_of.get(p, 0)) for p in parts)
            size += into.get(c, 0) + sum(int(added_to_part.get(p, 0)) for p in parts)
            weight = sum(sizes) or 1
            cohesion = sum(self._unit_cohesion(p) * n for p, n in zip(parts, sizes))
            out.append(ClusterInfo(c, cur.name(c), max(0, size), cohesion / weight, tuple(parts)))
        n_out = into.get(UNASSIGNED, 0)
        if n_out:
            out.append(ClusterInfo(UNASSIGNED, cur.name(UNASSIGNED), n_out, float("nan"), ()))
        return out

    def _segment(self, unit: int) -> tuple[MemberLayout, int, int]:
        """The layout that holds ``unit``'s rows (a split's own for its parts), its first row and size."""
        parent = self.curation.split_part_of(unit)
        if parent is None:
            return (self.layout, *self.layout.clusters.get(unit, (0, 0)))
        with self._lock:
            if parent not in self._split_layouts:
                layout = MemberLayout.open(self.store.split(parent))
                if layout is None:
                    raise NotFound(f"the split of cluster {parent} has no layout")
                self._split_layouts[parent] = layout
            layout = self._split_layouts[parent]
        return (layout, *layout.clusters.get(unit, (0, 0)))

    def _unit_size(self, unit: int) -> int:
        """Images of a unit as clustered (clusters.json counts assign's additions; a split part, its layout)."""
        if self.curation.split_part_of(unit) is None:
            return int(self.model_clusters[unit]["size"])
        return self._segment(unit)[2]

    def _unit_cohesion(self, unit: int) -> float:
        parent = self.curation.split_part_of(unit)
        if parent is None:
            return float(self.model_clusters[unit]["mean_distance"])
        edit = self.curation.split_edit(parent)
        values = edit.get("cohesion") or [float("nan")] * len(edit["into"])
        return float(values[edit["into"].index(unit)])

    def cluster(self, cluster: int) -> ClusterInfo:
        for c in self.clusters():
            if c.id == cluster:
                return c
        units = self.curation.units(self.model_clusters)
        if cluster in units:
            raise NotFound(f"cluster {cluster} was merged into cluster {self.curation.target(cluster)}")
        raise NotFound(f"there is no cluster {cluster} in this run ({len(units)} clusters, "
                       f"0 to {max(units)})")

    def members(self, cluster: int, start: int, count: int) -> pd.DataFrame:
        """Members [start, start + count) of a (curated) cluster: the layout rows of its parts in
        order of distance, then the images added or moved into it. Rows whose image was moved
        away or replaced are left out, so a page may hold fewer than ``count``.

        Returns a frame of cluster, distance, path, index.
        """
        info = self.cluster(cluster)
        segments = [self._segment(p) for p in info.parts]  # (layout, first row, size) of each part
        tail = self._tail(cluster)
        total = sum(s for _, _, s in segments) + len(tail)
        start, stop = max(0, start), min(total, start + count)
        frames, at = [], 0
        for layout, first, size in segments:
            a, b = max(start, at), min(stop, at + size)
            if a < b:
                rows = layout.read(first + a - at, first + b - at)
                frames.append(rows[~rows["path"].isin(self.hidden)])
            at += size
        a, b = max(start, at), min(stop, at + len(tail))
        if a < b:
            frames.append(tail.iloc[a - at:b - at])
        if not frames:
            return pd.DataFrame(columns=COLUMNS)
        return pd.concat(frames, ignore_index=True)[COLUMNS]

    def member_span(self, cluster: int) -> int:
        """How many rows ``members`` pages through for ``cluster`` (its layout rows and tail)."""
        info = self.cluster(cluster)
        return sum(self._segment(p)[2] for p in info.parts) + len(self._tail(cluster))

    def _tail(self, cluster: int) -> pd.DataFrame:
        """Images added by assign or moved into ``cluster``, by distance."""
        cur = self.curation
        added = cur.apply(self.added)
        added = added[(added["cluster"] == cluster) & ~added["path"].isin(cur.moved.keys())]
        moved = self.moved[self.moved["path"].map(cur.moved) == cluster].assign(cluster=cluster)
        tail = pd.concat([added[COLUMNS], moved[COLUMNS]], ignore_index=True) if len(moved) else added[COLUMNS]
        return tail.sort_values(["distance", "path"], kind="stable").reset_index(drop=True)

    # -- images ---------------------------------------------------------------------------------
    def image(self, index: int) -> dict[str, Any]:
        """Path, model cluster, curated cluster and distance of images.zarr row ``index``."""
        if not 0 <= index < self.codes.shape[0]:
            raise NotFound(f"there is no image {index} in this run (0 to {self.codes.shape[0] - 1})")
        rows = self.layout.rows_of(np.array([index]))
        hit = self.added[self.added["index"] == index]
        if len(hit):
            rows = hit[COLUMNS]
        if not len(rows):
            raise NotFound(f"image {index} is no longer part of this run (replaced by a later assign)")
        row = self.curation.apply(rows.iloc[:1].reset_index(drop=True)).iloc[0]
        return {"index": int(index), "path": str(row["path"]), "model_cluster": int(row["model_cluster"]),
                "cluster": int(row["cluster"]), "name": str(row["name"]), "distance": float(row["distance"]),
                "outlier": self.layout.outlier_of(index)}

    def thumbnail_png(self, index: int) -> bytes:
        if not 0 <= index < self.thumbs.shape[0]:
            raise NotFound(f"there is no image {index} in this run")
        return pixels_png(self.thumbs[index])

    # -- similar images -------------------------------------------------------------------------
    def model(self) -> Any:
        with self._lock:
            if self._model is None:
                from imgclust.runmodel import RunModel

                self._model = RunModel.load(Location(self.store.model, self.store.storage_options))
            return self._model

    def similar(self, index: int | None = None, image: bytes | None = None, k: int = 24) -> pd.DataFrame:
        """The ``k`` images closest to image ``index`` or to an uploaded ``image`` (its bytes), by
        distance of the clustering's standardised codes; the query itself is left out.

        Returns the layout's columns plus ``similarity_distance``, nearest first.
        """
        model = self.model()
        if image is not None:
            from imgclust.stages.ingest import PixelSpec

            spec = PixelSpec.of_images(dict(open_array(self.store.images, self.store.storage_options).attrs))
            try:
                pixels = spec.decode(image).pixels
            except ImageRejected as exc:
                raise ValueError(f"the upload is not an image this run can read: {exc}") from None
            q = model.encode(pixels[None], 1)[0]
        else:
            self.image(int(index))  # NotFound for a bad index
            q = self.codes[int(index)]
        q = model.standardise(np.asarray(q, np.float64)[None])[0]
        spare = k + 8  # spare rows for images no longer in the run
        best_d, best_i = self._search_index(q, index, spare) if self.index is not None else self._scan(q, index, spare)
        rows = self.layout.rows_of(best_i)
        if len(self.added):
            rows = pd.concat([rows, self.added[self.added["index"].isin(best_i)][COLUMNS]], ignore_index=True)
        rows = rows.drop_duplicates("index", keep="last")
        dist = dict(zip(best_i.tolist(), best_d.tolist()))
        rows = rows.assign(similarity_distance=rows["index"].map(dist)).sort_values(
            ["similarity_distance", "index"], kind="stable")
        return self.curation.apply(rows.head(k).reset_index(drop=True))

    def _search_index(self, q: np.ndarray, index: int | None, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest by the run's code index, and among the rows no index holds yet."""
        assert self.index is not None
        d, i = self.index.search(q[None], k, exclude=np.array([-1 if index is None else int(index)]))
        found = i[0] >= 0
        return self._nearest(q, index, k, self._code_blocks(self.index.rows), (d[0][found], i[0][found]))

    def _scan(self, q: np.ndarray, index: int | None, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest of all codes (a run without an index)."""
        return self._nearest(q, index, k, self._code_blocks())

    @staticmethod
    def _nearest(q: np.ndarray, index: int | None, k: int, blocks: Any,
                 best: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest of ``best`` (distances and rows found already) and of the codes of
        ``blocks`` ((first row, standardised codes, squared norms), as ``_code_blocks`` gives),
        leaving image ``index`` out."""
        q32 = q.astype(np.float32)
        best_d, best_i = best if best is not None else (np.zeros(0, np.float32), np.zeros(0, np.int64))
        for a, z, norms in blocks:
            d = np.sqrt(np.maximum(norms - 2.0 * (z.astype(np.float32) @ q32) + float(q32 @ q32), 0.0))
            if index is not None and a <= index < a + len(z):
                d[index - a] = np.inf
            best_d, best_i = np.concatenate([best_d, d]), np.concatenate([best_i, np.arange(a, a + len(z))])
            keep = np.argsort(best_d, kind="stable")[:k]
            best_d, best_i = best_d[keep], best_i[keep]
        return best_d, best_i

    def _code_blocks(self, start: int = 0) -> Any:
        """(first row, standardised codes, their squared norms) of rows ``start:`` block by block.

        A run without an index holds all its standardised codes in memory when they fit in
        ``CODES_IN_MEMORY`` (float32 up to half of it, float16 beyond); otherwise, and for the rows
        ``assign`` added after the index, they are read and standardised for each query."""
        n, dim = self.codes.shape
        with self._lock:
            if self.index is None and self._codes_cache is None and n * dim * 2 <= CODES_IN_MEMORY:
                blocks = [(a, self._standardised(a, b)) for a, b in chunk_spans(n, SCAN_ROWS)]
                kind = np.float32 if n * dim * 4 <= CODES_IN_MEMORY // 2 else np.float16  # float16: 1e-3 relative
                self._codes_cache = [(a, z.astype(kind), (z.astype(np.float32) ** 2).sum(1)) for a, z in blocks]
        if self._codes_cache is not None and start == 0:
            yield from self._codes_cache
            return
        for a, b in chunk_spans(n - start, self.codes.chunks[0]):
            z = self._standardised(start + a, start + b).astype(np.float32)
            yield start + a, z, (z**2).sum(1)

    def _standardised(self, a: int, b: int) -> np.ndarray:
        return self.model().standardise(self.codes[a:b])

    # -- near-duplicates and outlier scores -------------------------------------------------------
    def _duplicates(self) -> pd.DataFrame:
        """The run's near-duplicate groups (group, path, index, distance, hash_distance), read once."""
        with self._lock:
            if self._dups is None:
                cols = ["group", "path", "index", "distance", "hash_distance"]
                dups = read_parts(self.store.near_duplicates, self.store.storage_options, columns=cols)  # none: empty
                self._dups = dups if len(dups) else pd.DataFrame({c: pd.Series([], dtype=np.int64) for c in cols})
                self._group_starts = np.searchsorted(self._dups["group"].to_numpy(),
                                                     np.arange(int(self._dups["group"].max()) + 2 if len(self._dups) else 1))
            return self._dups

    def duplicate_groups(self) -> int:
        return int(self._duplicates()["group"].nunique())

    def duplicate_page(self, start: int, count: int) -> list[pd.DataFrame]:
        """Near-duplicate groups [start, start + count), each its members (curation applied),
        nearest its first image first."""
        dups = self._duplicates()
        out = []
        for g in range(max(0, start), min(self.duplicate_groups(), start + count)):
            a, b = int(self._group_starts[g]), int(self._group_starts[g + 1])
            out.append(self._with_clusters(dups.iloc[a:b]))
        return out

    def duplicates_of(self, index: int) -> pd.DataFrame:
        """The other members of image ``index``'s near-duplicate group (empty when it has none)."""
        dups = self._duplicates()
        hit = dups.loc[dups["index"] == index, "group"]
        if not len(hit):
            return dups.iloc[:0]
        g = int(hit.iloc[0])
        rows = dups.iloc[int(self._group_starts[g]):int(self._group_starts[g + 1])]
        return self._with_clusters(rows[rows["index"] != index])

    def _with_clusters(self, rows: pd.DataFrame) -> pd.DataFrame:
        layout = self.layout.rows_of(rows["index"].to_numpy(np.int64))[["index", "cluster"]]
        merged = rows.merge(layout, on="index", how="inner")
        return self.curation.apply(merged.reset_index(drop=True))

    # -- the map ----------------------------------------------------------------------------------
    def map_points(self, seed: int = 0) -> dict[str, Any]:
        """2-D positions (the first two principal axes of the standardised codes) of a sample of
        up to ``MAP_SAMPLE`` images: {"x", "y", "index", "cluster"}."""
        with self._lock:
            if self._map is None:
                n = self.layout.rows
                rng = np.random.default_rng(seed)
                per = self.layout.rows_per_group
                groups = -(-n // per)
                if groups > MAP_GROUPS:  # whole row groups at random, rows at random in them: few reads
                    chosen = np.sort(rng.choice(groups, MAP_GROUPS, replace=False))
                    cand = (chosen[:, None] * per + np.arange(per)[None, :]).ravel()
                    cand = cand[cand < n]
                else:
                    cand = np.arange(n)
                pos = np.sort(rng.choice(cand, size=min(MAP_SAMPLE, len(cand)), replace=False))
                rows = self.layout.at(pos)
                idx = rows["index"].to_numpy(np.int64)
                z = self.model().standardise(read_rows(self.codes, idx))
                z = z - z.mean(0)
                _, _, vt = np.linalg.svd(z, full_matrices=False)
                xy = z @ vt[:2].T
                self._map = {"x": xy[:, 0].round(4).tolist(), "y": xy[:, 1].round(4).tolist(),
                             "index": idx.tolist(), "paths": rows["path"].tolist(),
                             "model_cluster": rows["cluster"].astype(int).tolist()}
            m = dict(self._map)
        curated = self.curation.apply(pd.DataFrame({"path": m.pop("paths"), "cluster": m["model_cluster"]}))
        m["cluster"] = curated["cluster"].astype(int).tolist()
        return m


def pixels_png(pixels: np.ndarray) -> bytes:
    """(C, H, W) uint8 as PNG bytes."""
    im = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()
