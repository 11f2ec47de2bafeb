"""ShapesWorld: the built-in synthetic image domain.

One flat-coloured shape (circle, axis-aligned square or upright equilateral
triangle) on a plain background. Scenes are rendered with supersampled
anti-aliasing at any size, captioned from a few templates, sampled per split
(some colour-shape pairs are held out of training), and decoded back by
``read``: an analytic, deliberately strict oracle used as a judge of images.

Geometry is expressed in fractions of the image side: *extent* is the width of
the shape's bounding box (circle diameter, square side, triangle side) and the
shape's position is the centroid of its area.
"""

from __future__ import annotations

import itertools
import string
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from .errors import CoreClipError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 50, 180),
    "orange": (240, 130, 30),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
PALETTE = np.array(list(COLORS.values()), dtype=np.float32)  # [8, 3], rows in COLORS order
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("center", "left", "right", "top", "bottom")
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    {("purple", "triangle"), ("orange", "square"), ("white", "circle")}
)
SPLITS: tuple[str, ...] = ("train", "val", "test", "heldout")
ATTRIBUTES: tuple[str, ...] = ("shape", "color", "background", "position", "size")

# Rendering parameters (fractions of the image side unless noted).
ANCHORS: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5),
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
}
EXTENTS: dict[str, float] = {"small": 0.30, "large": 0.55}
_EXTENT_JITTER = {"small": 0.03, "large": 0.05}
_CENTROID_JITTER = 0.04
_COLOR_JITTER = 12  # per channel, in 0..255 units
_SQRT3 = float(np.sqrt(3.0))
# Tags keeping the scene-sampling and render-jitter random streams apart.
_SAMPLE_STREAM, _RENDER_STREAM = 0, 1

# Oracle parameters. RGB distances are Euclidean in 0..255 units; the closest
# palette pair (yellow/orange) is 86 apart and jitter moves a colour <= 21.
_RING_FRAC = 0.035
_RING_TOL = 12.0
_RING_MIN_UNIFORM = 0.95
_PALETTE_TOL = 30.0
_FG_DIST = 30.0
_FG_TOL = 15.0
_FG_MIN_CONSISTENT = 0.95
_FG_MIN_CORE = 0.25
_ALPHA_FLOOR = 0.1
_SHARPEN = 2.0
_IOU_MIN = 0.90
_IOU_MARGIN = 0.04
_SIZE_SPLIT = 0.425
_SIZE_RANGE = (0.18, 0.75)
_POSITION_TOL = 0.1
_MIN_READ_SIDE = 16


class ShapesError(CoreClipError):
    """Invalid scene or image input."""


@dataclass(frozen=True)
class Scene:
    """One ShapesWorld scene; invalid combinations raise ShapesError."""

    shape: str
    color: str
    background: str
    size: str = "small"
    position: str = "center"

    def __post_init__(self) -> None:
        for field, value, allowed in (
            ("shape", self.shape, SHAPES),
            ("color", self.color, tuple(COLORS)),
            ("background", self.background, tuple(COLORS)),
            ("size", self.size, SIZES),
            ("position", self.position, POSITIONS),
        ):
            if value not in allowed:
                raise ShapesError(f"unknown {field} {value!r}; expected one of {allowed}")
        if self.color == self.background:
            raise ShapesError(f"shape colour and background are both {self.color!r}")
        if self.size == "large" and self.position != "center":
            raise ShapesError(f"large shapes are always centred, got position {self.position!r}")

    @property
    def held_out(self) -> bool:
        """True if the (colour, shape) pair is excluded from training splits."""
        return (self.color, self.shape) in HELD_OUT


# ---------------------------------------------------------------- rendering


def _supersample(side: int) -> int:
    """Samples per pixel axis: ~256 samples across the image, 2..8 per pixel."""
    return int(min(8, max(2, round(256 / side))))


def _coverage(
    shape: str, cx: float, cy: float, extent: float, h: int, w: int, ss: int
) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Anti-aliased coverage of a shape, cropped to its bounding box.

    Coordinates are in pixels with the image spanning [0, w] x [0, h]; (cx, cy)
    is the area centroid. Returns (alpha float32 [ny, nx] in [0, 1], (rows, cols)
    slices placing it in the image); the crop is empty if the shape is outside.
    """
    half = extent / 2
    if shape == "triangle":
        height = extent * _SQRT3 / 2
        top, bottom = cy - 2 * height / 3, cy + height / 3
    else:
        top, bottom = cy - half, cy + half
    x0, x1 = max(0, int(np.floor(cx - half))), min(w, int(np.ceil(cx + half)))
    y0, y1 = max(0, int(np.floor(top))), min(h, int(np.ceil(bottom)))
    box = (slice(y0, max(y0, y1)), slice(x0, max(x0, x1)))
    if x1 <= x0 or y1 <= y0:
        return np.zeros((0, 0), np.float32), box
    nx, ny = x1 - x0, y1 - y0
    if shape == "square":
        # Exact box-filter coverage: the overlap of each pixel with the square.
        cols, rows = np.arange(x0, x1, dtype=np.float32), np.arange(y0, y1, dtype=np.float32)
        cov_x = np.clip(np.minimum(cols + 1, cx + half) - np.maximum(cols, cx - half), 0, 1)
        cov_y = np.clip(np.minimum(rows + 1, cy + half) - np.maximum(rows, cy - half), 0, 1)
        return np.outer(cov_y, cov_x), box
    # ss x ss samples per pixel in an n-rooks pattern (every sample has its own
    # row and column of an ss^2 grid), so a horizontal or vertical edge such as
    # the triangle's base is resolved to 1/ss^2 rather than 1/ss of a pixel.
    # Grid axes: (pixel row, sub-row r, sub-column c, pixel column); the pixel
    # column is last so numpy's inner loops run over long contiguous rows.
    sub = np.arange(ss, dtype=np.float32)
    off_x = (sub[None, :] + (sub[:, None] + 0.5) / ss) / ss  # [r, c]
    off_y = (sub[:, None] + (sub[None, :] + 0.5) / ss) / ss
    dx = np.arange(x0, x1, dtype=np.float32) + off_x[:, :, None] - cx  # [r, c, col]
    dy = np.arange(y0, y1, dtype=np.float32)[:, None, None, None] + off_y[None, :, :, None] - cy
    if shape == "circle":
        inside = dx**2 + dy**2 <= half * half
    else:
        below_apex = dy + (cy - top)
        inside = (np.abs(dx) * _SQRT3 <= below_apex) & (below_apex <= bottom - top)
    alpha = inside.reshape(ny, ss * ss, nx).sum(axis=1, dtype=np.float32)
    return alpha / (ss * ss), box


def _jitter_color(name: str, rng: np.random.Generator | None) -> np.ndarray:
    rgb = np.array(COLORS[name], dtype=np.float32)
    if rng is not None:
        rgb = np.clip(rgb + rng.integers(-_COLOR_JITTER, _COLOR_JITTER + 1, 3), 0, 255)
    return rgb


@dataclass(frozen=True)
class Layout:
    """How one scene is drawn at one size: colours float32 [3] in 0..255, centroid (cx, cy) and extent in pixels."""

    fg: np.ndarray
    bg: np.ndarray
    cx: float
    cy: float
    extent: float


def layout(scene: Scene, size: int, rng: np.random.Generator | None = None) -> Layout:
    """The colours and geometry :func:`render` draws ``scene`` with (jittered by ``rng``; None: nominal)."""
    fg = _jitter_color(scene.color, rng)
    bg = _jitter_color(scene.background, rng)
    extent = EXTENTS[scene.size]
    cx, cy = ANCHORS[scene.position]
    if rng is not None:
        extent += rng.uniform(-1, 1) * _EXTENT_JITTER[scene.size]
        cx, cy = np.array([cx, cy]) + rng.uniform(-_CENTROID_JITTER, _CENTROID_JITTER, 2)
    return Layout(fg, bg, cx * size, cy * size, extent * size)


def coverage(shape: str, cx: float, cy: float, extent: float, size: int) -> np.ndarray:
    """Anti-aliased coverage float32 [size, size] in [0, 1] of a shape with area centroid (cx, cy) and extent in
    pixels."""
    alpha = np.zeros((size, size), np.float32)
    crop, box = _coverage(shape, cx, cy, extent, size, size, _supersample(size))
    alpha[box] = crop
    return alpha


def compose(alpha: np.ndarray, fg: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """Blend a shape colour over a background by coverage: alpha [S, S] in [0, 1]; fg, bg: colours [3] or colour
    fields [S, S, 3] in 0..255. Returns uint8 [S, S, 3] (rounded, clipped to 0..255)."""
    image = bg + alpha[..., None] * (fg - bg)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render(scene: Scene, size: int = 64, rng: np.random.Generator | None = None) -> np.ndarray:
    """Render a scene as a uint8 image [size, size, 3].

    rng=None gives the nominal picture (palette colours, nominal extent, centroid
    on its anchor). With an rng, each colour channel moves by up to +-12, the
    extent by up to +-0.03 (small) / +-0.05 (large) and the centroid by up to
    +-0.04 of the side per axis.
    """
    if not isinstance(scene, Scene):
        raise ShapesError(f"expected a Scene, got {type(scene).__name__}")
    if not isinstance(size, (int, np.integer)) or size < 8:
        raise ShapesError(f"image size must be an integer >= 8, got {size!r}")
    size = int(size)
    lay = layout(scene, size, rng)
    return compose(coverage(scene.shape, lay.cx, lay.cy, lay.extent, size), lay.fg, lay.bg)


def render_batch(scenes: Sequence[Scene], size: int = 64, seed: int | None = 0) -> np.ndarray:
    """Render scenes as uint8 [N, size, size, 3].

    seed=None renders nominal pictures; otherwise item i is jittered with an rng
    derived from (seed, i) only, so it does not depend on the rest of the batch.
    """
    images = np.empty((len(scenes), size, size, 3), np.uint8)
    for i, scene in enumerate(scenes):
        rng = None if seed is None else np.random.default_rng([seed, _RENDER_STREAM, i])
        images[i] = render(scene, size, rng)
    return images


# ----------------------------------------------------------------- captions

POSITION_PHRASES = {
    "center": "in the center",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
# Large shapes are always centred, so "in the center" is truthful for them too.
_DESCRIPTION_TEMPLATE = "{a_size} {color} {shape} {position} on {a_background} background"
_TEMPLATES = (
    "{a_color} {shape}",
    "{a_size} {color} {shape}",
    "{a_color} {shape} {position}",
    "{a_color} {shape} on {a_background} background",
    "a photo of {a_size} {color} {shape}",
    "a picture of {a_color} {shape}",
    "{a_size} {color} {shape} {position}",
    "{a_color} {shape} {position} on {a_background} background",
    _DESCRIPTION_TEMPLATE,
)
# The scene attribute each template field names: a caption asserts exactly the attributes its template mentions.
_FIELD_ATTRIBUTES = {
    "shape": "shape",
    "color": "color",
    "a_color": "color",
    "a_size": "size",
    "a_background": "background",
    "position": "position",
}
_TEMPLATE_ATTRIBUTES: tuple[tuple[str, ...], ...] = tuple(
    tuple(_FIELD_ATTRIBUTES[field] for _, field, _, _ in string.Formatter().parse(template) if field)
    for template in _TEMPLATES
)


def with_article(word: str) -> str:
    """"a red", "an orange": the word with its indefinite article."""
    return ("an " if word[0] in "aeiou" else "a ") + word


def _caption_fields(scene: Scene) -> dict[str, str]:
    return {
        "shape": scene.shape,
        "color": scene.color,
        "a_color": with_article(scene.color),
        "a_size": with_article(scene.size),
        "a_background": with_article(scene.background),
        "position": POSITION_PHRASES[scene.position],
    }


def captions(scene: Scene) -> list[str]:
    """Every caption template filled in for the scene (all truthful)."""
    fields = _caption_fields(scene)
    return [template.format(**fields) for template in _TEMPLATES]


def scene_facts(scene: Scene) -> frozenset[tuple[str, str]]:
    """Everything true of the scene as (attribute, value) pairs, one per name in ATTRIBUTES."""
    return frozenset((name, getattr(scene, name)) for name in ATTRIBUTES)


def caption_with_claims(scene: Scene, rng: np.random.Generator) -> tuple[str, frozenset[tuple[str, str]]]:
    """One caption drawn uniformly from ``captions(scene)`` and the (attribute, value) pairs it asserts.

    E.g. ("a red circle", {("color", "red"), ("shape", "circle")}); position phrases assert ("position", p),
    including "in the center" for large shapes, and "a photo of" asserts nothing. The claims are always a subset
    of ``scene_facts(scene)``.
    """
    k = int(rng.integers(len(_TEMPLATES)))
    text = _TEMPLATES[k].format(**_caption_fields(scene))
    return text, frozenset((name, getattr(scene, name)) for name in _TEMPLATE_ATTRIBUTES[k])


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """One caption drawn uniformly from ``captions(scene)``."""
    return caption_with_claims(scene, rng)[0]


def describe(scene: Scene) -> str:
    """Canonical full description, e.g. 'a small red circle on the left on a blue background'."""
    return _DESCRIPTION_TEMPLATE.format(**_caption_fields(scene))


# ----------------------------------------------------------------- sampling


def _all_scenes(held_out: bool) -> list[Scene]:
    layouts = [("small", p) for p in POSITIONS] + [("large", "center")]
    return [
        Scene(shape, color, background, size, position)
        for shape, color, background in itertools.product(SHAPES, COLORS, COLORS)
        if color != background and ((color, shape) in HELD_OUT) == held_out
        for size, position in layouts
    ]


_TRAINABLE_SCENES = _all_scenes(held_out=False)
_HELD_OUT_SCENES = _all_scenes(held_out=True)


def sample_scenes(n: int, seed: int, split: str = "train") -> list[Scene]:
    """n scenes drawn uniformly (with replacement) from the valid scenes of a split.

    train/val/test draw non-held-out colour-shape pairs from independent random
    streams; heldout draws only held-out pairs. Deterministic in (n, seed, split).
    """
    if split not in SPLITS:
        raise ShapesError(f"unknown split {split!r}; expected one of {SPLITS}")
    if n < 0:
        raise ShapesError(f"number of scenes must be >= 0, got {n}")
    pool = _HELD_OUT_SCENES if split == "heldout" else _TRAINABLE_SCENES
    rng = np.random.default_rng([seed, _SAMPLE_STREAM, SPLITS.index(split)])
    return [pool[i] for i in rng.integers(len(pool), size=n)]


def counterfactual(scene: Scene, rng: np.random.Generator) -> Scene:
    """A scene that a caption of ``scene`` can confuse with it: the shape and background colours swapped, or one
    of the shape's colour, the shape or the background changed (each kind equally likely), keeping size and
    position. The twin's colour-shape pair is held out exactly when the original's is, so twins stay in their
    split."""
    others = [c for c in COLORS if c not in (scene.color, scene.background)]
    while True:
        kind = int(rng.integers(4))
        if kind == 0:
            twin = replace(scene, color=scene.background, background=scene.color)
        elif kind == 1:
            twin = replace(scene, color=str(rng.choice(others)))
        elif kind == 2:
            twin = replace(scene, background=str(rng.choice(others)))
        else:
            twin = replace(scene, shape=str(rng.choice([s for s in SHAPES if s != scene.shape])))
        if twin.held_out == scene.held_out:
            return twin


# ------------------------------------------------------------------- oracle


def _to_planes(image: Any) -> np.ndarray:
    """Convert a PIL image / numpy array / torch tensor to float32 [3, H, W] in 0..255."""
    if type(image).__module__.startswith("PIL."):
        image = np.asarray(image.convert("RGB"))
    elif type(image).__module__.startswith("torch"):
        image = image.detach().cpu()
        image = (image.float() if image.is_floating_point() else image).numpy()
    if not isinstance(image, np.ndarray):
        raise ShapesError(f"cannot read an image of type {type(image).__name__}")
    if image.ndim != 3:
        raise ShapesError(f"image must have 3 dimensions (HWC or CHW), got shape {image.shape}")
    if image.shape[-1] == 3:
        image = np.moveaxis(image, -1, 0)
    elif image.shape[0] != 3:
        raise ShapesError(f"image must have 3 colour channels, got shape {image.shape}")
    if min(image.shape[1:]) < _MIN_READ_SIDE:
        raise ShapesError(f"image sides must be >= {_MIN_READ_SIDE} px, got shape {image.shape}")
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image, dtype=np.float32)
    if not np.issubdtype(image.dtype, np.floating):
        raise ShapesError(f"image must be uint8 or float in [0, 1], got dtype {image.dtype}")
    if not np.isfinite(image).all():
        raise ShapesError("image contains NaN or infinite values")
    low, high = float(image.min()), float(image.max())
    if low < -0.05 or high > 1.05:
        raise ShapesError(f"float image values must lie in [0, 1], got [{low:.3g}, {high:.3g}]")
    return np.ascontiguousarray(np.clip(image, 0, 1) * 255, dtype=np.float32)


def _sq_dist(planes: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Squared RGB distance between planes [3, ...] and a colour [3] or planes of the same shape."""
    return sum((planes[c] - other[c]) ** 2 for c in range(3))


def _palette_name(rgb: np.ndarray) -> str | None:
    distances = np.linalg.norm(PALETTE - rgb, axis=1)
    best = int(distances.argmin())
    return list(COLORS)[best] if distances[best] <= _PALETTE_TOL else None


def _dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 (8-neighbour) binary dilation of a 2-D mask."""
    padded = np.pad(mask, 1)
    rows = padded[:-2] | padded[1:-1] | padded[2:]
    return rows[:, :-2] | rows[:, 1:-1] | rows[:, 2:]


def _anchor(x: float, y: float, allowed: Sequence[str]) -> str | None:
    for name in allowed:
        ax, ay = ANCHORS[name]
        if abs(x - ax) <= _POSITION_TOL and abs(y - ay) <= _POSITION_TOL:
            return name
    return None


def _is_single_blob(mask: np.ndarray) -> bool:
    """True if the True pixels of mask form one 8-connected component."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return False
    mask = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    grown = np.zeros_like(mask)
    grown[rows[0] - rows.min(), cols[0] - cols.min()] = True
    count = 1
    while True:
        grown = _dilate(grown) & mask
        new_count = int(grown.sum())
        if new_count == count:
            return count == int(mask.sum())
        count = new_count


def _sharpen(alpha: np.ndarray) -> np.ndarray:
    # Blur keeps a shape's area, centroid and (away from corners) its 0.5
    # level line but widens its soft edge; steepening the edge on both sides
    # makes the IoU measure the outline rather than the edge width.
    return np.clip((alpha - 0.5) * _SHARPEN + 0.5, 0, 1)


def _fit_shapes(alpha: np.ndarray, cx: float, cy: float) -> list[tuple[float, str, float]]:
    """Soft IoU of a coverage map with each ideal shape, best first.

    alpha: shape coverage float [H, W] in [0, 1]; (cx, cy): its centroid in
    pixels. Each ideal shape has alpha's area and centroid. Returns
    [(iou in [0, 1], shape, extent in pixels), ...] sorted by decreasing iou.
    """
    h, w = alpha.shape
    area = float(alpha.sum())
    extents = {
        "circle": 2 * np.sqrt(area / np.pi),
        "square": np.sqrt(area),
        "triangle": np.sqrt(4 * area / _SQRT3),
    }
    sharp = _sharpen(alpha)
    sharp_area = float(sharp.sum())
    fits = []
    for shape, extent in extents.items():
        template, box = _coverage(shape, cx, cy, float(extent), h, w, _supersample(min(h, w)))
        template = _sharpen(template)
        overlap = float(np.minimum(template, sharp[box]).sum())
        fits.append((overlap / (sharp_area + float(template.sum()) - overlap), shape, float(extent)))
    return sorted(fits, reverse=True)


def read(image: Any) -> dict[str, str | None]:
    """Decode a ShapesWorld picture analytically.

    image: PIL image, uint8 [H, W, 3], or float numpy array / torch tensor
    [H, W, 3] or [3, H, W] in [0, 1]; both sides >= 16 px.
    Returns {shape, color, background, position, size}, each a name or None
    when the picture does not clearly show it: a non-uniform border gives
    background=None, a non-palette or non-uniform shape colour gives
    color=None, a blob that fits no single shape tightly gives shape=None.
    """
    planes = _to_planes(image)
    _, h, w = planes.shape
    reading: dict[str, str | None] = dict.fromkeys(ATTRIBUTES)

    t = max(1, round(_RING_FRAC * min(h, w)))
    sides = (planes[:, :t], planes[:, -t:], planes[:, t:-t, :t], planes[:, t:-t, -t:])
    ring = np.concatenate([side.reshape(3, -1) for side in sides], axis=1)
    bg = np.median(ring, axis=1)
    if np.mean(_sq_dist(ring, bg) <= _RING_TOL**2) >= _RING_MIN_UNIFORM:
        reading["background"] = _palette_name(bg)

    dist2 = _sq_dist(planes, bg)
    fg_mask = dist2 > _FG_DIST**2
    if fg_mask.sum() < max(4, 0.002 * h * w):
        return reading
    # The shape colour: median of the pixels farthest from the background
    # (within 90% of the 90th-percentile distance), which skips the
    # anti-aliased edge.
    pixels, fg_dist2 = planes[:, fg_mask], dist2[fg_mask]
    fg = np.median(pixels[:, fg_dist2 >= 0.81 * np.quantile(fg_dist2, 0.9)], axis=1)
    axis = fg - bg
    axis_len2 = float(axis @ axis)
    if axis_len2 <= _FG_DIST**2:
        return reading
    alpha = np.clip(sum((planes[c] - bg[c]) * (axis[c] / axis_len2) for c in range(3)), 0, 1)

    # A single flat shape means every non-background pixel is a bg/fg blend and
    # a good share of them are pure fg; noise and gradients fail this.
    blend = bg[:, None] + alpha[fg_mask] * axis[:, None]
    consistent = np.mean(_sq_dist(pixels, blend) <= _FG_TOL**2)
    core = np.mean(_sq_dist(pixels, fg) <= _FG_TOL**2)
    if consistent < _FG_MIN_CONSISTENT or core < _FG_MIN_CORE:
        return reading
    reading["color"] = _palette_name(fg)

    # Faint stray alpha (noise) away from the shape would bias its area and
    # centroid; keep only pixels clearly covered and their neighbours, which
    # hold the anti-aliased edge.
    alpha = np.where(_dilate(alpha > _ALPHA_FLOOR), alpha, 0)
    area = float(alpha.sum())
    cx = float(alpha.sum(0) @ (np.arange(w) + 0.5)) / area
    cy = float(alpha.sum(1) @ (np.arange(h) + 0.5)) / area
    (iou, shape, extent), (second_iou, _, _) = _fit_shapes(alpha, cx, cy)[:2]
    x, y, extent = cx / w, cy / h, extent / min(h, w)
    if iou < _IOU_MIN or iou - second_iou < _IOU_MARGIN:
        if _is_single_blob(alpha > 0.5):
            reading["position"] = _anchor(x, y, POSITIONS)
        return reading
    reading["shape"] = shape
    if _SIZE_RANGE[0] <= extent < _SIZE_SPLIT:
        reading["size"] = "small"
    elif _SIZE_SPLIT <= extent <= _SIZE_RANGE[1]:
        reading["size"] = "large"
    reading["position"] = _anchor(x, y, ("center",) if reading["size"] == "large" else POSITIONS)
    return reading


def matches(
    reading: dict[str, str | None],
    scene: Scene,
    attributes: Sequence[str] = ("shape", "color", "background"),
) -> bool:
    """True if the reading agrees with the scene on every listed attribute (None never agrees)."""
    for name in attributes:
        if name not in ATTRIBUTES:
            raise ShapesError(f"unknown attribute {name!r}")
    return all(reading.get(name) == getattr(scene, name) for name in attributes)
