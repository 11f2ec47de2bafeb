"""The core-clip and clipguide command lines: JSON output and one-line errors with exit code 2."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from clipguide.cli import main as clipguide_main
from core_clip.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_model):
    return str(tiny_model.save(tmp_path_factory.mktemp("model") / "tiny"))


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(64, 64), (48, 80)]):
        path = tmp_path / f"img{i}.png"
        Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).save(path)
        paths.append(str(path))
    return paths


def _exit_code(argv) -> int:
    """main()'s return value, or argparse's exit status for argument errors."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def _json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_zeroshot_json(model_dir, images, capsys):
    assert main(["zeroshot", *images, "--labels", "circle,square,triangle", "--model", model_dir, "--json"]) == 0
    out = _json(capsys)
    assert [p["image"] for p in out["predictions"]] == images
    for p in out["predictions"]:
        assert set(p["probs"]) == {"circle", "square", "triangle"}
        assert sum(p["probs"].values()) == pytest.approx(1, abs=1e-4)
        assert p["label"] == max(p["probs"], key=p["probs"].get)


@pytest.mark.parametrize("argv, message", [
    (["zeroshot", "missing.png", "--labels", "a,b"], "image not found: missing.png"),
    (["zeroshot", "IMG", "--labels", "a"], "at least two comma-separated labels"),
    (["zeroshot", "IMG", "--labels", "a,b", "--model", "ViT-B-33"], "unknown model 'ViT-B-33'"),
    (["eval", "--data", "nope.csv", "--model", "shapes-tiny"], "CSV not found: nope.csv"),
    (["eval", "--data", "shapes", "--n", "0"], "expected a positive integer"),
    (["embed", "--out", "x.safetensors"], "either IMAGE paths or --text"),
    (["frobnicate"], "invalid choice"),
    (["eval"], "the following arguments are required: --data"),
])
def test_bad_input_exits_2_with_one_line(argv, message, images, capsys):
    argv = [images[0] if a == "IMG" else a for a in argv]
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_unreadable_image_exits_2(tmp_path, capsys, model_dir):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    assert main(["zeroshot", str(tmp_path / "bad.png"), "--labels", "a,b", "--model", model_dir]) == 2
    assert "cannot read image" in capsys.readouterr().err


def test_eval_digits_and_csv(model_dir, images, tmp_path, capsys):
    assert main(["eval", "--model", model_dir, "--data", "digits", "--json"]) == 0
    out = _json(capsys)
    assert out["digits_n"] == 450 and 0 <= out["digits_acc"] <= 1
    csv = tmp_path / "pairs.csv"
    csv.write_text(f"{images[0]},a red circle\n{images[1]},a blue square\n")
    assert main(["eval", "--model", model_dir, "--data", str(csv), "--json"]) == 0
    out = _json(capsys)
    assert out["pairs_n"] == 2 and out["image_to_text_R@5"] == 1.0  # two candidates: top 5 always hits


def test_index_then_search_finds_the_query_image(model_dir, images, tmp_path, capsys):
    folder = tmp_path  # holds the two images
    assert main(["index", str(folder), "--out", str(tmp_path / "idx.safetensors"), "--model", model_dir,
                 "--json"]) == 0
    assert _json(capsys)["n"] == 2
    assert main(["search", str(tmp_path / "idx.safetensors"), "--image", images[1], "-k", "1", "--json"]) == 0
    results = _json(capsys)["results"]
    assert results[0]["path"] == "img1.png" and results[0]["score"] == pytest.approx(1, abs=1e-5)
    assert main(["embed", "--text", "a red circle", "--text", "a cat", "--out", str(tmp_path / "t.safetensors"),
                 "--model", model_dir, "--json"]) == 0
    assert _json(capsys) == {"out": str(tmp_path / "t.safetensors"), "n": 2, "dim": 128}


def test_clipguide_score_prompt_and_captions(model_dir, images, tmp_path, capsys):
    import core_clip

    model = core_clip.load(model_dir, device="cpu")
    expected = [core_clip.clip_score(Image.open(p), "a red circle", model).item() for p in images]
    assert clipguide_main(["score", *images, "--prompt", "a red circle", "--clip", model_dir, "--json"]) == 0
    out = _json(capsys)
    assert [r["clip_score"] for r in out["scores"]] == pytest.approx(expected, abs=1e-3)
    csv = tmp_path / "caps.csv"
    csv.write_text(f"path,caption\n{images[0]},a red circle\n{images[1]},a blue square\n")
    assert clipguide_main(["score", images[0], "--captions", str(csv), "--clip", model_dir, "--json"]) == 0
    assert _json(capsys)["scores"][0]["caption"] == "a red circle"
    assert clipguide_main(["score", str(tmp_path / "other.png"), "--captions", str(csv), "--clip", model_dir]) == 2
    assert "has no caption for" in capsys.readouterr().err


def test_console_entry_point_runs_as_a_module(model_dir, images):
    proc = subprocess.run([sys.executable, "-m", "core_clip.cli", "zeroshot", images[0], "--labels", "a,b",
                           "--model", model_dir, "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["predictions"][0]["image"] == images[0]
