"""The shipped `shapes` CLIP: loads offline, stays small, and still knows ShapesWorld (judged on fresh renders)."""
import pytest

import core_clip
from core_clip import shapes
from core_clip.evaluate import eval_shapes
from core_clip.model import WEIGHTS_DIR


@pytest.fixture(scope="module")
def shipped():
    return core_clip.load("shapes", device="cpu")


def test_shipped_model_is_registered_and_small(shipped):
    assert "shapes" in core_clip.list_shipped() and core_clip.DEFAULT_MODEL == "shapes"
    assert (WEIGHTS_DIR / "shapes.safetensors").stat().st_size < 8 * 2**20
    assert shipped.config.tokenizer["type"] == "bytes"


def test_shipped_model_zero_shot_on_fresh_images(shipped):
    results = eval_shapes(shipped, n=200, seed=123)
    for attribute in ("shape", "color", "background", "size", "position", "color_shape"):
        assert results[f"{attribute}_acc"] >= 0.97, (attribute, results)
    assert results["heldout_color_shape_acc"] >= 0.9, results


def test_shipped_model_classifies_rendered_files_from_the_cli(shipped, tmp_path, capsys):
    import json

    from PIL import Image

    from core_clip.cli import main

    scenes = [shapes.Scene("circle", "red", "blue"), shapes.Scene("triangle", "yellow", "black", "large"),
              shapes.Scene("square", "green", "white", "small", "left")]
    paths = []
    for i, scene in enumerate(scenes):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(shapes.render(scene, 96)).save(paths[-1])
    assert main(["zeroshot", *paths, "--labels", "circle,square,triangle", "--template", "a red {}",
                 "--template", "a green {}", "--template", "a yellow {}", "--json"]) == 0
    predictions = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["predictions"]
    assert [p["label"] for p in predictions] == [s.shape for s in scenes]


def test_shipped_model_is_calibrated(shipped):
    from core_clip.calibrate import match_score

    # recorded by the README's `core-clip calibrate --model ... --data shapes` (default n, quantile and seed)
    assert shipped.match_score == round(match_score(shipped, "shapes"), 2)
