"""The C++ LIF kernels (train.compile on the CPU) beyond the oracle tests of test_kernels.py: layouts, threads,
bfloat16, what they keep for backward, and a failed build."""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

from snn_train import lif_cpu
from snn_train.neurons import (
    LIFParameters,
    lif_sequence,
    lif_sequence_reference,
    max_pool_over_time,
)
from snn_train.surrogates import SURROGATES

P = LIFParameters(
    tau_syn_inv=150.0, tau_mem_inv=300.0, v_leak=0.1, v_th=0.7, v_reset=-0.2, dt=1e-3, surrogate="super", alpha=5.0
)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def learned_values() -> dict[str, torch.Tensor]:
    """A learned τm⁻¹ and threshold (0-dim leaves, as the model's parameters), other than P's."""
    return {"tau_mem_inv": torch.tensor(250.0, requires_grad=True), "v_th": torch.tensor(0.8, requires_grad=True)}


def layout(name: str) -> torch.Tensor:
    """Currents [7, 3, 4, 12, 12] laid out as named: 1 728 neurons a step, more of the kernels' blocks (512 neurons, or
    a pooling window's rows) than the 3 threads of the test below."""
    torch.manual_seed(1)
    if name == "repeated_over_time":
        return (torch.rand(3, 4, 12, 12) * 3).expand(7, -1, -1, -1, -1)
    if name == "channels_last":
        return torch.rand(21, 4, 12, 12).mul(3).contiguous(memory_format=torch.channels_last).unflatten(0, (7, 3))
    return (torch.rand(7, 3, 4, 12, 24) * 3)[..., ::2]  # every other value: no step is dense


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("pool", [1, 2])
@pytest.mark.parametrize("name", ["channels_last", "repeated_over_time", "strided"])
def test_any_layout_and_thread_count_gives_the_step_loops_results(name: str, pool: int, threads: int) -> None:
    """Each thread takes whole blocks of neurons, and adds its spike count and its part of the learned values'
    gradients to the other threads': the results are the step loop's at any thread count."""
    currents = layout(name).requires_grad_()
    values = learned_values()
    inputs = [currents, *values.values()]
    count = torch.zeros((), dtype=torch.float64)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        spikes, voltages = lif_sequence(
            currents, P, record_voltage=True, compiled=True, pool=pool, count=count, **values
        )
        upstream = torch.randn(spikes.shape)
        grads = torch.autograd.grad(spikes, inputs, upstream)
    finally:
        torch.set_num_threads(previous)
    dense = currents.detach().contiguous().requires_grad_()
    ref_spikes, ref_voltages = lif_sequence_reference(dense, P, record_voltage=True, **values)
    ref_grads = torch.autograd.grad(max_pool_over_time(ref_spikes, pool), [dense, *values.values()], upstream)
    assert torch.equal(spikes, max_pool_over_time(ref_spikes, pool))
    assert 0 < ref_spikes.mean() < 1
    assert count.item() == ref_spikes.sum().item()
    assert relative_error(voltages, ref_voltages) <= 1e-5
    for grad, ref_grad in zip(grads, ref_grads):
        assert relative_error(grad, ref_grad) <= 1e-5
    if name == "channels_last" and pool == 1:
        assert spikes.stride() == currents.stride()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pool", [1, 2])
def test_a_step_repeated_over_time_gets_the_step_loops_gradient_summed_over_time(pool: int, dtype: torch.dtype) -> None:
    """The convolved direct-encoder input: an expanded view, whose step the kernel takes and differentiates itself."""
    torch.manual_seed(4)
    step = torch.rand(3, 8, 6, 12).contiguous(memory_format=torch.channels_last).to(dtype).requires_grad_()
    values = learned_values()
    inputs = [step, *values.values()]
    spikes = lif_sequence(step.expand(7, -1, -1, -1, -1), P, compiled=True, pool=pool, **values)[0]
    upstream = torch.randn(spikes.shape).to(dtype)
    grads = torch.autograd.grad(spikes, inputs, upstream)
    wide = step.detach().float().requires_grad_()
    wide_values = {name: value.detach().requires_grad_() for name, value in values.items()}
    reference = max_pool_over_time(lif_sequence_reference(wide.expand(7, -1, -1, -1, -1), P, **wide_values)[0], pool)
    reference_grads = torch.autograd.grad(reference, [wide, *wide_values.values()], upstream.float())
    assert torch.equal(spikes.float(), reference) and 0 < reference.mean() < 1
    assert grads[0].dtype == dtype and grads[0].shape == step.shape
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # bfloat16: the sum over time rounded once, to 8 bits
    for grad, reference_grad in zip(grads, reference_grads):
        assert relative_error(grad, reference_grad) <= tolerance


def saved_bytes(run) -> int:
    """Bytes of the distinct storages autograd keeps for the backward pass of what ``run()`` computes."""
    storages = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(storages.values())


# The kernel pools channels-last steps itself; other layouts are pooled by max_pool2d after it.
POOLED_LAYOUTS = {
    "channels_last": lambda: torch.rand(6 * 3, 8, 6, 12).contiguous(memory_format=torch.channels_last),
    "contiguous": lambda: torch.rand(6 * 3, 8, 6, 12),
    "repeated_over_time": lambda: torch.rand(3, 8, 6, 12).contiguous(memory_format=torch.channels_last),
    "not_a_multiple": lambda: torch.rand(6 * 3, 8, 7, 12).contiguous(memory_format=torch.channels_last),
}


@pytest.mark.parametrize("learned", [False, True])
@pytest.mark.parametrize("pool", [2, 3])
@pytest.mark.parametrize("name", sorted(POOLED_LAYOUTS))
def test_pooling_inside_the_kernel_gives_the_pooled_step_loop(name: str, pool: int, learned: bool) -> None:
    torch.manual_seed(pool)
    made = POOLED_LAYOUTS[name]()
    currents = made.expand(6, -1, -1, -1, -1) if name == "repeated_over_time" else made.unflatten(0, (6, 3))
    currents = currents.detach().requires_grad_()
    values = learned_values() if learned else {}
    inputs = [currents, *values.values()]
    pooled = lif_sequence(currents, P, compiled=True, pool=pool, **values)[0]
    upstream = torch.randn(pooled.shape)
    grads = torch.autograd.grad(pooled, inputs, upstream)
    unfused = max_pool_over_time(lif_sequence(currents, P, compiled=True, **values)[0], pool)
    unfused_grads = torch.autograd.grad(unfused, inputs, upstream)
    reference = max_pool_over_time(lif_sequence_reference(currents, P, **values)[0], pool)
    reference_grads = torch.autograd.grad(reference, inputs, upstream)
    assert torch.equal(pooled, reference) and torch.equal(pooled, unfused)
    assert 0 < pooled.mean() < 1
    assert torch.equal(grads[0], unfused_grads[0])  # the same arithmetic on the same spike gradients
    for grad, reference_grad in zip(grads, reference_grads):
        assert relative_error(grad, reference_grad) <= 1e-5
    if name == "channels_last":
        assert pooled.flatten(0, 1).is_contiguous(memory_format=torch.channels_last)
    if name not in ("not_a_multiple", "contiguous"):  # pooled inside the kernel: autograd keeps only the currents
        kept = saved_bytes(lambda: lif_sequence(currents, P, compiled=True, pool=pool, **values)[0])
        assert kept == currents.untyped_storage().nbytes()


@pytest.mark.parametrize("alpha", [0.3, 5.0, 100.0])
@pytest.mark.parametrize("surrogate", ["tanh", "erfc"])
def test_surrogates_through_the_kernels_own_exponential_keep_float32_accuracy(surrogate: str, alpha: float) -> None:
    """tanh and erfc take e^y from the kernel's own vectorized exponential. With a = dt·τm⁻¹ = 1 and v_leak = v_th = 0,
    one step's current gradient is dz/dx at x = the current itself: over x in [-4, 4] each value is within 1e-6 of
    surrogates.py's (torch's exp, relative to the value itself); it is 0 only where e^y is below e^-60."""
    p = LIFParameters(0.5, 1.0, 0.0, 0.0, 0.0, 1.0, surrogate=surrogate, alpha=alpha)
    x = torch.linspace(-4, 4, 40001).reshape(1, 1, -1).requires_grad_()
    spikes, _ = lif_sequence(x, p, compiled=True)
    (grad,) = torch.autograd.grad(spikes, x, torch.ones_like(spikes))
    expected = SURROGATES[surrogate](x.detach(), alpha)
    zero = grad == 0
    assert ((grad - expected).abs() / expected)[~zero].max() <= 1e-6
    assert (expected[zero] <= max(4.0, alpha) * math.exp(-60)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_keeps_only_the_currents(dtype: torch.dtype) -> None:
    step = (torch.rand(8, 300) * 3).to(dtype).requires_grad_()
    repeated = step.expand(16, -1, -1)
    currents = (torch.rand(16, 8, 300) * 3).to(dtype).requires_grad_()
    assert saved_bytes(lambda: lif_sequence(repeated, P, compiled=True)) == step.numel() * step.element_size()
    assert saved_bytes(lambda: lif_sequence(currents, P, compiled=True)) == currents.numel() * currents.element_size()
    images = (torch.rand(4, 8, 6, 6) * 3).to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    pooled = lif_sequence(images.expand(16, -1, -1, -1, -1), P, compiled=True, pool=2)[0]
    assert pooled.shape == (16, 4, 8, 3, 3)  # neither the full spikes nor max_pool2d's indices are kept
    assert saved_bytes(lambda: lif_sequence(images.expand(16, -1, -1, -1, -1), P, compiled=True, pool=2)[0]) == (
        images.numel() * images.element_size()
    )


def test_bfloat16_stays_bfloat16_with_the_spikes_and_gradients_of_its_float32_values() -> None:
    torch.manual_seed(3)
    currents = (torch.rand(12, 4, 50) * 3).to(torch.bfloat16).requires_grad_()
    upstream = torch.randn(12, 4, 50).to(torch.bfloat16)
    spikes, _ = lif_sequence(currents, P, compiled=True)
    (grad,) = torch.autograd.grad(spikes, currents, upstream)
    wide = currents.detach().float().requires_grad_()
    ref_spikes, _ = lif_sequence_reference(wide, P)
    (ref_grad,) = torch.autograd.grad(ref_spikes, wide, upstream.float())
    assert spikes.dtype == grad.dtype == torch.bfloat16
    assert torch.equal(spikes.float(), ref_spikes)
    assert relative_error(grad, ref_grad) <= 1e-2  # bfloat16 keeps 8 bits of mantissa


@pytest.mark.slow
def test_a_failed_build_is_one_error_line_naming_the_way_out(tmp_path: Path, tiny_overrides: list[str]) -> None:
    """In a process of its own: a build folder changed within a process makes torch rebuild the kernels there, and
    then in every other process."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "CXX": str(tmp_path / "no-compiler")}
    command = ["snn-train", *tiny_overrides, "train.compile=true", f"hydra.run.dir={tmp_path / 'run'}"]
    failed = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert failed.returncode == 2 and failed.stderr.count("\n") == 1, failed.stderr
    assert failed.stderr.startswith(
        "snn-train: error: train.compile=true builds the CPU LIF kernels with a C++ compiler"
    )
    assert failed.stderr.endswith("; install them, or use train.compile=false\n")


def test_each_torch_version_builds_in_a_folder_of_its_own() -> None:
    """A folder shared with another torch version can hold what that version leaves there: torch 2.14.1 leaves its
    build lock's file, and torch 2.11.0, which waits while that file exists, waited forever on it here."""
    folder = Path(lif_cpu.library()._name).parent
    assert folder.name.endswith("_torch" + torch.__version__.replace(".", "_").replace("+", "_"))
