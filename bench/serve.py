"""How fast ``imgclust serve`` answers, and how much memory it holds, as the run grows.

    python bench/serve.py --sizes 10000 100000 [--template RUN]

A run of N images is made from a real finished run (the template: by default the digits sample,
run here with a short training budget) by repeating its images: every copy gets its own path,
its code plus noise (a quarter of each dimension's spread: a distinct image near its original),
its thumbnail, and a distance jittered around the original's; the members layout and the code
index are written for all N, as a run writes them. The app is then started as a user starts it
(``imgclust serve RUN --port 0``, its own process) and asked over HTTP:

- the overview's first byte (``GET /``);
- the page 1,000 members deep in the largest cluster (``GET /cluster/C?page=17``, 60 a page);
- a similar-image query (``GET /api/similar/I?k=24``), median of 5 after one warm-up;
- its resident memory after those;

and, in this process, the code index against exact search over the same codes: recall@10 of 200
queries and the median time of one query, warm (its lists read before) and cold (a fresh reader).

Targets: overview ≤ 1 s, deep page ≤ 0.5 s, similar ≤ 0.3 s, memory ≤ 1 GB and ≤ 1.2 × the
memory at the smallest size of the same run of this benchmark; index recall@10 ≥ 0.95 and a warm
query ≤ 10 ms.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from distributed import Client, LocalCluster  # noqa: E402

from imgclust.codeindex import CodeIndex, Standardiser, build_index  # noqa: E402
from imgclust.io.arrays import chunk_spans, create_array, open_array, read_rows  # noqa: E402
from imgclust.io.storage import read_json, write_json  # noqa: E402
from imgclust.members import write_members  # noqa: E402
from imgclust.runmodel import RunModel  # noqa: E402
from imgclust.runstore import Location, RunStore  # noqa: E402

WORK = HERE / "_work" / "serve"


def template_run() -> Path:
    """The digits sample, clustered with a short training budget (made once, then reused)."""
    out = WORK / "template"
    if (out / "run.json").exists():
        return out
    src = WORK / "digits"
    shutil.rmtree(src, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "imgclust.cli", "sample", str(src)], check=True)
    subprocess.run([sys.executable, "-m", "imgclust.cli", "run", str(src), str(out), "-k", "10", "--seed", "0",
                    "--train-steps", "300", "--no-refine", "--no-progress", "--overwrite"], check=True)
    return out


def grow(template: Path, n: int) -> Path:
    """A run of ``n`` images made by repeating the template's (see the module's docstring)."""
    out = WORK / f"run-{n}"
    if (out / "index" / "index.json").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for name in ("run.json", "clusters.json", "model"):
        (shutil.copytree if (template / name).is_dir() else shutil.copy)(template / name, out / name)
    src, dst = RunStore(str(template)), RunStore(str(out))
    base = src.read_table("assignments")
    manifest = src.read_table("manifest")
    index_of = dict(zip(manifest["path"], manifest["index"]))
    m = len(base)
    rep = np.arange(n) % m  # row n of the grown run repeats template row rep[n]
    rng = np.random.default_rng(0)
    codes, thumbs = open_array(src.codes), open_array(src.thumbs)
    src_codes, src_thumbs = codes[:], thumbs[:]
    tmpl_index = base["path"].map(index_of).to_numpy(np.int64)
    spread = (0.25 * src_codes.std(0)).astype(np.float32)  # copies are distinct images, near their original
    new_codes = create_array(dst.codes, (n, codes.shape[1]), 1024, "float32")  # a run's: one chunk a shard
    new_thumbs = create_array(dst.thumbs, (n, *thumbs.shape[1:]), 1024, "uint8", read_rows=1)
    for a, b in chunk_spans(n, 65536):
        rows = tmpl_index[rep[a:b]]
        new_codes[a:b] = src_codes[rows] + rng.normal(0, 1, (b - a, codes.shape[1])).astype(np.float32) * spread
    for a, b in chunk_spans(n, 1024):
        new_thumbs[a:b] = src_thumbs[tmpl_index[rep[a:b]]]
    shutil.copytree(template / "images.zarr", out / "images.zarr")  # attributes for uploads; rows unused
    grown = pd.DataFrame({"path": [f"copy-{i // m}/{p}" for i, p in zip(range(n), base["path"].to_numpy()[rep])],
                          "cluster": base["cluster"].to_numpy()[rep],
                          "distance": base["distance"].to_numpy()[rep] * rng.uniform(0.98, 1.02, n)})
    write_members(dst, grown, np.arange(n), 0)
    clusters = read_json(src.clusters)
    sizes = grown.groupby("cluster").size()
    write_json(dst.clusters, [{**c, "size": int(sizes.get(c["id"], 0))} for c in clusters])
    run = read_json(src.run_record)
    model = RunModel.load(Location(str(out / "model")))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True) as cluster, Client(cluster) as client:
        build_index(dst, Standardiser.of(model.code_space), client)
    write_json(dst.run_record, {**run, "tables_generation": 0})
    return out


def index_quality(run: Path, queries: int = 200) -> dict[str, float]:
    """The code index against exact search over the same codes: recall@10 and the median time of
    one warm query (in this process, no HTTP), as ``imgclust neighbors`` and the app use it."""
    store = RunStore(str(run))
    index = CodeIndex.open(store)
    model = RunModel.load(Location(store.model))
    codes = open_array(store.codes)
    n = codes.shape[0]
    rows = np.sort(np.random.default_rng(1).choice(n, queries, replace=False))
    scale = Standardiser.of(model.code_space)
    q = scale(read_rows(codes, rows))
    best_d = np.full((queries, 10), np.inf, np.float32)
    best_i = np.zeros((queries, 10), np.int64)
    for a, b in chunk_spans(n, 65536):  # exact: every code
        z = scale(codes[a:b])
        d2 = (z**2).sum(1)[None, :] - 2.0 * (q @ z.T) + (q**2).sum(1)[:, None]
        d2[(rows[:, None] >= a) & (rows[:, None] < b) & (np.arange(a, b)[None, :] == rows[:, None])] = np.inf
        d = np.concatenate([best_d, d2], 1)
        i = np.concatenate([best_i, np.broadcast_to(np.arange(a, b), d2.shape)], 1)
        keep = np.argsort(d, 1, kind="stable")[:, :10]
        best_d, best_i = np.take_along_axis(d, keep, 1), np.take_along_axis(i, keep, 1)
    _, found = index.search(q, 10, exclude=rows)
    recall = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, best_i)]))
    times = []
    for j in range(queries):
        index.search(q[j:j + 1], 10, exclude=rows[j:j + 1])  # warm: its lists read once
        t = time.perf_counter()
        index.search(q[j:j + 1], 10, exclude=rows[j:j + 1])
        times.append(time.perf_counter() - t)
    cold = []
    fresh = CodeIndex.open(store)
    for j in range(0, queries, 10):
        t = time.perf_counter()
        fresh.search(q[j:j + 1], 10, exclude=rows[j:j + 1])
        cold.append(time.perf_counter() - t)
    return {"index_recall_at_10": recall, "index_query_warm_ms": 1000 * statistics.median(times),
            "index_query_cold_ms": 1000 * statistics.median(cold), "index_lists": index.n_lists}


def ttfb(url: str) -> float:
    """Seconds to the first byte of ``url``'s answer (read whole, after)."""
    t = time.perf_counter()
    with urllib.request.urlopen(url) as r:
        r.read(1)
        first = time.perf_counter() - t
        r.read()
    return first


def measure(run: Path) -> dict[str, float]:
    proc = subprocess.Popen([sys.executable, "-m", "imgclust.cli", "serve", str(run), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = re.search(r"(http://127\.0\.0\.1:\d+/)", proc.stdout.readline()).group(1)
        time.sleep(8)  # the model loads in the background at start
        layout = read_json(str(run / "members" / "layout.json"))
        largest = max(layout["clusters"], key=lambda c: layout["clusters"][c][1])
        out = {"overview_s": ttfb(url)}
        ttfb(f"{url}cluster/{largest}?page=2")  # warm-up; the measured page was never asked before
        out["page_1000_deep_s"] = ttfb(f"{url}cluster/{largest}?page=17")  # members 961-1,020
        n = layout["rows"]
        ttfb(f"{url}api/similar/{n // 2}?k=24")
        out["similar_s"] = statistics.median(ttfb(f"{url}api/similar/{(n // 7) * i}?k=24") for i in range(1, 6))
        out["memory_mb"] = psutil.Process(proc.pid).memory_info().rss / 2**20
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--template", type=Path, help="a finished run to grow (default: the digits sample)")
    args = ap.parse_args()
    template = args.template or template_run()
    results = {}
    for n in args.sizes:
        t = time.perf_counter()
        run = grow(template, n)
        made = time.perf_counter() - t
        results[n] = {**measure(run), **index_quality(run)}
        print(f"{n:>10,} images (made in {made:.0f} s): " + ", ".join(f"{k} {v:.3f}" for k, v in results[n].items()),
              flush=True)
    small = results[min(results)]["memory_mb"]
    for n, r in results.items():
        print(f"{n:>10,}: memory {r['memory_mb'] / small:.2f} x the {min(results):,}-image run; targets: overview "
              f"{'ok' if r['overview_s'] <= 1 else 'MISSED'}, deep page {'ok' if r['page_1000_deep_s'] <= 0.5 else 'MISSED'}, "
              f"similar {'ok' if r['similar_s'] <= 0.3 else 'MISSED'}, memory "
              f"{'ok' if r['memory_mb'] <= 1024 and r['memory_mb'] <= 1.2 * small else 'MISSED'}; index recall@10 "
              f"{'ok' if r['index_recall_at_10'] >= 0.95 else 'MISSED'}, warm query "
              f"{'ok' if r['index_query_warm_ms'] <= 10 else 'MISSED'}")
    print(json.dumps({str(k): v for k, v in results.items()}))


if __name__ == "__main__":
    main()
