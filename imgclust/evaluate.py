"""``imgclust evaluate``: compare a run's assignments with known labels and write metrics.json."""

from __future__ import annotations

import io
import posixpath
from typing import Any

import pandas as pd

from imgclust.io.storage import open_fs, write_json
from imgclust.metrics import score
from imgclust.runstore import RunStore


def read_labels(spec: str, paths: pd.Series, storage_options: dict[str, Any] | None = None) -> pd.Series:
    """Label per path: from a CSV/Parquet (path,label) or each image's parent folder name."""
    if spec == "parent-folder":
        return paths.map(lambda p: posixpath.basename(posixpath.dirname(p)) or ".")
    fs, path = open_fs(spec, storage_options)
    if not fs.exists(path):
        raise FileNotFoundError(f"labels file not found: {spec}")
    data = fs.cat(path)
    table = pd.read_parquet(io.BytesIO(data)) if spec.lower().endswith(".parquet") else pd.read_csv(io.BytesIO(data))
    missing = {"path", "label"} - set(table.columns)
    if missing:
        raise ValueError(f"labels file {spec} lacks column(s) {', '.join(sorted(missing))}")
    return paths.map(dict(zip(table["path"].astype(str), table["label"].astype(str))))


KNN_SAMPLE = 10_000


def code_neighbour_vote(store: RunStore, paths: pd.Series, labels: pd.Series) -> dict[str, Any]:
    """5-NN majority-vote accuracy of the codes (standardised as for clustering), on a sample of at most 10k images."""
    import numpy as np

    from imgclust.cluster.code_space import code_scale
    from imgclust.io.arrays import open_array
    from imgclust.metrics import knn_vote_accuracy

    if not store.exists("codes.zarr"):
        return {}
    manifest = store.read_table("manifest")
    index = paths.map(dict(zip(manifest["path"], manifest["index"]))).to_numpy()
    ok = ~pd.isna(index)
    rows, lab = index[ok].astype(np.int64), labels.to_numpy()[ok].astype(str)
    pick = np.sort(np.random.default_rng(0).choice(len(rows), size=min(KNN_SAMPLE, len(rows)), replace=False))
    order = np.argsort(rows[pick])
    rows, lab = rows[pick][order], lab[pick][order]
    codes = open_array(store.codes, store.storage_options).get_orthogonal_selection((rows, slice(None)))
    if len(codes):
        sq = (codes.astype(np.float64) ** 2).sum(1)
        codes = (codes - codes.mean(0)) / code_scale(codes.std(0), sq.min(), sq.max())
    return {"knn5_vote_accuracy": knn_vote_accuracy(codes, lab, 5), "knn5_vote_images": len(rows)}


def evaluate_run(store: RunStore, labels: str) -> dict[str, Any]:
    """Score a finished run against ``labels`` (a path,label table or ``parent-folder``); writes
    ``metrics.json`` and, when the run has a report, shows the scores there too."""
    so = store.storage_options
    if not store.exists("assignments.parquet"):
        raise FileNotFoundError(f"{store.url} holds no finished run (assignments.parquet missing)")
    assignments = store.read_table("assignments")
    lab = read_labels(labels, assignments["path"], so)
    known = lab.notna()
    if not known.any():
        raise ValueError("no image of the run has a label")
    metrics = score(lab[known].astype(str).to_numpy(), assignments.loc[known, "cluster"].to_numpy())
    metrics["unlabelled"] = int((~known).sum())
    metrics["labels"] = labels
    metrics.update(code_neighbour_vote(store, assignments.loc[known, "path"], lab[known]))
    write_json(store.metrics, metrics, so)
    if store.exists("report", "index.html"):
        from imgclust.report.build import render_index

        render_index(store)
    return metrics


def format_metrics(m: dict[str, Any]) -> str:
    lines = [f"images scored  {m['n']}" + (f" ({m['unlabelled']} without label)" if m.get("unlabelled") else ""),
             f"accuracy       {m['accuracy']:.4f}  (Hungarian-matched)", f"NMI            {m['nmi']:.4f}",
             f"ARI            {m['ari']:.4f}",
             f"purity         {m['purity']:.4f}  (each cluster votes its majority label)"]
    if "knn5_vote_accuracy" in m:
        lines.append(f"5-NN vote      {m['knn5_vote_accuracy']:.4f}  (majority label of the 5 nearest codes, "
                     f"{m['knn5_vote_images']} images)")
    lines += ["", "contingency (rows: clusters)"]
    c = m["contingency"]
    table = pd.DataFrame(c["counts"], index=c["clusters"], columns=c["labels"])
    lines.append(table.to_string())
    return "\n".join(lines)
