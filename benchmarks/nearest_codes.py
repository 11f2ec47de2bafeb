"""The VQGAN's nearest-code search (:func:`clipguide.vqgan_model.nearest_codes`) against ``torch.cdist(...).argmin``,
in one process: milliseconds per search and the ratio, for a training batch (32 pictures of 16 x 16 latents) and for
one guided picture, against the shipped VQGAN's codebook shape (131,072 codes of 6 dimensions) and the one shipped
before it (32,768 codes of 32). Not a unit test; run by hand.

    python benchmarks/nearest_codes.py [--device cuda]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from clipguide.vqgan_model import nearest_codes

CODEBOOKS = {"131,072 codes of 6 (shipped)": (131_072, 6), "32,768 codes of 32": (32_768, 32)}
CASES = {"training batch (32 x 16 x 16 latents)": 32 * 256, "one guided picture (16 x 16 latents)": 256}


def median_ms(search, device: torch.device, repeats: int) -> float:
    search()   # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        search()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, (count, width) in CODEBOOKS.items():
        codes = torch.randn(count, width, generator=generator).to(device)
        for case, rows in CASES.items():
            z = torch.randn(rows, width, generator=generator).to(device)
            same = (nearest_codes(z, codes) == torch.cdist(z, codes).argmin(dim=1)).float().mean().item()
            ours = median_ms(lambda: nearest_codes(z, codes), device, args.repeats)
            cdist = median_ms(lambda: torch.cdist(z, codes).argmin(dim=1), device, args.repeats)
            print(f"{name}, {case}: cdist + argmin {cdist:7.1f} ms, nearest_codes {ours:7.1f} ms, "
                  f"ratio {cdist / ours:.2f}x, same codes {same:.2%}")


if __name__ == "__main__":
    main()
