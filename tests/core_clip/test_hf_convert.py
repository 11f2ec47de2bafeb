"""HF transformers CLIP folders -> open_clip CLIP: same features, same tokens, loud failures."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import CLIP
from open_clip.tokenizer import SimpleTokenizer
import transformers
from safetensors.torch import load_file, save_file

from core_clip.errors import CheckpointError
from core_clip.hf_convert import ConversionError, convert_hf_clip, is_hf_clip_folder
from tests.helpers import pooled_features, save_random_hf_clip

torch.set_num_threads(2)

CAPTIONS = [
    "a photo of a cat",
    "x",
    "two dogs playing in the snow next to a bright red fire hydrant, seen from above",
    "it's a diagram of 3 gears!",
]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_hf_clip(tmp_path_factory.mktemp("hf_clip"))


@pytest.fixture(scope="module", params=["current", "legacy"])
def hf_variant_folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as saved, and as openai/clip-vit-* configs have it: quick_gelu and eos_token_id 2, for
    which HF pools text at the argmax of the ids instead of at the first eos."""
    folder = save_random_hf_clip(tmp_path_factory.mktemp(request.param))
    if request.param == "legacy":
        path = folder / "config.json"
        config = json.loads(path.read_text())
        config["text_config"].update(hidden_act="quick_gelu", eos_token_id=2)
        config["vision_config"]["hidden_act"] = "quick_gelu"
        path.write_text(json.dumps(config))
    return folder


def _open_clip_model(folder: Path) -> CLIP:
    converted = convert_hf_clip(folder)
    model = CLIP(**converted.model_cfg).eval()
    model.load_state_dict(converted.state_dict, strict=True)
    return model


def test_converted_model_matches_transformers(hf_variant_folder: Path) -> None:
    hf_model = transformers.CLIPModel.from_pretrained(hf_variant_folder).eval()
    processor = transformers.CLIPProcessor.from_pretrained(hf_variant_folder)
    model = _open_clip_model(hf_variant_folder)

    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    # HF reference: padded to the longest caption, with its attention mask. open_clip always runs the full
    # context; feed it both HF's ids (padded with eos 49407) and open_clip's own (padded with 0).
    hf_inputs = processor(text=CAPTIONS, padding=True, return_tensors="pt")
    hf_ids_full = processor(text=CAPTIONS, padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    open_clip_ids = SimpleTokenizer(context_length=77)(CAPTIONS)
    with torch.no_grad():
        hf_image = F.normalize(pooled_features(hf_model.get_image_features(pixel_values=images)), dim=-1)
        hf_text = F.normalize(pooled_features(hf_model.get_text_features(**hf_inputs)), dim=-1)
        image = model.encode_image(images, normalize=True)
        text_from_hf_ids = model.encode_text(hf_ids_full, normalize=True)
        text_from_open_clip_ids = model.encode_text(open_clip_ids, normalize=True)

    torch.testing.assert_close(image, hf_image, atol=1e-5, rtol=0)
    torch.testing.assert_close(text_from_hf_ids, hf_text, atol=1e-5, rtol=0)
    torch.testing.assert_close(text_from_open_clip_ids, hf_text, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.logit_scale, hf_model.logit_scale)


def test_open_clip_tokenizer_matches_hf_tokenizer(hf_folder: Path) -> None:
    hf_tokenizer = transformers.CLIPTokenizer.from_pretrained(hf_folder)
    captions = CAPTIONS + [" ".join(["a very long caption"] * 30)]
    open_clip_ids = SimpleTokenizer(context_length=77)(captions)
    for caption, row in zip(captions, open_clip_ids):
        hf_ids = hf_tokenizer(caption, truncation=True, max_length=77)["input_ids"]
        assert hf_ids[-1] == hf_tokenizer.eos_token_id == 49407
        # Padding differs (open_clip 0, HF eos); compare up to and including the eos.
        assert row[: len(hf_ids)].tolist() == hf_ids, caption


def test_preprocess_and_tokenizer_cfg(hf_folder: Path, tmp_path: Path) -> None:
    assert is_hf_clip_folder(hf_folder)
    assert not is_hf_clip_folder(tmp_path)
    converted = convert_hf_clip(hf_folder)
    assert converted.preprocess_cfg == {
        "size": 32,
        "mean": OPENAI_DATASET_MEAN,
        "std": OPENAI_DATASET_STD,
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    assert converted.tokenizer == {"type": "open_clip", "context_length": 77}

    folder = shutil.copytree(hf_folder, tmp_path / "custom_vocab")
    merges = folder / "merges.txt"
    merges.write_text(merges.read_text().replace("t h\n", ""))  # a different BPE: keep HF's tokenizer
    assert convert_hf_clip(folder).tokenizer == {"type": "hf", "path": str(folder), "context_length": 77}


def _copy_with_weights(hf_folder: Path, dest: Path, edit) -> Path:
    """Copy the folder, then apply ``edit`` to its weights (a dict of HF-named tensors) in place."""
    folder = shutil.copytree(hf_folder, dest)
    weights = load_file(folder / "model.safetensors")
    edit(weights)
    save_file(weights, folder / "model.safetensors")
    return folder


def test_unknown_weight_is_an_error(hf_folder: Path, tmp_path: Path) -> None:
    folder = _copy_with_weights(
        hf_folder, tmp_path / "extra", lambda w: w.update({"text_model.extra_head.weight": torch.zeros(2)})
    )
    with pytest.raises(ConversionError, match=r"unexpected.*text_model\.extra_head\.weight"):
        convert_hf_clip(folder)


def test_missing_weight_is_an_error(hf_folder: Path, tmp_path: Path) -> None:
    missing = "vision_model.encoder.layers.1.self_attn.k_proj.bias"
    folder = _copy_with_weights(hf_folder, tmp_path / "missing", lambda w: w.pop(missing))
    with pytest.raises(ConversionError, match=rf"missing.*{missing.replace('.', r'[.]')}"):
        convert_hf_clip(folder)


def test_pytorch_model_bin(hf_folder: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(hf_folder, tmp_path / "bin")
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(weights, folder / "pytorch_model.bin")
    expected = convert_hf_clip(hf_folder).state_dict
    converted = convert_hf_clip(folder).state_dict
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[k], expected[k]) for k in expected)


class _CreatesFileWhenUnpickled:
    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_pickled_code_in_bin_is_refused(hf_folder: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(hf_folder, tmp_path / "evil")
    marker = tmp_path / "unpickled"
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save({**weights, "payload": _CreatesFileWhenUnpickled(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refusing to load .*pytorch_model.bin"):
        convert_hf_clip(folder)
    assert not marker.exists()
