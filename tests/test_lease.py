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
