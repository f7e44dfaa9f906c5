"""Torch thread budgets, decided in one place.

The number of torch threads changes the order of float sums, hence trained weights and codes. A
stage that sets it explicitly (and restores it) gives the same result whatever ran before it in
the same process: a test process, a notebook, or a long-lived Prefect worker.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch


def local_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers and taskset narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def worker_budget(threads: dict[str, int] | None) -> int:
    """This Dask worker's share of its host's cores (see ``torch_threads_by_worker``); 1 off-worker."""
    from distributed import get_worker

    try:
        return (threads or {}).get(get_worker().address, 1)
    except ValueError:  # not on a worker (a direct call)
        return 1


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, then put the previous count back."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)
