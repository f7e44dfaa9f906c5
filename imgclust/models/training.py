"""The training loop of every preset's autoencoder, streamed from a Zarr image array, resumable."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import zarr

from imgclust.models.autoencoders import Autoencoder, build_model
from imgclust.models.batches import BatchStream
from imgclust.models.contrastive import ProjectionHead, augment_views, nt_xent, warmup_cosine
from imgclust.models.pretrained import EncoderChoice, prepare_encoder
from imgclust.models.refiner import random_shift
from imgclust.presets import PRESETS
from imgclust.progress import track
from imgclust.threads import local_cores, torch_threads

logger = logging.getLogger("imgclust")
PRETEXT_SHARE = 0.8  # contrastive presets: share of the steps for the pretext, the rest for the decoder
CHECKPOINT_SECONDS = 5.0  # a killed run loses at most this much training, plus the buffer in progress
LOSS_ROUNDS = 20  # a training shorter than two passes records its loss this many times


@dataclass(frozen=True)
class TrainPlan:
    """What to train and how: the settings that shape the weights (and key a resumed training)."""

    preset: str
    steps: int  # optimiser steps (``imgclust.presets.train_steps``)
    batch_size: int
    learning_rate: float
    seed: int
    device: str = "auto"
    train_sample: int | None = None
    encoder: EncoderChoice | None = None  # --encoder: a pretrained encoder, used frozen or fine-tuned
    encoder_steps: int = 0  # --encoder-steps: contrastive fine-tuning steps of ``encoder`` (0: frozen)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def untrained(self) -> EncoderChoice | None:
        """The encoder used as it is, with no training: a frozen ``--encoder``, or the preset's raw pixels."""
        if self.encoder is not None:
            return self.encoder if not self.encoder_steps else None
        return EncoderChoice("pixels") if PRESETS[self.preset].architecture == "pixels" else None


def resolve_device(device: str) -> torch.device:
    """``auto``: CUDA when present, else CPU; ``cuda`` without CUDA is an error."""
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


def pretext_steps(preset: str, steps: int, per_epoch: int) -> int:
    """Steps of the contrastive pretext; the rest fit the decoder to the frozen codes (0: none).

    A training of two or more whole passes splits at a pass (at least one for each phase); any
    other splits at ``PRETEXT_SHARE`` of its steps, so the decoder always gets its share.
    """
    if PRESETS[preset].pretext != "contrastive" or steps < 2:
        return 0
    if steps % per_epoch == 0 and steps // per_epoch >= 2:
        epochs = steps // per_epoch
        return max(1, min(epochs - 1, round(epochs * PRETEXT_SHARE))) * per_epoch
    return max(1, min(steps - 1, round(steps * PRETEXT_SHARE)))


def loss_round(steps: int, per_epoch: int) -> int:
    """Steps per recorded loss: a pass while training makes two or more, else a twentieth."""
    if steps % per_epoch == 0 and steps // per_epoch >= 2:
        return per_epoch
    return max(1, -(-steps // LOSS_ROUNDS))


def to_float(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float in [0, 1] on ``device`` (pinned, non-blocking copies to CUDA)."""
    t = torch.from_numpy(batch)
    if device.type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    return t.float().div_(255.0)


def training_rows(n: int, train_sample: int | None, seed: int) -> np.ndarray | None:
    """Sorted rows of a fixed random training sample, or None to train on all ``n`` images."""
    if train_sample is None or train_sample >= n:
        return None
    return np.sort(np.random.default_rng([seed, 1]).choice(n, size=train_sample, replace=False))


def checkpoint_bytes(state: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def read_checkpoint(data: bytes) -> dict[str, Any]:
    """A training checkpoint: tensors and plain values only (``weights_only``: no code runs)."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


@dataclass
class TrainResult:
    """The trained model (on the CPU, in eval mode), the spec that rebuilds it, the loss per round."""

    model: torch.nn.Module  # an Autoencoder, or an untrained encoder (imgclust.models.pretrained)
    spec: dict[str, Any]
    losses: list[float]
    device: str
    resumed_from_step: int


def untrained_result(images: zarr.Array, choice: EncoderChoice) -> TrainResult:
    """The encoder of ``choice`` for the images of ``images`` (N, C, H, W), loaded, not trained."""
    _, channels, h, w = images.shape
    model, spec = prepare_encoder(choice, channels, (h, w))
    logger.info("train: none; %s encodes the %dx%dx%d images as they are (%d-d codes)",
                choice.name or choice.kind, channels, h, w, spec["code_dim"])
    spec.update(losses=[], device="cpu", train_steps=0, loss_kinds=[])
    return TrainResult(model, spec, [], "cpu", 0)


def train_autoencoder(images: zarr.Array, plan: TrainPlan,
                      load_checkpoint: Callable[[], bytes | None] = lambda: None,
                      save_checkpoint: Callable[[bytes], None] = lambda data: None) -> TrainResult:
    """Train ``plan.preset``'s autoencoder on uint8 images (N, C, H, W) for ``plan.steps`` optimiser
    steps, logging the loss per round (a pass, or a twentieth of a shorter training).

    Every few seconds, at the end of a pass or of a shuffle buffer, the whole training state
    (weights, optimiser, schedule, random generators, the stream's position) goes to
    ``save_checkpoint``; when ``load_checkpoint`` returns one, training continues from it and ends
    with the same weights as an uninterrupted run. The batches depend only on the seed and the step.

    With ``plan.encoder`` and ``plan.encoder_steps``, the pretrained encoder is fine-tuned instead:
    every step is contrastive (the default preset's SimCLR pretext), and there is no decoder.
    """
    p = PRESETS[plan.preset]
    n, channels, h, w = images.shape
    steps, batch_size, seed = plan.steps, plan.batch_size, plan.seed
    rows = training_rows(n, plan.train_sample, seed)
    n_train = n if rows is None else len(rows)
    dev = resolve_device(plan.device)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    if plan.encoder is not None and plan.encoder_steps:
        base, spec = prepare_encoder(plan.encoder, channels, (h, w))
        if not getattr(base, "trainable", False):
            raise ValueError(f"{plan.encoder.kind} encoders cannot be fine-tuned; only ResNets can (use --encoder-steps 0)")
        model = base.train().to(dev)
        spec["finetune_steps"] = steps
    else:
        spec = {"architecture": p.architecture, "channels": channels, "image_size": [h, w],
                "code_dim": p.code_dim, "preset": plan.preset, "loss": p.loss}
        model = build_model(spec).to(dev)
    if dev.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    per_epoch = max(1, -(-n_train // batch_size))
    pretext = steps if plan.encoder is not None else pretext_steps(plan.preset, steps, per_epoch)
    proj = ProjectionHead(int(np.prod(model.code_shape))).to(dev) if pretext else None
    params = list(model.parameters()) + (list(proj.parameters()) if proj is not None else [])
    opt = torch.optim.Adam(params, lr=plan.learning_rate, weight_decay=1e-6 if pretext else 0.0)
    if pretext:  # SimCLR's schedule for the pretext, then a fresh warm-up and anneal for the decoder
        s1, s2 = pretext, steps - pretext
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, s1) if s < s1 else warmup_cosine(s - s1, s2))
    else:  # one-cycle: warm up, then anneal. Faster, steadier convergence than a constant rate (measured).
        sched = (torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=plan.learning_rate, total_steps=steps,
                                                     pct_start=0.1)
                 if p.one_cycle else None)
    warmup_steps = p.kl_warmup * steps if plan.encoder is None else 0
    use_amp = dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    shift = max(1, round(min(h, w) / 14)) if p.augment and plan.encoder is None else 0
    colour = (PRESETS["default"] if plan.encoder is not None else p).colour_distortion
    per_round = loss_round(steps, per_epoch)
    losses: list[float] = []
    step, round_total, round_seen, stream_state = 0, 0.0, 0, None
    saved = load_checkpoint()
    if saved is not None:
        state = read_checkpoint(saved)
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
        losses, step = list(state["losses"]), int(state["step"])
        round_total, round_seen = float(state["round_total"]), int(state["round_seen"])
        if state["stream"] is not None:
            stream_state = {**state["stream"], "remainder": state["stream"]["remainder"].numpy()}
        logger.info("train: resuming from the checkpoint after step %d of %d", step, steps)
    first = step
    what = f"fine-tuning {plan.encoder.name or plan.encoder.kind}" if plan.encoder is not None else plan.preset
    logger.info("train: %s on %d of %d images of %dx%dx%d, %d steps (%.2f passes), device %s", what,
                n_train, n, channels, h, w, steps, steps / per_epoch, dev)

    def checkpoint(stream: dict[str, Any] | None) -> bytes:
        return checkpoint_bytes({
            "step": step, "losses": losses, "round_total": round_total, "round_seen": round_seen,
            "stream": None if stream is None else {**stream, "remainder": torch.from_numpy(stream["remainder"])},
            "model": model.state_dict(), "opt": opt.state_dict(),
            "proj": proj.state_dict() if proj is not None else None,
            "sched": sched.state_dict() if sched is not None else None, "scaler": scaler.state_dict(),
            "numpy_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(), "shift_rng": gen.get_state()})

    # A fixed thread count (all cores: the workers idle meanwhile) makes the weights independent of
    # whatever set torch's threads earlier in this process.
    with torch_threads(local_cores()):
        last_save, t0 = float("-inf"), time.perf_counter()
        bar = track(range(steps - first), total=steps - first, desc="train", unit="step")
        ticks = iter(bar)
        while step < steps:
            stream = BatchStream(images, batch_size, rng, rows=rows, resume=stream_state)
            stream_state = None
            model.train()
            for batch in stream:
                if pretext and step >= pretext:
                    model.encoder.eval()  # frozen: its batch statistics stay those of the pretext
                beta = min(1.0, step / warmup_steps) if warmup_steps else 1.0
                target = to_float(batch, dev)
                x = random_shift(target, shift, gen) if shift else target
                if shift:
                    target = x
                with torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=use_amp):
                    if step < pretext:
                        views = torch.cat([augment_views(x, gen, colour=colour), augment_views(x, gen, colour=colour)])
                        loss = nt_xent(proj(model.features(views)))
                    else:
                        loss = reconstruction_loss(model, x, target, p.loss, beta)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                if sched is not None:
                    sched.step()
                round_total += float(loss.detach()) * len(batch)
                round_seen += len(batch)
                step += 1
                next(ticks, None)
                if step % per_round == 0 or step == steps:
                    losses.append(round_total / max(round_seen, 1))
                    logger.info("train: step %d/%d (pass %.2f) %s loss %.5f (%.1f s)", step, steps, step / per_epoch,
                                "contrastive" if step <= pretext else "reconstruction", losses[-1],
                                time.perf_counter() - t0)
                    round_total, round_seen, t0 = 0.0, 0, time.perf_counter()
                if step == steps:
                    break
                at_pass_end = step % per_epoch == 0
                if (at_pass_end or stream.boundary is not None) and time.monotonic() - last_save >= CHECKPOINT_SECONDS:
                    save_checkpoint(checkpoint(None if at_pass_end else stream.boundary))
                    last_save = time.monotonic()
    model = model.to(memory_format=torch.contiguous_format).cpu().eval()
    kinds = ["contrastive" if min(steps, (i + 1) * per_round) <= pretext else "reconstruction"
             for i in range(len(losses))]
    spec.update(losses=losses, device=str(dev), train_sample=n_train, resumed_from_step=first, train_steps=steps,
                pretext_steps=pretext, round_steps=per_round, loss_kinds=kinds)
    return TrainResult(model, spec, losses, str(dev), first)
