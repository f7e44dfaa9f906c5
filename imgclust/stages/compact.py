"""Compaction: a run's tables rewritten as one generation of few parts, the parts it replaces removed."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import numpy as np

from imgclust.io.storage import read_json, write_json
from imgclust.io.tables import TABLES, RunTables, drop_parts, part_files
from imgclust.members import MemberLayout, write_members
from imgclust.runstore import RunStore

logger = logging.getLogger("imgclust")
ROWS_PER_PART = 1_000_000


def compact_tables(store: RunStore, rows_per_part: int = ROWS_PER_PART) -> dict[str, Any]:
    """Write the current rows of every table as generation ``last + 1`` and make it the base.

    Nightly ``assign`` calls add parts, and corrections leave superseded rows; readers then open
    many small files. After compaction each table holds only its current rows, in parts of at most
    ``rows_per_part`` rows. The new generation counts once ``run.json`` names it the base (written
    after its parts); only then are the older parts removed. A crash before that leaves the tables
    as they were (the next ``assign`` or compaction removes the unfinished parts), a crash after it
    leaves older parts that no longer count, removed by the next call.
    """
    so = store.storage_options
    run = read_json(store.run_record, so)
    base, committed = int(run.get("tables_base", 0)), int(run.get("tables_generation", 0))
    for name in TABLES:
        drop_parts(store.table(name), so, lambda g, _: g > committed)  # an interrupted writer's
    before = {name: len(part_files(store.table(name), so)) for name in TABLES}
    current = store.tables()
    if base == committed and run.get("compactions"):  # compacted already: finish an interrupted removal
        refresh_members(store, current, base)
        removed = sum(drop_parts(store.table(name), so, lambda g, _: g < base) for name in TABLES)
        return {"generation": base, "parts_before": before, "rows": {n: len(current[n]) for n in TABLES},
                "parts_removed": removed}
    generation = committed + 1
    for name in TABLES:
        store.write_table(name, current[name].drop(columns=["generation"]), generation, rows_per_part)
    record = {"at": datetime.now(UTC).isoformat(timespec="seconds"), "generation": generation,
              "parts_before": before, "rows": {name: len(current[name]) for name in TABLES}}
    run["tables_base"] = run["tables_generation"] = generation
    run.setdefault("compactions", []).append(record)
    write_json(store.run_record, run, so)  # the commit: from here on only the new parts count
    refresh_members(store, current, generation)
    removed = sum(drop_parts(store.table(name), so, lambda g, _: g < generation) for name in TABLES)
    logger.info("compact: %d parts replaced by %d (generation %d; %s rows)", removed,
                sum(len(part_files(store.table(n), so)) for n in TABLES), generation,
                ", ".join(f"{n} {len(current[n]):,}" for n in TABLES))
    return {**record, "parts_removed": removed}


def refresh_members(store: RunStore, current: RunTables, generation: int) -> None:
    """Rewrite the members layout (imgclust.members) from the current tables unless it already
    is of ``generation``."""
    layout = MemberLayout.open(store)
    if layout is not None and layout.generation == generation:
        return
    index_of = dict(zip(current["manifest"]["path"], current["manifest"]["index"]))
    assignments = current["assignments"]
    write_members(store, assignments, assignments["path"].map(index_of).to_numpy(np.int64), generation)
