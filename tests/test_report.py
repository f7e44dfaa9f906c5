"""The report of a finished run: self-contained, one section per cluster, no broken pictures."""

from html.parser import HTMLParser

import numpy as np
from PIL import Image

from imgclust.report.figures import grid, to_rgb_thumbs


class Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.ids, self.scripts, self.links = [], [], 0, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        if tag == "section" and "id" in a:
            self.ids.append(a["id"])
        if tag == "script":
            self.scripts += 1
        if tag == "link":
            self.links.append(a)


def test_report_is_self_contained_with_a_section_per_cluster(finished_run):
    _, out, _, _ = finished_run
    report = out / "report"
    page = Collect()
    page.feed((report / "index.html").read_text())
    assert page.ids == ["cluster-0", "cluster-1", "cluster-2"]
    assert page.scripts == 0 and not page.links  # no external scripts, fonts or styles
    for img in page.imgs:
        assert img.get("alt"), img
        src = img["src"]
        assert not src.startswith(("http:", "https:", "/")), src
        with Image.open(report / src) as im:  # every picture exists and decodes
            im.load()
    srcs = {i["src"] for i in page.imgs}
    assert {"sizes.png", "loss.png", "map.png", "reconstructions.png", "cluster-0.png",
            "cluster-0-prototype.png"} <= srcs
    # Thumbnails are packed: files grow with clusters, never with images.
    assert len([p for p in report.iterdir() if not p.name.startswith("recluster-")]) == 4 + 1 + 2 * 3


def test_thumbnail_grid_packs_rows():
    thumbs = to_rgb_thumbs(np.full((10, 1, 8, 8), 200, np.uint8), size=16)
    sheet = grid(thumbs, cols=4, pad=2)
    assert sheet.size == (4 * 18 + 2, 3 * 18 + 2)
    assert np.asarray(sheet)[3, 3].tolist() == [200, 200, 200]


def test_prototype_strips_have_attention_maps_only_where_the_encoder_has_a_feature_map():
    """A conv encoder: prototype + 4 members with their attention overlays; a dense VAE: prototype + members."""
    from imgclust.models.autoencoders import build_model
    from imgclust.report.figures import prototype_and_attention

    pixels = (np.random.default_rng(0).random((4, 1, 28, 28)) * 255).astype(np.uint8)
    widths = {}
    for arch, code in (("conv-vae", 10), ("dense-vae", 10)):
        model = build_model({"architecture": arch, "image_size": [28, 28], "channels": 1, "code_dim": code}).eval()
        strip = prototype_and_attention(model, np.zeros((3, code), np.float32), pixels)
        widths[arch] = strip.size[0]
    assert widths["conv-vae"] > widths["dense-vae"] > 96 * 4


def test_the_report_samples_members_from_the_layout_without_reading_whole_tables(finished_run):
    import numpy as np
    import pandas as pd

    from imgclust.members import MemberLayout
    from imgclust.report.build import grid_members, member_sample
    from imgclust.report.figures import NEAREST_IN_GRID
    from imgclust.runstore import RunStore

    _, out, _, _ = finished_run
    store = RunStore(str(out))
    layout = MemberLayout.open(store)
    a = pd.read_parquet(out / "assignments.parquet")
    index_of = dict(zip(*store.read_table("manifest", ["path", "index"]).to_dict("list").values()))
    for c, (_, size) in layout.clusters.items():
        members = a[a["cluster"] == c].sort_values(["distance", "path"], kind="stable")
        rows = members["path"].map(index_of).to_numpy()
        near, rand = grid_members(layout, c, 0)
        np.testing.assert_array_equal(near, rows[:NEAREST_IN_GRID])
        assert set(rand) <= set(rows[NEAREST_IN_GRID:]) and len(set(rand)) == len(rand)
        assert member_sample(layout, c, 0, 10_000).tolist() == sorted(rows.tolist())
        few = member_sample(layout, c, 0, size // 2)
        assert len(few) == size // 2 and len(set(few)) == len(few) and set(few) <= set(rows)
        assert (np.diff(few) > 0).all() and member_sample(layout, c, 0, size // 2).tolist() == few.tolist()


def test_a_large_clusters_sample_comes_from_a_few_row_groups(tmp_path):
    import numpy as np
    import pandas as pd

    from imgclust.members import ROWS_PER_GROUP, MemberLayout, write_members
    from imgclust.report.build import grid_members, member_sample
    from imgclust.runstore import RunStore

    rng = np.random.default_rng(0)
    n = 6 * ROWS_PER_GROUP + 100
    store = RunStore(str(tmp_path / "run"))
    clusters = np.where(np.arange(n) < 50, 1, 0)  # a small cluster, and a large one over several row groups
    a = pd.DataFrame({"path": [f"{i:06d}.png" for i in range(n)], "cluster": clusters, "distance": rng.random(n)})
    write_members(store, a, np.arange(n), 0)
    layout = MemberLayout.open(store)
    got = member_sample(layout, 0, 0, 2000)
    assert len(got) == 2000 and len(set(got)) == 2000 and (clusters[got] == 0).all()
    assert set(got) != set(np.flatnonzero(clusters == 0)[:2000])  # not simply the nearest
    assert member_sample(layout, 1, 0, 2000).tolist() == list(range(50))
    near, rand = grid_members(layout, 0, 0)
    by_distance = a[a["cluster"] == 0].sort_values("distance").index.to_numpy()
    assert near.tolist() == by_distance[:16].tolist() and (clusters[rand] == 0).all() and len(rand) == 8
