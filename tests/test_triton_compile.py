"""The Triton LIF kernels compiled for data-centre GPUs (A100 sm_80, H100/H200 sm_90, B200 sm_100) on this machine,
which has none: Triton's code generator and ptxas accept every variant the layer launches, the neuron state stays in
registers (no local memory, which is where spills go), and the forward kernel has no fused multiply-add, which is what
makes its spikes equal the step loop's on a GPU as they do under the interpreter (tests/test_triton.py: there the
kernels run as Python on NumPy, and nothing is compiled). tests/triton_compile.py does the compiling, in a process
of its own without TRITON_INTERPRET and with an empty kernel cache.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from snn_train.surrogates import SURROGATES

COMPILE = Path(__file__).with_name("triton_compile.py")
pytestmark = [
    pytest.mark.triton,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (the CUDA builds of torch)"),
]


@pytest.fixture(scope="module", params=[80, 90, 100], ids=lambda arch: f"sm_{arch}")
def kernels(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """triton_compile.py's description of every distinct kernel it compiled for the architecture."""
    folder = tmp_path_factory.mktemp(f"sm_{request.param}")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(folder / "cache")
    out = folder / "kernels.json"
    run = subprocess.run([sys.executable, COMPILE, str(request.param), out], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(out.read_text())


def test_every_variant_compiles(kernels: list[dict]) -> None:
    """Both kernels in each dtype and for T = 1 (which Triton makes a constant), the backward for every surrogate and
    every learned value, the forward recording voltages or not and saving for backward or not."""
    forward = [kernel for kernel in kernels if kernel["name"] == "_forward_kernel"]
    backward = [kernel for kernel in kernels if kernel["name"] == "_backward_kernel"]
    assert {kernel["signature"]["currents"] for kernel in forward} == {"*fp32", "*bf16", "*fp16"}
    assert {kernel["signature"]["grad_spikes"] for kernel in backward} == {"*fp32", "*bf16", "*fp16"}
    assert {kernel["constexprs"]["SURROGATE"] for kernel in backward} == set(SURROGATES)
    learned = ("LEARN_TAU", "LEARN_TH")
    for kernels_of, flags in ((forward, ("RECORD", "SAVE", *learned)), (backward, learned)):
        assert {kernel["constexprs"].get("steps") for kernel in kernels_of} == {None, "1"}
        for flag in flags:
            assert {kernel["constexprs"][flag] for kernel in kernels_of} == {"False", "True"}


def test_state_stays_in_registers(kernels: list[dict]) -> None:
    assert [(kernel["name"], kernel["stack"], kernel["local"]) for kernel in kernels] == [
        (kernel["name"], 0, 0) for kernel in kernels
    ]


def test_forward_has_no_fused_multiply_add(kernels: list[dict]) -> None:
    """Each forward step rounds after every multiply and add, as lif_step does (``enable_fp_fusion=False``)."""
    assert [kernel["ffma"] for kernel in kernels if kernel["name"] == "_forward_kernel"] == [
        0 for kernel in kernels if kernel["name"] == "_forward_kernel"
    ]
