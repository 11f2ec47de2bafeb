"""Train the shipped ShapesWorld VQGAN (taming architecture; reconstruction + codebook losses, nothing downloaded).

    python -m clipguide.train_vqgan --out runs/vqgan --steps 2500
    cp runs/vqgan/vqgan.safetensors clipguide/weights/vqgan-shapes.safetensors
    cp runs/vqgan/vqgan.json clipguide/weights/vqgan-shapes.json

Batch i is rendered from (seed, i), so ``--resume`` continues a killed run with the same data; the model and the
optimiser state are written atomically every ``--save-every`` steps.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from core_clip import shapes
from core_clip.checkpoint import atomic_write, load_strict, read_state_dict

from .training import parse_config, set_warmup_cosine_lr, shapes_batch
from .vqgan_model import VQGAN, VQGANConfig

SHAPES_DDCONFIG = dict(double_z=False, z_channels=32, resolution=64, in_channels=3, out_ch=3, ch=32,
                       ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0)


@dataclass
class VQGANTrainConfig:
    out: str
    steps: int = 2500
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    seed: int = 0
    save_every: int = 250
    resume: bool = False


@torch.no_grad()
def reconstruction_agreement(model: VQGAN, n: int = 500, seed: int = 1) -> float:
    """Fraction of ``n`` fresh test-split ShapesWorld images whose reconstruction the oracle reads exactly as it
    reads the original (every attribute)."""
    scenes = shapes.sample_scenes(n, seed=seed, split="test")
    originals = shapes.render_batch(scenes, 64, seed=seed)
    x = torch.from_numpy(originals).permute(0, 3, 1, 2).float() / 127.5 - 1
    recon = torch.cat([model(chunk)[0] for chunk in x.split(100)])
    recon = ((recon + 1) / 2).clamp(0, 1)
    return sum(shapes.read(o) == shapes.read(r) for o, r in zip(originals, recon)) / n


def train(cfg: VQGANTrainConfig) -> VQGAN:
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model = VQGAN(VQGANConfig(ddconfig=SHAPES_DDCONFIG, n_embed=256, embed_dim=32))
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
    start = 0
    if cfg.resume:
        load_strict(model, read_state_dict(out / "vqgan.safetensors"), str(out))
        state = torch.load(out / "state.pt", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="vqgan")
    for step in bar:
        set_warmup_cosine_lr(optimizer, step, cfg.steps, cfg.warmup, cfg.lr)
        x = shapes_batch(step, cfg.batch_size, 64, cfg.seed)
        recon, codebook_loss = model(x)
        rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        loss = rec + codebook_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(rec=f"{rec.item():.4f}", codebook=f"{codebook_loss.item():.4f}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            model.save(out / "vqgan.safetensors")
            atomic_write(out / "state.pt", lambda p: torch.save({"optimizer": optimizer.state_dict(),
                                                                 "step": step + 1}, p))
    model.eval()
    tqdm.write(f"oracle reads {reconstruction_agreement(model):.1%} of 500 fresh reconstructions as the originals")
    return model


def main(argv: Optional[Sequence[str]] = None) -> int:
    train(parse_config(VQGANTrainConfig, "python -m clipguide.train_vqgan", __doc__.split("\n")[0], argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
