"""Stage 3: train the preset's autoencoder on batches streamed from images.zarr."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from distributed import Client

from imgclust.dask_cluster import gpu_workers
from imgclust.io.arrays import create_array, open_array, open_if_exists
from imgclust.io.storage import open_fs, remove, with_retries, write_bytes_atomic
from imgclust.models.pretrained import read_source
from imgclust.models.training import TrainPlan, train_autoencoder, training_rows, untrained_result
from imgclust.presets import PRESETS
from imgclust.runmodel import ModelFormatError, ModelRef, RunModel
from imgclust.runstore import Location, RunStore
from imgclust.stages.ingest import compact_into
from imgclust.state.resume import fingerprint

logger = logging.getLogger("imgclust")


@dataclass(frozen=True)
class Trained:
    model_token: str  # RunModel.token of the saved model: workers cache it under this
    weights_sha256: str  # identity of the trained weights
    losses: list[float]
    device: str
    code_dim: int
    resumed_from_step: int = 0

    @property
    def ref(self) -> ModelRef:
        return ModelRef(self.model_token, self.weights_sha256, self.code_dim)


def train_key(plan: TrainPlan, ingest_key: str) -> str:
    """Identity of a training: the images and every setting that shapes the weights (for an
    encoder the run does not train: which one, and the sha256 of its file)."""
    settings = (plan.steps, plan.batch_size, plan.learning_rate, plan.seed, plan.train_sample)
    colour = PRESETS[plan.preset].colour_distortion
    if colour != "none":  # the views the pretext trains on
        settings = (*settings, colour)
    choice = plan.untrained or plan.encoder
    if choice is None:
        return fingerprint("train", ingest_key, plan.preset, *settings)
    encoder = [choice.as_dict(), read_source(choice.source)[1] if choice.source else ""]  # reads the file once
    if plan.untrained is not None:
        return fingerprint("encoder", ingest_key, plan.preset, *encoder)
    return fingerprint("train", ingest_key, plan.preset, *settings, encoder)


def finished_training(store: RunStore, key: str) -> Trained | None:
    """The saved model when training with exactly this key already completed."""
    try:
        model = RunModel.load(Location(store.model, store.storage_options))
    except ModelFormatError:
        return None
    if model.autoencoder is None or model.spec.get("train_key") != key:
        return None
    return Trained(model.token, model.weights_sha256, model.spec["losses"], model.spec.get("device", "cpu"), model.code_dim)


def sampled_copy(store: RunStore, plan: TrainPlan, ingest_key: str, client: Client) -> str | None:
    """With ``--train-sample`` smaller than the corpus: the sampled images copied once, in parallel
    on the workers, into ``_work/train-sample.zarr``, which training then reads pass after pass
    instead of the whole corpus. None when training uses every image."""
    so = store.storage_options
    images = open_array(store.images, so)
    rows = training_rows(images.shape[0], plan.train_sample, plan.seed)
    if rows is None:
        return None
    url = store.work("train-sample.zarr")
    key = fingerprint("train-sample", ingest_key, plan.train_sample, plan.seed)
    done = open_if_exists(url, so)
    if done is not None and done.attrs.get("sample_key") == key:
        return url
    create_array(url, (len(rows), *images.shape[1:]), images.chunks[0], "uint8", so, dict(images.attrs))
    compact_into(Location(store.images, so), Location(url, so), rows, 0, client)
    open_array(url, so, mode="r+").attrs["sample_key"] = key  # last: marks the copy complete
    logger.info("train: copied the %d sampled images to %s", len(rows), url)
    return url


def train(store: RunStore, plan: TrainPlan, ingest_key: str, images_url: str | None = None,
          key: str | None = None) -> Trained:
    """Train on ``images.zarr`` (or ``images_url``, its sampled copy) and save the autoencoder as
    the run's model (``model/``).

    A checkpoint under ``_work/resume/`` lets a killed run continue where it stopped; a finished
    training with the same key (``train_key``, computed here unless given) is reused.
    """
    so = store.storage_options
    key = key or train_key(plan, ingest_key or store.images)
    done = finished_training(store, key)
    if done is not None:
        logger.info("train: already done for this data and these settings; reusing the model")
        return done
    checkpoint = store.resume(f"train-{key[:16]}.pt")

    def load_checkpoint() -> bytes | None:
        fs, path = open_fs(checkpoint, so)
        try:
            return with_retries(fs.cat_file, path)
        except FileNotFoundError:
            return None

    if plan.untrained is not None:
        result = untrained_result(open_array(store.images, so), plan.untrained)
    else:
        result = train_autoencoder(open_array(images_url or store.images, so), plan, load_checkpoint,
                                   lambda data: write_bytes_atomic(checkpoint, data, so))
    model = RunModel(result.model, {**result.spec, "train_key": key})
    model.save(Location(store.model, so))
    remove(checkpoint, so)
    if images_url is not None:
        remove(images_url, so)
    return Trained(model.token, model.weights_sha256, result.losses, result.device, model.code_dim, result.resumed_from_step)


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_training_device(client: Client, device: str) -> None:
    """With ``device="cuda"``, the place training will run must have CUDA: the GPU workers when the
    cluster declares some (``train_where_best`` pins training there), else this process.

    Raises ``ValueError`` saying which was asked and found, before any work starts.
    """
    if device != "cuda":
        return
    gpus = gpu_workers(client)
    if gpus:
        found = client.run(_cuda_devices, workers=gpus)
        if any(n > 0 for n in found.values()):
            return
        where = f"the workers that declare a GPU resource ({', '.join(gpus)}) have no CUDA device"
    else:
        if _cuda_devices() > 0:
            return
        where = ("no worker declares a GPU resource (dask worker --resources GPU=1), so training runs here, "
                 "and this machine has no CUDA device")
    raise ValueError(f"cuda was asked for but {where}; use --device auto or cpu")


def train_where_best(store: RunStore, plan: TrainPlan, ingest_key: str, client: Client) -> Trained:
    """Train on a worker that declares a GPU resource when the cluster has one, here otherwise.

    Training is one sequential job: on a GPU worker it gets the accelerator; without one it runs in
    the flow's process, which avoids shipping the loop to a worker that is no faster.
    """
    key = train_key(plan, ingest_key or store.images)  # once: an encoder's key hashes its weights file
    if plan.untrained is not None or finished_training(store, key) is not None:
        return train(store, plan, ingest_key, key=key)  # nothing to train, or reused as it is: no sample copy needed
    sample = sampled_copy(store, plan, ingest_key, client)
    gpus = gpu_workers(client)
    if gpus:
        logger.info("train: pinned to a GPU worker (%s)", ", ".join(gpus))
        return client.submit(train, store, plan, ingest_key, sample, key, resources={"GPU": 1}, pure=False).result()
    return train(store, plan, ingest_key, sample, key)
