"""`clipguide generate`: the DESIGN.md contract (one JSON line, exit 2 with one line on bad input)."""
import json

import pytest
from PIL import Image

from clipguide.cli import main


def generate(capsys, *args, recipe=False):
    """Run `clipguide generate ARGS`; without ``recipe``, --no-recipe (the plain backends these tests are about)."""
    try:
        code = main(["generate", *args, *([] if recipe else ["--no-recipe"])])
    except SystemExit as e:  # argparse's own argument errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_json_contract(capsys, tmp_path):
    out_path = tmp_path / "sub" / "img.png"
    code, out, err = generate(capsys, "a red circle on a blue background", "--steps", "2", "--size", "48x32",
                              "--cutn", "2", "--seed", "3", "--out", str(out_path), "--json")
    assert code == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert {"out", "clip_score", "seconds", "steps", "backend", "seed"} <= set(report)
    assert report["out"] == str(out_path) and report["steps"] == 2 and report["seed"] == 3
    assert report["backend"] == "pixels" and 0 <= report["clip_score"] <= 100
    assert Image.open(out_path).size == (48, 32)


def test_generate_json_reports_the_last_guided_loss_of_diffusion(capsys, tmp_path, tiny_diffusion_path):
    # 3 DDPM steps at t = 666, 333, 0: guidance (to 0.6 of the way) steers only the first; NaN is not JSON
    code, out, err = generate(capsys, "a red circle", "--backend", "diffusion", "--model", str(tiny_diffusion_path),
                              "--steps", "3", "--size", "16", "--cutn", "2", "--retries", "0", "--out",
                              str(tmp_path / "x.png"), "--json")
    assert code == 0, err
    report = json.loads(out.strip().splitlines()[-1], parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
    assert report["steps"] == 3 and isinstance(report["loss"], float) and report["loss"] > 0


def test_generate_reports_retries(capsys, tmp_path):
    args = ("a red circle", "--steps", "1", "--cutn", "2", "--size", "16", "--out", str(tmp_path / "x.png"))
    code, out, err = generate(capsys, *args, "--retries", "1", "--accept-score", "100", "--json")
    assert code == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["attempts"] == [2] and report["steps"] == 2
    code, out, err = generate(capsys, *args, "--retries", "2", "--accept-score", "100")
    assert code == 0 and out.strip().endswith("(pixels, seed 0, 2 retries)")


def test_generate_uses_the_recipe_of_the_clip_and_backend(capsys, tmp_path):
    args = ("a red circle", "--steps", "1", "--cutn", "2", "--out", str(tmp_path / "x.png"), "--json")
    code, out, err = generate(capsys, *args, "--retries", "0", recipe=True)
    assert code == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["attempts"] == [1] and len(report["denoise_errors"]) == 1 and report["denoise_errors"][0] > 0
    code, out, err = generate(capsys, *args)
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["denoise_errors"] is None


def test_generate_loss_and_cutouts_flags(capsys, tmp_path):
    code, out, err = generate(capsys, "a red circle", "--steps", "1", "--cutn", "2", "--loss", "cosine",
                              "--cutouts", "disco", "--out", str(tmp_path / "x.png"), "--json")
    assert code == 0, err


def test_generate_palette_and_regulariser_flags(capsys, tmp_path):
    from core_clip import shapes

    code, out, err = generate(capsys, "a red circle on a blue background", "--steps", "3", "--cutn", "2",
                              "--colors", "2", "--palette", "shapes", "--regulariser", "border=5",
                              "--regulariser", "tv=0.5", "--out", str(tmp_path / "x.png"), "--json")
    assert code == 0, err
    colours = {c for _, c in Image.open(tmp_path / "x.png").convert("RGB").getcolors(64 * 64)}
    assert colours <= set(shapes.COLORS.values()) and 1 <= len(colours) <= 2


def test_generate_batch_writes_numbered_files(capsys, tmp_path):
    code, out, err = generate(capsys, "a red circle", "--steps", "1", "--cutn", "1", "--batch", "2",
                              "--out", str(tmp_path / "x.png"), "--json")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["outs"] == [str(tmp_path / "x_0.png"), str(tmp_path / "x_1.png")]
    assert all((tmp_path / f"x_{i}.png").is_file() for i in range(2))


def test_generate_reproduces_with_the_same_seed(capsys, tmp_path):
    for name in ("a", "b"):
        out = str(tmp_path / f"{name}.png")
        assert generate(capsys, "a green square", "--steps", "2", "--cutn", "2", "--out", out)[0] == 0
    assert Image.open(tmp_path / "a.png").tobytes() == Image.open(tmp_path / "b.png").tobytes()


@pytest.mark.parametrize("args, match", [
    (["--backend", "nope"], "unknown generator 'nope'"),
    (["--loss", "nope"], "unknown embedding loss 'nope'"),
    (["--cutouts", "nope"], "unknown cutout scheme 'nope'"),
    (["--size", "0"], "size"),
    (["--size", "big"], "size"),
    (["--steps", "0"], "--steps"),
    (["--steps", "-3"], "--steps"),
    (["--image-prompt", "/no/such.png"], "image prompt not found"),
    (["--init-image", "/no/such.png"], "not found"),
    (["--clip", "no-such-model"], "no-such-model"),
    (["--seed", "-1"], "--seed"),
    (["--scale", "100"], "backend 'pixels' has no option 'scale'"),
    (["--backend", "diffusion", "--lr", "0.1"], "backend 'diffusion' has no option 'lr'"),
    (["--backend", "diffusion", "--scheduler", "plms"], "unknown scheduler 'plms'"),
    (["--backend", "diffusion", "--scheduler", "euler", "--recurrence", "2"], "recurrence 2 needs a sampler"),
    (["--recurrence", "0"], "--recurrence"),
    (["--backend", "diffusion", "--polish", "-1"], "--polish"),
    (["--backend", "diffusion", "--candidates", "0"], "--candidates"),
    (["--backend", "diffusion", "--screen", "0"], "--screen"),
    (["--backend", "diffusion", "--finalists", "0"], "--finalists"),
    (["--backend", "diffusion", "--candidates", "2", "--finalists", "3"], "finalists 3 must be at most candidates 2"),
    (["--backend", "diffusion", "--candidates", "4", "--screen", "2"], "screen 2 must be at least candidates 4"),
    (["--backend", "diffusion", "--scheduler", "dpm", "--candidates", "2"], "candidates 2 need a sampler"),
    (["--polish", "4"], "backend 'pixels' has no option 'polish'"),
    (["--retries", "-1"], "--retries"),
    (["--accept-score", "101"], "expected a CLIP score in [0, 100], got 101"),
    (["--clip", "shapes-tiny", "--retries", "1"], "no calibrated match_score"),
    (["--palette", "pico"], "unknown palette 'pico'"),
    (["--palette", "#ff0000,#00ff0"], "'#00ff0' is not #rrggbb"),
    (["--colors", "1"], "--colors"),
    (["--backend", "fourier", "--palette", "shapes"], "backend 'fourier' has no option 'palette'"),
    (["--backend", "vqgan", "--start", "grey"], "vqgan start must be one of codes, flat, blob, got 'grey'"),
    (["--start", "flat"], "backend 'pixels' has no option 'start'"),
    (["--regulariser", "tv"], "expected NAME=WEIGHT, got 'tv'"),
    (["--regulariser", "tv=nan"], "expected a finite number"),
    (["--regulariser", "nope=1"], "unknown image loss 'nope'"),
    (["--accept-error", "0"], "--accept-error: expected a positive number, got 0"),
    (["--accept-error", "3", "--no-recipe"], "accept_error needs a denoise_judge"),
    (["--denoise-judge", "nope"], "diffusion model 'nope' is neither a shipped name"),
    (["--purify", "1"], "--purify: expected a number in (0, 1), got 1"),
    (["--purify", "0.2", "--no-recipe"], "purify needs a denoise_judge"),
])
def test_bad_arguments_exit_2_with_one_line(capsys, tmp_path, args, match):
    code, out, err = generate(capsys, "a red circle", "--steps", "1", "--out", str(tmp_path / "x.png"), *args)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and match in err
    assert not (tmp_path / "x.png").exists()
