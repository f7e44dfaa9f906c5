"""Stage 2: decode every unique file in parallel into a chunked uint8 Zarr array."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from distributed import Client

from imgclust.dask_cluster import completed
from imgclust.io.arrays import aligned_spans, chunk_spans, create_array, open_array, open_if_exists
from imgclust.io.imagefile import DEFAULT_MAX_MEGAPIXELS, DecodedImage, ImageRejected, decode_image
from imgclust.io.listing import source_path
from imgclust.io.storage import (
    exists,
    move_tree,
    read_file_groups,
    read_parquet,
    read_parquet_folder,
    remove,
    unreadable_reason,
    write_parquet,
)
from imgclust.io.tables import part_files, write_part
from imgclust.progress import track
from imgclust.runstore import Location, RunStore
from imgclust.stages.discover import UNREADABLE, Discovery, unique_parts
from imgclust.state.resume import ShardLedger, fingerprint

logger = logging.getLogger("imgclust")
STAGING = "staging.zarr"  # under _work/: decoded shards before compaction


@dataclass(frozen=True)
class PixelSpec:
    """How files become pixels: target (height, width), grayscale or RGB, crop or pad, the largest
    decode accepted (megapixels held in memory), and the side of the thumbnails decoded with them
    for people to look at (0: none)."""

    size: tuple[int, int]
    gray: bool
    fit: str = "crop"
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS
    thumbnail: int = 0

    @property
    def channels(self) -> int:
        return 1 if self.gray else 3

    @property
    def max_pixels(self) -> int:
        return int(self.max_megapixels * 1e6)

    def decode(self, data: bytes) -> DecodedImage:
        """``data`` decoded as this spec says; raises ``ImageRejected`` with the reason."""
        return decode_image(data, self.size, self.gray, self.fit, self.max_pixels, self.thumbnail)

    def attributes(self) -> dict[str, Any]:
        """What images.zarr records of it (``assign`` decodes new files the same way)."""
        return {"color": "gray" if self.gray else "rgb", "height": self.size[0], "width": self.size[1],
                "fit": self.fit, "max_megapixels": self.max_megapixels, "thumbnail": self.thumbnail}

    @classmethod
    def of_images(cls, attrs: dict[str, Any]) -> PixelSpec:
        return cls((int(attrs["height"]), int(attrs["width"])), attrs["color"] == "gray", attrs.get("fit", "crop"),
                   float(attrs.get("max_megapixels", DEFAULT_MAX_MEGAPIXELS)), int(attrs.get("thumbnail", 0)))

    def create(self, images: Location, n: int, chunk_rows: int, attributes: dict[str, Any] | None = None) -> None:
        """Empty arrays for ``n`` images at ``images`` and, with thumbnails, at ``thumbs_of(images)``."""
        create_array(images.url, (n, self.channels, *self.size), chunk_rows, "uint8", images.storage_options, attributes)
        if self.thumbnail:
            t = thumbs_of(images)
            create_array(t.url, (n, self.channels, self.thumbnail, self.thumbnail), chunk_rows, "uint8",
                         t.storage_options, read_rows=1)


MIN_THUMBNAIL = 32


def thumbnail_side(requested: int, side_p90: int | None) -> int:
    """Side of the run's thumbnails: ``requested`` (``--thumbnail-size``; 0 for none), made smaller
    when nine images in ten are smaller than it (28-pixel digits get 32-pixel thumbnails, not
    upscaled 128-pixel ones): the 90th percentile of the images' largest side, rounded up to a
    multiple of 8, at least ``MIN_THUMBNAIL``."""
    if not requested or side_p90 is None:
        return requested
    return min(requested, max(MIN_THUMBNAIL, -(-side_p90 // 8) * 8))


def thumbs_of(images: Location) -> Location:
    """Where the thumbnails that go with an images array are: beside it, ``images.zarr`` ->
    ``thumbs.zarr`` and ``x.zarr`` -> ``x-thumbs.zarr``."""
    url = images.url.rstrip("/")
    if url.endswith("/images.zarr"):
        return Location(url[: -len("images.zarr")] + "thumbs.zarr", images.storage_options)
    return Location(url.removesuffix(".zarr") + "-thumbs.zarr", images.storage_options)


@dataclass(frozen=True)
class Ingest:
    n_accepted: int
    n_rejected: int
    channels: int
    key: str  # content + settings of this ingest: later stages key their resume records on it
    shards_resumed: int = 0


Meta = tuple[bool, int, int, str, str]  # ok, width, height, format, reason


def too_few_images(found: Discovery, ing: Ingest, store: RunStore) -> str:
    """Why a corpus has too few images to cluster, in terms of what happened to its files."""
    why = []
    if found.n_duplicates:
        why.append(f"{found.n_duplicates} were exact duplicates (see {store.duplicates})")
    if ing.n_rejected:
        why.append(f"{ing.n_rejected} could not be decoded (see {store.rejected})")
    detail = "; ".join(why) or "no other file was found"
    return (f"only {ing.n_accepted} distinct image{'s' if ing.n_accepted != 1 else ''} of {found.n_found} files "
            f"could be used: {detail}")


def decode_shard(source: Location, paths: list[str], staging: Location, start: int, pixels: PixelSpec,
                 ledger: ShardLedger | None = None) -> list[Meta]:
    """Decode one shard and write it as one block at ``start``; (ok, width, height, format, reason)
    per file. Runs on a worker; reads a bounded group of bytes at a time, whatever the shard holds."""
    block = np.zeros((len(paths), pixels.channels, *pixels.size), dtype=np.uint8)
    thumbs = np.zeros((len(paths), pixels.channels, pixels.thumbnail, pixels.thumbnail), np.uint8)
    fs, root = source.fs()
    full = [f"{root.rstrip('/')}/{source_path(p)}" for p in paths]
    meta: list[Meta] = []
    i = 0
    for group in read_file_groups(fs, full):
        for _, data in group:
            if isinstance(data, BaseException) or data is None:
                meta.append((False, 0, 0, "", unreadable_reason(data)))
            else:
                try:
                    img = pixels.decode(data)
                    block[i] = img.pixels
                    if img.thumbnail is not None:
                        thumbs[i] = img.thumbnail
                    meta.append((True, img.width, img.height, img.format, ""))
                except ImageRejected as exc:
                    meta.append((False, 0, 0, "", str(exc)))
            i += 1
        del group
    if ledger is not None:
        ledger.check_fence()
    if pixels.thumbnail:
        t = thumbs_of(staging)
        open_array(t.url, t.storage_options, mode="r+")[start:start + len(paths)] = thumbs
    open_array(staging.url, staging.storage_options, mode="r+")[start:start + len(paths)] = block
    return meta


@dataclass(frozen=True)
class ShardFiles:
    """The files of one shard of a run's ingest: slices ``(part URL, first row, stop row)`` of
    discover's unique parts, read by the worker (the flow process never holds them)."""

    slices: tuple[tuple[str, int, int], ...]
    storage_options: dict[str, Any]

    def rows(self) -> pd.DataFrame:
        """(path, sha256, stamp) of the shard's files, in order."""
        frames = [read_parquet(url, self.storage_options)[["path", "sha256", "stamp"]].iloc[a:b] for url, a, b in self.slices]
        return pd.concat(frames, ignore_index=True)


def shard_files(parts: list[tuple[str, int]], shard_size: int, storage_options: dict[str, Any]) -> list[ShardFiles]:
    """Every shard of ``shard_size`` rows over the parts (URL, rows), as slices of them."""
    shards: list[ShardFiles] = []
    current: list[tuple[str, int, int]] = []
    room = shard_size
    for url, rows in parts:
        a = 0
        while a < rows:
            take = min(room, rows - a)
            current.append((url, a, a + take))
            a, room = a + take, room - take
            if room == 0:
                shards.append(ShardFiles(tuple(current), storage_options))
                current, room = [], shard_size
    if current:
        shards.append(ShardFiles(tuple(current), storage_options))
    return shards


def decoded_part(store: RunStore, start: int) -> str:
    """What a decoded shard's files became: (path, sha256, stamp, ok, width, height, format, reason)."""
    return store.resume("decoded-shards", f"{start:012d}.parquet")


def ingest_shard(source: Location, files: ShardFiles, staging: Location, start: int, pixels: PixelSpec,
                 store: RunStore, ledger: ShardLedger) -> int:
    """Decode one shard of the run (on a worker): its block in the staging array, then its files'
    outcome as a Parquet part, then its ledger record (so a recorded shard is a written one); how
    many files were accepted."""
    rows = files.rows()
    meta = decode_shard(source, rows["path"].tolist(), staging, start, pixels, ledger)
    info = pd.DataFrame(meta, columns=["ok", "width", "height", "format", "reason"])
    write_parquet(decoded_part(store, start), pd.concat([rows, info], axis=1), store.storage_options)
    n_ok = int(info["ok"].sum())
    ledger.mark(start, {"files": len(rows), "accepted": n_ok})
    return n_ok


def write_shard_tables(store: RunStore, start: int, index_start: int, part: int, fence: ShardLedger) -> int:
    """The manifest rows (indices from ``index_start``) and rejected rows of one decoded shard, as
    parts ``part`` of both tables; on a worker. How many were accepted."""
    decoded = read_parquet(decoded_part(store, start), store.storage_options)
    manifest, rejected = manifest_rows(decoded, decoded, index_start)
    fence.check_fence()
    so = store.storage_options
    write_part(store.table("manifest"), manifest, 0, part, so)
    write_part(store.table("rejected"), rejected[["path", "reason", "sha256", "stamp"]], 0, part, so)
    return len(manifest)


def compact_chunk(staging: Location, images: Location, source_rows: np.ndarray, start: int) -> int:
    """Copy accepted rows of the staging array into one chunk of the final array (on a worker), and
    of their thumbnails when the staging array has them."""
    lo, hi = int(source_rows.min()), int(source_rows.max()) + 1
    pairs = [(staging, images)]
    if open_if_exists(thumbs_of(staging).url, staging.storage_options) is not None:
        pairs.insert(0, (thumbs_of(staging), thumbs_of(images)))
    for src, dst in pairs:  # the images last: a written images chunk means its thumbnails are written
        block = open_array(src.url, src.storage_options)[lo:hi][source_rows - lo]
        open_array(dst.url, dst.storage_options, mode="r+")[start:start + len(source_rows)] = block
    return len(source_rows)


def decode_into_staging(source: Location, paths: list[str], staging: Location, pixels: PixelSpec, shard_size: int,
                        client: Client) -> pd.DataFrame:
    """Decode ``paths`` (new files of ``assign``) in parallel, one task per shard; (ok, width,
    height, format, reason) per path."""
    pixels.create(staging, len(paths), shard_size)
    futures = {client.submit(decode_shard, source, paths[a:b], staging, a, pixels, pure=False): a
               for a, b in chunk_spans(len(paths), shard_size)}
    meta: dict[int, list[Meta]] = {}
    for fut in track(completed(client, futures), total=len(futures), desc="ingest", unit="shard"):
        meta[futures[fut]] = fut.result()
    rows = [m for a in sorted(meta) for m in meta[a]]
    return pd.DataFrame(rows, columns=["ok", "width", "height", "format", "reason"])


def compact_into(staging: Location, images: Location, accepted_rows: np.ndarray, start: int, client: Client) -> None:
    """Copy accepted staging rows to ``images[start:]``, one task per destination chunk."""
    step = open_array(images.url, images.storage_options).chunks[0]
    futs = [client.submit(compact_chunk, staging, images, accepted_rows[a - start:b - start], a, pure=False)
            for a, b in aligned_spans(start, start + len(accepted_rows), step)]
    client.gather(futs)


def manifest_rows(unique: pd.DataFrame, info: pd.DataFrame, start: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Manifest rows (indices from ``start``) and rejected rows of one decoded batch."""
    ok = info["ok"].to_numpy(bool)
    manifest = pd.DataFrame({
        "index": np.arange(start, start + int(ok.sum()), dtype=np.int64),
        "path": unique["path"].to_numpy()[ok],
        "sha256": unique["sha256"].to_numpy()[ok],
        "width": info.loc[ok, "width"].to_numpy(np.int64),
        "height": info.loc[ok, "height"].to_numpy(np.int64),
        "format": info.loc[ok, "format"].to_numpy(),
    })
    rejected = pd.DataFrame({"path": unique["path"].to_numpy()[~ok], "reason": info.loc[~ok, "reason"].to_numpy(),
                             "sha256": unique["sha256"].to_numpy()[~ok]})
    if "stamp" in unique.columns:
        manifest["stamp"] = unique["stamp"].to_numpy()[ok]
        rejected["stamp"] = unique["stamp"].to_numpy()[~ok]
    return manifest, rejected


def ingest_key(parts: list[tuple[str, int]], pixels: PixelSpec, shard_size: int,
               storage_options: dict[str, Any] | None = None) -> str:
    """Identity of an ingest: every (path, content) pair, read one unique part at a time, plus the
    settings that shape the pixels."""
    digest = hashlib.sha256()  # of "path\tsha256" lines joined by newlines, fed row by row
    first = True
    for url, _ in parts:
        part = read_parquet(url, storage_options)
        for path, sha in zip(part["path"], part["sha256"]):
            digest.update((f"{path}\t{sha}" if first else f"\n{path}\t{sha}").encode())
            first = False
    return fingerprint("ingest", digest.hexdigest(), list(pixels.size), pixels.gray, pixels.fit,
                       pixels.max_megapixels, shard_size, *([pixels.thumbnail] if pixels.thumbnail else []))


def finished_ingest(store: RunStore, key: str) -> Ingest | None:
    """The recorded result when this exact ingest already completed (its key is stamped last)."""
    so = store.storage_options
    images = open_if_exists(store.images, so)
    if images is None:
        return None
    if images.attrs.get("ingest_key") != key or not part_files(store.table("rejected"), so):
        return None
    n_rejected = len(store.read_table("rejected"))
    return Ingest(images.shape[0], n_rejected, images.shape[1], key)


def ingest(source: Location, store: RunStore, pixels: PixelSpec, shard_size: int, client: Client) -> Ingest:
    """Write ``images.zarr``, ``manifest.parquet`` and ``rejected.parquet`` from discover's parts.

    Each worker reads its shard's files from discover's unique parts, decodes them into a staging
    array and records their outcome as a part; the workers then write the tables' parts, so the
    flow process holds counts per shard and the accepted rows' positions (8 bytes an image), never
    a row per file. When files were rejected (they leave holes), the staging array is compacted so
    that ``manifest.index`` is a dense 0..N-1 index into ``images.zarr``; when none were, it is
    moved into place, which writes every pixel once. Finished shards are recorded, so a killed run
    decodes only the rest; a finished ingest is not redone at all.
    """
    so = store.storage_options
    parts = unique_parts(store)
    key = ingest_key(parts, pixels, shard_size, so)
    done = finished_ingest(store, key)
    if done is not None:
        logger.info("ingest: already done for these files and settings; reusing images.zarr")
        return done
    staging = Location(store.work(STAGING), so)
    images = Location(store.images, so)
    ledger = ShardLedger(store, "ingest", key)
    ledger.clear_others()
    shards = shard_files(parts, shard_size, so)
    n = sum(rows for _, rows in parts)
    recorded = {a: r for a, r in ledger.done_rows().items()
                if isinstance(r, dict) and exists(decoded_part(store, a), so)}
    if not recorded:
        remove(store.resume("decoded-shards"), so)
        pixels.create(staging, n, shard_size)
    else:
        logger.info("ingest: resuming, %d of %d shards already decoded", len(recorded), len(shards))
    accepted = {a: int(r["accepted"]) for a, r in recorded.items()}
    futures = {client.submit(ingest_shard, source, files, staging, i * shard_size, pixels, store, ledger,
                             pure=False): i * shard_size
               for i, files in enumerate(shards) if i * shard_size not in accepted}
    for fut in track(completed(client, futures), total=len(futures), desc="ingest", unit="shard"):
        accepted[futures[fut]] = fut.result()
    starts = [i * shard_size for i in range(len(shards))]
    n_accepted = sum(accepted[a] for a in starts)
    if n_accepted == n:  # nothing rejected: the staging array is already the final one
        ledger.clear()  # first: a crash while moving must not leave shards recorded in a moved array
        if pixels.thumbnail:
            move_tree(thumbs_of(staging).url, thumbs_of(images).url, so)
        move_tree(staging.url, images.url, so)
        open_array(images.url, so, mode="r+").update_attributes(pixels.attributes())
    else:
        accepted_rows = np.concatenate([np.flatnonzero(read_parquet(decoded_part(store, a), so)["ok"].to_numpy(bool)) + a
                                        for a in starts]) if starts else np.zeros(0, np.int64)
        pixels.create(images, n_accepted, shard_size, pixels.attributes())
        compact_into(staging, images, accepted_rows, 0, client)
        del accepted_rows
    for name in ("manifest", "rejected"):
        remove(store.table(name), so)  # the run's ingest writes generation 0 whole
    offsets = np.concatenate([[0], np.cumsum([accepted[a] for a in starts])]).astype(int)
    client.gather([client.submit(write_shard_tables, store, a, int(offsets[i]), i, ledger, pure=False)
                   for i, a in enumerate(starts)])
    n_rejected = n - n_accepted
    unreadable = read_parquet_folder(store.work(UNREADABLE), so, ["path", "reason", "stamp"]).assign(sha256=None)
    store_part = len(starts)
    write_part(store.table("rejected"), unreadable[["path", "reason", "sha256", "stamp"]], 0, store_part, so)
    n_rejected += len(unreadable)
    open_array(images.url, so, mode="r+").attrs["ingest_key"] = key  # last: marks it finished
    remove(staging.url, so)
    remove(thumbs_of(staging).url, so)
    remove(store.resume("decoded-shards"), so)
    ledger.clear()
    logger.info("ingest: %d images accepted, %d rejected", n_accepted, n_rejected)
    shown = 0
    for _, url in part_files(store.table("rejected"), so) if n_rejected else []:  # the first 20, not the whole table
        for path, reason in read_parquet(url, so)[["path", "reason"]].itertuples(index=False):
            if shown < 20:
                logger.warning("rejected %s: %s", path, reason)
            shown += 1
        if shown >= 20:
            break
    return Ingest(n_accepted, n_rejected, pixels.channels, key, len(recorded))
