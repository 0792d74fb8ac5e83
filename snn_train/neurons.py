"""Neuron models: LIF and leaky-integrator parameters, surrogate spike functions, sequence kernels.

All kernels are time-major: input currents [T, B, ...] in, one output per time step out.
The equations follow Norse's current LIF model; every surrogate's ``alpha`` is honoured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class LIFParameters:
    """Leaky integrate-and-fire neuron with a current synapse and a surrogate spike gradient."""

    tau_syn_inv: float
    tau_mem_inv: float
    v_leak: float
    v_th: float
    v_reset: float
    dt: float
    surrogate: str
    alpha: float


@dataclass(frozen=True)
class LIParameters:
    """Leaky integrator (non-spiking readout) with a current synapse."""

    tau_syn_inv: float
    tau_mem_inv: float
    v_leak: float
    dt: float


def _superspike(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return 1.0 / (alpha * x.abs() + 1.0).pow(2)


def _tanh(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return 1.0 - torch.tanh(alpha * x).pow(2)


def _triangle(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return alpha * torch.relu(1.0 - x.abs())


def _circ(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return alpha**3 / (alpha**2 + x.pow(2)).pow(1.5)


def _erfc(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return alpha / math.sqrt(math.pi) * torch.exp(-(alpha * x).pow(2))


def _atan(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return alpha / 2.0 / (1.0 + (math.pi / 2.0 * alpha * x).pow(2))


SURROGATE_GRADIENTS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "super": _superspike,
    "tanh": _tanh,
    "triangle": _triangle,
    "circ": _circ,
    "erfc": _erfc,
    "atan": _atan,
}
"""d spike / d x for x = v - v_th. Forward is always the Heaviside step Θ(x) (x > 0 spikes)."""


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
        return grad_output * SURROGATE_GRADIENTS[ctx.surrogate](x, ctx.alpha), None, None


def spike(x: torch.Tensor, surrogate: str, alpha: float) -> torch.Tensor:
    """Θ(x) with the named surrogate gradient of sharpness ``alpha``."""
    return _SpikeFunction.apply(x, surrogate, alpha)


def lif_step(
    current: torch.Tensor, v: torch.Tensor, i: torch.Tensor, p: LIFParameters
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Euler step of the LIF neuron; returns (spikes, v, i) after the step."""
    i = i + current
    v = v + p.dt * p.tau_mem_inv * (p.v_leak - v + i)
    i = i - p.dt * p.tau_syn_inv * i
    z = spike(v - p.v_th, p.surrogate, p.alpha)
    v = (1 - z) * v + z * p.v_reset
    return z, v, i


def lif_sequence(
    currents: torch.Tensor, p: LIFParameters, record_voltage: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run a LIF layer over a whole sequence [T, B, ...] from rest (v = v_leak, i = 0).

    Returns the spikes [T, B, ...] and, if asked, the membrane voltage after each step (post-reset).
    """
    v = torch.full_like(currents[0], p.v_leak)
    i = torch.zeros_like(currents[0])
    spikes, voltages = [], []
    for current in currents:
        z, v, i = lif_step(current, v, i, p)
        spikes.append(z)
        if record_voltage:
            voltages.append(v.detach())
    return torch.stack(spikes), torch.stack(voltages) if record_voltage else None


def li_sequence(currents: torch.Tensor, p: LIParameters) -> torch.Tensor:
    """Run a leaky integrator over [T, B, ...] from rest; returns the voltage after each step."""
    v = torch.full_like(currents[0], p.v_leak)
    i = torch.zeros_like(currents[0])
    voltages = []
    for current in currents:
        i = i + current
        v = v + p.dt * p.tau_mem_inv * (p.v_leak - v + i)
        i = i - p.dt * p.tau_syn_inv * i
        voltages.append(v)
    return torch.stack(voltages)
