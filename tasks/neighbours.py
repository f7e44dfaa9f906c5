"""Task: the code index, neighbours, outlier scores and near-duplicates (``imgclust.stages.neighbours``)."""

from __future__ import annotations

from distributed import Client
from prefect import task

from imgclust.runstore import RunStore
from imgclust.stages.neighbours import Neighbourhood, neighbourhood


@task(name="neighbours", retries=1, retry_delay_seconds=5)
def neighbours_task(store: RunStore, address: str) -> Neighbourhood:
    with Client(address, set_as_default=False) as client:
        return neighbourhood(store, client)
