"""People's corrections to a run's clusters, kept beside it and applied by every reader.

An edit is one small JSON file ``RUN/curation/<time>-<id>.json``, never rewritten: two people (or
two browser tabs) editing at once each add a file, so nothing is lost, and the log says who did
what when. Edits apply in the order of their names. Curation never retrains:

- ``rename``: a cluster's name (``{"cluster": 3, "name": "kitchens"}``);
- ``merge``: cluster ids mapped onto another (``{"clusters": [4, 7], "into": 3}``);
- ``move``: images given to another cluster (``{"paths": [...], "cluster": 3}``), a per-path
  override that later ``assign`` runs keep;
- ``reject``: images marked "not this" (``{"paths": [...]}``): they leave every cluster, shown
  as cluster ``UNASSIGNED``;
- ``split``: one of the model's clusters re-clustered into parts (``{"cluster": 3, "into": [3, 12,
  13]}``): the re-clustering (``RUN/recluster/cluster-3/``) says which part each member went to, and
  its fitted centres place images that ``assign`` adds to the cluster later. The first part keeps
  the cluster's id, the others get new ids.

``Curation.apply`` gives any table with ``path`` and ``cluster`` its curated cluster and name.
"""

from __future__ import annotations

import getpass
import json
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

from imgclust.io.storage import is_local, open_fs, read_json, with_retries, write_json
from imgclust.runstore import RunStore

UNASSIGNED = -1
ACTIONS = ("rename", "merge", "move", "reject", "split")


class CurationError(ValueError):
    """An edit that cannot apply (a cluster that does not exist, a merge into itself, ...)."""


@dataclass
class Curation:
    """The state the edits of a run add up to."""

    names: dict[int, str] = field(default_factory=dict)
    merged_into: dict[int, int] = field(default_factory=dict)  # cluster -> the cluster it was merged into
    moved: dict[str, int] = field(default_factory=dict)  # path -> cluster (UNASSIGNED: "not this")
    splits: dict[int, list[int]] = field(default_factory=dict)  # model cluster -> its parts, itself first
    edits: list[dict[str, Any]] = field(default_factory=list)
    store: RunStore | None = None  # where the splits' re-clusterings are read from

    @classmethod
    def of(cls, store: RunStore) -> Curation:
        """The curation of ``store`` (empty when nobody edited it)."""
        cur = cls(store=store)
        for edit in read_edits(store):
            cur._apply_edit(edit)
        return cur

    def target(self, cluster: int) -> int:
        """The cluster ``cluster`` now belongs to, after merges."""
        seen = set()
        while cluster in self.merged_into and cluster not in seen:
            seen.add(cluster)
            cluster = self.merged_into[cluster]
        return cluster

    def name(self, cluster: int) -> str:
        if cluster == UNASSIGNED:
            return "not assigned"
        return self.names.get(cluster, f"cluster {cluster}")

    def parts(self, cluster: int, clusters: list[int]) -> list[int]:
        """The original clusters (``units``) that make up ``cluster`` now, itself first."""
        return [cluster] + sorted(c for c in clusters if c != cluster and self.target(c) == cluster)

    def units(self, model_clusters: Iterable[int]) -> list[int]:
        """The clusters curation starts from: the model's, with each split one replaced by its parts."""
        ids = set(model_clusters) | {c for parts in self.splits.values() for c in parts}
        return sorted(ids)

    def split_part_of(self, cluster: int) -> int | None:
        """The split model cluster that ``cluster`` is a part of, or None."""
        return next((c for c, parts in self.splits.items() if cluster in parts), None)

    def units_of(self, table: pd.DataFrame) -> np.ndarray:
        """The unit (the model's cluster, or its part where it was split) of each row of ``table``
        (``path``, ``cluster``: the model's; with ``index``, a row the split has not seen is placed
        by the split's centres)."""
        model = table["cluster"].to_numpy(np.int64)
        out = model.copy()
        for c, parts in self.splits.items():
            rows = np.flatnonzero(model == c)
            if len(rows):
                out[rows] = np.asarray(parts, np.int64)[self._split_of(c).part(table.iloc[rows])]
        return out

    def _split_of(self, cluster: int) -> SplitMembers:
        if self.store is None:
            raise CurationError("a split needs the run it was made in")
        return split_members(self.store.split(cluster), self.store, str(self.split_edit(cluster).get("at", "")))

    def split_edit(self, cluster: int) -> dict[str, Any]:
        """The edit that split model cluster ``cluster``."""
        return next(e for e in self.edits if e.get("action") == "split" and e["cluster"] == cluster)

    def apply(self, table: pd.DataFrame) -> pd.DataFrame:
        """``table`` (with ``path`` and ``cluster``) with ``cluster`` curated, the model's own in
        ``model_cluster``, and a ``name`` column."""
        out = table.copy()
        model = out["cluster"].to_numpy(np.int64)
        units = self.units_of(out) if self.splits else model
        curated = np.array([self.target(int(c)) for c in units], np.int64) if self.merged_into else units.copy()
        if self.moved:
            override = out["path"].map(self.moved)
            hit = override.notna().to_numpy()
            curated[hit] = override[hit].to_numpy(np.int64)
        out["model_cluster"], out["cluster"] = model, curated
        out["name"] = [self.name(int(c)) for c in curated]
        return out

    def check(self, edit: dict[str, Any], clusters: set[int]) -> None:
        """Raise ``CurationError`` when ``edit`` cannot apply to a run with these (model) clusters."""
        action = edit.get("action")
        units = set(self.units(clusters))
        live = {c for c in units if self.target(c) == c}

        def known(c: Any, what: str) -> int:
            if not isinstance(c, int) or isinstance(c, bool) or c not in live:
                raise CurationError(f"{what} {c!r} is not a cluster of this run" + (
                    f" (it was merged into {self.target(c)})" if c in units else ""))
            return c

        if action not in ACTIONS:
            raise CurationError(f"unknown edit {action!r}; one of {', '.join(ACTIONS)}")
        if action == "rename":
            known(edit.get("cluster"), "cluster")
            name = edit.get("name")
            if not isinstance(name, str) or not name.strip() or len(name) > 200:
                raise CurationError("a name is 1 to 200 characters")
        elif action == "merge":
            into = known(edit.get("into"), "cluster")
            others = edit.get("clusters")
            if not isinstance(others, list) or not others:
                raise CurationError("merge needs the clusters to merge")
            for c in others:
                if known(c, "cluster") == into:
                    raise CurationError(f"cluster {into} cannot be merged into itself")
        elif action == "split":
            c = known(edit.get("cluster"), "cluster")
            into = edit.get("into")
            if c not in clusters or c in self.splits or self.split_part_of(c) is not None:
                raise CurationError(f"cluster {c} is already a part of a split; split the model's clusters only once")
            if self.parts(c, sorted(units)) != [c]:
                raise CurationError(f"clusters were merged into cluster {c}; a merged cluster cannot be split")
            if (not isinstance(into, list) or len(into) < 2 or into[0] != c
                    or not all(isinstance(i, int) and not isinstance(i, bool) for i in into)
                    or len(set(into)) != len(into) or any(i in units for i in into[1:])):
                raise CurationError("a split needs its parts: the cluster's own id first, then new ids")
        else:
            paths = edit.get("paths")
            if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
                raise CurationError(f"{action} needs a list of image paths")
            if action == "move":
                known(edit.get("cluster"), "cluster")

    def _apply_edit(self, edit: dict[str, Any]) -> None:
        action = edit.get("action")
        if action == "rename":
            self.names[int(edit["cluster"])] = str(edit["name"]).strip()
        elif action == "merge":
            for c in edit["clusters"]:
                self.merged_into[int(c)] = int(edit["into"])
        elif action == "move":
            self.moved.update({p: int(edit["cluster"]) for p in edit["paths"]})
        elif action == "reject":
            self.moved.update({p: UNASSIGNED for p in edit["paths"]})
        elif action == "split":
            self.splits[int(edit["cluster"])] = [int(i) for i in edit["into"]]
        self.edits.append(edit)


@dataclass
class SplitMembers:
    """Which part of a split cluster each image is in: its members at the split by path, later
    images by the split's fitted centres (from their codes)."""

    part_by_path: pd.Series  # path -> part number (0 = the cluster's own id)
    store: RunStore  # the re-clustering's store
    run: RunStore

    def part(self, rows: pd.DataFrame) -> np.ndarray:
        """Part numbers (len(rows),) of rows with ``path`` (and ``index`` for unseen ones)."""
        found = rows["path"].map(self.part_by_path)
        out = found.fillna(0).to_numpy(np.int64, copy=True)
        unseen = found.isna().to_numpy(copy=True)
        if unseen.any() and "index" in rows.columns:
            index = rows["index"].to_numpy(np.int64)
            unseen &= index >= 0
            if unseen.any():
                out[unseen] = self._place(index[unseen])
        return out

    def _place(self, index: np.ndarray) -> np.ndarray:
        from imgclust.io.arrays import open_array, read_rows
        from imgclust.runmodel import RunModel
        from imgclust.runstore import Location

        model = RunModel.load(Location(self.store.model, self.store.storage_options))
        codes = read_rows(open_array(self.run.codes, self.run.storage_options), index)
        labels, _ = model.placement.assign(model.features(codes))
        return np.asarray(labels, np.int64)


_SPLITS: dict[str, SplitMembers] = {}


def split_members(sub: RunStore, run: RunStore, made: str = "") -> SplitMembers:
    """The split written at ``sub`` by the edit made at ``made`` (read once per process: the
    split of a cluster is made once and never rewritten)."""
    key = f"{sub.url}@{made}"
    if key not in _SPLITS:
        table = sub.read_table("assignments", ["path", "subcluster"])
        _SPLITS[key] = SplitMembers(pd.Series(table["subcluster"].to_numpy(np.int64), index=table["path"].to_numpy()),
                                    sub, run)
    return _SPLITS[key]


def read_edits(store: RunStore) -> list[dict[str, Any]]:
    """Every edit of the run, oldest first."""
    fs, root = open_fs(store.path("curation"), store.storage_options)
    if not with_retries(fs.exists, root):
        return []
    names = sorted(p for p in with_retries(fs.ls, root, detail=False) if p.endswith(".json"))
    return [json.loads(with_retries(fs.cat_file, p)) for p in names]


def add_edit(store: RunStore, edit: dict[str, Any], who: str | None = None, wait_s: float = 10.0) -> dict[str, Any]:
    """Check ``edit`` against the run and its curation so far, and append it.

    The run's lease is taken for the moment of the append only, so an open app never keeps a
    nightly ``assign`` out; while another writer holds it, this waits up to ``wait_s`` and then
    raises ``LeaseHeld``. Returns the edit as stored (with ``at`` and ``who``).
    """
    from imgclust.state.lease import LeaseHeld, acquire_lease

    clusters = {int(c["id"]) for c in read_json(store.clusters, store.storage_options)}
    deadline = time.monotonic() + wait_s
    while True:
        try:
            lease = acquire_lease(store, "curation", ttl=30.0, settle=0.0 if is_local(store.url) else 0.5)
            break
        except LeaseHeld:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    try:
        Curation.of(store).check(edit, clusters)  # against the edits of the moment, under the lease
        now = datetime.now(UTC)
        stored = {**edit, "at": now.isoformat(timespec="milliseconds"), "who": who or _user()}
        name = f"{now.strftime('%Y%m%dT%H%M%S%f')}-{uuid.uuid4().hex[:8]}.json"
        write_json(store.path("curation", name), stored, store.storage_options)
        return stored
    finally:
        lease.release()


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name (a container): say so rather than fail the edit
        return "unknown"
