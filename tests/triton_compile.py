"""Compile the Triton LIF kernels for a CUDA GPU that is not here, as the layer would launch them, and describe the
machine code: what Triton's interpreter cannot show (it runs the kernels' Python on NumPy, and compiles nothing).

Usage: python triton_compile.py ARCH OUT_JSON      (ARCH: a compute capability as an integer, 90 for sm_90)

Run without TRITON_INTERPRET. Triton is told the current GPU has compute capability ARCH; each launch of
``triton_lif`` is turned into ``warmup`` (compile, do not launch) and ``lif_sequence_triton`` is driven forward and
backward over every surrogate, dtype, learned value, recording choice, T = 1 and the layouts the layer gets
(channels-last, repeated over time), so that every specialization a GPU would compile is compiled, through ptxas to
a cubin. OUT_JSON lists, per distinct kernel: its name, the constexprs, the signature, and from the cubin (the
cuobjdump that ships with Triton) the registers, stack and local memory per thread and the count of fused
multiply-adds (FFMA) in its SASS.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import triton.backends.nvidia
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver

from snn_train import LIFParameters, triton_lif

CUOBJDUMP = Path(triton.backends.nvidia.__file__).with_name("bin") / "cuobjdump"


class CompileTarget:
    """What Triton's JIT asks of the driver before compiling: a device, a stream and the target; nothing is run."""

    def __init__(self, arch: int) -> None:
        self.arch = arch

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.arch, 32)


class CompileOnly:
    """``kernel[grid](...)`` that compiles for the target and keeps the compiled kernel, instead of launching."""

    def __init__(self, kernel: Any, compiled: list) -> None:
        self.kernel, self.compiled = kernel, compiled

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        return lambda *args, **kwargs: self.compiled.append(self.kernel.warmup(*args, grid=grid, **kwargs))


def layouts(steps: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """Currents [T, B, C, H, W] as the layer gets them: contiguous, channels-last, one step repeated over time."""
    plain = torch.rand(steps, 2, 3, 5, 5).to(dtype)
    channels_last = torch.rand(steps * 2, 3, 5, 5).to(dtype, memory_format=torch.channels_last).view(steps, 2, 3, 5, 5)
    repeated = torch.rand(1, 2, 3, 5, 5).to(dtype).expand(steps, -1, -1, -1, -1)
    return [plain, channels_last, repeated]


def drive(surrogate: str, learned: tuple[str, ...], record: bool, currents: torch.Tensor) -> None:
    """One forward (and, with gradients, one backward) pass of lif_sequence_triton: its launches compile."""
    p = LIFParameters(150.0, 300.0, 0.1, 0.7, -0.2, 1e-3, surrogate=surrogate, alpha=5.0)
    values = {name: torch.tensor(getattr(p, name), requires_grad=True) for name in learned}
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            spikes, _ = triton_lif.lif_sequence_triton(currents.requires_grad_(grad), p, record, **values)
        if grad:
            spikes.backward(torch.ones_like(spikes))


def cuobjdump(kernel: Any, flag: str) -> str:
    """What Triton's cuobjdump prints of the kernel's cubin with ``flag``."""
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        return subprocess.run([CUOBJDUMP, flag, cubin], check=True, capture_output=True, text=True).stdout


def described(kernel: Any) -> dict[str, Any]:
    """The kernel's name, target, constexprs and signature by argument name; from its cubin the registers, stack and
    local memory per thread and, for the forward kernel, the FFMA instructions of its SASS (disassembling takes
    the better part of a second, so the backward kernel, which may fuse, is left out)."""
    names = kernel.src.fn.arg_names
    resources = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", cuobjdump(kernel, "-res-usage")))
    forward = kernel.metadata.name == "_forward_kernel"
    return {
        "name": kernel.metadata.name,
        "arch": kernel.metadata.target.arch,
        "constexprs": {names[key[0]]: str(value) for key, value in kernel.src.constants.items()},
        "signature": dict(kernel.src.signature),
        "registers": int(resources["REG"]),
        "stack": int(resources["STACK"]),
        "local": int(resources["LOCAL"]),
        "ffma": len(re.findall(r"\bFFMA\b", cuobjdump(kernel, "-sass"))) if forward else None,
    }


def cases() -> list[tuple[str, tuple[str, ...], bool, torch.Tensor]]:
    """The default training case (super, nothing learned, no recording, T = 4, float32, contiguous), then each of
    those choices changed alone to each of its other values: every value of every constexpr and every kind of
    argument is compiled at least once, without compiling all their combinations (each takes a tenth of a second)."""
    default = ("super", (), False, layouts(4, torch.float32)[0])
    learned = [("tau_mem_inv",), ("v_th",), ("tau_mem_inv", "v_th")]
    return [
        default,
        *[(surrogate, (), False, default[3]) for surrogate in triton_lif.SURROGATES if surrogate != "super"],
        *[("super", values, False, default[3]) for values in learned],
        ("super", (), True, default[3]),
        ("super", (), False, layouts(1, torch.float32)[0]),
        *[
            ("super", (), False, currents)
            for dtype in (torch.bfloat16, torch.float16)
            for currents in layouts(4, dtype)[:1]
        ],
        *[("super", (), False, currents) for currents in layouts(4, torch.float32)[1:]],
    ]


def main(arch: int, out: Path) -> None:
    assert os.environ.get("TRITON_INTERPRET") != "1", "the interpreter compiles nothing: run without TRITON_INTERPRET"
    driver.set_active(CompileTarget(arch))
    compiled: list = []
    triton_lif._forward_kernel = CompileOnly(triton_lif._forward_kernel, compiled)
    triton_lif._backward_kernel = CompileOnly(triton_lif._backward_kernel, compiled)
    for case in cases():
        drive(*case)
    unique = {kernel.hash: kernel for kernel in compiled}
    out.write_text(json.dumps([described(kernel) for kernel in unique.values()], indent=1))


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]))
