"""The assembled network: a time-invariant input convolved (and batch-normalised) once gives what convolving every step
gives; dropout over time; learned time constants and thresholds; traces without voltages; a traced step equal to an
untraced one."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

from snn_train import ConvSNN, LIFParameters, LIParameters
from snn_train.model import LIF, convolve_over_time, dropout_over_time
from snn_train.neurons import lif_sequence_reference, max_pool_over_time


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
        lif=LIFParameters(
            tau_syn_inv=200.0,
            tau_mem_inv=100.0,
            v_leak=0.0,
            v_th=1.0,
            v_reset=0.0,
            dt=1e-3,
            surrogate="super",
            alpha=10.0,
        ),
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


# A low threshold, so that a small network's every layer spikes.
LIF_PARAMETERS = LIFParameters(
    tau_syn_inv=200.0, tau_mem_inv=100.0, v_leak=0.0, v_th=0.25, v_reset=0.0, dt=1e-3, surrogate="super", alpha=10.0
)


def small_network(**features: object) -> ConvSNN:
    """A 16×16-input two-conv network with the given optional features, seeded; every layer spikes."""
    torch.manual_seed(0)
    return ConvSNN(
        (1, 16, 16),
        [4, 6],
        [3, 3],
        [1.0, 10.0],
        2,
        [24],
        10,
        False,
        LIF_PARAMETERS,
        LIParameters(tau_syn_inv=200.0, tau_mem_inv=100.0, v_leak=0.0, dt=1e-3),
        **features,
    )


@pytest.mark.parametrize("tau_mem_inv, dt", [(100.0, 1e-3), (300.0, 1e-3), (300.0, 2e-3)])
def test_learned_time_constant_and_threshold_start_at_the_configured_values(tau_mem_inv: float, dt: float) -> None:
    p = replace(LIF_PARAMETERS, tau_mem_inv=tau_mem_inv, dt=dt, v_th=0.7)
    layer = LIF(p, learn_tau_mem=True, learn_v_th=True)
    assert layer.tau_mem_inv().item() == pytest.approx(tau_mem_inv, rel=1e-6)
    assert layer.v_th.item() == pytest.approx(0.7, rel=1e-7)
    assert LIF(p).tau_mem_inv() is None and LIF(p).v_th is None


def test_a_network_learning_time_constants_and_thresholds_starts_as_the_fixed_one() -> None:
    torch.manual_seed(5)
    x = torch.rand(6, 3, 1, 16, 16) * 8
    fixed, learning = small_network(), small_network(learn_tau_mem=True, learn_v_th=True)
    missing, unexpected = learning.load_state_dict(fixed.state_dict(), strict=False)
    assert sorted(missing) == [
        f"{layer}.{name}" for layer in ("conv_lifs.0", "conv_lifs.1", "fc_lifs.0") for name in ("tau_mem_logit", "v_th")
    ]
    assert not unexpected
    trace, fixed_trace = {}, {}
    assert torch.equal(learning(x, trace), fixed(x, fixed_trace))
    assert all(torch.equal(trace[name].spikes, fixed_trace[name].spikes) for name in fixed_trace)


def test_every_parameter_of_a_network_with_every_feature_gets_a_gradient() -> None:
    network = small_network(learn_tau_mem=True, learn_v_th=True, batch_norm=True, fc_batch_norm=True, dropout=0.2)
    trace: dict = {}
    network(torch.rand(6, 3, 1, 16, 16) * 8, trace).max(0).values.sum().backward()
    assert all(trace[name].spikes.sum() > 0 for name in ("conv1", "conv2", "fc1"))
    for name, parameter in network.named_parameters():
        assert parameter.grad is not None, name
        if not (name.startswith(("convs.", "fcs.")) and name.endswith(".bias")):  # a batch norm after it: 0 (rounding)
            assert parameter.grad.abs().sum() > 0, name


def fc_currents(network: ConvSNN, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fc1's output and the currents its LIF layer receives, for input ``x``."""
    seen = {}
    hooks = [
        network.fcs[0].register_forward_hook(lambda module, args, out: seen.update(fc=out)),
        network.fc_lifs[0].register_forward_pre_hook(lambda module, args: seen.update(lif=args[0])),
    ]
    with torch.no_grad():
        network(x)
    for hook in hooks:
        hook.remove()
    return seen["fc"], seen["lif"]


def test_fc_batch_norm_normalises_each_feature_over_time_and_batch_and_evaluates_with_running_statistics() -> None:
    network, x = small_network(fc_batch_norm=True), torch.rand(6, 3, 1, 16, 16) * 8
    out, currents = fc_currents(network, x)
    mean, var = out.mean((0, 1)), out.var((0, 1), unbiased=False)
    assert var.min() > 0 and torch.allclose(currents, (out - mean) / torch.sqrt(var + 1e-5), atol=1e-4)
    norm = network.fc_norms[0]
    assert torch.allclose(norm.running_mean, 0.1 * mean, atol=1e-6)  # one update of momentum 0.1 from 0
    out, currents = fc_currents(network.eval(), x)
    expected = (out - norm.running_mean) / torch.sqrt(norm.running_var + 1e-5)
    assert torch.allclose(currents, expected, atol=1e-5)
    assert not torch.allclose(currents, (out - out.mean((0, 1))) / torch.sqrt(out.var((0, 1), unbiased=False) + 1e-5))


def repeated_and_explicit(
    images: torch.Tensor, conv: nn.Conv2d, norm: nn.Module, seq_length: int = 5
) -> list[tuple[torch.Tensor, list[torch.Tensor], nn.Module]]:
    """convolve_over_time of an image batch repeated over time, as a stride-0 view and as a dense copy (each with its
    own copy of ``conv`` and ``norm``): the output, the gradients of the images and of every parameter for a random
    upstream gradient, and the norm after it."""
    upstream = torch.randn(seq_length, *conv(images).shape)
    results = []
    for dense in (False, True):
        conv_copy, norm_copy = copy.deepcopy(conv), copy.deepcopy(norm)
        base = images.clone().requires_grad_()
        x = base.expand(seq_length, -1, -1, -1, -1)
        out = convolve_over_time(conv_copy, norm_copy, x.contiguous() if dense else x, 2.0)
        parameters = [base, *conv_copy.parameters(), *norm_copy.parameters()]
        results.append((out, torch.autograd.grad(out, parameters, upstream), norm_copy))
    return results


def test_a_repeated_input_is_batch_normalised_as_the_same_input_at_every_step() -> None:
    torch.manual_seed(3)
    images, conv = (
        torch.rand(4, 2, 9, 9),
        nn.Conv2d(2, 3, 3, bias=False),
    )  # with a bias: its gradient is 0 up to rounding
    (out, grads, _), (ref_out, ref_grads, _) = repeated_and_explicit(images, conv, nn.BatchNorm2d(3))
    assert out.stride(0) == 0  # convolved and normalised once
    assert torch.allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    assert ref_out.mean().abs() < 1e-5 and (ref_out.var() / 4 - 1).abs() < 1e-2  # normalised (times the scale 2)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert torch.allclose(grad, ref_grad, rtol=1e-4, atol=1e-5 * ref_grad.abs().max().item())
        assert ref_grad.abs().sum() > 0


def test_running_statistics_of_a_repeated_input_are_those_of_its_batch() -> None:
    torch.manual_seed(3)
    images, conv = torch.rand(4, 2, 9, 9), nn.Conv2d(2, 3, 3)
    (_, _, norm), (_, _, ref_norm) = repeated_and_explicit(images, conv, nn.BatchNorm2d(3, momentum=0.25))
    with torch.no_grad():
        currents = conv(images).transpose(0, 1).flatten(1)  # [C, B·H·W]
    assert norm.num_batches_tracked == ref_norm.num_batches_tracked == 1
    assert torch.allclose(norm.running_mean, 0.25 * currents.mean(1), rtol=1e-5)
    assert torch.allclose(norm.running_mean, ref_norm.running_mean, rtol=1e-5)
    # the unbiased variance of the B·H·W distinct values; the dense copy counts each T times, a factor ~1 + 1/(B·H·W)
    assert torch.allclose(norm.running_var, 0.75 + 0.25 * currents.var(1), rtol=1e-5)
    assert torch.allclose(norm.running_var, ref_norm.running_var, rtol=1e-3)


def test_dropout_drops_the_same_neurons_at_every_time_step_and_rescales_the_rest() -> None:
    torch.manual_seed(4)
    x = torch.rand(6, 50, 40) + 0.5
    out = dropout_over_time(x, 0.25, training=True)
    dropped = out == 0
    assert torch.equal(dropped, dropped[0].expand_as(dropped))  # one mask for the whole sequence
    assert torch.allclose(out[~dropped], x[~dropped] / 0.75)
    assert abs(dropped[0].float().mean().item() - 0.25) < 0.04
    assert dropout_over_time(x, 0.25, training=False) is x
    assert dropout_over_time(x, 0.0, training=True) is x


def test_dropout_is_off_in_eval_mode_and_on_in_train_mode() -> None:
    torch.manual_seed(6)
    x = torch.rand(4, 3, 1, 16, 16) * 8
    plain, dropping = small_network(), small_network(dropout=0.5)
    assert torch.equal(dropping.eval()(x), plain.eval()(x))
    assert not torch.equal(dropping.train()(x), plain.train()(x))


def test_traces_without_voltages_hold_the_same_spikes() -> None:
    torch.manual_seed(7)
    x = torch.rand(4, 3, 1, 16, 16) * 8
    model = small_network()
    with_voltage, without_voltage = {}, {}
    voltages = model(x, with_voltage)
    assert torch.equal(model(x, without_voltage, record_voltage=False), voltages)
    assert with_voltage.keys() == without_voltage.keys() == {"conv1", "conv2", "fc1"}
    for name, layer in without_voltage.items():
        assert layer.voltage is None and with_voltage[name].voltage is not None
        assert torch.equal(layer.spikes, with_voltage[name].spikes)


@pytest.mark.parametrize("compiled", [False, True])
def test_a_traces_events_are_what_each_layer_sends_on(compiled: bool) -> None:
    """A conv layer sends on its spikes max-pooled (its 5×5 map pooled to 2×2 drops the last row and column), an fc
    layer its spikes: what the synaptic operations are counted from."""
    torch.manual_seed(3)
    model, trace = small_network(compiled=compiled), {}
    with torch.no_grad():
        model(torch.rand(4, 3, 1, 16, 16) * 8, trace, record_voltage=False)
    assert trace["conv2"].spikes.shape[-2:] == (5, 5) and trace["conv2"].events.shape[-2:] == (2, 2)
    for name in ("conv1", "conv2"):
        assert torch.equal(trace[name].events, max_pool_over_time(trace[name].spikes, 2)), name
        assert trace[name].events.sum() > 0, name
    assert torch.equal(trace["fc1"].events, trace["fc1"].spikes) and trace["fc1"].events.sum() > 0


@pytest.mark.parametrize("compiled", [False, True])
def test_a_counting_trace_has_the_full_traces_counts_and_events_without_its_spikes(compiled: bool) -> None:
    """What evaluation asks for (``keep_spikes=False``): each layer's spike count, its neurons and its events, from
    one kernel run per layer; the count is of all its spikes, those pooling drops (conv2's last row and column)
    included."""
    torch.manual_seed(3)
    model, full, counted = small_network(compiled=compiled), {}, {}
    x = torch.rand(4, 3, 1, 16, 16) * 8
    with torch.no_grad():
        assert torch.equal(model(x, counted, record_voltage=False, keep_spikes=False), model(x, full))
    for name, layer in full.items():
        assert counted[name].spikes is None and counted[name].voltage is None, name
        assert torch.equal(counted[name].events, layer.events), name
        assert counted[name].spike_count.dtype == torch.float64, name
        assert counted[name].spike_count.item() == layer.spike_count.item() == layer.spikes.sum().item() > 0, name
        assert counted[name].neurons == layer.neurons == layer.spikes[0, 0].numel(), name
        assert counted[name].spike_rate == pytest.approx(layer.spikes.double().mean().item(), rel=1e-12), name
    assert full["conv2"].spikes[..., 4, :].sum() > 0  # spikes the pooled events leave out, but the count has


@pytest.mark.parametrize("compiled", [False, True])
def test_a_traced_step_trains_as_an_untraced_one_and_records_the_reference_spikes(compiled: bool) -> None:
    """Logging steps trace the network: their output and gradients must be those of any other step, and the recorded
    full (unpooled) spikes those of the step-by-step reference on the layer's currents."""
    torch.manual_seed(5)
    x = torch.rand(4, 3, 1, 16, 16) * 8
    runs = []
    for trace in (None, {}):
        model = small_network(compiled=compiled, batch_norm=True)
        voltages = model(x, trace)
        voltages.max(0).values.sum().backward()
        runs.append((voltages, {name: p.grad for name, p in model.named_parameters()}, trace, model))
    (voltages, grads, _, _), (traced_voltages, traced_grads, trace, model) = runs
    assert torch.equal(traced_voltages, voltages)
    assert all(torch.equal(traced_grads[name], grad) for name, grad in grads.items())
    with torch.no_grad():
        currents = convolve_over_time(model.convs[0], model.norms[0], x, model.conv_scales[0])
        reference, reference_voltage = lif_sequence_reference(currents, LIF_PARAMETERS, record_voltage=True)
    assert torch.equal(trace["conv1"].spikes, reference) and reference.sum() > 0
    assert torch.allclose(trace["conv1"].voltage, reference_voltage, rtol=1e-5, atol=1e-6)
