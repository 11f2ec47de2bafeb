"""Gradient alignment: edit pairs differ only in their edit, the loss is 1 - cos(input gradient, way to the edit),
its parameter gradient (a double backward) matches finite differences, training lowers it, runs resume exactly."""
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import core_clip
from core_clip import shapes
from core_clip.align import AlignConfig, GradientAligner, alignment_loss, edit_pairs, similarity, walk
from core_clip.errors import CoreClipError
from core_clip.train import Trainer, TrainError

from .test_train import ROOT, _cfg, _losses


def test_edit_pairs_show_each_scene_and_its_edit_with_the_same_jitter_and_captions_name_the_edit():
    pairs = edit_pairs(40, 64, np.random.default_rng(3))
    kinds = set()
    for source, target, x0, x1, caption in zip(pairs.sources, pairs.targets, pairs.x0, pairs.x1, pairs.captions):
        changed = {k for k in ("shape", "color", "background") if getattr(source, k) != getattr(target, k)}
        kinds.add(frozenset(changed))
        assert (source.size, source.position) == (target.size, target.position) and changed
        assert not source.held_out and not target.held_out
        assert shapes.matches(shapes.read(x0), source, shapes.ATTRIBUTES)
        assert shapes.matches(shapes.read(x1), target, shapes.ATTRIBUTES)
        assert caption in shapes.captions(target)
        assert all(getattr(target, k) in caption.split() for k in changed), (caption, changed)
        if changed == {"color"}:  # same jitter: the background's pixels are the same
            background = (x0 - x1).abs().amax(dim=0) == 0
            assert background.float().mean() > 0.5
            assert torch.equal(x0[:, 0, 0], x1[:, 0, 0])
    assert {frozenset({"color", "background"}), frozenset({"color"}), frozenset({"background"}),
            frozenset({"shape"})} <= kinds


@pytest.fixture(scope="module")
def resnet() -> core_clip.ClipModel:
    torch.manual_seed(0)
    return core_clip.load("shapes-rn", device="cpu")  # the shipped architecture: batch norms, attention pooling


def _pairs(n: int = 3):
    return edit_pairs(n, 64, np.random.default_rng(0))


def test_alignment_loss_is_one_minus_the_cosine_of_the_input_gradient_and_the_way_to_the_edit(resnet):
    pairs = _pairs()
    x = 0.7 * pairs.x0 + 0.3 * pairs.x1
    resnet.train()  # the loss reads the model in eval mode whatever its mode, and leaves the mode as it was
    loss = alignment_loss(resnet, x, pairs.x1, pairs.captions)
    assert resnet.training

    resnet.eval()
    text = resnet.encode_text(pairs.captions)
    cosines = []
    for i in range(len(x)):  # the input gradient by central differences along the way to the edit and across it
        way = (pairs.x1[i] - x[i]).double()
        across = torch.randn(way.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        h = 1e-2

        def sim(image):
            with torch.no_grad():
                return similarity(resnet, image.float()[None], text[i:i + 1]).double()

        point = x[i].detach().requires_grad_(True)
        grad, = torch.autograd.grad(similarity(resnet, point[None], text[i:i + 1]).sum(), point)
        for direction in (way, across):
            unit = direction / direction.norm()
            numeric = (sim(x[i] + h * unit) - sim(x[i] - h * unit)) / (2 * h)
            assert numeric.item() == pytest.approx((grad.double() * unit).sum().item(), rel=0.05, abs=1e-4)
        cosines.append(F.cosine_similarity(grad.flatten(), (pairs.x1[i] - x[i]).flatten(), dim=0))
    resnet.train()
    assert loss.item() == pytest.approx(1 - torch.stack(cosines).mean().item(), abs=1e-5)


def test_the_alignment_losss_parameter_gradient_matches_finite_differences(resnet):
    model = core_clip.load("shapes-rn", device="cpu")
    model.load_state_dict(resnet.state_dict())
    model.double()
    pairs = _pairs(2)
    x, target = (0.5 * pairs.x0 + 0.5 * pairs.x1).double(), pairs.x1.double()
    params = [p for p in model.clip.visual.parameters() if p.requires_grad]
    loss = alignment_loss(model, x, target, pairs.captions)
    grads = torch.autograd.grad(loss, params)
    g = torch.Generator().manual_seed(1)
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) * (p.detach().abs().mean() + 1e-3) for p in params]
    analytic = sum((gr * d).sum() for gr, d in zip(grads, direction)).item()

    def shifted(h):
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(h * d)
        value = alignment_loss(model, x, target, pairs.captions).item()
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.sub_(h * d)
        return value

    # small: the input gradient of a ReLU network jumps where a unit changes sign, and a shift of 1e-4 already
    # crosses some; the features are float32, which limits how small it can be
    h = 1e-5
    numeric = (shifted(h) - shifted(-h)) / (2 * h)
    assert abs(analytic) > 1e-2
    assert numeric == pytest.approx(analytic, rel=0.05)


def test_walk_takes_each_pictures_own_steps_up_its_similarity():
    model = core_clip.load("shapes", device="cpu").eval()  # trained: its similarity is smooth on this scale
    pairs = _pairs()
    x = 0.3 + 0.4 * pairs.x0  # away from 0 and 1: no step is clamped
    with torch.no_grad():
        text = model.encode_text(pairs.captions)
    walked = walk(model, x, text, torch.tensor([0, 1, 3]), size=0.5)
    assert torch.equal(walked[0], x[0])
    assert (walked[1] - x[1]).norm().item() == pytest.approx(0.5, rel=1e-4)
    assert 0.5 < (walked[2] - x[2]).norm().item() <= 1.5 * (1 + 1e-4)
    with torch.no_grad():
        before, after = similarity(model, x, text), similarity(model, walked, text)
    assert (after[1:] > before[1:]).all()


def test_training_on_the_alignment_loss_lowers_it(resnet):
    model = core_clip.load("shapes-rn", device="cpu")
    model.load_state_dict(resnet.state_dict())
    aligner = GradientAligner(AlignConfig(edits=8, walk=0), image_size=64, seed=0)
    optimizer = torch.optim.Adam(model.clip.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):  # the same step: the same pairs and points each time
        loss = aligner.loss(model, step=0)
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(aligner.loss(model, step=5).detach(), aligner.loss(model, step=5).detach())
    assert losses[-1] < losses[0] - 0.2, losses


def test_training_with_alignment_logs_it_and_resumes_exactly(tmp_path):
    settings = dict(model="shapes-rn", batch_size=8, align=1.0, align_edits=2, align_walk=2, align_start=1,
                    max_steps=4, save_every=2)
    cfg = _cfg(tmp_path / "straight", **settings)
    Trainer(cfg).run()
    rows = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    assert [("align_loss" in r) for r in rows] == [False, True, True, True]
    straight = _losses(Path(cfg.out))

    resumed = _cfg(tmp_path / "resumed", **settings)
    Trainer(resumed).run()
    (Path(resumed.out) / "checkpoints" / "latest").write_text("step_0000002\n")  # as if killed after step 2
    Trainer(replace(resumed, resume=True)).run()
    assert _losses(Path(resumed.out)) == straight


def test_bad_alignment_settings_are_refused(tmp_path):
    with pytest.raises(TrainError, match="needs --data shapes"):
        Trainer(_cfg(tmp_path / "a", data="digits", align=1.0))
    with pytest.raises(TrainError, match="--align must be >= 0"):
        Trainer(_cfg(tmp_path / "b", align=-1.0))
    with pytest.raises(TrainError, match="--align-edits must be >= 1"):
        Trainer(_cfg(tmp_path / "c", align=1.0, align_edits=0))
    with pytest.raises(CoreClipError, match="reach"):
        AlignConfig(reach=1.0)


def test_torchrun_ranks_average_their_alignment_gradients(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(Path(__file__).with_name("align_dist_worker.py")), str(tmp_path)],
                            env=env, timeout=300, capture_output=True, text=True)
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr[-2000:]
