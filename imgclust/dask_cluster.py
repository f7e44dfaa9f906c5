"""Where Dask work runs: a scheduler address when given, a local process cluster otherwise."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import dask
from distributed import Client, LocalCluster, as_completed

logger = logging.getLogger("imgclust")


def import_class(dotted: str) -> type:
    """``package.module.Class`` -> the class, with a message that says what is missing."""
    import importlib

    module, _, name = dotted.rpartition(".")
    if not module:
        raise ValueError(f"{dotted!r} is not a dotted path such as dask_jobqueue.SLURMCluster")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot import {dotted}: {exc} (is its package installed?)") from None


@contextlib.contextmanager
def dask_client(address: str | None = None, n_workers: int | None = None, cluster_class: str | None = None,
                cluster_kwargs: dict | None = None) -> Iterator[Client]:
    """A Client on ``address``, on a cluster of ``cluster_class(**cluster_kwargs)``, or on a fresh
    LocalCluster; clusters started here are closed afterwards.

    Local workers are processes with one thread each (torch and Pillow release the GIL only in
    parts, and BLAS threads would fight each other), and ``n_workers`` defaults to the cores.
    """
    if cluster_class:
        with import_class(cluster_class)(**(cluster_kwargs or {})) as cluster, \
                Client(cluster, set_as_default=False) as client:
            logger.info("started a %s cluster", cluster_class)
            yield client
        return
    if address:
        with Client(address, set_as_default=False) as client:
            logger.info("using Dask scheduler %s", address)
            yield client
        return
    n = n_workers or max(1, os.cpu_count() or 1)
    env = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    # The workers' statistical profiler walks the running task's stack every 10 ms on the event
    # loop: a few per cent of every core (bench/ingest.py), for a dashboard page batch runs never open.
    # The dashboard listens on loopback only: it shows worker addresses and memory, with no login.
    with dask.config.set({"distributed.worker.profile.enabled": False}):
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                               dashboard_address="127.0.0.1:0", host="127.0.0.1", env=env)
    try:
        with Client(cluster, set_as_default=False) as client:
            logger.info("started a local Dask cluster with %d worker processes", n)
            yield client
    finally:
        close_quietly(cluster)


CLOSE_TIMEOUT_S = 60.0


def close_quietly(cluster: LocalCluster, timeout: float = CLOSE_TIMEOUT_S) -> None:
    """Close a local cluster; a slow shutdown on a loaded machine is logged, never an error: the
    work is done by then, and failing the run for it would throw its results away."""
    try:
        cluster.close(timeout=timeout)
    except Exception as exc:  # TimeoutError, a worker that died first, ...
        logger.warning("closing the local Dask cluster did not finish cleanly (%s: %s); its processes are "
                       "left to exit on their own", type(exc).__name__, exc)


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Raise ``ValueError`` naming ``address`` when nothing accepts connections there.

    ``tcp://host:port`` (or ``host:port``) is probed with a plain TCP connect; other schemes
    (``tls://``, ``inproc://``, ``ucx://``) are left to Dask.
    """
    import socket
    from urllib.parse import urlparse

    scheme = address.split("://", 1)[0] if "://" in address else "tcp"
    if scheme != "tcp":
        return
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if not parsed.hostname or not parsed.port:
        raise ValueError(f"{address!r} is not a scheduler address such as tcp://10.0.0.5:8786")
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=timeout):
            return
    except OSError as exc:
        raise ValueError(f"no Dask scheduler answers at {address} ({exc.strerror or exc}); start one "
                         "(`dask scheduler`) or leave --dask-address out to use a local cluster") from None


def completed(client: Client, futures: list) -> Iterator:
    """Futures as they finish, on ``client`` (not the process-wide default client, which may be absent)."""
    return as_completed(futures, loop=client.loop)


def torch_threads_by_worker(client: Client) -> dict[str, int]:
    """Torch threads each worker's tasks may use so that, per host, tasks x threads <= cores."""
    def probe(dask_worker) -> tuple[str, int, int]:
        return dask_worker.ip if hasattr(dask_worker, "ip") else dask_worker.address, os.cpu_count() or 1, \
            dask_worker.state.nthreads

    info = client.run(probe)
    slots: dict[str, int] = {}
    for host, _, nthreads in info.values():
        slots[host] = slots.get(host, 0) + nthreads
    return {addr: max(1, cores // slots[host]) for addr, (host, cores, _) in info.items()}


def gpu_workers(client: Client) -> list[str]:
    """Workers that declare a ``GPU`` resource (``dask worker --resources GPU=1``)."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    return sorted(a for a, w in workers.items() if w.get("resources", {}).get("GPU", 0) > 0)
