"""The ``assign-new`` flow: what the nightly deployment runs on a growing archive."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict, Field

from imgclust.dask_cluster import dask_client
from imgclust.lease import acquire_lease
from tasks.assign import assign_task


class AssignConfig(BaseModel):
    """Which finished run to extend, and where to look for new images."""

    model_config = ConfigDict(extra="forbid")

    run_dir: str = Field(description="Output folder/URL of a finished cluster-archive run.")
    source: str = Field(description="Folder or fsspec URL to scan for images the run has not seen.")
    storage_options: dict[str, Any] = Field(default_factory=dict)
    dask_address: str | None = None
    n_workers: int | None = Field(default=None, ge=1)
    lease_seconds: float = Field(default=120.0, ge=1, le=86_400, description="Lease on run_dir; see RunConfig.")
    force_unlock: bool = Field(default=False, description="Take run_dir's lease even if another run holds it.")


@flow(name="assign-new", validate_parameters=True)
def assign_new_flow(config: AssignConfig) -> dict[str, Any]:
    with acquire_lease(config.run_dir, config.storage_options, "assign-new", config.lease_seconds,
                       config.force_unlock), dask_client(config.dask_address, config.n_workers) as client:
        summary = assign_task(config.run_dir, config.source, config.storage_options, client.scheduler.address)
    get_run_logger().info("assign-new: %d new files (%d accepted) in %s", summary["new"], summary["accepted"],
                          config.run_dir)
    return summary
