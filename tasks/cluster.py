"""Task: cluster the codes (``imgclust.stages.cluster``)."""

from __future__ import annotations

from distributed import Client
from prefect import task

from imgclust.runstore import RunStore
from imgclust.stages.cluster import Clustering, ClusterSettings, cluster


@task(name="cluster", retries=1, retry_delay_seconds=5)
def cluster_task(store: RunStore, settings: ClusterSettings, address: str) -> Clustering:
    with Client(address, set_as_default=False) as client:
        return cluster(store, settings, client)
