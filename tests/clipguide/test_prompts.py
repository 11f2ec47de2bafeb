"""Prompt grammar: split_item / parse_prompts tables, error messages, fuzzing, image and noise prompts."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from clipguide.errors import PromptError
from clipguide.prompts import Prompt, negative_prompts, noise_target, parse_prompts, split_item

INF = math.inf


@pytest.mark.parametrize("item, expected", [
    ("a cat", ("a cat", 1.0, -INF)),
    ("a cat:2", ("a cat", 2.0, -INF)),
    ("a cat:2:0.5", ("a cat", 2.0, 0.5)),
    ("  a cat  :  2  :  0.5  ", ("a cat", 2.0, 0.5)),
    ("a cat:-1.5", ("a cat", -1.5, -INF)),
    ("x:1e-1", ("x", 0.1, -INF)),
    ("x:+2E+1:-.5", ("x", 20.0, -0.5)),
    ("x:.5", ("x", 0.5, -INF)),
    ("x:2:-inf", ("x", 2.0, -INF)),
    ("x:0:-Infinity", ("x", 0.0, -INF)),
    ("note: 2 cats:3", ("note: 2 cats", 3.0, -INF)),
    ("a:b:c", ("a:b:c", 1.0, -INF)),
    ("http://example.com:8080/cat", ("http://example.com:8080/cat", 1.0, -INF)),
    ("a:1:2:3", ("a:1", 2.0, 3.0)),  # at most two suffixes
    ("a cat:", ("a cat:", 1.0, -INF)),  # an empty suffix is not numeric, so it stays text
    ("ratio 16:9 poster", ("ratio 16:9 poster", 1.0, -INF)),
    ("ratio 16:9", ("ratio 16", 9.0, -INF)),  # the documented ambiguity ...
    ("ratio 16:9:1:-inf", ("ratio 16:9", 1.0, -INF)),  # ... and its escape
    ("Toy Story: Infinity:1:-inf", ("Toy Story: Infinity", 1.0, -INF)),
])
def test_split_item(item, expected):
    assert split_item(item) == expected


@pytest.mark.parametrize("item", [
    "x:1.2.3", "x:1e", "x:--2", "x:e4", "x:2:1.2.3", "x:1..0:2",  # look numeric, are not numbers
    "x:nan", "x:NaN:0", "x:inf", "x:-inf", "x:+INF", "x:Infinity", "x:1e400",  # non-finite weights
    "x:1:nan", "x:1:inf", "x:1:+Infinity", "x:1:1e400",  # NaN or +inf stops
    "", "  ", ":2", " :1:0", "  :  3",  # no text
])
def test_split_item_errors_name_the_item(item):
    with pytest.raises(PromptError) as excinfo:
        split_item(item)
    assert repr(item) in str(excinfo.value)


def test_split_item_error_says_what_is_wrong():
    with pytest.raises(PromptError, match="weight must be finite"):
        split_item("x:inf")
    with pytest.raises(PromptError, match="stop must be finite or -inf"):
        split_item("x:1:nan")
    with pytest.raises(PromptError, match="'1.2.3' is not a valid number"):
        split_item("x:1.2.3")


@pytest.mark.parametrize("spec, expected", [
    ("a cat:2|a dog:-1", [("a cat", 2.0, -INF), ("a dog", -1.0, -INF)]),
    (" a | b:2:0 ", [("a", 1.0, -INF), ("b", 2.0, 0.0)]),
    ("ratio 16:9:1:-inf|x:1e-1", [("ratio 16:9", 1.0, -INF), ("x", 0.1, -INF)]),
    (["a|b", "c:3"], [("a", 1.0, -INF), ("b", 1.0, -INF), ("c", 3.0, -INF)]),
    (("only: one",), [("only: one", 1.0, -INF)]),
])
def test_parse_prompts(spec, expected):
    assert parse_prompts(spec) == [Prompt("text", *fields) for fields in expected]


@pytest.mark.parametrize("spec, position, raw", [
    ("a||b", 2, ""), ("a| ", 2, " "), ("|a", 1, ""), (["a", ""], 2, ""), (["a|b", " |c"], 3, " "),
])
def test_empty_item_names_position_and_text(spec, position, raw):
    with pytest.raises(PromptError) as excinfo:
        parse_prompts(spec)
    assert f"item {position} " in str(excinfo.value)
    assert f"empty: {raw!r}" in str(excinfo.value)


@pytest.mark.parametrize("spec", ["", "   ", "|", " | ", [], ["", " "]])
def test_empty_spec(spec):
    with pytest.raises(PromptError, match="prompt spec is empty"):
        parse_prompts(spec)


def test_parse_prompts_reports_the_bad_item():
    with pytest.raises(PromptError) as excinfo:
        parse_prompts("a cat|x:1:nan|b")
    assert "'x:1:nan'" in str(excinfo.value)


@pytest.mark.parametrize("spec, kind", [(3, "text"), (["a", 3], "text"), ("a", "video")])
def test_parse_prompts_rejects_bad_arguments(spec, kind):
    with pytest.raises(PromptError):
        parse_prompts(spec, kind)


@pytest.mark.parametrize("fields", [
    ("video", "x"), ("text", " "), ("text", 3), ("text", "x", math.nan), ("text", "x", INF), ("text", "x", "2"),
    ("text", "x", 1.0, INF), ("text", "x", 1.0, math.nan), ("noise", "abc"), ("noise", "-1"),
])
def test_prompt_validates_fields(fields):
    with pytest.raises(PromptError):
        Prompt(*fields)


def test_negative_prompts():
    prompts = negative_prompts("blurry:0.5|text:-2|watermark:1:0.3")
    assert [(p.value, p.weight, p.stop) for p in prompts] == [
        ("blurry", -0.5, -INF), ("text", -2.0, -INF), ("watermark", -1.0, 0.3)]
    assert all(p.kind == "text" for p in prompts)
    with pytest.raises(PromptError):
        negative_prompts("")


def test_image_prompts(tmp_path):
    image = tmp_path / "cat.png"
    image.write_bytes(b"\x89PNG")
    assert parse_prompts(f"{image}:2") == [Prompt("text", str(image), 2.0)]  # text kind: no file check
    assert parse_prompts(f"{image}:2", "image") == [Prompt("image", str(image), 2.0)]
    missing = tmp_path / "missing.png"
    with pytest.raises(PromptError, match=f"image prompt not found: {missing}"):
        parse_prompts(f"{image}|{missing}", "image")
    with pytest.raises(PromptError, match="image prompt not found"):
        parse_prompts(str(tmp_path), "image")  # a folder is not an image file


def test_noise_prompts():
    prompts = parse_prompts(" 0 |42:0.5|18446744073709551615", "noise")
    assert [(p.kind, p.value, p.weight) for p in prompts] == [
        ("noise", "0", 1.0), ("noise", "42", 0.5), ("noise", "18446744073709551615", 1.0)]


@pytest.mark.parametrize("seed", ["-1", "1.5", "abc", "18446744073709551616", "\u0663"])
def test_noise_prompt_bad_seed(seed):
    with pytest.raises(PromptError) as excinfo:
        parse_prompts(f"{seed}:2", "noise")
    assert repr(seed) in str(excinfo.value)


def test_noise_target():
    target = noise_target(7, 64)
    assert target.dtype == torch.float32 and target.shape == (64,)
    assert torch.linalg.vector_norm(target.double()).item() == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(target, noise_target(7, 64))
    assert not torch.allclose(target, noise_target(8, 64))
    # The documented stream: float32 standard normal from a generator seeded with the prompt's seed.
    draw = torch.randn(64, generator=torch.Generator().manual_seed(7)).double()
    torch.testing.assert_close(target.double(), draw / draw.norm(), rtol=1e-6, atol=1e-7)
    assert noise_target(3, 1).abs().item() == 1.0


def test_noise_target_leaves_global_rng_alone():
    state = torch.get_rng_state()
    noise_target(1, 16)
    assert torch.equal(state, torch.get_rng_state())


def test_noise_targets_are_isotropic():
    targets = torch.stack([noise_target(seed, 16) for seed in range(1000)]).double()
    # Uniform on the sphere: mean 0 (per-coordinate std 1/sqrt(16 * 1000) = 0.008) and E[x_i^2] = 1/16.
    assert targets.mean(0).abs().max().item() < 0.04
    torch.testing.assert_close(targets.pow(2).mean(0), torch.full((16,), 1 / 16, dtype=torch.float64), atol=0.01,
                               rtol=0)


@pytest.mark.parametrize("seed, dim", [(-1, 8), (2**64, 8), ("3", 8), (1, 0), (1, 2.5)])
def test_noise_target_bad_arguments(seed, dim):
    with pytest.raises(PromptError):
        noise_target(seed, dim)


_TRICKY = st.text(alphabet=":| +-.0123456789eEinfatyx")
_SPECS = st.one_of(st.text(), _TRICKY, st.lists(st.one_of(st.text(), _TRICKY), max_size=4))


@settings(max_examples=300, deadline=None)
@given(_SPECS)
def test_fuzz_parse_returns_valid_prompts_or_prompt_error(spec):
    try:
        prompts = parse_prompts(spec)
    except PromptError:
        return
    items = spec.split("|") if isinstance(spec, str) else [i for element in spec for i in element.split("|")]
    assert len(prompts) == len(items)
    for prompt in prompts:
        assert prompt.kind == "text"
        assert prompt.value and prompt.value == prompt.value.strip()
        assert math.isfinite(prompt.weight)
        assert math.isfinite(prompt.stop) or prompt.stop == -INF


_FINITE = st.floats(allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters=":|")).filter(str.strip), _FINITE, _FINITE)
def test_round_trip(text, weight, stop):
    (prompt,) = parse_prompts(f"{text}:{weight!r}:{stop!r}")
    assert (prompt.value, repr(prompt.weight), repr(prompt.stop)) == (text.strip(), repr(weight), repr(stop))
    (prompt,) = parse_prompts(f"{text}:{weight!r}")
    assert (prompt.value, repr(prompt.weight), prompt.stop) == (text.strip(), repr(weight), -INF)
