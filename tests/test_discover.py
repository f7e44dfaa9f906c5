import pandas as pd
import pytest

from imgclust.io.storage import StorageError, read_parquet
from imgclust.runstore import Location, RunStore
from imgclust.stages.discover import UNIQUE, discover, list_images, split_duplicates


def test_list_images_by_extension_any_case_relative_sorted(corpus):
    root, counts = corpus
    paths = list_images(Location(str(root)))
    assert len(paths) == counts["found"]
    assert paths == sorted(paths)
    assert "readme.txt" not in paths
    assert any(p.endswith(".JPEG") for p in paths)
    assert all(not p.startswith("/") and "\\" not in p for p in paths)
    assert any("img 005é" in p for p in paths)  # not URL-encoded


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(StorageError, match="source not found"):
        list_images(Location(str(tmp_path / "nope")))


def test_first_sorted_path_is_the_original():
    table = pd.DataFrame({"path": ["b.png", "a.png", "c.png", "d.png"], "sha256": ["x", "x", "y", "x"],
                          "gray": [True] * 4})
    unique, dups = split_duplicates(table)
    assert unique["path"].tolist() == ["a.png", "c.png"]
    assert dups.to_dict("records") == [{"path": "b.png", "sha256": "x", "duplicate_of": "a.png"},
                                       {"path": "d.png", "sha256": "x", "duplicate_of": "a.png"}]


def test_discover_writes_duplicates(corpus, client, tmp_path):
    root, counts = corpus
    found = discover(Location(str(root)), RunStore(str(tmp_path)), client)
    assert found.n_found == counts["found"]
    assert found.n_duplicates == counts["duplicates"]
    assert found.gray is False  # a quarter of the corpus was saved as RGB
    assert found.side_p90 == 28  # the digits; the broken files' headers (a 100,000-pixel bomb) are under a tenth
    dups = RunStore(str(tmp_path)).read_table("duplicates")
    assert set(dups.columns) == {"path", "sha256", "stamp", "duplicate_of", "generation"}
    assert sorted(dups["path"]) == ["x-copies/copy-a.png", "x-copies/copy-b.png", "x-copies/copy-c.jpg"]
    unique = read_parquet(RunStore(str(tmp_path)).work(UNIQUE))
    assert not set(dups["path"]) & set(unique["path"])
    assert set(dups["duplicate_of"]) <= set(unique["path"])


def test_thumbnails_are_not_larger_than_nine_images_in_ten():
    from imgclust.stages.ingest import thumbnail_side

    assert thumbnail_side(128, 28) == 32 and thumbnail_side(128, 8) == 32 and thumbnail_side(128, 70) == 72
    assert thumbnail_side(128, 4000) == 128 and thumbnail_side(128, None) == 128 and thumbnail_side(0, 28) == 0
    assert thumbnail_side(24, 28) == 24  # what the user asked for is the most


def test_image_headers_give_the_largest_side():
    import io

    from PIL import Image

    from imgclust.io.imagefile import probe_header

    for fmt in ("PNG", "JPEG", "GIF"):
        buf = io.BytesIO()
        Image.new("RGB", (50, 20), (200, 10, 10)).save(buf, fmt)
        assert probe_header(buf.getvalue())[1] == 50, fmt
    assert probe_header(b"not an image") == (None, None)


def test_a_peek_stops_at_what_it_needs(tmp_path):
    """The checks before a run look for k images, not at every file of the archive."""
    from imgclust.stages.discover import peek_source

    for d in range(5):
        (tmp_path / f"d{d}").mkdir()
        for i in range(10):
            (tmp_path / f"d{d}" / f"{i}.png").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not an image")
    assert len(peek_source(Location(str(tmp_path)), 3)) == 3
    assert len(peek_source(Location(str(tmp_path)), 500)) == 50
    with pytest.raises(StorageError, match="source not found"):
        peek_source(Location(str(tmp_path / "nope")), 1)
