"""The ``recluster`` flow: split one cluster of a finished run into sub-clusters."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from imgclust.config import ReclusterConfig
from imgclust.dask_cluster import dask_client
from imgclust.state.lease import acquire_lease
from tasks.explore import recluster_task

__all__ = ["ReclusterConfig", "recluster_flow"]


@flow(name="recluster", validate_parameters=True)
def recluster_flow(config: ReclusterConfig) -> dict[str, Any]:
    """Cluster the members of ``config.cluster`` again into ``config.n_clusters`` (or a chosen k)."""
    store = config.store
    with acquire_lease(store, "recluster", config.lease_seconds, config.force_unlock), \
            dask_client(config.dask_address) as client:
        res = recluster_task(store, config.cluster, config.n_clusters, config.seed, client.scheduler.address)
    get_run_logger().info("recluster: sizes %s; report %s", res.sizes, res.report_url)
    return {"directory": res.directory, "sizes": res.sizes, "report": res.report_url}
