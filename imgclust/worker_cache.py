"""Objects loaded once per worker process (a model, a cluster net) and shared by its tasks.

Each slot holds one version: a new key (new weights) replaces the old object, so a long-lived
worker serving several runs keeps at most one model per slot in memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
_SLOTS: dict[str, tuple[str, Any]] = {}


def worker_cached(slot: str, key: str, load: Callable[[], T]) -> T:
    """The object cached in ``slot`` under ``key``, loaded with ``load()`` when the key changed."""
    held = _SLOTS.get(slot)
    if held is None or held[0] != key:
        _SLOTS.pop(slot, None)  # drop the old version before loading the new one
        _SLOTS[slot] = (key, load())
    return _SLOTS[slot][1]
