"""imgclust serve over a real finished run: the members layout, thumbnails, every page and API
answer, curation, the token, and clear answers to bad requests (FastAPI's TestClient, in process)."""

from __future__ import annotations

import io
import re
import shutil
import threading

import numpy as np
import pytest
from PIL import Image

from imgclust.curation import UNASSIGNED, Curation, CurationError, add_edit
from imgclust.io.arrays import open_array
from imgclust.members import MemberLayout
from imgclust.runstore import RunStore
from imgclust.serve.app import PER_PAGE, create_app
from imgclust.serve.catalog import RunCatalog
from imgclust.stages.ingest import PixelSpec


@pytest.fixture
def run(finished_run, tmp_path):
    """A copy of the shared finished run (curation writes into it)."""
    root, out, _, _ = finished_run
    shutil.copytree(out, tmp_path / "run")
    return root, RunStore(str(tmp_path / "run"))


@pytest.fixture
def client(run):
    from fastapi.testclient import TestClient

    return TestClient(create_app(RunCatalog(run[1])))


def test_the_members_layout_holds_every_image_once_in_order_of_distance(run):
    _, store = run
    assignments = store.read_table("assignments")
    manifest = store.read_table("manifest")
    layout = MemberLayout.open(store)
    rows = layout.read(0, layout.rows)
    assert sorted(rows["path"]) == sorted(assignments["path"]) and layout.rows == len(assignments)
    for c, (first, size) in layout.clusters.items():
        part = rows.iloc[first:first + size]
        assert (part["cluster"] == c).all() and part["distance"].is_monotonic_increasing
    index_of = dict(zip(manifest["path"], manifest["index"]))
    assert (rows["index"] == rows["path"].map(index_of)).all()
    pick = np.array([7, 0, 3])
    got = layout.rows_of(rows["index"].to_numpy()[pick])
    assert got["path"].tolist() == rows["path"].iloc[pick].tolist()
    assert layout.members(0, 2, 4)["path"].tolist() == rows["path"].iloc[2:4].tolist()


def test_thumbnails_are_written_once_at_ingest_beside_the_images(run):
    _, store = run
    images, thumbs = open_array(store.images), open_array(store.thumbs)
    # the corpus's images are 28 pixels: thumbnails at 32, not upscaled to --thumbnail-size's 128
    assert thumbs.shape == (images.shape[0], images.shape[1], 32, 32)
    assert thumbs.chunks[0] == 1  # one thumbnail is read and decoded alone
    root, _ = run
    manifest = store.read_table("manifest").sort_values("index")
    spec = PixelSpec.of_images(dict(images.attrs))
    for row in (manifest.iloc[0], manifest.iloc[-1]):
        decoded = spec.decode((root / row["path"]).read_bytes())
        assert np.array_equal(thumbs[int(row["index"])], decoded.thumbnail)
        assert np.array_equal(images[int(row["index"])], decoded.pixels)


def test_overview_lists_every_cluster_with_its_size_and_sorts(client, run):
    clusters = client.get("/api/clusters").json()
    assert sum(c["size"] for c in clusters) == len(run[1].read_table("assignments"))
    page = client.get("/").text
    for c in clusters:
        assert f'href="/cluster/{c["id"]}"' in page
    by_size = [int(x) for x in re.findall(r'<tr data-cluster="(-?\d+)"', client.get("/?sort=size").text)]
    sizes = {c["id"]: c["size"] for c in clusters}
    assert [sizes[c] for c in by_size] == sorted(sizes.values(), reverse=True)
    assert client.get("/?sort=colour").status_code == 400


def test_paging_reaches_the_last_member_and_past_the_end_is_a_clear_404(client, run):
    _, store = run
    layout = MemberLayout.open(store)
    largest = max(layout.clusters, key=lambda c: layout.clusters[c][1])
    first, size = layout.clusters[largest]
    pages = -(-size // PER_PAGE)
    last = client.get(f"/cluster/{largest}?page={pages}")
    assert last.status_code == 200
    expected_last = layout.read(first + size - 1, first + size)["path"].iloc[0]
    paths = re.findall(r'data-path="([^"]+)"', last.text)
    assert paths[-1] == expected_last
    members = client.get(f"/api/cluster/{largest}/members", params={"start": size - 1, "count": 5}).json()
    assert [m["path"] for m in members["members"]] == [expected_last]
    past = client.get(f"/cluster/{largest}?page={pages + 1}")
    assert past.status_code == 404 and f"there is no page {pages + 1}" in past.text
    assert "Traceback" not in past.text


@pytest.mark.parametrize(("url", "status", "words"), [
    ("/cluster/999", 404, "there is no cluster 999"),
    ("/cluster/abc", 400, "valid integer"),
    ("/image/99999", 404, "there is no image 99999"),
    ("/thumb/-1", 404, "there is no image -1"),
    ("/api/similar/99999", 404, "there is no image 99999"),
    ("/api/cluster/0/members?count=0", 400, "count is 1 to 1000"),
    ("/no/such/page", 404, "there is no page /no/such/page"),
])
def test_bad_requests_get_a_clear_answer(client, url, status, words):
    r = client.get(url)
    assert r.status_code == status and words in r.text and "Traceback" not in r.text


def test_similar_images_of_a_run_image_and_of_an_upload(client, run):
    root, store = run
    manifest = store.read_table("manifest")
    path, index = manifest["path"].iloc[3], int(manifest["index"].iloc[3])
    near = client.get(f"/api/similar/{index}", params={"k": 5}).json()
    assert len(near) == 5 and index not in [n["index"] for n in near]
    assert [n["similarity_distance"] for n in near] == sorted(n["similarity_distance"] for n in near)
    data = (root / path).read_bytes()
    page = client.post("/similar", files={"file": ("copy.png", data, "image/png")})
    assert page.status_code == 200
    first = re.findall(r'data-index="(\d+)"', page.text)[0]
    assert int(first) == index  # the run's own copy of the upload comes first
    bad = client.post("/similar", files={"file": ("notes.png", b"not an image at all", "image/png")})
    assert bad.status_code == 400 and "not an image this run can read" in bad.text
    assert client.get(f"/image/{index}").status_code == 200
    png = client.get(f"/thumb/{index}")
    assert png.headers["content-type"] == "image/png" and Image.open(io.BytesIO(png.content)).size == (32, 32)


def test_the_map_places_a_sample_coloured_by_cluster(client, run):
    m = client.get("/api/map").json()
    n = len(run[1].read_table("assignments"))
    assert len(m["x"]) == len(m["y"]) == len(m["index"]) == len(m["cluster"]) == min(3000, n)
    assert np.std(m["x"]) > 0 and client.get("/map").status_code == 200


def test_curation_renames_merges_moves_and_rejects_without_retraining(client, run):
    _, store = run
    before = {c["id"]: c for c in client.get("/api/clusters").json()}
    ids = sorted(before)
    r = client.post("/api/curation", json={"action": "rename", "cluster": ids[0], "name": "round ones"})
    assert r.status_code == 200 and r.json()["who"]
    assert "round ones" in client.get("/").text
    assert client.post("/api/curation", json={"action": "merge", "into": ids[0], "clusters": [ids[1]]}).status_code == 200
    after = {c["id"]: c for c in client.get("/api/clusters").json()}
    assert ids[1] not in after and after[ids[0]]["size"] == before[ids[0]]["size"] + before[ids[1]]["size"]
    assert client.get(f"/cluster/{ids[1]}").status_code == 404  # "was merged into"
    moved = client.get(f"/api/cluster/{ids[0]}/members", params={"count": 2}).json()["members"]
    edit = {"action": "move", "cluster": ids[2], "paths": [moved[0]["path"]], "indices": [moved[0]["index"]]}
    assert client.post("/api/curation", json=edit).status_code == 200
    edit = {"action": "reject", "paths": [moved[1]["path"]], "indices": [moved[1]["index"]]}
    assert client.post("/api/curation", json=edit).status_code == 200
    now = {c["id"]: c for c in client.get("/api/clusters").json()}
    assert now[ids[0]]["size"] == after[ids[0]]["size"] - 2 and now[ids[2]]["size"] == after[ids[2]]["size"] + 1
    assert now[UNASSIGNED]["size"] == 1
    target = client.get(f"/api/cluster/{ids[2]}/members", params={"start": 0, "count": 1000}).json()["members"]
    assert moved[0]["path"] in [m["path"] for m in target]
    source = client.get(f"/api/cluster/{ids[0]}/members", params={"start": 0, "count": 1000}).json()["members"]
    assert not {moved[0]["path"], moved[1]["path"]} & {m["path"] for m in source}
    fresh = RunCatalog(store)  # what a reload, the export and the report see
    assert fresh.curation.name(ids[0]) == "round ones" and fresh.curation.target(ids[1]) == ids[0]
    from imgclust.report.build import render_index

    report = open(render_index(store)).read()
    assert f"Cluster {ids[0]}: round ones" in report and f"merged into <a href=\"#cluster-{ids[0]}\">" in report
    assert f"http://127.0.0.1:8000/cluster/{ids[0]}" in report and "imgclust serve" in report
    for bad, words in [({"action": "rename", "cluster": 999, "name": "x"}, "not a cluster of this run"),
                       ({"action": "merge", "into": ids[0], "clusters": [ids[0]]}, "cannot be merged into itself"),
                       ({"action": "merge", "into": ids[0], "clusters": [ids[1]]}, "was merged into"),
                       ({"action": "paint"}, "unknown edit"), ({"action": "move", "cluster": ids[2]}, "list of image paths")]:
        r = client.post("/api/curation", json=bad)
        assert r.status_code == 400 and words in r.json()["error"], (bad, r.text)
    assert client.post("/api/curation", content=b"{", headers={"Content-Type": "application/json"}).status_code == 400


def test_a_split_reclusters_one_cluster_into_parts_applied_everywhere(client, run):
    _, store = run
    before = {c["id"]: c for c in client.get("/api/clusters").json()}
    big = max(before, key=lambda c: before[c]["size"])
    members = client.get(f"/api/cluster/{big}/members", params={"count": 1000}).json()["members"]
    assert "Split into parts" in client.get(f"/cluster/{big}").text
    r = client.post("/api/split", json={"cluster": big, "parts": 2})
    assert r.status_code == 200, r.text
    into = r.json()["into"]
    assert into[0] == big and len(into) == 2 and into[1] == max(before) + 1 and sum(r.json()["sizes"]) == len(members)
    after = {c["id"]: c for c in client.get("/api/clusters").json()}
    assert after[big]["size"] + after[into[1]]["size"] == before[big]["size"] and min(r.json()["sizes"]) > 0
    assert sum(c["size"] for c in after.values()) == sum(c["size"] for c in before.values())
    paged = {p: [m["path"] for m in client.get(f"/api/cluster/{p}/members", params={"count": 1000}).json()["members"]]
             for p in into}
    assert sorted(paged[into[0]] + paged[into[1]]) == sorted(m["path"] for m in members)
    assert [len(paged[p]) for p in into] == [after[p]["size"] for p in into]
    dist = [m["distance"] for m in client.get(f"/api/cluster/{into[1]}/members", params={"count": 1000}).json()["members"]]
    assert dist == sorted(dist)  # the part pages in order of distance to its own centre
    # every reader applies it: the export, an image's page, a fresh catalog; the parts can be curated
    from imgclust.export import curated_assignments

    table = curated_assignments(store).set_index("path")["cluster"]
    assert all(table[p] == part for part in into for p in paged[part])
    one = client.get(f"/api/cluster/{into[1]}/members", params={"count": 1}).json()["members"][0]
    assert f"/cluster/{into[1]}" in client.get(f"/image/{one['index']}").text
    assert {c.id for c in RunCatalog(store).clusters()} == set(after)
    assert client.post("/api/curation", json={"action": "rename", "cluster": into[1], "name": "the far ones"}).status_code == 200
    assert "the far ones" in client.get("/").text and f"split of cluster {big}" in client.get("/").text
    from imgclust.report.build import render_index

    assert f"split into clusters <a href=\"http://127.0.0.1:8000/cluster/{big}\">" in open(render_index(store)).read()
    # the split's centres place an image it has not seen: the cluster's own member, by its code
    cur = Curation.of(store)
    import pandas as pd

    unseen = pd.DataFrame({"path": ["new/elsewhere.png"], "cluster": [big], "index": [one["index"]]})
    assert cur.apply(unseen)["cluster"].tolist() == [into[1]]
    for bad, words in [({"cluster": big, "parts": 2}, "already a part of a split"),
                       ({"cluster": 999, "parts": 2}, "no cluster 999"), ({"cluster": big, "parts": 1}, "parts is 2 to 50"),
                       ({"parts": 2}, "send")]:
        r = client.post("/api/split", json=bad)
        assert r.status_code in (400, 404) and words in r.json()["error"], (bad, r.text)


def test_edits_made_at_once_are_all_kept(run):
    _, store = run
    ids = [c.id for c in RunCatalog(store).clusters()]
    errors: list[BaseException] = []

    def rename(i: int) -> None:
        try:
            add_edit(store, {"action": "rename", "cluster": ids[i % len(ids)], "name": f"name {i}"}, who=f"tab {i}",
                     wait_s=60)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=rename, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    edits = Curation.of(store).edits
    assert sorted(e["who"] for e in edits) == [f"tab {i}" for i in range(6)]


def test_an_edit_waits_for_a_writer_and_then_says_the_run_is_busy(run):
    from imgclust.state.lease import LeaseHeld, acquire_lease

    _, store = run
    with acquire_lease(store, "assign"), pytest.raises(LeaseHeld):
        add_edit(store, {"action": "rename", "cluster": 0, "name": "x"}, wait_s=0.5)
    add_edit(store, {"action": "rename", "cluster": 0, "name": "x"}, wait_s=0.5)  # free again: it goes through
    with pytest.raises(CurationError):
        Curation().check({"action": "rename", "cluster": 0, "name": ""}, {0})


def test_off_the_loopback_every_request_needs_the_token(run):
    from fastapi.testclient import TestClient

    app = TestClient(create_app(RunCatalog(run[1]), token="s3cret"))
    assert app.get("/").status_code == 401 and "token" in app.get("/").text
    assert app.get("/?token=wrong").status_code == 401
    assert app.get("/?token=s3cret").status_code == 200
    assert app.get("/api/clusters").status_code == 200  # the cookie set by the first visit


def test_serve_refuses_a_folder_without_a_run_and_a_bad_port(tmp_path, run):
    from tests.test_cli import imgclust

    r = imgclust("serve", str(tmp_path / "nothing"))
    assert r.returncode == 2 and "holds no finished run" in r.stderr
    r = imgclust("serve", run[1].url, "--port", "70000")
    assert r.returncode == 2 and "not a port number" in r.stderr


def test_the_app_serves_a_run_in_a_bucket(finished_run, s3):
    """The same pages from a run on S3 (a moto server): layout row groups, thumbnails and edits
    over fsspec."""
    import s3fs
    from fastapi.testclient import TestClient

    _, out, _, _ = finished_run
    fs = s3fs.S3FileSystem(**s3)
    fs.mkdir("served")
    fs.put(str(out) + "/", "served/run/", recursive=True)
    store = RunStore("s3://served/run", s3)
    app = TestClient(create_app(RunCatalog(store)))
    clusters = app.get("/api/clusters").json()
    assert sum(c["size"] for c in clusters) == len(RunStore(str(out)).read_table("assignments"))
    largest = max(clusters, key=lambda c: c["size"])
    page = app.get(f"/api/cluster/{largest['id']}/members", params={"start": largest["size"] - 1, "count": 5}).json()
    assert len(page["members"]) == 1
    assert app.get(f"/thumb/{page['members'][0]['index']}").headers["content-type"] == "image/png"
    assert app.post("/api/curation", json={"action": "rename", "cluster": largest["id"], "name": "on s3"}).status_code == 200
    assert RunCatalog(store).curation.name(largest["id"]) == "on s3"


def test_similar_images_from_the_index_are_those_of_a_full_scan(run):
    _, store = run
    with_index = RunCatalog(store)
    assert with_index.index is not None
    found = {i: with_index.similar(index=i, k=8) for i in (0, 5, 17)}
    shutil.rmtree(store.path("index"))  # a run made before indexes: every code compared
    scanned = RunCatalog(store)
    assert scanned.index is None
    for i, a in found.items():
        b = scanned.similar(index=i, k=8)
        assert a["index"].tolist() == b["index"].tolist()
        np.testing.assert_allclose(a["similarity_distance"], b["similarity_distance"], rtol=1e-2, atol=1e-3)


def test_near_duplicate_groups_and_outlier_scores_are_shown(client, run):
    from imgclust.codeindex import Standardiser
    from imgclust.runmodel import RunModel
    from imgclust.runstore import Location
    from imgclust.stages.neighbours import write_near_duplicates

    _, store = run
    model = RunModel.load(Location(store.model))
    pairs = {"a": [2, 2, 9], "b": [4, 7, 11], "code_distance": [0.1] * 3, "hash_distance": [3] * 3}
    import pandas as pd

    write_near_duplicates(store, Standardiser(model.code_space.mean, model.code_space.std), pd.DataFrame(pairs))
    page = client.get("/duplicates").text
    assert "2 groups of near-identical images" in page
    assert page.count('class="dupgroup"') == 2 and 'href="/image/11"' in page
    assert client.get("/duplicates?page=2").status_code == 404
    one = client.get("/image/4").text
    assert "Near-duplicates (2)" in one and 'href="/image/2"' in one and 'href="/image/7"' in one
    assert "outlier score" in one
    assert "Near-duplicates" not in client.get("/image/5").text.split("<main>")[1]
