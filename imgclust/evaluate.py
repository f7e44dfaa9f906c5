"""``imgclust evaluate``: compare a run's assignments with known labels and write metrics.json."""

from __future__ import annotations

import io
import posixpath
from typing import Any

import pandas as pd

from imgclust.metrics import score
from imgclust.storage import exists, join, open_fs, read_parquet, write_json


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


def evaluate_run(run_dir: str, labels: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    if not exists(join(run_dir, "assignments.parquet"), storage_options):
        raise FileNotFoundError(f"{run_dir} holds no finished run (assignments.parquet missing)")
    assignments = read_parquet(join(run_dir, "assignments.parquet"), storage_options)
    lab = read_labels(labels, assignments["path"], storage_options)
    known = lab.notna()
    if not known.any():
        raise ValueError("no image of the run has a label")
    metrics = score(lab[known].astype(str).to_numpy(), assignments.loc[known, "cluster"].to_numpy())
    metrics["unlabelled"] = int((~known).sum())
    metrics["labels"] = labels
    write_json(join(run_dir, "metrics.json"), metrics, storage_options)
    if exists(join(run_dir, "report", "index.html"), storage_options):
        from tasks.report import render_index

        render_index(run_dir, storage_options)
    return metrics


def format_metrics(m: dict[str, Any]) -> str:
    lines = [f"images scored  {m['n']}" + (f" ({m['unlabelled']} without label)" if m.get("unlabelled") else ""),
             f"accuracy       {m['accuracy']:.4f}  (Hungarian-matched)", f"NMI            {m['nmi']:.4f}",
             f"ARI            {m['ari']:.4f}", f"purity         {m['purity']:.4f}", "", "contingency (rows: clusters)"]
    c = m["contingency"]
    table = pd.DataFrame(c["counts"], index=c["clusters"], columns=c["labels"])
    lines.append(table.to_string())
    return "\n".join(lines)
