"""Neuron models: LIF and leaky-integrator parameters, their Euler steps, and sequence kernels over time.

All kernels are time-major: input currents [T, B, ...] in, one output per time step out. The equations are
Norse's current-based LIF model (``lif_step``); ``lif_sequence_reference`` and ``li_sequence_reference`` loop those
steps and are the oracles every fast kernel (eager, compiled, C++, Triton) is tested against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch.nn import functional as F

from snn_train import lif_cpu
from snn_train.lif_backward import lif_backward
from snn_train.surrogates import spike


@dataclass(frozen=True)
class LIParameters:
    """Leaky integrator (the non-spiking readout) with a current synapse; rates in 1/s, times in s."""

    tau_syn_inv: float  # 1/τs, inverse synaptic time constant
    tau_mem_inv: float  # 1/τm, inverse membrane time constant
    v_leak: float  # resting voltage
    dt: float  # Euler step


@dataclass(frozen=True)
class LIFParameters:
    """Leaky integrate-and-fire neuron with a current synapse and a surrogate spike gradient (units as LIParameters)."""

    tau_syn_inv: float
    tau_mem_inv: float
    v_leak: float
    v_th: float  # spike threshold
    v_reset: float  # voltage right after a spike
    dt: float
    surrogate: str  # a name in surrogates.SURROGATES
    alpha: float  # the surrogate's sharpness


def leaky_integrate(
    v: torch.Tensor, current: torch.Tensor, dt: float, tau_mem_inv: float, v_leak: float
) -> torch.Tensor:
    """One Euler step of the membrane: v + dt·τm⁻¹·(v_leak − v + current)."""
    return v + dt * tau_mem_inv * (v_leak - v + current)


def li_step(
    current: torch.Tensor, v: torch.Tensor, i: torch.Tensor, p: LIParameters | LIFParameters
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Euler step of the leaky integrator; returns (v, i) after it.

        i ← i + I                       (the input current jumps into the synapse)
        v ← v + dt·τm⁻¹·(v_leak − v + i)
        i ← i − dt·τs⁻¹·i               (the synaptic current decays)

    Args:
        current: input current I [B, ...] of this step.
        v: membrane voltage [B, ...] before the step (v_leak at rest).
        i: synaptic current [B, ...] before the step (0 at rest).
        p: dt (s), τm⁻¹ and τs⁻¹ (1/s), v_leak.
    """
    i = i + current  # i ← i + I
    v = leaky_integrate(v, i, p.dt, p.tau_mem_inv, p.v_leak)  # v ← v + dt·τm⁻¹·(v_leak − v + i)
    i = i - p.dt * p.tau_syn_inv * i  # i ← i − dt·τs⁻¹·i
    return v, i


def lif_step(
    current: torch.Tensor, v: torch.Tensor, i: torch.Tensor, p: LIFParameters
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Euler step of the LIF neuron (Norse's ``lif_feed_forward_step``); returns (z, v, i) after it.

        i ← i + I;  v ← v + dt·τm⁻¹·(v_leak − v + i);  i ← i − dt·τs⁻¹·i     (``li_step``)
        z = Θ(v − v_th)                 (a spike, 0 or 1; its gradient is p.surrogate's)
        v ← (1 − z)·v + z·v_reset       (a spiking neuron is reset)

    Args and shapes as ``li_step``; z has the shape of ``current``.
    """
    v, i = li_step(current, v, i, p)
    z = spike(v - p.v_th, p.surrogate, p.alpha)  # z = Θ(v − v_th)
    v = (1 - z) * v + z * p.v_reset  # v ← (1 − z)·v + z·v_reset
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


def _dense_steps(x: torch.Tensor, order: list[int]) -> torch.Tensor:
    """[T, ...] with each step's dims in the given memory order and each step dense: a view where the layout allows
    (its stride over T may be anything, 0 for an input repeated over time), else a copy."""
    steps = x.permute(0, *(1 + d for d in order))
    return steps if steps[0].is_contiguous() else steps.contiguous()


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

    ``lif_step``'s arithmetic in the same order, in place, so spikes equal the reference's exactly.
    (Compiling this step measured slower here than these in-place operations.)
    """
    dt_tau_mem_inv, dt_tau_syn_inv = p.dt * p.tau_mem_inv, p.dt * p.tau_syn_inv
    v = torch.full_like(currents[0], p.v_leak)
    i = torch.zeros_like(currents[0])
    v_reset = currents[0].new_tensor(p.v_reset)
    spikes = currents[0].new_empty(len(currents), len(currents[0]))
    voltages = torch.empty_like(spikes) if record_voltage else None
    v_pre = []
    for t, current in enumerate(currents):
        i += current  # i ← i + I
        pre_reset = v + torch.neg(v).add_(p.v_leak).add_(i).mul_(dt_tau_mem_inv)  # v + dt·τm⁻¹·(v_leak − v + i)
        i -= i * dt_tau_syn_inv  # i ← i − dt·τs⁻¹·i
        spiked = pre_reset > p.v_th  # z = Θ(v − v_th)
        spikes[t] = spiked
        v = torch.where(spiked, v_reset, pre_reset)  # v ← (1 − z)·v + z·v_reset
        if keep_pre_reset:
            v_pre.append(pre_reset)
        if record_voltage:
            voltages[t] = v
    return spikes, v_pre, voltages


def _run_lif(
    currents: torch.Tensor, p: LIFParameters, record_voltage: bool, keep_pre_reset: bool
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None, list[int]]:
    """``_lif_forward`` on [T, B, ...]: spikes in the input's dtype and layout, the pre-reset voltages if kept (flat),
    the post-reset voltages if asked (in the state's precision), and the memory order used."""
    order = _memory_order(currents[0])
    spikes, v_pre, voltages = _lif_forward(
        _flatten_steps(_state_precision(currents), order), p, record_voltage, keep_pre_reset
    )
    voltages = None if voltages is None else _unflatten_steps(voltages, currents.shape, order)
    return _unflatten_steps(spikes.to(currents.dtype), currents.shape, order), v_pre, voltages, order


class _FusedLIFSequence(torch.autograd.Function):
    """All T LIF steps as one autograd node with a hand-written backward pass through time.

    Saves only the pre-reset voltages; the backward pass derives spikes and surrogate from them.
    """

    @staticmethod
    def forward(
        ctx,
        currents: torch.Tensor,
        p: LIFParameters,
        record_voltage: bool,
        compiled: bool,
        tau_mem_inv: torch.Tensor | None,
        v_th: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        p = _with_learned(p, tau_mem_inv, v_th)
        spikes, v_pre, voltages, order = _run_lif(currents, p, record_voltage, keep_pre_reset=True)
        ctx.save_for_backward(*v_pre)
        ctx.p, ctx.compiled, ctx.order, ctx.shape, ctx.dtype = p, compiled, order, currents.shape, currents.dtype
        ctx.learned = tau_mem_inv is not None or v_th is not None
        if voltages is not None:
            ctx.mark_non_differentiable(voltages)
        return spikes, voltages

    @staticmethod
    def backward(ctx, grad_spikes: torch.Tensor, _: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        v_pre = ctx.saved_tensors
        grad_steps = _flatten_steps(grad_spikes.to(v_pre[0].dtype), ctx.order)
        grad_currents, grad_tau_mem_inv, grad_v_th = lif_backward(grad_steps, v_pre, ctx.p, ctx.compiled, ctx.learned)
        grad_currents = _unflatten_steps(grad_currents.to(ctx.dtype), ctx.shape, ctx.order)
        # a learned value that was not given (None) must get None back, not a gradient
        grads = (grad_tau_mem_inv, grad_v_th)
        learned_grads = [grad if needed else None for grad, needed in zip(grads, ctx.needs_input_grad[4:])]
        return grad_currents, None, None, None, *learned_grads


def _pooling(step_shape: torch.Size, order: list[int], size: int) -> lif_cpu.Pooling | None:
    """How lif_cpu's kernels pool the last two dims (H, W) of steps [..., H, W] laid out in ``order``: None where they
    cannot (H or W not a multiple of ``size``, or H and W not next to each other in memory) or would be slower than
    max_pool2d (fewer than 8 values, one vector, per (h, w) position: channels-last pools fast, contiguous does not)."""
    h, w = len(step_shape) - 2, len(step_shape) - 1
    if size == 1:
        return lif_cpu.NO_POOLING
    if step_shape[h] % size or step_shape[w] % size or order.index(w) != order.index(h) + 1:
        return None
    inner = math.prod(step_shape[d] for d in order[order.index(w) + 1 :])
    return lif_cpu.Pooling(size, step_shape[w], inner) if inner >= 8 else None


def _pooled_shape(shape: torch.Size, size: int) -> torch.Size:
    """[T, ..., H, W] after size×size pooling: [T, ..., H/size, W/size]."""
    return torch.Size([*shape[:-2], shape[-2] // size, shape[-1] // size]) if size > 1 else shape


def _run_lif_cpu(
    currents: torch.Tensor,
    p: LIFParameters,
    record_voltage: bool,
    pool: int,
    order: list[int],
    count: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """lif_cpu's forward kernel on [T, B, ...] laid out in ``order``: the spikes (max-pooled over pool×pool windows of
    the last two dims, where ``_pooling`` allows) in the input's dtype and layout, and the post-reset voltages if asked
    (in the state's precision); the number of spikes added to ``count``, if given."""
    pooling = _pooling(currents.shape[1:], order, pool)
    spikes, voltages = lif_cpu.forward(_dense_steps(currents, order), p, record_voltage, pooling, count)
    voltages = None if voltages is None else _unflatten_steps(voltages, currents.shape, order)
    return _unflatten_steps(spikes, _pooled_shape(currents.shape, pool), order), voltages


class _CPULIFSequence(torch.autograd.Function):
    """All T LIF steps of CPU currents (and the max-pooling after them, if any) as lif_cpu's two kernels, one pass over
    memory each.

    Takes currents [T, B, ...], or with ``seq_length`` the step [B, ...] repeated at every one of that many time steps,
    whose gradient, the sum over the steps, the backward kernel then makes itself. Saves only the currents: the backward
    kernel recomputes the voltages (and spikes) from them, so a repeated step keeps one step's worth of memory for
    backward, and a bfloat16 input two bytes per value.
    """

    @staticmethod
    def forward(
        ctx,
        currents: torch.Tensor,
        seq_length: int | None,
        p: LIFParameters,
        record_voltage: bool,
        pool: int,
        tau_mem_inv: torch.Tensor | None,
        v_th: torch.Tensor | None,
        count: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        p = _with_learned(p, tau_mem_inv, v_th)
        steps = currents if seq_length is None else currents.expand(seq_length, *currents.shape)
        order = _memory_order(steps[0])
        spikes, voltages = _run_lif_cpu(steps, p, record_voltage, pool, order, count)
        ctx.save_for_backward(currents)
        ctx.seq_length, ctx.p, ctx.pool, ctx.order = seq_length, p, pool, order
        ctx.learned = tau_mem_inv is not None or v_th is not None
        ctx.learned_dtype = next((value.dtype for value in (tau_mem_inv, v_th) if value is not None), None)
        if voltages is not None:
            ctx.mark_non_differentiable(voltages)
        return spikes, voltages

    @staticmethod
    def backward(ctx, grad_spikes: torch.Tensor, _: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        (currents,) = ctx.saved_tensors
        repeated = ctx.seq_length is not None
        steps = currents.expand(ctx.seq_length, *currents.shape) if repeated else currents
        grad_steps = _dense_steps(grad_spikes.to(currents.dtype), ctx.order)
        pooling = _pooling(steps.shape[1:], ctx.order, ctx.pool)
        grad_currents, grad_a, grad_v_th = lif_cpu.backward(
            _dense_steps(steps, ctx.order), grad_steps, ctx.p, ctx.learned, pooling, sum_over_time=repeated
        )
        if repeated:  # one step, summed over time
            grad_currents = _unflatten_steps(grad_currents[None], torch.Size([1, *currents.shape]), ctx.order)[0]
        else:
            grad_currents = _unflatten_steps(grad_currents, currents.shape, ctx.order)
        # d loss / d τm⁻¹ = dt · d loss / d(dt·τm⁻¹); a learned value that was not given (None) gets None back
        grads = [torch.tensor(value, dtype=ctx.learned_dtype) for value in (grad_a * ctx.p.dt, grad_v_th)]
        learned_grads = [grad if needed else None for grad, needed in zip(grads, ctx.needs_input_grad[5:7])]
        return grad_currents, None, None, None, None, *learned_grads, None


def _repeated_step(currents: torch.Tensor) -> torch.Tensor | None:
    """The step [B, ...] that ``currents`` [T, B, ...] repeats at every time step when it is an expanded view of it
    (as the direct encoder's input convolved once gives): the layer then takes that step, and its gradient as one sum
    over time made in the backward kernel rather than [T, B, ...] summed by expand's backward. None for anything else:
    another layout, a leaf, a view of a larger tensor."""
    step = currents._base
    if currents.stride(0) != 0 or currents.grad_fn is None or step is None or not step.requires_grad:
        return None
    same = step.shape == currents.shape[1:] and step.stride() == currents.stride()[1:]
    return step if same and step.data_ptr() == currents.data_ptr() else None


def _with_learned(p: LIFParameters, tau_mem_inv: torch.Tensor | None, v_th: torch.Tensor | None) -> LIFParameters:
    """``p`` with the current values of learned parameters (0-dim tensors) in place of its own."""
    if tau_mem_inv is not None:
        p = replace(p, tau_mem_inv=float(tau_mem_inv))
    if v_th is not None:
        p = replace(p, v_th=float(v_th))
    return p


def _needs_graph(currents: torch.Tensor, tau_mem_inv: torch.Tensor | None, v_th: torch.Tensor | None) -> bool:
    """Whether autograd records the layer: it is enabled and the currents or a learned value need gradients."""
    learned = [value for value in (tau_mem_inv, v_th) if value is not None]
    return torch.is_grad_enabled() and any(x.requires_grad for x in [currents, *learned])


def lif_sequence(
    currents: torch.Tensor,
    p: LIFParameters,
    record_voltage: bool = False,
    compiled: bool = False,
    tau_mem_inv: torch.Tensor | None = None,
    v_th: torch.Tensor | None = None,
    pool: int = 1,
    count: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run a LIF layer over a whole sequence [T, B, ...] from rest (v = v_leak, i = 0), fused.

    Returns the spikes [T, B, ...] in the input's dtype and layout and, if asked, the membrane voltage
    after each step (post-reset, in the state's precision). Without autograd nothing is kept for backward.
    ``compiled`` runs CPU currents through lif_cpu's C++ kernels (where ``lif_cpu.runs``), and elsewhere each backward
    step as code generated by torch.compile. ``tau_mem_inv`` and ``v_th``, 0-dim tensors (learned parameters, PLIF
    style), replace ``p``'s values and receive gradients. ``pool`` > 1 max-pools the spikes of [T, B, C, H, W] over
    pool×pool windows of (H, W) at every step (``max_pool_over_time``): inside lif_cpu's kernels where they can
    (``_pooling``), so the full spikes are never stored (the voltages stay unpooled). ``count``, a float64 scalar, gets
    the number of spikes (before pooling) added: inside lif_cpu's kernels as they make them, else by ``spike_count``.
    """
    if compiled and lif_cpu.runs(currents, p.surrogate):
        if _pooling(currents.shape[1:], _memory_order(currents[0]), pool) is not None:
            return _lif_cpu(currents, p, record_voltage, pool, tau_mem_inv, v_th, count)
        spikes, voltages = _lif_cpu(currents, p, record_voltage, 1, tau_mem_inv, v_th, count)
        return max_pool_over_time(spikes, pool), voltages
    if _needs_graph(currents, tau_mem_inv, v_th):
        spikes, voltages = _FusedLIFSequence.apply(currents, p, record_voltage, compiled, tau_mem_inv, v_th)
    else:
        p = _with_learned(p, tau_mem_inv, v_th)
        spikes, _, voltages, _ = _run_lif(currents, p, record_voltage, keep_pre_reset=False)
    return counted_and_pooled(spikes, pool, count), voltages


def _lif_cpu(
    currents: torch.Tensor,
    p: LIFParameters,
    record_voltage: bool,
    pool: int,
    tau_mem_inv: torch.Tensor | None,
    v_th: torch.Tensor | None,
    count: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """lif_cpu's kernels: through autograd where gradients are needed, else the forward kernel alone."""
    if _needs_graph(currents, tau_mem_inv, v_th):
        step = _repeated_step(currents)
        if step is not None:
            return _CPULIFSequence.apply(step, len(currents), p, record_voltage, pool, tau_mem_inv, v_th, count)
        return _CPULIFSequence.apply(currents, None, p, record_voltage, pool, tau_mem_inv, v_th, count)
    p = _with_learned(p, tau_mem_inv, v_th)
    return _run_lif_cpu(currents, p, record_voltage, pool, _memory_order(currents[0]), count)


def spike_count(spikes: torch.Tensor) -> torch.Tensor:
    """The number of spikes (each 0 or 1) in [T, B, ...], as a float64 scalar: each sample's spikes at each step summed
    in float32, then those sums in float64. Exact for layers of fewer than 2²⁴ neurons (a float32 sum of 0s and 1s is
    exact up to 2²⁴); on float32 spikes several times as fast as count_nonzero."""
    return spikes.sum(dim=tuple(range(2, spikes.dim())), dtype=torch.float32).sum(dtype=torch.float64)


def counted_and_pooled(spikes: torch.Tensor, pool: int, count: torch.Tensor | None) -> torch.Tensor:
    """A kernel's full spikes max-pooled (``max_pool_over_time``), their number added to ``count`` first, if given."""
    if count is not None:
        count += spike_count(spikes.detach())
    return max_pool_over_time(spikes, pool)


def max_pool_over_time(spikes: torch.Tensor, size: int) -> torch.Tensor:
    """size×size max-pooling (stride size) of the last two dims of [T, B, C, H, W], at every step (none for size 1)."""
    if size == 1:
        return spikes
    return F.max_pool2d(spikes.flatten(0, 1), size).unflatten(0, spikes.shape[:2])


def lif_sequence_reference(
    currents: torch.Tensor,
    p: LIFParameters,
    record_voltage: bool = False,
    tau_mem_inv: torch.Tensor | None = None,
    v_th: torch.Tensor | None = None,
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
    """Voltage above v_leak at steps 0..T-1 after a unit current at step 0 (float64): ``li_step`` from rest at 0."""
    at_zero = replace(p, v_leak=0.0)
    v, i, response = 0.0, 0.0, []
    for t in range(seq_length):
        v, i = li_step(1.0 if t == 0 else 0.0, v, i, at_zero)
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
    """li_sequence as a plain loop of li_step under autograd: the oracle for the matrix form."""
    v = torch.full_like(currents[0], p.v_leak)
    i = torch.zeros_like(currents[0])
    voltages = []
    for current in currents:
        v, i = li_step(current, v, i, p)
        voltages.append(v)
    return torch.stack(voltages)
