"""Seconds per training step of the shipped VQGAN (``python -m clipguide.train_vqgan``), fp32 against
``--precision bf16`` and ``--precision bf16 --compile``, in one process, with the ratios. Not a unit test; run by hand.

    python benchmarks/vqgan_train_step.py [--short 5] [--long 45]

Each setting trains twice, ``--short`` and ``--long`` steps, on 32 px crops and on whole 64 px pictures (batch 32,
1,024 codes, the shipped chain's loss terms on whole pictures); the difference of the two wall times over the
difference of the steps is the cost of a step without the fixed costs (building the model, the first step's
allocations). A first, untimed ``--short`` run of each setting compiles what ``--compile`` compiles, so that both
timed runs find it in the process's compile cache.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from clipguide.train_vqgan import SIZE, VQGANTrainConfig, train

SETTINGS = {"fp32": {}, "bf16": {"precision": "bf16"}, "bf16 + compile": {"precision": "bf16", "compile": True}}
TERMS = dict(texture=1.0, blend=4.0, outline=4.0, shape_blend=0.3, shape_outline=0.5, frame=2.0)


def seconds(steps: int, crop: int, settings: dict) -> float:
    """Wall time of a ``steps``-step run on ``crop`` px windows (whole pictures at :data:`SIZE`)."""
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stderr(io.StringIO()):
        cfg = VQGANTrainConfig(out=out, steps=steps, crop=crop, full_steps=0, warmup=1, eval_images=0,
                               save_every=10**6, restart_every=10**6, **(TERMS if crop == SIZE else {}), **settings)
        start = time.perf_counter()
        train(cfg)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--short", type=int, default=5)
    parser.add_argument("--long", type=int, default=45)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 32")
    for crop in (32, SIZE):
        base = None
        for name, settings in SETTINGS.items():
            seconds(args.short, crop, settings)
            step = (seconds(args.long, crop, settings) - seconds(args.short, crop, settings)) / (args.long - args.short)
            base = base or step
            print(f"{crop} px {'crops' if crop < SIZE else 'whole pictures'}, {name:15s}: {step:.3f} s per step, "
                  f"{base / step:.2f}x fp32's steps per second", flush=True)


if __name__ == "__main__":
    main()
