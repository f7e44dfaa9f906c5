import numpy as np
import pandas as pd
import pytest

from imgclust.io.storage import StorageError, read_parquet_folder
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
    unique = read_parquet_folder(RunStore(str(tmp_path)).work(UNIQUE))
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


def test_percentiles_from_counts_match_numpy():
    from imgclust.stages.discover import percentile_of_counts

    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 500):
        values = rng.integers(8, 4000, n)
        counts = pd.Series(values).value_counts().to_dict()
        for q in (0, 50, 90, 100):
            assert percentile_of_counts(counts, q) == pytest.approx(np.percentile(values, q))
    assert percentile_of_counts({}, 90) is None


def test_discover_in_small_groups_and_buckets_finds_what_the_whole_table_does(corpus, client, tmp_path, monkeypatch):
    """Groups of 4 files, listing runs of 10 merged, 5 duplicate buckets: the same duplicates,
    unique files in path order and unreadable files as finding them in one table."""
    import imgclust.stages.discover as stage
    from imgclust.stages.discover import UNREADABLE, hash_files, list_source

    root, counts = corpus
    monkeypatch.setattr(stage, "HASH_GROUP_ROWS", 4)
    monkeypatch.setattr(stage, "LISTING_RUN_ROWS", 10)
    monkeypatch.setattr(stage, "DUPLICATE_BUCKET_ROWS", 5)
    store = RunStore(str(tmp_path))
    found = discover(Location(str(root)), store, client)
    listing = list_source(Location(str(root)))
    fs, top = Location(str(root)).fs()
    whole = hash_files(fs, top, listing.paths, client)
    expect_unique, expect_dups = split_duplicates(whole[whole["sha256"].notna()])
    unique = read_parquet_folder(store.work(UNIQUE))
    assert unique["path"].tolist() == expect_unique["path"].tolist()  # path order across groups
    dups = store.read_table("duplicates").sort_values("path")
    assert dups[["path", "duplicate_of"]].values.tolist() == expect_dups[["path", "duplicate_of"]].values.tolist()
    unreadable = read_parquet_folder(store.work(UNREADABLE), columns=["path", "reason"])
    assert unreadable["path"].tolist() == sorted(whole.loc[whole["sha256"].isna(), "path"].tolist()
                                                 + [p for p, _ in listing.refused])
    assert (found.n_found, found.n_unique, found.n_duplicates) == (counts["found"], len(unique), counts["duplicates"])
    assert found.side_p90 == 28


def test_a_second_discover_reads_only_groups_whose_files_changed(tmp_path, client, monkeypatch, caplog):
    import logging

    import imgclust.stages.discover as stage

    monkeypatch.setattr(stage, "HASH_GROUP_ROWS", 5)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"{i:02d}.png").write_bytes(b"not an image %d" % i)
    store = RunStore(str(tmp_path / "out"))
    discover(Location(str(src)), store, client)
    (src / "07.png").write_bytes(b"changed")  # size and time change: its group of five is hashed again
    with caplog.at_level(logging.INFO, logger="imgclust"):
        again = discover(Location(str(src)), store, client)
    assert "discover: 3 of 4 batches hashed by an earlier attempt" in caplog.text
    assert again.n_found == 20 and again.n_unique == 20


def test_a_synthetic_archive_goes_through_discover_with_its_planted_duplicates(client, tmp_path):
    """``synthetic://N`` (imgclust/io/synthetic.py): generated objects, one in 50 a copy of the one before."""
    from imgclust.io.synthetic import DUPLICATE_EVERY

    store = RunStore(str(tmp_path))
    found = discover(Location("synthetic://2600"), store, client)
    assert found.n_found == 2600 and found.n_duplicates == 2600 // DUPLICATE_EVERY
    assert found.n_unique == 2600 - found.n_duplicates
    dups = store.read_table("duplicates")
    copy = np.array([int(p.rsplit("/", 1)[1][:-4]) for p in dups["path"]])
    original = np.array([int(p.rsplit("/", 1)[1][:-4]) for p in dups["duplicate_of"]])
    assert (copy % DUPLICATE_EVERY == DUPLICATE_EVERY - 1).all() and (original == copy - 1).all()
