"""Task: add the images new to a finished run to its clusters (``imgclust.stages.assign``)."""

from __future__ import annotations

from typing import Any

from distributed import Client
from prefect import task

from imgclust.runstore import Location, RunStore
from imgclust.stages.assign import assign_new


@task(name="assign-new", retries=1, retry_delay_seconds=5)
def assign_task(store: RunStore, source: Location, address: str) -> dict[str, Any]:
    with Client(address, set_as_default=False) as client:
        return assign_new(store, source, client)
