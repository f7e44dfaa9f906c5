"""Discover at sizes no disk here holds: the streamed listing, hashing, duplicate buckets and the
table writers over ``synthetic://N`` (imgclust/io/synthetic.py: N generated objects, a thousand to
a folder, one in 50 a copy of the one before), without decoding.

    OMP_WAIT_POLICY=PASSIVE python bench/synthetic_discover.py --sizes 100000,1000000
    nohup python bench/synthetic_discover.py --sizes 10000000 &      # about 3 hours on 2 cores

Each tier runs ``discover`` in its own process tree (the flow process with a local Dask cluster's
scheduler inside it, 2 worker processes of one thread) and records wall time, CPU seconds of the
tree, the flow process's peak RSS and that of all processes together, and checks the counts
(found = N, duplicates = N / 50). Finished tiers are kept in bench/_work/synthetic/results.json and
skipped on the next call (``--force`` reruns them); an interrupted tier is measured again from the
start. Writes bench/RESULTS-synthetic.md. Target: the flow process under 1 GB at 10M.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from measure import run_measured  # noqa: E402

WORK = HERE / "_work" / "synthetic"
RESULTS = WORK / "results.json"


def child(n: int, out: str) -> None:
    """Run discover over ``synthetic://n`` into ``out`` and print its counts as JSON (the measured process)."""
    import resource

    from distributed import Client, LocalCluster

    from imgclust.runstore import Location, RunStore
    from imgclust.stages.discover import discover

    t0 = time.perf_counter()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      host="127.0.0.1") as cluster, Client(cluster) as client:
        found = discover(Location(f"synthetic://{n}"), RunStore(out), client)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"found": found.n_found, "unique": found.n_unique, "duplicates": found.n_duplicates,
                      "seconds": round(time.perf_counter() - t0, 1), "flow_peak_mb_self": round(peak)}))


def tier(n: int) -> dict[str, Any]:
    out = WORK / f"out-{n}"
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "IMGCLUST_PROGRESS": "0", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1"}
    m = run_measured([sys.executable, __file__, "--child", str(n), str(out)], env, timeline=True)
    (WORK / f"log-{n}.txt").write_text(m.stdout + m.stderr)
    if m.returncode != 0:
        raise RuntimeError(f"discover failed at {n}: {m.stderr[-3000:]}")
    got = json.loads(m.stdout.strip().splitlines()[-1])
    assert got["found"] == n and got["duplicates"] == n // 50, got
    root_pid = min(m.process_peaks)
    flow_peak = m.process_peaks[root_pid][1]
    cpu = max(c for _, c in m.cpu) if m.cpu else None  # of the live processes: the workers exit before the end
    shutil.rmtree(out, ignore_errors=True)
    return {"n": n, **got, "wall_s": round(m.seconds, 1), "cpu_s": round(cpu, 1) if cpu else None,
            "flow_peak_mb": round(flow_peak), "all_peak_mb": round(m.peak_rss_mb),
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                     text=True).stdout.strip()}


def report(results: dict[str, Any], command: str) -> str:
    rows = sorted(results.values(), key=lambda r: r["n"])
    lines = ["# Discover over a synthetic archive", "", f"Command: `{command}`", "",
             "Listing streamed into sorted parts, hashing on 2 worker processes, duplicates found bucket by "
             "bucket of hash, unique/unreadable parts and the duplicates table written by the workers. "
             "`synthetic://N`: generated objects, one in 50 a copy (imgclust/io/synthetic.py).", "",
             "| images | commit | wall s | CPU s (all processes) | CPU µs / image | flow process peak MB | "
             "all processes peak MB | duplicates |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per = f"{r['cpu_s'] / r['n'] * 1e6:.0f}" if r.get("cpu_s") else "-"
        lines.append(f"| {r['n']:,} | {r['commit']} | {r['wall_s']:.0f} | {r['cpu_s'] or '-'} | {per} | "
                     f"{r['flow_peak_mb']} | {r['all_peak_mb']} | {r['duplicates']:,} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--results", default=str(HERE / "RESULTS-synthetic.md"))
    ap.add_argument("--child", nargs=2, metavar=("N", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(int(args.child[0]), args.child[1])
        return
    WORK.mkdir(parents=True, exist_ok=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for n in (int(s) for s in args.sizes.split(",")):
        if str(n) in results and not args.force:
            print(f"{n:,}: done before, skipped")
            continue
        print(f"{n:,}: running", flush=True)
        results[str(n)] = tier(n)
        RESULTS.write_text(json.dumps(results, indent=2))
        print(json.dumps(results[str(n)]), flush=True)
    Path(args.results).write_text(report(results, "python bench/synthetic_discover.py --sizes " + args.sizes))


if __name__ == "__main__":
    main()
