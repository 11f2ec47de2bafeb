"""Contrastive losses for training CLIP, in one process or across ranks (torch.distributed).

Both losses take L2-normalised features, ``[B, D]`` per rank (``N = world_size * B`` in the global batch), and a
``logit_scale`` tensor that is ``exp(t)`` of the learnable temperature parameter ``t``, so its gradient reaches ``t``.
They return ``{"contrastive_loss": scalar tensor}``.

- ``ClipLoss``: the softmax (InfoNCE) loss of CLIP, image->text and text->image cross-entropy averaged.
- ``SigLipLoss``: the sigmoid loss of SigLIP (Zhai et al. 2023), an independent binary term per image-text pair.

Both accept an optional ``positives`` matrix, bool ``[N, N]`` over the global batch: ``positives[i, j]`` is True
when text ``j`` correctly describes image ``i`` (several captions can be true of one picture, or one caption can
appear twice in a batch). The diagonal must be True.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ClipLoss", "SigLipLoss", "gather_features"]


def _all_gather(features: Tensor, *, with_grad: bool, rank: int, world_size: int) -> Tensor:
    """``[B, D]`` on every rank -> ``[world_size * B, D]``, rank r's rows at ``r*B:(r+1)*B``."""
    if with_grad:
        # The backward of this all_gather sums, over all ranks, the gradient arriving at slot r and returns it
        # to rank r's `features`.
        return torch.cat(dist_nn.all_gather(features), dim=0)
    parts = [torch.empty_like(features) for _ in range(world_size)]
    dist.all_gather(parts, features.contiguous())
    parts[rank] = features  # the received copy has no graph; the own tensor keeps this rank's terms differentiable
    return torch.cat(parts, dim=0)


def gather_features(
    image_features: Tensor,
    text_features: Tensor,
    *,
    gather_with_grad: bool,
    rank: int,
    world_size: int,
) -> tuple[Tensor, Tensor]:
    """All-gather image and text features ``[B, D]`` from every rank into ``[world_size * B, D]``, ordered by rank.

    With ``gather_with_grad`` gradient flows back from every rank's loss to every rank's features; without it only
    this rank's own slot carries gradient (the other ranks' features are constants here).
    """
    return (
        _all_gather(image_features, with_grad=gather_with_grad, rank=rank, world_size=world_size),
        _all_gather(text_features, with_grad=gather_with_grad, rank=rank, world_size=world_size),
    )


def _check_positives(positives: Tensor, n: int) -> None:
    if positives.shape != (n, n):
        raise ValueError(f"positives must be [{n}, {n}] (the global batch), got {list(positives.shape)}")
    if positives.dtype != torch.bool:
        raise ValueError(f"positives must be a bool tensor, got {positives.dtype}")
    if not bool(positives.diagonal().all()):
        raise ValueError("positives must be True on the diagonal: text i always describes image i")


def _cross_entropy(logits: Tensor, labels: Tensor, positives: Tensor | None) -> Tensor:
    """Mean cross-entropy of logits ``[M, N]`` against class indices ``labels [M]``, or, given bool
    ``positives [M, N]``, against soft targets uniform over each row's positives."""
    log_probs = logits.log_softmax(dim=1)
    if positives is None:
        return -log_probs.gather(1, labels[:, None]).squeeze(1).mean()
    # Identity positives give one-hot targets: the same per-row values and the same mean as the hard branch,
    # so the loss is bit-identical to having no positives.
    targets = positives.to(device=log_probs.device, dtype=log_probs.dtype)
    targets = targets / targets.sum(dim=1, keepdim=True)
    return -(targets * log_probs).sum(dim=1).mean()


class ClipLoss(nn.Module):
    """CLIP's symmetric contrastive loss: ``logits = logit_scale * I @ T^T``,
    ``L = (CE(rows: image -> texts) + CE(columns: text -> images)) / 2``.

    Nothing here clamps the temperature: the training loop clamps ``t`` (``logit_scale = exp(t)``) to
    ``[0, ln 100]`` after each optimizer step.

    Distributed (``world_size > 1``): features are all-gathered across ranks. Non-local: every rank computes the
    loss over the full global ``[N, N]`` logits. ``local_loss``: this rank computes only its own ``B`` rows (its
    images against all ``N`` texts) and its own ``B`` columns (its texts against all ``N`` images), ``[B, N]`` each;
    the mean of the ranks' losses is the global loss.

    Why DDP's averaged gradients equal the single-process gradient of the global loss L (W ranks, gather with grad):
    rank r's loss L_r depends on every rank's features through the gather, and all_gather's backward sums the
    slot-r gradients of all ranks, so rank r's features x_r receive d(sum_r' L_r')/dx_r. Non-local: L_r = L on
    every rank, so that is W * dL/dx_r. Local: L_r weights its own B rows and B columns by 1/(2B) where L weights
    all N of each by 1/(2N), so sum_r' L_r' = W * L and again W * dL/dx_r. DDP averages parameter gradients over
    ranks: mean_r(W * dL/dx_r * dx_r/dθ) = sum_r dL/dx_r * dx_r/dθ = dL/dθ. logit_scale is not gathered: rank r
    gets dL_r/ds, whose mean over ranks is dL/ds in both variants. Without ``gather_with_grad`` rank r's features
    get only its own terms (non-local: dL/dx_r), so the towers' averaged gradients come out at 1/W of the true ones.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = True, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.rank = rank
        self.world_size = world_size

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        positives: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """``image_features``, ``text_features``: ``[B, D]``, L2-normalised, this rank's part of the batch.
        ``logit_scale``: scalar tensor ``exp(t)``. ``positives``: optional bool ``[N, N]`` over the global batch
        (True diagonal); targets become uniform over each image's positive texts (rows) and each text's positive
        images (columns). Returns ``{"contrastive_loss": scalar}``."""
        b = image_features.shape[0]
        if self.world_size > 1:
            all_images, all_texts = gather_features(
                image_features, text_features,
                gather_with_grad=self.gather_with_grad, rank=self.rank, world_size=self.world_size,
            )
        else:
            all_images, all_texts = image_features, text_features
        n = all_images.shape[0]
        if positives is not None:
            _check_positives(positives, n)

        if self.local_loss:
            own = slice(self.rank * b, (self.rank + 1) * b)
            logits_per_image = logit_scale * image_features @ all_texts.T  # [B, N]
            logits_per_text = logit_scale * text_features @ all_images.T  # [B, N]
            labels = torch.arange(own.start, own.stop, device=image_features.device)
            image_positives = None if positives is None else positives[own]
            text_positives = None if positives is None else positives[:, own].T
        else:
            logits_per_image = logit_scale * all_images @ all_texts.T  # [N, N]
            logits_per_text = logits_per_image.T
            labels = torch.arange(n, device=image_features.device)
            image_positives = positives
            text_positives = None if positives is None else positives.T

        loss = (
            _cross_entropy(logits_per_image, labels, image_positives)
            + _cross_entropy(logits_per_text, labels, text_positives)
        ) / 2
        return {"contrastive_loss": loss}


class SigLipLoss(nn.Module):
    """SigLIP's sigmoid loss (Zhai et al. 2023): ``logits = logit_scale * I @ T^T + logit_bias``, labels ``+1`` on
    positive pairs and ``-1`` elsewhere, ``L = -sum(logsigmoid(labels * logits)) / B`` (per image, as in the paper).

    Distributed: texts are all-gathered with gradient and this rank scores its ``B`` images against all ``N`` texts.
    The single-process loss of the global batch sums all N*N pair terms over N; rank r's loss L_r sums its B*N
    over B, so sum_r L_r = W * L. As in ``ClipLoss``, every rank's features then receive W * dL/dx_r (its images
    appear only in L_r; its texts through the gather's summed backward), scale and bias get dL_r/ds, and DDP's
    average over ranks gives dL/dθ.
    """

    def __init__(self, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.rank = rank
        self.world_size = world_size

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        logit_bias: Tensor,
        positives: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """``image_features``, ``text_features``: ``[B, D]``, L2-normalised, this rank's part of the batch.
        ``logit_scale``, ``logit_bias``: scalar tensors. ``positives``: optional bool ``[N, N]`` over the global
        batch (True diagonal), default the identity. Returns ``{"contrastive_loss": scalar}``."""
        b = image_features.shape[0]
        if self.world_size > 1:
            all_texts = _all_gather(text_features, with_grad=True, rank=self.rank, world_size=self.world_size)
        else:
            all_texts = text_features
        n = all_texts.shape[0]
        if positives is None:
            positives = torch.eye(n, dtype=torch.bool, device=image_features.device)
        else:
            _check_positives(positives, n)

        logits = logit_scale * image_features @ all_texts.T + logit_bias  # [B, N]
        own_rows = positives[self.rank * b:(self.rank + 1) * b].to(device=logits.device, dtype=logits.dtype)
        labels = 2 * own_rows - 1
        loss = -F.logsigmoid(labels * logits).sum() / b
        return {"contrastive_loss": loss}
