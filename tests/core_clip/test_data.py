"""CSV pair lists and the digits split."""
import numpy as np
import pytest
from PIL import Image

from core_clip.data import load_digits, read_pairs_csv
from core_clip.errors import DataError


def _image(path):
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)


def test_csv_with_header_and_relative_paths(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    _image(tmp_path / "sub" / "b.png")
    (tmp_path / "pairs.csv").write_text('path,caption\na.png,a red square\nsub/b.png,"red, square"\n\n')
    pairs = read_pairs_csv(tmp_path / "pairs.csv")
    assert [(p.path, p.caption) for p in pairs] == [(tmp_path / "a.png", "a red square"),
                                                     (tmp_path / "sub" / "b.png", "red, square")]


@pytest.mark.parametrize("body, message", [
    ("a.png,a red square\nmissing.png,x\ngone.jpg,y\n", r"2 image file\(s\) missing.*2: missing.png; 3: gone.jpg"),
    ("a.png,\n", r"pairs.csv:1: empty caption for a.png"),
    ("path,caption\na.png\n", r"pairs.csv:2: expected two columns"),
    ("path,caption\n", "no image-caption rows"),
])
def test_bad_csvs_name_the_problem(tmp_path, body, message):
    _image(tmp_path / "a.png")
    (tmp_path / "pairs.csv").write_text(body)
    with pytest.raises(DataError, match=message):
        read_pairs_csv(tmp_path / "pairs.csv")


def test_digits_split_is_fixed_stratified_and_disjoint():
    train_x, train_y = load_digits("train")
    test_x, test_y = load_digits("test")
    assert len(train_x) + len(test_x) == 1797 and len(test_x) == 450
    assert train_x.shape[1:] == (8, 8, 3) and train_x.dtype == np.uint8
    assert np.bincount(test_y).min() >= 40  # every digit is in the test split
    again_x, again_y = load_digits("test")
    assert np.array_equal(again_x, test_x) and np.array_equal(again_y, test_y)
    train_set = {x.tobytes() + bytes([y]) for x, y in zip(train_x, train_y)}
    assert sum(x.tobytes() + bytes([y]) in train_set for x, y in zip(test_x, test_y)) < 5  # only true duplicates
    assert train_x.max() == 255 and np.median(train_x) > 200  # white paper, dark ink
    with pytest.raises(DataError, match="'train' or 'test'"):
        load_digits("val")
