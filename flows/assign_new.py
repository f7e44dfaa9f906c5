"""The ``assign-new`` flow: what the nightly deployment runs on a growing archive."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict, Field

from imgclust.dask_cluster import dask_client
from tasks.assign import assign_task


class AssignConfig(BaseModel):
    """Which finished run to extend, and where to look for new images."""

    model_config = ConfigDict(extra="forbid")

    run_dir: str = Field(description="Output folder/URL of a finished cluster-archive run.")
    source: str = Field(description="Folder or fsspec URL to scan for images the run has not seen.")
    storage_options: dict[str, Any] = Field(default_factory=dict)
    dask_address: str | None = None
    n_workers: int | None = Field(default=None, ge=1)


@flow(name="assign-new", validate_parameters=True)
def assign_new_flow(config: AssignConfig) -> dict[str, Any]:
    with dask_client(config.dask_address, config.n_workers) as client:
        summary = assign_task(config.run_dir, config.source, config.storage_options, client.scheduler.address)
    get_run_logger().info("assign-new: %d new files (%d accepted) in %s", summary["new"], summary["accepted"],
                          config.run_dir)
    return summary
