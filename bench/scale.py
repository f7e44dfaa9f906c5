"""How the product scales with the number of images: 10k, 50k, 200k real JPEG files.

    OMP_WAIT_POLICY=PASSIVE python bench/scale.py --sizes 10000 --anchors
    OMP_WAIT_POLICY=PASSIVE nohup python bench/scale.py --sizes 10000,50000,200000 --anchors &

Corpora: 256x256 RGB JPEG files (quality 85-90) made from Fashion-MNIST, each image upscaled with
random scale, shift, brightness and colour tint, written once by 2 processes into
bench/_work/scale/corpus-N/<label>/<i>.jpg (``.complete`` marks a finished corpus; labels are used
for a sanity score only). Each tier runs the product as a user would,
``imgclust run CORPUS OUT --n-clusters 10 --seed 0 --overwrite``, as its own process tree: wall
time, peak RSS of all its processes together, and, by mapping RSS samples onto the stages'
"Finished" log lines and run.json's seconds, peak RSS per stage. Next to it, in the same run,
single-process loops over 2,000 of the same files: Pillow alone (open, draft, convert, resize),
the product's ``decode_image``, and discover's per-file work (sha256 + gray probe).
Anchors (``--anchors``, on the smallest tier): scikit-learn K-means on raw 32x32 pixels, and
clustimage's default pipeline from the separate venv /work/clustimage-venv.
Finished tiers are kept in bench/_work/scale/results.json and skipped on the next call
(``--force`` reruns them), so a long run can be resumed. Writes bench/RESULTS-scale.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from measure import Measured, run_measured  # noqa: E402

WORK = HERE / "_work" / "scale"
RESULTS = WORK / "results.json"
CLUSTIMAGE_PY = Path("/work/clustimage-venv/bin/python")
STAGES = ("discover", "ingest", "train", "encode", "cluster", "refine", "publish", "report")
SIDE = 256
IMAGE_SIZE = (32, 32)  # the default preset's; checked against run.json's resolved.image_size
N_LOOP = 2000
_FASHION: tuple[np.ndarray, np.ndarray] | None = None


# ---------------------------------------------------------------- corpus

def _init_worker() -> None:
    global _FASHION
    from datasets import load

    _FASHION = load("fashion70k")


def _jpeg(i: int) -> tuple[int, bytes]:
    """Image ``i``: Fashion-MNIST ``i % 70000`` upscaled with jitter seeded by ``i``; (label, JPEG bytes)."""
    import io

    from PIL import Image

    assert _FASHION is not None
    x, y = _FASHION
    rng = np.random.default_rng([6, i])
    side = int(SIDE * rng.uniform(0.8, 1.0))
    im = Image.fromarray(x[i % len(x)], "L").resize((side, side), Image.Resampling.BICUBIC)
    canvas = np.zeros((SIDE, SIDE), np.float32)
    dx, dy = rng.integers(-12, 13, 2)
    ox = int(np.clip((SIDE - side) // 2 + dx, 0, SIDE - side))
    oy = int(np.clip((SIDE - side) // 2 + dy, 0, SIDE - side))
    canvas[oy:oy + side, ox:ox + side] = np.asarray(im, np.float32)
    tint = rng.uniform(0.6, 1.0, 3) * rng.uniform(0.8, 1.2)  # colour cast and brightness
    rgb = np.clip(canvas[:, :, None] * tint + rng.uniform(0, 20), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, "JPEG", quality=int(rng.integers(85, 91)))
    return int(y[i % len(y)]), buf.getvalue()


def _write_span(args: tuple[Path, int, int]) -> int:
    folder, lo, hi = args
    assert _FASHION is not None
    for i in range(lo, hi):
        path = folder / str(int(_FASHION[1][i % len(_FASHION[1])])) / f"{i:06d}.jpg"
        if path.exists():  # an interrupted generation goes on where it stopped
            continue
        label, data = _jpeg(i)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.rename(path)
    return hi - lo


def make_corpus(n: int) -> Path:
    """``corpus-n`` written once by 2 processes; reused when its marker file exists."""
    folder = WORK / f"corpus-{n}"
    done = folder / ".complete"
    if done.exists():
        return folder
    t0 = time.perf_counter()
    for label in range(10):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
    spans = [(folder, lo, min(n, lo + 2000)) for lo in range(0, n, 2000)]
    with Pool(2, initializer=_init_worker) as pool:
        written = sum(pool.imap_unordered(_write_span, spans))
    mb = sum(p.stat().st_size for p in folder.rglob("*.jpg")) / 2**20
    done.write_text(json.dumps({"n": written, "mb": round(mb, 1), "seconds": round(time.perf_counter() - t0, 1)}))
    print(f"corpus-{n}: {written} files, {mb:.0f} MB, {time.perf_counter() - t0:.0f} s", flush=True)
    return folder


def image_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.jpg"))


# ---------------------------------------------------------------- decode loops (one process)

def pillow_decode(path: Path) -> np.ndarray:
    """What a careful user writes: open, JPEG draft at the target size, convert, resize."""
    from PIL import Image

    with Image.open(path) as im:
        im.draft("RGB", IMAGE_SIZE)
        return np.asarray(im.convert("RGB").resize(IMAGE_SIZE, Image.Resampling.BILINEAR))


def decode_loops(files: list[Path]) -> dict[str, dict[str, float]]:
    """Images/s (wall and CPU) of three per-file loops, interleaved in 4 rounds against noise."""
    from imgclust.io.imagefile import decode_image, probe_is_gray

    loops = {
        "pillow": lambda p: pillow_decode(p),
        "decode_image": lambda p: decode_image(p.read_bytes(), IMAGE_SIZE, False, "crop"),
        "discover_per_file": lambda p: (hashlib.sha256(d := p.read_bytes()).hexdigest(), probe_is_gray(d)),
    }
    wall = dict.fromkeys(loops, 0.0)
    cpu = dict.fromkeys(loops, 0.0)
    for part in np.array_split(np.arange(len(files)), 4):
        for name, fn in loops.items():
            w0, c0 = time.perf_counter(), time.process_time()
            for j in part:
                fn(files[j])
            wall[name] += time.perf_counter() - w0
            cpu[name] += time.process_time() - c0
    return {name: {"img_s": len(files) / wall[name], "img_s_cpu": len(files) / cpu[name]} for name in loops}


# ---------------------------------------------------------------- product

def stage_windows(m: Measured, seconds: dict[str, float]) -> dict[str, tuple[float, float]]:
    """(start, end) of each stage in the run's clock: end = its "Finished" log line, start = end - seconds."""
    windows: dict[str, tuple[float, float]] = {}
    for stage in STAGES:
        hits = [t for t, line in m.lines if f"Task run '{stage}-" in line and "Finished in state" in line]
        if hits and stage in seconds:
            windows[stage] = (hits[-1] - seconds[stage], hits[-1])
    if windows:
        first = min(a for a, _ in windows.values())
        last = max(b for _, b in windows.values())
        windows = {"startup": (0.0, first), **windows, "shutdown": (last, m.seconds)}
    return windows


def window_peak(samples: list[tuple[float, float]], a: float, b: float) -> float:
    """Peak RSS in [a, b], including the samples just before and after it (stages shorter than a sample)."""
    times = [t for t, _ in samples]
    lo = max(0, int(np.searchsorted(times, a)) - 1)
    hi = min(len(samples), int(np.searchsorted(times, b, side="right")) + 1)
    return max((mb for _, mb in samples[lo:hi]), default=0.0)


def process_role(cmdline: str, root: bool) -> str:
    if root:
        return "client+scheduler"
    if "prefect" in cmdline and ("server" in cmdline or "uvicorn" in cmdline):
        return "prefect-server"
    if "multiprocessing" in cmdline or "distributed" in cmdline:
        return "dask-worker"
    return "other"


def run_product(n: int, corpus: Path) -> dict[str, Any]:
    from imgclust.metrics import score

    out = WORK / f"out-{n}"
    env = {**os.environ, "IMGCLUST_PROGRESS": "0", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "imgclust.cli", "run", str(corpus), str(out), "--n-clusters", "10", "--seed", "0",
           "--overwrite"]
    m = run_measured(cmd, env, timeline=True)
    (WORK / f"log-{n}.txt").write_text(m.stdout + m.stderr)
    if m.returncode != 0:
        raise RuntimeError(f"product failed at {n}: {m.stderr[-3000:]}")
    run = json.loads((out / "run.json").read_text())
    sec = run["seconds"]
    windows = stage_windows(m, sec)
    stage_peak = {s: round(window_peak(m.samples, a, b)) for s, (a, b) in windows.items()}
    def cpu_in(stage: str) -> float | None:
        if stage not in windows or len(m.cpu) < 2:
            return None
        ts, cs = np.array([t for t, _ in m.cpu]), np.array([c for _, c in m.cpu])
        a, b = windows[stage]
        return float(np.interp(b, ts, cs) - np.interp(a, ts, cs))

    stage_cpu = {s: cpu_in(s) for s in STAGES}
    roles: dict[str, float] = {}
    root_pid = min(m.process_peaks) if m.process_peaks else -1
    for pid, (cmdline, mb) in m.process_peaks.items():
        role = process_role(cmdline, pid == root_pid)
        roles[role] = round(roles.get(role, 0.0) + mb)
    (WORK / f"rss-{n}.csv").write_text("t,mb\n" + "\n".join(f"{t:.1f},{mb:.0f}" for t, mb in m.samples) + "\n")
    import pandas as pd

    a = pd.read_parquet(out / "assignments.parquet")
    acc = score(a["path"].str.split("/").str[0].to_numpy(), a["cluster"].to_numpy())["accuracy"]
    accepted = run["counts"]["accepted"]
    cores = run["config"].get("n_workers") or os.cpu_count() or 1
    return {
        "n": n, "accepted": accepted, "duplicates": run["counts"]["duplicates"], "rejected": run["counts"]["rejected"],
        "wall_s": round(m.seconds, 1), "peak_mb": round(m.peak_rss_mb), "seconds": sec,
        "stage_peak_mb": stage_peak, "stage_windows": {k: [round(a, 1), round(b, 1)] for k, (a, b) in windows.items()},
        "process_peak_mb": roles, "cores": cores,
        "image_size": run["resolved"]["image_size"], "epochs": run["resolved"]["epochs"],
        "stage_cpu_s": {k: round(v, 1) for k, v in stage_cpu.items() if v is not None},
        "ingest_img_s_core": accepted / sec["ingest"] / cores,
        "ingest_img_cpu_s": accepted / stage_cpu["ingest"] if stage_cpu["ingest"] else None,
        "discover_img_cpu_s": run["counts"]["found"] / stage_cpu["discover"] if stage_cpu["discover"] else None,
        "discover_img_s_core": run["counts"]["found"] / sec["discover"] / cores,
        "train_img_s": None, "encode_img_s": accepted / sec["encode"], "acc": round(float(acc), 3),
    }


# ---------------------------------------------------------------- anchors

def raw_kmeans_anchor(folder: str, out: str) -> None:
    """Decode every file with plain Pillow to 32x32 RGB, scikit-learn K-means (10 restarts) on the pixels."""
    from sklearn.cluster import KMeans

    files = image_files(Path(folder))
    x = np.stack([pillow_decode(p) for p in files]).reshape(len(files), -1).astype(np.float32) / 255.0
    labels = KMeans(n_clusters=10, n_init=10, random_state=0).fit_predict(x)
    np.save(out, labels)
    Path(out).with_suffix(".txt").write_text("\n".join(str(p.relative_to(folder)) for p in files))


def run_anchors(corpus: Path, timeout: float) -> dict[str, Any]:
    from imgclust.metrics import score

    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO)}
    res: dict[str, Any] = {"n": len(image_files(corpus))}
    out = WORK / "anchor-raw-kmeans.npy"
    m = run_measured([sys.executable, __file__, "raw-kmeans", str(corpus), str(out)], env)
    if m.returncode != 0:
        raise RuntimeError(f"raw-kmeans failed: {m.stderr[-2000:]}")
    truth = [p.split("/")[0] for p in out.with_suffix(".txt").read_text().splitlines()]
    res["raw-kmeans"] = {"wall_s": round(m.seconds, 1), "peak_mb": round(m.peak_rss_mb),
                         "acc": round(float(score(np.array(truth), np.load(out))["accuracy"]), 3)}
    if not CLUSTIMAGE_PY.exists():
        res["clustimage"] = {"note": f"not run: {CLUSTIMAGE_PY} does not exist"}
        return res
    csv = WORK / "anchor-clustimage.csv"
    try:
        m = run_measured([str(CLUSTIMAGE_PY), str(HERE / "anchors.py"), "clustimage", str(corpus), "0", str(csv)],
                         {**env, "PYTHONPATH": ""}, timeout=timeout, timeline=True)
    except Exception as exc:  # subprocess.TimeoutExpired: the child is killed below by the caller's exit
        res["clustimage"] = {"note": f"not finished within {timeout:.0f} s ({type(exc).__name__})"}
        return res
    if m.returncode != 0:
        res["clustimage"] = {"note": f"failed: {m.stderr.strip().splitlines()[-1] if m.stderr.strip() else m.returncode}",
                             "wall_s": round(m.seconds, 1), "peak_mb": round(m.peak_rss_mb)}
        return res
    import pandas as pd

    t = pd.read_csv(csv)
    acc = score(t["path"].map(lambda p: Path(p).parent.name).to_numpy(), t["cluster"].to_numpy())["accuracy"]
    res["clustimage"] = {"wall_s": round(m.seconds, 1), "peak_mb": round(m.peak_rss_mb), "acc": round(float(acc), 3),
                         "clusters": int(t["cluster"].nunique())}
    return res


# ---------------------------------------------------------------- report

def opt(x: float | None, spec: str = ".0f") -> str:
    return "–" if x is None else format(x, spec)


def cpu_ratio(r: dict[str, Any]) -> float | None:
    """Ingest stage's images per CPU-second (all processes of the run) over Pillow's in a plain loop."""
    x = r.get("ingest_img_cpu_s")
    return None if x is None else x / r["loops"]["pillow"]["img_s_cpu"]


def pipeline_cpu(r: dict[str, Any]) -> float:
    """CPU seconds of all the run's processes over discover..publish (report runs after the workers exit)."""
    return sum(max(0.0, r.get("stage_cpu_s", {}).get(s, 0.0)) for s in STAGES[:-1])


def report(results: dict[str, Any], command: str) -> str:
    tiers = sorted(results["tiers"].values(), key=lambda r: r["n"])
    head = ("| N | wall s | s/img | peak MB | " + " | ".join(STAGES) + " | ingest img/s/core | Pillow img/s/core "
            "| ratio |")
    lines = ["Wall clock (seconds per stage from run.json; img/s/core = images / ingest seconds / 2 workers; "
             "Pillow = one process, same files, measured right after the run):", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    for r in tiers:
        lp = r["loops"]
        lines.append(
            f"| {r['n']} | {r['wall_s']:.0f} | {r['wall_s'] / r['accepted'] * 1000:.1f} ms | {r['peak_mb']} | "
            + " | ".join(f"{r['seconds'].get(s, 0):.1f}" for s in STAGES)
            + f" | {r['ingest_img_s_core']:.0f} | {lp['pillow']['img_s']:.0f} | "
            f"{r['ingest_img_s_core'] / lp['pillow']['img_s']:.2f} |")
    head = ("| N | " + " | ".join(STAGES[:-1]) + " | CPU ms/img | ingest img/CPU-s | Pillow img/CPU-s | ratio | "
            "decode_image img/CPU-s | discover img/CPU-s | train img/s | encode img/s | ACC |")
    lines += ["", "CPU seconds per stage, all processes of the run together (client, scheduler, workers, Prefect "
              "server; less sensitive to the neighbours' load than wall time), and throughputs:", "", head,
              "|" + "---|" * (head.count("|") - 1)]
    for r in tiers:
        lp, sc = r["loops"], r.get("stage_cpu_s", {})
        lines.append(
            f"| {r['n']} | " + " | ".join(opt(sc.get(s), ".1f") for s in STAGES[:-1])
            + f" | {pipeline_cpu(r) / r['accepted'] * 1000:.2f} | {opt(r.get('ingest_img_cpu_s'))} | "
            f"{lp['pillow']['img_s_cpu']:.0f} | {opt(cpu_ratio(r), '.2f')} | {lp['decode_image']['img_s_cpu']:.0f} | "
            f"{opt(r.get('discover_img_cpu_s'))} | {r['train_img_s']:.0f} | {r['encode_img_s']:.0f} | {r['acc']:.3f} |")
    lines += ["", "Peak RSS (MB, all processes) per stage, and per process role (each role's own peak):", "",
              "| N | " + " | ".join(("startup", *STAGES, "shutdown")) + " | by role |", "|" + "---|" * 11]
    for r in tiers:
        sp = r["stage_peak_mb"]
        roles = ", ".join(f"{k} {v}" for k, v in sorted(r["process_peak_mb"].items()))
        lines.append(f"| {r['n']} | " + " | ".join(str(sp.get(s) or "–") for s in ("startup", *STAGES, "shutdown"))
                     + f" | {roles} |")
    if len(tiers) >= 2:
        lo, hi = tiers[0], tiers[-1]
        mem = hi["peak_mb"] / lo["peak_mb"]
        spi = (hi["wall_s"] / hi["accepted"]) / (lo["wall_s"] / lo["accepted"])
        lines += ["", f"Ratios {hi['n']} / {lo['n']} (tiers run one after another by the commands above, "
                  "on the same machine):", "",
                  f"- peak memory ×{mem:.2f} (target ≤ 1.3): **{'met' if mem <= 1.3 else 'not met'}**",
                  f"- seconds per image ×{spi:.2f} (target ≤ 1.2): **{'met' if spi <= 1.2 else 'not met'}**",
                  f"- CPU seconds per image (discover..publish) ×"
                  f"{(pipeline_cpu(hi) / hi['accepted']) / (pipeline_cpu(lo) / lo['accepted']):.2f}"]
    ing = [x for x in (cpu_ratio(r) for r in tiers) if x is not None]
    if ing:
        lines += [f"- ingest stage vs Pillow alone, images per CPU-second: {', '.join(f'{x:.2f}' for x in ing)} "
                  f"(target ≥ 0.80): **{'met' if min(ing) >= 0.8 else 'not met'}**"]
    anc = results.get("anchors")
    if anc:
        prod = results["tiers"].get(str(anc["n"]))
        lines += ["", f"Anchors on the {anc['n']}-image corpus:", "",
                  "| method | wall s | peak MB | ACC (sanity) | product/anchor time | product/anchor memory |",
                  "|---|---|---|---|---|---|"]
        if prod:
            lines.append(f"| product | {prod['wall_s']:.0f} | {prod['peak_mb']} | {prod['acc']:.3f} | 1 | 1 |")
        for name in ("raw-kmeans", "clustimage"):
            a = anc.get(name, {})
            if "acc" not in a:
                lines.append(f"| {name} | {a.get('wall_s', '–')} | {a.get('peak_mb', '–')} | {a.get('note', '')} | | |")
                continue
            ratio = (f"×{prod['wall_s'] / a['wall_s']:.2f} | ×{prod['peak_mb'] / a['peak_mb']:.2f}" if prod else "| ")
            lines.append(f"| {name} | {a['wall_s']:.0f} | {a['peak_mb']} | {a['acc']:.3f} | {ratio} |")
    notes = HERE / "scale-notes.md"  # hand-written reading of the figures, kept when the tables are rewritten
    if notes.exists():
        lines += ["", notes.read_text().rstrip()]
    text = "\n".join(lines)
    return (f"Commands (results.json accumulates tiers across calls): `{command}`\n\n"
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}, shared with other jobs (compare figures only as ratios within this "
            f"file).\n\n{text}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,50000,200000")
    ap.add_argument("--anchors", action="store_true", help="anchors on the smallest size")
    ap.add_argument("--force", action="store_true", help="rerun tiers already in results.json")
    ap.add_argument("--clustimage-timeout", type=float, default=2400)
    ap.add_argument("--results", default=str(HERE / "RESULTS-scale.md"))
    ap.add_argument("--report-only", action="store_true", help="rewrite the results file from results.json")
    a = ap.parse_args()
    if a.report_only:
        results = json.loads(RESULTS.read_text())
        text = report(results, "`, then `".join(results.get("commands", [])))
        print(text)
        Path(a.results).write_text(text)
        return
    WORK.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"tiers": {}}
    sizes = [int(s) for s in a.sizes.split(",")]
    for n in sizes:
        if str(n) in results["tiers"] and not a.force:
            print(f"N={n}: already measured, skipped", flush=True)
            continue
        corpus = make_corpus(n)
        free = shutil.disk_usage(WORK).free / 2**30
        print(f"N={n}: running the product ({free:.0f} GiB free)", flush=True)
        r = run_product(n, corpus)
        if tuple(r["image_size"]) != IMAGE_SIZE:
            raise SystemExit(f"run.json resolved.image_size {r['image_size']} != {IMAGE_SIZE}")
        steps = r["epochs"] * -(-r["accepted"] // 256)  # batch size 256, the CLI default
        r["train_steps"] = steps
        r["train_img_s"] = steps * 256 / r["seconds"]["train"]
        files = image_files(corpus)
        pick = np.random.default_rng(0).choice(len(files), min(N_LOOP, len(files)), replace=False)
        r["loops"] = decode_loops([files[i] for i in sorted(pick)])
        results["tiers"][str(n)] = r
        RESULTS.write_text(json.dumps(results, indent=1))
        print(json.dumps(r), flush=True)
    if a.anchors and ("anchors" not in results or a.force):
        n = min(sizes)
        print(f"anchors on N={n}", flush=True)
        results["anchors"] = run_anchors(make_corpus(n), a.clustimage_timeout)
        RESULTS.write_text(json.dumps(results, indent=1))
        print(json.dumps(results["anchors"]), flush=True)
    command = "OMP_WAIT_POLICY=PASSIVE python bench/scale.py " + " ".join(sys.argv[1:])
    results.setdefault("commands", [])
    if command not in results["commands"]:
        results["commands"].append(command)
        RESULTS.write_text(json.dumps(results, indent=1))
    text = report(results, "`, then `".join(results["commands"]))
    print(text)
    Path(a.results).write_text(text)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "raw-kmeans":
        raw_kmeans_anchor(sys.argv[2], sys.argv[3])
    else:
        main()
