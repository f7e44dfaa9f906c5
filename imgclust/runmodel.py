"""The fitted state of a run in one object: pixels -> code -> features -> cluster.

``RunModel`` is what encode, cluster, refine, ``assign``, ``neighbors`` and the report share, in
the manner of a scikit-learn estimator: ``encode``, ``features``, ``predict``, ``save`` / ``load``.

On disk it is a versioned folder (``model/``) of JSON, arrays and torch weights:

- ``model.json``: format version, the autoencoder's spec (everything needed to rebuild it, the loss
  per round of steps), the code space and cluster placement's layout, the refiner's spec, and the sha256 of
  every binary file;
- ``weights.pt``, ``refiner.pt``: torch state dicts, read with ``weights_only=True``;
- ``clustering.npz``: numeric arrays only, read with ``allow_pickle=False``.

Nothing is a pickle, so loading a run from a shared bucket never runs code from it; a file that
does not match ``model.json``'s checksum, or cannot be parsed as the data it should hold, is
refused with ``ModelFormatError``.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from imgclust import __version__
from imgclust.cluster.code_space import CodeSpace
from imgclust.cluster.placement import ClusterPlacement
from imgclust.io.storage import with_retries, write_bytes_atomic
from imgclust.models.autoencoders import ARCHITECTURES, UNTRAINED, Autoencoder, build_model
from imgclust.models.encoding import encode_array
from imgclust.models.refiner import ClusterNet, apply_restored, predict
from imgclust.runstore import Location

MODEL_FORMAT = 1
MODEL_FILE = "model.json"
ARRAYS = ("mean", "std", "reference", "embedding", "centres", "density_reference", "density_labels",
          "sub_centres", "sub_to_cluster")


@dataclass(frozen=True)
class ModelRef:
    """What the stages pass around instead of a model: where workers find it, and its identity.

    ``token`` identifies the saved folder as a whole (workers cache the loaded model under it);
    ``weights_sha256`` identifies the autoencoder alone (encoded codes are keyed on it, so adding
    clusters or a refiner to the model does not invalidate them).
    """

    token: str
    weights_sha256: str
    code_dim: int


class ModelFormatError(ValueError):
    """A run's ``model/`` cannot be loaded: written by another version, incomplete, or modified."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _state_dict_bytes(module: torch.nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, buf)
    return buf.getvalue()


@dataclass
class RunModel:
    """Everything needed to turn images into clusters.

    Attributes
    ----------
    autoencoder:
        The trained encoder/decoder, or an encoder the run did not train (raw pixels, a frozen
        pretrained backbone: ``imgclust.models.pretrained``, no decoder); None for a re-clustering,
        which reuses its run's.
    spec:
        JSON-able spec that rebuilds ``autoencoder`` (architecture, channels, image size, code size)
        plus how it was trained (losses, training key).
    code_space:
        Codes -> clustered features (standardisation, manifold); None before clustering.
    placement:
        Features -> cluster; None before clustering.
    refiner, refiner_spec:
        The cluster net that decides a refined run's clusters from pixels, and its spec (with
        ``remap``, the net's output -> cluster id); None for unrefined runs.
    weights_sha256:
        Identity of the autoencoder's weights.
    token:
        Identity of the whole saved model (the sha256 of its ``model.json``, which lists every
        file's checksum): workers cache the loaded model under it.
    """

    autoencoder: Autoencoder | torch.nn.Module | None
    spec: dict[str, Any]
    code_space: CodeSpace | None = None
    placement: ClusterPlacement | None = None
    refiner: ClusterNet | None = None
    refiner_spec: dict[str, Any] | None = None
    weights_sha256: str = ""
    token: str = ""

    # -- transforming -------------------------------------------------------------------------
    @property
    def ref(self) -> ModelRef:
        """This saved model's reference (``save`` or ``load`` first)."""
        return ModelRef(self.token, self.weights_sha256, self.code_dim)

    @property
    def code_dim(self) -> int:
        return int(np.prod(self.autoencoder.code_shape)) if self.autoencoder is not None else 0

    def encode(self, pixels: np.ndarray, batch_size: int = 256, device: torch.device | str = "cpu") -> np.ndarray:
        """uint8 images (N, C, H, W) -> codes (N, D) float32."""
        if self.autoencoder is None:
            raise ModelFormatError("this model has no autoencoder")
        codes, _, _ = encode_array(self.autoencoder, pixels, batch_size, device)
        return codes if len(codes) else np.zeros((0, self.code_dim), np.float32)

    def standardise(self, codes: np.ndarray) -> np.ndarray:
        """Codes (N, D) -> standardised codes (N, D) float64, as clustering scaled them."""
        return self._space().standardise(codes)

    def features(self, codes: np.ndarray) -> np.ndarray:
        """Codes (N, D) -> the features (N, d) float64 the clusters live in."""
        return self._space().features(codes)

    def predict(self, pixels: np.ndarray, codes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Cluster (N,) int64 and distance to its centre (N,) float64 of uint8 images (N, C, H, W).

        ``codes`` (N, D) saves encoding them again when they are at hand. A refined run's net
        decides from the pixels, as it did for the run's own images; otherwise the placement
        decides from the features.
        """
        if self.placement is None:
            raise ModelFormatError("this model has no clusters yet (the run did not finish clustering)")
        codes = self.encode(pixels) if codes is None else codes
        x = self.features(codes)
        if self.refiner is None:
            return self.placement.assign(x)
        labels = self.refine_labels(pixels, x)
        return labels, self.placement.distances(x, labels)

    def refine_labels(self, pixels: np.ndarray, features: np.ndarray) -> np.ndarray:
        """The cluster net's cluster (N,) int64 of uint8 images (N, C, H, W) with their features
        (N, d), in the run's ids. Where the run restored K-means clusters the net left empty,
        the images nearest those K-means centres get them, as the run's own images did."""
        assert self.refiner is not None and self.refiner_spec is not None
        raw = self.refiner_raw(pixels)
        restored = self.refiner_spec.get("restored")
        if restored:
            centres = np.asarray(self.refiner_spec["kmeans_centres"], np.float64)
            kmeans = ((np.asarray(features, np.float64)[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
            raw = apply_restored(raw, kmeans, restored)
        return np.asarray(self.refiner_spec["remap"], np.int64)[raw]

    def refiner_raw(self, pixels: np.ndarray) -> np.ndarray:
        """The net's own choice (N,) int32 before the run's size ordering."""
        assert self.refiner is not None
        probs = predict(self.refiner, torch.from_numpy(np.asarray(pixels)).float().div_(255.0))
        return probs.argmax(1).astype(np.int32)

    def _space(self) -> CodeSpace:
        if self.code_space is None:
            raise ModelFormatError("this model has no code space yet (the run did not finish clustering)")
        return self.code_space

    # -- persistence --------------------------------------------------------------------------
    def save(self, location: Location) -> None:
        """Write the model folder; ``model.json`` last, so a reader never sees a half-written model."""
        so = location.storage_options
        record: dict[str, Any] = {"format": MODEL_FORMAT, "written_by": f"imgclust {__version__}",
                                  "autoencoder": self.spec if self.autoencoder is not None else None, "files": {}}
        if self.autoencoder is not None:
            data = _state_dict_bytes(self.autoencoder)
            self.weights_sha256 = _sha256(data)
            write_bytes_atomic(location.path("weights.pt"), data, so)
            record["files"]["weights.pt"] = self.weights_sha256
        if self.code_space is not None and self.placement is not None:
            arrays = self._arrays()
            buf = io.BytesIO()
            np.savez(buf, **arrays)
            data = buf.getvalue()
            write_bytes_atomic(location.path("clustering.npz"), data, so)
            record["files"]["clustering.npz"] = _sha256(data)
            record["clustering"] = {"placement": self.placement.kind, "arrays": sorted(arrays),
                                    "n_clusters": len(self.placement.centres)}
        if self.refiner is not None and self.refiner_spec is not None:
            data = _state_dict_bytes(self.refiner)
            write_bytes_atomic(location.path("refiner.pt"), data, so)
            record["files"]["refiner.pt"] = _sha256(data)
            record["refiner"] = self.refiner_spec
        data = json.dumps(record, indent=2, default=str).encode()
        write_bytes_atomic(location.path(MODEL_FILE), data, so)
        self.token = _sha256(data)

    def _arrays(self) -> dict[str, np.ndarray]:
        cs, pl = self.code_space, self.placement
        assert cs is not None and pl is not None
        values = {"mean": cs.mean, "std": cs.std, "reference": cs.reference, "embedding": cs.embedding,
                  "centres": pl.centres, "density_reference": pl.reference, "density_labels": pl.reference_labels,
                  "sub_centres": pl.sub_centres, "sub_to_cluster": pl.sub_to_cluster}
        return {k: np.asarray(v) for k, v in values.items() if v is not None}

    @classmethod
    def load(cls, location: Location, device: torch.device | str = "cpu") -> RunModel:
        """Read a model folder written by ``save``; raise ``ModelFormatError`` with the reason when
        it was written by an incompatible version, is incomplete, or was modified."""
        fs, root = location.fs()
        raw, record = _read_record(fs, root, location.url)
        files = record.get("files", {})

        def read(name: str) -> bytes:
            try:
                data = with_retries(fs.cat_file, f"{root}/{name}")
            except FileNotFoundError:
                raise ModelFormatError(f"{location.url}: {name} is missing") from None
            if _sha256(data) != files.get(name):
                raise ModelFormatError(f"{location.url}: {name} does not match the checksum in {MODEL_FILE} "
                                       "(modified or partly written); refusing to load it")
            return data

        model = cls(None, record.get("autoencoder") or {}, token=_sha256(raw))
        if record.get("autoencoder") is not None:
            spec = record["autoencoder"]
            if spec.get("architecture") not in (*ARCHITECTURES, *UNTRAINED):
                raise ModelFormatError(f"{location.url}: unknown architecture {spec.get('architecture')!r}")
            data = read("weights.pt")
            try:
                ae = build_model(spec)
            except (KeyError, TypeError, ValueError) as exc:  # EncoderError: a changed or missing encoder file
                raise ModelFormatError(f"{location.url}: cannot rebuild its encoder: {exc}") from None
            ae.load_state_dict(_load_state(data, location.url, "weights.pt", device))
            model.autoencoder, model.weights_sha256 = ae.to(device).eval(), files["weights.pt"]
        if record.get("clustering") is not None:
            model.code_space, model.placement = _load_clustering(read("clustering.npz"), location.url)
        if record.get("refiner") is not None:
            spec = record["refiner"]
            try:
                net = ClusterNet(int(spec["channels"]), int(spec["k"]), int(spec["width"]))
            except (KeyError, TypeError, ValueError) as exc:
                raise ModelFormatError(f"{location.url}: refiner spec is not valid: {exc}") from None
            net.load_state_dict(_load_state(read("refiner.pt"), location.url, "refiner.pt", "cpu"))
            model.refiner, model.refiner_spec = net.eval(), spec
        return model


def _read_record(fs: Any, root: str, url: str) -> tuple[bytes, dict[str, Any]]:
    try:
        raw = with_retries(fs.cat_file, f"{root}/{MODEL_FILE}")
    except FileNotFoundError:
        if any(with_retries(fs.exists, f"{root}/{old}") for old in ("clusterer.pkl", "spec.json")):
            raise ModelFormatError(f"{url} was written by an older version of imgclust (spec.json and a pickled "
                                   "clusterer), which this version does not load: run the same command again with "
                                   "--overwrite to rebuild it") from None
        raise ModelFormatError(f"{url} holds no model ({MODEL_FILE} missing): the run has not finished "
                               "training") from None
    try:
        record = json.loads(raw)
    except ValueError as exc:
        raise ModelFormatError(f"{url}/{MODEL_FILE} is not valid JSON: {exc}") from None
    if not isinstance(record, dict) or not isinstance(record.get("format"), int):
        raise ModelFormatError(f"{url}/{MODEL_FILE} has no format version")
    if record["format"] != MODEL_FORMAT:
        newer = record["format"] > MODEL_FORMAT
        raise ModelFormatError(f"{url} holds a model of format {record['format']} ({record.get('written_by', '?')}); "
                               f"this version reads format {MODEL_FORMAT}: "
                               + ("upgrade imgclust" if newer else "run the same command again with --overwrite"))
    return raw, record


def _load_state(data: bytes, url: str, name: str, device: torch.device | str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except Exception as exc:  # weights_only refuses anything but tensors and plain values
        raise ModelFormatError(f"{url}/{name} is not a plain state dict of tensors: {type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFormatError(f"{url}/{name} is not a state dict of tensors")
    return state


def _load_clustering(data: bytes, url: str) -> tuple[CodeSpace, ClusterPlacement]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            a = {k: npz[k] for k in npz.files}
    except Exception as exc:
        raise ModelFormatError(f"{url}/clustering.npz is not an archive of numeric arrays: {exc}") from None
    unknown = set(a) - set(ARRAYS)
    if unknown or not {"mean", "std", "centres"} <= set(a) or any(v.dtype == object for v in a.values()):
        raise ModelFormatError(f"{url}/clustering.npz does not hold the expected arrays")
    space = CodeSpace(a["mean"], a["std"], a.get("reference"), a.get("embedding"))
    placement = ClusterPlacement(a["centres"], a.get("density_reference"), a.get("density_labels"),
                                 a.get("sub_centres"), a.get("sub_to_cluster"))
    return space, placement
