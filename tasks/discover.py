"""Task: list, hash and split off duplicates (``imgclust.stages.discover``)."""

from __future__ import annotations

from distributed import Client
from prefect import task

from imgclust.runstore import Location, RunStore
from imgclust.stages.discover import Discovery, discover


@task(name="discover", retries=2, retry_delay_seconds=5)
def discover_task(source: Location, store: RunStore, address: str) -> Discovery:
    with Client(address, set_as_default=False) as client:
        return discover(source, store, client)
