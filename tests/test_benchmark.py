"""scripts/benchmark.py, briefly: a variant's timed step, and the kernel launches a training step makes on the CUDA
path; scripts/gpu_check.sh where there is no GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARK = Path(__file__).parents[1] / "scripts" / "benchmark.py"
GPU_CHECK = Path(__file__).parents[1] / "scripts" / "gpu_check.sh"
pytestmark = pytest.mark.slow  # each test starts a script as a process


def run(*options: str) -> object:
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # the Triton kernels on the CPU, where their launches are counted
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
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_the_reference_loop_variant_times_a_step() -> None:
    result = run("--variant", "reference_loop", "--seq-length", "2")
    assert result["train_step_ms"] > 0 and result["samples_per_s"] == pytest.approx(2000 / result["train_step_ms"])


@pytest.mark.triton
def test_with_triton_kernels_a_step_launches_as_many_kernels_whatever_t() -> None:
    """One forward and one backward launch per LIF layer: the count does not grow with T, as the torch kernels' does
    (a few operations per step and layer forward, a compiled kernel per step and layer backward)."""
    triton = {
        T: run("--variant", "snn_train_fp32", "--count-launches", "triton", "--seq-length", str(T)) for T in (2, 3)
    }
    torch_kernels = {
        T: run("--variant", "snn_train_fp32", "--count-launches", "torch", "--seq-length", str(T)) for T in (2, 3)
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
