"""CLIP-score throughput: core_clip.clip_score vs torchmetrics' CLIPScore, same model, same images, one process.

Both load one randomly initialised Hugging Face CLIP saved to a temporary folder (torchmetrics through
transformers, core_clip by converting it to open_clip), score the same uint8 images and captions in the same
batches, and the script prints images/s for each, their ratio, and the largest per-pair difference.

    python benchmarks/score_throughput.py                       # ViT-B-32, 224 px, 256 images, batches of 64
    python benchmarks/score_throughput.py --prompts 8           # 8 distinct captions (e.g. 32 images per prompt)
    python benchmarks/score_throughput.py --device cuda --n 2048
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torchmetrics.functional.multimodal.clip_score import _clip_score_update
from torchmetrics.multimodal import CLIPScore

import core_clip
from tests.helpers import save_random_hf_clip, torchmetrics_clip

CAPTIONS = ["a red circle on a blue background", "a photo of a large green triangle", "a small yellow square",
            "a purple circle at the top", "an orange triangle on the left", "a white square on a black background",
            "a photo of a small blue circle", "a large black triangle"]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn, batches, device: str) -> float:
    fn(*batches[0])  # warm-up (allocations, kernel selection)
    _sync(device)
    start = time.perf_counter()
    for images, texts in batches:
        fn(images, texts)
    _sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="ViT-B-32", choices=["ViT-B-32", "tiny"])
    parser.add_argument("--n", type=int, default=256, help="images scored per side (after one warm-up batch)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=0, help="distinct captions (0: every image its own caption)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_random_hf_clip(Path(tmp) / "clip", args.arch, seed=0)
        ours = core_clip.load(str(folder), device=args.device)
        hf_model, processor = torchmetrics_clip(folder)
        hf_model.to(args.device)
    metric = CLIPScore(model_name_or_path=lambda: (hf_model, processor)).to(args.device)

    size = ours.image_size
    g = torch.Generator().manual_seed(0)
    n_prompts = args.prompts or args.n + args.batch_size
    batches = []
    for start in range(0, args.n + args.batch_size, args.batch_size):
        images = torch.randint(0, 256, (args.batch_size, 3, size, size), dtype=torch.uint8, generator=g)
        texts = [f"{CAPTIONS[i % len(CAPTIONS)]}, number {i % n_prompts}"
                 for i in range(start, start + args.batch_size)]
        batches.append((images.to(args.device), texts))

    with torch.no_grad():
        t_ref = _timed(lambda im, tx: metric.update(list(im), tx), batches, args.device)
        t_ours = _timed(lambda im, tx: core_clip.clip_score(im, tx, ours, batch_size=args.batch_size),
                        batches, args.device)
        # compare unclamped 100 * cos per pair: a random model scores many pairs below 0, where both clamp to 0
        images, texts = batches[0]
        reference, _ = _clip_score_update(list(images), texts, hf_model, processor)
        cos = (ours.embed_images(images) * ours.encode_text(texts)).sum(-1)
        diff = (100 * cos - reference.float()).abs().max().item()

    scored = len(batches) * args.batch_size - args.batch_size
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({args.threads} threads)"
    print(f"{args.arch} at {size} px, {scored} images in batches of {args.batch_size}, "
          f"{args.prompts or 'all'} distinct captions, on {device}")
    print(f"torchmetrics CLIPScore : {scored / t_ref:9.1f} images/s")
    print(f"core_clip.clip_score   : {scored / t_ours:9.1f} images/s")
    print(f"ratio                  : {t_ref / t_ours:9.2f}x")
    print(f"max |difference|       : {diff:9.2e} (per pair, 100 * cos before clamping)")


if __name__ == "__main__":
    main()
