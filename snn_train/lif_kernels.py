"""``model.kernel``: the registry of the functions that run a LIF layer over a whole sequence, and where Triton runs.

Each entry picks, for a layer's currents, a function that takes and returns what ``neurons.lif_sequence`` does:
``torch`` that fused PyTorch kernel (any device), ``triton`` the two Triton kernels of ``triton_lif`` (a CUDA GPU, or
CPU tensors under Triton's interpreter), ``auto`` Triton's on a CUDA GPU and torch's elsewhere. Triton is optional:
``triton_lif`` is imported only where it runs.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import re
from collections.abc import Callable

import torch

from snn_train.neurons import LIFParameters, counted_and_pooled, lif_sequence


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_defect_of(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's interpreter cannot run the kernels with these versions, or None. Before Triton 3.7 the interpreter
    holds each integer argument as a one-element array and reads a loop bound from it with int(), which NumPy refuses
    from 2.4 on (triton-lang/triton#9171); the kernels loop over T, an argument."""
    triton, numpy = (tuple(map(int, re.match(r"(\d+)\.(\d+)", v).groups())) for v in (triton_version, numpy_version))
    if triton < (3, 7) and numpy >= (2, 4):
        return (
            f"Triton {triton_version}'s interpreter fails under NumPy {numpy_version} (triton-lang/triton#9171, "
            "fixed in Triton 3.7): install triton>=3.7 or numpy<2.4"
        )
    return None


def interpreter_defect() -> str | None:
    """interpreter_defect_of the installed Triton and NumPy (None without Triton)."""
    if not _triton_installed():
        return None
    return interpreter_defect_of(*map(importlib.metadata.version, ("triton", "numpy")))


def triton_runs_on(device: torch.device) -> bool:
    """Whether the Triton LIF kernels can run on ``device``: Triton installed, and a CUDA GPU or, for CPU tensors,
    Triton's interpreter (TRITON_INTERPRET=1) where it has no interpreter_defect."""
    if not _triton_installed():
        return False
    return device.type == "cuda" or (os.environ.get("TRITON_INTERPRET") == "1" and interpreter_defect() is None)


# (currents, p, record_voltage, compiled, tau_mem_inv, v_th, pool, count) → (spikes, max-pooled if pool > 1, and
# voltages or None), the number of spikes added to count if given, as neurons.lif_sequence
LIFKernel = Callable[
    [torch.Tensor, LIFParameters, bool, bool, torch.Tensor | None, torch.Tensor | None, int, torch.Tensor | None],
    tuple[torch.Tensor, torch.Tensor | None],
]


def _triton(
    currents: torch.Tensor,
    p: LIFParameters,
    record_voltage: bool,
    compiled: bool,
    tau_mem_inv: torch.Tensor | None,
    v_th: torch.Tensor | None,
    pool: int = 1,
    count: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """triton_lif.lif_sequence_triton: one forward and one backward launch (``compiled`` does not apply), then the
    count and the pooling."""
    from snn_train.triton_lif import lif_sequence_triton  # Triton is optional: imported only where it runs

    spikes, voltages = lif_sequence_triton(currents, p, record_voltage, tau_mem_inv, v_th)
    return counted_and_pooled(spikes, pool, count), voltages


# model.kernel → the LIF sequence function for these currents (``lif_sequence`` looked up when called)
KERNELS: dict[str, Callable[[torch.Tensor], LIFKernel]] = {
    "auto": lambda currents: _triton if currents.is_cuda and triton_runs_on(currents.device) else lif_sequence,
    "triton": lambda currents: _triton,
    "torch": lambda currents: lif_sequence,
}
