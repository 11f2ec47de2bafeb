"""The shipped ShapesWorld VQGAN: small, loads offline by name, reconstructs ShapesWorld pictures closely, and
`clipguide generate --backend vqgan` runs on it with no download.

The bounds sit near what the model reaches: mean error 1.63/255 and median 0.90/255 on these 64 fresh pictures, and
the oracle reads 99 of the first 100 fresh reconstructions exactly as the originals (98.6% of 2,500; issue 5 asks for
98%). The 13-stage model before it reached 1.57/255 and 0.65/255 and read all 100; the ten-stage one before that
1.87/255 and 0.86/255, and 98 of the 100. The oracle wants 95% of the border within 12/255 of one colour, 95% of the
shape on the blend of two flat colours and the shape's outline within its IoU margin; small triangles' outlines fail
most of what fails now.
"""
import json

import numpy as np
import torch
from PIL import Image

from clipguide import CLIPGuidance, Perceptor
from clipguide.cli import main
from clipguide.generators.vqgan import VQGANGenerator, blob_masks, onto_blend
from clipguide.palettes import parse_palette
from clipguide.train_vqgan import reconstruction_agreement
from clipguide.training import shapes_batch
from clipguide.vqgan_model import WEIGHTS, load_vqgan
from core_clip import shapes


def test_shipped_vqgan_is_small_and_loads_by_name():
    path = WEIGHTS / "vqgan-shapes.safetensors"
    assert path.stat().st_size <= 10 * 2**20 and path.with_suffix(".json").is_file()
    model = load_vqgan("shapes")
    assert model.config.factor == 4 and not any(p.requires_grad for p in model.parameters())


def test_shipped_vqgan_reconstructs_fresh_pictures_closely():
    model = load_vqgan("shapes")
    x = shapes_batch(123_456, 64, 64, seed=7)          # fresh renders: not a training batch
    with torch.no_grad():
        recon, _ = model(x)
    error = (recon.clamp(-1, 1) - x).abs() * 127.5      # in 0..255 levels
    assert error.mean() < 1.8
    assert error.median() < 1.0


def test_oracle_reads_shipped_reconstructions_as_the_originals():
    assert reconstruction_agreement(load_vqgan("shapes"), n=100, seed=1) >= 0.99


def test_generate_with_the_vqgan_backend_works_offline(capsys, tmp_path):
    out_path = tmp_path / "vq.png"
    code = main(["generate", "a red circle on a blue background", "--backend", "vqgan", "--steps", "3",
                 "--retries", "0", "--cutn", "4", "--out", str(out_path), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["backend"] == "vqgan" and report["steps"] == 3
    assert Image.open(out_path).size == (64, 64)


def test_the_shipped_clip_starts_the_shipped_vqgan_from_the_colours_the_prompt_names():
    guidance = CLIPGuidance("a red circle on a green background", Perceptor("shapes"), cutn=4)
    backend = VQGANGenerator(1, 64, 64, generator=torch.Generator().manual_seed(0), start="blob", palette="shapes")
    first = []
    backend.sample(guidance, 1, torch.Generator(), lambda step, losses, images: first.append(images[0]))
    mask = blob_masks(1, 64, 64, torch.Generator().manual_seed(0))[0, 0].bool()   # the start's blob

    def colour(pixels):  # [3, N] -> the name of the palette colour nearest their median
        nearest = torch.cdist(pixels.median(dim=1).values[None], parse_palette("shapes")).argmin()
        return list(shapes.COLORS)[int(nearest)]

    assert colour(first[0][:, ~mask]) == "green" and colour(first[0][:, mask]) == "red"


def test_generate_with_blend_draws_only_blends_of_two_shapesworld_colours(capsys, tmp_path):
    out_path = tmp_path / "vq.png"
    code = main(["generate", "a yellow square on a white background", "--backend", "vqgan", "--no-recipe",
                 "--start", "blob", "--palette", "shapes", "--blend", "--steps", "2", "--retries", "0",
                 "--cutn", "4", "--out", str(out_path), "--json"])
    assert code == 0, capsys.readouterr().err
    picture = torch.tensor(np.asarray(Image.open(out_path).convert("RGB")), dtype=torch.float32).permute(2, 0, 1) / 255
    yellow, white = (torch.tensor(shapes.COLORS[name], dtype=torch.float32) / 255 for name in ("yellow", "white"))
    off_blend = onto_blend(picture[None], torch.stack([white, yellow])[None])[0] - picture
    assert off_blend.abs().max() <= 1 / 255              # the PNG's rounding
    # the pair is the prompt's: a white field and a yellow blob (each pixel's place t on the segment, 1 at yellow)
    t = ((picture - white[:, None, None]) * (yellow - white)[:, None, None]).sum(0) / (yellow - white).square().sum()
    assert (t < 0.1).float().mean() > 0.5 and (t > 0.5).float().mean() > 0.1
