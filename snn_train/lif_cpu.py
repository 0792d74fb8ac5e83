"""The LIF layer's CPU kernels: lif_cpu.cpp, one pass over memory per direction, built with torch's extension tools.

The forward kernel walks each block of neurons through all T steps with v and i in a local array, so it reads each
current and writes each spike once; the backward kernel recomputes the voltages from the currents (the same
arithmetic, so exactly) and runs the pass through time in reverse. Nothing but the currents is kept for backward.
The source is plain C++ called through ctypes: no torch headers, so the first build takes about a second; it is
cached (``TORCH_EXTENSIONS_DIR``, by default ~/.cache/torch_extensions) and rebuilt when the source changes, one
build folder per instruction set and torch version.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from snn_train.neurons import LIFParameters

SOURCE = Path(__file__).with_name("lif_cpu.cpp")
DTYPES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2}  # lif_cpu.cpp's DType codes
# Vector instructions by the capability torch finds in this CPU (AVX-512 measured no faster than AVX2 here).
VECTOR_FLAGS = {"AVX2": ["-mavx2"], "AVX512": ["-mavx2"]}
SURROGATE_KINDS = {"super": 0, "tanh": 1, "triangle": 2, "circ": 3, "erfc": 4, "atan": 5}  # its Surrogate codes

_POINTER, _INT64, _DOUBLE, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int


@dataclass(frozen=True)
class Pooling:
    """p×p max-pooling of each step, whose values lie in memory as [outer, H, W, inner] (H, W multiples of p)."""

    size: int  # p
    width: int  # W
    inner: int  # the values per (h, w): the channels in channels-last order, 1 in contiguous order


NO_POOLING = Pooling(1, 1, 1)


@contextmanager
def _quiet_cpp_extension() -> Iterator[None]:
    """torch.utils.cpp_extension without its warnings, which would open every CPU run's output and concern code this
    build has none of: on import, "No CUDA runtime is found, using CUDA_HOME=…" on a machine with the CUDA toolkit but
    no GPU (CUDA extensions); on a build with a compiler other than torch's own g++, the C++ ABI check (code that
    includes torch's headers: lif_cpu.cpp includes none). A failed build still raises, and is reported."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def build_name(vector: list[str]) -> str:
    """The build's name, and its folder's: one per instruction set and torch version. Two environments with different
    torch versions share the cache: torch 2.14 leaves its build lock's file in the folder, and torch 2.11, which waits
    while such a file exists, would wait there forever."""
    torch_version = re.sub(r"\W", "_", torch.__version__)
    return "_".join(["snn_train_lif_cpu", *(flag.removeprefix("-m") for flag in vector), f"torch{torch_version}"])


@functools.cache
def library() -> ctypes.CDLL:
    """lif_cpu.cpp, built on first use for this CPU's vector instructions (IEEE arithmetic: no contraction into fused
    multiply-adds, so spikes equal the reference's; no errno or floating-point exception flags to keep, which would
    stop the backward loop from vectorizing and change no result) with OpenMP, which resolves to torch's own runtime
    and thread count."""
    vector = VECTOR_FLAGS.get(torch.backends.cpu.get_cpu_capability(), [])
    with _quiet_cpp_extension():
        from torch.utils import cpp_extension  # it takes a while to import, and only this build needs it

        path = cpp_extension.load(
            build_name(vector),
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", *vector],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    lib = ctypes.CDLL(path)
    lib.lif_forward.argtypes = [_INT, _POINTER, *[_INT64] * 6, *[_POINTER] * 3, *[_DOUBLE] * 5, _INT]
    lib.lif_backward.argtypes = [
        *[_INT, _POINTER, _INT64, _POINTER, *[_INT64] * 6, _INT, _POINTER],
        *[_DOUBLE] * 6,
        *[_INT, _INT, ctypes.POINTER(_DOUBLE), ctypes.POINTER(_DOUBLE), _INT],
    ]
    return lib


def runs(currents: torch.Tensor, surrogate: str) -> bool:
    """Whether these kernels take these currents: on the CPU, in float32, float64 or bfloat16, with a surrogate they
    know (one added to surrogates.py alone runs on the torch kernel)."""
    return currents.device.type == "cpu" and currents.dtype in DTYPES and surrogate in SURROGATE_KINDS


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision of v and i (and of recorded voltages): float64 for float64 currents, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rates(p: LIFParameters) -> tuple[float, float, float, float, float]:
    """(dt·τm⁻¹, dt·τs⁻¹, v_leak, v_th, v_reset) as the torch kernel rounds them."""
    return p.dt * p.tau_mem_inv, p.dt * p.tau_syn_inv, p.v_leak, p.v_th, p.v_reset


def forward(
    steps: torch.Tensor,
    p: LIFParameters,
    record_voltage: bool,
    pooling: Pooling = NO_POOLING,
    count: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Spikes [T, N] in the currents' dtype (max-pooled, [T, N/p²], with ``pooling``) and, if asked, post-reset
    voltages [T, N] in the state's precision, for ``steps`` [T, ...]: each step dense in memory (its own stride over T,
    0 for an input repeated over time). ``count``, a float64 scalar, gets the number of spikes (before pooling) added,
    counted as they are made."""
    T, N = len(steps), steps[0].numel()
    spikes = torch.empty(T, N // pooling.size**2, dtype=steps.dtype)
    voltages = torch.empty(T, N, dtype=state_dtype(steps.dtype)) if record_voltage else None
    library().lif_forward(
        DTYPES[steps.dtype],
        steps.data_ptr(),
        steps.stride(0),
        T,
        N,
        pooling.width,
        pooling.inner,
        pooling.size,
        spikes.data_ptr(),
        None if voltages is None else voltages.data_ptr(),
        None if count is None else count.data_ptr(),
        *_rates(p),
        torch.get_num_threads(),
    )
    return spikes, voltages


def backward(
    steps: torch.Tensor,
    grad_spikes: torch.Tensor,
    p: LIFParameters,
    learned: bool,
    pooling: Pooling = NO_POOLING,
    sum_over_time: bool = False,
) -> tuple[torch.Tensor, float, float]:
    """The gradient of the currents [T, N] in their dtype (with ``sum_over_time`` its sum over the steps, [N]: that of
    a step repeated at every time step) from that of ``forward``'s spikes (in that dtype, each step dense in the same
    memory order as the currents'), and those of dt·τm⁻¹ and v_th (0.0 unless ``learned``)."""
    T, N = len(steps), steps[0].numel()
    grad_currents = torch.empty(N if sum_over_time else (T, N), dtype=steps.dtype)
    grad_a, grad_v_th = ctypes.c_double(), ctypes.c_double()
    library().lif_backward(
        DTYPES[steps.dtype],
        steps.data_ptr(),
        steps.stride(0),
        grad_spikes.data_ptr(),
        grad_spikes.stride(0),
        T,
        N,
        pooling.width,
        pooling.inner,
        pooling.size,
        sum_over_time,
        grad_currents.data_ptr(),
        *_rates(p),
        p.alpha,
        SURROGATE_KINDS[p.surrogate],
        learned,
        ctypes.byref(grad_a),
        ctypes.byref(grad_v_th),
        torch.get_num_threads(),
    )
    return grad_currents, grad_a.value, grad_v_th.value
