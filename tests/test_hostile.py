"""Hostile trees and faults: every file ends up in a table, nothing hangs, nothing finished is lost."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
from PIL import Image

from imgclust.io.listing import list_local, source_path, table_path
from imgclust.runstore import Location, RunStore
from imgclust.stages.discover import discover
from imgclust.stages.ingest import PixelSpec, ingest


def png(path: Path | bytes, value: int) -> None:
    im = Image.fromarray(np.full((12, 12), value, np.uint8), "L")
    if isinstance(path, bytes):
        with open(path, "wb") as fh:
            im.save(fh, "PNG")
    else:
        im.save(path)


def tables(out: Path) -> dict[str, pd.DataFrame]:
    return {name: RunStore(str(out)).read_table(name) for name in ("manifest", "rejected", "duplicates")}


@pytest.mark.timeout(180)
def test_odd_names_fifos_devices_and_links_all_end_up_in_a_table(tmp_path, client):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(5):
        png(src / f"{i}.png", 30 * i + 10)
    png(os.fsencode(src) + b"/bad\xff\xfename.png", 200)
    os.mkfifo(src / "fifo.png")
    os.symlink("/dev/zero", src / "zero.png")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    png(outside / "linked.png", 99)
    os.symlink(outside, src / "sub" / "link")  # a symlinked folder: followed
    os.symlink(src, src / "sub" / "loop")  # a loop: cut
    out = tmp_path / "out"
    found = discover(Location(str(src)), RunStore(str(out)), client)
    ingest(Location(str(src)), RunStore(str(out)), PixelSpec((8, 8), True), 4, client)
    t = tables(out)
    accepted, rejected = set(t["manifest"]["path"]), dict(zip(t["rejected"]["path"], t["rejected"]["reason"]))
    assert "bad\\xff\\xfename.png" in accepted  # undecodable bytes escaped, the image accepted
    assert "sub/link/linked.png" in accepted
    assert rejected["fifo.png"].startswith("not a regular file (FIFO)")
    assert rejected["zero.png"].startswith("not a regular file (device)")
    assert found.n_found == len(accepted) + len(rejected) + len(t["duplicates"]) == 9
    assert not any(p.startswith("sub/loop/") for p in accepted | set(rejected))


def test_escaped_names_map_back_to_their_files(tmp_path):
    for raw in (b"bad\xff\xfename.png", b"a\\b\xe9.png", "café.png".encode(), b"lit\\x41.png"):
        name = os.fsdecode(raw)
        assert source_path(table_path(name)) == name
        table_path(name).encode("utf-8")  # always writable to Parquet


def test_an_unlistable_folder_is_one_rejected_row(tmp_path, monkeypatch):
    (tmp_path / "ok").mkdir()
    (tmp_path / "locked").mkdir()
    png(tmp_path / "ok" / "a.png", 1)
    png(tmp_path / "locked" / "b.png", 2)
    real = os.scandir

    def scandir(path):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    listing = list_local(str(tmp_path))
    assert listing.paths == ["ok/a.png"]
    assert listing.refused == [("locked/", "folder not listable: Permission denied")]


def test_object_keys_with_glob_characters_are_read(s3, client, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(**s3)
    fs.mkdir("globby")
    for i, name in enumerate(["plain.png", "shot[1].png", "what?.png", "star*.png"]):
        local = tmp_path / f"{i}.png"
        png(local, 40 * i + 20)
        fs.put(str(local), f"globby/src/{name}")
    out = RunStore("s3://globby/out", s3)
    discover(Location("s3://globby/src", s3), out, client)
    ingest(Location("s3://globby/src", s3), out, PixelSpec((8, 8), True), 16, client)
    manifest = out.read_table("manifest")
    assert sorted(manifest["path"]) == ["plain.png", "shot[1].png", "star*.png", "what?.png"]
    assert len(out.read_table("rejected")) == 0


def test_a_transient_error_is_asked_again_and_never_passes_for_not_there(tmp_path, monkeypatch):
    import imgclust.io.arrays as arrays
    import imgclust.io.storage as storage
    from imgclust.io.arrays import create_array, open_if_exists

    monkeypatch.setattr(storage, "RETRY_DELAYS", (0.01, 0.01))
    monkeypatch.setattr(storage.with_retries, "__defaults__", ((0.01, 0.01),))
    url = str(tmp_path / "codes.zarr")
    create_array(url, (4, 2), 2, "float32")
    assert open_if_exists(str(tmp_path / "absent.zarr")) is None
    calls = []
    real = arrays.open_array

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("503 Slow Down")
        return real(*a, **k)

    monkeypatch.setattr(arrays, "open_array", flaky)
    assert open_if_exists(url) is not None and len(calls) == 3  # retried, then found
    monkeypatch.setattr(arrays, "open_array", lambda *a, **k: (_ for _ in ()).throw(ConnectionError("down")))
    with pytest.raises(ConnectionError):  # not "absent": the caller must not recreate the array
        open_if_exists(url)


def test_reads_that_fail_transiently_are_retried_before_a_rejection(tmp_path, monkeypatch):
    import imgclust.io.storage as storage

    monkeypatch.setattr(storage, "RETRY_DELAYS", (0.01, 0.01, 0.01))
    (tmp_path / "a.png").write_bytes(b"A")
    (tmp_path / "b.png").write_bytes(b"B")
    failures = {"a.png": 2}

    def once(fs, paths):
        out = {}
        for p in paths:
            name = Path(p).name
            if failures.get(name, 0):
                failures[name] -= 1
                out[p] = TimeoutError("read timed out")
            else:
                try:
                    out[p] = Path(p).read_bytes()
                except OSError as exc:
                    out[p] = exc
        return out

    monkeypatch.setattr(storage, "_read_once", once)
    got = storage.read_files(None, [str(tmp_path / "a.png"), str(tmp_path / "b.png"), str(tmp_path / "c.png")])
    assert got[str(tmp_path / "a.png")] == b"A" and got[str(tmp_path / "b.png")] == b"B"
    assert isinstance(got[str(tmp_path / "c.png")], FileNotFoundError)  # an answer: not retried


def test_output_inside_source_however_spelled_is_refused(tmp_path):
    from pydantic import ValidationError

    from imgclust.config import AssignConfig, RunConfig

    src = tmp_path / "data" / "photos"
    src.mkdir(parents=True)
    os.symlink(src, tmp_path / "alias")
    for out in (f"{tmp_path}/data//photos/out", f"{tmp_path}/alias/out", f"{src}/../photos/out"):
        with pytest.raises(ValidationError, match="must not be the source or lie inside it"):
            RunConfig(source=str(src), output=out)
    RunConfig(source=str(src), output=f"{tmp_path}/data/photos-out")
    with pytest.raises(ValidationError, match="contains the run"):
        AssignConfig(run_dir=f"{tmp_path}/alias/run", source=str(src))


def test_a_killed_run_leaves_no_server_or_worker_behind(tmp_path):
    from tests.corpus import start_run_until_training

    proc, _ = start_run_until_training(tmp_path)
    helpers = [p for p in psutil.Process(proc.pid).children(recursive=True)]
    assert any("uvicorn" in " ".join(p.cmdline()) for p in helpers)  # Prefect's temporary server
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(helpers, timeout=60)
    assert not alive, [" ".join(p.cmdline())[:120] for p in alive]
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
