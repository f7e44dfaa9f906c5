"""Baselines: UMAP on raw pixels (optionally PCA first) -> K-means / GMM."""
import argparse
import numpy as np
from bench.research.common import Timer, gmm, kmeans, load, record, umap_embed

ap = argparse.ArgumentParser()
ap.add_argument("--datasets", default="digits,fashion10k")
ap.add_argument("--seeds", default="0")
ap.add_argument("--nn", default="15")
ap.add_argument("--metric", default="euclidean")
ap.add_argument("--pca", type=int, default=0)
a = ap.parse_args()
for ds in a.datasets.split(","):
    x, y = load(ds)
    feats = x.reshape(len(x), -1).astype(np.float32) / 255.0
    for seed in map(int, a.seeds.split(",")):
        for nn in map(int, a.nn.split(",")):
            with Timer() as t:
                f = feats
                if a.pca:
                    from sklearn.decomposition import PCA
                    f = PCA(a.pca, random_state=seed).fit_transform(f)
                e = umap_embed(f, seed, 10, nn, a.metric)
                t_umap = t.s
                lk, _ = kmeans(e, 10, seed)
                t_km = t.s
            record(ds, f"raw{'-pca'+str(a.pca) if a.pca else ''} umap(nn={nn},{a.metric},10d)+kmeans", seed, y, lk, t_km, umap_s=round(t_umap, 1))
            with Timer() as t2:
                lg = gmm(e, 10, seed)
            record(ds, f"raw{'-pca'+str(a.pca) if a.pca else ''} umap(nn={nn},{a.metric},10d)+gmm", seed, y, lg, t_umap + t2.s)
