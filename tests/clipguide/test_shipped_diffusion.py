"""The shipped ShapesWorld diffusion model: a stock diffusers folder, clean unguided samples, guided pictures that
the oracle reads as the prompt asked."""
import json

import torch
from diffusers import DDPMPipeline

from clipguide import guide
from clipguide.generators.diffusion import WEIGHTS, DiffusionGenerator, load_diffusion
from core_clip import shapes

FOLDER = WEIGHTS / "diffusion-shapes"


def test_shipped_folder_is_a_small_stock_diffusers_pipeline():
    size = sum(p.stat().st_size for p in FOLDER.rglob("*") if p.is_file())
    assert size <= 15 * 2**20
    assert json.loads((FOLDER / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    pipe = DDPMPipeline.from_pretrained(FOLDER, local_files_only=True, low_cpu_mem_usage=False)
    ours = load_diffusion("shapes")
    assert all(torch.equal(a, b) for a, b in zip(pipe.unet.state_dict().values(), ours.unet.state_dict().values()))
    assert DiffusionGenerator.native_size() == (32, 32)


def test_unguided_samples_are_single_clean_shapes(perceptor):
    generator = torch.Generator().manual_seed(0)
    images = DiffusionGenerator(64, 32, 32, generator=generator, scale=0.0).sample(None, 50, generator)
    readings = [shapes.read(im) for im in images]
    clean = sum(r["shape"] is not None and r["color"] is not None and r["background"] is not None for r in readings)
    assert clean >= 0.9 * 64


def test_guided_picture_is_what_the_prompt_asks():
    result = guide("a red circle on a blue background", backend="diffusion", seed=0)
    reading = shapes.read(result.tensor[0])
    assert (reading["color"], reading["shape"], reading["background"]) == ("red", "circle", "blue")
