"""clipguide.losses: hand-computed values, reference formulas, float64 gradchecks and the stop switch."""
import math
import threading

import pytest
import torch

from clipguide.errors import ClipguideError, UnknownNameError
from clipguide.losses import EMBEDDING_LOSSES, IMAGE_LOSSES, frame_width, stop_below, without_value_checks

from tests.helpers import HostSyncs

spherical = EMBEDDING_LOSSES.get("spherical")
cosine = EMBEDDING_LOSSES.get("cosine")
tv = IMAGE_LOSSES.get("tv")
range_loss = IMAGE_LOSSES.get("range")
saturation = IMAGE_LOSSES.get("saturation")
border = IMAGE_LOSSES.get("border")
two_colour = IMAGE_LOSSES.get("two_colour")

PI = math.pi


def _randn(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _pairs(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows: identical, orthogonal, opposite, 60 degrees apart; deliberately not unit length."""
    s3 = math.sqrt(3)
    a = torch.tensor([[3.0, 0, 0], [0.5, 0, 0], [0, 2.0, 0], [4.0, 0, 0]], dtype=dtype)
    b = torch.tensor([[0.1, 0, 0], [0, 0, 7.0], [0, -0.3, 0], [1.0, s3, 0]], dtype=dtype)
    return a, b


# ---- spherical ---------------------------------------------------------------------------------------------------


def test_spherical_hand_values() -> None:
    a, b = _pairs()
    # unit chords |a - b|: 0, sqrt(2), 2, 1 -> 2 * arcsin(chord / 2)^2 = 0, 2 (pi/4)^2, 2 (pi/2)^2, 2 (pi/6)^2
    expected = torch.tensor([0.0, PI**2 / 8, PI**2 / 2, 2 * (PI / 6) ** 2], dtype=torch.float64)
    torch.testing.assert_close(spherical(a, b), expected, rtol=0, atol=1e-12)


def test_spherical_matches_notebook_formula_and_half_angle_squared() -> None:
    a, b = _randn(64, 16, seed=0), _randn(64, 16, seed=1) * 5
    ua, ub = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    notebook = (ua - ub).norm(dim=-1).div(2).arcsin().pow(2).mul(2)
    theta = (ua * ub).sum(dim=-1).clamp(-1, 1).arccos()
    torch.testing.assert_close(notebook, theta.pow(2) / 2, rtol=0, atol=1e-10)
    torch.testing.assert_close(spherical(a, b), notebook, rtol=0, atol=1e-10)


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_spherical_near_the_poles_matches_reference(dtype: torch.dtype, atol: float) -> None:
    # A hair away from identical and from opposite, against the notebook formula in float64: the safe norms change
    # nothing measurable, and float32 rounding cannot push arcsin's argument past 1 (NaN).
    a = _randn(32, 64, seed=2, dtype=dtype)
    for b in (a + 1e-5 * _randn(32, 64, seed=3, dtype=dtype), -a + 1e-5 * _randn(32, 64, seed=3, dtype=dtype), -a):
        ua, ub = (v.double() / v.double().norm(dim=-1, keepdim=True) for v in (a, b))
        # arcsin is ill-conditioned near 1, so near-opposite angles come from the small angle between a and -b
        half_angle = (ua - ub).norm(dim=-1).div(2).arcsin()
        half_angle = torch.where(half_angle < PI / 4, half_angle, PI / 2 - (ua + ub).norm(dim=-1).div(2).arcsin())
        reference = 2 * half_angle.pow(2)
        value = spherical(a, b)
        assert value.dtype == dtype
        torch.testing.assert_close(value.double(), reference, rtol=0, atol=atol)


def test_spherical_gradcheck() -> None:
    a = _randn(5, 8, seed=4).requires_grad_()
    b = (_randn(5, 8, seed=5) * 3).requires_grad_()
    assert torch.autograd.gradcheck(spherical, (a, b))
    b_one = _randn(8, seed=6).requires_grad_()
    assert torch.autograd.gradcheck(spherical, (a, b_one))


def test_spherical_gradcheck_close_to_identical_and_opposite() -> None:
    # The safe norms must not bend the gradient where the function is smooth, even 1e-3 from the poles.
    a = _randn(4, 8, seed=7)
    near = 1e-3 * _randn(4, 8, seed=8)
    for b in (a + near, -a + near):
        assert torch.autograd.gradcheck(spherical, (a.clone().requires_grad_(), b.requires_grad_()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spherical_gradient_finite_at_identical_and_opposite(dtype: torch.dtype) -> None:
    a = _randn(3, 16, seed=9, dtype=dtype)
    for b, value in ((a * 2.5, 0.0), (-a, PI**2 / 2)):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        loss = spherical(x, y)
        torch.testing.assert_close(loss, torch.full((3,), value, dtype=dtype), rtol=0, atol=1e-6)
        loss.sum().backward()
        assert bool(x.grad.isfinite().all()) and bool(y.grad.isfinite().all())
        if value == 0.0:  # identical directions are the minimum: the gradient vanishes
            assert bool((x.grad.abs() < 1e-6).all()) and bool((y.grad.abs() < 1e-6).all())


# ---- cosine -------------------------------------------------------------------------------------------------------


def test_cosine_hand_values_and_gradcheck() -> None:
    a, b = _pairs()
    torch.testing.assert_close(cosine(a, b), torch.tensor([0.0, 1.0, 2.0, 0.5], dtype=torch.float64))
    x = _randn(5, 8, seed=10).requires_grad_()
    y = (_randn(5, 8, seed=11) * 0.2).requires_grad_()
    assert torch.autograd.gradcheck(cosine, (x, y))


@pytest.mark.parametrize("name", ["spherical", "cosine"])
def test_embedding_loss_broadcasts_target(name: str) -> None:
    loss = EMBEDDING_LOSSES.get(name)
    a, t = _randn(6, 10, seed=12), _randn(10, seed=13)
    full = loss(a, t.expand(6, 10))
    assert full.shape == (6,)
    torch.testing.assert_close(loss(a, t), full, rtol=0, atol=0)
    torch.testing.assert_close(loss(a, t[None]), full, rtol=0, atol=0)
    # negative control: each row is scored against the target, so distinct rows give distinct losses
    assert len(set(full.tolist())) == 6


@pytest.mark.parametrize("name", ["spherical", "cosine"])
@pytest.mark.parametrize(
    ("image_emb", "target_emb", "match"),
    [
        (torch.ones(4), torch.ones(4), r"image_emb must be \[N, D\]"),
        (torch.ones(2, 4), torch.ones(2, 5), r"target_emb must be \[2, 4\], \[1, 4\] or \[4\]"),
        (torch.ones(2, 4), torch.ones(3, 4), r"got \[3, 4\]"),
        (torch.ones(2, 4, dtype=torch.long), torch.ones(4), "floating point"),
        (torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.ones(2), "image_emb holds an all-zero vector"),
        (torch.ones(2, 2), torch.zeros(1, 2), "target_emb holds an all-zero vector"),
    ],
)
def test_embedding_loss_bad_input(name: str, image_emb, target_emb, match: str) -> None:
    with pytest.raises(ClipguideError, match=match):
        EMBEDDING_LOSSES.get(name)(image_emb, target_emb)


# ---- image losses -------------------------------------------------------------------------------------------------

# One 2x2 image, written out per channel.
_IMAGE = torch.tensor(
    [[[[0.0, 1.0], [2.0, 3.0]], [[0.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [0.0, 0.0]]]], dtype=torch.float64
)


def test_tv_hand_values() -> None:
    # dx: channel 0 has (1-0)^2 + (3-2)^2 = 2, the others 0 -> 2 / (3*2*1) = 1/3
    # dy: channel 0 has (2-0)^2 + (3-1)^2 = 8, channel 2 has (0-1)^2 * 2 = 2 -> 10 / (3*1*2) = 5/3
    torch.testing.assert_close(tv(_IMAGE), torch.tensor([2.0], dtype=torch.float64))
    # 2x3 image with one lit pixel: 1 horizontal pair of 3*2*2 = 12, 1 vertical pair of 3*1*3 = 9
    spot = torch.zeros(1, 3, 2, 3, dtype=torch.float64)
    spot[0, 0, 0, 0] = 1.0
    torch.testing.assert_close(tv(spot), torch.tensor([1 / 12 + 1 / 9], dtype=torch.float64))
    batch = torch.cat([spot, _IMAGE.new_full((1, 3, 2, 3), 0.7), spot * 2])
    torch.testing.assert_close(tv(batch), torch.tensor([7 / 36, 0.0, 4 * 7 / 36], dtype=torch.float64))


def test_range_hand_values() -> None:
    image = torch.tensor(
        [[[[-0.5, 0.2], [1.5, 1.0]], [[0.0, 0.3], [0.9, 2.0]], [[-1.0, 0.5], [0.5, 0.5]]]], dtype=torch.float64
    )
    # out of range: -0.5 -> 0.25, 1.5 -> 0.25, 2.0 -> 1.0, -1.0 -> 1.0; 12 elements
    torch.testing.assert_close(range_loss(image), torch.tensor([2.5 / 12], dtype=torch.float64))
    inside = _randn(2, 3, 4, 4, seed=14).sigmoid()
    inside[0, 0, 0, :2] = torch.tensor([0.0, 1.0], dtype=torch.float64)  # the bounds themselves are in range
    assert torch.equal(range_loss(inside), torch.zeros(2, dtype=torch.float64))


def test_saturation_hand_values() -> None:
    # pixels: (1, 0, 0) -> variance 2/9; grey (0.5, 0.5, 0.5) -> 0; (0, 0.5, 1) -> (0.25 + 0 + 0.25)/3 = 1/6
    image = torch.tensor([[[[1.0, 0.5, 0.0]], [[0.0, 0.5, 0.5]], [[0.0, 0.5, 1.0]]]], dtype=torch.float64)
    torch.testing.assert_close(saturation(image), torch.tensor([(2 / 9 + 1 / 6) / 3], dtype=torch.float64))
    images = _randn(3, 3, 5, 4, seed=15)
    reference = images.std(dim=1, unbiased=False).pow(2).mean(dim=(1, 2))
    torch.testing.assert_close(saturation(images), reference, rtol=1e-12, atol=0)


def test_border_hand_values() -> None:
    # 4x4 image: the frame is the 12 outer pixels (width 1); channel 0 has one lit frame pixel -> variance
    # 1/12 - (1/12)^2 = 11/144; channel 1 is lit only inside (not seen); channel 2 is 0.5 on the frame -> 0
    image = torch.zeros(1, 3, 4, 4, dtype=torch.float64)
    image[0, 0, 0, 3] = 1.0
    image[0, 1, 1:3, 1:3] = 1.0
    image[0, 2] = 0.5
    torch.testing.assert_close(border(image), torch.tensor([11 / 144 / 3], dtype=torch.float64))
    # 64 px: a 4 px frame; a centred square leaves it uniform, the same square touching the edge does not
    picture = torch.zeros(2, 3, 64, 64, dtype=torch.float64)
    picture[0, :, 16:48, 16:48] = 1.0
    picture[1, :, 0:32, 16:48] = 1.0
    assert frame_width(64, 64) == 4 and frame_width(20, 3) == 1
    assert border(picture)[0] == 0
    frame = torch.ones(64, 64, dtype=torch.bool)
    frame[4:60, 4:60] = False
    p = picture[1, 0][frame].mean()                                   # lit frame pixels: 4 rows x 32 of 64^2 - 56^2
    torch.testing.assert_close(border(picture)[1], p * (1 - p))
    assert p == 128 / 960


def test_image_losses_zero_cases_have_finite_zero_gradients() -> None:
    constant = torch.full((2, 3, 4, 5), 0.3, dtype=torch.float64)
    grey = _randn(2, 1, 4, 5, seed=16).sigmoid().expand(2, 3, 4, 5)
    for loss, image in ((tv, constant), (range_loss, grey), (saturation, grey), (border, constant),
                        (two_colour, constant)):
        x = image.clone().requires_grad_()
        value = loss(x)
        # zero up to the rounding of a mean of equal values
        torch.testing.assert_close(value, torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-15)
        value.sum().backward()
        torch.testing.assert_close(x.grad, torch.zeros_like(x), rtol=0, atol=1e-15)
    # negative controls: the same losses see variation, out-of-range values and colour
    assert bool((tv(grey) > 0).all())
    assert bool((range_loss(grey + 1.5) > 0).all())
    assert bool((saturation(_randn(2, 3, 4, 5, seed=17).sigmoid()) > 0).all())
    assert bool((border(grey) > 0).all())


@pytest.mark.parametrize("name", ["tv", "range", "saturation", "border"])
def test_image_loss_gradcheck(name: str) -> None:
    images = (_randn(2, 3, 4, 5, seed=18) * 0.8 + 0.5).requires_grad_()  # some values outside [0, 1]
    assert bool(((images < 0) | (images > 1)).any())
    assert torch.autograd.gradcheck(IMAGE_LOSSES.get(name), (images,))


@pytest.mark.parametrize("name", ["tv", "range", "saturation", "border"])
@pytest.mark.parametrize(
    ("images", "match"),
    [
        (torch.ones(3, 4, 4), r"must be \[B, 3, H, W\], got \[3, 4, 4\]"),
        (torch.ones(1, 4, 4, 4), r"must be \[B, 3, H, W\], got \[1, 4, 4, 4\]"),
        (torch.ones(1, 3, 4, 4, dtype=torch.uint8), "floating-point"),
    ],
)
def test_image_loss_bad_input(name: str, images: torch.Tensor, match: str) -> None:
    with pytest.raises(ClipguideError, match=match):
        IMAGE_LOSSES.get(name)(images)


def test_two_colour_hand_values_and_gradient() -> None:
    # 8x8: a black frame and field, a white 4x4 square, and two odd pixels off the black-white diagonal, symmetric in
    # the blue channel so that the black cluster's mean stays black: (0, 0, 0.3) projects to t = 0.1, the grey
    # (0.1, 0.1, 0.1), at squared distance 0.06; (0, 0, -0.3) projects before black (t = -0.1 -> 0), at 0.09
    image = torch.zeros(1, 3, 8, 8, dtype=torch.float64)
    image[0, :, 2:6, 2:6] = 1.0
    assert two_colour(image).item() == 0                                  # two flat colours
    image[0, 2, 1, 1], image[0, 2, 1, 6] = 0.3, -0.3
    image.requires_grad_(True)
    value = two_colour(image)
    torch.testing.assert_close(value, torch.tensor([(0.06 + 0.09) / 64], dtype=torch.float64))
    value.sum().backward()
    expected = torch.zeros_like(image)
    expected[0, :, 1, 1] = 2 * (torch.tensor([0.0, 0.0, 0.3]) - 0.1) / 64   # 2 (x - projection) / N
    expected[0, 2, 1, 6] = 2 * -0.3 / 64
    torch.testing.assert_close(image.grad, expected)


@pytest.mark.parametrize("loss", [tv, border, two_colour])
def test_needs_two_pixels_each_way(loss) -> None:
    with pytest.raises(ClipguideError, match="at least 2x2 pixels, got 1x4"):
        loss(torch.ones(1, 3, 1, 4))


# ---- stop_below ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stop", "on"),
    [
        (2.25, [False, False, True, True]),  # a loss equal to stop counts as stopped
        (torch.tensor([0.0, 3.0, 3.0, 9.0], dtype=torch.float64), [True, False, True, False]),
        (-math.inf, [True, True, True, True]),
        (math.inf, [False, False, False, False]),
    ],
)
def test_stop_below_switches_gradient_only(stop, on: list[bool]) -> None:
    x = torch.tensor([0.5, 1.5, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    loss = x.pow(2)  # [0.25, 2.25, 4.0, 9.0], all exact
    switched = stop_below(loss, stop)
    assert torch.equal(switched, loss)
    switched.sum().backward()
    expected = torch.where(torch.tensor(on), 2 * x.detach(), torch.zeros(4, dtype=torch.float64))
    assert torch.equal(x.grad, expected)


def test_stop_below_broadcasts_per_row_thresholds() -> None:
    # [P, B] losses with one stop per prompt row, as guidance uses it
    x = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], dtype=torch.float64, requires_grad=True)
    loss = x.pow(2)  # rows [1, 4, 9]
    switched = stop_below(loss, torch.tensor([[4.0], [0.5]], dtype=torch.float64))
    assert torch.equal(switched, loss)
    switched.sum().backward()
    assert torch.equal(x.grad, torch.tensor([[0.0, 0.0, 6.0], [2.0, 4.0, 6.0]], dtype=torch.float64))


@pytest.mark.parametrize(
    ("loss", "stop", "match"),
    [
        (torch.ones(3, dtype=torch.long), 0.0, "loss must be a floating-point tensor"),
        (torch.ones(3), torch.ones(2), r"stop \[2\] does not broadcast to loss \[3\]"),
        (torch.ones(3), torch.ones(2, 3), r"stop \[2, 3\] does not broadcast to loss \[3\]"),
        (torch.ones(3), "0.5", "stop must be a float or a tensor, got str"),
        (torch.ones(3), math.nan, "stop is NaN"),
        (torch.ones(3), torch.tensor([0.0, math.nan, 0.0]), "stop is NaN"),
    ],
)
def test_stop_below_bad_input(loss, stop, match: str) -> None:
    with pytest.raises(ClipguideError, match=match):
        stop_below(loss, stop)


def test_without_value_checks_skips_only_the_checks_that_read_values_and_only_in_its_own_thread() -> None:
    zero_row, stop = torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([0.0, math.nan])
    with without_value_checks(), HostSyncs() as syncs:
        distance = cosine(zero_row, torch.ones(2))
        switched = stop_below(torch.ones(2), stop)
        with pytest.raises(ClipguideError, match="image_emb must be"):   # shapes are still checked
            cosine(torch.ones(2), torch.ones(2))
        in_thread = []
        thread = threading.Thread(target=lambda: in_thread.append(_raises(stop_below, torch.ones(2), stop)))
        thread.start()
        thread.join()
    assert syncs.sites == []
    # the zero row normalises to zero, at cosine distance 1; the switch passes values through
    torch.testing.assert_close(distance, torch.tensor([1 - 2 ** -0.5, 1.0]))
    assert torch.equal(switched, torch.ones(2))
    assert in_thread == [True]
    assert _raises(stop_below, torch.ones(2), stop)   # on again after the block


def _raises(fn, *args) -> bool:
    try:
        fn(*args)
    except ClipguideError:
        return True
    return False


# ---- registries ---------------------------------------------------------------------------------------------------


def test_registries_hold_the_losses() -> None:
    # other modules may register more losses: check that ours are there and that the error lists every name
    for registry, ours, bad in (
        (EMBEDDING_LOSSES, {"spherical", "cosine"}, "sphere"),
        (IMAGE_LOSSES, {"tv", "range", "saturation", "border"}, "l2"),
    ):
        assert ours <= set(registry.names())
        with pytest.raises(UnknownNameError, match=f"unknown {registry.kind} '{bad}'; choose one of: ") as info:
            registry.get(bad)
        assert all(name in str(info.value) for name in registry.names())
