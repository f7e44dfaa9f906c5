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


def test_members_by_distance_gives_each_clusters_rows_nearest_first_as_one_scan_per_cluster_did():
    import numpy as np
    import pandas as pd

    from imgclust.report.figures import cluster_members, members_by_distance

    rng = np.random.default_rng(0)
    a = pd.DataFrame({"cluster": rng.integers(0, 7, 500), "distance": rng.integers(0, 20, 500) / 4})
    by = members_by_distance(a)
    assert sorted(by) == sorted(set(a["cluster"])) and sum(len(v) for v in by.values()) == 500
    for c, rows in by.items():
        near, rand = cluster_members(a, c, 3)
        near2, rand2 = cluster_members(a, c, 3, rows)
        np.testing.assert_array_equal(near, near2)
        np.testing.assert_array_equal(rand, rand2)
