"""Checks that need to look at storage, run before any heavy work so mistakes fail in seconds."""

from __future__ import annotations

from imgclust.config import ConfigError, RunConfig
from imgclust.io.storage import StorageError, remove, with_retries
from imgclust.runstore import RunStore
from imgclust.stages.discover import peek_source


def preflight(config: RunConfig) -> None:
    """Validate source, output and k against storage, in seconds and in memory that does not grow
    with the archive: the source is peeked at (enough images for k), not listed; discover lists it."""
    wanted = max(1, config.n_clusters or 1)
    try:
        paths = peek_source(config.source_location, wanted)
    except StorageError as exc:
        raise ConfigError("source", str(exc)) from None
    except Exception as exc:  # credentials, endpoint, DNS: the library's message is what helps
        raise ConfigError("source", f"cannot read {config.source}: {type(exc).__name__}: {exc}") from None
    if not paths:
        raise ConfigError("source", f"no image files ({', '.join(('jpg', 'png', 'gif', 'bmp', 'tif', 'webp'))}) "
                          f"found under {config.source}")
    _check_compute(config)
    if config.n_clusters is not None and config.n_clusters > len(paths):
        raise ConfigError("n_clusters", f"{config.n_clusters} clusters asked for but only {len(paths)} image "
                          f"files were found under {config.source}")
    try:
        store = config.store
        finished = store.is_finished
        fs, root = store.fs()
        if with_retries(fs.exists, root) and not with_retries(fs.isdir, root):
            raise ConfigError("output", f"{config.output} exists and is not a folder")
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError("output", f"cannot access {config.output}: {type(exc).__name__}: {exc}") from None
    if finished and not config.overwrite:
        raise ConfigError("output", f"{config.output} already holds a finished run; pass --overwrite to replace it")


def _check_compute(config: RunConfig) -> None:
    """A scheduler that does not answer, or CUDA asked for where there is none, fails now, not
    after ingest."""
    from imgclust.dask_cluster import check_reachable

    if config.dask_address and not config.dask_cluster_class:
        try:
            check_reachable(config.dask_address)
        except ValueError as exc:
            raise ConfigError("dask_address", str(exc)) from None
    if config.device == "cuda" and not config.dask_address and not config.dask_cluster_class:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("device", "cuda was asked for but this machine has no CUDA device (torch "
                              f"{torch.__version__}); use --device auto or cpu")


def clear_previous_run(config: RunConfig) -> None:
    """Remove only what a run writes; anything else the user keeps in output stays."""
    store = config.store
    for name in RunStore.OUTPUTS:
        remove(store.path(name), store.storage_options)
