"""On a CUDA GPU: the Triton kernels at the default network's sizes against the step loop on the GPU, training with
either kernel, snn-eval. Skipped without a GPU; scripts/gpu_check.sh runs these with the `triton` tests, the
kill-and-resume test on CUDA (tests/test_resume.py) and, with two GPUs, data-parallel training over NCCL
(tests/test_distributed.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_triton import assert_matches, both, upstream_of

from snn_train import load_config
from snn_train.checkpoint import load_checkpoint
from snn_train.config import compose
from snn_train.neurons import LIFParameters
from snn_train.report import evaluate_checkpoint
from snn_train.surrogates import SURROGATES
from snn_train.train import fit

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("surrogate", sorted(SURROGATES))
def test_triton_kernels_equal_the_step_loop_on_the_gpu_at_the_networks_sizes(surrogate: str) -> None:
    """conv1 of the default network (T=16, B=32, 32 channels of 24×24, channels-last) with learned τm⁻¹ and v_th."""
    p = LIFParameters(
        tau_syn_inv=200.0,
        tau_mem_inv=100.0,
        v_leak=0.0,
        v_th=1.0,
        v_reset=0.0,
        dt=1e-3,
        surrogate=surrogate,
        alpha=0.1 if surrogate == "circ" else 10.0,
    )
    generator = torch.Generator().manual_seed(0)
    dense = (torch.rand(16 * 32, 32, 24, 24, generator=generator) * 4).cuda()
    currents = dense.contiguous(memory_format=torch.channels_last).unflatten(0, (16, 32))
    learned = {
        "tau_mem_inv": torch.tensor(90.0, device="cuda", requires_grad=True),
        "v_th": torch.tensor(0.9, device="cuda", requires_grad=True),
    }
    assert_matches(*both(currents, p, upstream_of(currents, one_sign=True), **learned))


def trained(overrides: list[str], run_dir: Path) -> dict:
    fit(load_config(overrides), run_dir)
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_two_training_steps_with_triton_kernels_end_as_with_torch_kernels(
    precision: str, tmp_path: Path, tiny_overrides: list[str]
) -> None:
    # SGD with a constant rate: Adam would blow the rounding of near-zero gradients up to steps of lr; a low threshold,
    # so that every layer spikes and every weight gets a gradient
    overrides = [
        *(o for o in tiny_overrides if not o.startswith("train.device=")),
        "train.device=cuda",
        f"train.precision={precision}",
        "train.limit_batches=2",
        "optim=sgd",
        "scheduler=none",
        "encoder.input_scale=5",
        "model.lif.v_th=0.1",
        "decoder=mean",
    ]
    triton, torch_kernels = (
        trained([*overrides, f"model.kernel={kernel}"], tmp_path / kernel) for kernel in ("triton", "torch")
    )
    for name, weight in triton["model"].items():
        torch.testing.assert_close(weight, torch_kernels["model"][name], rtol=1e-4, atol=1e-6, msg=name)
    for state, expected in zip(
        triton["optimizer"]["state"].values(), torch_kernels["optimizer"]["state"].values(), strict=True
    ):
        assert state["momentum_buffer"].abs().sum() > 0  # every parameter got a gradient
        torch.testing.assert_close(state["momentum_buffer"], expected["momentum_buffer"], rtol=1e-4, atol=1e-6)


def test_snn_eval_on_the_gpu_reports_the_training_runs_test_figures(tmp_path: Path, tiny_overrides: list[str]) -> None:
    overrides = [
        *(o for o in tiny_overrides if not o.startswith("train.device=")),
        "train.device=cuda",
        "train.limit_batches=3",
        "encoder.input_scale=5",
        "decoder=mean",
    ]
    fit(load_config(overrides), tmp_path / "run")
    cfg = compose("eval", [f"checkpoint={tmp_path / 'run'}", "device=cuda", "batch_size=10"])
    report = evaluate_checkpoint(cfg)
    final = json.loads((tmp_path / "run" / "metrics.json").read_text())["final"]
    assert report["accuracy"] == pytest.approx(final["test_accuracy"])
    assert report["loss"] == pytest.approx(final["test_loss"], rel=1e-5)
    assert report["layers"]["conv1"]["spikes_per_sample"] > 0
