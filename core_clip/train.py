"""Contrastive image-text training on one process or many (``torchrun``), with exact resume.

    core-clip train --data shapes --out runs/shapes --model shapes-tiny --epochs 4
    torchrun --nproc_per_node 2 -m core_clip.train --data pairs.csv --out runs/mine --model ViT-B-32

One optimiser step consumes ``accum_steps`` micro-batches of ``batch_size`` samples on every process. Their
features are cached so that the loss always sees the whole effective batch (``batch_size * accum_steps *
world_size`` negatives), and each micro-batch is then re-encoded with gradient (open_clip's feature-cache method).

Everything random is a function of (seed, epoch, sample index) or saved in the checkpoint, so a run killed at any
point and resumed with ``--resume`` reproduces the uninterrupted run's losses bit for bit on the same device.
Checkpoints are written to a temporary folder and renamed into place; ``checkpoints/latest`` names the newest.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .align import AlignConfig, GradientAligner
from .attack import ATTACK_NORMS
from .checkpoint import atomic_write, load_strict, read_state_dict, saved_settings
from .data import Augment, Batch, batches_per_epoch, build_dataset, make_loader, positives
from .errors import CheckpointError, CoreClipError, check_ranges
from .loss import ClipLoss, SigLipLoss
from .model import IMAGE_ACTIVATIONS, PRECISIONS, ClipModel, autocast, eval_mode, load, replace_image_activation
from .negatives import NegativeBuffer, NegativeConfig

MAX_LOGIT_SCALE = math.log(100.0)
CHECKPOINTS = "checkpoints"
LATEST = "latest"
METRICS = "metrics.jsonl"
STATE = "state.pt"
# Settings that must not change when a run is resumed: they define the data order and the step arithmetic.
RESUME_INVARIANTS = ("data", "model", "batch_size", "accum_steps", "seed", "samples_per_epoch", "epochs", "augment",
                     "noise", "adv_eps", "adv_norm", "adv_steps", "adv_start", "negatives", "negative_steps",
                     "negative_start", "negative_own", "twins", "flaws", "align", "align_edits", "align_walk",
                     "align_start", "image_activation")


@dataclass
class TrainConfig:
    """One training run. Every field is also a ``core-clip train --flag``."""

    data: str = field(metadata={"help": "shapes, digits, a CSV of path,caption rows, or a folder of image + .txt"})
    out: str = field(metadata={"help": "run folder: checkpoints, metrics.jsonl and the final model.safetensors"})
    model: str = field(default="shapes-tiny", metadata={
        "help": "what to start from: a core_clip config or open_clip architecture (random init) or any loadable model"})
    epochs: int = field(default=1, metadata={"help": "passes over the data"})
    batch_size: int = field(default=256, metadata={"help": "samples per micro-batch on each process"})
    accum_steps: int = field(default=1,
                             metadata={"help": "micro-batches per optimiser step (feature-cache accumulation)"})
    samples_per_epoch: int = field(default=100_000, metadata={"help": "epoch length of generated data (shapes)"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW decay (not on gains, biases, temperature)"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warm-up steps before the cosine decay"})
    grad_clip: float = field(default=0.0, metadata={"help": "clip the gradient norm to this (0: off)"})
    precision: str = field(default="fp32", metadata={"help": "fp32, bf16 or fp16 (autocast; fp16 adds loss scaling)"})
    loss: str = field(default="clip", metadata={"help": "clip (softmax) or siglip (sigmoid; needs a logit_bias)"})
    local_loss: bool = field(default=False, metadata={"help": "distributed: each rank's rows/columns only"})
    multi_positive: bool = field(default=True, metadata={
        "help": "a caption true of several images in the batch is a positive for all of them"})
    augment: bool = field(default=True, metadata={"help": "random crops, shifts and pixel noise"})
    noise: float = field(default=0.02, metadata={
        "help": "with --augment: max std of the Gaussian pixel noise, in [0, 1] pixel units (each image's std is "
                "uniform in [0, noise]); large values (0.3-0.5) train the tower to read pictures through heavy noise"})
    adv_eps: float = field(default=0.0, metadata={
        "help": "adversarial training: radius of image perturbations in [0, 1] pixel units, per pixel for linf, "
                "of the whole image for l2 (0: off)"})
    adv_norm: str = field(default="linf", metadata={"help": "the attack's ball: linf or l2"})
    adv_steps: int = field(default=1, metadata={"help": "attack steps per batch when --adv-eps > 0"})
    adv_start: int = field(default=0, metadata={
        "help": "clean optimiser steps before adversarial training starts (learn the content first, then robustness)"})
    twins: bool = field(default=False, metadata={
        "help": "shapes: every picture shares its batch with a counterfactual twin (colours swapped or one attribute "
                "changed), hard negatives for what goes with what"})
    flaws: float = field(default=0.0, metadata={
        "help": "shapes: the share of pictures drawn with one flaw (off-palette colour, uneven fill, blob, noise, a "
                "second shape) and captioned as unclear, so that guidance cannot stop on near misses (0: off)"})
    negatives: int = field(default=0, metadata={
        "help": "guidance negatives per micro-batch: images climbed towards captions under the model itself, "
                "trained as matching only a null caption, so that CLIP guidance finds real pictures (0: off)"})
    negative_steps: int = field(default=4, metadata={"help": "ascent steps per drawn negative and training step"})
    negative_start: int = field(default=0, metadata={"help": "optimiser steps before guidance negatives start"})
    negative_own: float = field(default=0.0, metadata={
        "help": "share of fresh negative chains that start on a true picture of the caption they climb towards, so "
                "that guidance's drift away from real pictures is trained against"})
    align: float = field(default=0.0, metadata={
        "help": "shapes: weight of the gradient-alignment loss, 1 - cos(d sim(x, edited caption) / dx, edited picture "
                "- x) over ShapesWorld edit pairs, so that guidance's gradients head for the picture the prompt asks "
                "for (0: off; see core_clip.align)"})
    align_edits: int = field(default=32, metadata={"help": "edit pairs per optimiser step when --align > 0"})
    align_walk: int = field(default=10, metadata={
        "help": "most steps along the model's own gradient taken from a point between the pictures of an edit before "
                "its gradient is trained (0: points on the straight way only)"})
    align_start: int = field(default=0, metadata={"help": "optimiser steps before gradient alignment starts"})
    image_activation: str = field(default="", metadata={
        "help": "replace the image tower's ReLUs by gelu or silu (a ResNet tower, e.g. when fine-tuning the shipped "
                "model), so that its input gradient is smooth; saved in the model's config ('': keep them)"})
    workers: int = field(default=0, metadata={"help": "DataLoader worker processes"})
    seed: int = field(default=0, metadata={"help": "seed of the initialisation and the data order"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    lock_image: bool = field(default=False, metadata={"help": "freeze the image tower (LiT-style fine-tuning)"})
    lock_text: bool = field(default=False, metadata={"help": "freeze the text tower"})
    save_every: int = field(default=200, metadata={"help": "checkpoint every N optimiser steps"})
    keep_checkpoints: int = field(default=2, metadata={"help": "how many checkpoints to keep"})
    eval_every: int = field(default=0, metadata={"help": "zero-shot eval every N steps (0: at the end of each epoch)"})
    eval_samples: int = field(default=500, metadata={"help": "images per zero-shot eval (shapes)"})
    max_steps: int = field(default=0, metadata={"help": "stop after N optimiser steps (0: run all epochs)"})
    device: str = field(default="", metadata={"help": "cpu or cuda (default: cuda when available)"})
    resume: bool = field(default=False, metadata={"help": "continue from OUT/checkpoints/latest"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})


class TrainError(CoreClipError):
    """A training run cannot start or resume as configured."""


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: str) -> _Dist:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return _Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warm-up to ``cfg.lr`` over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weight matrices; none on gains, biases, other 1-d parameters or the temperature."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        gain_or_bias = p.ndim < 2 or "ln" in name or "bias" in name or "logit_" in name
        (no_decay if gain_or_bias else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Checkpoints:
    """``OUT/checkpoints/step_NNNNNNN/`` folders (a loadable model + ``state.pt``), written atomically."""

    def __init__(self, out: Path, keep: int):
        self.root = out / CHECKPOINTS
        self.keep = keep

    def latest(self) -> Path | None:
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        if not path.is_dir():
            raise CheckpointError(f"{pointer} names {path.name}, which does not exist")
        return path

    def save(self, model: ClipModel, state: dict, step: int) -> Path:
        name = f"step_{step:07d}"
        final = self.root / name
        tmp = self.root / f".tmp-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save(tmp / "model.safetensors")
        torch.save(state, tmp / STATE)
        if final.exists():  # re-saving a step (e.g. after resuming exactly at it): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write(self.root / LATEST, lambda p: p.write_text(name + "\n"))
        for old in sorted(self.root.glob("step_*"))[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    @staticmethod
    def read_state(path: Path) -> dict:
        try:
            return torch.load(path / STATE, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"cannot read training state {path / STATE}: {e}") from None


class Trainer:
    """Owns the model, optimiser, data and loss of one run; :meth:`run` trains to the end and returns the model."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self._validate()
        self.out = Path(cfg.out)
        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dist = _init_distributed(self.device.type)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)

        self.model = load(cfg.model, device=self.device, seed=cfg.seed)
        # a calibration belongs to the weights it was measured on: a fine-tuned model is calibrated anew
        self.model.config = replace(self.model.config, match_score=None)
        if cfg.image_activation and cfg.image_activation != self.model.config.image_activation:
            replace_image_activation(self.model.clip, cfg.image_activation)
            self.model.config = replace(self.model.config, image_activation=cfg.image_activation)
        clip = self.model.clip
        if cfg.lock_image:
            clip.lock_image_tower()
        if cfg.lock_text:
            clip.lock_text_tower()
        if cfg.grad_checkpointing:
            clip.set_grad_checkpointing(True)
        if cfg.loss == "siglip" and getattr(clip, "logit_bias", None) is None:
            raise TrainError(f"--loss siglip needs a model with a logit_bias; {cfg.model} has none")
        self.net: torch.nn.Module = self.model
        if self.dist.world_size > 1:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile:
            self.net = torch.compile(self.net)

        augment = Augment(noise=cfg.noise) if cfg.augment else None
        self.dataset = build_dataset(cfg.data, split="train", image_size=self.model.image_size, seed=cfg.seed,
                                     augment=augment, n=cfg.samples_per_epoch, twins=cfg.twins,
                                     flaws=cfg.flaws)
        micro_batches = batches_per_epoch(len(self.dataset), cfg.batch_size, self.dist.world_size)
        self.steps_per_epoch = micro_batches // cfg.accum_steps
        if self.steps_per_epoch == 0:
            raise TrainError(f"one optimiser step needs {cfg.accum_steps} micro-batches but an epoch has "
                             f"{micro_batches}")
        self.total_steps = self.steps_per_epoch * cfg.epochs
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)

        # fused: one kernel for the whole update on CUDA instead of a few per parameter group
        self.optimizer = torch.optim.AdamW(param_groups(clip, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98),
                                           eps=1e-6, fused=self.device.type == "cuda")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        loss_kwargs = dict(rank=self.dist.rank, world_size=self.dist.world_size)
        self.loss_fn = (SigLipLoss(**loss_kwargs) if cfg.loss == "siglip"
                        else ClipLoss(local_loss=cfg.local_loss, gather_with_grad=True, **loss_kwargs))
        self.attack_loss = ClipLoss()  # the attack of --adv-eps is local to each process
        self.negatives = None
        if cfg.negatives:
            if not cfg.multi_positive:
                raise TrainError("--negatives needs multi-positive targets: every climbed image matches every copy "
                                 "of the null caption")
            self.negatives = NegativeBuffer(NegativeConfig(count=cfg.negatives, steps=cfg.negative_steps,
                                                           own=cfg.negative_own),
                                            image_size=self.model.image_size,
                                            seed=(cfg.seed * 1_000_003 + self.dist.rank) % 2**63)
        self.aligner = None
        if cfg.align:
            if cfg.data != "shapes":
                raise TrainError(f"--align draws ShapesWorld edit pairs; it needs --data shapes, got {cfg.data!r}")
            self.aligner = GradientAligner(AlignConfig(edits=cfg.align_edits, walk=cfg.align_walk),
                                           image_size=self.model.image_size, seed=cfg.seed, rank=self.dist.rank)
        self.checkpoints = Checkpoints(self.out, cfg.keep_checkpoints)
        self.step = 0
        if cfg.resume:
            self._resume()
        elif (self.out / CHECKPOINTS).exists():  # checked on every rank, so none is left waiting
            raise TrainError(f"{self.out} already holds checkpoints: pass --resume to continue, or choose a new --out")

    def _validate(self) -> None:
        cfg = self.cfg
        check_ranges(cfg, TrainError,
                     at_least_one=("epochs", "batch_size", "accum_steps", "samples_per_epoch", "save_every",
                                   "keep_checkpoints", "adv_steps", "negative_steps", "align_edits"),
                     positive=("lr",),
                     non_negative=("warmup_steps", "eval_every", "max_steps", "workers", "grad_clip", "weight_decay",
                                   "noise", "adv_eps", "adv_start", "negatives", "negative_start", "align", "align_walk",
                                   "align_start"))
        if cfg.negative_own and not cfg.negatives:
            raise TrainError("--negative-own needs --negatives (it chooses where negative chains start)")
        if cfg.precision not in PRECISIONS:
            raise TrainError(f"--precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
        if cfg.loss not in ("clip", "siglip"):
            raise TrainError(f"--loss must be clip or siglip, got {cfg.loss!r}")
        if cfg.image_activation and cfg.image_activation not in IMAGE_ACTIVATIONS:
            raise TrainError(f"--image-activation must be one of {', '.join(IMAGE_ACTIVATIONS)}, got "
                             f"{cfg.image_activation!r}")
        if cfg.adv_norm not in ATTACK_NORMS:
            raise TrainError(f"--adv-norm must be {' or '.join(ATTACK_NORMS)}, got {cfg.adv_norm!r}")

    # ------------------------------------------------------------------ state

    def _state(self, negatives: list[dict] | None) -> dict:
        return {"step": self.step, "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "config": asdict(self.cfg), "world_size": self.dist.world_size,
                "cpu_rng": torch.get_rng_state(), "negatives": negatives}

    def _negative_states(self) -> list[dict] | None:
        """Every rank's negatives buffer state, by rank (collective when distributed)."""
        if self.negatives is None:
            return None
        state = self.negatives.state_dict()
        if self.dist.world_size == 1:
            return [state]
        states: list = [None] * self.dist.world_size
        dist.all_gather_object(states, state)
        return states

    def _resume(self) -> None:
        path = self.checkpoints.latest()
        if path is None:
            raise TrainError(f"--resume: no checkpoint in {self.out / CHECKPOINTS}")
        state = Checkpoints.read_state(path)
        saved = saved_settings(state["config"], TrainConfig)
        changed = [k for k in RESUME_INVARIANTS if saved.get(k) != getattr(self.cfg, k)]
        if state["world_size"] != self.dist.world_size:
            changed.append(f"world size ({state['world_size']} -> {self.dist.world_size})")
        if changed:
            raise TrainError(f"cannot resume {path}: these settings differ from the saved run: {', '.join(changed)}")
        load_strict(self.model.clip, read_state_dict(path / "model.safetensors"), str(path))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["cpu_rng"])
        if self.negatives is not None:
            self.negatives.load_state_dict(state["negatives"][self.dist.rank])
        self.step = state["step"]
        if self.dist.main:
            self._truncate_metrics()

    def _truncate_metrics(self) -> None:
        """Drop log rows written after the checkpoint we resume from, so the log reads as one clean run."""
        log = self.out / METRICS
        if log.is_file():
            rows = [line for line in log.read_text().splitlines() if json.loads(line)["step"] <= self.step]
            atomic_write(log, lambda p: p.write_text("".join(r + "\n" for r in rows)))

    def _log(self, row: dict) -> None:
        if self.dist.main:
            with open(self.out / METRICS, "a") as f:
                f.write(json.dumps(row) + "\n")

    # ------------------------------------------------------------------- step

    def _autocast(self) -> torch.autocast:
        return autocast(self.cfg.precision, self.device)

    def _encode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images = self.model.preprocess.normalize(batch.images.to(self.device, non_blocking=True))
        tokens = batch.tokens if batch.tokens is not None else self.model.tokenizer(batch.captions)
        tokens = tokens.to(self.device, non_blocking=True)
        return self.net(images, tokens)

    def _adversarial(self, batch: Batch, j: int) -> Batch:
        """The batch with its images moved within a ball of radius ``adv_eps`` (L-inf or L2, ``adv_norm``) to raise
        this process's contrastive loss (PGD from a random start; one L-inf step is "fast" adversarial training).

        Training on these makes the image tower robust, so its input gradients change what a picture shows rather
        than adding imperceptible texture: what CLIP guidance needs.
        """
        cfg, model = self.cfg, self.model
        eps, images = cfg.adv_eps, batch.images.to(self.device)
        with self._autocast():
            text = model.encode_text(batch.captions)
        pos = positives(batch.facts, batch.claims).to(self.device) if cfg.multi_positive else None
        scale = model.logit_scale.detach()
        generator = torch.Generator(self.device).manual_seed(((cfg.seed * 1_000_003 + self.step) * 131 + j) % 2**63)
        ball = ATTACK_NORMS[cfg.adv_norm]
        delta = ball.start(images.shape, eps, generator)
        for _ in range(cfg.adv_steps):
            delta.requires_grad_(True)
            with self._autocast():
                features = model.encode_image(model.preprocess.normalize((images + delta).clamp(0, 1)), grad=True)
                loss = self.attack_loss(features, text, scale, positives=pos)["contrastive_loss"]
            grad, = torch.autograd.grad(loss, delta)
            delta = ball.step(delta.detach(), grad, eps / cfg.adv_steps, eps)
        return replace(batch, images=(images + delta).clamp(0, 1))

    def _positives(self, batches: list[Batch]) -> torch.Tensor | None:
        if not self.cfg.multi_positive:
            return None
        facts = [f for b in batches for f in b.facts]
        claims = [c for b in batches for c in b.claims]
        if self.dist.world_size > 1:
            gathered: list = [None] * self.dist.world_size
            dist.all_gather_object(gathered, (facts, claims))
            facts = [f for g in gathered for f in g[0]]
            claims = [c for g in gathered for c in g[1]]
        return positives(facts, claims).to(self.device)

    def _loss(self, image_features, text_features, logit_scale, pos) -> torch.Tensor:
        if self.cfg.loss == "siglip":
            bias = self.model.clip.logit_bias
            return self.loss_fn(image_features, text_features, logit_scale, bias, positives=pos)["contrastive_loss"]
        return self.loss_fn(image_features, text_features, logit_scale, positives=pos)["contrastive_loss"]

    def _train_step(self, batches: list[Batch]) -> float:
        """One optimiser step over ``accum_steps`` micro-batches; returns the loss of the whole effective batch
        (the contrastive loss; the alignment loss of ``--align`` is kept in ``self.align_loss``)."""
        self.align_loss = None
        if self.aligner is not None and self.step >= self.cfg.align_start:
            # before the contrastive backward: under DDP, that last backward all-reduces the gradients that this
            # one accumulated locally, as after no_sync micro-batches
            align = self.aligner.loss(self.model, self.step)
            self.scaler.scale(self.cfg.align * align).backward()
            self.align_loss = align.item()
        if self.cfg.adv_eps and self.step >= self.cfg.adv_start:
            batches = [self._adversarial(b, j) for j, b in enumerate(batches)]
        if self.negatives is not None and self.step >= self.cfg.negative_start:
            batches = [self.negatives.extend(b, self.negatives.draw(self.model, b), self.model.tokenizer)
                       for b in batches]
        pos = self._positives(batches)
        if len(batches) == 1:
            with self._autocast():
                image_features, text_features, scale = self._encode(batches[0])
                loss = self._loss(image_features, text_features, scale, pos)
            self.scaler.scale(loss).backward()
        else:
            with torch.no_grad(), self._autocast():
                cached = [self._encode(b)[:2] for b in batches]
            for j, batch in enumerate(batches):
                last = j == len(batches) - 1
                sync = contextlib.nullcontext() if last or self.dist.world_size == 1 else self.net.no_sync()
                with sync, self._autocast():
                    image_j, text_j, scale = self._encode(batch)
                    image_features = torch.cat([image_j if i == j else c[0] for i, c in enumerate(cached)])
                    text_features = torch.cat([text_j if i == j else c[1] for i, c in enumerate(cached)])
                    # every pass computes the full loss; the temperature's gradient is taken from one pass only
                    loss = self._loss(image_features, text_features, scale if last else scale.detach(), pos)
                self.scaler.scale(loss).backward()
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.clip.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.model.clip.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        return loss.item()

    def _batches(self, epoch: int, start_step: int) -> Iterator[list[Batch]]:
        loader = make_loader(self.dataset, self.cfg.batch_size, seed=self.cfg.seed, epoch=epoch,
                             rank=self.dist.rank, world_size=self.dist.world_size,
                             start_batch=start_step * self.cfg.accum_steps, workers=self.cfg.workers,
                             pin_memory=self.device.type == "cuda", tokenizer=self.model.tokenizer)
        group: list[Batch] = []
        for batch in loader:
            group.append(batch)
            if len(group) == self.cfg.accum_steps:
                yield group
                group = []

    # -------------------------------------------------------------------- run

    def _evaluate(self) -> None:
        from .evaluate import eval_digits, eval_shapes

        if not self.dist.main or self.cfg.data not in ("shapes", "digits"):
            return
        with eval_mode(self.model):
            results = (eval_shapes(self.model, n=self.cfg.eval_samples, seed=10_000 + self.step)
                       if self.cfg.data == "shapes" else eval_digits(self.model))
        self._log({"step": self.step, "eval": results})
        tqdm.write(f"step {self.step} eval: " + ", ".join(f"{k}={v:.3f}" for k, v in results.items()
                                                            if k.endswith("acc")))

    def run(self) -> ClipModel:
        cfg = self.cfg
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.model.train()
        effective = cfg.batch_size * cfg.accum_steps * self.dist.world_size
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step",
                   disable=not (cfg.progress and self.dist.main), dynamic_ncols=True)
        try:
            while self.step < self.total_steps:
                epoch, start = divmod(self.step, self.steps_per_epoch)
                for batches in self._batches(epoch, start):
                    tic = time.perf_counter()
                    lr = lr_at(self.step, cfg, self.total_steps)
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr
                    loss = self._train_step(batches)
                    if not math.isfinite(loss):
                        raise TrainError(f"loss became {loss} at step {self.step + 1}; lower --lr or use fp32")
                    self.step += 1
                    speed = effective / (time.perf_counter() - tic)
                    temperature = self.model.logit_scale.item()
                    row = {"step": self.step, "epoch": epoch, "loss": loss, "logit_scale": temperature,
                           "lr": lr, "samples_per_s": speed, "time": round(time.time(), 3)}
                    if self.align_loss is not None:
                        row["align_loss"] = self.align_loss
                    self._log(row)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", scale=f"{temperature:.1f}", sps=f"{speed:.0f}")
                    if self.step % cfg.save_every == 0 or self.step == self.total_steps:
                        self._save()
                    if cfg.eval_every and self.step % cfg.eval_every == 0:
                        self._evaluate()
                    if self.step == self.total_steps:
                        break
                if not cfg.eval_every and self.step % self.steps_per_epoch == 0:
                    self._evaluate()
        finally:
            bar.close()
        if self.dist.main:
            self.model.save(self.out / "model.safetensors")
        return self.model

    def _save(self) -> None:
        negatives = self._negative_states()
        if self.dist.main:
            self.checkpoints.save(self.model, self._state(negatives), self.step)
        if self.dist.world_size > 1:
            dist.barrier()


def train(cfg: TrainConfig) -> ClipModel:
    """Run (or resume) training; returns the trained model in eval mode, as :func:`load` gives the copy saved as
    ``OUT/model.safetensors``."""
    return Trainer(cfg).run().eval()


if __name__ == "__main__":  # torchrun ... -m core_clip.train ARGS: the same flags as `core-clip train`
    from .cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
