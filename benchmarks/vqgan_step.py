"""Milliseconds per VQGAN+CLIP step and peak memory: clipguide vs the public scripts' per-cutout loop.

Random-init ViT-B-32 perceptor and the taming imagenet f16 (16384 codes) architecture with random weights, a 256 px
canvas, cutn 32. Both sides steer the same `vqgan` backend (straight-through latents, the same kornia augmentations,
the same loss); the reference makes its cutouts one at a time (slice + resize per cut, fp32) as the public
VQGAN+CLIP scripts do, clipguide makes them in one batched call (bf16 CLIP weights and a bf16-autocast decoder on
CUDA), and with --compile also compiled (CUDA graphs on CUDA).

    python benchmarks/vqgan_step.py --steps 10 --compile   # on CUDA when available
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import core_clip
from clipguide.generators import clamp_with_grad
from clipguide.generators.vqgan import VQGANGenerator
from clipguide.vqgan_model import TAMING_CONFIGS, VQGAN

from guide_step import compare, parse_args  # noqa: E402  (same folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    args, device = parse_args(parser, steps=10)
    torch.manual_seed(0)
    vqgan = VQGAN(TAMING_CONFIGS["imagenet-f16-16384"]).to(device).eval().requires_grad_(False)

    def backend(reference: bool) -> VQGANGenerator:
        generator = VQGANGenerator(1, args.size, args.size, generator=torch.Generator(device).manual_seed(0),
                                   model=vqgan)
        if reference:  # the public scripts decode in fp32
            generator.decode = lambda: clamp_with_grad((vqgan.decode(vqgan.quantize_st(generator.z)[0]) + 1) / 2)
        return generator

    compare(f"VQGAN f16 + ViT-B-32, {args.size} px cutn 32",
            lambda precision: core_clip.load("ViT-B-32", device=device, precision=precision), backend, 32, args.steps,
            device, args.compile)


if __name__ == "__main__":
    main()
