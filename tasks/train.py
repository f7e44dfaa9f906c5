"""Stage 3: train the preset's autoencoder on batches streamed from images.zarr."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from distributed import Client
from prefect import task

from imgclust.batches import iter_batches
from imgclust.contrastive import ProjectionHead, augment_views, nt_xent, warmup_cosine
from imgclust.dask_cluster import gpu_workers
from imgclust.models import Autoencoder, build_model
from imgclust.presets import PRESETS
from imgclust.progress import track
from imgclust.refiner import random_shift
from imgclust.resume import fingerprint, resume_url
from imgclust.storage import join, open_fs, remove, write_bytes_atomic, write_json
from imgclust.threads import local_cores, torch_threads
from imgclust.zarr_store import open_array

logger = logging.getLogger("imgclust")
PRETEXT_SHARE = 0.8  # contrastive presets: share of the epochs for the pretext, the rest for the decoder


@dataclass(frozen=True)
class Trained:
    model_url: str
    model_token: str  # sha256 of the weights: workers cache the model under it
    losses: list[float]
    device: str
    code_dim: int
    resumed_from_epoch: int = 0


def resolve_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for but CUDA is not available on this machine")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def reconstruction_loss(model: Autoencoder, x: torch.Tensor, target: torch.Tensor, kind: str,
                        kl_weight: float = 1.0) -> torch.Tensor:
    """Mean per-pixel loss; a VAE adds its KL term per pixel (the Keras example's sum, rescaled),
    times ``kl_weight`` (ramped up from 0 while the decoder learns to use the code)."""
    kl = None
    if getattr(model, "variational", False):
        code, kl = model.sample_code(x)
    elif getattr(model, "contrastive", False):
        with torch.no_grad():  # the decoder learns to read the frozen contrastive codes
            code = model.encode(x)
    else:
        code = model.encode(x)
    logits = model.decode_logits(code)
    if kind == "bce":
        loss = F.binary_cross_entropy_with_logits(logits, target)
    else:
        loss = F.mse_loss(torch.sigmoid(logits), target)
    if kl is not None:
        loss = loss + kl_weight * kl.mean() / target[0].numel()
    return loss


def pretext_epochs(preset: str, epochs: int) -> int:
    """Epochs of the contrastive pretext; the rest fit the decoder to the frozen codes (0: none)."""
    if PRESETS[preset].pretext != "contrastive":
        return 0
    return max(1, min(epochs - 1, round(epochs * PRETEXT_SHARE)))


def weights_token(weights: bytes) -> str:
    """Identity of a set of weights: workers cache the loaded model under it."""
    return hashlib.sha256(weights).hexdigest()


def save_model(model: Autoencoder, spec: dict[str, Any], model_dir: str, storage_options: dict[str, Any]) -> str:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    data = buf.getvalue()
    write_bytes_atomic(join(model_dir, "weights.pt"), data, storage_options)
    write_json(join(model_dir, "spec.json"), spec, storage_options)
    return weights_token(data)


def load_model(model_dir: str, storage_options: dict[str, Any] | None = None,
               device: torch.device | str = "cpu") -> Autoencoder:
    """Rebuild a trained model from ``model/spec.json`` and ``model/weights.pt``."""
    fs, root = open_fs(model_dir, storage_options)
    spec = json.loads(fs.cat(f"{root}/spec.json"))
    model = build_model(spec)
    state = torch.load(io.BytesIO(fs.cat(f"{root}/weights.pt")), map_location=device, weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval()


def to_float(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(batch)
    if device.type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    return t.float().div_(255.0)


CHECKPOINT_SECONDS = 5.0  # a killed run loses at most this much training (plus the epoch in progress)


def training_rows(n: int, train_sample: int | None, seed: int) -> np.ndarray | None:
    """Sorted rows of a fixed random training sample, or None to train on all ``n`` images."""
    if train_sample is None or train_sample >= n:
        return None
    return np.sort(np.random.default_rng([seed, 1]).choice(n, size=train_sample, replace=False))


def finished_training(output: str, storage_options: dict[str, Any], key: str) -> Trained | None:
    """The saved model when training with exactly this key already completed."""
    fs, root = open_fs(join(output, "model"), storage_options)
    try:
        spec = json.loads(fs.cat(f"{root}/spec.json"))
        weights = fs.cat(f"{root}/weights.pt")
    except FileNotFoundError:
        return None
    if spec.get("train_key") != key:
        return None
    model = load_model(join(output, "model"), storage_options)
    return Trained(join(output, "model"), weights_token(weights), spec["losses"], spec.get("device", "cpu"),
                   int(np.prod(model.code_shape)))


def _save_checkpoint(url: str, storage_options: dict[str, Any], state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    write_bytes_atomic(url, buf.getvalue(), storage_options)


def _load_checkpoint(url: str, storage_options: dict[str, Any]) -> dict[str, Any] | None:
    fs, path = open_fs(url, storage_options)
    try:
        data = fs.cat(path)
    except FileNotFoundError:
        return None
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def train_autoencoder(images_url: str, output: str, storage_options: dict[str, Any], preset: str,
                      epochs: int, batch_size: int, learning_rate: float, seed: int, device: str,
                      ingest_key: str = "", train_sample: int | None = None) -> Trained:
    """Train, log the loss per epoch, and save weights plus the spec needed to rebuild the model.

    Every few seconds the whole training state (weights, optimiser, schedule, random generators)
    is checkpointed under a key of the data and settings, so a killed run continues from the last
    checkpoint and ends with the same weights as an uninterrupted one.
    """
    p = PRESETS[preset]
    images = open_array(images_url, storage_options)
    n, channels, h, w = images.shape
    key = fingerprint("train", ingest_key or images_url, preset, epochs, batch_size, learning_rate, seed,
                      train_sample)
    done = finished_training(output, storage_options, key)
    if done is not None:
        logger.info("train: already done for this data and these settings; reusing the model")
        return done
    rows = training_rows(n, train_sample, seed)
    n_train = n if rows is None else len(rows)
    dev = resolve_device(device)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    spec = {"architecture": p.architecture, "channels": channels, "image_size": [h, w],
            "code_dim": p.code_dim, "preset": preset, "loss": p.loss}
    model = build_model(spec).to(dev)
    if dev.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    pretext = pretext_epochs(preset, epochs)
    proj = ProjectionHead(int(np.prod(model.code_shape))).to(dev) if pretext else None
    params = list(model.parameters()) + (list(proj.parameters()) if proj is not None else [])
    opt = torch.optim.Adam(params, lr=learning_rate, weight_decay=1e-6 if pretext else 0.0)
    steps_per_epoch = max(1, -(-n_train // batch_size))
    if pretext:  # SimCLR's schedule for the pretext, then a fresh warm-up and anneal for the decoder
        s1, s2 = pretext * steps_per_epoch, (epochs - pretext) * steps_per_epoch
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, s1) if s < s1 else warmup_cosine(s - s1, s2))
    else:  # one-cycle: warm up, then anneal. Faster, steadier convergence than a constant rate (measured).
        sched = (torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=learning_rate, total_steps=epochs * steps_per_epoch,
                                                     pct_start=0.1) if p.one_cycle else None)
    warmup_steps = p.kl_warmup * epochs * steps_per_epoch
    use_amp = dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    shift = max(1, round(min(h, w) / 14)) if p.augment else 0
    losses: list[float] = []
    checkpoint_url = resume_url(output, f"train-{key[:16]}.pt")
    first = 0
    state = _load_checkpoint(checkpoint_url, storage_options)
    if state is not None:
        model.load_state_dict(state["model"])
        if proj is not None:
            proj.load_state_dict(state["proj"])
        opt.load_state_dict(state["opt"])
        if sched is not None:
            sched.load_state_dict(state["sched"])
        scaler.load_state_dict(state["scaler"])
        rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        gen.set_state(state["shift_rng"])
        losses, first = list(state["losses"]), int(state["epoch"])
        logger.info("train: resuming from the checkpoint after epoch %d of %d", first, epochs)
    logger.info("train: %s on %d of %d images of %dx%dx%d, %d epochs, device %s", preset, n_train, n, channels, h, w,
                epochs, dev)
    # A fixed thread count (all cores: the workers idle meanwhile) makes the weights independent of
    # whatever set torch's threads earlier in this process.
    with torch_threads(local_cores()):
        last_save = float("-inf")
        for epoch in track(range(first, epochs), total=epochs - first, desc="train", unit="epoch"):
            model.train()
            if pretext and epoch >= pretext:
                model.encoder.eval()  # frozen: its batch statistics stay those of the pretext
            t0, total, seen = time.perf_counter(), 0.0, 0
            for i, batch in enumerate(iter_batches(images, batch_size, rng, rows=rows)):
                beta = min(1.0, (epoch * steps_per_epoch + i) / warmup_steps) if warmup_steps else 1.0
                target = to_float(batch, dev)
                x = random_shift(target, shift, gen) if shift else target
                if shift:
                    target = x
                with torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=use_amp):
                    if epoch < pretext:
                        views = torch.cat([augment_views(x, gen), augment_views(x, gen)])
                        loss = nt_xent(proj(model.features(views)))
                    else:
                        loss = reconstruction_loss(model, x, target, p.loss, beta)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                if sched is not None:
                    sched.step()
                total += float(loss.detach()) * len(batch)
                seen += len(batch)
            losses.append(total / max(seen, 1))
            logger.info("train: epoch %d/%d %s loss %.5f (%.1f s)", epoch + 1, epochs,
                        "contrastive" if epoch < pretext else "reconstruction", losses[-1], time.perf_counter() - t0)
            if epoch + 1 < epochs and time.monotonic() - last_save >= CHECKPOINT_SECONDS:
                _save_checkpoint(checkpoint_url, storage_options, {
                    "epoch": epoch + 1, "losses": losses, "model": model.state_dict(), "opt": opt.state_dict(),
                    "proj": proj.state_dict() if proj is not None else None,
                    "sched": sched.state_dict() if sched is not None else None, "scaler": scaler.state_dict(),
                    "numpy_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                    "shift_rng": gen.get_state()})
                last_save = time.monotonic()
    model = model.to(memory_format=torch.contiguous_format).cpu().eval()
    spec.update(losses=losses, train_key=key, device=str(dev), train_sample=n_train, resumed_from_epoch=first,
                pretext_epochs=pretext)
    token = save_model(model, spec, join(output, "model"), storage_options)
    remove(checkpoint_url, storage_options)
    code_dim = int(np.prod(model.code_shape))
    return Trained(join(output, "model"), token, losses, str(dev), code_dim, first)


def train_where_best(client: Client, *args: Any) -> Trained:
    """Train on a worker that declares a GPU resource when the cluster has one, here otherwise.

    Training is one sequential job: on a GPU worker it gets the accelerator; without one it runs in
    the flow's process, which avoids shipping the loop to a worker that is no faster.
    """
    gpus = gpu_workers(client)
    if gpus:
        logger.info("train: pinned to a GPU worker (%s)", ", ".join(gpus))
        return client.submit(train_autoencoder, *args, resources={"GPU": 1}, pure=False).result()
    return train_autoencoder(*args)


@task(name="train", retries=1, retry_delay_seconds=5)
def train_task(images_url: str, output: str, storage_options: dict[str, Any], preset: str, epochs: int,
               batch_size: int, learning_rate: float, seed: int, device: str, address: str, ingest_key: str = "",
               train_sample: int | None = None) -> Trained:
    with Client(address, set_as_default=False) as client:
        return train_where_best(client, images_url, output, storage_options, preset, epochs, batch_size,
                                learning_rate, seed, device, ingest_key, train_sample)
