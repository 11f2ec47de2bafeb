"""Training throughput: core_clip's train step vs open_clip_train's ``train_one_epoch``, same model, batch,
precision and in-memory data, one process.

Both start from identical weights (built by core_clip.load), use AdamW with the same parameter groups, the plain
CLIP loss (core_clip with ``multi_positive`` off, so both compute the same loss), no gradient clipping, and run the
same number of optimiser steps after a warm-up. Both get token ids made up front, as their data loaders' workers
deliver them; core_clip's step also normalises its images on the device (open_clip_train gets normalised pixels).
Prints samples/s for each and the ratio (ours / theirs).

    python benchmarks/train_throughput.py --model shapes-tiny --batch-size 256
    python benchmarks/train_throughput.py --model ViT-B-32 --batch-size 32 --steps 5
    python benchmarks/train_throughput.py --model ViT-B-32 --batch-size 256 --precision bf16 --device cuda
    python benchmarks/train_throughput.py --model ViT-B-32 --batch-size 256 --precision bf16 --compile --compile-theirs

With --profile, a few more steps of each side run under torch.profiler and the script prints, per step, the time the
device spent in kernels against the wall time and the kernels launched (on CPU: the wall time and the aten ops).
"""
from __future__ import annotations

import argparse
import copy
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import open_clip
import torch
from open_clip_train.train import train_one_epoch

from core_clip.data import Batch
from core_clip.train import TrainConfig, Trainer, param_groups

sys.path.insert(0, str(Path(__file__).resolve().parent))
from guide_step import _busy, _sync, _warm_up  # noqa: E402  (same folder)

CAPTIONS = ["a red circle", "a small blue square on the left", "a photo of a large green triangle",
            "a yellow circle on a purple background", "the digit seven", "a handwritten 3"]


class _Loader(list):
    """What train_one_epoch needs of a DataLoader: iteration plus num_batches / num_samples."""

    @property
    def num_batches(self) -> int:
        return len(self)

    @property
    def num_samples(self) -> int:
        return sum(len(b[0]) for b in self)


class _DataInfo:
    def __init__(self, loader: _Loader):
        self.dataloader = loader

    def set_epoch(self, epoch: int) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes-tiny")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="timed optimiser steps (after 2 warm-up steps)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--compile", action="store_true", help="core_clip's --compile")
    parser.add_argument("--compile-theirs", action="store_true",
                        help="torch.compile open_clip_train's model too, as its --torchcompile does")
    parser.add_argument("--profile", action="store_true",
                        help="print kernel-busy time and launches per step for both sides (ops per step on CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(data="shapes", out=tmp, model=args.model, batch_size=args.batch_size, samples_per_epoch=
                          args.batch_size, precision=args.precision, multi_positive=False, augment=False,
                          progress=False, device=args.device, warmup_steps=0, compile=args.compile)
        ours = Trainer(cfg)
    device = ours.device
    theirs_model = copy.deepcopy(ours.model.clip)
    theirs_model.output_dict = True
    theirs_net = torch.compile(theirs_model) if args.compile_theirs else theirs_model
    size = ours.model.image_size

    g = torch.Generator().manual_seed(0)
    batches = []
    for i in range(args.steps + 2):
        images = torch.rand(args.batch_size, 3, size, size, generator=g)
        captions = [f"{CAPTIONS[(i + j) % len(CAPTIONS)]} {j}" for j in range(args.batch_size)]
        batches.append(Batch(images.to(device), captions, [frozenset()] * args.batch_size,
                             [frozenset()] * args.batch_size, tokens=ours.model.tokenizer(captions).to(device)))

    # open_clip_train side: normalised pixels and token ids prepared up front, as its data pipeline delivers them
    loader = _Loader((ours.model.preprocess.normalize(b.images), b.tokens) for b in batches)
    optimizer = torch.optim.AdamW(param_groups(theirs_model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98),
                                  eps=1e-6)
    scaler = torch.amp.GradScaler(device.type) if args.precision == "fp16" else None
    oc_precision = {"fp32": "fp32", "bf16": "amp_bf16", "fp16": "amp"}[args.precision]
    oc_args = argparse.Namespace(device=str(device), precision=oc_precision, accum_freq=1, distill=False,
                                 skip_scheduler=True, horovod=False, grad_clip_norm=None, log_every_n_steps=10 ** 9,
                                 batch_size=args.batch_size, world_size=1, rank=0, local_rank=0, wandb=False)
    loss = open_clip.ClipLoss()

    def run_theirs(data):
        train_one_epoch(theirs_net, {"train": _DataInfo(_Loader(data))}, loss, 0, optimizer, scaler, None, None,
                        oc_args)

    def timed(fn, data) -> float:
        fn(data[:2])
        _sync(device)
        start = time.perf_counter()
        fn(data[2:])
        _sync(device)
        return time.perf_counter() - start

    def run_ours(data):
        for b in data:
            ours._train_step([b])

    if device.type == "cuda":
        _warm_up(device)
    t_theirs = timed(run_theirs, list(loader))
    t_ours = timed(run_ours, batches)
    samples = args.steps * args.batch_size
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({args.threads} threads)"
    compiled = {(False, False): "", (True, False): ", core_clip compiled", (False, True): ", open_clip compiled",
                (True, True): ", both compiled"}[args.compile, args.compile_theirs]
    print(f"{args.model}, batch {args.batch_size}, {args.precision}{compiled}, {args.steps} steps on {name}")
    print(f"open_clip_train : {samples / t_theirs:9.1f} samples/s")
    print(f"core_clip       : {samples / t_ours:9.1f} samples/s")
    print(f"ratio           : {t_theirs / t_ours:9.2f}x")
    if device.type == "cuda":
        print(f"peak memory     : {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (both runs)")
    if args.profile:
        sides = (("open_clip_train", run_theirs, list(loader)[2:]), ("core_clip", run_ours, batches[2:]))
        for side, fn, data in sides:
            print(f"{side:<16}: {_busy(lambda: fn(data), device).per(len(data))}")


if __name__ == "__main__":
    main()
