"""The fused LIF kernel and the matrix-form leaky integrator against their step-by-step references."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from snn_train.neurons import (
    LIFParameters,
    LIParameters,
    li_sequence,
    li_sequence_reference,
    lif_sequence,
    lif_sequence_reference,
    max_pool_over_time,
)
from snn_train.surrogates import SURROGATES

PARAMETERS = [
    dict(tau_syn_inv=200.0, tau_mem_inv=100.0, v_leak=0.0, v_th=1.0, v_reset=0.0, dt=1e-3),
    dict(tau_syn_inv=150.0, tau_mem_inv=300.0, v_leak=0.1, v_th=0.7, v_reset=-0.2, dt=1e-3),
    dict(tau_syn_inv=100.0, tau_mem_inv=100.0, v_leak=-0.1, v_th=0.5, v_reset=0.3, dt=2e-3),
]
SHAPES = [(1, 5), (4, 3, 6, 6), (2, 64)]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-12)).item()


COMPILED = [False, pytest.param(True, marks=pytest.mark.slow)]  # torch.compile takes seconds per variant


@pytest.mark.parametrize("compiled", COMPILED, ids=["eager", "compiled"])
@pytest.mark.parametrize("surrogate", sorted(SURROGATES))
@pytest.mark.parametrize("values", PARAMETERS)
@pytest.mark.parametrize("seq_length, shape", [(1, SHAPES[0]), (8, SHAPES[1]), (37, SHAPES[2])])
def test_fused_lif_equals_the_step_loop(
    surrogate: str, values: dict, seq_length: int, shape: tuple[int, ...], compiled: bool
) -> None:
    p = LIFParameters(**values, surrogate=surrogate, alpha=0.3 if surrogate == "circ" else 5.0)
    torch.manual_seed(seq_length)
    currents = (torch.rand(seq_length, *shape) * 3 - 0.5).requires_grad_()
    upstream = torch.randn(seq_length, *shape)
    spikes, voltages = lif_sequence(currents, p, record_voltage=True, compiled=compiled)
    (grad,) = torch.autograd.grad(spikes, currents, upstream)
    ref_spikes, ref_voltages = lif_sequence_reference(currents, p, record_voltage=True)
    (ref_grad,) = torch.autograd.grad(ref_spikes, currents, upstream)
    assert torch.equal(spikes, ref_spikes)
    assert relative_error(voltages, ref_voltages) <= 1e-5
    assert relative_error(grad, ref_grad) <= 1e-5
    if seq_length > 1:
        assert 0 < spikes.mean() < 1


@pytest.mark.parametrize("values", PARAMETERS)
def test_matrix_leaky_integrator_equals_the_step_loop(values: dict) -> None:
    p = LIParameters(
        tau_syn_inv=values["tau_syn_inv"], tau_mem_inv=values["tau_mem_inv"], v_leak=values["v_leak"], dt=values["dt"]
    )
    currents = torch.randn(23, 3, 10, requires_grad=True)
    upstream = torch.randn(23, 3, 10)
    voltages = li_sequence(currents, p)
    (grad,) = torch.autograd.grad(voltages, currents, upstream)
    ref = li_sequence_reference(currents, p)
    (ref_grad,) = torch.autograd.grad(ref, currents, upstream)
    assert relative_error(voltages, ref) <= 1e-5
    assert relative_error(grad, ref_grad) <= 1e-5


class TinySNN(nn.Module):
    def __init__(self, lif_kernel, li_kernel, p: LIFParameters) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(20, 30), nn.Linear(30, 4)
        self.lif_kernel, self.li_kernel, self.p = lif_kernel, li_kernel, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spikes, _ = self.lif_kernel(self.fc1(x), self.p)
        return self.li_kernel(self.fc2(spikes), LIParameters(tau_syn_inv=200.0, tau_mem_inv=100.0, v_leak=0.0, dt=1e-3))


@pytest.mark.parametrize("surrogate", sorted(SURROGATES))
def test_every_parameter_gradient_matches_the_reference(surrogate: str) -> None:
    p = LIFParameters(**PARAMETERS[0], surrogate=surrogate, alpha=0.3 if surrogate == "circ" else 5.0)
    x = torch.rand(16, 8, 20) * 6
    fused, reference = TinySNN(lif_sequence, li_sequence, p), TinySNN(lif_sequence_reference, li_sequence_reference, p)
    fused(x).max(0).values.sum().backward()
    reference(x).max(0).values.sum().backward()
    for (name, a), (_, b) in zip(fused.named_parameters(), reference.named_parameters()):
        assert relative_error(a.grad, b.grad) <= 1e-5, name
        assert b.grad.abs().sum() > 0, name


def test_bfloat16_currents_give_the_spikes_of_their_float32_values() -> None:
    p = LIFParameters(**PARAMETERS[0], surrogate="super", alpha=10.0)
    currents = (torch.rand(12, 4, 50) * 3).to(torch.bfloat16)
    spikes, _ = lif_sequence(currents, p)
    expected, _ = lif_sequence(currents.float(), p)
    assert spikes.dtype == torch.bfloat16
    assert torch.equal(spikes.float(), expected)


@pytest.mark.parametrize("layout", ["channels_last", "repeated_over_time"])
def test_any_memory_layout_gives_the_contiguous_result(layout: str) -> None:
    p = LIFParameters(**PARAMETERS[1], surrogate="super", alpha=5.0)
    torch.manual_seed(1)
    step = torch.rand(3, 4, 5, 6) * 3
    if layout == "channels_last":
        currents = (
            torch.rand(7, 3, 4, 5, 6)
            .mul(3)
            .flatten(0, 1)
            .contiguous(memory_format=torch.channels_last)
            .unflatten(0, (7, 3))
        )
    else:
        currents = step.expand(7, -1, -1, -1, -1)
    currents = currents.detach().requires_grad_()
    upstream = torch.randn(7, 3, 4, 5, 6)
    spikes, voltages = lif_sequence(currents, p, record_voltage=True)
    (grad,) = torch.autograd.grad(spikes, currents, upstream)
    dense = currents.detach().contiguous().requires_grad_()
    ref_spikes, ref_voltages = lif_sequence_reference(dense, p, record_voltage=True)
    (ref_grad,) = torch.autograd.grad(ref_spikes, dense, upstream)
    assert spikes.stride() == currents.stride() or layout == "repeated_over_time"
    assert torch.equal(spikes, ref_spikes)
    assert relative_error(voltages, ref_voltages) <= 1e-5
    assert relative_error(grad, ref_grad) <= 1e-5
    assert 0 < spikes.mean() < 1


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("compiled", [False, True], ids=["torch", "cpu"])  # compiled on the CPU: lif_cpu's kernels
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])  # lif_cpu pools the first itself
@pytest.mark.parametrize("pool", [1, 2])
def test_the_count_added_is_the_number_of_spikes_before_pooling(
    pool: int, layout: str, compiled: bool, grad: bool
) -> None:
    p = LIFParameters(**PARAMETERS[1], surrogate="super", alpha=100.0)
    torch.manual_seed(pool)
    currents = torch.rand(5 * 3, 16, 6, 8) * 3
    if layout == "channels_last":
        currents = currents.contiguous(memory_format=torch.channels_last)
    currents = currents.unflatten(0, (5, 3)).requires_grad_(grad)
    count = torch.full((), 7.0, dtype=torch.float64)  # added to, not overwritten
    spikes = lif_sequence(currents, p, compiled=compiled, pool=pool, count=count)[0]
    reference = lif_sequence_reference(currents.detach(), p)[0]
    assert 0 < reference.mean() < 1
    assert torch.equal(spikes, max_pool_over_time(reference, pool))
    assert count.item() == 7 + reference.sum().item()


def test_inference_path_gives_the_training_path_outputs() -> None:
    p = LIFParameters(**PARAMETERS[0], surrogate="super", alpha=5.0)
    currents = torch.rand(9, 4, 30) * 3
    with torch.no_grad():
        spikes, voltages = lif_sequence(currents, p, record_voltage=True)
    trained_spikes, trained_voltages = lif_sequence(currents.requires_grad_(), p, record_voltage=True)
    assert spikes.grad_fn is None and trained_spikes.grad_fn is not None
    assert torch.equal(spikes, trained_spikes)
    assert torch.equal(voltages, trained_voltages)


# Learned tau_mem_inv and v_th (0-dim tensors) that differ from p's own values: both learned, or one of them, each
# with a sequence on which the float32 sums of the parameters' gradients are well conditioned.
LEARNED = [((8, SHAPES[1]), 150.0, 0.8), ((16, (3, 40)), 150.0, None), ((5, SHAPES[1]), None, 0.8)]


def learned_values(tau_mem_inv: float | None, v_th: float | None, dtype: torch.dtype) -> dict[str, torch.Tensor | None]:
    return {
        "tau_mem_inv": None if tau_mem_inv is None else torch.tensor(tau_mem_inv, dtype=dtype, requires_grad=True),
        "v_th": None if v_th is None else torch.tensor(v_th, dtype=dtype, requires_grad=True),
    }


def fused_and_reference_with_learned_values(
    p: LIFParameters,
    seq_length: int,
    shape: tuple[int, ...],
    tau_mem_inv: float | None,
    v_th: float | None,
    compiled: bool,
    dtype: torch.dtype = torch.float32,
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """(spikes, voltages, gradients of currents and of each learned value) of the fused kernel and of the step loop."""
    torch.manual_seed(seq_length)
    currents = (torch.rand(seq_length, *shape, dtype=dtype) * 3 - 0.5).requires_grad_()
    upstream = torch.randn(seq_length, *shape, dtype=dtype)
    learned = learned_values(tau_mem_inv, v_th, dtype)
    inputs = [currents, *(value for value in learned.values() if value is not None)]
    spikes, voltages = lif_sequence(currents, p, record_voltage=True, compiled=compiled, **learned)
    ref_spikes, ref_voltages = lif_sequence_reference(currents, p, record_voltage=True, **learned)
    return (
        (spikes, voltages, *torch.autograd.grad(spikes, inputs, upstream)),
        (ref_spikes, ref_voltages, *torch.autograd.grad(ref_spikes, inputs, upstream)),
    )


@pytest.mark.parametrize("compiled", COMPILED, ids=["eager", "compiled"])
@pytest.mark.parametrize("surrogate", ["super", "triangle", "atan"])
def test_learned_time_constant_and_threshold_get_the_step_loop_gradients(surrogate: str, compiled: bool) -> None:
    p = LIFParameters(**PARAMETERS[1], surrogate=surrogate, alpha=5.0)
    for (seq_length, shape), tau_mem_inv, v_th in LEARNED:
        fused, reference = fused_and_reference_with_learned_values(p, seq_length, shape, tau_mem_inv, v_th, compiled)
        assert len(fused) == 3 + (tau_mem_inv is not None) + (v_th is not None)
        (spikes, voltages, *grads), (ref_spikes, ref_voltages, *ref_grads) = fused, reference
        assert torch.equal(spikes, ref_spikes)
        assert 0 < spikes.mean() < 1
        assert relative_error(voltages, ref_voltages) <= 1e-5
        for grad, ref_grad in zip(grads, ref_grads):
            assert relative_error(grad, ref_grad) <= 1e-5
            assert ref_grad.abs().sum() > 0


@pytest.mark.parametrize("surrogate", sorted(SURROGATES))
def test_learned_value_gradients_equal_autograd_to_float64_precision(surrogate: str) -> None:
    p = LIFParameters(**PARAMETERS[2], surrogate=surrogate, alpha=0.3 if surrogate == "circ" else 5.0)
    for (seq_length, shape), tau_mem_inv, v_th in LEARNED:
        fused, reference = fused_and_reference_with_learned_values(
            p, seq_length, shape, tau_mem_inv, v_th, False, torch.float64
        )
        assert torch.equal(fused[0], reference[0])
        for actual, expected in zip(fused[1:], reference[1:]):
            assert relative_error(actual, expected) <= 1e-12


def test_inference_path_uses_the_learned_values() -> None:
    p = LIFParameters(**PARAMETERS[0], surrogate="super", alpha=5.0)
    torch.manual_seed(2)
    currents = torch.rand(9, 4, 30) * 3
    learned = learned_values(150.0, 0.8, torch.float32)
    with torch.no_grad():
        spikes, voltages = lif_sequence(currents, p, record_voltage=True, **learned)
        own_spikes, _ = lif_sequence(currents, p)
    trained_spikes, trained_voltages = lif_sequence(currents, p, record_voltage=True, **learned)
    assert spikes.grad_fn is None and trained_spikes.grad_fn is not None  # the learned values alone need the graph
    assert torch.equal(spikes, trained_spikes)
    assert torch.equal(voltages, trained_voltages)
    assert not torch.equal(spikes, own_spikes)
