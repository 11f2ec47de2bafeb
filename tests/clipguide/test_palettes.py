"""The palette image loss against a hand computation, and its registration."""
import pytest
import torch

from clipguide import ClipguideError
from clipguide.losses import IMAGE_LOSSES
from clipguide.palettes import PaletteLoss, parse_palette


def test_palette_loss_is_the_mean_squared_distance_to_the_nearest_colour():
    loss = PaletteLoss("#000000,#ffffff")
    images = torch.zeros(2, 3, 1, 2)
    images[0, :, 0, 0] = 0.25                      # nearest black: 3 * 0.25^2
    images[0, :, 0, 1] = torch.tensor([1.0, 0.6, 1.0])   # nearest white: 0.4^2
    images[1] = 1.0                                # white: 0
    torch.testing.assert_close(loss(images), torch.tensor([(3 * 0.0625 + 0.16) / 2, 0.0]))


def test_palette_loss_gradient_pulls_each_pixel_to_its_nearest_colour():
    images = torch.rand(1, 3, 4, 4, requires_grad=True)
    IMAGE_LOSSES.get("palette")(images).sum().backward()
    palette = parse_palette("shapes")
    nearest = palette[torch.cdist(images.detach()[0].flatten(1).T, palette).argmin(dim=1)].T.reshape(3, 4, 4)
    torch.testing.assert_close(images.grad[0], 2 * (images.detach()[0] - nearest) / 16)


def test_a_bad_palette_fails_when_the_loss_is_made():
    with pytest.raises(ClipguideError, match="not #rrggbb"):
        PaletteLoss("#ff0000,#zz0000")
