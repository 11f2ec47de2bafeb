"""Distributed check of core_clip.loss, launched by tests/core_clip/test_loss.py as
``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/core_clip/dist_worker.py``.

For each loss variant every rank trains a tiny DDP-wrapped CLIP on its half of a fixed global batch; the loss and
DDP's averaged parameter gradients must equal a single-process computation (no DDP) on the whole batch with the
same weights. Prints ``OK <variant>`` per variant on rank 0; exits 1 on any mismatch.
"""
from __future__ import annotations

import math
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from core_clip.loss import ClipLoss, SigLipLoss

BATCH_PER_RANK = 4
VOCAB, CAPTION_LEN = 6, 3
TOL = 1e-6


class TinyClip(nn.Module):
    """Image tower Linear(16 -> 8); text tower mean token embedding then Linear(12 -> 8); temperature t."""

    def __init__(self, with_bias: bool):
        super().__init__()
        self.image_tower = nn.Linear(16, 8)
        self.token_embedding = nn.Embedding(VOCAB, 12)
        self.text_proj = nn.Linear(12, 8)
        self.t = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        # Only the SigLIP variants use a bias; an unused parameter would stall DDP's gradient reduction.
        self.logit_bias = nn.Parameter(torch.tensor(-10.0)) if with_bias else None

    def forward(self, images: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        image_features = F.normalize(self.image_tower(images), dim=-1)
        text_features = F.normalize(self.text_proj(self.token_embedding(tokens).mean(dim=1)), dim=-1)
        return image_features, text_features, self.t.exp(), self.logit_bias


def global_batch(n: int) -> tuple[Tensor, Tensor, Tensor]:
    """Images [N, 16], captions [N, CAPTION_LEN] with repeats (some across ranks), positives [N, N]."""
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, 16, generator=g)
    tokens = torch.randint(0, VOCAB, (n, CAPTION_LEN), generator=g)
    tokens[5] = tokens[1]  # the same caption on both ranks
    tokens[3] = tokens[2]  # and twice on rank 0
    positives = (tokens[:, None, :] == tokens[None, :, :]).all(dim=-1)
    positives[0, 6] = True  # one caption true of another rank's image as well (asymmetric)
    return images, tokens, positives


def run_loss(loss_fn: nn.Module, model: nn.Module, images: Tensor, tokens: Tensor, positives: Tensor | None) -> Tensor:
    image_features, text_features, logit_scale, logit_bias = model(images, tokens)
    extra = () if logit_bias is None else (logit_bias,)
    return loss_fn(image_features, text_features, logit_scale, *extra, positives=positives)["contrastive_loss"]


def check_variant(loss_fn: nn.Module, siglip: bool, per_rank_loss_is_global: bool, use_positives: bool, rank: int,
                  world_size: int) -> tuple[float, float, float]:
    """Returns (loss error, gradient error, ratio error) maxed over ranks; ratio error compares W * DDP grads to
    the reference (what gathering without gradient should produce)."""
    n = BATCH_PER_RANK * world_size
    images, tokens, positives = global_batch(n)
    positives = positives if use_positives else None

    torch.manual_seed(0)
    reference = TinyClip(siglip)
    torch.manual_seed(0)
    ddp = DistributedDataParallel(TinyClip(siglip))

    # The reference is the plain single-process loss (never the local-loss code path it is checking).
    reference_loss_fn = SigLipLoss() if siglip else ClipLoss()
    ref_loss = run_loss(reference_loss_fn, reference, images, tokens, positives)
    ref_loss.backward()

    own = slice(rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK)
    loss = run_loss(loss_fn, ddp, images[own], tokens[own], positives)
    loss.backward()

    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world_size
    loss_err = (mean_loss - ref_loss).abs()
    if per_rank_loss_is_global:
        loss_err = torch.maximum(loss_err, (loss.detach() - ref_loss).abs())

    grad_err = torch.zeros(())
    ratio_err = torch.zeros(())
    for (pname, p), p_ref in zip(ddp.module.named_parameters(), reference.parameters()):
        grad_err = torch.maximum(grad_err, (p.grad - p_ref.grad).abs().max())
        if pname != "t":  # the temperature is not gathered, so its gradient is right either way
            ratio_err = torch.maximum(ratio_err, (world_size * p.grad - p_ref.grad).abs().max())

    errors = torch.stack([loss_err, grad_err, ratio_err])
    dist.all_reduce(errors, op=dist.ReduceOp.MAX)
    return tuple(errors.tolist())


def main() -> int:
    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()

    def clip(local_loss: bool, gather_with_grad: bool = True) -> ClipLoss:
        return ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world_size)

    siglip = SigLipLoss(rank=rank, world_size=world_size)
    # name, loss, SigLIP model, every rank's loss is the global loss, positives
    variants = [
        ("clip", clip(False), False, True, False),
        ("clip-local-loss", clip(True), False, False, False),
        ("clip-positives", clip(False), False, True, True),
        ("clip-local-loss-positives", clip(True), False, False, True),
        ("siglip", siglip, True, False, False),
        ("siglip-positives", siglip, True, False, True),
    ]
    failed = False
    for name, loss_fn, with_bias, per_rank_global, use_positives in variants:
        loss_err, grad_err, _ = check_variant(loss_fn, with_bias, per_rank_global, use_positives, rank, world_size)
        ok = loss_err < TOL and grad_err < TOL
        failed |= not ok
        if rank == 0:
            print(f"{'OK' if ok else 'MISMATCH'} {name}: max |loss diff| {loss_err:.2e}, "
                  f"max |grad diff| {grad_err:.2e} (tolerance {TOL:g})", flush=True)

    # Negative control: gathering without gradient must give wrong tower gradients (1/W of the true ones).
    loss_err, grad_err, ratio_err = check_variant(clip(False, gather_with_grad=False), False, True, False, rank,
                                                  world_size)
    ok = loss_err < TOL and grad_err > 1e-3 and ratio_err < TOL
    failed |= not ok
    if rank == 0:
        print(f"{'OK' if ok else 'MISMATCH'} negative-control clip-no-grad-gather: gradients differ from "
              f"single-process by {grad_err:.2e} (must exceed 1e-3); W * grad vs single-process {ratio_err:.2e}",
              flush=True)

    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
