"""Clustering quality of the product's defaults against the anchors, on the same data, same run.

    python bench/quality.py --datasets digits,fashion10k --seeds 0,1,2
    python bench/quality.py --datasets fashion70k --seeds 0 --methods product,raw-kmeans
    python bench/quality.py --datasets shapes9,photos16,fashion-tint10k,fashion-uneven --seeds 0 \
        --methods raw-kmeans,pca-kmeans,umap-kmeans,seed-cifar,product

Each method runs as its own process tree; wall time and peak memory (all processes together) are
measured. Prints one table (ACC, NMI, ARI, time, memory; mean +- std over seeds), the product's
margins over each anchor, and writes bench/_work/quality.md (copy the table into bench/RESULTS.md
with the command and commit). Labels are used for scoring only.

Resumable: every finished (dataset, method, seed) run is appended to bench/_work/quality-results.jsonl
(with the time, the commit and OMP_NUM_THREADS it ran under); a later call skips the runs stored there
and builds the table from all stored results for the requested datasets, methods and seeds, printing
which were reused. --rerun runs the requested ones again (the newest record of a run is the one used).
Failed runs are reported in the table and not stored, so the next call tries them again.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
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
PIXEL_ANCHORS = ("raw-kmeans", "pca-kmeans", "umap-kmeans")  # bench/anchors.py on datasets.load's arrays
METHODS = (*PRESET_METHODS, *PIXEL_ANCHORS, "clustimage", "clustimage-k")
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
    elif method in PIXEL_ANCHORS:
        m = run_measured([sys.executable, str(HERE / "anchors.py"), method, dataset, str(seed), f"{out}.npy"], env)
        if m.returncode != 0:
            raise RuntimeError(f"{method} failed: {m.stderr[-2000:]}")
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


def commit() -> str:
    """HEAD's short hash, with '+dirty' when the work tree has changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def read_store(path: Path) -> dict[tuple[str, str, int], dict]:
    """(dataset, method, seed) -> its newest stored record."""
    store: dict[tuple[str, str, int], dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                store[(rec["dataset"], rec["method"], int(rec["seed"]))] = rec
    return store


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
    ap.add_argument("--store", default=str(HERE / "_work" / "quality-results.jsonl"),
                    help="JSON lines file of finished runs, reused by later calls")
    ap.add_argument("--rerun", action="store_true", help="run the requested runs again even when they are stored")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    store_path = Path(a.store)
    store_path.parent.mkdir(parents=True, exist_ok=True)
    store = read_store(store_path)
    seeds = [int(s) for s in a.seeds.split(",")]
    unknown = [m for m in a.methods.split(",") if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown} (known: {', '.join(METHODS)})")
    rows = []
    reused: list[str] = []
    for dataset in a.datasets.split(","):
        folder = None
        runs = Path(tempfile.mkdtemp(dir=work, prefix="runs-"))
        for method in a.methods.split(","):
            if method.startswith("clustimage") and dataset == "fashion70k":
                rows.append({"dataset": dataset, "method": method, "note": "not run at 70k (out of memory here)"})
                continue
            results, failure = [], None
            r: dict = {}
            for seed in seeds:
                key = (dataset, method, seed)
                if key in store and not a.rerun:
                    rec = store[key]
                    r = rec["result"]
                    reused.append(f"{dataset} {method} seed {seed} (finished {rec['finished']}, {rec['commit']}, "
                                  f"OMP_NUM_THREADS={rec['omp_num_threads']})")
                    print("reused", dataset, method, seed, r, flush=True)
                else:
                    if folder is None:
                        folder = write_folder(dataset, work / "corpora")
                    try:
                        r = run_method(method, dataset, folder, seed, runs)
                    except RuntimeError as e:
                        failure = f"seed {seed}: {str(e)[-300:]}".replace("\n", " ").replace("|", "/")
                        print("FAILED", dataset, method, seed, e, flush=True)
                        break
                    print(dataset, method, seed, r, flush=True)
                    if "skipped" in r:
                        break
                    rec = {"dataset": dataset, "method": method, "seed": seed, "result": r,
                           "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                           "commit": commit(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset")}
                    with store_path.open("a") as f:
                        f.write(json.dumps(rec, default=lambda o: o.item() if hasattr(o, "item") else str(o)) + "\n")
                    store[key] = rec
                results.append(r)
            if failure is not None:
                rows.append({"dataset": dataset, "method": method, "note": f"failed, {failure}"})
                continue
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
    if reused:
        lines += ["", f"Reused from {store_path.name} ({len(reused)} runs):", ""] + [f"- {x}" for x in reused]
    text = "\n".join(lines)
    print(text)
    Path(a.results).write_text(text + "\n")


if __name__ == "__main__":
    main()
