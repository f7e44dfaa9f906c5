"""What a stage has finished, recorded per shard in the output store, so a killed run redoes only the rest.

Every record lives under a key made of the content (file hashes) and the settings that shape the
result. A run with the same content and settings finds the records and skips that work; change
either and the key changes, so stale work is never reused.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from typing import Any

from imgclust.io.storage import join, open_fs, remove, with_retries, write_json
from imgclust.runstore import RunStore


def fingerprint(*parts: Any) -> str:
    """A stable sha256 of JSON-able ``parts``: the identity of a unit of work."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class ShardLedger:
    """Completion records of one stage: one small JSON per finished shard, named by its start row.

    Workers write a record right after the shard's data, so a record always means the data is there.
    Plain strings only, so a ledger travels to Dask workers.
    """

    def __init__(self, store: RunStore, stage: str, key: str):
        from imgclust.state.lease import held_lease

        self.stage, self.key = stage, key
        self.url = store.resume(f"{stage}-{key[:16]}")
        self.parent = store.resume()
        self.storage_options = dict(store.storage_options)
        self.fence = held_lease(store)  # (lease URL, owner) when this process writes under a lease

    def check_fence(self) -> None:
        """On a worker, before it writes: stop when the run's lease is held by someone else now."""
        if self.fence is not None:
            from imgclust.state.lease import verify_owner

            verify_owner(*self.fence, self.storage_options)

    def mark(self, name: int | str, payload: Any) -> None:
        """Record ``name`` (a shard's start row, or a batch's fingerprint) as finished."""
        self.check_fence()
        label = f"{name:012d}" if isinstance(name, int) else name
        write_json(join(self.url, f"{label}.json"), payload, self.storage_options)

    def done(self) -> dict[str, Any]:
        """Finished names -> the payload recorded with them."""
        fs, root = open_fs(self.url, self.storage_options)
        try:
            names = [p for p in with_retries(fs.ls, root, detail=False) if p.endswith(".json")
                     and not posixpath.basename(p).startswith(".")]
        except FileNotFoundError:
            return {}
        blobs = {p: with_retries(fs.cat_file, p) for p in names}
        return {posixpath.basename(p)[:-5]: json.loads(blobs[p]) for p in names}

    def result(self) -> Any | None:
        """The payload of a stage recorded as one finished whole (``record_result``), else None."""
        return self.done().get("result")

    def record_result(self, payload: Any) -> None:
        self.mark("result", payload)

    def done_rows(self) -> dict[int, Any]:
        """Finished shards by start row."""
        return {int(k): v for k, v in self.done().items() if k.isdigit()}

    def clear(self) -> None:
        remove(self.url, self.storage_options)

    def clear_others(self) -> None:
        """Drop this stage's records made under other keys (content or settings changed)."""
        fs, root = open_fs(self.parent, self.storage_options)
        try:
            entries = with_retries(fs.ls, root, detail=False)
        except FileNotFoundError:
            return
        mine = posixpath.basename(self.url)
        for p in entries:
            name = posixpath.basename(p.rstrip("/"))
            if name.startswith(f"{self.stage}-") and name != mine:
                with_retries(fs.rm, p, recursive=True)
