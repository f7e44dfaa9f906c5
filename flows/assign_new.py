"""The ``assign-new`` flow: what the nightly deployment runs on a growing archive."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from imgclust.config import AssignConfig
from imgclust.dask_cluster import dask_client
from imgclust.state.lease import acquire_lease
from tasks.assign import assign_task

__all__ = ["AssignConfig", "assign_new_flow"]


@flow(name="assign-new", validate_parameters=True)
def assign_new_flow(config: AssignConfig) -> dict[str, Any]:
    """Add the images under ``config.source`` that ``config.run_dir`` has never seen to its clusters."""
    store = config.store
    with acquire_lease(store, "assign-new", config.lease_seconds, config.force_unlock), \
            dask_client(config.dask_address, config.n_workers) as client:
        summary = assign_task(store, config.source_location, client.scheduler.address)
    get_run_logger().info("assign-new: %d new files (%d accepted) in %s", summary["new"], summary["accepted"],
                          store.url)
    return summary
