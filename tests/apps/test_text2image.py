"""apps/text2image.py through its handler functions: validation and limits, backends offered, PNG metadata round
trip, streaming, the session gallery, cancellation, and the `clipguide app` wiring."""
import threading
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from apps import text2image as t2i
from apps.text2image import (Limits, Settings, Text2Image, find_backends, png_info, read_metadata,
                             settings_from_metadata)
from clipguide.cli import main
from tests.apps.conftest import SMALL, inputs, wait_until


def run(app, **overrides) -> list[tuple]:
    """Every output the Generate handler yields."""
    return list(app.generate(**inputs(**overrides)))


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(gr.Error) as info:
        fn(*args, **kwargs)
    return info.value.message


# ----------------------------------------------------------------------------------------------- validation

def test_validate_fills_backend_defaults(app):
    s = app.validate("a red circle", "", "diffusion", None, None, 5)
    assert (s.backend, s.steps, s.size, s.seed) == ("diffusion", 20, 16, 5)   # 50 default steps, capped at 20
    s = app.validate("a red circle", "", "pixels", None, None, 5)
    assert (s.steps, s.size) == (20, 64)


@pytest.mark.parametrize("overrides, message", [
    (dict(steps=0), "steps must be between 1 and 20, got 0"),
    (dict(steps=21), "steps must be between 1 and 20, got 21"),
    (dict(steps=10**9), "steps must be between 1 and 20"),
    (dict(steps=2.5), "steps must be a whole number"),
    (dict(steps="many"), "steps must be a whole number"),
    (dict(size=8), "size must be between 16 and 64, got 8"),
    (dict(size=4096), "size must be between 16 and 64, got 4096"),
    (dict(batch=0), "batch size must be between 1 and 2"),
    (dict(batch=3), "batch size must be between 1 and 2, got 3"),
    (dict(seed=-1), "seed must be between 0 and 2147483647"),
    (dict(seed=2**31), "seed must be between 0 and 2147483647"),
    (dict(prompt=""), "Enter a prompt"),
    (dict(prompt="   "), "Enter a prompt"),
    (dict(prompt="x" * 501), "prompts are limited to 500 characters"),
    (dict(negative="y" * 501), "prompts are limited to 500 characters"),
    (dict(prompt=" | ".join(["a circle"] * 9)), "at most 8 prompt items"),
    (dict(prompt="a red circle:-1"), "at least one item with a positive weight"),
    (dict(prompt="a red circle:1:nan"), "prompt: "),
    (dict(backend="nope"), "unknown backend 'nope'"),
    (dict(backend="vqgan"), "backend 'vqgan' is not available on this server: needs"),
    (dict(cutn=0), "cutn must be between 1 and 64"),
    (dict(cutouts="nope"), "unknown cutout scheme 'nope'"),
    (dict(lr=0), "learning rate must be a number in (0.0, 1.0]"),
    (dict(lr=5), "learning rate must be a number in (0.0, 1.0]"),
    (dict(lr="fast"), "learning rate must be a number"),
    (dict(backend="diffusion", scale=-1), "guidance scale must be a number in [0.0, 10000.0]"),
    (dict(backend="diffusion", scheduler="plms"), "unknown scheduler 'plms'"),
    (dict(clip=["ViT-B-32:openai"]), "CLIP model(s) 'ViT-B-32:openai' are not available offline here"),
    (dict(clip=["/etc/passwd"]), "are not available offline here"),
    (dict(retries=-1), "retries must be between 0 and 4, got -1"),
    (dict(retries=5), "retries must be between 0 and 4, got 5"),
    (dict(retries=1.5), "retries must be a whole number"),
])
def test_validate_rejects_with_a_message(app, overrides, message):
    values = inputs(**overrides)
    values.pop("history")
    assert message in error_of(app.validate, **values)


def test_limits_are_enforced_by_the_handler_itself(app):
    """The sliders cap steps / size / batch, but a request that bypasses the page gets gr.Error, before any work."""
    for overrides in (dict(steps=21), dict(size=65), dict(batch=3)):
        gen = app.generate(**inputs(**overrides))
        with pytest.raises(gr.Error):
            next(gen)
    assert app.active_runs() == []


def test_random_seed_draws_a_seed_and_reports_it(app):
    values = inputs(random_seed=True, seed=-5)   # the seed box is ignored when the seed is random
    values.pop("history")
    seeds = {app.validate(**values).seed for _ in range(4)}
    assert all(0 <= s < 2**31 for s in seeds) and len(seeds) > 1
    outputs = run(app, random_seed=True, steps=1)
    shown = outputs[-1][4]
    assert read_metadata(outputs[-1][3][0])["seed"] == shown and outputs[0][4] == shown


def test_options_of_other_backends_are_dropped(app):
    s = app.validate("a circle", "", "diffusion", 2, 16, 0, False, 1, 2, "classic", 0.5, 100, "ddim", ["shapes"])
    assert (s.lr, s.scale, s.scheduler) == (None, 100.0, "ddim")
    s = app.validate("a circle", "", "pixels", 2, 16, 0, False, 1, 2, "classic", 0.5, 100, "ddim", ["shapes"])
    assert (s.lr, s.scale, s.scheduler) == (0.5, None, None)
    assert s.backend_options() == {"lr": 0.5}


def test_limits_dataclass_checks_itself():
    with pytest.raises(ValueError, match="max_steps"):
        Limits(max_steps=0)
    with pytest.raises(ValueError, match="max_size"):
        Limits(max_size=8)


# ------------------------------------------------------------------------------------------------- backends

def test_backends_offered_are_those_that_run_offline(tmp_path, tiny_diffusion_folder):
    missing = find_backends(diffusion_model=tmp_path / "none", vqgan_model=tmp_path / "none.safetensors")
    assert missing["pixels"].available and missing["fourier"].available
    assert not missing["diffusion"].available and "python -m clipguide.train_diffusion" in missing["diffusion"].note
    assert not missing["vqgan"].available and "python -m clipguide.train_vqgan" in missing["vqgan"].note

    found = find_backends(diffusion_model=tiny_diffusion_folder)
    assert found["diffusion"].available and found["diffusion"].native_size == 16
    assert found["vqgan"].available and found["vqgan"].model == "shapes"   # the shipped VQGAN
    assert found["diffusion"].options == {"model": str(tiny_diffusion_folder)} and found["diffusion"].model == "tiny"


def dropdown_choices(demo, elem_id):
    block = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == elem_id)
    return [value for _, value in block.choices], block.value


def test_default_backend_is_diffusion_when_available(tmp_path, tiny_diffusion_folder):
    with_model = Text2Image(diffusion_model=tiny_diffusion_folder)
    assert with_model.default_backend == "diffusion"
    assert dropdown_choices(with_model.build(), "backend") == (["diffusion", "fourier", "pixels", "vqgan"], "diffusion")

    without = Text2Image(diffusion_model=tmp_path / "none", vqgan_model=tmp_path / "none.safetensors")
    assert without.default_backend == "pixels"
    choices, value = dropdown_choices(without.build(), "backend")
    assert choices == ["fourier", "pixels"] and value == "pixels"
    assert "**diffusion**: not available here" in without.backend_note()
    assert "**vqgan**: not available here" in without.backend_note()
    assert "diffusion" in error_of(without.validate, "a circle", "", "diffusion")


def test_queue_and_privacy_settings(app):
    demo = app.build()
    assert demo.analytics_enabled is False
    assert demo._queue.max_size == SMALL["queue_size"]
    generate = next(fn for fn in demo.fns.values() if fn.api_name == "generate")
    assert generate.concurrency_limit == SMALL["concurrency"] and generate.concurrency_id == "device"
    stop = next(fn for fn in demo.fns.values() if fn.api_name == "stop")
    cancels = [fn for fn in demo.fns.values() if fn.is_cancel_function and fn.targets == stop.targets]
    assert [fn.cancels for fn in cancels] == [[generate._id]]     # the Stop button also cancels the Generate event
    # nothing the user sends is a file: no upload components at all
    assert not [b for b in demo.blocks.values() if getattr(b, "interactive", None) and isinstance(
        b, (gr.File, gr.Image, gr.Gallery))]


def test_clip_is_loaded_once_per_process():
    assert t2i.perceptor(("shapes",), "cpu") is t2i.perceptor(["shapes"], "cpu")


# ------------------------------------------------------------------------------------------------- metadata

def test_metadata_round_trip(tmp_path):
    settings = Settings(prompt="ein roter Kreis ✓ | blurry:-0.5", negative="text", backend="diffusion", steps=7,
                        size=32, seed=123, batch=2, cutn=4, cutouts="disco", scale=250.0, scheduler="ddim",
                        clip=("shapes",))
    path = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=png_info(settings, index=1, clip_score=28.123456, model="shapes"))
    record = read_metadata(path)
    assert settings_from_metadata(record) == settings
    assert (record["index"], record["clip_score"], record["model"]) == (1, 28.1235, "shapes")
    with Image.open(path) as im:
        assert im.text["prompt"] == settings.prompt and im.text["seed"] == "123" and im.text["negative"] == "text"
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    with pytest.raises(ValueError, match="not an image saved by this app"):
        read_metadata(tmp_path / "plain.png")


# ------------------------------------------------------------------------------------------------ generation

def test_generate_streams_then_returns_images_gallery_and_pngs(app):
    history = []
    # retries 0: the shipped CLIP's pixels recipe would redraw some of these 4-step pictures
    outputs = run(app, steps=4, batch=2, seed=11, prompt="../../etc/passwd", history=history, retries=0)
    start, *previews, final = outputs
    assert start[2].startswith("Running (pixels, 4 steps, 16 px, seed 11)") and start[4] == 11
    assert previews and all(isinstance(p[0], Image.Image) for p in previews)
    shown = [int(p[2].split()[1].split("/")[0]) for p in previews]    # "Step k/4 (...)"; a late preview is skipped
    assert shown == sorted(set(shown)) and set(shown) <= {1, 2, 3, 4} and shown[-1] == 4
    assert previews[0][0].size == (16 * 2 + 2, 16)           # the batch side by side
    image, gallery, status, files, seed, history = final
    assert status.startswith("Done: 2 image(s)") and seed == 11
    assert len(files) == 2 and image == files[0]
    for i, path in enumerate(files):
        assert app.outdir in Path(path).parents       # written by the app, under its own name
        assert "passwd" not in path
        record = read_metadata(path)
        assert (record["seed"], record["index"], record["batch"], record["backend"]) == (11, i, 2, "pixels")
        assert Image.open(path).size == (16, 16)
    assert [caption for _, caption in gallery] == [e["caption"] for e in history] and len(history) == 2
    assert all(caption.startswith("CLIP ") and "seed 11" in caption for _, caption in gallery)
    scores = sorted(float(c.split()[1]) for _, c in gallery)
    assert np.allclose(scores, sorted(read_metadata(p)["clip_score"] for p in files), atol=0.051)

    again = run(app, steps=1, seed=12, history=history, retries=0)[-1]
    assert len(again[5]) == 3 and again[1][0][1].endswith("seed 12 · a red circle on a blue background")
    assert again[1][1:] == gallery                            # newest first; this visit's earlier results kept


def test_metadata_reproduces_the_image(app):
    first = run(app, backend="diffusion", steps=3, size=16, seed=5, scheduler="ddim")[-1][3][0]
    settings = settings_from_metadata(read_metadata(first))
    values = inputs(**{k: getattr(settings, k) for k in ("prompt", "negative", "backend", "steps", "size", "seed",
                                                         "batch", "cutn", "cutouts", "lr", "scale", "scheduler")},
                    clip=list(settings.clip))
    second = list(app.generate(**values))[-1][3][0]
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))
    other = run(app, backend="diffusion", steps=3, size=16, seed=6, scheduler="ddim")[-1][3][0]
    assert not np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(other)))


def test_backend_errors_become_gr_errors(app):
    gen = app.generate(**inputs(backend="diffusion", size=17, steps=1))
    next(gen)                                                  # validation passes; guide() refuses the size
    assert "multiple of 2" in error_of(list, gen)
    assert wait_until(lambda: app.active_runs() == [])


def test_backend_change_sets_defaults_and_options(app):
    steps, size, lr, scale, scheduler = app.backend_defaults("diffusion")
    assert (steps["value"], size["value"], lr["visible"], scale["visible"], scheduler["visible"]) == (
        20, 16, False, True, True)
    steps, size, lr, scale, scheduler = app.backend_defaults("pixels")
    assert (size["value"], lr["visible"], scale["visible"]) == (64, True, False)


# -------------------------------------------------------------------------------------------------- cancelling

def test_closing_the_handler_stops_the_guide_loop(app):
    """Gradio cancels a generator event by closing it at a yield: the worker must stop at its next step."""
    gen = app.generate(**inputs(steps=20, size=32, cutn=4))
    next(gen)                                   # "Running ..."
    next(gen)                                   # first preview
    (run_,) = app.active_runs()
    gen.close()
    run_.thread.join(timeout=10)
    assert not run_.thread.is_alive() and run_.stopped and run_.result is None
    assert 1 <= run_.steps_done < 20
    assert app.active_runs() == []
    assert run(app, steps=1)[-1][2].startswith("Done")       # the device slot was released


def test_stop_button_ends_the_run_promptly(app):
    outputs, seen = [], threading.Event()

    def consume():
        for out in app.generate(**inputs(steps=20, size=32, cutn=4)):
            outputs.append(out)
            if len(outputs) == 2:
                seen.set()

    thread = threading.Thread(target=consume)
    thread.start()
    assert seen.wait(60)
    assert app.stop() == "Stopping..."
    thread.join(timeout=10)
    assert not thread.is_alive()
    status = outputs[-1][2]
    assert status.startswith("Stopped at step ") and int(status.split()[3].split("/")[0]) < 20
    assert not any(isinstance(o[3], list) for o in outputs)           # no files for a stopped run
    assert app.stop() == "Nothing to stop." and app.active_runs() == []


# -------------------------------------------------------------------------------------------------------- CLI

def test_cli_app_launches_with_host_and_port(monkeypatch):
    calls = []
    monkeypatch.setattr(t2i, "launch", lambda host, port: calls.append((host, port)))
    assert main(["app"]) == 0 and main(["app", "--host", "0.0.0.0", "--port", "8080"]) == 0
    assert calls == [("127.0.0.1", 7860), ("0.0.0.0", 8080)]


@pytest.mark.parametrize("args", [["--port", "0"], ["--port", "70000"], ["--port", "web"], ["--nope"]])
def test_cli_app_bad_arguments_exit_2_with_one_line(capsys, args):
    with pytest.raises(SystemExit) as info:
        main(["app", *args])
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1


def test_retries_show_in_the_progress_and_the_status(app):
    # the tiny random diffusion model draws noise, which the shipped CLIP scores far below its match score
    outputs = run(app, backend="diffusion", steps=3, size=16, seed=5)
    previews, final = outputs[1:-1], outputs[-1]
    assert previews[-1][2].startswith("Step 9/9 (retrying: a picture failed its checks)")
    assert all("retrying" not in p[2] for p in previews if int(p[2].split()[1].split("/")[0]) <= 3)
    assert "after 2 retries." in final[2]
    assert read_metadata(final[3][0])["retries"] is None          # the backend's default, recorded as such


def test_retries_chosen_by_the_user_are_used_and_recorded(app):
    once = run(app, backend="diffusion", steps=3, size=16, seed=5, retries=0)[-1]
    assert "retr" not in once[2] and read_metadata(once[3][0])["retries"] == 0
    one = run(app, backend="diffusion", steps=3, size=16, seed=5, retries=1)[-1]
    assert "after 1 retry." in one[2]
    settings = settings_from_metadata(read_metadata(one[3][0]))
    assert settings.retries == 1
    assert settings_from_metadata({"prompt": "a red circle"}).retries is None   # PNGs from before retries
