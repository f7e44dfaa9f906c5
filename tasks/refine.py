"""Task: refine the clusters with the cluster net (``imgclust.stages.refine``)."""

from __future__ import annotations

from typing import Any

from distributed import Client
from prefect import task

from imgclust.models.refiner import RefineSettings
from imgclust.runstore import RunStore
from imgclust.stages.cluster import Clustering
from imgclust.stages.refine import refine_clusters


@task(name="refine", retries=1, retry_delay_seconds=5)
def refine_task(store: RunStore, clu: Clustering, seed: int, settings: RefineSettings,
                address: str) -> tuple[Clustering, dict[str, Any]]:
    with Client(address, set_as_default=False) as client:
        return refine_clusters(store, clu, seed, client, settings)
