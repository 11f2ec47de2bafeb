"""Milliseconds per diffusion sampling step, CLIP-guided against unguided, with peak memory, in one process.

    (a) the shipped `shapes` pixel model (32 px) + the `shapes` CLIP, cutn 16, DDPM steps
    (b) a Stable-Diffusion-1.5-sized latent pipeline (random-init UNet2DConditionModel, AutoencoderKL and
        ViT-B-32 guidance CLIP), 512 px, classifier-free guidance 7.5, 4 cutouts, DDIM steps; fp16 UNet and VAE,
        bf16 CLIP on CUDA

Each row times the same sampling loop several ways: unguided (guidance scale 0, the UNet's output untouched), guided
with the exact gradient (back-propagated through the UNet and the VAE decoder), and guided with the cheap gradient
(model output held fixed: no UNet backward), that one also with gradient checkpointing, with the guidance decoding x0
at half its resolution (``decode_scale=0.5``) and, with --compile, with the guidance decode and CLIP compiled (CUDA
graphs on CUDA). The ratio is guided / unguided. The fastest guided row and the unguided one are then timed
alternately --repeats times (a lent GPU's clock drifts: one ordering once read 1.38x, another 1.92x) and the median
ratio printed. --profile then runs both once more under torch.profiler and prints, per step, the time the GPU spent
in kernels against the wall time, the kernels, the host's launches and syncs (on CPU: the aten ops), and how many
CUDA graphs the compiled functions skipped: it tells a guided step's host overhead from its arithmetic.

    python benchmarks/diffusion_step.py --compile            # both, on CUDA when available
    python benchmarks/diffusion_step.py --only b --size 256 --steps 2 --device cpu
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch._dynamo.utils import counters

import core_clip
from clipguide import CLIPGuidance, Perceptor
from clipguide.generators.diffusion import DiffusionGenerator, DiffusionModel, load_diffusion

sys.path.insert(0, str(Path(__file__).resolve().parent))
from guide_step import _busy, _peak_mib, _sync, parse_args  # noqa: E402  (same folder)


def sampling(model: DiffusionModel, guidance: CLIPGuidance, size: int, device: torch.device, compile: bool = False,
             **options) -> Callable[[int], None]:
    """``run(n)``: an ``n``-step sampling run. Recurrence, candidates and polish are off and guidance runs to the end,
    so that every step is one model call, guided or not."""
    def run(n: int) -> None:
        generator = torch.Generator(device).manual_seed(0)
        sampler = DiffusionGenerator(1, size, size, generator=generator, model=model, scheduler=None, recurrence=1,
                                     candidates=1, polish=0, end=1.0, **options)
        if compile:
            sampler.compile_decode()
        sampler.sample(guidance, n, generator)

    return run


def time_sampling(run: Callable[[int], None], steps: int, device: torch.device) -> tuple[float, float]:
    """ms per step and peak MiB of ``run(steps)``, after a 3-step warm-up run (which compiles and records)."""
    run(3)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    start = time.perf_counter()
    run(steps)
    _sync(device)
    return 1000 * (time.perf_counter() - start) / steps, _peak_mib(device)


def compare(label: str, model: DiffusionModel, make_guidance: Callable[[bool], CLIPGuidance], size: int, steps: int,
            device: torch.device, scale: float, compile: bool = False, repeats: int = 0,
            profile: bool = False) -> None:
    """Unguided, then guided with the exact and the cheap gradient, the cheap one also with gradient checkpointing,
    with a half-resolution decode and (``compile``) compiled; ``make_guidance(compiled)`` builds the guidance (its
    perceptor compiled or not). Then the last (fastest) guided row and the unguided one timed alternately
    ``repeats`` times, so that a drifting clock moves both sides; ``profile``: both once more under torch.profiler,
    with the CUDA-graph skips counted."""
    guidance = make_guidance(False)
    unguided = sampling(model, guidance, size, device, scale=0.0)
    plain_ms, plain_mem = time_sampling(unguided, steps, device)
    pad = " " * len(label)
    print(f"{label}: unguided{'':{37}}{plain_ms:9.1f} ms/step (peak {plain_mem:7.0f} MiB)", flush=True)
    rows = [("exact", guidance, dict(through_unet=True)),
            ("cheap", guidance, dict(through_unet=False)),
            ("cheap, checkpointing", guidance, dict(through_unet=False, checkpointing=True)),
            ("cheap, decode 0.5", guidance, dict(through_unet=False, decode_scale=0.5))]
    if compile:
        compiled_guidance = make_guidance(True)
        rows += [("cheap, compiled", compiled_guidance, dict(through_unet=False, compile=True)),
                 ("cheap, compiled, decode 0.5", compiled_guidance,
                  dict(through_unet=False, compile=True, decode_scale=0.5))]
    for name, g, options in rows:
        run = sampling(model, g, size, device, scale=scale, **options)
        ms, mem = time_sampling(run, steps, device)
        print(f"{pad}  guided ({name}){'':{36 - len(name)}}{ms:9.1f} ms/step (peak {mem:7.0f} MiB) | "
              f"{ms / plain_ms:.2f}x the unguided step", flush=True)
    if repeats:
        pairs = [(time_sampling(unguided, steps, device)[0], time_sampling(run, steps, device)[0])
                 for _ in range(repeats)]
        ratios = sorted(b / a for a, b in pairs)
        plain, guided = (statistics.median(ms) for ms in zip(*pairs))
        print(f"{pad}  {repeats} alternating repeats, guided ({name}) / unguided: median "
              f"{statistics.median(ratios):.2f}x (range {ratios[0]:.2f}-{ratios[-1]:.2f}x; unguided {plain:.1f} ms, "
              f"guided {guided:.1f} ms)", flush=True)
    if profile:
        for side, fn in (("unguided", unguided), (f"guided ({name})", run)):
            print(f"{pad}  profiled {side:<36}{_busy(lambda: fn(steps), device).per(steps)}", flush=True)
        if compile and device.type == "cuda":
            print(f"{pad}  CUDA graphs skipped by the compiled functions: {counters['inductor']['cudagraph_skips']}",
                  flush=True)


def sd15(device: torch.device, dtype: torch.dtype) -> DiffusionModel:
    """Random-init components with Stable Diffusion 1.5's sizes (diffusers' default UNet2DConditionModel and
    AutoencoderKL configs with SD's channel counts); the prompt embeddings are random [1, 77, 768]."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, sample_size=512, scaling_factor=0.18215)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    cond, uncond = torch.randn(2, 1, 77, 768, generator=torch.Generator().manual_seed(1))
    model = DiffusionModel(unet.to(device, dtype), scheduler, vae.to(device, dtype), cond.to(device, dtype),
                           uncond.to(device, dtype), cfg_scale=7.5)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["a", "b"])
    parser.add_argument("--size", type=int, default=512, help="image size of (b)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="then time the fastest guided row and the unguided one alternately this many times")
    parser.add_argument("--profile", action="store_true",
                        help="then profile the unguided and the fastest guided row: device-busy time and launches "
                             "per step (ops per step on CPU)")
    args, device = parse_args(parser, steps=10)
    if args.repeats < 0:
        parser.error(f"--repeats must be >= 0, got {args.repeats}")
    prompt = "a red circle on a blue background"
    precision = "bf16" if device.type == "cuda" else "fp32"
    if args.only in (None, "a"):
        clip = core_clip.load("shapes", device=device, precision=precision)
        compare("(a) shapes       32 px cutn 16", load_diffusion("shapes", device),
                lambda compiled: CLIPGuidance(prompt, Perceptor(clip, compile=compiled), cutn=16), 32, args.steps,
                device, scale=500.0, compile=args.compile, repeats=args.repeats, profile=args.profile)
    if args.only in (None, "b"):
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        clip = core_clip.load("ViT-B-32", device=device, precision=precision)
        compare(f"(b) SD1.5-size {args.size:4d} px cutn 4 ", sd15(device, dtype),
                lambda compiled: CLIPGuidance(prompt, Perceptor(clip, compile=compiled), cutn=4), args.size,
                args.steps, device, scale=500.0, compile=args.compile, repeats=args.repeats, profile=args.profile)


if __name__ == "__main__":
    main()
