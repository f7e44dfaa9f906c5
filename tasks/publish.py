"""Tasks: the tables, the report and the run record (``imgclust.stages.publish``, ``imgclust.report``)."""

from __future__ import annotations

from typing import Any

from distributed import Client
from prefect import task

from imgclust.report.build import write_report
from imgclust.runstore import RunStore
from imgclust.stages.cluster import Clustering
from imgclust.stages.publish import publish


@task(name="publish", retries=2, retry_delay_seconds=5)
def publish_task(store: RunStore, clu: Clustering, address: str) -> dict[str, Any]:
    with Client(address, set_as_default=False) as client:
        return publish(store, clu.labels_url, clu.distances_url, client)


@task(name="report", retries=1, retry_delay_seconds=5)
def report_task(store: RunStore, seed: int, run: dict[str, Any]) -> str:
    return write_report(store, seed, run)
