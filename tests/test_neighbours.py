"""Neighbours of every image: outlier scores and near-duplicate groups of planted copies."""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image, ImageEnhance

from imgclust.codeindex import IndexSettings, Standardiser, build_index
from imgclust.io.arrays import create_array
from imgclust.io.tables import read_parts
from imgclust.near_duplicates import (
    content_bases,
    content_similarity,
    group_pairs,
    hamming,
    perceptual_hash,
    whole_signatures,
)
from imgclust.runstore import Location, RunStore
from imgclust.stages.neighbours import NeighbourSettings, knn_part, read_kth_distances, write_near_duplicates
from imgclust.stages.publish import outlier_scores


def blobs(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """(3, size, size) uint8: a smooth random colour pattern, different for every call."""
    coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    return np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC)).transpose(2, 0, 1).copy()


def copy_of(pixels: np.ndarray, kind: int) -> np.ndarray:
    """A resized, recompressed-like, cropped or brightened copy of (3, H, W) ``pixels``."""
    im = Image.fromarray(pixels.transpose(1, 2, 0))
    w, h = im.size
    if kind == 0:
        im = im.resize((w // 2, h // 2)).resize((w, h))
    elif kind == 1:
        im = ImageEnhance.Brightness(im).enhance(1.2)
    else:
        im = im.crop((3, 3, w - 3, h - 3)).resize((w, h))
    return np.asarray(im).transpose(2, 0, 1)


def test_hashes_agree_on_copies_and_differ_between_images():
    rng = np.random.default_rng(0)
    imgs = np.stack([blobs(rng) for _ in range(30)])
    h = perceptual_hash(imgs)
    for kind in range(3):
        copies = perceptual_hash(np.stack([copy_of(x, kind) for x in imgs]))
        assert np.median(hamming(h, copies)) <= 8  # of 64 bits; copies are confirmed at 10 or fewer
    others = hamming(h[:, None].repeat(30, 1), h[None, :].repeat(30, 0))[~np.eye(30, dtype=bool)]
    assert np.median(others) >= 20
    assert hamming(np.array([0], np.uint64), np.array([2**64 - 1], np.uint64))[0] == 64


def test_an_uneven_light_crop_correlates_with_its_source_and_other_pictures_do_not():
    rng = np.random.default_rng(2)
    sources = np.stack([blobs(rng, 128) for _ in range(20)])
    crops = []
    for x in sources:  # up to 8 % off each border, each border its own amount, then letterboxed
        left, top, right, bottom = (rng.uniform(0.0, 0.08, 4) * 128).round().astype(int)
        im = Image.fromarray(x.transpose(1, 2, 0)).crop((left, top, 128 - right, 128 - bottom))
        im = im.resize((im.width * 3 // 4, im.height * 3 // 4))
        canvas = np.zeros((128, 128, 3), np.uint8)
        canvas[:im.height, :im.width] = np.asarray(im)
        crops.append(canvas.transpose(2, 0, 1))
    bases = content_bases(np.concatenate([sources, np.stack(crops)]))
    n = len(sources)
    own = np.arange(n), np.arange(n) + n
    whole = whole_signatures(bases)
    assert np.median((whole[own[0]] * whole[own[1]]).sum(1)) < 0.96  # the whole images do not match
    found = content_similarity(bases, *own, enough=0.96)
    assert found.min() >= 0.96, found
    np.testing.assert_allclose(content_similarity(bases, own[1], own[0]), content_similarity(bases, *own), atol=1e-6)
    others = np.array([(i, n + j) for i in range(n) for j in range(n) if i != j]).T
    assert content_similarity(bases, *others).max() < 0.9


def test_near_duplicate_groups_are_stars_not_chains():
    assert group_pairs(np.array([5, 3, 9]), np.array([3, 1, 8])) == {5: 1, 3: 1, 1: 1, 9: 8, 8: 8}
    chain = np.arange(10)
    groups = group_pairs(chain[:-1], chain[1:])  # 0-1-2-...-9: each like the next, the ends unlike
    assert len(set(groups.values())) >= 3 and max(np.bincount(list(groups.values()))) <= 3


def test_planted_copies_are_grouped_and_look_alikes_are_not(tmp_path, client):
    rng = np.random.default_rng(1)
    n, dim = 600, 16
    pixels = np.stack([blobs(rng) for _ in range(n)])
    codes = rng.normal(0, 1, (n, dim)).astype(np.float32)
    sources = rng.choice(n, 60, replace=False)
    copies, lookalikes = sources[:30], sources[30:]
    planted = {}
    for j, (s, t) in enumerate(zip(copies[:15], copies[15:])):  # t becomes a copy of s
        pixels[t] = copy_of(pixels[s], j % 3)
        codes[t] = codes[s] + rng.normal(0, 0.02, dim)
        planted[int(t)] = int(s)
    for s, t in zip(lookalikes[:15], lookalikes[15:]):  # near by code, another picture
        codes[t] = codes[s] + rng.normal(0, 0.02, dim)
    store = RunStore(str(tmp_path / "run"))
    create_array(store.codes, codes.shape, 100, "float32")[:] = codes
    create_array(store.thumbs, pixels.shape, 100, "uint8")[:] = pixels
    paths = [f"img/{i:04d}.png" for i in range(n)]
    store.write_table("manifest", pd.DataFrame({"path": paths, "sha256": [f"{i:064x}" for i in range(n)],
                                                "index": np.arange(n)}))
    scale = Standardiser(np.zeros(dim), np.ones(dim))
    settings = NeighbourSettings(index=IndexSettings(list_rows=100, part_bytes=4000))
    index = build_index(store, scale, client, settings.index)
    parts = int(index.lists[:, 0].max()) + 1
    assert parts > 1
    pairs = pd.concat([knn_part(index.location, Location(store.thumbs), p, settings) for p in range(parts)])
    groups = write_near_duplicates(store, scale, pairs.sort_values(["a", "b"]).drop_duplicates(["a", "b"]))

    found = {tuple(sorted(g["index"].tolist())) for _, g in groups.groupby("group")}
    want = {tuple(sorted(p)) for p in planted.items()}
    assert found <= want, found - want  # no look-alike, no chance pair
    assert len(found) >= 14, want - found  # of 15 planted: a copy's hash may differ by more than 10 bits
    table = read_parts(store.near_duplicates)
    assert {"group", "path", "sha256", "distance"} <= set(table.columns)
    assert (table.groupby("group")["distance"].min() == 0).all()  # measured from the group's first image
    assert table["path"].str.startswith("img/").all()

    kth = read_kth_distances(store)
    assert kth is not None and sorted(kth["index"]) == list(range(n)) and (kth["kth_distance"] > 0).all()


def test_outlier_scores_are_relative_to_the_cluster():
    kth = np.array([1.0, 1.0, 1.0, 4.0, 10.0, 10.0, 10.0, np.nan])
    clusters = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    score, typical = outlier_scores(kth, clusters)
    np.testing.assert_allclose(score[:7], [1, 1, 1, 4, 1, 1, 1])
    assert np.isnan(score[7]) and typical == {0: 1.0, 1: 10.0}


def test_a_finished_run_has_outlier_scores_and_near_duplicates(finished_run):
    _, out, _, _ = finished_run
    store = RunStore(str(out))
    assignments = store.read_table("assignments")
    assert assignments["outlier"].notna().all()
    assert np.allclose(assignments.groupby("cluster")["outlier"].median(), 1.0, atol=0.35)
    table = read_parts(store.near_duplicates)
    assert set(table["path"]) <= set(assignments["path"])
