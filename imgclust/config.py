"""The single, validated configuration object of a clustering run."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from imgclust.io.imagefile import DEFAULT_MAX_MEGAPIXELS
from imgclust.presets import PRESETS
from imgclust.runstore import Location, RunStore

FINETUNE_LEARNING_RATE = 1e-4  # a pretrained encoder moves little: ten times below the default's


class ConfigError(ValueError):
    """A parameter is wrong; raised before any heavy work. ``param`` names it."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


# fsspec options that carry credentials: never flow parameters, which Prefect stores in clear.
CREDENTIAL_KEYS = frozenset({
    "key", "secret", "token", "password", "passwd", "session_token", "access_key", "secret_key",
    "aws_access_key_id", "aws_secret_access_key", "aws_session_token", "account_key", "sas_token",
    "client_secret", "credential", "credentials", "api_key", "connection_string"})


def split_credentials(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(options without credentials, the credentials), also inside ``client_kwargs``."""
    public = {k: v for k, v in options.items() if k not in CREDENTIAL_KEYS}
    secret = {k: v for k, v in options.items() if k in CREDENTIAL_KEYS}
    inner = options.get("client_kwargs")
    if isinstance(inner, dict) and CREDENTIAL_KEYS & set(inner):
        public["client_kwargs"] = {k: v for k, v in inner.items() if k not in CREDENTIAL_KEYS}
        secret["client_kwargs"] = {k: v for k, v in inner.items() if k in CREDENTIAL_KEYS}
    return public, secret


def merge_options(public: dict[str, Any], secret: dict[str, Any]) -> dict[str, Any]:
    merged = {**public, **{k: v for k, v in secret.items() if k != "client_kwargs"}}
    if "client_kwargs" in secret:
        merged["client_kwargs"] = {**public.get("client_kwargs", {}), **secret["client_kwargs"]}
    return merged


class FlowConfig(BaseModel):
    """What every flow's config has: fsspec options without credentials.

    Flow parameters are stored by Prefect in clear (its database, the UI, the API), so credentials
    are refused here. They reach the flow out of band: the environment (``AWS_ACCESS_KEY_ID`` ...),
    a profile, or the command line, whose ``--storage-options`` credentials the CLI hands to the
    flow's process (``with_credentials``) and never to Prefect.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec storage options without credentials (e.g. endpoint_url, "
        "anon); credentials come from the environment or a profile.")
    _credentials: dict[str, Any] = PrivateAttr(default_factory=dict)

    @field_validator("storage_options")
    @classmethod
    def _no_credentials(cls, v: dict[str, Any]) -> dict[str, Any]:
        _, secret = split_credentials(v)
        if secret:
            names = sorted(set(secret) - {"client_kwargs"} | set(secret.get("client_kwargs", {})))
            raise ValueError(f"credentials ({', '.join(names)}) must not be flow parameters, which Prefect "
                             "stores in clear: put them in the environment (AWS_ACCESS_KEY_ID, "
                             "AWS_SECRET_ACCESS_KEY, ...) or a profile, or pass them with --storage-options on "
                             "the imgclust command line, which keeps them out of the parameters")
        return v

    def with_credentials(self, credentials: dict[str, Any]) -> FlowConfig:
        """Attach credentials for this process only: they are used to reach storage, never serialised."""
        self._credentials = dict(credentials)
        return self

    @property
    def options(self) -> dict[str, Any]:
        """The storage options to reach storage with: the parameters' plus the attached credentials."""
        return merge_options(dict(self.storage_options), self._credentials)


class RunConfig(FlowConfig):
    """Every parameter of ``cluster-archive``; the CLI, config files and deployments all fill this."""

    source: str = Field(description="Folder or fsspec URL (s3://bucket/prefix) holding the images.")
    output: str = Field(description="Folder or fsspec URL the run writes to; must not lie inside source.")
    image_size: tuple[int, int] | int | str | None = Field(
        default=None, description="Height and width images are resized to: [h, w], 'HxW', or one number "
        "for square. Default: the preset's own size.")
    color: Literal["auto", "rgb", "gray"] = Field(
        default="auto", description="Channels: rgb, gray, or auto (gray when every sampled image is grayscale).")
    fit: Literal["crop", "pad"] = Field(
        default="crop", description="crop: centre-crop to the target aspect; pad: letterbox on black.")
    max_megapixels: float = Field(
        default=DEFAULT_MAX_MEGAPIXELS, gt=0, le=10_000,
        description="Largest decode accepted, in megapixels held in memory; a JPEG counts at the reduced scale "
        "it is decoded at (a 144 MP photo decodes at 2.3 MP for 32x32). Larger images are rejected with their size.")
    thumbnail_size: int = Field(
        default=128, ge=0, le=512, description="Largest side of the square thumbnails decoded with the images "
        "for `imgclust serve` (the whole image, letterboxed): smaller when nine images in ten are smaller (the "
        "90th percentile of their sides, rounded up to a multiple of 8, at least 32); 0 writes none.")
    preset: str = Field(default="default", description="Model preset: " + ", ".join(PRESETS))
    encoder: str | None = Field(
        default=None, description="An encoder used as it is instead of the preset's trained one: pixels, "
        "resnet18/34/50/101/152 (with encoder_weights), torchscript:PATH or onnx:PATH (a local path or fsspec URL). "
        "Its features are clustered as the preset's codes would be; images are stored at its input size "
        "unless image_size says otherwise.")
    encoder_steps: int = Field(
        default=0, ge=0, le=10_000_000, description="Fine-tune a ResNet encoder contrastively (SimCLR, as the "
        "default preset trains its own) for this many optimiser steps before encoding; 0 uses it frozen. Default "
        "learning rate 1e-4.")
    encoder_weights: str | None = Field(
        default=None, description="Local path or fsspec URL of a ResNet encoder's state dict (torchvision's .pth "
        "files); nothing is downloaded.")
    epochs: int | None = Field(
        default=None, ge=1, le=10_000,
        description=f"Training epochs (default: the preset's; for default, {PRESETS['default'].budget_epochs} epochs' "
        f"worth of steps within {PRESETS['default'].step_range[0]:,}-{PRESETS['default'].step_range[1]:,}); also "
        "bounds each refinement phase.")
    train_steps: int | None = Field(
        default=None, ge=1, le=10_000_000, description="Optimiser steps of training, instead of --epochs (which "
        "means epochs x ceil(images / batch size) steps).")
    batch_size: int = Field(default=256, ge=1, le=65_536, description="Training and encoding batch size.")
    learning_rate: float | None = Field(default=None, gt=0, lt=1, description="Adam learning rate (default: preset's).")
    n_clusters: int | None = Field(
        default=None, ge=2, le=100_000,
        description="Number of clusters; default chooses k from the data (silhouette on a sample).")
    seed: int = Field(default=0, ge=0, description="Fixes training and clustering.")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="Where the autoencoder trains.")
    dask_address: str | None = Field(
        default_factory=lambda: os.environ.get("IMGCLUST_DASK_ADDRESS") or None,
        description="Dask scheduler address; default $IMGCLUST_DASK_ADDRESS, else a local cluster.")
    n_workers: int | None = Field(default=None, ge=1, le=1024, description="Local cluster worker processes.")
    dask_cluster_class: str | None = Field(
        default=None, description="Dotted path of a Dask cluster class to start instead of a local cluster, e.g. "
        "dask_kubernetes.operator.KubeCluster or dask_jobqueue.SLURMCluster.")
    dask_cluster_kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of that class.")
    shard_size: int = Field(default=1024, ge=1, le=65_536, description="Images per Zarr chunk and per Dask task.")
    overwrite: bool = Field(default=False, description="Replace a finished run in output (an unfinished one is "
                            "resumed without it).")
    refine: bool | None = Field(
        default=None, description="Refine K-means with the neighbour-consistent cluster net (default: the "
        "preset's choice; on for default). Off keeps K-means' clusters, e.g. for very uneven group sizes.")
    merge: bool | None = Field(
        default=None, description="Cut the manifold into 5x more K-means pieces and join them along its k-NN "
        "graph, instead of plain K-means (default: the preset's choice).")
    train_sample: int | None = Field(
        default=None, ge=1, description="Train on a fixed random sample of this many images when the archive is "
        "larger (every image is still encoded and clustered). Default: all.")
    lease_seconds: float = Field(
        default=120.0, ge=1, le=86_400, description="A run holds a lease on output, renewed every quarter of this; "
        "a killed run's lease expires after it, and the next run takes over.")
    force_unlock: bool = Field(default=False, description="Take the output's lease even when another run seems "
                               "to hold it (it stops at its next heartbeat).")

    @field_validator("image_size", mode="before")
    @classmethod
    def _parse_size(cls, v: Any) -> tuple[int, int] | None:
        """``"HxW"``, ``"N"``, ``N``, ``[N]`` or ``[H, W]`` -> (H, W); anything else is refused."""
        if v is None:
            return None
        bad = ValueError(f"expected HxW (e.g. 240x320) or one number, got {v!r}")
        if isinstance(v, bool):
            raise bad
        if isinstance(v, str):
            parts = v.strip().lower().split("x")
            if not all(p.strip().isdigit() for p in parts) or len(parts) > 2:
                raise bad
            v = [int(p) for p in parts]
        if isinstance(v, int):
            v = [v]
        if not isinstance(v, (list, tuple)) or not 1 <= len(v) <= 2 or not all(
                isinstance(s, int) and not isinstance(s, bool) for s in v):
            raise bad
        h, w = (v[0], v[0]) if len(v) == 1 else (v[0], v[1])
        if not all(8 <= s <= 2048 for s in (h, w)):
            raise ValueError(f"each side must be between 8 and 2048 pixels, got {h}x{w}")
        return (h, w)

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        if v not in PRESETS:
            raise ValueError(f"unknown preset {v!r}; choose one of {', '.join(PRESETS)}")
        return v

    @field_validator("source", "output")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v.strip()

    @field_validator("dask_cluster_class")
    @classmethod
    def _importable_class(cls, v: str | None) -> str | None:
        if v is not None:
            from imgclust.dask_cluster import import_class

            import_class(v)
        return v

    @model_validator(mode="after")
    def _known_encoder(self) -> RunConfig:
        if self.encoder is None:
            if self.encoder_weights is not None:
                raise ValueError("encoder_weights: give --encoder too (e.g. --encoder resnet50)")
            if self.encoder_steps:
                raise ValueError("encoder_steps: give --encoder too (a ResNet to fine-tune)")
            return self
        from imgclust.io.storage import open_fs
        from imgclust.models.pretrained import EncoderChoice

        choice = EncoderChoice.parse(self.encoder, self.encoder_weights)  # EncoderError is a ValueError
        if self.encoder_steps and choice.kind != "resnet":
            raise ValueError(f"encoder_steps: only a ResNet encoder can be fine-tuned, not {choice.kind}")
        if choice.source is not None:
            fs, path = open_fs(choice.source)
            if not fs.isfile(path):
                what = "--encoder-weights" if choice.kind == "resnet" else "the encoder's file"
                hint = ""
                if choice.kind == "resnet":
                    from imgclust.models.pretrained import weight_hint

                    hint = f"; get one {weight_hint(choice.name)}"
                raise ValueError(f"encoder: {what} {choice.source} is not a file{hint}")
        return self

    @model_validator(mode="after")
    def _one_training_length(self) -> RunConfig:
        if self.epochs is not None and self.train_steps is not None:
            raise ValueError("train_steps: give --epochs or --train-steps, not both")
        return self

    @model_validator(mode="after")
    def _output_outside_source(self) -> RunConfig:
        from imgclust.io.storage import lies_within

        if lies_within(self.output, self.source):
            raise ValueError(f"output ({self.output}) must not be the source or lie inside it ({self.source})")
        return self

    # Resolved values: the preset (or the encoder) decides what the user left open.
    @property
    def encoder_choice(self) -> Any:
        """The ``EncoderChoice`` of ``encoder``, or None for the preset's own trained encoder."""
        if self.encoder is None:
            return None
        from imgclust.models.pretrained import EncoderChoice

        return EncoderChoice.parse(self.encoder, self.encoder_weights)

    @property
    def resolved_image_size(self) -> tuple[int, int]:
        """``image_size``, else the encoder's input size (224x224 for a ResNet), else the preset's."""
        if isinstance(self.image_size, tuple):
            return self.image_size
        choice = self.encoder_choice
        if choice is not None:
            from imgclust.models.pretrained import encoder_input_size

            size = encoder_input_size(choice)
            if size is not None:
                return size
        return PRESETS[self.preset].image_size

    @property
    def resolved_refine(self) -> bool:
        """``refine``, else the preset's choice; off with ``encoder``, whose frozen features a net
        trained from the pixels would replace."""
        if self.refine is not None:
            return self.refine
        return PRESETS[self.preset].refine and self.encoder is None

    @property
    def resolved_learning_rate(self) -> float:
        """``learning_rate``, else 1e-4 to fine-tune a pretrained encoder, else the preset's."""
        return self.learning_rate or (FINETUNE_LEARNING_RATE if self.encoder_steps else PRESETS[self.preset].learning_rate)

    @property
    def source_location(self) -> Location:
        return Location(self.source, self.options)

    @property
    def store(self) -> RunStore:
        """The run's output store."""
        return RunStore(self.output, self.options)

    def public_dict(self) -> dict[str, Any]:
        """The config as written to run.json: storage options are replaced by their key names."""
        d = self.model_dump(mode="json")
        d["storage_options"] = {k: "***" for k in self.storage_options}
        return d


class FinishedRunConfig(FlowConfig):
    """What every flow over a finished run needs: where the run is, how to reach it, its lease."""

    run_dir: str = Field(description="Output folder/URL of a finished cluster-archive run.")
    dask_address: str | None = None
    lease_seconds: float = Field(default=120.0, ge=1, le=86_400, description="Lease on run_dir; see RunConfig.")
    force_unlock: bool = Field(default=False, description="Take run_dir's lease even if another run holds it.")

    @property
    def store(self) -> RunStore:
        return RunStore(self.run_dir, self.options)


class AssignConfig(FinishedRunConfig):
    """Parameters of ``assign-new``: which finished run to extend, and where to look for new images."""

    source: str = Field(description="Folder or fsspec URL to scan for images the run has not seen.")
    n_workers: int | None = Field(default=None, ge=1)

    @property
    def source_location(self) -> Location:
        return Location(self.source, self.options)

    @model_validator(mode="after")
    def _run_outside_source(self) -> AssignConfig:
        from imgclust.io.storage import lies_within

        if lies_within(self.run_dir, self.source):
            raise ValueError(f"source ({self.source}) contains the run ({self.run_dir}): its report and arrays "
                             "would be taken for new images")
        return self


class ReclusterConfig(FinishedRunConfig):
    """Parameters of ``recluster``: which run, which cluster, how many sub-clusters."""

    cluster: int = Field(ge=0, description="Cluster id to split.")
    n_clusters: int | None = Field(default=None, ge=2, description="Sub-clusters; default chosen by silhouette.")
    seed: int = Field(default=0, ge=0)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a YAML, TOML or JSON file (keys as in RunConfig)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("config", f"file not found: {p}")
    text = p.read_text()
    try:
        if p.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        elif p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
    except Exception as exc:  # the parser's own message is the useful part
        raise ConfigError("config", f"cannot parse {p}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError("config", f"{p} must hold a mapping of settings")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    return data
