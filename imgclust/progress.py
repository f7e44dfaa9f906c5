"""One progress channel for every long stage: a bar on the CLI and the same steps in the logs."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
logger = logging.getLogger("imgclust")


def _bar_enabled() -> bool:
    flag = os.environ.get("IMGCLUST_PROGRESS", "auto")
    return flag == "1" or (flag == "auto" and sys.stderr.isatty())


def track(items: Iterable[T], total: int, desc: str, unit: str = "it", log: logging.Logger | None = None) -> Iterator[T]:
    """Yield ``items``; show a tqdm bar when the CLI asked for one and log every ~10 %."""
    log = log or logger
    bar = None
    if _bar_enabled():
        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True)
    step = max(1, total // 10)
    done = 0
    try:
        for item in items:
            yield item
            done += 1
            if bar is not None:
                bar.update(1)
            if done % step == 0 or done == total:
                log.info("%s: %d/%d %s", desc, done, total, unit)
    finally:
        if bar is not None:
            bar.close()
