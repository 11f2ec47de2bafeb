"""The CUDA paths end to end, with wall times: guide() on every backend (same seed twice -> the same image?) and a
short bf16 training run. Not a unit test: CI has no GPU; run it by hand (or through benchmarks/gpu_checks.sh).

    python benchmarks/cuda_paths.py
"""
from __future__ import annotations

import sys
import warnings
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from clipguide import guide
from core_clip.train import TrainConfig, Trainer

PROMPT = "a red circle on a blue background"


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("cuda_paths.py needs a CUDA device")
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for backend, steps in (("pixels", 100), ("fourier", 100), ("diffusion", 50)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runs = [guide(PROMPT, backend=backend, steps=steps, seed=3, device="cuda") for _ in range(2)]
        same = torch.equal(runs[0].tensor, runs[1].tensor)
        print(f"guide {backend:9s} {steps:3d} steps: {runs[0].seconds:6.2f} s then {runs[1].seconds:6.2f} s, "
              f"clip score {runs[0].clip_score[0]:5.1f}, same seed -> same image: {same}", flush=True)
        alerts = {str(w.message).split(".")[0] for w in caught if "deterministic" in str(w.message)}
        for alert in sorted(alerts):   # ops PyTorch has no deterministic kernel for
            print(f"    nondeterministic: {alert}")
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(data="shapes", out=out, model="shapes", batch_size=256, samples_per_epoch=256 * 40,
                          precision="bf16", progress=False, device="cuda", warmup_steps=5, eval_every=0,
                          save_every=10 ** 6)
        trainer = Trainer(cfg)
        start = time.perf_counter()
        losses = [trainer._train_step([b]) for (b,) in trainer._batches(0, 0)]
        seconds = time.perf_counter() - start
    print(f"train shapes bf16, batch 256, {len(losses)} steps: loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
          f"{len(losses) * 256 / seconds:.0f} samples/s including data")


if __name__ == "__main__":
    main()
