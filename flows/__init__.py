"""Prefect flows: thin compositions of the tasks in ``tasks/``."""

from flows.cluster_archive import cluster_archive

__all__ = ["cluster_archive"]
