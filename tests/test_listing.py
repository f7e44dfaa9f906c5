import random

import pyarrow.parquet as pq

from imgclust.io.listing import collect, read_group, write_listing


def test_a_listing_longer_than_a_run_is_written_sorted_in_groups(tmp_path):
    """1,000 entries in shuffled order, sorted 64 at a time and merged: parts in path order, row
    groups of 10 each keyed by its entries, refused entries kept with their reason."""
    entries = [(f"f{i:04d}/{j}.png", f"{i}:{j}", None) for i in range(250) for j in range(4)]
    entries[17] = (entries[17][0], None, "not a regular file (FIFO); not read")
    shuffled = entries[:]
    random.Random(0).shuffle(shuffled)
    parts = write_listing(iter(shuffled), str(tmp_path / "listing"), run_rows=64, group_rows=10)
    assert (parts.n_files, parts.n_refused, len(parts)) == (999, 1, 1000)
    rows = [r for g in parts.groups for r in zip(*read_group(g).to_pydict().values())]
    assert rows == sorted(entries)
    assert all(g.rows == 10 for g in parts.groups[:-1]) and sum(g.rows for g in parts.groups) == 1000
    assert len({g.key for g in parts.groups}) == len(parts.groups)
    assert not list((tmp_path / "listing").glob("run-*"))  # the sorted runs are gone once merged
    assert pq.ParquetFile(parts.groups[0].part).metadata.num_rows == 70
    again = write_listing(iter(entries), str(tmp_path / "listing"), run_rows=64, group_rows=10)
    assert [g.key for g in again.groups] == [g.key for g in parts.groups]  # keys follow content, not order
    listed = collect(iter(shuffled))
    assert [p for p, _ in listed.files] == [e[0] for e in sorted(entries) if e[2] is None]


def test_an_empty_source_lists_no_groups(tmp_path):
    parts = write_listing(iter([]), str(tmp_path / "listing"))
    assert parts.groups == () and len(parts) == 0
