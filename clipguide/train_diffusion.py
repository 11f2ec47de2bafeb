"""Train the shipped ShapesWorld diffusion model: a small unconditional diffusers UNet2DModel, DDPM objective
(v-prediction).

    python -m clipguide.train_diffusion --out runs/diffusion --steps 6500
    rm -rf clipguide/weights/diffusion-shapes && cp -r runs/diffusion/pipeline clipguide/weights/diffusion-shapes

``runs/diffusion/pipeline`` is a stock diffusers ``DDPMPipeline`` folder (model_index.json, unet/, scheduler/) holding
the EMA weights, so ``DDPMPipeline.from_pretrained(folder)`` loads it as well as clipguide does. Batch i and its noise
are drawn from (seed, i), so ``--resume`` continues a killed run exactly; the training state is written atomically
every ``--save-every`` steps. Runs on the CPU or, with ``--device cuda``, on a GPU.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from core_clip.checkpoint import atomic_write, current_umask, load_strict, read_state_dict, save_safetensors
from core_clip.errors import check_ranges
from core_clip.model import autocast

from .errors import ClipguideError
from .training import (check_precision, load_resume_state, run_script, run_settings, set_warmup_cosine_lr,
                       shapes_batch)

SHAPES_UNET = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
                   block_out_channels=(32, 64, 64), norm_num_groups=16,
                   down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                   up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))
# v-prediction: at the highest noise levels, where a 32 px picture's colours are decided, an epsilon model's x0
# estimate divides by sqrt(alpha_bar) ~ 0.03 and its small errors become saturated, off-palette colours.
SHAPES_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                        clip_sample=True)


@dataclass
class DiffusionTrainConfig:
    out: str
    steps: int = 6500
    batch_size: int = 32
    lr: float = 5e-4
    warmup: int = 200
    ema_decay: float = 0.999
    snr_floor: float = 0.1
    seed: int = 0
    save_every: int = 250
    device: str = "cpu"
    precision: str = "fp32"   # fp32, or bf16 autocast (README: its steps per second on this CPU)
    resume: bool = False

    def __post_init__(self):
        check_ranges(self, ClipguideError, positive=("steps", "batch_size", "save_every"),
                     non_negative=("lr", "warmup", "snr_floor", "seed"))
        if not 0 <= self.ema_decay < 1:
            raise ClipguideError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        check_precision(self.precision)


def v_loss_weight(alpha_bar: torch.Tensor, snr_floor: float) -> torch.Tensor:
    """Per-sample weight of the v-prediction MSE that makes it max(SNR, snr_floor) times the x0 MSE.

    The plain v loss is (SNR + 1) times the x0 loss: as heavy at the highest noise levels, where x0 is still a guess
    and its irreducible error is large, as anywhere else; that error's gradient noise slowed the learning of crisp
    outlines. An epsilon loss weighs x0 by SNR, which starves the noisiest steps (where the colours are chosen); the
    floor keeps a share for them. alpha_bar: any shape, in (0, 1); returns the same shape.
    """
    snr = alpha_bar / (1 - alpha_bar)
    return snr.clamp(min=snr_floor) / (snr + 1)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


def save_pipeline(unet: torch.nn.Module, scheduler, folder: Path) -> None:
    """Write a DDPMPipeline folder, replacing ``folder`` only once the new one is complete."""
    from diffusers import DDPMPipeline

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp, safe_serialization=True)
    mask = current_umask()
    for path in [tmp, *tmp.rglob("*")]:   # mkdtemp makes 0700; give the folder a plain mkdir's modes
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def train(cfg: DiffusionTrainConfig):
    """Train (or resume) and return the EMA UNet; the DDPMPipeline folder is ``cfg.out/pipeline``."""
    from diffusers import DDPMScheduler, UNet2DModel

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    unet = UNet2DModel(**SHAPES_UNET).to(device)
    ema = UNet2DModel(**SHAPES_UNET).to(device).requires_grad_(False)
    ema.load_state_dict(unet.state_dict())
    scheduler = DDPMScheduler(**SHAPES_SCHEDULER)
    alphas = scheduler.alphas_cumprod.to(device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    start = 0
    if cfg.resume:
        state = load_resume_state(out, cfg, device)
        load_strict(unet, read_state_dict(out / "unet.safetensors"), str(out / "unet.safetensors"))
        load_strict(ema, read_state_dict(out / "ema.safetensors"), str(out / "ema.safetensors"))
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
    size = SHAPES_UNET["sample_size"]
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="diffusion")
    for step in bar:
        set_warmup_cosine_lr(optimizer, step, cfg.steps, cfg.warmup, cfg.lr)
        x0 = shapes_batch(step, cfg.batch_size, size, cfg.seed).to(device)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.randint(0, len(alphas), (len(x0),), generator=g).to(device)
        a = alphas[t].view(-1, 1, 1, 1)
        target = a.sqrt() * noise - (1 - a).sqrt() * x0     # v = sqrt(a) eps - sqrt(1 - a) x0
        with autocast(cfg.precision, device):
            v = unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t).sample
        error = F.mse_loss(v.float(), target, reduction="none")
        loss = (v_loss_weight(a, cfg.snr_floor) * error).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        ema_update(ema, unet, min(cfg.ema_decay, (step + 1) / (step + 10)))
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            save_safetensors(unet.state_dict(), out / "unet.safetensors")
            save_safetensors(ema.state_dict(), out / "ema.safetensors")
            atomic_write(out / "state.pt", lambda p: torch.save({"optimizer": optimizer.state_dict(),
                                                                 "step": step + 1, "settings": run_settings(cfg)}, p))
            save_pipeline(ema, scheduler, out / "pipeline")
    return ema.eval()


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_script(train, DiffusionTrainConfig, "python -m clipguide.train_diffusion", __doc__.split("\n")[0],
                      argv)


if __name__ == "__main__":
    sys.exit(main())
