"""Milliseconds per guide step (cutouts + augment + CLIP forward + backward + Adam update), with peak memory.

Two configurations, each timed for clipguide's batched step and for the VQGAN+CLIP notebooks' step (a Python loop
that slices and resizes one cutout at a time, then the same augmentations, CLIP, loss and update) in one process,
printing the ratio:

    (a) the shipped `shapes` CLIP, 64 px image, cutn 16
    (b) random-init ViT-B-32, 224 px image (from a 256 px canvas), cutn 32

    python benchmarks/guide_step.py                  # both, on CUDA when available
    python benchmarks/guide_step.py --only a --steps 50 --device cpu

Peak memory is torch.cuda.max_memory_allocated on CUDA; on CPU the process's peak resident set size after each run
(it only grows, so read each figure as "at most").
"""
from __future__ import annotations

import argparse
import contextlib
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

import core_clip
from clipguide import CLIPGuidance, Perceptor
from clipguide.cutouts import ClassicCutouts
from clipguide.generators import GENERATORS


def notebook_cutouts(images: torch.Tensor, cutn: int, size: int, generator: torch.Generator, min_size: float):
    """The notebooks' MakeCutouts: one random square per cut, sliced and resized in a Python loop."""
    side = min(images.shape[-2:])
    cuts = []
    for _ in range(cutn):
        u = torch.rand(3, generator=generator, device=images.device).tolist()
        s = int(side * (min_size + (1 - min_size) * u[0]))
        x0, y0 = int(u[1] * (images.shape[-1] - s + 1)), int(u[2] * (images.shape[-2] - s + 1))
        cuts.append(F.adaptive_avg_pool2d(images[:, :, y0:y0 + s, x0:x0 + s], size))
    return torch.cat(cuts)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_steps(guidance: CLIPGuidance, backend, steps: int, device: torch.device) -> tuple[float, float]:
    """ms per step and peak MiB of ``steps`` Adam steps of ``backend`` under ``guidance`` (after 3 warm-ups: a
    compiled step compiles on the first and records its CUDA graphs on the second)."""
    optimizer = torch.optim.Adam([p for p in backend.parameters() if p.requires_grad], lr=0.05)

    def step():
        loss = guidance.loss(backend.decode())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return 1000 * (time.perf_counter() - start) / steps, _peak_mib(device)


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def compare(label: str, load_model: Callable[[str], core_clip.ClipModel], make_backend, cutn: int, steps: int,
            device: torch.device, compile: bool = False) -> None:
    """Time the notebooks' per-cut loop (fp32 throughout) and clipguide's batched step (bf16 CLIP on CUDA), and with
    ``compile`` clipguide compiled, each on a fresh backend from ``make_backend(reference)`` and a fresh model from
    ``load_model(precision)``, one after another so that each peak counts only its own model."""
    prompt = "a red circle on a blue background"
    loop = CLIPGuidance(prompt, Perceptor(load_model("fp32")), cutn=cutn)
    loop.perceptor.autocast = contextlib.nullcontext
    min_size = ClassicCutouts().min_size
    loop.cutouts = lambda images, n, size, generator: notebook_cutouts(images, n, size, generator, min_size)
    ms_loop, mem_loop = time_steps(loop, make_backend(True), steps, device)
    print(f"{label}: notebook loop      {ms_loop:8.1f} ms/step (peak {mem_loop:7.0f} MiB)", flush=True)
    del loop
    _free(device)
    precision = "bf16" if device.type == "cuda" else "fp32"
    for compiled in (False, True) if compile else (False,):
        backend = make_backend(False)
        if compiled:
            backend.compile_decode()
        ours = CLIPGuidance(prompt, Perceptor(load_model(precision), compile=compiled), cutn=cutn)
        ms, mem = time_steps(ours, backend, steps, device)
        name = "clipguide compiled" if compiled else "clipguide         "
        print(f"{'':{len(label)}}  {name} {ms:8.1f} ms/step (peak {mem:7.0f} MiB) | speed-up {ms_loop / ms:.2f}x, "
              f"memory {mem / mem_loop:.2f}x", flush=True)
        del ours, backend
        _free(device)


def parse_args(parser: argparse.ArgumentParser, steps: int) -> tuple[argparse.Namespace, torch.device]:
    """Add the flags every step benchmark takes (--steps, --device, --threads), parse, set the thread count, print
    the header line (naming the GPU when there is one) and bring an idle GPU up to its working clocks."""
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--compile", action="store_true", help="also time clipguide with compile=True")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, {args.steps} timed steps")
    if device.type == "cuda":
        _warm_up(device)
    return args, device


@dataclass
class Busy:
    """What one profiled run did. On CUDA: ``device_ms`` in kernels and copies of ``wall_ms``, ``kernels`` run on the
    device, ``launches`` (kernel and CUDA-graph launches) and ``syncs`` (the host waiting for the device) made by the
    host. On CPU ``device_ms`` is None and ``kernels`` counts the aten ops outside other ops and compiled functions,
    backward ones included (each at least one kernel launch on a GPU)."""

    device_ms: float | None
    wall_ms: float
    kernels: int
    launches: int = 0
    syncs: int = 0

    def per(self, steps: int) -> str:
        """The figures per step, as one line."""
        if self.device_ms is None:
            return f"{self.wall_ms / steps:9.1f} ms wall, {self.kernels / steps:6.0f} ops per step"
        return (f"device busy {self.device_ms / steps:7.1f} of {self.wall_ms / steps:7.1f} ms per step "
                f"({100 * self.device_ms / self.wall_ms:3.0f}%); per step {self.kernels / steps:.0f} kernels, "
                f"{self.launches / steps:.0f} launches, {self.syncs / steps:.1f} syncs")


def _busy(fn: Callable[[], None], device: torch.device) -> Busy:
    """Run ``fn()`` once under torch.profiler: a step whose kernels fill well under its wall time is bound by the host
    launching them (fewer launches, such as one CUDA graph for many kernels, help there), one near 100% by the
    device's arithmetic."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    _sync(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        start = time.perf_counter()
        fn()
        _sync(device)
        wall = 1000 * (time.perf_counter() - start)
    events = prof.events()
    if not cuda:
        return Busy(None, wall, sum(e.name.startswith("aten::") and not _nested(e) for e in events))
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    runtime = [e.name.lower() for e in events if e.device_type == DeviceType.CPU and e.name.startswith("cu")]
    return Busy(sum(e.self_device_time_total for e in kernels) / 1000, wall, len(kernels),
                launches=sum("launch" in name for name in runtime),
                syncs=sum("synchronize" in name for name in runtime))


def _nested(event) -> bool:
    """Whether a profiler event runs inside an aten op or a compiled function (so launches nothing of its own on a
    GPU: the op's kernels, or a CUDA graph, count once). Backward ops sit under autograd nodes and so count."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::") or "Compiled" in parent.name:
            return True
        parent = parent.cpu_parent
    return False


def _warm_up(device: torch.device, seconds: float = 3.0) -> None:
    """Keep the GPU busy for ``seconds``: an idle GPU runs at a fraction of its clock for the first timed loop, which
    made the unguided baseline (timed first) look up to 1.8x slower than it is (54.7 vs 30.3 ms on one H200)."""
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(20):
            a @ a
        _sync(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["a", "b"])
    args, device = parse_args(parser, steps=20)

    def pixels(canvas: int):
        return lambda reference: GENERATORS.get("pixels")(1, canvas, canvas, resolution=None,
                                                          generator=torch.Generator(device).manual_seed(0))

    for key, label, name, canvas, cutn in (("a", "(a) shapes     64 px cutn 16", "shapes", 64, 16),
                                           ("b", "(b) ViT-B-32  224 px cutn 32", "ViT-B-32", 256, 32)):
        if args.only in (None, key):
            compare(label, lambda precision: core_clip.load(name, device=device, precision=precision), pixels(canvas),
                    cutn, args.steps, device, args.compile)


if __name__ == "__main__":
    main()
