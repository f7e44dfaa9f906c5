"""Clustering quality of the product's defaults against the anchors, on the same data, same run.

    python bench/quality.py --datasets digits,fashion10k --seeds 0,1,2
    python bench/quality.py --datasets fashion70k --seeds 0 --methods product,raw-kmeans

Each method runs as its own process tree; wall time and peak memory (all processes together) are
measured. Prints one table (ACC, NMI, ARI, time, memory; mean +- std over seeds), the product's
margins over each anchor, and writes bench/_work/quality.md (copy the table into bench/RESULTS.md
with the command and commit). Labels are used for scoring only.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from datasets import load, write_folder  # noqa: E402
from measure import run_measured  # noqa: E402

from imgclust.metrics import score  # noqa: E402

PRESET_METHODS = ("product", "cae-refine", "seed-mnist", "seed-cifar", "seed-vae", "seed-vae-dense",
                  "seed-vae-umap")  # `imgclust run`
METHODS = (*PRESET_METHODS, "raw-kmeans", "clustimage", "clustimage-k")
IMGCLUST = str(Path(sys.executable).parent / "imgclust")


def clustimage_python() -> str | None:
    """A Python with clustimage: this one, $CLUSTIMAGE_PYTHON, or a separate venv at /work/clustimage-venv
    (clustimage pins packages that clash with the product's, so it may live in its own venv)."""
    import importlib.util

    if importlib.util.find_spec("clustimage") is not None:
        return sys.executable
    for candidate in (os.environ.get("CLUSTIMAGE_PYTHON"), "/work/clustimage-venv/bin/python"):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def run_method(method: str, dataset: str, folder: Path, seed: int, work: Path) -> dict:
    x, y = load(dataset)
    k = len(np.unique(y))
    env = {**os.environ, "IMGCLUST_PROGRESS": "0"}
    out = work / f"{method}-{dataset}-{seed}"
    extra: dict = {}
    if method in PRESET_METHODS:
        cmd = [IMGCLUST, "run", str(folder), str(out), "--n-clusters", str(k), "--seed", str(seed), "--overwrite"]
        if method != "product":
            cmd += ["--preset", method]
        m = run_measured(cmd, env)
        if m.returncode != 0:
            raise RuntimeError(f"{method} failed: {m.stderr[-2000:]}")
        a = pd.read_parquet(out / "assignments.parquet")
        labels = a["path"].str.split("/").str[0].to_numpy()
        pred = a["cluster"].to_numpy()
        from imgclust.evaluate import code_neighbour_vote
        from imgclust.runstore import RunStore

        extra["knn5"] = code_neighbour_vote(RunStore(str(out)), a["path"], pd.Series(labels))["knn5_vote_accuracy"]
    elif method == "raw-kmeans":
        m = run_measured([sys.executable, str(HERE / "anchors.py"), "raw-kmeans", dataset, str(seed), f"{out}.npy"], env)
        if m.returncode != 0:
            raise RuntimeError(f"raw-kmeans failed: {m.stderr[-2000:]}")
        pred, labels = np.load(f"{out}.npy"), y.astype(str)
    else:
        python = clustimage_python()
        if python is None:
            return {"skipped": "clustimage is not installed (pip install clustimage, or set CLUSTIMAGE_PYTHON)"}
        args = [python, str(HERE / "anchors.py"), "clustimage", str(folder), str(seed), f"{out}.csv"]
        if method == "clustimage-k":
            args.append(str(k))
        m = run_measured(args, env)
        if m.returncode != 0:
            raise RuntimeError(f"{method} failed: {m.stderr[-2000:]}")
        t = pd.read_csv(f"{out}.csv")
        labels = t["path"].map(lambda p: Path(p).parent.name).to_numpy()
        pred = t["cluster"].to_numpy()
    s = score(np.asarray(labels).astype(str), pred)
    return {"acc": s["accuracy"], "nmi": s["nmi"], "ari": s["ari"], "purity": s["purity"],
            "clusters": len(np.unique(pred)), "seconds": m.seconds, "peak_mb": m.peak_rss_mb, **extra}


def fmt(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="digits,fashion10k")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--work", default=str(HERE / "_work"), help="where corpora and runs are written")
    ap.add_argument("--results", default=str(HERE / "_work" / "quality.md"))
    ap.add_argument("--keep-runs", action="store_true", help="keep each run's output folder (printed) for inspection")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in a.seeds.split(",")]
    rows = []
    for dataset in a.datasets.split(","):
        folder = write_folder(dataset, work / "corpora")
        runs = Path(tempfile.mkdtemp(dir=work, prefix="runs-"))
        for method in a.methods.split(","):
            if method.startswith("clustimage") and dataset == "fashion70k":
                rows.append({"dataset": dataset, "method": method, "note": "not run at 70k (out of memory here)"})
                continue
            results = []
            for seed in seeds:
                r = run_method(method, dataset, folder, seed, runs)
                print(dataset, method, seed, r, flush=True)
                if "skipped" in r:
                    break
                results.append(r)
            if not results:
                rows.append({"dataset": dataset, "method": method, "note": r["skipped"]})
                continue
            rows.append({"dataset": dataset, "method": method, "seeds": len(results),
                         **{key: [r[key] for r in results if key in r]
                            for key in ("acc", "nmi", "ari", "purity", "clusters", "knn5", "seconds", "peak_mb")}})
        if a.keep_runs:
            print(f"runs of {dataset} kept in {runs}", flush=True)
        else:
            shutil.rmtree(runs, ignore_errors=True)
    lines = [f"Command: `python bench/quality.py --datasets {a.datasets} --seeds {a.seeds} --methods {a.methods}`",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
             f"{platform.python_version()}", "",
             "| dataset | method | seeds | ACC | NMI | ARI | purity | clusters | 5-NN vote | wall s | peak MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "note" in r:
            lines.append(f"| {r['dataset']} | {r['method']} | – | {r['note']} | | | | | | | |")
            continue
        knn = fmt(r["knn5"]) if r.get("knn5") else "–"
        lines.append(f"| {r['dataset']} | {r['method']} | {r['seeds']} | {fmt(r['acc'])} | {fmt(r['nmi'])} | "
                     f"{fmt(r['ari'])} | {fmt(r['purity'])} | {fmt(r['clusters'], 0)} | {knn} | "
                     f"{fmt(r['seconds'], 0)} | {fmt(r['peak_mb'], 0)} |")
    lines += ["", "Margins of the product (mean ACC difference, same data, same run):", ""]
    for dataset in a.datasets.split(","):
        prod = next((r for r in rows if r["dataset"] == dataset and r["method"] == "product" and "acc" in r), None)
        if prod is None:
            continue
        for r in rows:
            if r["dataset"] == dataset and r["method"] != "product" and "acc" in r:
                lines.append(f"- {dataset}: product − {r['method']} = {np.mean(prod['acc']) - np.mean(r['acc']):+.3f} "
                             f"ACC, {np.mean(prod['nmi']) - np.mean(r['nmi']):+.3f} NMI; time ×"
                             f"{np.mean(prod['seconds']) / np.mean(r['seconds']):.2f}, memory ×"
                             f"{np.mean(prod['peak_mb']) / np.mean(r['peak_mb']):.2f}")
    text = "\n".join(lines)
    print(text)
    Path(a.results).write_text(text + "\n")


if __name__ == "__main__":
    main()
