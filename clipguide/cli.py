"""``clipguide``: the command line (see DESIGN.md for the contract)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from core_clip import DEFAULT_MODEL, CoreClipError, load
from core_clip.cli import OneLineParser, emit, run
from core_clip.data import read_pairs_csv
from core_clip.score import score_embeddings


def _pairs(args) -> list[tuple[Path, str]]:
    if args.prompt is not None:
        if not args.images:
            raise CoreClipError("score needs at least one IMAGE with --prompt")
        return [(Path(p), args.prompt) for p in args.images]
    by_path = {p.path.resolve(): p.caption for p in read_pairs_csv(args.captions)}
    if not args.images:
        return list(by_path.items())
    missing = [p for p in args.images if Path(p).resolve() not in by_path]
    if missing:
        raise CoreClipError(f"{args.captions} has no caption for {', '.join(missing)}")
    return [(Path(p), by_path[Path(p).resolve()]) for p in args.images]


def cmd_score(args) -> None:
    pairs = _pairs(args)
    model = load(args.clip, device=args.device)
    image_emb, _ = model.embed_files([p for p, _ in pairs])
    scores = score_embeddings(image_emb, [c for _, c in pairs], model).tolist()
    rows = [{"image": str(p), "caption": c, "clip_score": round(s, 4)} for (p, c), s in zip(pairs, scores)]
    mean = sum(scores) / len(scores)
    emit({"clip": args.clip, "scores": rows, "mean": round(mean, 4)}, args.json,
         [f"{r['clip_score']:8.4f}  {r['image']}  {r['caption']!r}" for r in rows] + [f"{mean:8.4f}  mean"])


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="clipguide", description="Steer image generators with CLIP.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    p = sub.add_parser("score", help="CLIP score of images against a prompt or their captions")
    p.set_defaults(fn=cmd_score)
    p.add_argument("images", nargs="*", metavar="IMAGE")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="one caption scored against every IMAGE")
    group.add_argument("--captions", help="CSV of path,caption rows (scores every row, or only the IMAGEs given)")
    p.add_argument("--clip", default=DEFAULT_MODEL, help="CLIP model name or path (see core_clip.load)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"])
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)
