"""The assembled network: a time-invariant input convolved once gives what convolving every step gives."""

from __future__ import annotations

import torch

from snn_train import ConvSNN, LIFParameters, LIParameters


def seed_network() -> ConvSNN:
    torch.manual_seed(0)
    return ConvSNN(
        input_shape=(1, 28, 28),
        conv_channels=[8, 16],
        kernel_sizes=[5, 5],
        conv_scales=[1.0, 10.0],
        pool_size=2,
        fc_features=[64],
        num_classes=10,
        readout_bias=False,
        lif=LIFParameters(tau_syn_inv=200.0, tau_mem_inv=100.0, v_leak=0.0, v_th=1.0, v_reset=0.0, dt=1e-3, surrogate="super", alpha=10.0),
        readout=LIParameters(tau_syn_inv=200.0, tau_mem_inv=100.0, v_leak=0.0, dt=1e-3),
    )


def test_repeated_input_equals_the_same_input_given_at_every_step() -> None:
    images = torch.rand(6, 1, 28, 28) * 8
    repeated = images.expand(12, -1, -1, -1, -1)
    results = []
    for x in (repeated, repeated.contiguous()):
        model = seed_network()
        trace: dict = {}
        voltages = model(x, trace)
        voltages.max(0).values.sum().backward()
        results.append((voltages, trace, {name: p.grad for name, p in model.named_parameters()}))
    (voltages, trace, grads), (ref_voltages, ref_trace, ref_grads) = results
    assert torch.allclose(voltages, ref_voltages, rtol=1e-5, atol=1e-6)
    for name in ref_trace:
        assert torch.equal(trace[name].spikes, ref_trace[name].spikes), name
    assert ref_trace["fc1"].spikes.sum() > 0
    for name, grad in ref_grads.items():
        assert torch.allclose(grads[name], grad, rtol=1e-4, atol=1e-6 * grad.abs().max().item()), name
        assert grad.abs().sum() > 0, name
