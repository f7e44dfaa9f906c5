"""Checks that need to look at storage, run before any heavy work so mistakes fail in seconds."""

from __future__ import annotations

from imgclust.config import ConfigError, RunConfig
from imgclust.storage import StorageError, exists, join, open_fs, remove
from tasks.discover import list_images

OUTPUTS = ("run.json", "images.zarr", "codes.zarr", "model", "_work", "manifest.parquet", "rejected.parquet",
           "duplicates.parquet", "assignments.parquet", "clusters.json", "report", "metrics.json", "neighbors",
           "recluster")


def preflight(config: RunConfig) -> int:
    """Validate source, output and k against storage; returns how many image files were found."""
    so = config.storage_options
    try:
        paths = list_images(config.source, so)
    except StorageError as exc:
        raise ConfigError("source", str(exc)) from None
    except Exception as exc:  # credentials, endpoint, DNS: the library's message is what helps
        raise ConfigError("source", f"cannot read {config.source}: {type(exc).__name__}: {exc}") from None
    if not paths:
        raise ConfigError("source", f"no image files ({', '.join(('jpg', 'png', 'gif', 'bmp', 'tif', 'webp'))}) "
                          f"found under {config.source}")
    if config.n_clusters is not None and config.n_clusters > len(paths):
        raise ConfigError("n_clusters", f"{config.n_clusters} clusters asked for but only {len(paths)} image "
                          f"files were found under {config.source}")
    try:
        finished = exists(join(config.output, "run.json"), so)
        fs, root = open_fs(config.output, so)
        if fs.exists(root) and not fs.isdir(root):
            raise ConfigError("output", f"{config.output} exists and is not a folder")
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError("output", f"cannot access {config.output}: {type(exc).__name__}: {exc}") from None
    if finished and not config.overwrite:
        raise ConfigError("output", f"{config.output} already holds a finished run; pass --overwrite to replace it")
    return len(paths)


def clear_previous_run(config: RunConfig) -> None:
    """Remove only what a run writes; anything else the user keeps in output stays."""
    for name in OUTPUTS:
        remove(join(config.output, name), config.storage_options)
