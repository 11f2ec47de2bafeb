"""Distributed check of ``--align``, launched by tests/core_clip/test_align.py as
``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/core_clip/align_dist_worker.py OUT``.

Each rank draws its own edit pairs, whose alignment gradient is accumulated outside DDP's forward; DDP must still
average it with the contrastive gradient, so after two optimiser steps every rank holds the same weights, and they
differ from a run without ``--align``. Prints ``OK`` on rank 0; exits 1 otherwise.
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from core_clip.train import TrainConfig, Trainer


def weights_after_two_steps(out: str, align: float) -> torch.Tensor:
    cfg = TrainConfig(data="shapes", out=out, model="shapes-tiny", batch_size=4, samples_per_epoch=32, max_steps=2,
                      warmup_steps=1, eval_every=0, eval_samples=16, progress=False, device="cpu", align=align,
                      align_edits=2, align_walk=1)
    model = Trainer(cfg).run()
    return torch.cat([p.detach().flatten() for p in model.clip.parameters()])


def main() -> int:
    out = sys.argv[1]
    aligned = weights_after_two_steps(f"{out}/aligned", 1.0)
    plain = weights_after_two_steps(f"{out}/plain", 0.0)
    gathered = [torch.empty_like(aligned) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, aligned)
    same = all(torch.equal(g, gathered[0]) for g in gathered)
    moved = not torch.allclose(aligned, plain)
    if dist.get_rank() == 0:
        print("OK" if same and moved else f"FAIL same={same} moved={moved}")
    dist.destroy_process_group()
    return 0 if same and moved else 1


if __name__ == "__main__":
    sys.exit(main())
