"""The LIF layer as two Triton kernels: all T forward steps in one launch, the backward pass through time in another.

The GPU counterpart of ``neurons.lif_sequence`` (the same inputs, outputs and arithmetic): where the torch kernel runs a
few tensor operations per time step, each program here walks one block of neurons through all T steps, keeping v and i
in registers. Triton's interpreter (``TRITON_INTERPRET=1`` before this module is imported) runs the same kernels on
CPU tensors, which is how the tests check them without a GPU.

One step, as in ``neurons.lif_step`` (Norse's equations)::

    i ← i + I
    v ← v + dt·τm⁻¹·(v_leak − v + i)        (v_pre, the pre-reset voltage kept for backward)
    i ← i − dt·τs⁻¹·i
    z = Θ(v − v_th)
    v ← (1 − z)·v + z·v_reset
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
import triton
import triton.language as tl

from snn_train.neurons import LIFParameters, _memory_order, _unflatten_steps

# Neurons per program: each program keeps its block's state in registers for all T steps. The interpreter runs a
# program at a time in Python, so there fewer, larger blocks are faster.
BLOCK = 16384 if triton.knobs.runtime.interpret else 512
WARPS = 4
# The surrogates _surrogate writes out (surrogates.SURROGATES' names; a test keeps the two lists equal)
SURROGATES = ("super", "tanh", "triangle", "circ", "erfc", "atan")


@triton.jit
def _surrogate(x, alpha, SURROGATE: tl.constexpr):
    """dz/dx for x = v − v_th: the functions of surrogates.SURROGATES, written out."""
    if SURROGATE == "super":
        d = alpha * tl.abs(x) + 1.0
        grad = 1.0 / (d * d)
    elif SURROGATE == "tanh":
        # 1 - tanh²(αx) = 4e/(1 + e)² with e = exp(-2|αx|), which cannot overflow
        e = tl.exp(-2.0 * tl.abs(alpha * x))
        grad = 4.0 * e / ((1.0 + e) * (1.0 + e))
    elif SURROGATE == "triangle":
        grad = alpha * tl.maximum(1.0 - tl.abs(x), 0.0)
    elif SURROGATE == "circ":
        s = alpha * alpha + x * x
        grad = alpha * alpha * alpha / (s * tl.sqrt(s))
    elif SURROGATE == "erfc":
        grad = alpha * 0.5641895835477563 * tl.exp(-(alpha * x) * (alpha * x))  # α/√π·exp(-α²x²)
    else:  # atan (lif_sequence_triton refuses a name not in SURROGATES)
        y = 1.5707963267948966 * alpha * x  # π/2·αx
        grad = alpha * 0.5 / (1.0 + y * y)
    return grad


@triton.jit
def _rounded(x, dtype: tl.constexpr):
    """float32 ``x`` in ``dtype``, rounded to nearest (ties to even) as torch rounds. For bfloat16 the rounding is
    spelled out: Triton's interpreter truncates instead."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return tl.where(x == x, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), x.to(tl.bfloat16))  # NaN stays NaN
    return x.to(dtype)


@triton.jit
def _forward_kernel(
    currents,
    spikes,
    voltages,
    v_pre,
    tau_mem_inv,
    v_th_learned,
    n,
    steps,
    current_stride,
    dt_tau_mem_inv,
    dt_tau_syn_inv,
    v_leak,
    v_th,
    v_reset,
    dt,
    RECORD: tl.constexpr,
    SAVE: tl.constexpr,
    LEARN_TAU: tl.constexpr,
    LEARN_TH: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """T steps of ``n`` neurons from rest: spikes [T, n] (the currents' dtype), post-reset voltages [T, n] if RECORD,
    pre-reset voltages [T, n] if SAVE. Step t's currents start at ``currents + t·current_stride`` (0: one step for
    all)."""
    offsets = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)  # T·n may pass 2³¹
    inside = offsets < n
    if LEARN_TAU:
        dt_tau_mem_inv = dt * tl.load(tau_mem_inv).to(tl.float32)
    if LEARN_TH:
        v_th = tl.load(v_th_learned).to(tl.float32)
    v = tl.zeros([BLOCK], dtype=tl.float32) + v_leak
    i = tl.zeros([BLOCK], dtype=tl.float32)
    current_at, out_at = currents + offsets, offsets
    for _ in range(steps):
        i = i + tl.load(current_at, mask=inside, other=0.0).to(tl.float32)  # i ← i + I
        pre = v + (v_leak - v + i) * dt_tau_mem_inv  # v ← v + dt·τm⁻¹·(v_leak − v + i), rounded as lif_step's
        i = i - i * dt_tau_syn_inv  # i ← i − dt·τs⁻¹·i
        spiked = pre - v_th > 0  # z = Θ(v − v_th)
        v = tl.where(spiked, v_reset, pre)  # v ← (1 − z)·v + z·v_reset
        # (via float32: the interpreter cannot turn booleans into bfloat16 directly)
        tl.store(spikes + out_at, spiked.to(tl.float32).to(spikes.dtype.element_ty), mask=inside)
        if RECORD:
            tl.store(voltages + out_at, v, mask=inside)
        if SAVE:
            tl.store(v_pre + out_at, pre, mask=inside)
        current_at += current_stride
        out_at += n


@triton.jit
def _backward_kernel(
    grad_spikes,
    v_pre,
    grad_currents,
    partial_sums,
    tau_mem_inv,
    v_th_learned,
    n,
    steps,
    grad_stride,
    dt_tau_mem_inv,
    dt_tau_syn_inv,
    v_leak,
    v_th,
    v_reset,
    dt,
    alpha,
    SURROGATE: tl.constexpr,
    LEARN_TAU: tl.constexpr,
    LEARN_TH: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Backward through time from step T-1 to 0: the gradient of the currents [T, n] (their dtype) from that of the
    spikes. With a learned τm⁻¹ or v_th, this program's share of their gradients goes to partial_sums[0 or 1,
    program]."""
    program = tl.program_id(0)
    offsets = (program * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)  # T·n may pass 2³¹
    inside = offsets < n
    if LEARN_TAU:
        dt_tau_mem_inv = dt * tl.load(tau_mem_inv).to(tl.float32)
    if LEARN_TH:
        v_th = tl.load(v_th_learned).to(tl.float32)
    grad_v = tl.zeros([BLOCK], dtype=tl.float32)
    grad_i = tl.zeros([BLOCK], dtype=tl.float32)
    sum_tau = tl.zeros([BLOCK], dtype=tl.float32)
    sum_th = tl.zeros([BLOCK], dtype=tl.float32)
    last = offsets * 0 + (steps - 1)  # in 64 bits (steps may be the constant 1 on a GPU)
    grad_at = grad_spikes + offsets + last * grad_stride
    state_at = offsets + last * n
    for back in range(steps):
        pre = tl.load(v_pre + state_at, mask=inside, other=0.0)
        x = pre - v_th
        # v_post = (1 - z)·v_pre + z·v_reset, where z = Θ(v_pre - v_th) carries the surrogate gradient
        grad_z = tl.load(grad_at, mask=inside, other=0.0).to(tl.float32) + grad_v * (v_reset - pre)
        grad_x = grad_z * _surrogate(x, alpha, SURROGATE)
        grad_v_pre = tl.where(x <= 0, grad_v, 0.0) + grad_x
        # i_post = (1 - dt·τs⁻¹)·i_in and v_pre = v + dt·τm⁻¹·(v_leak - v + i_in), where i_in = i + current
        grad_i = grad_i * (1 - dt_tau_syn_inv) + dt_tau_mem_inv * grad_v_pre
        tl.store(grad_currents + state_at, _rounded(grad_i, grad_currents.dtype.element_ty), mask=inside)
        grad_v = grad_v_pre * (1 - dt_tau_mem_inv)
        if LEARN_TAU:
            # d v_pre / d(dt·τm⁻¹) = v_leak - v_before + i_in = (v_pre - v_before) / (dt·τm⁻¹);
            # v_before is v_leak at t = 0
            first = back == steps - 1
            earlier = tl.load(v_pre + state_at - n, mask=inside & (back < steps - 1), other=0.0)
            v_before = tl.where(earlier - v_th > 0, v_reset, earlier)
            v_before = tl.where(first, v_leak, v_before)
            sum_tau += tl.where(inside, grad_v_pre * (pre - v_before), 0.0)
        if LEARN_TH:
            sum_th += tl.where(inside, grad_x, 0.0)
        grad_at -= grad_stride
        state_at -= n
    if LEARN_TAU:
        tl.store(partial_sums + program, tl.sum(sum_tau, axis=0) / dt_tau_mem_inv * dt)  # d/dτm⁻¹ = dt·d/d(dt·τm⁻¹)
    if LEARN_TH:
        tl.store(partial_sums + tl.num_programs(0) + program, -tl.sum(sum_th, axis=0))


def _dense_steps(x: torch.Tensor, order: list[int]) -> torch.Tensor:
    """``x`` [T, ...] if each step is dense in ``order`` (any time stride, 0 included), else a copy that is."""
    if x[0].permute(order).is_contiguous():
        return x
    return x.permute(0, *(1 + d for d in order)).contiguous().permute(0, *(1 + d for d in _inverse(order)))


def _inverse(order: list[int]) -> list[int]:
    return sorted(range(len(order)), key=lambda d: order[d])


def _scalars(p: LIFParameters) -> tuple[float, ...]:
    """(dt·τm⁻¹, dt·τs⁻¹, v_leak, v_th, v_reset, dt) as the kernels take them, the products in double precision as
    lif_step computes them (the kernels round each to float32, as torch rounds a Python number for a float32 tensor)."""
    return (
        float(p.dt * p.tau_mem_inv),
        float(p.dt * p.tau_syn_inv),
        float(p.v_leak),
        float(p.v_th),
        float(p.v_reset),
        float(p.dt),
    )


def _grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, BLOCK),)


def _on(device: torch.device) -> AbstractContextManager:
    """Launches go to the current GPU: make it the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def _forward(
    currents: torch.Tensor,
    p: LIFParameters,
    record_voltage: bool,
    save: bool,
    tau_mem_inv: torch.Tensor | None,
    v_th: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, list[int]]:
    """Spikes [T, N] and, if asked, post-reset voltages [T, N] and pre-reset voltages [T, N] (float32), flat in the
    memory order of a step of ``currents`` (returned too)."""
    order = _memory_order(currents[0])
    currents = _dense_steps(currents, order)
    steps, n = len(currents), currents[0].numel()
    spikes = currents.new_empty(steps, n)
    voltages = currents.new_empty(steps, n, dtype=torch.float32) if record_voltage else None
    v_pre = currents.new_empty(steps, n, dtype=torch.float32) if save else None
    with _on(currents.device):
        _forward_kernel[_grid(n)](
            currents,
            spikes,
            voltages,
            v_pre,
            tau_mem_inv,
            v_th,
            n,
            steps,
            currents.stride(0),
            *_scalars(p),
            RECORD=record_voltage,
            SAVE=save,
            LEARN_TAU=tau_mem_inv is not None,
            LEARN_TH=v_th is not None,
            BLOCK=BLOCK,
            num_warps=WARPS,
            enable_fp_fusion=False,  # no fused multiply-add: spikes round as lif_step's do
        )
    return spikes, voltages, v_pre, order


class _TritonLIFSequence(torch.autograd.Function):
    """All T LIF steps as one autograd node: one forward launch, one backward launch (and, with learned values, one
    sum of the programs' partial sums)."""

    @staticmethod
    def forward(
        ctx,
        currents: torch.Tensor,
        p: LIFParameters,
        record_voltage: bool,
        tau_mem_inv: torch.Tensor | None,
        v_th: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        spikes, voltages, v_pre, order = _forward(currents, p, record_voltage, True, tau_mem_inv, v_th)
        ctx.save_for_backward(v_pre, tau_mem_inv, v_th)
        ctx.p, ctx.order, ctx.shape, ctx.dtype = p, order, currents.shape, currents.dtype
        if voltages is not None:
            voltages = _unflatten_steps(voltages, currents.shape, order)
            ctx.mark_non_differentiable(voltages)
        return _unflatten_steps(spikes, currents.shape, order), voltages

    @staticmethod
    def backward(ctx, grad_spikes: torch.Tensor, _: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        v_pre, tau_mem_inv, v_th = ctx.saved_tensors
        p, (steps, n) = ctx.p, v_pre.shape
        grad_spikes = _dense_steps(grad_spikes, ctx.order)
        grad_currents = v_pre.new_empty(steps, n, dtype=ctx.dtype)
        learned = tau_mem_inv is not None or v_th is not None
        partial_sums = v_pre.new_empty(2, _grid(n)[0]) if learned else None
        with _on(v_pre.device):
            _backward_kernel[_grid(n)](
                grad_spikes,
                v_pre,
                grad_currents,
                partial_sums,
                tau_mem_inv,
                v_th,
                n,
                steps,
                grad_spikes.stride(0),
                *_scalars(p),
                float(p.alpha),
                SURROGATE=p.surrogate,
                LEARN_TAU=tau_mem_inv is not None,
                LEARN_TH=v_th is not None,
                BLOCK=BLOCK,
                num_warps=WARPS,
            )
        grad_tau_mem_inv = grad_v_th = None
        if learned:
            sums = partial_sums.sum(1)
            grad_tau_mem_inv = sums[0] if ctx.needs_input_grad[3] else None
            grad_v_th = sums[1] if ctx.needs_input_grad[4] else None
        return _unflatten_steps(grad_currents, ctx.shape, ctx.order), None, None, grad_tau_mem_inv, grad_v_th


def lif_sequence_triton(
    currents: torch.Tensor,
    p: LIFParameters,
    record_voltage: bool = False,
    tau_mem_inv: torch.Tensor | None = None,
    v_th: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``neurons.lif_sequence`` in two Triton kernels: spikes [T, B, ...] in the input's dtype and layout and, if asked,
    the post-reset voltages (float32); the state is float32 for float32, bfloat16 and float16 currents. ``tau_mem_inv``
    and ``v_th``, 0-dim float32 tensors (learned parameters), replace ``p``'s values and receive gradients."""
    if p.surrogate not in SURROGATES:
        raise ValueError(f"the Triton LIF kernels have no surrogate {p.surrogate!r}; model.kernel=torch has them all")
    if currents.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"the Triton LIF kernels take float32, bfloat16 or float16 currents, not {currents.dtype}")
    learned = [value for value in (tau_mem_inv, v_th) if value is not None]
    if torch.is_grad_enabled() and any(x.requires_grad for x in [currents, *learned]):
        return _TritonLIFSequence.apply(currents, p, record_voltage, tau_mem_inv, v_th)
    spikes, voltages, _, order = _forward(currents, p, record_voltage, False, tau_mem_inv, v_th)
    voltages = None if voltages is None else _unflatten_steps(voltages, currents.shape, order)
    return _unflatten_steps(spikes, currents.shape, order), voltages
