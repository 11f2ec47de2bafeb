"""Gradient alignment: one-attribute edits, the cosine and progress of normalised descent, and the shipped CLIP."""
import json

import pytest
import torch

from clipguide import alignment as al
from clipguide.evaluate import Case, cases, true_picture
from clipguide.guidance import CLIPGuidance
from clipguide.perceptor import Perceptor
from core_clip import shapes


@pytest.mark.parametrize("held_out", [False, True])
def test_each_edit_changes_exactly_its_attribute(held_out):
    source_cases = cases(held_out)
    todo = al.edits(source_cases)
    assert len(todo) == 3 * len(source_cases)
    assert [e.kind for e in todo[:3]] == ["color", "background", "shape"]
    for edit in todo:
        s, t = edit.source, edit.target
        differs = {k for k in al.KINDS if getattr(s, k) != getattr(t, k)}
        assert differs == {edit.kind}
        assert t.color != t.background
        if not held_out:  # a seen picture is never edited into a pair the CLIP was not trained on
            assert (t.color, t.shape) not in shapes.HELD_OUT
    assert al.edits(source_cases) == todo
    # the rotation reaches several target values, not one
    assert len({e.target.color for e in todo if e.kind == "color"}) > 3


def _towards(picture: torch.Tensor, sign: float = 1.0):
    """The gradient of sign * |x - picture|^2."""
    def gradient(x):
        return sign * ((x - picture) ** 2).sum(), sign * 2 * (x - picture)
    return gradient


def test_check_edit_against_a_quadratic_loss_by_hand():
    edit = al.Edit("color", Case("red", "circle", "blue"), Case("green", "circle", "blue"))
    x0, x1 = true_picture(edit.source), true_picture(edit.target)
    distance = (x1 - x0).norm().item()
    steps, step_size = 5, distance / 10
    # descent on |x - x1|^2 walks straight along the segment to x1: each step closes exactly step_size
    result = al.check_edit(edit, _towards(x1), steps, step_size)
    assert result.cosine == pytest.approx(1.0, abs=1e-5)
    assert result.progress == pytest.approx(steps * step_size / distance, abs=1e-5)
    assert torch.allclose(result.image, x0 + (x1 - x0) * steps * step_size / distance, atol=1e-5)
    assert not result.read
    # a loss that pushes away from the target
    away = al.check_edit(edit, _towards(x1, -1.0), steps, step_size)
    assert away.cosine == pytest.approx(-1.0, abs=1e-5) and away.progress < 0
    # walking the whole way: the oracle reads the target
    there = al.check_edit(edit, _towards(x1), 1, distance)
    assert there.progress == pytest.approx(1.0, abs=1e-5) and there.read
    # no steps: the cosine only, the picture is the source
    still = al.check_edit(edit, _towards(x1), 0)
    assert still.progress == 0 and torch.equal(still.image, x0)


def test_shipped_clip_gradients_move_pictures_towards_colour_edits():
    """Plain descent on the shipped CLIP's guidance loss recolours a shape part of the way (about 10% of the distance
    in 10 steps); on the same architecture with random weights it moves the picture away."""
    todo = [e for e in al.edits(cases(backgrounds=1)) if e.kind == "color"]

    def progress(clip: str) -> list[float]:
        perceptor = Perceptor(clip)
        return [al.check_edit(e, CLIPGuidance(e.target.prompt, perceptor, seed=i).gradient, 10, 4.0).progress
                for i, e in enumerate(todo)]

    shipped, untrained = progress("shapes"), progress("shapes-rn")
    mean = sum(shipped) / len(shipped)
    assert mean > 0.05 and sum(p > 0 for p in shipped) >= 0.6 * len(shipped), shipped
    assert sum(untrained) / len(untrained) < mean - 0.15, untrained


def test_main_prints_one_summary_per_kind_and_json(capsys):
    assert al.main(["--backgrounds", "1", "--held-out", "--steps", "1", "--cutn", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [report[k]["n"] for k in al.KINDS] == [3, 3, 3]
    assert len(report["edits"]) == 9 and {e["kind"] for e in report["edits"]} == set(al.KINDS)


@pytest.mark.parametrize("argv, message", [
    (["--step-size", "0"], "--step-size: expected a positive number"),
    (["--clip", "no-such-clip"], "no-such-clip"),
])
def test_main_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    try:
        code = al.main(argv + ["--steps", "0"])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines()[-1].startswith("python -m clipguide.alignment: error:")
    assert message in err.splitlines()[-1]
