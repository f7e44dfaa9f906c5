"""Ingest speed next to Pillow alone, same files, same run.

    OMP_WAIT_POLICY=PASSIVE python bench/ingest.py --n 10000

Runs the product's discover and ingest stages (``imgclust/stages/discover.py``, ``ingest.py``) on a
real local Dask cluster (2 worker processes, as a run starts) over the scale benchmark's JPEG corpus,
and measures the CPU seconds of all processes together (this client and scheduler, the workers)
during ingest. Then, in this one process, a plain loop over the same files: Pillow alone (open,
draft, convert, resize; ``scale.pillow_decode``). The ratio of images per CPU-second is the
target (≥ 0.80 of Pillow's rate). Last, the bare decoder the product's JPEG path uses (libjpeg-turbo
through simplejpeg, read + scaled decode, nothing else): how close the stage is to the floor.
Prefect's own task overhead is not in this figure (the stage
timings of ``bench/scale.py`` include it).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from scale import IMAGE_SIZE, WORK, image_files, make_corpus, pillow_decode  # noqa: E402


def tree_cpu() -> float:
    """CPU seconds used so far by this process and its live descendants."""
    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system + getattr(t, "children_user", 0) + getattr(t, "children_system", 0)
        except psutil.Error:
            pass
    return total


def decoder_loop(files: list[Path]) -> float | None:
    """CPU seconds of the bare decoder the product's JPEG path calls, in a plain loop: the floor."""
    try:
        import simplejpeg
    except ImportError:
        return None
    c0 = time.process_time()
    for f in files:
        simplejpeg.decode_jpeg(f.read_bytes(), colorspace="RGB", min_width=IMAGE_SIZE[1], min_height=IMAGE_SIZE[0])
    return time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10000, help="corpus size (made once under bench/_work/scale)")
    ap.add_argument("--rounds", type=int, default=2, help="ingest runs; the best is reported")
    args = ap.parse_args()

    from imgclust.dask_cluster import dask_client
    from imgclust.runstore import Location, RunStore
    from imgclust.stages.discover import discover
    from imgclust.stages.ingest import PixelSpec, ingest

    corpus = make_corpus(args.n)
    out = WORK / f"ingest-{args.n}"
    shutil.rmtree(out, ignore_errors=True)
    best: tuple[float, float] | None = None
    with dask_client(n_workers=2) as client:
        discover(Location(str(corpus)), RunStore(str(out)), client)
        for _ in range(args.rounds):
            shutil.rmtree(out / "images.zarr", ignore_errors=True)
            shutil.rmtree(out / "_work" / "resume" / "ingest", ignore_errors=True)
            c0, w0 = tree_cpu(), time.perf_counter()
            got = ingest(Location(str(corpus)), RunStore(str(out)), PixelSpec(IMAGE_SIZE, False, "crop"), 1024, client)
            cpu, wall = tree_cpu() - c0, time.perf_counter() - w0
            assert got.n_accepted == args.n, got
            if best is None or cpu < best[0]:
                best = (cpu, wall)
    files = image_files(corpus)
    c0 = time.process_time()
    for f in files:
        pillow_decode(f)
    pillow_cpu = time.process_time() - c0
    decoder_cpu = decoder_loop(files)
    cpu, wall = best
    product, pillow = args.n / cpu, len(files) / pillow_cpu
    print(f"{args.n} JPEG files 256x256 -> {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} RGB")
    print(f"product ingest: {wall:.1f} s wall, {cpu:.1f} CPU-s, {product:.0f} img/CPU-s")
    print(f"Pillow alone:   {pillow_cpu:.1f} CPU-s, {pillow:.0f} img/CPU-s")
    print(f"ratio product/Pillow: {product / pillow:.2f} (target >= 0.80)")
    if decoder_cpu is not None:
        decoder = len(files) / decoder_cpu
        print(f"libjpeg-turbo alone (simplejpeg, read + scaled decode): {decoder_cpu:.1f} CPU-s, {decoder:.0f} img/CPU-s;"
              f" product/decoder {product / decoder:.2f}")


if __name__ == "__main__":
    main()
