"""Prefect tasks: a few lines each over the plain stage functions of ``imgclust.stages``.

Each task connects to the flow's Dask cluster by address and calls one library function; retries
and names are Prefect's concern, everything else is the library's.
"""
