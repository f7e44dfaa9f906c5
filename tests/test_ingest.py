import numpy as np
import pytest

from imgclust.io.arrays import open_array
from imgclust.runstore import Location, RunStore
from imgclust.stages.discover import discover
from imgclust.stages.ingest import PixelSpec, ingest


def test_ingest_accounts_for_every_file(corpus, client, tmp_path):
    root, counts = corpus
    out = str(tmp_path)
    discover(Location(str(root)), RunStore(out), client)
    ing = ingest(Location(str(root)), RunStore(out), PixelSpec((20, 20), False, "crop"), 16, client)
    manifest = RunStore(out).read_table("manifest")
    rejected = RunStore(out).read_table("rejected")
    dups = RunStore(out).read_table("duplicates")
    assert ing.n_accepted == counts["accepted"] == len(manifest)
    assert len(rejected) == counts["rejected"]
    assert len(manifest) + len(rejected) + len(dups) == counts["found"]
    all_paths = set(manifest["path"]) | set(rejected["path"]) | set(dups["path"])
    assert len(all_paths) == counts["found"]
    assert manifest["index"].tolist() == list(range(len(manifest)))
    assert set(manifest.columns) == {"index", "path", "sha256", "width", "height", "format", "stamp", "generation"}
    reasons = dict(zip(rejected["path"], rejected["reason"]))
    assert reasons["broken/deeper/empty.png"] == "empty file (0 bytes)"
    assert reasons["broken/deeper/notes.jpg"] == "not a recognised image format"
    assert "too large to decode: 100000x100000 pixels" in reasons["broken/deeper/huge.png"]
    assert "above the limit of 89.5" in reasons["broken/deeper/warn-range.png"]
    assert "truncated" in reasons["broken/deeper/truncated.jpg"]
    images = open_array(f"{out}/images.zarr")
    assert images.shape == (counts["accepted"], 3, 20, 20) and images.dtype == np.uint8
    assert images.chunks[0] == 16
    # Rows follow the manifest: every stored image has content (digits are never all black).
    px = images[:]
    assert (px.reshape(len(px), -1).max(axis=1) > 0).all()
    assert set(manifest["format"]) >= {"PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF"}


def test_without_rejects_the_staging_array_is_moved_into_place(tmp_path, client):
    """The common case writes every pixel once: no compaction copy, and rows still follow the manifest."""
    from PIL import Image

    from imgclust.io.storage import exists

    src = tmp_path / "src"
    src.mkdir()
    for i in range(37):
        Image.fromarray(np.full((12, 12), 7 * i, np.uint8), "L").save(src / f"{i:02d}.png")
    out = str(tmp_path / "out")
    discover(Location(str(src)), RunStore(out), client)
    ing = ingest(Location(str(src)), RunStore(out), PixelSpec((8, 8), True, "crop"), 16, client)
    manifest = RunStore(out).read_table("manifest")
    images = open_array(f"{out}/images.zarr")
    assert ing.n_accepted == 37 and images.shape == (37, 1, 8, 8) and images.chunks[0] == 16
    assert not exists(f"{out}/_work/staging.zarr")
    assert images.attrs["color"] == "gray" and images.attrs["ingest_key"] == ing.key
    expected = np.array([7 * int(p[:2]) for p in manifest["path"]])
    assert (images[:].reshape(37, -1) == expected[:, None]).all()


def test_the_decode_limit_reaches_the_workers_and_is_recorded(tmp_path, client):
    """``--max-megapixels`` is a setting of the run: workers reject above it, ``assign`` reads it back."""
    from PIL import Image

    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        Image.fromarray(np.full((12, 12), 9 * i + 1, np.uint8), "L").save(src / f"{i}.png")
    Image.fromarray(np.full((40, 40), 200, np.uint8), "L").save(src / "big.png")  # 1,600 pixels
    out = str(tmp_path / "out")
    discover(Location(str(src)), RunStore(out), client)
    spec = PixelSpec((8, 8), True, "crop", max_megapixels=0.001)
    ingest(Location(str(src)), RunStore(out), spec, 16, client)
    rejected = RunStore(out).read_table("rejected")
    assert rejected["path"].tolist() == ["big.png"]
    assert "40x40 pixels is 0.0 megapixels, above the limit of 0.001" in rejected["reason"].iloc[0]
    assert PixelSpec.of_images(dict(open_array(f"{out}/images.zarr").attrs)) == spec


def big_jpeg(width: int = 4000, height: int = 3000) -> bytes:
    """A 12-megapixel photo-like JPEG of about 10 MB."""
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) * 127 / (width + height)], -1)
    buf = io.BytesIO()
    Image.fromarray(np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)).save(buf, "JPEG",
                                                                                              quality=95)
    return buf.getvalue()


@pytest.mark.slow
def test_a_shard_of_large_photos_runs_within_a_workers_memory_limit(tmp_path):
    """40 photos of 10 MB in one shard (430 MB) on a worker limited to 600 MB: read a group of an
    eighth of the limit at a time, discover and ingest peak under three quarters of the limit, and
    the worker is never killed (reading the shard whole gets it killed and restarted)."""
    from distributed import Client, LocalCluster

    data = big_jpeg()
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):  # distinct files: bytes after the end marker change the hash, not the pixels
        (src / f"{i:02d}.jpg").write_bytes(data + i.to_bytes(4, "big"))
    assert 40 * len(data) > 400e6
    with LocalCluster(n_workers=1, threads_per_worker=1, memory_limit="600MB", dashboard_address=None,
                      host="127.0.0.1") as cluster, Client(cluster, set_as_default=False) as client:
        workers = set(client.scheduler_info()["workers"])
        client.run(_watch_rss)
        out = RunStore(str(tmp_path / "out"))
        discover(Location(str(src)), out, client)
        ing = ingest(Location(str(src)), out, PixelSpec((32, 32), False), 64, client)
        assert ing.n_accepted == 40 and ing.n_rejected == 0
        assert set(client.scheduler_info()["workers"]) == workers  # the same worker: never killed
        peak_mb = max(client.run(_peak_rss_mb).values())
        assert peak_mb < 0.75 * 600e6 / 2**20, peak_mb


def _watch_rss(dask_worker) -> None:
    """On a worker: sample its resident memory every 5 ms (the nanny samples far less often)."""
    import threading
    import time

    import psutil

    worker, proc = dask_worker, psutil.Process()
    worker.rss_peak = proc.memory_info().rss

    def sample() -> None:
        while True:
            worker.rss_peak = max(worker.rss_peak, proc.memory_info().rss)
            time.sleep(0.005)

    threading.Thread(target=sample, daemon=True).start()


def _peak_rss_mb(dask_worker) -> float:
    return dask_worker.rss_peak / 2**20
