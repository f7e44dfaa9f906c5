"""The ``recluster`` flow: split one cluster of a finished run into sub-clusters."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict, Field

from imgclust.dask_cluster import dask_client
from imgclust.lease import acquire_lease
from tasks.explore import recluster_task


class ReclusterConfig(BaseModel):
    """Parameters of ``recluster``: which run, which cluster, how many sub-clusters."""

    model_config = ConfigDict(extra="forbid")

    run_dir: str = Field(description="Output folder/URL of a finished cluster-archive run.")
    cluster: int = Field(ge=0, description="Cluster id to split.")
    n_clusters: int | None = Field(default=None, ge=2, description="Sub-clusters; default chosen by silhouette.")
    seed: int = Field(default=0, ge=0)
    storage_options: dict[str, Any] = Field(default_factory=dict)
    dask_address: str | None = None
    lease_seconds: float = Field(default=120.0, ge=1, le=86_400, description="Lease on run_dir; see RunConfig.")
    force_unlock: bool = Field(default=False, description="Take run_dir's lease even if another run holds it.")


@flow(name="recluster", validate_parameters=True)
def recluster_flow(config: ReclusterConfig) -> dict[str, Any]:
    with acquire_lease(config.run_dir, config.storage_options, "recluster", config.lease_seconds,
                       config.force_unlock), dask_client(config.dask_address) as client:
        res = recluster_task(config.run_dir, config.cluster, config.n_clusters, config.seed, config.storage_options,
                             client.scheduler.address)
    get_run_logger().info("recluster: sizes %s; report %s", res.sizes, res.report_url)
    return {"directory": res.directory, "sizes": res.sizes, "report": res.report_url}
