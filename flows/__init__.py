"""Prefect flows: thin compositions of the tasks in ``tasks/``."""

from flows.assign_new import assign_new_flow
from flows.cluster_archive import cluster_archive
from flows.recluster import recluster_flow

__all__ = ["assign_new_flow", "cluster_archive", "recluster_flow"]
