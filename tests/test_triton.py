"""The Triton LIF kernels against the step-by-step reference: natively on a GPU, under Triton's interpreter on the CPU.

Sizes span two programs of the kernels' block (under the interpreter 16384 neurons, 512 on a GPU) and end mid-block.
"""

from __future__ import annotations

import pytest
import torch

from snn_train import ConvSNN, LIFParameters, LIParameters, load_config
from snn_train.errors import ConfigError
from snn_train.lif_kernels import KERNELS, interpreter_defect, interpreter_defect_of, triton_runs_on
from snn_train.model import convolve_over_time
from snn_train.neurons import lif_sequence_reference, max_pool_over_time
from snn_train.surrogates import SURROGATES

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(
        not triton_runs_on(DEVICE), reason=interpreter_defect() or "needs Triton and a CUDA GPU or TRITON_INTERPRET=1"
    ),
]

# v_leak ≠ 0 and v_reset ≠ 0, v_th between them; a sequence drives some neurons across the threshold
P = dict(tau_syn_inv=150.0, tau_mem_inv=300.0, v_leak=0.1, v_th=0.7, v_reset=-0.2, dt=1e-3)
SHAPE = (2, 3, 53, 53)  # 16 854 neurons per step


def lif_sequence_triton(*args, **kwargs):
    from snn_train.triton_lif import lif_sequence_triton  # imported once the test runs: Triton may be absent

    return lif_sequence_triton(*args, **kwargs)


def parameters(surrogate: str) -> LIFParameters:
    return LIFParameters(**P, surrogate=surrogate, alpha=0.3 if surrogate == "circ" else 5.0)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected).abs().max() / expected.abs().max().clamp(min=1e-12)).item()


def currents_of(seq_length: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(seq_length, *shape, generator=generator) * 3 - 0.5).to(DEVICE)


def upstream_of(currents: torch.Tensor, seed: int = 0, one_sign: bool = False) -> torch.Tensor:
    """A gradient for the spikes; of one sign, the float32 sums of a learned value's gradient over all neurons and
    steps are well conditioned: without cancellation both sides' rounding stays far below 1e-5 of the result."""
    generator = torch.Generator().manual_seed(seed + 100)
    draw = torch.rand if one_sign else torch.randn
    return draw(currents.shape, generator=generator).to(device=DEVICE, dtype=currents.dtype)


def both(
    currents: torch.Tensor, p: LIFParameters, upstream: torch.Tensor, **learned: torch.Tensor
) -> tuple[tuple, tuple]:
    """(spikes, voltages, gradients of the currents and of each learned value) of the Triton kernels and of the step
    loop, the loop on a float32 copy of the currents."""
    currents = currents.detach().requires_grad_()
    reference_currents = currents.detach().float().requires_grad_()
    spikes, voltages = lif_sequence_triton(currents, p, True, **learned)
    ref_spikes, ref_voltages = lif_sequence_reference(reference_currents, p, True, **learned)
    grads = torch.autograd.grad(spikes, [currents, *learned.values()], upstream)
    ref_grads = torch.autograd.grad(ref_spikes, [reference_currents, *learned.values()], upstream.float())
    return (spikes, voltages, *grads), (ref_spikes, ref_voltages, *ref_grads)


def assert_matches(triton: tuple, reference: tuple) -> None:
    (spikes, voltages, *grads), (ref_spikes, ref_voltages, *ref_grads) = triton, reference
    assert torch.equal(spikes.float(), ref_spikes)
    assert 0 < spikes.float().mean() < 1
    assert relative_error(voltages, ref_voltages) <= 1e-5
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert relative_error(grad, ref_grad) <= 1e-5
        assert ref_grad.abs().sum() > 0


@pytest.mark.parametrize("surrogate", sorted(SURROGATES))
def test_kernels_equal_the_step_loop(surrogate: str) -> None:
    currents = currents_of(6, SHAPE)
    assert_matches(*both(currents, parameters(surrogate), upstream_of(currents)))


def test_every_registered_surrogate_has_its_triton_version_and_another_name_is_refused() -> None:
    from snn_train import triton_lif

    assert sorted(triton_lif.SURROGATES) == sorted(SURROGATES)  # a new surrogate needs its line in _surrogate too
    with pytest.raises(ValueError, match="no surrogate 'sigmoid'"):
        lif_sequence_triton(currents_of(2, (3,)), parameters("sigmoid"))


@pytest.mark.parametrize("surrogate", sorted(SURROGATES))
def test_learned_time_constant_and_threshold_get_the_step_loop_gradients(surrogate: str) -> None:
    currents = currents_of(8, (3, 5700), seed=1)
    learned = {
        "tau_mem_inv": torch.tensor(150.0, device=DEVICE, requires_grad=True),
        "v_th": torch.tensor(0.8, device=DEVICE, requires_grad=True),
    }
    assert_matches(*both(currents, parameters(surrogate), upstream_of(currents, one_sign=True), **learned))


@pytest.mark.parametrize("name", ["tau_mem_inv", "v_th"])
def test_one_learned_value_alone(name: str) -> None:
    value = {"tau_mem_inv": 150.0, "v_th": 0.8}[name]
    currents = currents_of(8, (3, 5700), seed=2)
    learned = {name: torch.tensor(value, device=DEVICE, requires_grad=True)}
    assert_matches(*both(currents, parameters("super"), upstream_of(currents, one_sign=True), **learned))


def test_the_count_added_is_the_number_of_spikes_before_pooling() -> None:
    currents = currents_of(3, (2, 4, 6, 6))
    count = torch.full((), 7.0, dtype=torch.float64, device=DEVICE)  # added to, not overwritten
    pooled = KERNELS["triton"](currents)(currents, parameters("super"), False, False, None, None, 2, count)[0]
    reference = lif_sequence_reference(currents, parameters("super"))[0]
    assert 0 < reference.mean() < 1
    assert torch.equal(pooled, max_pool_over_time(reference, 2))
    assert count.item() == 7 + reference.sum().item()


def test_a_single_time_step() -> None:
    currents = currents_of(1, SHAPE) + 0.5
    assert_matches(*both(currents, parameters("atan"), upstream_of(currents)))


def test_bfloat16_currents_run_float32_state_and_return_bfloat16() -> None:
    """Spikes and voltages are those of the currents' float32 values; the gradient is the float32 one, rounded."""
    currents = currents_of(6, SHAPE).to(torch.bfloat16)
    upstream = upstream_of(currents)
    (spikes, voltages, grad), (ref_spikes, ref_voltages, ref_grad) = both(currents, parameters("super"), upstream)
    assert spikes.dtype == grad.dtype == torch.bfloat16 and voltages.dtype == torch.float32
    assert torch.equal(spikes.float(), ref_spikes)
    assert relative_error(voltages, ref_voltages) <= 1e-5
    torch.testing.assert_close(grad.float(), ref_grad, rtol=2**-8, atol=1e-5 * ref_grad.abs().max().item())
    # the same kernels on the float32 values: the same spikes, and the float32 gradient that torch rounds to this one
    (spikes_32, _, grad_32), _ = both(currents.float(), parameters("super"), upstream.float())
    assert torch.equal(spikes_32, spikes.float()) and torch.equal(grad_32.to(torch.bfloat16), grad)


@pytest.mark.parametrize("layout", ["channels_last", "repeated_over_time"])
def test_any_memory_layout_gives_the_result_in_that_layout(layout: str) -> None:
    dense = currents_of(5, SHAPE)
    channels_last = dense.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, dense.shape[:2])
    currents = channels_last if layout == "channels_last" else channels_last[0].expand(5, -1, -1, -1, -1)
    upstream = upstream_of(dense)  # contiguous: the gradient comes in another layout than the spikes'
    triton, reference = both(currents, parameters("tanh"), upstream)
    assert triton[0].stride() == triton[1].stride() == triton[2].stride() == channels_last.stride()
    assert_matches(triton, reference)


def test_inference_keeps_nothing_and_gives_the_training_outputs() -> None:
    currents = currents_of(6, SHAPE)
    learned = {"tau_mem_inv": torch.tensor(150.0, device=DEVICE), "v_th": torch.tensor(0.8, device=DEVICE)}
    with torch.no_grad():
        spikes, voltages = lif_sequence_triton(currents, parameters("super"), True, **learned)
    trained_spikes, trained_voltages = lif_sequence_triton(
        currents.requires_grad_(), parameters("super"), True, **learned
    )
    assert spikes.grad_fn is None and trained_spikes.grad_fn is not None
    assert torch.equal(spikes, trained_spikes) and torch.equal(voltages, trained_voltages)


def network(kernel: str) -> ConvSNN:
    torch.manual_seed(0)
    lif = LIFParameters(**P, surrogate="super", alpha=5.0)
    readout = LIParameters(tau_syn_inv=200.0, tau_mem_inv=100.0, v_leak=0.0, dt=1e-3)
    return ConvSNN(
        (1, 12, 12),
        [4],
        [3],
        [3.0],
        2,
        [24],
        10,
        False,
        lif,
        readout,
        learn_tau_mem=True,
        learn_v_th=True,
        kernel=kernel,
    ).to(DEVICE)


def test_the_network_with_triton_kernels_trains_as_with_torch_kernels() -> None:
    x = (torch.rand(5, 7, 1, 12, 12, generator=torch.Generator().manual_seed(0)) * 2).to(DEVICE)
    outputs = {}
    for kernel in ("triton", "torch"):
        model = network(kernel)
        voltages = model(x)
        voltages.max(0).values.sum().backward()
        outputs[kernel] = (voltages, {name: p.grad for name, p in model.named_parameters()})
    (voltages, grads), (ref_voltages, ref_grads) = outputs["triton"], outputs["torch"]
    assert relative_error(voltages, ref_voltages) <= 1e-5
    for name, grad in grads.items():
        assert relative_error(grad, ref_grads[name]) <= 1e-5, name
        assert ref_grads[name].abs().sum() > 0, name


def learned_away_from_the_config(model: ConvSNN) -> ConvSNN:
    """The network with its learned time constants and thresholds moved off their configured values, as training
    leaves them (a kernel run given the configured values instead would then differ)."""
    with torch.no_grad():
        for lif in [*model.conv_lifs, *model.fc_lifs]:
            lif.tau_mem_logit.add_(0.4)
            lif.v_th.mul_(0.8)
    return model


def test_a_traced_network_with_triton_kernels_trains_as_an_untraced_one() -> None:
    """Logged steps trace the layers (a second, gradient-free kernel run): output and gradients stay those of an
    untraced step, and the traced spikes are the step-by-step reference's, with the learned values."""
    x = (torch.rand(5, 7, 1, 12, 12, generator=torch.Generator().manual_seed(0)) * 2).to(DEVICE)
    runs = []
    for trace in (None, {}):
        model = learned_away_from_the_config(network("triton"))
        voltages = model(x, trace)
        voltages.max(0).values.sum().backward()
        runs.append((voltages, {name: p.grad for name, p in model.named_parameters()}, trace))
    (voltages, grads, _), (traced_voltages, traced_grads, trace) = runs
    assert torch.equal(traced_voltages, voltages)
    assert all(torch.equal(traced_grads[name], grad) for name, grad in grads.items())
    lif = model.conv_lifs[0]
    with torch.no_grad():
        currents = convolve_over_time(model.convs[0], model.norms[0], x, model.conv_scales[0])
        spikes, voltage = lif_sequence_reference(currents, lif.p, True, lif.tau_mem_inv(), lif.v_th)
    assert torch.equal(trace["conv1"].spikes, spikes) and spikes.sum() > 0
    assert relative_error(trace["conv1"].voltage, voltage) <= 1e-5


TRITON, TORCH = "_TritonLIFSequenceBackward", "_FusedLIFSequenceBackward"


@pytest.mark.parametrize(
    "kernel, node", [("auto", TRITON if DEVICE.type == "cuda" else TORCH), ("triton", TRITON), ("torch", TORCH)]
)
def test_model_kernel_chooses_the_kernels(kernel: str, node: str) -> None:
    currents = currents_of(4, (2, 30)).requires_grad_()
    assert network(kernel).fc_lifs[0](currents).grad_fn.name() == node


@pytest.mark.parametrize(
    "triton, numpy, defect",
    [("3.6.0", "2.4.0", True), ("3.5.1", "2.5.2", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.5.2", False)],
)
def test_the_interpreter_is_refused_where_numpy_breaks_it(triton: str, numpy: str, defect: bool) -> None:
    """Triton 3.6.0's interpreter with NumPy 2.4.6 failed every kernel launch here ("only 0-dimensional arrays can be
    converted to Python scalars"), and ran them with NumPy 2.3.5; Triton 3.7.0's reads the loop bound with squeeze()."""
    assert (interpreter_defect_of(triton, numpy) is not None) == defect


def test_triton_where_it_cannot_run_is_refused_naming_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the CPU without the interpreter: nothing runs Triton there
    message = "model.kernel=triton needs Triton and a CUDA GPU (train.device=cpu); use model.kernel=auto or torch"
    with pytest.raises(ConfigError) as refused:
        load_config(["model.kernel=triton", "train.device=cpu"])
    assert str(refused.value) == message
    assert load_config(["train.device=cpu"]).model.kernel == "auto"
