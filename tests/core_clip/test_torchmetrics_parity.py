"""clip_score against torchmetrics' CLIPScore on the same random Hugging Face CLIP, loaded by both from one folder."""
import pytest
import torch
from torchmetrics.functional.multimodal import clip_score as tm_clip_score

import core_clip
from tests.helpers import save_random_hf_clip, torchmetrics_clip


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return save_random_hf_clip(tmp_path_factory.mktemp("hf_clip"), "tiny", seed=1)


def test_clip_score_agrees_with_torchmetrics_per_sample(hf_folder):
    model = core_clip.load(str(hf_folder), device="cpu")
    hf = torchmetrics_clip(hf_folder)
    g = torch.Generator().manual_seed(0)
    # uint8 images at the model's input size: both sides then see the same pixels (no resampling differences)
    images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=g)
    captions = ["a red circle", "a blue square on the left", "a photo of a large green triangle", "x",
                "two dogs", "an empty street at night", "ratio 16:9 poster", "a cat"] * 4
    ours = core_clip.clip_score(images, captions, model)
    with torch.no_grad():
        # torchmetrics clamps the mean over what it is given; one pair at a time that is the per-pair value
        theirs = torch.stack([tm_clip_score(img, cap, lambda: hf) for img, cap in zip(images, captions)])
    assert (theirs > 0).sum() >= 3, "the comparison needs pairs with a positive score"
    assert torch.allclose(ours, theirs.float(), atol=1e-4)
    # over the whole batch torchmetrics reports max(mean of unclamped scores, 0), never above our mean
    with torch.no_grad():
        batch = tm_clip_score(list(images), captions, lambda: hf)
    assert batch <= ours.mean() + 1e-4
