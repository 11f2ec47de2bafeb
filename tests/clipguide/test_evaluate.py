"""The ShapesWorld guidance evaluation: its cases, and that the oracle (never CLIP) judges the pictures."""
import json

import torch

from clipguide import evaluate as ev
from clipguide.guide import GuideResult, to_pil
from core_clip import shapes


def test_seen_cases_cover_every_seen_pair_twice_on_other_backgrounds():
    # 8 colours x 3 shapes = 24 pairs, 3 of them held out: 21 seen pairs x 2 backgrounds
    cases = ev.cases()
    assert len(cases) == 42
    pairs = [(c.color, c.shape) for c in cases]
    assert {p: pairs.count(p) for p in pairs} == {p: 2 for p in pairs}
    assert not set(pairs) & shapes.HELD_OUT
    assert all(c.background != c.color for c in cases)
    assert len({(c.color, c.shape, c.background) for c in cases}) == 42
    assert ev.cases() == cases


def test_held_out_cases():
    cases = ev.cases(held_out=True)
    assert {(c.color, c.shape) for c in cases} == set(shapes.HELD_OUT) and len(cases) == 6


def test_prompt_wording():
    assert ev.Case("orange", "circle", "white").prompt == "an orange circle on a white background"


def _fake_guide(draw_right):
    def guide(prompt, seed, **kw):
        case = next(c for c in ev.cases() if c.prompt == prompt)
        if draw_right:
            image = ev.true_picture(case)
        else:  # the right colours as a half-and-half split: no shape at all
            image = torch.zeros(1, 3, 64, 64)
            image[..., :32] = torch.tensor(shapes.COLORS[case.color]).view(3, 1, 1) / 255
            image[..., 32:] = torch.tensor(shapes.COLORS[case.background]).view(3, 1, 1) / 255
        return GuideResult(to_pil(image)[0], to_pil(image), image, [], [50.0], 1, 0.1, [1])
    return guide


def test_evaluate_judges_with_the_oracle(monkeypatch):
    cases = ev.cases()[:4]
    monkeypatch.setattr(ev, "guide", _fake_guide(draw_right=True))
    report = ev.evaluate(cases, progress=False)
    assert report["n"] == 4 and report["all"] == 1.0 and report["shape"] == 1.0
    monkeypatch.setattr(ev, "guide", _fake_guide(draw_right=False))
    report = ev.evaluate(cases, progress=False)
    assert report["all"] == 0.0 and report["shape"] == 0.0
    assert report["rows"][0]["reading"]["shape"] is None


def test_main_forwards_backend_and_guidance_options(monkeypatch, capsys):
    seen, seeds = [], []

    def guide(prompt, seed, **kw):
        seen.append(kw)
        seeds.append(seed)
        return _fake_guide(draw_right=True)(prompt, seed)

    monkeypatch.setattr(ev, "guide", guide)
    monkeypatch.setattr(ev, "cases", lambda held_out=False, backgrounds=2: [ev.Case("red", "circle", "blue")] * 2)
    assert ev.main(["--backend-options", '{"colors": 2}', "--guidance-options", '{"regularisers": {"border": 5}}',
                    "--steps", "7", "--json"]) == 0
    assert seen == [{"backend": "pixels", "clip": "shapes", "steps": 7, "backend_options": {"colors": 2},
                     "regularisers": {"border": 5}}] * 2
    assert seeds == [0, 1]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["all"] == 1.0
    assert ev.main(["--seed", "100", "--json"]) == 0                      # other draws: prompt i gets seed 100 + i
    assert seeds[2:] == [100, 101]


def test_from_truth_starts_each_run_on_the_true_picture(monkeypatch):
    starts = []

    def guide(prompt, seed, init_image, **kw):   # keeps its start: a CLIP whose minimum is at real pictures
        starts.append(init_image)
        return GuideResult(to_pil(init_image)[0], to_pil(init_image), init_image, [], [50.0], 1, 0.1, [1])

    monkeypatch.setattr(ev, "guide", guide)
    cases = ev.cases()[:3] + ev.cases(held_out=True)[:1]
    report = ev.evaluate(cases, progress=False, from_truth=True)
    assert report["all"] == 1.0 and len(starts) == 4
    for case, start in zip(cases, starts):
        assert start.shape == (1, 3, 64, 64) and 0 <= start.min() and start.max() <= 1
        assert shapes.read(start[0]) == {"shape": case.shape, "color": case.color, "background": case.background,
                                         "position": "center", "size": "large"}


def test_up_to_seven_backgrounds_each_distinct():
    cases = ev.cases(held_out=True, backgrounds=7)
    for color, shape in shapes.HELD_OUT:
        backgrounds = [c.background for c in cases if (c.color, c.shape) == (color, shape)]
        assert sorted(backgrounds) == sorted(set(shapes.COLORS) - {color})


def test_main_bad_input_exits_2_with_one_line(capsys):
    for argv, needle in ((["--clip", "/nonexistent/model.safetensors"], "/nonexistent/model.safetensors"),
                         (["--backend", "nope"], "nope"),
                         (["--backend-options", "{colors: 2}"], "not JSON"),
                         (["--guidance-options", "[1]"], "expected a JSON object"),
                         (["--backgrounds", "8"], "backgrounds must be 1-7"),
                         (["--steps", "0"], "expected a positive integer"),
                         (["--seed", "-1"], "expected a non-negative integer")):
        try:
            code = ev.main([*argv, "--steps", "1"] if "--steps" not in argv else argv)
        except SystemExit as e:   # argparse's own errors
            code = e.code
        assert code == 2, argv
        err = capsys.readouterr().err.strip()   # after the progress bar, if the error came in the first run
        assert "Traceback" not in err and err.splitlines()[-1].startswith("python -m clipguide.evaluate: error:")
        assert needle in err.splitlines()[-1], (argv, err)
