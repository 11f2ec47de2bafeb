"""Calibration: the CLIP score that true pairs of a model's data reach, recorded in the model's json config."""
import json

import numpy as np
import pytest
from PIL import Image

import core_clip
from core_clip import CoreClipError
from core_clip.calibrate import match_score, record_match_score
from core_clip.cli import main
from core_clip.score import clip_score
from core_clip.errors import CheckpointError
from core_clip.model import ModelConfig

CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a white circle", "a black square"]


@pytest.fixture
def pairs_csv(tmp_path):
    """Five random 64 px images (the tiny model's input size, so no resizing) with captions."""
    rng = np.random.default_rng(0)
    rows = ["path,caption"]
    for i, caption in enumerate(CAPTIONS):
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{caption}")
    path = tmp_path / "pairs.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def _scores(model, folder, count):
    images = [Image.open(folder / f"{i}.png") for i in range(count)]
    return sorted(clip_score(images, CAPTIONS[:count], model).tolist())


def test_match_score_is_the_quantile_of_true_pair_scores(tiny_model, pairs_csv):
    scores = _scores(tiny_model, pairs_csv.parent, 5)
    # quantile 0.25 of 5 values is exactly the second lowest; 0.5 of the first 3 is their median
    assert match_score(tiny_model, str(pairs_csv), quantile=0.25) == pytest.approx(scores[1], abs=1e-4)
    first3 = _scores(tiny_model, pairs_csv.parent, 3)
    assert match_score(tiny_model, str(pairs_csv), n=3, quantile=0.5) == pytest.approx(first3[1], abs=1e-4)


def test_shapes_calibration_is_reproducible(tiny_model):
    # a random model scores many pairs below 0 (clamped), so its 1st percentile is 0: compare medians
    a = match_score(tiny_model, "shapes", n=64, seed=1, quantile=0.5)
    assert a == match_score(tiny_model, "shapes", n=64, seed=1, quantile=0.5) and 0 < a <= 100
    assert a != match_score(tiny_model, "shapes", n=64, seed=2, quantile=0.5)


@pytest.mark.parametrize("kwargs, match", [({"quantile": 0.0}, "quantile"), ({"quantile": 1.0}, "quantile"),
                                           ({"n": 0}, "at least one pair")])
def test_bad_calibration_settings(tiny_model, kwargs, match):
    with pytest.raises(CoreClipError, match=match):
        match_score(tiny_model, "shapes", **kwargs)


def test_recorded_score_loads_with_the_model_and_keeps_the_config(tiny_model, tmp_path):
    path = str(tiny_model.save(tmp_path / "m.safetensors"))
    before = json.loads((tmp_path / "m.json").read_text())
    assert "match_score" not in before and core_clip.load(path).match_score is None
    assert record_match_score(path, 71.2345) == tmp_path / "m.json"
    after = json.loads((tmp_path / "m.json").read_text())
    assert after == {**before, "match_score": 71.23}
    loaded = core_clip.load(path)
    assert loaded.match_score == 71.23
    loaded.save(tmp_path / "copy")  # a re-saved model keeps it (folder layout)
    assert core_clip.load(str(tmp_path / "copy")).match_score == 71.23


def test_only_local_models_and_real_scores_are_recorded(tiny_model, tmp_path):
    with pytest.raises(CoreClipError, match="no local json config"):
        record_match_score("shapes-tiny", 50.0)  # a built-in architecture config, not a model's own file
    path = str(tiny_model.save(tmp_path / "m.safetensors"))
    for bad in (-1, 100.5, float("nan")):
        with pytest.raises(CoreClipError, match=r"\[0, 100\]"):
            record_match_score(path, bad)


def test_config_rejects_a_bad_match_score(tiny_model):
    obj = {"model_cfg": tiny_model.config.model_cfg, "match_score": "high"}
    with pytest.raises(CheckpointError, match="match_score"):
        ModelConfig.from_json(obj, "x.json")


def test_cli_calibrate_writes_and_reports(tiny_model, pairs_csv, tmp_path, capsys):
    path = str(tiny_model.save(tmp_path / "m.safetensors"))
    assert main(["calibrate", "--model", path, "--data", str(pairs_csv), "--quantile", "0.25", "--no-write",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["written"] is None and core_clip.load(path).match_score is None
    assert out["match_score"] == pytest.approx(_scores(tiny_model, pairs_csv.parent, 5)[1], abs=0.01)
    assert main(["calibrate", "--model", path, "--data", str(pairs_csv), "--quantile", "0.25", "--json"]) == 0
    capsys.readouterr()
    assert core_clip.load(path).match_score == out["match_score"]
    with pytest.raises(SystemExit) as exit_info:
        main(["calibrate", "--model", path, "--data", "shapes", "--quantile", "1.5"])
    assert exit_info.value.code == 2 and "expected a number in (0, 1), got 1.5" in capsys.readouterr().err
