"""Augmentation: affine transforms against closed forms (pixel shifts, quarter turns, the identity), random draws
within their bounds."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from snn_train.augment import affine, random_affine


def transform(
    images: torch.Tensor, angle: float = 0.0, zoom: float = 1.0, shift: tuple[float, float] = (0.0, 0.0)
) -> torch.Tensor:
    """``affine`` with the same angle, zoom and shift for every image."""
    count = len(images)
    return affine(
        images, torch.full((count,), angle), torch.full((count,), zoom), torch.tensor([shift]).expand(count, 2)
    )


def augment_cfg(shift: float = 0.0, rotate: float = 0.0, scale: float = 0.0):
    return OmegaConf.create({"shift": shift, "rotate": rotate, "scale": scale})


def blob_images(count: int, size: int, row: int, column: int) -> torch.Tensor:
    """``count`` copies of a black ``size``×``size`` image with one bright 3×3 blob centred at (row, column)."""
    images = torch.zeros(count, 1, size, size)
    images[:, :, row - 1 : row + 2, column - 1 : column + 2] = 1.0
    return images


def centroids(images: torch.Tensor) -> torch.Tensor:
    """Each image's brightness centroid [B, 2] as (x, y) = (column, row)."""
    height, width = images.shape[-2:]
    mass = images.sum(dim=(1, 2, 3))
    rows = (images.sum(dim=(1, 3)) * torch.arange(height)).sum(1) / mass
    columns = (images.sum(dim=(1, 2)) * torch.arange(width)).sum(1) / mass
    return torch.stack([columns, rows], 1)


@pytest.mark.parametrize("size", [(9, 9), (7, 12)], ids=["square", "wide"])
@pytest.mark.parametrize("shift", [(2, 0), (0, 3), (-1, 2), (3, -2)])
def test_an_integer_shift_moves_the_pixels_right_and_down_and_fills_zeros(
    size: tuple[int, int], shift: tuple[int, int]
) -> None:
    torch.manual_seed(0)
    images = torch.rand(3, 2, *size)
    dx, dy = shift
    expected = torch.zeros_like(images)
    height, width = size
    expected[..., max(dy, 0) : height + min(dy, 0), max(dx, 0) : width + min(dx, 0)] = images[
        ..., max(-dy, 0) : height - max(dy, 0), max(-dx, 0) : width - max(dx, 0)
    ]
    assert torch.allclose(transform(images, shift=(float(dx), float(dy))), expected, atol=1e-5)


def test_a_quarter_turn_is_a_clockwise_rot90() -> None:
    torch.manual_seed(1)
    images = torch.rand(3, 2, 8, 8)
    assert torch.allclose(transform(images, angle=math.pi / 2), torch.rot90(images, -1, (2, 3)), atol=1e-5)
    assert torch.allclose(transform(images, angle=-math.pi / 2), torch.rot90(images, 1, (2, 3)), atol=1e-5)


@pytest.mark.parametrize("size", [(8, 8), (7, 12)], ids=["square", "wide"])
def test_no_rotation_zoom_or_shift_is_the_identity(size: tuple[int, int]) -> None:
    torch.manual_seed(2)
    images = torch.rand(3, 1, *size)
    assert torch.allclose(transform(images), images, atol=1e-6)


def test_a_zoom_scales_distances_from_the_centre() -> None:
    images = blob_images(1, 21, 10, 14)  # 4 pixels right of the centre (10, 10)
    zoomed = centroids(transform(images, zoom=1.5))[0]
    assert zoomed.tolist() == pytest.approx([10 + 1.5 * 4, 10], abs=1e-3)


def test_random_affine_with_everything_off_returns_the_images_without_drawing() -> None:
    images = torch.rand(4, 1, 8, 8)
    state = torch.get_rng_state()
    assert random_affine(images, augment_cfg()) is images
    assert torch.equal(torch.get_rng_state(), state)  # the random states, and so the default runs, are unchanged


def test_random_shifts_stay_within_the_bound_and_vary() -> None:
    torch.manual_seed(3)
    images = blob_images(64, 21, 10, 10)
    moved = centroids(random_affine(images, augment_cfg(shift=3.0))) - centroids(images)
    assert moved.abs().max() <= 3 + 1e-3
    assert moved.abs().max() > 2.5 and (moved > 0).any() and (moved < 0).any()
    assert len({tuple(row) for row in moved.tolist()}) == 64  # each image its own shift


def test_random_rotations_and_zooms_stay_within_their_bounds() -> None:
    torch.manual_seed(4)
    images = blob_images(64, 21, 10, 16)  # 6 pixels right of the centre (10, 10)
    offset = centroids(random_affine(images, augment_cfg(rotate=20.0, scale=0.2))) - 10
    angle = torch.rad2deg(torch.atan2(offset[:, 1], offset[:, 0]))  # y down: a positive angle is clockwise as displayed
    radius = offset.norm(dim=1) / 6
    assert angle.abs().max() <= 20 + 0.1 and angle.max() > 15 and angle.min() < -15
    assert radius.min() >= 0.8 - 1e-3 and radius.max() <= 1.2 + 1e-3 and radius.max() - radius.min() > 0.3
