"""Task: split one cluster of a finished run (``imgclust.stages.explore``)."""

from __future__ import annotations

from distributed import Client
from prefect import task

from imgclust.runstore import RunStore
from imgclust.stages.explore import Reclustered, recluster


@task(name="recluster", retries=1, retry_delay_seconds=5)
def recluster_task(store: RunStore, cluster: int, n_clusters: int | None, seed: int, address: str) -> Reclustered:
    with Client(address, set_as_default=False) as client:
        return recluster(store, cluster, n_clusters, seed, client)
