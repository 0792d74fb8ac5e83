"""scripts/benchmark.py, briefly: every variant's timed step and the report's figures, and the kernel launches a
training step makes on the CUDA path; scripts/gpu_check.sh where there is no GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from snn_train.lif_kernels import interpreter_defect
from snn_train.surrogates import SURROGATES

BENCHMARK = Path(__file__).parents[1] / "scripts" / "benchmark.py"
GPU_CHECK = Path(__file__).parents[1] / "scripts" / "gpu_check.sh"
pytestmark = pytest.mark.slow  # each test starts a script as a process


def run(*options: str, python_path: Path | None = None, status: int = 0) -> str:
    """The script's output with these options (at a tiny size, one thread, one step), ``python_path`` first on its
    import path, ending with exit ``status``."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # the Triton kernels on the CPU, where their launches are counted
    if python_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(python_path), env.get("PYTHONPATH"))))
    command = [
        sys.executable,
        str(BENCHMARK),
        "--batch-size",
        "2",
        "--threads",
        "1",
        "--steps",
        "1",
        "--warmup",
        "1",
        *options,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == status, done.stderr[-3000:]
    return done.stdout


def printed(*options: str) -> object:
    """What a single --variant (or --count-launches) run prints: one JSON line."""
    return json.loads(run(*options).splitlines()[-1])


def test_every_variant_runs_a_step_and_the_report_has_every_figure(tmp_path: Path) -> None:
    """The whole script at a tiny size: every variant (Norse's from the test extra), the ratios the targets are stated
    in, the memory table, the launch counts. SpikingJelly here is one that fails at import, as an anchor's backend
    might on some GPU: its figures are None with the reason, the rest of the report stands, and the exit status is 1."""
    broken = tmp_path / "broken" / "spikingjelly"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text('raise RuntimeError("this SpikingJelly cannot run here")\n')
    figures = tmp_path / "benchmark.json"
    table = run("--seq-length", "2", "--growth", "2", "3", "--json", str(figures), python_path=broken.parent, status=1)
    report = json.loads(figures.read_text())
    assert report["unmeasured"] == {"spikingjelly": "failed: RuntimeError: this SpikingJelly cannot run here"}
    assert "spikingjelly                (failed: RuntimeError: this SpikingJelly cannot run here)" in table
    variants = {
        "snn_train_fp32",
        "snn_train_bf16",
        "reference_loop",
        "ann_limit_fp32",
        "ann_limit_bf16",
        "ann_conv1_every_step_fp32",
        "ann_conv1_every_step_bf16",
        "norse",
        "norse_tuned_allocator",
        "spikingjelly",
    }
    for figure in ("train_step_ms", "samples_per_s", "peak_memory_mb", "page_faults_per_step", "first_step_s"):
        assert set(report[figure]) == variants, figure
        assert all(report[figure][v] is not None for v in variants - {"spikingjelly"}), figure
    assert all(report["train_step_ms"][v] > 0 for v in variants - {"spikingjelly"})
    assert set(report["config"]) == {
        "seq_length",
        "batch_size",
        "threads",
        "device",
        "cpu",
        "bf16_native",
        "load_average",
    }
    assert isinstance(report["config"]["bf16_native"], bool) and report["config"]["cpu"]
    ratios = report["ratios"]
    assert ratios.pop("fp32_speed_over_spikingjelly") is None
    assert set(ratios) == {
        "fp32_step_over_ann_limit",
        "bf16_step_over_ann_limit_bf16",
        "fp32_speed_over_norse",
        "fp32_peak_memory_over_norse",
    }
    assert all(ratio > 0 for ratio in ratios.values())
    ms = report["train_step_ms"]
    assert report["ratios"]["fp32_step_over_ann_limit"] == pytest.approx(
        ms["snn_train_fp32"] / ms["ann_limit_fp32"], 0.05
    )
    assert set(report["memory_by_seq_length"]) == {"2", "3"}
    # at --seq-length, and for the default surrogate, the command is snn_train_fp32's: its figure, not a second run
    assert report["memory_by_seq_length"]["2"]["train_step_ms"] == ms["snn_train_fp32"]
    assert report["train_step_ms_by_surrogate"]["super"] == ms["snn_train_fp32"]
    assert set(report["launches_per_step"]) == {"cuda_triton", "cuda_torch"}
    assert set(report["train_step_ms_by_surrogate"]) == set(SURROGATES)
    assert all(ms > 0 for ms in report["train_step_ms_by_surrogate"].values())
    assert report["inference_samples_per_s"] > 0 and report["evaluation_samples_per_s"] > 0
    assert report["data_and_encoding_ms"] > 0
    assert all(variant in table for variant in variants)


def test_peak_memory_is_the_training_steps_not_that_of_the_evaluation_after_them() -> None:
    """snn_train_fp32's process also times inference and evaluation (256 samples at T=16: conv1's currents alone take
    302 MB) after its training steps; its peak memory is the steps', at a batch of 2 within 100 MB of that of the ANN
    limit's process, which evaluates nothing (measured 715 and 708 MB; 1 329 MB when taken after the evaluation)."""
    snn = printed("--variant", "snn_train_fp32", "--seq-length", "16")["peak_memory_mb"]
    ann = printed("--variant", "ann_limit_fp32", "--seq-length", "16")["peak_memory_mb"]
    assert snn < ann + 100


@pytest.mark.triton
@pytest.mark.skipif(interpreter_defect() is not None, reason=str(interpreter_defect()))
def test_with_triton_kernels_a_step_launches_as_many_kernels_whatever_t() -> None:
    """One forward and one backward launch per LIF layer: the count does not grow with T, as the torch kernels' does
    (a few operations per step and layer forward, a compiled kernel per step and layer backward)."""
    triton = {
        T: printed("--variant", "snn_train_fp32", "--count-launches", "triton", "--seq-length", str(T)) for T in (2, 3)
    }
    torch_kernels = {
        T: printed("--variant", "snn_train_fp32", "--count-launches", "torch", "--seq-length", str(T)) for T in (2, 3)
    }
    assert triton[2] == triton[3] <= 80
    assert torch_kernels[3] - torch_kernels[2] >= 3 * 2  # 3 LIF layers, at least one launch per step and direction
    assert triton[2] < torch_kernels[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, gpu_check.sh runs (minutes): see README")
def test_gpu_check_without_a_gpu_stops_in_one_line_before_doing_anything(tmp_path: Path) -> None:
    done = subprocess.run(
        ["bash", str(GPU_CHECK), str(tmp_path / "out"), str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert done.stderr == "gpu_check.sh: error: torch sees no CUDA GPU here; run this on a machine with one\n"
    assert not (tmp_path / "out").exists()
