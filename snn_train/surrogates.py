"""Surrogate spike gradients: the registry of ``model.surrogate`` choices.

A LIF neuron spikes with the Heaviside step z = Θ(x) of x = v − v_th, whose derivative is zero almost everywhere.
Training replaces dΘ/dx by a smooth bump of sharpness ``alpha``; each function here is that bump, dz/dx(x, alpha).
Adding a surrogate is one function in ``SURROGATES`` plus one file configs/model/<name>.yaml.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Surrogate = Callable[[torch.Tensor, float], torch.Tensor]


def superspike(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """SuperSpike (Zenke & Ganguli 2018): dz/dx = 1 / (α·|x| + 1)²."""
    return 1.0 / (alpha * x.abs() + 1.0).pow(2)


def tanh(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """Derivative of tanh(α·x) up to the factor α: dz/dx = 1 − tanh²(α·x), computed as 4e/(1 + e)² with
    e = exp(−2|α·x|), which is the same function without the cancellation of 1 − tanh² where tanh nears ±1 (there
    float32 loses about 1e-4 of the value; every LIF kernel computes it this way)."""
    e = torch.exp(-2.0 * (alpha * x).abs())
    return 4.0 * e / (1.0 + e).pow(2)


def triangle(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """Triangle of half-width 1: dz/dx = α·max(0, 1 − |x|)."""
    return alpha * torch.relu(1.0 - x.abs())


def circ(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """Derivative of x / √(α² + x²) up to the factor α: dz/dx = α³ / (α² + x²)^(3/2)."""
    return alpha**3 / (alpha**2 + x.pow(2)).pow(1.5)


def erfc(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """Gaussian, the derivative of ½·erfc(−α·x): dz/dx = α/√π · exp(−(α·x)²)."""
    return alpha / math.sqrt(math.pi) * torch.exp(-(alpha * x).pow(2))


def atan(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """Derivative of 1/π·arctan(π/2·α·x) + ½: dz/dx = (α/2) / (1 + (π/2·α·x)²)."""
    return alpha / 2.0 / (1.0 + (math.pi / 2.0 * alpha * x).pow(2))


SURROGATES: dict[str, Surrogate] = {
    "super": superspike,
    "tanh": tanh,
    "triangle": triangle,
    "circ": circ,
    "erfc": erfc,
    "atan": atan,
}
"""``model.surrogate`` name → dz/dx for x = v − v_th; the forward pass is always Θ(x) (x > 0 spikes)."""


class _SpikeFunction(torch.autograd.Function):
    """Heaviside step forward, a surrogate derivative backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, surrogate: str, alpha: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.surrogate = surrogate
        ctx.alpha = alpha
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (x,) = ctx.saved_tensors
        return grad_output * SURROGATES[ctx.surrogate](x, ctx.alpha), None, None


def spike(x: torch.Tensor, surrogate: str, alpha: float) -> torch.Tensor:
    """z = Θ(x), with the named surrogate of sharpness ``alpha`` as its gradient."""
    return _SpikeFunction.apply(x, surrogate, alpha)
