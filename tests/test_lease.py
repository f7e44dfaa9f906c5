"""The output lease: one writer at a time, takeover after expiry, forced unlock, on disk and in S3."""

from __future__ import annotations

import json
import time

import pytest

from imgclust.runstore import RunStore
from imgclust.state.lease import LEASE_FILE, LeaseHeld, LeaseLost, acquire_lease, force_unlock


def test_second_run_is_refused_with_the_holder_named(tmp_path):
    with acquire_lease(RunStore(str(tmp_path)), "cluster-archive", ttl=60) as first:
        with pytest.raises(LeaseHeld) as err:
            acquire_lease(RunStore(str(tmp_path)), "assign-new", ttl=60)
        assert first.owner in str(err.value) and "--force-unlock" in str(err.value)
    assert not (tmp_path / LEASE_FILE).exists()  # released on exit
    acquire_lease(RunStore(str(tmp_path)), "again", ttl=60).release()


def test_heartbeat_keeps_a_live_lease_and_an_expired_one_is_taken_over(tmp_path):
    live = acquire_lease(RunStore(str(tmp_path)), "run", ttl=1.2)
    time.sleep(2.0)  # longer than ttl: only the heartbeat keeps it alive
    with pytest.raises(LeaseHeld):
        acquire_lease(RunStore(str(tmp_path)), "run", ttl=1.2)
    live._stop.set()  # a SIGKILLed run: the heartbeat stops, the file stays
    live._thread.join()
    time.sleep(1.5)
    taker = acquire_lease(RunStore(str(tmp_path)), "run", ttl=60, settle=0.1)
    assert json.loads((tmp_path / LEASE_FILE).read_text())["owner"] == taker.owner
    taker.release()


def test_force_unlock_takes_a_live_lease_and_the_holder_learns_it_lost(tmp_path):
    holder = acquire_lease(RunStore(str(tmp_path)), "run", ttl=0.8)
    thief = acquire_lease(RunStore(str(tmp_path)), "run", ttl=60, force=True, settle=0.1)
    time.sleep(0.6)  # at least two heartbeats of the holder
    with pytest.raises(LeaseLost):
        holder.check()
    holder.release()  # must not remove the thief's lease
    assert json.loads((tmp_path / LEASE_FILE).read_text())["owner"] == thief.owner
    thief.release()
    assert force_unlock(RunStore(str(tmp_path))) is None


def test_lease_in_object_storage(s3):
    import s3fs

    s3fs.S3FileSystem(**s3).mkdir("leases")
    out = "s3://leases/run"
    with acquire_lease(RunStore(out, s3), "run", ttl=60, settle=0.1) as lease:
        with pytest.raises(LeaseHeld):
            acquire_lease(RunStore(out, s3), "run", ttl=60, settle=0.1)
        assert force_unlock(RunStore(out, s3))["owner"] == lease.owner
    assert not s3fs.S3FileSystem(**s3).exists("leases/run/" + LEASE_FILE)


def test_a_dead_holder_on_this_host_is_taken_over_at_once(tmp_path):
    import socket
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer exists
    record = {"owner": f"{socket.gethostname()}:{dead.pid}:abcd1234", "purpose": "run", "acquired_at": "x",
              "heartbeat_at": time.time(), "ttl_s": 120}
    (tmp_path / LEASE_FILE).write_text(json.dumps(record))
    t0 = time.monotonic()
    with acquire_lease(RunStore(str(tmp_path)), "run", ttl=120, settle=0.1) as lease:
        assert json.loads((tmp_path / LEASE_FILE).read_text())["owner"] == lease.owner
    assert time.monotonic() - t0 < 5


def test_a_lost_lease_stops_every_write_of_its_holder(tmp_path):
    """Taken over mid-stage: the holder's next write, in this process or on a worker, is refused."""
    from imgclust.io.arrays import create_array
    from imgclust.io.storage import write_json
    from imgclust.state.resume import ShardLedger

    store = RunStore(str(tmp_path))
    holder = acquire_lease(store, "run", ttl=0.8)
    ledger = ShardLedger(store, "ingest", "k" * 64)  # what a stage hands to its workers
    ledger.mark(0, ["before"])
    write_json(str(tmp_path / "ok.json"), {})
    thief = acquire_lease(store, "run", ttl=60, force=True, settle=0.1)
    with pytest.raises(LeaseLost):  # a worker notices at once, from the lease file
        ledger.mark(1024, ["after"])
    time.sleep(0.6)  # the holder's heartbeat finds the lease gone
    with pytest.raises(LeaseLost):
        write_json(str(tmp_path / "late.json"), {})
    with pytest.raises(LeaseLost):
        create_array(str(tmp_path / "late.zarr"), (4,), 2, "int32")
    assert not (tmp_path / "late.json").exists()
    holder.release()
    write_json(str(tmp_path / "thief.json"), {})  # the new holder writes freely
    thief.release()
