"""Tasks: the tables, the report and the run record (``imgclust.stages.publish``, ``imgclust.report``)."""

from __future__ import annotations

from typing import Any

from prefect import task

from imgclust.report.build import write_report
from imgclust.runstore import RunStore
from imgclust.stages.cluster import Clustering
from imgclust.stages.publish import publish


@task(name="publish", retries=2, retry_delay_seconds=5)
def publish_task(store: RunStore, clu: Clustering) -> dict[str, Any]:
    return publish(store, clu.labels_url, clu.distances_url)


@task(name="report", retries=1, retry_delay_seconds=5)
def report_task(store: RunStore, seed: int, run: dict[str, Any]) -> str:
    return write_report(store, seed, run)
