"""Light data augmentation: random affine transforms (shift, rotation, zoom) of image batches, on their own device."""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from snn_train.schema import AugmentConfig


def affine(images: torch.Tensor, angle: torch.Tensor, zoom: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each image [B, C, H, W] by ``angle`` (radians, clockwise as displayed) about its centre, zoom it
    by ``zoom`` and move it by ``shift`` [B, 2] pixels (x right, y down); bilinear, zeros come in at the borders."""
    height, width = images.shape[-2:]
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # affine_grid maps output coordinates (x, y in [-1, 1]) to the input coordinates sampled there: the inverse map
    x_shift = -(cos * shift[:, 0] * 2 / width + sin * shift[:, 1] * 2 / height)
    y_shift = -(-sin * shift[:, 0] * 2 / width + cos * shift[:, 1] * 2 / height)
    theta = torch.stack(
        [torch.stack([cos, sin * height / width, x_shift], 1), torch.stack([-sin * width / height, cos, y_shift], 1)], 1
    )
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_affine(images: torch.Tensor, augment_cfg: AugmentConfig) -> torch.Tensor:
    """``affine`` with each image's shift, angle and zoom drawn uniformly within ±``augment.*``; unchanged if all
    are 0."""
    if not (augment_cfg.shift or augment_cfg.rotate or augment_cfg.scale):
        return images
    draws = torch.rand(4, len(images), device=images.device) * 2 - 1
    angle = draws[0] * math.radians(augment_cfg.rotate)
    zoom = 1 + draws[1] * augment_cfg.scale
    return affine(images, angle, zoom, draws[2:].T * augment_cfg.shift)
