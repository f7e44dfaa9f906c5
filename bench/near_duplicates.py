"""How well near-duplicate detection finds planted copies, next to imagededup's perceptual hash.

    python bench/near_duplicates.py [--seed 0] [--run RUN] [--method all|phash|product] [--force]

The corpus (bench/_work/near_duplicates/corpus-SEED, made once, the SOURCE the tool reads): under
originals/, ``--n-distinct`` 160×120 crops of scikit-image's bundled colour photographs (random
position, side 0.25–0.6 of the photo's shorter side; crops of one photo overlap up to IoU 0.3: similar,
not copies); under copies/, named at random, 1–3 copies of each of ``--n-sources`` of them: resized
0.5–0.8×, JPEG quality 30–50, 3–8 % cropped off each border, or brightness ×0.75–1.25 (each kind at
most once a source). truth.csv: copy_path, source_path, kind, relative to the corpus root.

Methods: imagededup's PHash (default ``max_distance_threshold=10``) over the whole corpus, and the
product's ``RUN/near_duplicates.parquet`` (group, path, sha256, distance; all pairs within a group);
without ``--run`` the tool runs on the corpus (bench/_work/near_duplicates/run-SEED, reused when its
run.json exists, unless ``--force``). A found pair is correct when both images have the same source (a
copy and its source, or two copies of one); precision under the strict rule (copy–source pairs only)
is printed too, and how many wrong pairs are two crops of one photo. Recall: planted copy–source pairs
found. Seconds: PHash hashing and search in one process; the product's neighbours stage / whole run.
Prints the command and a table for bench/RESULTS.md; writes results-SEED.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageEnhance
from scipy.fftpack import dct

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

WORK = HERE / "_work" / "near_duplicates"
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "hubble_deep_field",
          "immunohistochemistry", "logo", "retina")
KINDS = ("resize", "jpeg", "crop", "bright")
CROP_W, CROP_H, MAX_IOU = 160, 120, 0.3
Pair = frozenset[str]


def photos() -> dict[str, np.ndarray]:
    """The bundled colour photographs that load without a download, as RGB uint8 (alpha over white)."""
    from skimage import data

    out = {}
    for name in PHOTOS:
        try:
            img = data.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(data, name)()
        except Exception:  # needs a download, or absent from this scikit-image
            continue
        if img.shape[-1] == 4:
            img = np.asarray(Image.alpha_composite(Image.new("RGBA", img.shape[1::-1], "white"), Image.fromarray(img)))
        out[name] = img[..., :3]
    return out


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over union of two (left, top, width, height) boxes."""
    w = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return w * h / (a[2] * a[3] + b[2] * b[3] - w * h)


def plant_copy(img: Image.Image, kind: str, rng: np.random.Generator) -> tuple[Image.Image, int]:
    """One planted copy of ``img`` and the JPEG quality to save it at."""
    w, h = img.size
    if kind == "resize":
        f = rng.uniform(0.5, 0.8)
        return img.resize((round(w * f), round(h * f)), Image.LANCZOS), 90
    if kind == "jpeg":
        return img, int(rng.integers(30, 51))
    if kind == "crop":
        left, top, right, bottom = rng.uniform(0.03, 0.08, 4)
        return img.crop((round(w * left), round(h * top), round(w * (1 - right)), round(h * (1 - bottom)))), 90
    return ImageEnhance.Brightness(img).enhance(rng.uniform(0.75, 1.25)), 90


def make_corpus(seed: int, n_distinct: int, n_sources: int) -> Path:
    """The corpus for ``seed`` (see the module's docstring), made once and then reused."""
    root = WORK / f"corpus-{seed}"
    params = {"seed": seed, "n_distinct": n_distinct, "n_sources": n_sources, "generator": 3}
    if (root / "truth.csv").exists() and json.loads((root / "corpus.json").read_text()) == params:
        return root
    shutil.rmtree(root, ignore_errors=True)
    (root / "originals").mkdir(parents=True)
    (root / "copies").mkdir()
    rng = np.random.default_rng(seed)
    pics = photos()
    names = list(pics)
    boxes: dict[str, list[tuple[float, ...]]] = {n: [] for n in names}
    rows = []
    for i in range(n_distinct):
        name = names[i % len(names)]
        H, W = pics[name].shape[:2]
        best, best_overlap = None, 2.0
        for _ in range(1000):  # rejection sampling; the least overlapping candidate if none fits
            side = rng.uniform(0.25, 0.6) * min(H, W)
            w = min(W, side * CROP_W / CROP_H)
            h = w * CROP_H / CROP_W
            box = (rng.uniform(0, W - w), rng.uniform(0, H - h), w, h)
            overlap = max((iou(box, o) for o in boxes[name]), default=0.0)
            if overlap < best_overlap:
                best, best_overlap = box, overlap
            if overlap <= MAX_IOU:
                break
        boxes[name].append(best)
        x, y, w, h = best
        crop = Image.fromarray(pics[name]).resize((CROP_W, CROP_H), Image.LANCZOS, box=(x, y, x + w, y + h))
        path = f"originals/{i:05d}.jpg"
        crop.save(root / path, quality=90)
        rows.append({"path": path, "photo": name, "left": x, "top": y, "width": w, "height": h})
    pd.DataFrame(rows).round(1).to_csv(root / "originals.csv", index=False)
    planted = []  # (source, kind, copy, JPEG quality); named after a shuffle, so a name tells nothing
    for src in sorted(rng.choice(n_distinct, size=min(n_sources, n_distinct), replace=False)):
        with Image.open(root / f"originals/{src:05d}.jpg") as im:
            img = im.convert("RGB")
        for kind in map(str, rng.choice(KINDS, size=int(rng.integers(1, 4)), replace=False)):
            planted.append((f"originals/{src:05d}.jpg", kind, *plant_copy(img, kind, rng)))
    truth = []
    for number, (source, kind, out, quality) in zip(rng.permutation(len(planted)), planted):
        out.save(root / f"copies/{number:05d}.jpg", quality=quality)
        truth.append((f"copies/{number:05d}.jpg", source, kind))
    (root / "corpus.json").write_text(json.dumps(params))
    with open(root / "truth.csv", "w", newline="") as f:
        csv.writer(f).writerows([("copy_path", "source_path", "kind"), *sorted(truth)])
    return root


def imagededup_phash(root: Path) -> tuple[set[Pair], str, float]:
    """Pairs PHash calls duplicates at its default threshold, which implementation found them, and its seconds
    (hashing and search, imports excluded)."""
    try:
        import imagededup
        from imagededup.methods import PHash
    except Exception as e:  # imagededup imports torchvision at import time, for its CNN method
        t0 = time.perf_counter()
        pairs = phash_same_algorithm(root)
        return pairs, f"imagededup's PHash algorithm re-implemented here ({type(e).__name__}: {e})", time.perf_counter() - t0
    t0 = time.perf_counter()
    dups = PHash(verbose=False).find_duplicates(image_dir=str(root), recursive=True, max_distance_threshold=10,
                                                num_enc_workers=0, num_dist_workers=0)
    pairs = {frozenset((Path(a).as_posix(), Path(b).as_posix())) for a, found in dups.items() for b in found}
    return pairs, f"imagededup {imagededup.__version__}", time.perf_counter() - t0


def phash_same_algorithm(root: Path) -> set[Pair]:
    """imagededup's PHash step by step: RGB, Lanczos to 32×32, gray, 2-D DCT-II, top-left 8×8, bit = coefficient
    ≥ median of the 63 non-DC ones; duplicates are pairs at Hamming distance ≤ 10."""
    names, bits = [], []
    for p in sorted(f for f in root.rglob("*") if f.is_file() and not f.name.startswith(".")):
        try:
            img = Image.open(p)
            if img.format not in ("JPEG", "PNG", "BMP", "MPO", "PPM", "TIFF", "GIF", "WEBP"):
                continue  # imagededup's accepted formats
            if img.mode != "RGB":
                img = img.convert("RGBA").convert("RGB")
            a = np.array(img.resize((32, 32), Image.LANCZOS).convert("L")).astype("uint8")
        except Exception:  # not an image: imagededup skips it with a warning
            continue
        c = dct(dct(a, axis=0), axis=1)[:8, :8]
        bits.append(np.packbits(c >= np.median(c.flatten()[1:])).view(">u8")[0])
        names.append(p.relative_to(root).as_posix())
    h = np.array(bits, dtype=np.uint64)
    dist = np.bitwise_count(h[:, None] ^ h[None, :])
    i, j = np.nonzero(np.triu(dist <= 10, k=1))
    return {frozenset((names[a], names[b])) for a, b in zip(i, j)}


def product_pairs(run: Path) -> set[Pair] | None:
    path = run / "near_duplicates.parquet"
    if not path.exists():
        return None
    groups = pd.read_parquet(path, columns=["group", "path"]).groupby("group")["path"]
    return {frozenset(p) for _, members in groups for p in combinations(sorted(set(members)), 2)}


def score(found: set[Pair], truth: pd.DataFrame, photo: dict[str, str]) -> dict:
    source_of = dict(zip(truth["copy_path"], truth["source_path"]))
    planted = {frozenset(p) for p in zip(truth["copy_path"], truth["source_path"])}
    wrong = [(source_of.get(a, a), source_of.get(b, b)) for a, b in map(sorted, found)]
    wrong = [(a, b) for a, b in wrong if a != b]
    family_pairs = sum(len(g) * (len(g) + 1) // 2 for _, g in truth.groupby("source_path"))
    hit = [frozenset(p) in found for p in zip(truth["copy_path"], truth["source_path"])]
    by_kind = pd.Series(hit, dtype=float).groupby(truth["kind"].to_numpy()).mean().to_dict()
    return {
        "pairs": len(found),
        "wrong": len(wrong),
        "precision": 1 - len(wrong) / len(found) if found else float("nan"),
        "precision_copy_source": len(found & planted) / len(found) if found else float("nan"),
        "recall": float(np.mean(hit)),
        "recall_same_source_pairs": (len(found) - len(wrong)) / family_pairs,
        "wrong_same_photo": sum(photo.get(a) == photo.get(b) for a, b in wrong),
        "recall_by_kind": {k: by_kind.get(k, float("nan")) for k in KINDS},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-distinct", type=int, default=1000)
    ap.add_argument("--n-sources", type=int, default=200)
    ap.add_argument("--run", type=Path, help="a finished run of the tool on the corpus, to score as it is")
    ap.add_argument("--method", choices=("all", "phash", "product"), default="all")
    ap.add_argument("--force", action="store_true", help="run the tool again even if its run folder is finished")
    args = ap.parse_args()
    command = " ".join(["python", "bench/near_duplicates.py", *sys.argv[1:]])

    root = make_corpus(args.seed, args.n_distinct, args.n_sources)
    truth = pd.read_csv(root / "truth.csv")
    crops = pd.read_csv(root / "originals.csv")
    photo = dict(zip(crops["path"], crops["photo"]))
    n_images = sum(1 for _ in root.rglob("*.jpg"))
    print(f"corpus: {root} ({n_images} images, {len(truth)} planted copies of {truth['source_path'].nunique()} sources)")
    rows: list[dict] = []
    notes: list[str] = []
    if args.method in ("all", "phash"):
        pairs, impl, seconds = imagededup_phash(root)
        rows.append({"method": "imagededup PHash (≤ 10 bits)", "seconds": seconds, "run_seconds": seconds,
                     **score(pairs, truth, photo)})
        notes.append(f"PHash: {impl}; one process")
    if args.method in ("all", "product"):
        run, run_seconds = args.run, None
        if run is None:
            run = WORK / f"run-{args.seed}"
            done_at = (run / "run.json").stat().st_mtime if (run / "run.json").exists() else 0.0
            if args.force or done_at < (root / "truth.csv").stat().st_mtime:  # none yet, or of an older corpus
                cmd = [sys.executable, "-m", "imgclust.cli", "run", str(root), str(run), "--seed", str(args.seed),
                       "--no-progress", "--overwrite"]
                print("running:", " ".join(cmd[1:]), flush=True)
                t0 = time.perf_counter()
                done = subprocess.run(cmd, cwd=HERE.parent)
                run_seconds = time.perf_counter() - t0
                if done.returncode != 0:
                    notes.append(f"the tool's run failed (exit {done.returncode})")
        stages = json.loads((run / "run.json").read_text()).get("seconds", {}) if (run / "run.json").exists() else {}
        run_seconds = run_seconds or sum(stages.values()) or None
        pairs = product_pairs(run)
        if pairs is None:
            print(f"no {run / 'near_duplicates.parquet'}: the tool did not write near-duplicates; product row skipped")
            notes.append("product: no near_duplicates.parquet in the run")
        else:
            rows.append({"method": "imgclust near-duplicates", "seconds": stages.get("neighbours"),
                         "run_seconds": run_seconds, **score(pairs, truth, photo)})
            notes.append(f"product: {run}")

    print(f"\n    {command}\n")
    print("| method | pairs found | precision | precision (copy–source only) | wrong pairs (of them two crops of one photo) "
          "| recall | recall (all same-source pairs) | recall resize / jpeg / crop / bright | seconds (detector / whole run) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        kinds = " / ".join(f"{r['recall_by_kind'][k]:.3f}" for k in KINDS)
        secs = " / ".join("–" if t is None else f"{t:.1f}" for t in (r["seconds"], r["run_seconds"]))
        print(f"| {r['method']} | {r['pairs']} | {r['precision']:.3f} | {r['precision_copy_source']:.3f} | "
              f"{r['wrong']} ({r['wrong_same_photo']}) | {r['recall']:.3f} | "
              f"{r['recall_same_source_pairs']:.3f} | {kinds} | {secs} |")
    print("\nprecision: a pair is correct when both images have the same source; recall: planted copy–source pairs found")
    for note in notes:
        print(note)
    out = WORK / f"results-{args.seed}.json"
    out.write_text(json.dumps({"command": command, "corpus": str(root), "images": n_images,
                               "planted": len(truth), "rows": rows, "notes": notes}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
