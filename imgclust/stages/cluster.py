"""Stage 5: standardise the codes, optionally embed them with UMAP, and run dask-ml K-means."""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import dask
import dask.array as da
import numpy as np
from distributed import Client

from imgclust.cluster.code_space import CodeSpace, standardise
from imgclust.cluster.density import fit_density, nearest_reference
from imgclust.cluster.embedding import umap_embed
from imgclust.cluster.kmeans import (
    K_SEARCH_SAMPLE,
    choose_k,
    dask_centres_of_labels,
    dask_label_counts,
    fit_kmeans,
    nearest_centre,
    silhouette,
    size_order,
)
from imgclust.cluster.merge import merge_subclusters, subcluster_count
from imgclust.cluster.placement import ClusterPlacement
from imgclust.cluster.sampling import sample_rows, umap_fit_rows
from imgclust.io.arrays import create_array, open_array, read_rows
from imgclust.runmodel import RunModel
from imgclust.runstore import Location, RunStore
from imgclust.state.resume import ShardLedger, fingerprint

logger = logging.getLogger("imgclust")
MERGE_SAMPLE = 20_000  # rows whose k-NN graph joins the K-means pieces


@dataclass(frozen=True)
class ClusterSettings:
    """How codes are clustered (from the preset and the run's options)."""

    n_clusters: int | None
    embedding: Literal["none", "umap", "tsne"]
    seed: int
    method: Literal["kmeans", "dbscan"] = "kmeans"
    embedding_dim: int = 10
    merge: bool = False


@dataclass(frozen=True)
class Clustering:
    labels_url: str  # zarr (N,) int32 cluster of each image
    distances_url: str  # zarr (N,) float32 distance to its centre, in the clustered feature space
    features_url: str  # zarr (N, d) the space K-means ran in
    n_clusters: int
    silhouette: float | None
    k_curve: dict[int, float] = field(default_factory=dict)
    key: str = ""  # content + settings that produced it ("" when not resumable)

    def as_record(self) -> dict[str, Any]:
        return {**asdict(self), "k_curve": {str(k): v for k, v in self.k_curve.items()}}

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Clustering:
        fields = {f: rec[f] for f in cls.__dataclass_fields__}
        return cls(**{**fields, "k_curve": {int(k): float(v) for k, v in rec["k_curve"].items()}})


@dataclass(frozen=True)
class FittedClusters:
    """A clustering and the fitted state that places new codes in it."""

    clustering: Clustering
    code_space: CodeSpace
    placement: ClusterPlacement


@dataclass(frozen=True)
class LabelArrays:
    """Where the workers write each row's cluster (int32) and distance to its centre (float32)."""

    labels: Location
    distances: Location
    n: int
    step: int

    def write(self, out: da.Array) -> da.Array:
        """Write (label, distance) rows ``out`` (N, 2); returns the labels as read back (N,) int32."""
        self._create(self.labels, "int32")
        self._create(self.distances, "float32")
        if self.n:
            da.store([out[:, 0].astype(np.int32), out[:, 1].astype(np.float32)],
                     [open_array(self.labels.url, self.labels.storage_options, "r+"),
                      open_array(self.distances.url, self.distances.storage_options, "r+")], lock=False)
        return da.from_zarr(open_array(self.labels.url, self.labels.storage_options))

    def write_labels(self, labels: da.Array) -> da.Array:
        self._create(self.labels, "int32")
        if self.n:
            da.store(labels.astype(np.int32), open_array(self.labels.url, self.labels.storage_options, "r+"), lock=False)
        return da.from_zarr(open_array(self.labels.url, self.labels.storage_options))

    def write_distances(self, distances: da.Array) -> None:
        self._create(self.distances, "float32")
        if self.n:
            da.store(distances.astype(np.float32), open_array(self.distances.url, self.distances.storage_options, "r+"),
                     lock=False)

    def _create(self, where: Location, dtype: str) -> None:
        create_array(where.url, (self.n,), self.step, dtype, where.storage_options)


def cluster_codes(codes: Location, store: RunStore, settings: ClusterSettings, client: Client) -> FittedClusters:
    """Cluster the codes (N, D) at ``codes``: K-means on standardised codes or their UMAP manifold
    (``embedding_dim``-d), or (``method="dbscan"``) DBSCAN on a 2-D t-SNE/UMAP map of a sample, which
    picks k itself. ``merge``: K-means cuts more pieces, which are joined along the manifold
    (``imgclust.cluster.merge``). Labels, distances and features go to ``store``'s ``_work/``.
    """
    so = store.storage_options
    arr = open_array(codes.url, codes.storage_options)
    n, step = arr.shape[0], arr.chunks[0]
    n_clusters, seed = settings.n_clusters, settings.seed
    curve: dict[int, float] = {}
    sub_to_cluster: np.ndarray | None = None
    with dask.config.set(scheduler=client):
        x, mu, sd = standardise(da.from_zarr(arr))
        fitted = None
        if settings.method == "kmeans" and settings.embedding == "umap" and n > 20:
            x, fitted = umap_embed(x, seed, settings.embedding_dim, umap_fit_rows(n, n_clusters))
        features_url = store.work("features.zarr")
        create_array(features_url, (n, x.shape[1]), step, "float32", so)
        with warnings.catch_warnings():  # the fitted sample (a few MB) is in the graph once, by design
            warnings.filterwarnings("ignore", message="Sending large graph", category=UserWarning)
            da.store(x.rechunk((step, x.shape[1])).astype(np.float32), open_array(features_url, so, "r+"), lock=False)
        x = da.from_zarr(open_array(features_url, so))
        sampled = sample_rows(n, K_SEARCH_SAMPLE, seed)
        sample = x[sampled].compute()
        # Labels and distances go from the workers to arrays; the flow process sees only (k, d) centres,
        # counts and samples, whatever N.
        raw_url, distances_url = store.work("raw-labels.zarr"), store.work("distances.zarr")
        raw = LabelArrays(Location(raw_url, so), Location(distances_url, so), n, step)
        if settings.method == "dbscan":
            if n_clusters is not None:
                logger.warning("cluster: DBSCAN chooses the number of clusters itself; n_clusters=%d is ignored",
                               n_clusters)
            fit = fit_density(x, settings.embedding, seed)
            lab = raw.write_labels(x.map_blocks(nearest_reference, fit.reference, fit.reference_labels,
                                                chunks=(x.chunks[0], (1,)), dtype=np.float64)[:, 0])
            n_clusters = int(max(int(lab.max().compute()) if n else 0, fit.reference_labels.max())) + 1
            centres, out = dask_centres_of_labels(x, lab[:, None], n_clusters)  # a sampled cluster may win no point
            raw.write_distances(out[:, 1])
        else:
            if n_clusters is None:
                n_clusters, curve = choose_k(sample, seed)
                logger.info("cluster: chose k=%d by silhouette (%s)", n_clusters,
                            ", ".join(f"{k}: {v:.3f}" for k, v in curve.items()))
            if n_clusters > n:
                raise ValueError(f"n_clusters={n_clusters} is larger than the {n} images that could be read")
            n_pieces = subcluster_count(n_clusters, n) if settings.merge else n_clusters
            centres = fit_kmeans(x, n_pieces, seed)
            lab = raw.write(x.map_blocks(nearest_centre, centres, chunks=(x.chunks[0], (2,)), dtype=np.float64))
            if n_pieces > n_clusters:
                sub_centres, rows = centres, sample_rows(n, MERGE_SAMPLE, seed)
                sub_to_cluster = merge_subclusters(x[rows].compute(), read_rows(open_array(raw_url, so), rows)
                                                   .astype(np.int64), n_clusters, seed)
                joined = lab.map_blocks(lambda b, m: m[b], sub_to_cluster.astype(np.int32), dtype=np.int32)
                centres, out = dask_centres_of_labels(x, joined[:, None], n_clusters)
                lab = replace(raw, labels=Location(store.work("joined-labels.zarr"), so)).write(out)  # not over its input
                logger.info("cluster: K-means cut %d pieces, joined into %d clusters along the manifold", n_pieces,
                            n_clusters)
        counts = dask_label_counts(lab, n_clusters) if n else np.zeros(n_clusters, np.int64)
        remap = size_order(counts)
        labels_url = store.work("labels.zarr")
        create_array(labels_url, (n,), step, "int32", so)
        if n:
            da.store(lab.map_blocks(lambda b, r: r[b], remap, dtype=np.int32), open_array(labels_url, so, "r+"),
                     lock=False)
    found = int((counts > 0).sum())
    ordered = np.empty_like(centres)
    ordered[remap] = centres
    placement = ClusterPlacement(ordered[:found])
    if settings.method == "dbscan":
        placement.reference, placement.reference_labels = fit.reference, remap[fit.reference_labels]
    elif sub_to_cluster is not None:
        placement.sub_centres, placement.sub_to_cluster = sub_centres, remap[sub_to_cluster]
    space = CodeSpace(mu, sd, *((fitted.reference, fitted.embedding) if fitted is not None else (None, None)))
    if found < n_clusters:
        logger.warning("cluster: only %d of %d clusters are non-empty", found, n_clusters)
        n_clusters = found
    sil = silhouette(sample, read_rows(open_array(labels_url, so), sampled), seed)
    logger.info("cluster: %d clusters, silhouette on a sample %.3f", n_clusters, sil if sil is not None else float("nan"))
    return FittedClusters(Clustering(labels_url, distances_url, features_url, n_clusters, sil, curve), space, placement)


def cluster(store: RunStore, settings: ClusterSettings, client: Client) -> Clustering:
    """Cluster the run's codes and add the fitted clusters to its model.

    Codes of a finished encode carry its key: the result is then recorded under it and these
    settings, and a resumed run reuses it instead of fitting UMAP and K-means again.
    """
    codes = open_array(store.codes, store.storage_options)
    ledger = None
    if "reconstruction_mse" in codes.attrs and codes.attrs.get("encode_key"):
        ledger = ShardLedger(store, "cluster", fingerprint("cluster", codes.attrs["encode_key"], settings.n_clusters,
                                                           settings.embedding, settings.seed, settings.method,
                                                           settings.embedding_dim, settings.merge))
        ledger.clear_others()
        recorded = ledger.result()
        if recorded is not None:
            logger.info("cluster: already done for these codes and settings; reusing the clusters")
            return Clustering.from_record(recorded)
    fit = cluster_codes(Location(store.codes, store.storage_options), store, settings, client)
    model_dir = Location(store.model, store.storage_options)
    model = RunModel.load(model_dir)
    model.code_space, model.placement = fit.code_space, fit.placement
    model.refiner = model.refiner_spec = None  # a refiner describes earlier clusters
    model.save(model_dir)
    result = replace(fit.clustering, key=ledger.key if ledger is not None else "")
    if ledger is not None:
        ledger.record_result(result.as_record())
    return result
