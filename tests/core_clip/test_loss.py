"""core_clip.loss against hand computations, open_clip's losses, autograd's numerical gradients, and (through
torchrun, 2 CPU ranks) the single-process gradient of the global batch under DDP."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import open_clip.loss
import pytest
import torch
import torch.nn.functional as F

from core_clip.loss import ClipLoss, SigLipLoss

REPO = Path(__file__).resolve().parents[2]


def features(b: int, d: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=-1)
    text = F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=-1)
    return image, text


def hand_clip_loss(image: torch.Tensor, text: torch.Tensor, scale: float, positives: list[list[bool]]) -> float:
    """Soft-target CLIP loss in plain Python: each row's (column's) target is uniform over its positives."""
    n = len(image)
    logits = [[scale * sum(a * b for a, b in zip(image[i].tolist(), text[j].tolist())) for j in range(n)]
              for i in range(n)]

    def direction(logit: list[list[float]], pos: list[list[bool]]) -> float:
        total = 0.0
        for i in range(n):
            log_z = math.log(sum(math.exp(v) for v in logit[i]))
            k = sum(pos[i])
            total += -sum((1 / k) * (logit[i][j] - log_z) for j in range(n) if pos[i][j])
        return total / n

    transpose = [list(row) for row in zip(*logits)]
    pos_transpose = [list(row) for row in zip(*positives)]
    return (direction(logits, positives) + direction(transpose, pos_transpose)) / 2


def identity(n: int) -> list[list[bool]]:
    return [[i == j for j in range(n)] for i in range(n)]


def grads(loss_fn, image: torch.Tensor, text: torch.Tensor, t: torch.Tensor, **kwargs) -> list[torch.Tensor]:
    """The loss and its gradients w.r.t. image features, text features and t (logit_scale = exp(t))."""
    image, text, t = (x.detach().requires_grad_() for x in (image, text, t))
    loss = loss_fn(image, text, t.exp(), **kwargs)
    loss = loss["contrastive_loss"] if isinstance(loss, dict) else loss
    return [loss, *torch.autograd.grad(loss, (image, text, t))]


@pytest.mark.parametrize("local_loss", [False, True])
def test_clip_loss_matches_hand_computation(local_loss: bool) -> None:
    image, text = features(5, 4)
    loss = ClipLoss(local_loss=local_loss)(image, text, torch.tensor(3.7, dtype=torch.float64))["contrastive_loss"]
    assert loss.item() == pytest.approx(hand_clip_loss(image, text, 3.7, identity(5)), abs=1e-12)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
@pytest.mark.parametrize("local_loss", [False, True])
def test_clip_loss_matches_open_clip_value_and_gradients(dtype: torch.dtype, tol: float, local_loss: bool) -> None:
    image, text = features(16, 8, dtype)
    t = torch.tensor(math.log(1 / 0.07), dtype=dtype)
    ours = grads(ClipLoss(local_loss=local_loss), image, text, t)
    theirs = grads(open_clip.loss.ClipLoss(), image, text, t)
    for name, a, b in zip(("loss", "d/d image", "d/d text", "d/d t"), ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=tol, msg=name)


def test_identity_positives_give_exactly_the_plain_loss() -> None:
    image, text = features(6, 4)
    t = torch.tensor(2.0, dtype=torch.float64)
    plain = grads(ClipLoss(), image, text, t)
    with_identity = grads(ClipLoss(), image, text, t, positives=torch.eye(6, dtype=torch.bool))
    assert torch.equal(plain[0], with_identity[0])
    for a, b in zip(plain[1:], with_identity[1:]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


def duplicated_caption_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4 pairs: captions 0 and 2 are the same text; caption 3 ("a red circle") is also true of image 1 (a small red
    circle), but caption 1 ("a small red circle") is not true of image 3: an asymmetric positive."""
    image, text = features(4, 5, seed=3)
    text[2] = text[0]
    positives = torch.eye(4, dtype=torch.bool)
    positives[0, 2] = positives[2, 0] = True
    positives[1, 3] = True
    return image, text, positives


@pytest.mark.parametrize("local_loss", [False, True])
def test_positives_give_soft_targets(local_loss: bool) -> None:
    image, text, positives = duplicated_caption_batch()
    loss = ClipLoss(local_loss=local_loss)(image, text, torch.tensor(5.0, dtype=torch.float64),
                                           positives=positives)["contrastive_loss"]
    assert loss.item() == pytest.approx(hand_clip_loss(image, text, 5.0, positives.tolist()), abs=1e-12)
    # and it is not the hard-label loss, which pushes the duplicate caption away as a negative
    assert abs(loss.item() - hand_clip_loss(image, text, 5.0, identity(4))) > 1e-3


@pytest.mark.parametrize("loss_fn", [ClipLoss(), SigLipLoss()], ids=["clip", "siglip"])
def test_positives_are_validated(loss_fn: torch.nn.Module) -> None:
    image, text = features(3, 4)
    args = (image, text, torch.tensor(10.0, dtype=torch.float64))
    if isinstance(loss_fn, SigLipLoss):
        args += (torch.tensor(-1.0, dtype=torch.float64),)
    missing_diagonal = torch.ones(3, 3, dtype=torch.bool)
    missing_diagonal[1, 1] = False
    with pytest.raises(ValueError, match="diagonal"):
        loss_fn(*args, positives=missing_diagonal)
    with pytest.raises(ValueError, match=r"\[3, 3\]"):
        loss_fn(*args, positives=torch.eye(4, dtype=torch.bool))


def hand_siglip_loss(image: torch.Tensor, text: torch.Tensor, scale: float, bias: float,
                     positives: list[list[bool]]) -> float:
    n = len(image)
    total = 0.0
    for i in range(n):
        for j in range(n):
            logit = scale * sum(a * b for a, b in zip(image[i].tolist(), text[j].tolist())) + bias
            label = 1.0 if positives[i][j] else -1.0
            total += math.log(1 + math.exp(-label * logit))  # -log sigmoid(label * logit)
    return total / n


def test_siglip_loss_matches_hand_computation_and_open_clip() -> None:
    image, text, positives = duplicated_caption_batch()
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    plain = SigLipLoss()(image, text, scale, bias)["contrastive_loss"]
    assert plain.item() == pytest.approx(hand_siglip_loss(image, text, 10.0, -3.0, identity(4)), abs=1e-12)
    assert plain.item() == pytest.approx(open_clip.loss.SigLipLoss()(image, text, scale, bias).item(), abs=1e-12)
    soft = SigLipLoss()(image, text, scale, bias, positives=positives)["contrastive_loss"]
    assert soft.item() == pytest.approx(hand_siglip_loss(image, text, 10.0, -3.0, positives.tolist()), abs=1e-12)


def test_gradcheck() -> None:
    image, text, positives = duplicated_caption_batch()
    image, text = image[:3].clone().requires_grad_(), text[:3].clone().requires_grad_()
    t = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    positives = positives[:3, :3]
    for local_loss in (False, True):
        clip = ClipLoss(local_loss=local_loss)
        assert torch.autograd.gradcheck(lambda i, x, s: clip(i, x, s.exp())["contrastive_loss"], (image, text, t))
        assert torch.autograd.gradcheck(
            lambda i, x, s: clip(i, x, s.exp(), positives=positives)["contrastive_loss"], (image, text, t))
    assert torch.autograd.gradcheck(
        lambda i, x, s, b: SigLipLoss()(i, x, s.exp(), b, positives=positives)["contrastive_loss"],
        (image, text, t, bias))


def test_distributed_gradients_equal_single_process() -> None:
    """Two gloo ranks under DDP, each variant against the single-process loss and gradients (dist_worker.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "core_clip" / "dist_worker.py")]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"worker failed:\n{result.stdout}\n{result.stderr}"
    ok_lines = {line.split()[1].rstrip(":") for line in result.stdout.splitlines() if line.startswith("OK ")}
    expected = {"clip", "clip-local-loss", "clip-positives", "clip-local-loss-positives", "siglip",
                "siglip-positives", "negative-control"}
    assert expected <= ok_lines, result.stdout
