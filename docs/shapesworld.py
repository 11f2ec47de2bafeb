"""Render docs/shapesworld.png: 3 x 8 random ShapesWorld training images (jittered, 96 px); print a few captions.

    python docs/shapesworld.py
"""
from pathlib import Path

import numpy as np
from PIL import Image

from core_clip import shapes

ROWS, COLS, SIZE, PAD = 3, 8, 96, 4


def main() -> None:
    scenes = shapes.sample_scenes(ROWS * COLS, seed=7, split="train")
    tiles = shapes.render_batch(scenes, SIZE, seed=7)
    grid = np.full((ROWS * (SIZE + PAD) + PAD, COLS * (SIZE + PAD) + PAD, 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        row, col = divmod(i, COLS)
        y, x = PAD + row * (SIZE + PAD), PAD + col * (SIZE + PAD)
        grid[y : y + SIZE, x : x + SIZE] = tile
    out = Path(__file__).with_name("shapesworld.png")
    Image.fromarray(grid).save(out)
    for s in scenes[:COLS]:
        print(shapes.describe(s))


if __name__ == "__main__":
    main()
