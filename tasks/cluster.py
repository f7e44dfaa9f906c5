"""Stage 5: standardise the codes, optionally embed them with UMAP, and run dask-ml K-means."""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import dask
import dask.array as da
import numpy as np
from distributed import Client
from prefect import task

from imgclust.code_space import code_scale
from imgclust.resume import ShardLedger, fingerprint
from imgclust.storage import join, open_fs, write_bytes_atomic
from imgclust.zarr_store import create_array, open_array
from tasks.cluster_density import fit_density, nearest_reference
from tasks.cluster_merge import merge_subclusters, subcluster_count

logger = logging.getLogger("imgclust")
UMAP_SAMPLE = 20_000
K_SEARCH_SAMPLE = 4_000
INIT_SAMPLE = 50_000


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


def standardise(codes: da.Array) -> tuple[da.Array, np.ndarray, np.ndarray]:
    """Zero mean, unit variance per dimension (constant dimensions are left at zero); also mean, std.
    Codes on the unit sphere are only centred (``imgclust.code_space.code_scale``)."""
    if codes.shape[0] == 0:
        return codes, np.zeros(codes.shape[1]), np.ones(codes.shape[1])
    sq = (codes.astype(np.float64) ** 2).sum(axis=1)
    mu, sd, lo, hi = dask.compute(codes.mean(axis=0), codes.std(axis=0), sq.min(), sq.max())
    sd = code_scale(sd, lo, hi)
    return (codes - mu) / sd, np.asarray(mu, np.float64), np.asarray(sd, np.float64)


@dataclass
class ClusterModel:
    """Everything needed to place a new code in the run's clusters (saved as model/clusterer.pkl).

    ``centres[i]`` is the centre of final cluster ``i`` in the feature space: standardised codes,
    then ``reducer.transform`` when the preset embeds with UMAP.
    """

    mean: np.ndarray
    std: np.ndarray
    reducer: Any
    centres: np.ndarray
    # Density presets: new codes take the cluster of their nearest sampled code (no predict in DBSCAN).
    reference: np.ndarray | None = None
    reference_labels: np.ndarray | None = None
    # Merged presets: new codes take the cluster of their nearest K-means piece (tasks/cluster_merge.py).
    sub_centres: np.ndarray | None = None
    sub_to_cluster: np.ndarray | None = None

    def features(self, codes: np.ndarray) -> np.ndarray:
        x = (codes.astype(np.float64) - self.mean) / self.std
        if self.reducer is not None:
            x = self.reducer.transform(x.astype(np.float32))
        return np.asarray(x, np.float64)

    def assign(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cluster (int64) and distance to its centre for codes (N, D)."""
        if len(codes) == 0:
            return np.zeros(0, np.int64), np.zeros(0)
        x = self.features(codes)
        if getattr(self, "reference", None) is not None:
            lab = nearest_reference(x, self.reference, self.reference_labels)[:, 0].astype(np.int64)
            return lab, _distance_to_centre(x, self.centres, lab)
        if getattr(self, "sub_centres", None) is not None:
            lab = self.sub_to_cluster[_assign(x, self.sub_centres)[:, 0].astype(np.int64)].astype(np.int64)
            return lab, _distance_to_centre(x, self.centres, lab)
        out = _assign(x, self.centres)
        return out[:, 0].astype(np.int64), out[:, 1]

    def distances(self, codes: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Distance of each code to the centre of the cluster it was given (by a refiner, say)."""
        if len(codes) == 0:
            return np.zeros(0)
        return _distance_to_centre(self.features(codes), self.centres, labels)


def save_cluster_model(model: ClusterModel, url: str, storage_options: dict[str, Any] | None) -> None:
    import pickle

    write_bytes_atomic(url, pickle.dumps(model), storage_options)


def load_cluster_model(url: str, storage_options: dict[str, Any] | None) -> ClusterModel:
    import pickle

    fs, path = open_fs(url, storage_options)
    return pickle.loads(fs.cat(path))


def sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=min(n, size), replace=False))


def umap_embed(x: da.Array, seed: int, n_components: int = 10) -> tuple[da.Array, Any]:
    """UMAP fitted on a sample (at most UMAP_SAMPLE rows); the rest is placed with ``transform``."""
    import umap

    n = x.shape[0]
    rows = sample_rows(n, UMAP_SAMPLE, seed)
    sample = x[rows].compute().astype(np.float32)
    reducer = umap.UMAP(n_neighbors=min(15, max(2, len(sample) - 1)), n_components=min(n_components, max(2, len(sample) - 2)),
                        min_dist=0.0, metric="euclidean", random_state=seed, n_jobs=1)
    emb = reducer.fit_transform(sample).astype(np.float32)
    if len(rows) == n:
        return da.from_array(emb, chunks=(x.chunks[0], emb.shape[1])), reducer
    # The fitted model enters the graph once, as one key: each worker fetches and keeps one copy.
    # In a closure it went with every task, and bench/scale.py saw worker memory grow by about 19 MB
    # per transform task (2.5 -> 5.9 GB at 200k images); the gain of this change is not yet measured.
    model = dask.delayed(reducer, pure=True)
    return x.map_blocks(_umap_transform, model, chunks=(x.chunks[0], (emb.shape[1],)), dtype=np.float32,
                        meta=np.zeros((0, emb.shape[1]), np.float32)), reducer


def _umap_transform(block: np.ndarray, reducer: Any) -> np.ndarray:
    return reducer.transform(block.astype(np.float32)).astype(np.float32)


def choose_k(x: np.ndarray, seed: int, k_max: int = 20) -> tuple[int, dict[int, float]]:
    """k with the best silhouette on a sample, and the whole curve for run.json."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    curve: dict[int, float] = {}
    for k in range(2, min(k_max, len(x) - 1) + 1):
        labels = KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(x)
        curve[k] = float(silhouette_score(x, labels, random_state=seed)) if len(set(labels)) > 1 else -1.0
    best = max(curve, key=lambda k: curve[k])
    return best, curve


def initial_centres(x: da.Array, k: int, seed: int) -> np.ndarray:
    """Centres of the best of 10 k-means++ runs on a sample; dask-ml then refines them on all rows.

    dask-ml's single k-means|| start lands in poor local minima now and then (digits: 0.79 vs 0.86
    accuracy for one seed in three); restarts are cheap on a sample of the low-dimensional features.
    """
    from sklearn.cluster import KMeans as SkKMeans

    sample = x[sample_rows(x.shape[0], INIT_SAMPLE, seed)].compute()
    return SkKMeans(n_clusters=k, n_init=10, random_state=seed).fit(sample).cluster_centers_


def _assign(block: np.ndarray, centres: np.ndarray) -> np.ndarray:
    d2 = ((block[:, None, :] - centres[None, :, :]) ** 2).sum(-1)
    lab = d2.argmin(1)
    return np.stack([lab.astype(np.float64), np.sqrt(d2[np.arange(len(block)), lab])], axis=1)


def cluster_codes(codes_url: str, output: str, storage_options: dict[str, Any], n_clusters: int | None,
                  embedding: str, seed: int, client: Client, method: str = "kmeans",
                  embedding_dim: int = 10, merge: bool = False) -> Clustering:
    """Cluster the codes: K-means on standardised codes or their UMAP manifold (``embedding_dim``-d),
    or (``method="dbscan"``) DBSCAN on a 2-D t-SNE/UMAP map of a sample, which picks k itself.
    ``merge``: K-means cuts more pieces, which are joined along the manifold (tasks/cluster_merge.py).

    Codes of a finished encode carry its key: the result is then recorded under it and these
    settings, and a resumed run reuses it instead of fitting UMAP and K-means again.
    """
    codes = open_array(codes_url, storage_options)
    ledger = _ledger(codes, output, storage_options, n_clusters, embedding, seed, method, embedding_dim, merge)
    recorded = ledger.result() if ledger is not None else None
    if recorded is not None:
        logger.info("cluster: already done for these codes and settings; reusing the clusters")
        return Clustering.from_record(recorded)
    n, step = codes.shape[0], codes.chunks[0]
    curve: dict[int, float] = {}
    sub_to_cluster: np.ndarray | None = None
    with dask.config.set(scheduler=client):
        x, mu, sd = standardise(da.from_zarr(codes))
        reducer = None
        if method == "kmeans" and embedding == "umap" and n > 20:
            x, reducer = umap_embed(x, seed, embedding_dim)
        features_url = join(output, "_work", "features.zarr")
        create_array(features_url, (n, x.shape[1]), step, "float32", storage_options)
        with warnings.catch_warnings():  # the fitted UMAP (tens of MB) is in the graph once, by design
            warnings.filterwarnings("ignore", message="Sending large graph", category=UserWarning)
            da.store(x.rechunk((step, x.shape[1])).astype(np.float32),
                     open_array(features_url, storage_options, "r+"), lock=False)
        x = da.from_zarr(open_array(features_url, storage_options))
        sample = x[sample_rows(n, K_SEARCH_SAMPLE, seed)].compute()
        if method == "dbscan":
            if n_clusters is not None:
                logger.warning("cluster: DBSCAN chooses the number of clusters itself; n_clusters=%d is ignored",
                               n_clusters)
            fit = fit_density(x, embedding, seed)
            labels0 = x.map_blocks(nearest_reference, fit.reference, fit.reference_labels,
                                   chunks=(x.chunks[0], (1,)), dtype=np.float64).compute()[:, 0].astype(np.int32)
            n_clusters = int(max(labels0.max(), fit.reference_labels.max())) + 1  # a sampled cluster may win no point
            centres, out = _labelled(x.compute(), labels0, n_clusters)
        else:
            if n_clusters is None:
                n_clusters, curve = choose_k(sample, seed)
                logger.info("cluster: chose k=%d by silhouette (%s)", n_clusters,
                            ", ".join(f"{k}: {v:.3f}" for k, v in curve.items()))
            if n_clusters > n:
                raise ValueError(f"n_clusters={n_clusters} is larger than the {n} images that could be read")
            n_pieces = subcluster_count(n_clusters, n) if merge else n_clusters
            centres = _kmeans(x, n_pieces, seed)
            out = x.map_blocks(_assign, centres, chunks=(x.chunks[0], (2,)), dtype=np.float64).compute()
            if n_pieces > n_clusters:
                sub_centres, pieces, xa = centres, out[:, 0].astype(np.int64), x.compute()
                rows = sample_rows(n, UMAP_SAMPLE, seed)
                sub_to_cluster = merge_subclusters(xa[rows], pieces[rows], n_clusters, seed)
                centres, out = _labelled(xa, sub_to_cluster[pieces], n_clusters)
                logger.info("cluster: K-means cut %d pieces, joined into %d clusters along the manifold", n_pieces,
                            n_clusters)
    labels, remap = _relabel_by_size(out[:, 0].astype(np.int32), n_clusters)
    found = int(labels.max()) + 1 if n else 0
    ordered = np.empty_like(centres)
    ordered[remap] = centres
    placement: dict[str, np.ndarray] = {}  # how new codes find their cluster, when not by the nearest centre
    if method == "dbscan":
        placement = {"reference": fit.reference, "reference_labels": remap[fit.reference_labels]}
    elif sub_to_cluster is not None:
        placement = {"sub_centres": sub_centres, "sub_to_cluster": remap[sub_to_cluster]}
    save_cluster_model(ClusterModel(mu, sd, reducer, ordered[:found], **placement),
                       join(output, "model", "clusterer.pkl"), storage_options)
    if found < n_clusters:
        logger.warning("cluster: only %d of %d clusters are non-empty", found, n_clusters)
        n_clusters = found
    dist = out[:, 1].astype(np.float32)
    labels_url, distances_url = join(output, "_work", "labels.zarr"), join(output, "_work", "distances.zarr")
    create_array(labels_url, (n,), step, "int32", storage_options)[:] = labels
    create_array(distances_url, (n,), step, "float32", storage_options)[:] = dist
    sil = _silhouette(sample, labels[sample_rows(n, K_SEARCH_SAMPLE, seed)], seed)
    logger.info("cluster: %d clusters, silhouette on a sample %.3f", n_clusters, sil if sil is not None else float("nan"))
    result = Clustering(labels_url, distances_url, features_url, n_clusters, sil, curve,
                        ledger.key if ledger is not None else "")
    if ledger is not None:
        ledger.record_result(result.as_record())
    return result


def _ledger(codes: Any, output: str, storage_options: dict[str, Any], *settings: Any) -> ShardLedger | None:
    """The cluster stage's record book, keyed by the finished encode and the settings; None when the
    codes carry no finished encode (a recluster's subset, a test's array)."""
    if "reconstruction_mse" not in codes.attrs or not codes.attrs.get("encode_key"):
        return None
    ledger = ShardLedger(output, storage_options, "cluster", fingerprint("cluster", codes.attrs["encode_key"], *settings))
    ledger.clear_others()
    return ledger


def _kmeans(x: da.Array, k: int, seed: int) -> np.ndarray:
    from dask_ml.cluster import KMeans

    km = KMeans(n_clusters=k, init=initial_centres(x, k, seed), random_state=seed, max_iter=300)
    km.fit(x)
    return np.asarray(km.cluster_centers_, dtype=np.float64)


def _means(x: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Mean feature vector (float64) of each of ``k`` clusters; an empty cluster's is zero."""
    sums = np.zeros((k, x.shape[1]))
    np.add.at(sums, labels, np.asarray(x, np.float64))
    return sums / np.maximum(np.bincount(labels, minlength=k), 1)[:, None]


def _distance_to_centre(x: np.ndarray, centres: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Euclidean distance of each row of ``x`` to the centre of the cluster it was given."""
    return np.sqrt(((x - centres[labels]) ** 2).sum(1))


def _labelled(x: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Centres of clusters that were not found by K-means (their means), and (label, distance) per
    row in the layout ``_assign`` gives."""
    centres = _means(x, labels, k)
    return centres, np.stack([labels.astype(np.float64), _distance_to_centre(x, centres, labels)], axis=1)


def _relabel_by_size(labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cluster 0 is the largest, ids are dense: stable, meaningful to read, and no empty cluster.

    Returns the new labels and ``remap`` (old id -> new id).
    """
    counts = np.bincount(labels, minlength=k)
    order = np.lexsort((np.arange(k), -counts))
    remap = np.empty(k, dtype=np.int32)
    remap[order] = np.arange(k, dtype=np.int32)
    return remap[labels], remap


def _silhouette(x: np.ndarray, labels: np.ndarray, seed: int) -> float | None:
    from sklearn.metrics import silhouette_score

    if len(set(labels.tolist())) < 2 or len(x) < 3:
        return None
    return float(silhouette_score(x, labels, random_state=seed))


@task(name="cluster", retries=1, retry_delay_seconds=5)
def cluster_task(codes_url: str, output: str, storage_options: dict[str, Any], n_clusters: int | None,
                 embedding: str, seed: int, address: str, method: str = "kmeans", embedding_dim: int = 10,
                 merge: bool = False) -> Clustering:
    with Client(address, set_as_default=False) as client:
        return cluster_codes(codes_url, output, storage_options, n_clusters, embedding, seed, client, method,
                             embedding_dim, merge)
