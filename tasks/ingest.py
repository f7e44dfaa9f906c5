"""Task: decode every unique file into images.zarr (``imgclust.stages.ingest``)."""

from __future__ import annotations

from distributed import Client
from prefect import task

from imgclust.runstore import Location, RunStore
from imgclust.stages.ingest import Ingest, PixelSpec, ingest


@task(name="ingest", retries=1, retry_delay_seconds=5)
def ingest_task(source: Location, store: RunStore, pixels: PixelSpec, shard_size: int, address: str) -> Ingest:
    with Client(address, set_as_default=False) as client:
        return ingest(source, store, pixels, shard_size, client)
