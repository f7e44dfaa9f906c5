"""The inverted-file code index: every code in exactly one list, recall against exact search."""

from __future__ import annotations

import numpy as np

from imgclust.codeindex import CodeIndex, IndexSettings, Standardiser, build_index
from imgclust.io.arrays import create_array
from imgclust.runstore import RunStore


def clustered_codes(n: int, dim: int, groups: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 4, (groups, dim))
    return (centres[rng.integers(0, groups, n)] + rng.normal(0, 1, (n, dim))).astype(np.float32)


def make_store(tmp_path, codes: np.ndarray) -> RunStore:
    store = RunStore(str(tmp_path / "run"))
    create_array(store.codes, codes.shape, 1000, "float32")[:] = codes
    return store


def exact(z: np.ndarray, q: np.ndarray, k: int, exclude: np.ndarray) -> np.ndarray:
    d = ((z[None, :, :] - q[:, None, :]) ** 2).sum(2)
    d[np.arange(len(q)), exclude] = np.inf
    return np.argsort(d, axis=1, kind="stable")[:, :k]


def test_every_code_is_in_one_list_and_search_recalls_exact_neighbours(tmp_path, client):
    codes = clustered_codes(20_000, 16, 40)
    store = make_store(tmp_path, codes)
    scale = Standardiser(codes.mean(0).astype(np.float64), codes.std(0).astype(np.float64))
    settings = IndexSettings(list_rows=250, nprobe=8, block_rows=3000, part_bytes=100_000)
    built = build_index(store, scale, client, settings)
    index = CodeIndex.open(store)
    assert index is not None and index.n_lists == built.n_lists == 80
    assert int(index.lists[:, 0].max()) + 1 > 1  # several parts, each gathered from several blocks
    got = index.read_lists(np.arange(index.n_lists))
    rows = np.concatenate([got[i][1] for i in range(index.n_lists)])
    assert np.array_equal(np.sort(rows), np.arange(len(codes)))  # every code exactly once
    z = scale(codes)
    i = 1234
    lst = next(j for j in range(index.n_lists) if i in got[j][1])
    np.testing.assert_allclose(got[lst][0][list(got[lst][1]).index(i)], z[i], atol=2e-2)  # float16 codes

    queries = np.random.default_rng(1).choice(len(codes), 200, replace=False)
    dist, found = index.search(z[queries], 10, exclude=queries)
    truth = exact(z, z[queries], 10, queries)
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])
    assert recall >= 0.95, recall
    assert not np.isin(queries, found[np.arange(len(queries))]).any() or all(
        q not in f for q, f in zip(queries, found))  # the query itself is left out
    assert np.all(np.diff(dist, axis=1) >= 0)  # nearest first
    np.testing.assert_allclose(dist[:, 0], np.sqrt(((z[found[:, 0]] - z[queries]) ** 2).sum(1)), rtol=2e-2, atol=2e-2)


def test_a_run_too_small_for_several_lists_is_searched_exactly(tmp_path, client):
    codes = clustered_codes(300, 8, 3)
    store = make_store(tmp_path, codes)
    scale = Standardiser(np.zeros(8), np.ones(8))
    build_index(store, scale, client)
    index = CodeIndex.open(store)
    assert index is not None and index.n_lists == 1
    dist, found = index.search(codes[:5], 400, exclude=np.arange(5))
    assert (found[:, :299] >= 0).all() and (found[:, 299:] == -1).all() and np.isinf(dist[:, 299:]).all()
    np.testing.assert_array_equal(found[:, :10], exact(codes, codes[:5], 10, np.arange(5)))


def test_rows_added_later_join_the_index_and_an_interrupted_extension_is_replaced(tmp_path, client):
    from imgclust.codeindex import extend_index
    from imgclust.io.arrays import open_array

    codes = clustered_codes(3_000, 8, 6)
    store = make_store(tmp_path, codes[:2_000])
    scale = Standardiser(np.zeros(8), np.ones(8))
    build_index(store, scale, client, IndexSettings(list_rows=200, nprobe=10))
    arr = open_array(store.codes, mode="r+")
    arr.resize((2_500, 8))
    arr[2_000:2_500] = codes[2_000:2_500]
    first = extend_index(store, scale, 2_000, 2_500, "added-00001")
    assert first is not None and first.rows == 2_500
    arr.resize((3_000, 8))
    arr[2_500:3_000] = codes[2_500:3_000] + 50.0  # an interrupted call's rows, far from everything
    extend_index(store, scale, 2_500, 3_000, "added-00002")
    arr[2_500:3_000] = codes[2_500:3_000]  # written again by the call that completes
    index = extend_index(store, scale, 2_500, 3_000, "added-00002")
    assert index is not None and index.rows == 3_000 and [s for s, _ in index.extras] == ["added-00001", "added-00002"]
    got = index.read_lists(np.arange(index.n_lists))
    rows = np.concatenate([got[i][1] for i in range(index.n_lists)])
    assert np.array_equal(np.sort(rows), np.arange(3_000))  # every row once, the base's and the added
    queries = np.array([10, 2_100, 2_900])
    _, found = index.search(codes[queries], 5, exclude=queries)
    truth = exact(codes, codes[queries], 5, queries)
    assert np.mean([len(set(f) & set(t)) / 5 for f, t in zip(found, truth)]) >= 0.9
    again = extend_index(store, scale, 2_000, 2_600, "added-00003")  # a retry from an earlier start
    assert again is not None and again.rows == 2_600 and [s for s, _ in again.extras] == ["added-00003"]
    assert sorted(p.name for p in (tmp_path / "run" / "index").glob("added-*")) == [
        "added-00003.codes", "added-00003.lists.npy", "added-00003.rows"]
