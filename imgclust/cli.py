"""``imgclust``: the command line over the Prefect flows."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from imgclust import __version__

EXIT_USAGE = 2
EXIT_BUSY = 3  # another run holds the output's lease


def _quiet_prefect_env() -> None:
    """Set before Prefect and torch are imported: no telemetry, our logger in Prefect's logs."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "imgclust")
    os.environ.setdefault("IMGCLUST_PROGRESS", "auto")
    # The temporary Prefect server gets 20 s to start by default; a loaded machine needs more.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # Sleeping, not spinning, OpenMP threads: on a shared or busy machine spinning threads of torch
    # and BLAS starve each other (training measured 5-10x slower under load without it).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    print(f"imgclust: error: {message}", file=sys.stderr)
    return code


def _add_run_parser(sub: argparse._SubParsersAction) -> None:
    from imgclust.presets import PRESETS

    p = sub.add_parser(
        "run", help="cluster the images under SOURCE, writing results to OUTPUT",
        description="Run the cluster-archive flow: discover, ingest to Zarr, train the autoencoder, encode, "
        "cluster, publish. Options override those of --config.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("source", help="folder or fsspec URL (e.g. s3://bucket/photos) holding the images")
    p.add_argument("output", help="folder or fsspec URL to write the run to (not inside SOURCE)")
    p.add_argument("--config", help="YAML, TOML or JSON file with the same settings (keys as the long options)")
    p.add_argument("--image-size", help="HxW images are resized to, or one number for square (default: the "
                   "preset's, 32 for default, 28 for seed-mnist, 240x320 for seed-house, 152 for seed-faces)")
    p.add_argument("--color", choices=["auto", "rgb", "gray"], help="channels; auto = gray when every image is "
                   "grayscale (default auto)")
    p.add_argument("--fit", choices=["crop", "pad"], help="crop = centre-crop to the target aspect, pad = "
                   "letterbox on black (default crop)")
    p.add_argument("--max-megapixels", type=float, help="largest decode accepted, in megapixels held in memory; "
                   "JPEGs count at the reduced scale they decode at, so a 144 MP photo passes for small image "
                   "sizes (default 89.5, Pillow's own ceiling)")
    p.add_argument("--thumbnail-size", type=int, help="largest side of the thumbnails decoded with the images "
                   "for `imgclust serve` to show (whole image, letterboxed; smaller when nine images in ten are; "
                   "0 = none; default 128)")
    p.add_argument("--preset", choices=list(PRESETS), help="model preset (default: default). " + " | ".join(
        f"{k}: {v.description}" for k, v in PRESETS.items()))
    p.add_argument("--encoder", help="use this encoder as it is instead of training the preset's: pixels, "
                   "resnet18/34/50/101/152 (with --encoder-weights), torchscript:PATH or onnx:PATH (local path or "
                   "fsspec URL; nothing is downloaded). Images are stored at its input size (224x224 for a "
                   "ResNet) unless --image-size says otherwise; refinement is off unless --refine")
    p.add_argument("--encoder-steps", type=int, help="fine-tune a ResNet encoder contrastively for this many "
                   "optimiser steps before encoding (default 0: frozen; learning rate 1e-4 unless --learning-rate)")
    p.add_argument("--encoder-weights", help="local path or fsspec URL of a ResNet encoder's state dict, e.g. "
                   "torchvision's resnet50-11ad3fa6.pth")
    default = PRESETS["default"]
    p.add_argument("--epochs", type=int, help="training epochs (default: the preset's; for default, "
                   f"{default.budget_epochs} epochs' worth of steps within {default.step_range[0]:,}-"
                   f"{default.step_range[1]:,}); also bounds each refinement phase")
    p.add_argument("--train-steps", type=int, help="optimiser steps of training, instead of --epochs (which means "
                   "epochs x ceil(images / batch size) steps)")
    p.add_argument("--batch-size", type=int, help="training and encoding batch size (default 256)")
    p.add_argument("--learning-rate", type=float, help="Adam learning rate (default: the preset's)")
    p.add_argument("--n-clusters", "-k", type=int, help="number of clusters (default: chosen from the data by "
                   "silhouette, k = 2..20)")
    p.add_argument("--seed", type=int, help="fixes training and clustering (default 0)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where to train (default auto: CUDA when "
                   "present)")
    p.add_argument("--dask-address", help="scheduler address, e.g. tcp://10.0.0.5:8786 (default: "
                   "$IMGCLUST_DASK_ADDRESS, else a local cluster)")
    p.add_argument("--dask-cluster-class", help="dotted path of a cluster class to start instead, e.g. "
                   "dask_jobqueue.SLURMCluster or dask_kubernetes.operator.KubeCluster")
    p.add_argument("--dask-cluster-kwargs", type=json.loads, help="JSON keyword arguments of that class, e.g. "
                   "'{\"cores\": 8, \"memory\": \"32GB\"}'")
    p.add_argument("--n-workers", type=int, help="worker processes of the local cluster (default: cores)")
    p.add_argument("--shard-size", type=int, help="images per Zarr chunk and Dask task (default 1024)")
    p.add_argument("--storage-options", help='fsspec options as JSON, e.g. \'{"endpoint_url": '
                   '"http://127.0.0.1:9000", "anon": false}\'')
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in OUTPUT (an unfinished one "
                   "is resumed: the same command after a crash redoes only unfinished work)")
    p.add_argument("--refine", action=argparse.BooleanOptionalAction, help="refine K-means with the "
                   "neighbour-consistent cluster net (default: the preset's choice, on for default); --no-refine "
                   "keeps K-means' clusters")
    p.add_argument("--merge", action=argparse.BooleanOptionalAction, help="K-means cuts 5x more pieces, joined "
                   "along the manifold's k-NN graph (default: the preset's choice)")
    p.add_argument("--train-sample", type=int, help="train on a fixed random sample of this many images "
                   "(all are still encoded and clustered; default: train on all)")
    _add_lease_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs still report progress)")


def _add_lease_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lease-seconds", type=float, help="the run holds a lease on its output, renewed every quarter "
                   "of this; a killed run's lease expires after it (default 120)")
    p.add_argument("--force-unlock", action="store_true", help="take the output's lease even if another run "
                   "seems to hold it")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgclust", description="Unsupervised clustering of image archives "
                                     "with convolutional autoencoders, on Prefect + Dask.")
    parser.add_argument("--version", action="version", version=f"imgclust {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_parser(sub)
    ev = sub.add_parser("evaluate", help="score a finished run against known labels",
                        description="Write metrics.json (Hungarian accuracy, NMI, ARI, purity, contingency).")
    ev.add_argument("run_dir", help="output folder/URL of a finished run")
    ev.add_argument("--labels", required=True, help="CSV/Parquet with columns path,label, or 'parent-folder'")
    ev.add_argument("--storage-options", help="fsspec options as JSON")
    rp = sub.add_parser("report", help="(re)write RUN_DIR/report/index.html from a finished run",
                        description="Cluster sizes, sample grids, prototypes, attention maps, reconstructions, "
                        "loss curve and a 2-D map, as a self-contained folder of HTML and PNGs.")
    rp.add_argument("run_dir", help="output folder/URL of a finished run")
    rp.add_argument("--storage-options", help="fsspec options as JSON")
    nb = sub.add_parser("neighbors", help="the k images nearest to IMAGE by code distance",
                        description="IMAGE is a path of the run (relative to its source) or any image file, which "
                        "is then decoded and encoded with the run's model. Prints paths and distances and writes a "
                        "PNG strip (query + neighbours) to RUN_DIR/neighbors/.")
    nb.add_argument("run_dir")
    nb.add_argument("image")
    nb.add_argument("-k", type=int, default=5, help="how many neighbours (default 5)")
    nb.add_argument("--out", help="where to write the PNG strip")
    nb.add_argument("--storage-options", help="fsspec options as JSON")
    rc = sub.add_parser("recluster", help="split one cluster of a run into sub-clusters (flow recluster)",
                        description="Writes RUN_DIR/recluster/cluster-<c>/ (assignments.parquet with a subcluster "
                        "column, clusters.json) and RUN_DIR/report/recluster-<c>.html.")
    rc.add_argument("run_dir")
    rc.add_argument("cluster", type=int)
    rc.add_argument("-k", "--n-clusters", type=int, dest="n_clusters", help="sub-clusters (default: by silhouette)")
    rc.add_argument("--seed", type=int, default=0)
    rc.add_argument("--dask-address", help="Dask scheduler (default: a local cluster)")
    rc.add_argument("--storage-options", help="fsspec options as JSON")
    _add_lease_options(rc)
    cp = sub.add_parser("compact", help="rewrite a run's tables as one generation of few parts",
                        description="Nightly assign calls add parts to the tables, and corrections leave "
                        "superseded rows. compact writes each table's current rows as one new generation (parts of "
                        "at most --rows-per-part rows), then removes the parts it replaces. Safe to interrupt: "
                        "the tables read the same before, during and after.")
    cp.add_argument("run_dir")
    cp.add_argument("--rows-per-part", type=int, default=1_000_000, help="rows per Parquet part (default 1,000,000)")
    cp.add_argument("--storage-options", help="fsspec options as JSON")
    _add_lease_options(cp)
    asg = sub.add_parser("assign", help="add images new to a finished run to its clusters (flow assign-new)",
                         description="Lists SOURCE and reads only the files whose path, size or modification time the run's "
                         "tables do not hold; those whose content the run has never seen are ingested, encoded "
                         "with the run's model and assigned to the existing cluster centres, as one new generation "
                         "of table parts. Nothing new: nothing done.")
    asg.add_argument("run_dir")
    asg.add_argument("source")
    asg.add_argument("--dask-address", help="Dask scheduler (default: a local cluster)")
    asg.add_argument("--storage-options", help="fsspec options as JSON")
    _add_lease_options(asg)
    sv = sub.add_parser("serve", help="browse, search and curate a finished run in a local web app",
                        description="Starts a web app over RUN_DIR (a folder or any fsspec URL): every cluster "
                        "with its size and cohesion, each cluster's members page by page in order of distance to "
                        "its centre, a 2-D map, similar images (click one, or upload a file), and curation "
                        "(rename, merge, move, 'not this'), kept in RUN_DIR/curation/ and applied by export and the "
                        "report, also to the images later assign runs add. Bound to an address other than 127.0.0.1 it "
                        "asks for the token it prints.")
    sv.add_argument("run_dir")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    sv.add_argument("--storage-options", help="fsspec options as JSON")
    ex = sub.add_parser("export", help="write a run's clusters, curation applied, as a table or folders",
                        description="csv / parquet: one table (DEST is the file) of every image once, with path, "
                        "sha256, cluster, name, model_cluster and distance. folders: DEST/<cluster>-<name>/ "
                        "holding each member at its path relative to the source, copied (--copy, the default; "
                        "any fsspec URL) or symlinked (--link; SOURCE and DEST both local).")
    ex.add_argument("run_dir")
    ex.add_argument("dest")
    ex.add_argument("--format", choices=["csv", "parquet", "folders"], default="csv", help="default csv")
    ex.add_argument("--cluster", type=int, help="only this cluster")
    how = ex.add_mutually_exclusive_group()
    how.add_argument("--link", action="store_true", help="symlink the images instead of copying them")
    how.add_argument("--copy", action="store_true", help="copy the images (the default)")
    ex.add_argument("--source", help="where the images are now (default: the run's source)")
    ex.add_argument("--storage-options", help="fsspec options as JSON (for the run, DEST and SOURCE)")
    sa = sub.add_parser("sample", help="write scikit-learn's digits as PNG files into a folder (one folder per "
                        "digit) for a first run")
    sa.add_argument("folder")
    sa.add_argument("--size", type=int, default=28, help="side of the written PNGs (default 28)")
    return parser


def _run_settings(ns: argparse.Namespace) -> dict[str, Any]:
    from imgclust.config import load_config_file

    args = vars(ns).copy()
    settings: dict[str, Any] = {}
    if "config" in args:
        settings.update(load_config_file(args.pop("config")))
    if settings.pop("no_progress", False):  # a CLI-only switch, also accepted in config files
        os.environ["IMGCLUST_PROGRESS"] = "0"
    for key in ("command", "no_progress"):
        args.pop(key, None)
    settings.update(args)
    return settings


def _validation_message(exc: Exception) -> str:
    errors = exc.errors()  # type: ignore[attr-defined]
    parts = []
    for e in errors:
        loc = ".".join(str(x) for x in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" + (f" (got {e['input']!r})" if loc != "config" and "input" in e
                                        and not isinstance(e["input"], dict) else ""))
    return "; ".join(parts)


def cmd_run(ns: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from imgclust.config import ConfigError, RunConfig, split_credentials
    from imgclust.state.lease import LeaseHeld, LeaseLost, check_free

    if getattr(ns, "no_progress", False):
        os.environ["IMGCLUST_PROGRESS"] = "0"
    try:
        settings = _run_settings(ns)
        public, secret = split_credentials(settings.get("storage_options") or {})
        config = RunConfig(**{**settings, "storage_options": public}).with_credentials(secret)
        from imgclust.preflight import preflight

        preflight(config)
        if not config.force_unlock:
            check_free(config.store)
    except ValidationError as exc:
        return _fail(_validation_message(exc))
    except ConfigError as exc:
        return _fail(str(exc))
    except LeaseHeld as exc:
        return _fail(str(exc), EXIT_BUSY)
    print(f"imgclust: clustering the images under {config.source}; writing to {config.output}", file=sys.stderr)
    from flows.cluster_archive import cluster_archive

    try:
        record = cluster_archive(config)
    except ConfigError as exc:
        return _fail(str(exc))
    except (LeaseHeld, LeaseLost) as exc:
        return _fail(str(exc), EXIT_BUSY)
    c = record["counts"]
    print(f"done: {c['accepted']} images in {c['clusters']} clusters, {c['rejected']} rejected, "
          f"{c['duplicates']} duplicates, {c.get('near_duplicate_images', 0)} near-duplicates in "
          f"{c.get('near_duplicate_groups', 0)} groups; results in {config.output}")
    for name in ("report/index.html", "assignments.parquet", "clusters.json", "manifest.parquet",
                 "near_duplicates.parquet", "rejected.parquet", "run.json"):
        print(f"  {config.output.rstrip('/')}/{name}")
    return 0


def cmd_evaluate(ns: argparse.Namespace) -> int:
    from imgclust.evaluate import evaluate_run, format_metrics
    from imgclust.runstore import RunStore

    try:
        metrics = evaluate_run(RunStore(ns.run_dir, ns.storage_options or {}), ns.labels)
    except (FileNotFoundError, ValueError) as exc:
        return _fail(str(exc))
    print(format_metrics(metrics))
    return 0


def _finished_run_missing(ns: argparse.Namespace) -> str | None:
    """The usage error when RUN_DIR holds no finished run, or one whose model this version cannot read."""
    from imgclust.runmodel import ModelFormatError, RunModel
    from imgclust.runstore import Location, RunStore

    store = RunStore(ns.run_dir, ns.storage_options or {})
    if not store.is_finished:
        return f"run_dir: {ns.run_dir} holds no finished run (run.json missing)"
    from imgclust.io.tables import TableFormatError, part_files

    try:
        RunModel.load(Location(store.model, store.storage_options))
        part_files(store.table("manifest"), store.storage_options)
    except (ModelFormatError, TableFormatError) as exc:
        return f"run_dir: {exc}"
    return None


def cmd_report(ns: argparse.Namespace) -> int:
    from imgclust.report.build import write_report
    from imgclust.runstore import RunStore

    if missing := _finished_run_missing(ns):
        return _fail(missing)
    print(write_report(RunStore(ns.run_dir, ns.storage_options or {})))
    return 0


def cmd_neighbors(ns: argparse.Namespace) -> int:
    from imgclust.runstore import RunStore
    from imgclust.stages.explore import nearest_neighbours

    if ns.k < 1:
        return _fail("k: must be at least 1")
    if missing := _finished_run_missing(ns):
        return _fail(missing)
    try:
        found = nearest_neighbours(RunStore(ns.run_dir, ns.storage_options or {}), ns.image, ns.k, ns.out)
    except (FileNotFoundError, ValueError) as exc:
        return _fail(f"image: {exc}")
    for n in found:
        print(f"{n.distance:10.4f}  {n.path}")
    return 0


def _lease_settings(ns: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"force_unlock": ns.force_unlock}
    if ns.lease_seconds is not None:
        out["lease_seconds"] = ns.lease_seconds
    return out


def cmd_recluster(ns: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from imgclust.config import ReclusterConfig, split_credentials

    public, secret = split_credentials(ns.storage_options or {})
    try:
        cfg = ReclusterConfig(run_dir=ns.run_dir, cluster=ns.cluster, n_clusters=ns.n_clusters, seed=ns.seed,
                              storage_options=public, dask_address=ns.dask_address,
                              **_lease_settings(ns)).with_credentials(secret)
    except ValidationError as exc:
        return _fail(_validation_message(exc))

    if missing := _finished_run_missing(ns):
        return _fail(missing)
    from flows.recluster import recluster_flow
    from imgclust.state.lease import LeaseHeld

    try:
        res = recluster_flow(cfg)
    except LeaseHeld as exc:
        return _fail(str(exc), EXIT_BUSY)
    except ValueError as exc:
        return _fail(str(exc))
    print(f"cluster {ns.cluster} -> {len(res['sizes'])} subclusters of sizes {res['sizes']}")
    print(f"  {res['directory']}/assignments.parquet\n  {res['report']}")
    return 0


def cmd_assign(ns: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from imgclust.config import AssignConfig, split_credentials

    if missing := _finished_run_missing(ns):
        return _fail(missing)
    public, secret = split_credentials(ns.storage_options or {})
    try:
        cfg = AssignConfig(run_dir=ns.run_dir, source=ns.source, storage_options=public,
                           dask_address=ns.dask_address, **_lease_settings(ns)).with_credentials(secret)
    except ValidationError as exc:
        return _fail(_validation_message(exc))
    from imgclust.stages.discover import peek_source

    try:
        peek_source(cfg.source_location, 1)  # a bounded peek: assign lists it once itself
    except Exception as exc:
        return _fail(f"source: {exc}")
    from flows.assign_new import assign_new_flow
    from imgclust.state.lease import LeaseHeld

    try:
        s = assign_new_flow(cfg)
    except LeaseHeld as exc:
        return _fail(str(exc), EXIT_BUSY)
    print(f"{s['new']} new files of {s['files']}: {s['accepted']} assigned, {s['rejected']} rejected, "
          f"{s['duplicates']} duplicates ({s['seconds']:.1f} s)")
    return 0


def cmd_compact(ns: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from imgclust.config import FinishedRunConfig, split_credentials
    from imgclust.stages.compact import compact_tables
    from imgclust.state.lease import LeaseHeld, acquire_lease

    if ns.rows_per_part < 1:
        return _fail("rows_per_part: must be at least 1")
    public, secret = split_credentials(ns.storage_options or {})
    try:
        cfg = FinishedRunConfig(run_dir=ns.run_dir, storage_options=public,
                                **_lease_settings(ns)).with_credentials(secret)
    except ValidationError as exc:
        return _fail(_validation_message(exc))
    if missing := _finished_run_missing(ns):
        return _fail(missing)
    try:
        with acquire_lease(cfg.store, "compact", cfg.lease_seconds, cfg.force_unlock):
            res = compact_tables(cfg.store, ns.rows_per_part)
    except LeaseHeld as exc:
        return _fail(str(exc), EXIT_BUSY)
    rows = ", ".join(f"{name} {n:,}" for name, n in res["rows"].items())
    print(f"compacted: {sum(res['parts_before'].values())} parts -> generation {res['generation']} ({rows} rows)")
    return 0


def cmd_serve(ns: argparse.Namespace) -> int:
    import secrets

    import uvicorn

    from imgclust.runstore import RunStore
    from imgclust.serve.app import create_app, serve_url
    from imgclust.serve.catalog import NotARun, RunCatalog

    if not 0 <= ns.port <= 65535:
        return _fail(f"port: {ns.port} is not a port number (0 to 65535)")
    if missing := _finished_run_missing(ns):
        return _fail(missing)
    try:
        catalog = RunCatalog(RunStore(ns.run_dir, ns.storage_options or {}))
    except NotARun as exc:
        return _fail(f"run_dir: {exc}")
    loopback = ns.host in ("127.0.0.1", "localhost", "::1")
    token = None if loopback else secrets.token_urlsafe(24)
    config = uvicorn.Config(create_app(catalog, token), host=ns.host, port=ns.port, log_level="warning")
    server = uvicorn.Server(config)

    def announce() -> None:
        import time

        while not server.started:
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1] if server.servers else ns.port
        print(f"imgclust serve: {ns.run_dir} at {serve_url(ns.host, port, token)}  (Ctrl-C stops it)", flush=True)

    import threading

    threading.Thread(target=announce, daemon=True).start()
    server.run()
    return 0


def cmd_export(ns: argparse.Namespace) -> int:
    from imgclust.export import ExportError, export_run
    from imgclust.runstore import Location, RunStore

    if missing := _finished_run_missing(ns):
        return _fail(missing)
    so = ns.storage_options or {}
    source = Location(ns.source, so) if ns.source else None
    try:
        res = export_run(RunStore(ns.run_dir, so), Location(ns.dest, so), ns.format, ns.cluster, ns.link, source)
    except ExportError as exc:
        return _fail(str(exc))
    extra = f" in {res['clusters']} cluster folders" if "clusters" in res else ""
    print(f"exported {res['rows']:,} images{extra} to {ns.dest}")
    return 0


def cmd_sample(ns: argparse.Namespace) -> int:
    from imgclust.sample import write_digits

    n = write_digits(ns.folder, ns.size)
    print(f"wrote {n} digit images to {ns.folder} (one folder per digit)")
    return 0


def parse_storage_options(text: str) -> dict[str, Any]:
    """--storage-options JSON of every command, checked once with a clear message."""
    from imgclust.config import ConfigError

    try:
        so = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError("storage_options", f"not valid JSON: {exc}") from None
    if not isinstance(so, dict):
        raise ConfigError("storage_options", "must be a JSON object")
    return so


EXIT_INTERRUPTED = 130
RESUMABLE = {"run", "assign", "recluster"}


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C: leases, local clusters and Prefect's temporary server close."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    import signal

    from imgclust.config import ConfigError

    _quiet_prefect_env()
    ns = build_parser().parse_args(argv)
    if isinstance(getattr(ns, "storage_options", None), str):
        try:
            ns.storage_options = parse_storage_options(ns.storage_options)
        except ConfigError as exc:
            return _fail(str(exc))
    command = {"run": cmd_run, "evaluate": cmd_evaluate, "report": cmd_report, "neighbors": cmd_neighbors,
               "recluster": cmd_recluster, "assign": cmd_assign, "compact": cmd_compact,
               "serve": cmd_serve, "export": cmd_export, "sample": cmd_sample}[ns.command]
    previous = signal.signal(signal.SIGTERM, _terminate)
    if ns.command in RESUMABLE:  # commands that start servers and workers
        from imgclust.watchdog import start_watchdog

        start_watchdog()
    try:
        return command(ns)
    except KeyboardInterrupt:
        hint = "; run the same command again to resume" if ns.command in RESUMABLE else ""
        print(f"imgclust: interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
