"""Nearest neighbours and re-clustering on a finished run, through the CLI as users call them."""

import json

import pandas as pd
from PIL import Image

from tests.test_cli import imgclust


def test_neighbors_of_an_image_in_the_run(finished_run):
    _, out, _, _ = finished_run
    manifest = pd.read_parquet(out / "manifest.parquet")
    query = manifest["path"].iloc[0]
    r = imgclust("neighbors", str(out), query, "-k", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [line.split(maxsplit=1) for line in r.stdout.strip().splitlines()]
    assert len(lines) == 4
    dists = [float(d) for d, _ in lines]
    assert dists == sorted(dists) and all(p in set(manifest["path"]) and p != query for _, p in lines)
    strip = out / "neighbors" / (query.rsplit("/", 1)[-1].rsplit(".", 1)[0] + ".png")
    with Image.open(strip) as im:
        assert im.width > 4 * im.height  # query + 4 neighbours side by side


def test_neighbors_of_an_outside_file_finds_its_copy(finished_run, tmp_path):
    root, out, _, _ = finished_run
    manifest = pd.read_parquet(out / "manifest.parquet")
    original = root / manifest["path"].iloc[3]
    outside = tmp_path / ("query" + original.suffix)
    outside.write_bytes(original.read_bytes())
    r = imgclust("neighbors", str(out), str(outside), "-k", "1", "--out", str(tmp_path / "strip.png"))
    assert r.returncode == 0, r.stderr[-2000:]
    dist, path = r.stdout.split()
    assert path == manifest["path"].iloc[3] and float(dist) < 1e-3
    assert (tmp_path / "strip.png").exists()


def test_neighbors_errors(finished_run, tmp_path):
    _, out, _, _ = finished_run
    r = imgclust("neighbors", str(out), str(tmp_path / "nope.png"))
    assert r.returncode == 2 and "image:" in r.stderr
    (tmp_path / "bad.jpg").write_text("not an image")
    r = imgclust("neighbors", str(out), str(tmp_path / "bad.jpg"))
    assert r.returncode == 2 and "not a recognised image format" in r.stderr


def test_recluster_one_cluster(finished_run):
    _, out, _, _ = finished_run
    parent = pd.read_parquet(out / "assignments.parquet")
    r = imgclust("recluster", str(out), "0", "-k", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    sub = pd.read_parquet(out / "recluster" / "cluster-0" / "assignments.parquet")
    assert sorted(sub["path"]) == sorted(parent.loc[parent["cluster"] == 0, "path"])
    assert set(sub["subcluster"]) == {0, 1}
    clusters = json.loads((out / "recluster" / "cluster-0" / "clusters.json").read_text())
    assert sum(c["size"] for c in clusters) == len(sub)
    page = (out / "report" / "recluster-0.html").read_text()
    assert 'id="subcluster-0"' in page and 'id="subcluster-1"' in page
    assert (out / "report" / "recluster-0-1.png").exists()
    assert 'href="recluster-0.html"' in (out / "report" / "index.html").read_text()
    r = imgclust("recluster", str(out), "17")
    assert r.returncode == 2 and "does not exist" in r.stderr
