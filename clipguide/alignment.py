"""Do a CLIP's image gradients point towards what its prompt says? One-attribute edits of ShapesWorld pictures.

    python -m clipguide.alignment --clip shapes                # 42 seen-pair pictures x 3 edits
    python -m clipguide.alignment --clip runs/mine/model.safetensors --steps 40 --step-size 2

An edit starts from the true picture ``x0`` of one case ("a red circle on a blue background") and guides it
towards a prompt with one attribute changed ("a green circle on a blue background"), whose true picture is ``x1``.
A CLIP whose gradients guidance can follow has ``-grad`` (of the prompt's guidance loss at ``x0``) pointing from
``x0`` towards ``x1``. Three numbers per edit kind (colour, background, shape):

- ``cosine``: cos(-grad, x1 - x0) at the start. A random direction scores about 0 (+- 0.01 at 64 px).
- ``progress``: the share of the distance to ``x1`` closed by ``steps`` steps of plain normalised gradient descent
  on the pixels (each step moves the picture by ``step_size`` in L2, [0, 1] pixel units, then clamps to [0, 1]);
  negative when the picture moves away. Normalised descent follows the gradient itself, where Adam's per-pixel
  scaling would lift its faintest components (texture in flat regions) to full steps.
- ``read``: the share of edited pictures that the ShapesWorld oracle reads as the target.

This checks the CLIP, not a backend, in seconds rather than the minutes of a guided evaluation
(``python -m clipguide.evaluate``); guidance's cutouts and augmentations are GuidanceConfig's defaults (the command
line takes 32 cutouts per gradient, ``--cutn``).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from core_clip import shapes
from core_clip.cli import OneLineParser, emit, float_where, int_at_least, run

from .evaluate import ATTRIBUTES, Case, cases, true_picture
from .guidance import CLIPGuidance
from .perceptor import Perceptor

KINDS = ATTRIBUTES  # an edit changes one of them
Gradient = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Edit:
    """Guide the true picture of ``source`` towards ``target``'s prompt; ``kind``: the one attribute they differ in."""

    kind: str
    source: Case
    target: Case


def _changed(case: Case, kind: str, index: int) -> Case:
    """``case`` with attribute ``kind`` replaced by a value chosen by a fixed rotation (``index``), never making a
    seen colour-shape pair held-out, a shape the colour of its background, or the same case."""
    if kind == "shape":
        options = [Case(case.color, s, case.background) for s in shapes.SHAPES if s != case.shape]
    else:
        others = [c for c in shapes.COLORS if c not in (case.color, case.background)]
        options = [Case(c, case.shape, case.background) if kind == "color" else Case(case.color, case.shape, c)
                   for c in others]
    seen = (case.color, case.shape) not in shapes.HELD_OUT
    if seen:
        options = [o for o in options if (o.color, o.shape) not in shapes.HELD_OUT]
    return options[(3 * index) % len(options)]


def edits(case_list: Sequence[Case]) -> list[Edit]:
    """Three edits (colour, background, shape) of every case, in that order."""
    return [Edit(kind, case, _changed(case, kind, i)) for i, case in enumerate(case_list) for kind in KINDS]


@dataclass
class EditResult:
    """What one edit did."""

    edit: Edit
    cosine: float      # cos(-grad, x1 - x0) at the start
    progress: float    # 1 - |x_N - x1| / |x0 - x1|
    reading: dict      # the oracle's reading of the final picture
    image: torch.Tensor  # the final picture, float [1, 3, S, S] in [0, 1]

    @property
    def read(self) -> bool:
        """Whether the oracle reads the final picture as the target case."""
        return all(self.edit.target.right(self.reading).values())


def check_edit(edit: Edit, gradient: Gradient, steps: int = 20, step_size: float = 2.0,
               size: int = 64) -> EditResult:
    """Run one edit. ``gradient(images [1, 3, S, S]) -> (loss, d loss / d images)`` is the target prompt's loss
    (e.g. :meth:`CLIPGuidance.gradient`); ``steps`` normalised descent steps of L2 length ``step_size``."""
    x0, x1 = true_picture(edit.source, size), true_picture(edit.target, size)
    _, grad = gradient(x0)
    cosine = F.cosine_similarity(-grad.flatten(), (x1 - x0).flatten(), dim=0).item()
    x = x0
    for step in range(steps):
        if step:
            _, grad = gradient(x)
        x = (x - step_size * grad / grad.norm().clamp_min(1e-12)).clamp(0, 1)
    progress = 1 - ((x - x1).norm() / (x0 - x1).norm()).item()
    return EditResult(edit, cosine, progress, shapes.read(x[0]), x)


def measure(clip: str = "shapes", held_out: bool = False, backgrounds: int = 2, steps: int = 20,
            step_size: float = 2.0, seed: int = 0, progress: bool = True, **guidance_options) -> dict:
    """Every edit of :func:`edits` under ``clip`` (a name or path ``guide()`` takes); edit i is judged by a
    :class:`CLIPGuidance` seeded ``seed + i`` with ``guidance_options`` (GuidanceConfig fields).

    Returns {kind: {"n", "cosine" (mean), "aligned" (share with cosine > 0), "progress" (mean), "read" (share)}
    for each kind, "results": [EditResult]}.
    """
    perceptor = Perceptor(clip)
    todo = edits(cases(held_out, backgrounds))
    results = []
    for i, edit in enumerate(tqdm(todo, desc="alignment", disable=not progress)):
        guidance = CLIPGuidance(edit.target.prompt, perceptor, seed=seed + i, **guidance_options)
        results.append(check_edit(edit, guidance.gradient, steps, step_size))
    report: dict = {"results": results}
    for kind in KINDS:
        rows = [r for r in results if r.edit.kind == kind]
        report[kind] = {"n": len(rows), "cosine": sum(r.cosine for r in rows) / len(rows),
                        "aligned": sum(r.cosine > 0 for r in rows) / len(rows),
                        "progress": sum(r.progress for r in rows) / len(rows),
                        "read": sum(r.read for r in rows) / len(rows)}
    return report


def _run(args: argparse.Namespace) -> None:
    report = measure(args.clip, args.held_out, args.backgrounds, args.steps, args.step_size, args.seed,
                     cutn=args.cutn)
    lines = [f"{r.edit.kind:10s} {r.edit.source.prompt} -> {r.edit.target.prompt}: cos {r.cosine:+.3f}, progress "
             f"{r.progress:+.3f}, read {r.reading['color']} {r.reading['shape']} on {r.reading['background']}"
             for r in report["results"]]
    summary = {k: report[k] for k in KINDS}
    lines += [f"{kind} edits ({s['n']}): cosine {s['cosine']:+.3f} ({s['aligned']:.0%} > 0), progress after "
              f"{args.steps} steps {s['progress']:+.3f}, oracle reads the target in {s['read']:.0%}"
              for kind, s in summary.items()]
    summary["edits"] = [{"kind": r.edit.kind, "source": r.edit.source.prompt, "target": r.edit.target.prompt,
                         "cosine": r.cosine, "progress": r.progress, "reading": r.reading}
                        for r in report["results"]]
    emit(summary, args.json, lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; bad input (an unknown CLIP, a bad number) exits 2 with one line."""
    parser = OneLineParser(prog="python -m clipguide.alignment", description=__doc__.split("\n")[0])
    parser.add_argument("--clip", default="shapes")
    parser.add_argument("--held-out", action="store_true", help="edit pictures of the held-out colour-shape pairs")
    parser.add_argument("--backgrounds", type=int_at_least(1, "a positive integer"), default=2)
    parser.add_argument("--steps", type=int_at_least(0, "a non-negative integer"), default=20,
                        help="normalised gradient-descent steps per edit (0: the cosine only)")
    parser.add_argument("--step-size", type=float_where(lambda x: x > 0, "a positive number"), default=2.0,
                        help="L2 length of each step, in [0, 1] pixel units (a 64 px picture has 12,288 values)")
    parser.add_argument("--cutn", type=int_at_least(1, "a positive integer"), default=32,
                        help="cutouts per gradient")
    parser.add_argument("--seed", type=int_at_least(0, "a non-negative integer"), default=0)
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(fn=_run)
    return run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
