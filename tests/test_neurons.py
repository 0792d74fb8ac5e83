"""LIF and LI dynamics against closed forms; surrogate gradients against their formulas."""

from __future__ import annotations

import math

import pytest
import torch

from snn_train.neurons import LIFParameters, LIParameters, li_sequence, lif_sequence, lif_step, spike_count
from snn_train.surrogates import spike

NORSE_LIF = dict(tau_syn_inv=200.0, tau_mem_inv=100.0, v_leak=0.0, v_th=1.0, v_reset=0.0, dt=1e-3)


def lif(surrogate: str = "super", alpha: float = 100.0, **changes: float) -> LIFParameters:
    return LIFParameters(**{**NORSE_LIF, **changes}, surrogate=surrogate, alpha=alpha)


def test_one_step_with_unit_input_gives_v_point1_and_i_point8() -> None:
    z, v, i = lif_step(torch.ones(1), torch.zeros(1), torch.zeros(1), lif())
    assert z.item() == 0.0
    assert v.item() == pytest.approx(0.1)
    assert i.item() == pytest.approx(0.8)


def test_spike_resets_voltage_to_v_reset() -> None:
    p = lif(v_reset=-0.25)
    z, v, _ = lif_step(torch.tensor([20.0, 5.0]), torch.zeros(2), torch.zeros(2), p)
    # I=20 gives v=2 > v_th: spike and reset; I=5 gives v=0.5: no spike.
    assert z.tolist() == [1.0, 0.0]
    assert v.tolist() == pytest.approx([-0.25, 0.5])


def li_impulse_response(k: int, a: float, b: float) -> float:
    """Voltage after step k for a unit current impulse at step 0: a·((1-a)^(k+1) - (1-b)^(k+1)) / (b - a)."""
    return a * ((1 - a) ** (k + 1) - (1 - b) ** (k + 1)) / (b - a)


def test_leaky_integrator_impulse_response_matches_closed_form() -> None:
    p = LIParameters(tau_syn_inv=200.0, tau_mem_inv=100.0, v_leak=0.0, dt=1e-3)
    currents = torch.zeros(30, 1)
    currents[0] = 1.0
    voltages = li_sequence(currents, p)[:, 0].double()
    expected = torch.tensor([li_impulse_response(k, 0.1, 0.2) for k in range(30)], dtype=torch.double)
    torch.testing.assert_close(voltages, expected, rtol=1e-5, atol=1e-7)


def test_lif_below_threshold_follows_the_leaky_integrator() -> None:
    currents = torch.rand(40, 3, 5) * 0.5  # far below v_th = 1 for these time constants
    spikes, voltages = lif_sequence(currents, lif(v_th=100.0), record_voltage=True)
    li = li_sequence(currents, LIParameters(tau_syn_inv=200.0, tau_mem_inv=100.0, v_leak=0.0, dt=1e-3))
    assert spikes.sum() == 0
    torch.testing.assert_close(voltages, li)


def test_lif_sequence_is_the_step_loop_with_spikes_and_resets() -> None:
    torch.manual_seed(0)
    currents = torch.rand(25, 4, 6) * 3
    p = lif(v_reset=0.1, v_leak=0.05)
    spikes, voltages = lif_sequence(currents, p, record_voltage=True)
    v, i = torch.full((4, 6), 0.05), torch.zeros(4, 6)
    for t in range(25):
        i = i + currents[t]
        v = v + 1e-3 * 100.0 * (0.05 - v + i)
        i = i * (1 - 1e-3 * 200.0)
        z = (v > 1.0).float()
        v = torch.where(z.bool(), torch.full_like(v, 0.1), v)
        assert torch.equal(spikes[t], z)
        torch.testing.assert_close(voltages[t], v)
    assert spikes.sum() > 0


SURROGATE_FORMULAS = {
    "super": lambda x, a: 1 / (a * abs(x) + 1) ** 2,
    "tanh": lambda x, a: 1 - math.tanh(a * x) ** 2,
    "triangle": lambda x, a: a * max(0.0, 1 - abs(x)),
    "circ": lambda x, a: a**3 / (a**2 + x**2) ** 1.5,
    "erfc": lambda x, a: a / math.sqrt(math.pi) * math.exp(-((a * x) ** 2)),
    "atan": lambda x, a: a / 2 / (1 + (math.pi / 2 * a * x) ** 2),
}


@pytest.mark.parametrize("surrogate", sorted(SURROGATE_FORMULAS))
@pytest.mark.parametrize("alpha", [0.3, 10.0, 100.0])
def test_surrogate_gradient_matches_formula_including_alpha(surrogate: str, alpha: float) -> None:
    points = [-1.5, -0.2, -0.01, 0.0, 0.003, 0.05, 0.7, 2.0]
    x = torch.tensor(points, dtype=torch.float64, requires_grad=True)
    z = spike(x, surrogate, alpha)
    assert z.tolist() == [float(p > 0) for p in points]
    z.backward(torch.full_like(x, 2.0))
    expected = torch.tensor([2 * SURROGATE_FORMULAS[surrogate](p, alpha) for p in points], dtype=torch.float64)
    torch.testing.assert_close(x.grad, expected)


def test_surrogate_alpha_changes_the_gradient() -> None:
    x = torch.tensor([0.05], requires_grad=True)
    spike(x, "super", 10.0).backward()
    wide = x.grad.item()
    x.grad = None
    spike(x, "super", 100.0).backward()
    assert wide == pytest.approx(1 / 1.5**2) and x.grad.item() == pytest.approx(1 / 6**2)


def test_gradient_flows_through_time_to_earlier_inputs() -> None:
    currents = torch.full((6, 1), 0.9, requires_grad=True)
    spikes, _ = lif_sequence(currents, lif(surrogate="super", alpha=10.0))
    spikes[-1].sum().backward()
    assert (currents.grad[:-1] > 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_spike_count_is_the_number_of_spikes_in_any_layout_and_precision(dtype: torch.dtype) -> None:
    """Spikes as the layers make them: a conv layer's channels-last, an fc layer's where every neuron spikes (1 024 per
    sample and step, beyond what bfloat16 counts exactly: 256)."""
    generator = torch.Generator().manual_seed(0)
    conv = (torch.rand(3 * 2, 32, 6, 6, generator=generator) < 0.3).to(dtype)
    conv = conv.contiguous(memory_format=torch.channels_last).unflatten(0, (3, 2))
    assert spike_count(conv).item() == int((conv == 1).sum())
    assert spike_count(torch.ones(3, 2, 1024, dtype=dtype)).item() == 3 * 2 * 1024
