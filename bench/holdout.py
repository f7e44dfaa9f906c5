"""Do images added later by ``assign`` land where a full run puts them?

    python bench/holdout.py --dataset digits --seed 0 [--no-refine] [--held-out 0.1]

Writes the dataset as image files three ways: ``full/`` (every image), ``part/`` (all but a random
held-out share) and ``new/`` (the held-out images, same relative paths). Runs ``imgclust run`` on
``full`` and on ``part``, then ``imgclust assign`` of ``new`` into the ``part`` run. The two runs
number their clusters independently, so ``part``'s ids are matched to ``full``'s by the Hungarian
matching on the images both runs clustered. Prints:

- agreement on the shared images: how far two runs that differ by the held-out share agree at all;
- agreement on the held-out images: ``assign``'s placement against the full run's own clusters;
- each run's accuracy against the labels (for scale).

A placement that reproduces the full run's clusters has held-out agreement close to the shared one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy.optimize import linear_sum_assignment

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from datasets import load  # noqa: E402

IMGCLUST = str(Path(sys.executable).parent / "imgclust")
WORK = HERE / "_work" / "holdout"


def write(x: np.ndarray, y: np.ndarray, rows: np.ndarray, folder: Path) -> None:
    for i in rows:
        d = folder / str(y[i])
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i], "L").save(d / f"{i:05d}.png")


def run(*args: str) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([IMGCLUST, *args, "--no-progress"] if args[0] == "run" else [IMGCLUST, *args],
                       capture_output=True, text=True, env={**os.environ, "IMGCLUST_PROGRESS": "0"})
    if r.returncode != 0:
        raise SystemExit(f"imgclust {' '.join(args)} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def matched(a: np.ndarray, b: np.ndarray) -> dict[int, int]:
    """Best one-to-one map of b's cluster ids onto a's, by how many images they share."""
    ka, kb = int(a.max()) + 1, int(b.max()) + 1
    table = np.zeros((kb, ka), np.int64)
    np.add.at(table, (b, a), 1)
    rows, cols = linear_sum_assignment(-table)
    return dict(zip(rows.tolist(), cols.tolist()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--held-out", type=float, default=0.1)
    ap.add_argument("--no-refine", action="store_true", help="K-means' clusters (the placement decides alone)")
    args = ap.parse_args()
    x, y = load(args.dataset)
    k = len(np.unique(y))
    rng = np.random.default_rng(1234)
    held = np.sort(rng.choice(len(x), size=round(args.held_out * len(x)), replace=False))
    keep = np.setdiff1d(np.arange(len(x)), held)
    root = WORK / f"{args.dataset}-{args.held_out}"
    if not (root / ".complete").exists():
        write(x, y, np.arange(len(x)), root / "full")
        write(x, y, keep, root / "part")
        write(x, y, held, root / "new")
        (root / ".complete").write_text("ok")
    tag = f"s{args.seed}{'-norefine' if args.no_refine else ''}"
    extra = ["--no-refine"] if args.no_refine else []
    out_full, out_part = root / f"out-full-{tag}", root / f"out-part-{tag}"
    seconds = {}
    for src, out in (("full", out_full), ("part", out_part)):
        if not (out / "run.json").exists():
            seconds[src] = run("run", str(root / src), str(out), "-k", str(k), "--seed", str(args.seed), *extra)
    full = pd.read_parquet(out_full / "assignments.parquet").set_index("path")["cluster"]
    before = len(pd.read_parquet(out_part / "assignments.parquet"))
    if before == len(keep):
        seconds["assign"] = run("assign", str(out_part), str(root / "new"))
    part = pd.read_parquet(out_part / "assignments.parquet").set_index("path")["cluster"]
    held_paths = [f"{y[i]}/{i:05d}.png" for i in held]
    shared = full.index.difference(held_paths)
    mapping = matched(full[shared].to_numpy(), part[shared].to_numpy())
    same = lambda paths: float((part[paths].map(mapping).to_numpy() == full[paths].to_numpy()).mean())  # noqa: E731
    from imgclust.metrics import hungarian_accuracy

    label = lambda paths: [p.split("/")[0] for p in paths]  # noqa: E731
    result = {
        "dataset": args.dataset, "seed": args.seed, "refine": not args.no_refine, "held_out": len(held),
        "agreement_shared": same(shared), "agreement_held_out": same(held_paths),
        "acc_full": hungarian_accuracy(np.array(label(full.index)), full.to_numpy()),
        "acc_part_with_assigned": hungarian_accuracy(np.array(label(part.index)), part.to_numpy()),
        "acc_held_out_assigned": hungarian_accuracy(np.array(label(held_paths)), part[held_paths].to_numpy()),
        "seconds": {k2: round(v, 1) for k2, v in seconds.items()},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
