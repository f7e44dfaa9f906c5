"""Task: encode every image into codes.zarr (``imgclust.stages.encode``)."""

from __future__ import annotations

from distributed import Client
from prefect import task

from imgclust.runstore import RunStore
from imgclust.stages.encode import Encoded, encode
from imgclust.stages.train import Trained


@task(name="encode", retries=1, retry_delay_seconds=5)
def encode_task(store: RunStore, model: Trained, batch_size: int, ingest_key: str, address: str) -> Encoded:
    with Client(address, set_as_default=False) as client:
        return encode(store, model.ref, batch_size, client, ingest_key=ingest_key)
