"""Neuron models: LIF and leaky-integrator parameters, surrogate spike functions, sequence kernels.

All kernels are time-major: input currents [T, B, ...] in, one output per time step out.
The equations follow Norse's current LIF model; every surrogate's ``alpha`` is honoured.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
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


def _state_precision(currents: torch.Tensor) -> torch.Tensor:
    """Neuron state is kept in float32 (or float64) even when currents come in bfloat16 or float16."""
    return currents if currents.dtype in (torch.float32, torch.float64) else currents.float()


def _memory_order(step: torch.Tensor) -> list[int]:
    """The dims of one step [B, ...] from the largest stride to the smallest: permuted so, it is dense.

    The kernels work on flat per-step vectors in memory order, so any layout (contiguous, channels-last,
    repeated over time) runs at full speed and the outputs keep the input's layout.
    """
    return sorted(range(step.dim()), key=lambda d: -step.stride(d))


def _flatten_steps(x: torch.Tensor, order: list[int]) -> list[torch.Tensor]:
    """[T, ...] as T flat vectors in the given memory order (views where the layout allows)."""
    return [step.permute(order).reshape(-1) for step in x.unbind(0)]


def _unflatten_steps(flat: torch.Tensor, shape: torch.Size, order: list[int]) -> torch.Tensor:
    """Flat [T, N] back to ``shape`` [T, ...], laid out in ``order``."""
    step_shape = [shape[1 + d] for d in order]
    inverse = sorted(range(len(order)), key=lambda d: order[d])
    return flat.view(flat.shape[0], *step_shape).permute(0, *(1 + d for d in inverse))


def _lif_forward(
    currents: list[torch.Tensor], p: LIFParameters, record_voltage: bool, keep_pre_reset: bool
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
    """Spikes [T, N], the pre-reset voltage of each step if kept (for backward) and, if asked, the
    post-reset voltages [T, N].

    Repeats lif_step's arithmetic in the same order, in place, so spikes equal the reference's exactly.
    (Compiling this step measured slower here than these in-place operations.)
    """
    a, b = p.dt * p.tau_mem_inv, p.dt * p.tau_syn_inv
    v = torch.full_like(currents[0], p.v_leak)
    i = torch.zeros_like(currents[0])
    v_reset = currents[0].new_tensor(p.v_reset)
    spikes = currents[0].new_empty(len(currents), len(currents[0]))
    voltages = torch.empty_like(spikes) if record_voltage else None
    v_pre = []
    for t, current in enumerate(currents):
        i += current
        dv = torch.neg(v).add_(p.v_leak).add_(i).mul_(a)
        pre_reset = v + dv
        i -= i * b
        spiked = pre_reset > p.v_th
        spikes[t] = spiked
        v = torch.where(spiked, v_reset, pre_reset)
        if keep_pre_reset:
            v_pre.append(pre_reset)
        if record_voltage:
            voltages[t] = v
    return spikes, v_pre, voltages


@functools.cache
def _compiled(step: Callable[..., tuple[torch.Tensor, ...]]) -> Callable[..., tuple[torch.Tensor, ...]]:
    """A step function as one generated loop (C++ on CPU, Triton on GPU); compiled on first use, cached on disk."""
    return torch.compile(step, dynamic=True)


def _backward_step(
    surrogate: str, grad_spike: torch.Tensor, grad_v: torch.Tensor, grad_i: torch.Tensor, v_pre: torch.Tensor,
    a: torch.Tensor, b: torch.Tensor, v_th: torch.Tensor, v_reset: torch.Tensor, alpha: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LIF step backward: the gradients of this step's input current (= of i_in) and of the voltage before it."""
    x = v_pre - v_th
    # v_post = (1 - z)·v_pre + z·v_reset, where z = Θ(v_pre - v_th) carries the surrogate gradient
    grad_z = grad_spike + grad_v * (v_reset - v_pre)
    grad_v_pre = grad_v * (x <= 0) + grad_z * SURROGATE_GRADIENTS[surrogate](x, alpha)
    # i_post = (1 - b)·i_in and v_pre = v + a·(v_leak - v + i_in), where i_in = i + current
    grad_i = grad_i * (1 - b) + a * grad_v_pre
    return grad_i, grad_v_pre * (1 - a)


def _learned_backward_step(
    surrogate: str, grad_spike: torch.Tensor, grad_v: torch.Tensor, grad_i: torch.Tensor, v_pre: torch.Tensor,
    v_before: torch.Tensor, a: torch.Tensor, b: torch.Tensor, v_th: torch.Tensor, v_reset: torch.Tensor, alpha: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """_backward_step, plus this step's share of the gradients of a = dt·tau_mem_inv and of v_th.

    v_pre = v_before + a·(v_leak - v_before + i_in), so d v_pre / d a = (v_pre - v_before) / a; z = Θ(v_pre - v_th).
    """
    x = v_pre - v_th
    grad_z = grad_spike + grad_v * (v_reset - v_pre)
    grad_x = grad_z * SURROGATE_GRADIENTS[surrogate](x, alpha)
    grad_v_pre = grad_v * (x <= 0) + grad_x
    grad_a = (grad_v_pre * (v_pre - v_before)).sum() / a
    grad_i = grad_i * (1 - b) + a * grad_v_pre
    return grad_i, grad_v_pre * (1 - a), grad_a, -grad_x.sum()


def _lif_backward(
    grad_spikes: list[torch.Tensor], v_pre: list[torch.Tensor], p: LIFParameters, compiled: bool, learned: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradient of the currents [T, N] from that of the spikes, backward through time; with ``learned``, also
    those of tau_mem_inv and v_th (0-dim), else None."""
    # 0-dim tensors, not Python floats: a compiled step then takes new values without recompiling
    scalars = (p.dt * p.tau_mem_inv, p.dt * p.tau_syn_inv, p.v_th, p.v_reset, p.alpha)
    constants = [v_pre[0].new_tensor(value) for value in scalars]
    grad_currents = v_pre[0].new_empty(len(v_pre), len(v_pre[0]))
    grad_v = torch.zeros_like(v_pre[0])
    grad_i = torch.zeros_like(v_pre[0])
    if not learned:
        step = _compiled(_backward_step) if compiled else _backward_step
        for t in reversed(range(len(v_pre))):
            grad_i, grad_v = step(p.surrogate, grad_spikes[t], grad_v, grad_i, v_pre[t], *constants)
            grad_currents[t] = grad_i
        return grad_currents, None, None
    learned_step = _compiled(_learned_backward_step) if compiled else _learned_backward_step
    grad_a, grad_v_th = torch.zeros_like(constants[0]), torch.zeros_like(constants[0])
    for t in reversed(range(len(v_pre))):
        v_before = torch.where(v_pre[t - 1] > p.v_th, p.v_reset, v_pre[t - 1]) if t else torch.full_like(v_pre[0], p.v_leak)
        grad_i, grad_v, step_a, step_v_th = learned_step(p.surrogate, grad_spikes[t], grad_v, grad_i, v_pre[t], v_before, *constants)
        grad_currents[t] = grad_i
        grad_a += step_a
        grad_v_th += step_v_th
    return grad_currents, grad_a * p.dt, grad_v_th


class _FusedLIFSequence(torch.autograd.Function):
    """All T LIF steps as one autograd node with a hand-written backward pass through time.

    Saves only the pre-reset voltages; the backward pass derives spikes and surrogate from them.
    """

    @staticmethod
    def forward(
        ctx, currents: torch.Tensor, p: LIFParameters, record_voltage: bool, compiled: bool,
        tau_mem_inv: torch.Tensor | None, v_th: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        p = _with_learned(p, tau_mem_inv, v_th)
        order = _memory_order(currents[0])
        steps = _flatten_steps(_state_precision(currents), order)
        spikes, v_pre, voltages = _lif_forward(steps, p, record_voltage, keep_pre_reset=True)
        ctx.save_for_backward(*v_pre)
        ctx.p, ctx.compiled, ctx.order, ctx.shape, ctx.dtype = p, compiled, order, currents.shape, currents.dtype
        ctx.learned = tau_mem_inv is not None or v_th is not None
        if voltages is not None:
            voltages = _unflatten_steps(voltages, currents.shape, order)
            ctx.mark_non_differentiable(voltages)
        return _unflatten_steps(spikes.to(currents.dtype), currents.shape, order), voltages

    @staticmethod
    def backward(ctx, grad_spikes: torch.Tensor, _: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        v_pre = ctx.saved_tensors
        grad_steps = _flatten_steps(grad_spikes.to(v_pre[0].dtype), ctx.order)
        grad_currents, grad_tau_mem_inv, grad_v_th = _lif_backward(grad_steps, v_pre, ctx.p, ctx.compiled, ctx.learned)
        grad_currents = _unflatten_steps(grad_currents.to(ctx.dtype), ctx.shape, ctx.order)
        # a learned value that was not given (None) must get None back, not a gradient
        learned_grads = [grad if needed else None for grad, needed in zip((grad_tau_mem_inv, grad_v_th), ctx.needs_input_grad[4:])]
        return grad_currents, None, None, None, *learned_grads


def _with_learned(p: LIFParameters, tau_mem_inv: torch.Tensor | None, v_th: torch.Tensor | None) -> LIFParameters:
    """``p`` with the current values of learned parameters (0-dim tensors) in place of its own."""
    if tau_mem_inv is not None:
        p = replace(p, tau_mem_inv=float(tau_mem_inv))
    if v_th is not None:
        p = replace(p, v_th=float(v_th))
    return p


def lif_sequence(
    currents: torch.Tensor, p: LIFParameters, record_voltage: bool = False, compiled: bool = False,
    tau_mem_inv: torch.Tensor | None = None, v_th: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run a LIF layer over a whole sequence [T, B, ...] from rest (v = v_leak, i = 0), fused.

    Returns the spikes [T, B, ...] in the input's dtype and layout and, if asked, the membrane voltage
    after each step (post-reset, in the state's precision). Without autograd nothing is kept for backward;
    ``compiled`` runs each backward step as code generated by torch.compile. ``tau_mem_inv`` and ``v_th``, 0-dim
    tensors (learned parameters, PLIF style), replace ``p``'s values and receive gradients.
    """
    learned = [value for value in (tau_mem_inv, v_th) if value is not None]
    if torch.is_grad_enabled() and any(x.requires_grad for x in [currents, *learned]):
        return _FusedLIFSequence.apply(currents, p, record_voltage, compiled, tau_mem_inv, v_th)
    p = _with_learned(p, tau_mem_inv, v_th)
    order = _memory_order(currents[0])
    steps = _flatten_steps(_state_precision(currents), order)
    spikes, _, voltages = _lif_forward(steps, p, record_voltage, keep_pre_reset=False)
    voltages = None if voltages is None else _unflatten_steps(voltages, currents.shape, order)
    return _unflatten_steps(spikes.to(currents.dtype), currents.shape, order), voltages


def lif_sequence_reference(
    currents: torch.Tensor, p: LIFParameters, record_voltage: bool = False,
    tau_mem_inv: torch.Tensor | None = None, v_th: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """lif_sequence as a plain loop of lif_step under autograd: the oracle for the fused kernel."""
    if tau_mem_inv is not None:
        p = replace(p, tau_mem_inv=tau_mem_inv)
    if v_th is not None:
        p = replace(p, v_th=v_th)
    v = torch.full_like(currents[0], p.v_leak)
    i = torch.zeros_like(currents[0])
    spikes, voltages = [], []
    for current in currents:
        z, v, i = lif_step(current, v, i, p)
        spikes.append(z)
        if record_voltage:
            voltages.append(v.detach())
    return torch.stack(spikes), torch.stack(voltages) if record_voltage else None


def li_impulse_response(seq_length: int, p: LIParameters) -> torch.Tensor:
    """Voltage above v_leak at steps 0..T-1 after a unit current at step 0 (float64)."""
    a, b = p.dt * p.tau_mem_inv, p.dt * p.tau_syn_inv
    v, i, response = 0.0, 1.0, []
    for _ in range(seq_length):
        v = v + a * (i - v)
        i = i - b * i
        response.append(v)
    return torch.tensor(response, dtype=torch.float64)


def li_sequence(currents: torch.Tensor, p: LIParameters) -> torch.Tensor:
    """Run a leaky integrator over [T, B, ...] from rest; returns the voltage after each step.

    The integrator is linear, so all T steps are one product with its T×T causal impulse-response matrix.
    """
    T = len(currents)
    lag = torch.arange(T).unsqueeze(1) - torch.arange(T).unsqueeze(0)
    response = li_impulse_response(T, p)[lag.clamp(min=0)] * (lag >= 0)
    currents = _state_precision(currents)
    response = response.to(device=currents.device, dtype=currents.dtype)
    with torch.autocast(currents.device.type, enabled=False):
        return p.v_leak + (response @ currents.flatten(1)).view(currents.shape)


def li_sequence_reference(currents: torch.Tensor, p: LIParameters) -> torch.Tensor:
    """li_sequence as a plain step loop under autograd: the oracle for the matrix form."""
    v = torch.full_like(currents[0], p.v_leak)
    i = torch.zeros_like(currents[0])
    voltages = []
    for current in currents:
        i = i + current
        v = v + p.dt * p.tau_mem_inv * (p.v_leak - v + i)
        i = i - p.dt * p.tau_syn_inv * i
        voltages.append(v)
    return torch.stack(voltages)
