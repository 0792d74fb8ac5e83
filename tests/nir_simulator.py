"""A small NIR graph simulator for the tests, written from NIR 1.0.8's node definitions alone, not from snn_train.

Forward Euler at the step dt, one input value per step, float64 numpy, a batch dimension in front of NIR's shapes.
Neurons start at rest (I = 0, v = v_leak). Per step, CubaLIF and CubaLI (input S) integrate

    τ_syn·dI/dt = −I + w_in·S           τ_mem·dv/dt = (v_leak − v) + r·I

as I ← I + dt/τ_syn·(−I + w_in·S), then v ← v + dt/τ_mem·(v_leak − v + r·I) with the new I; CubaLIF then spikes,
z = v > v_threshold, and resets v to v_reset where it spiked. Conv2d is a cross-correlation with weight
(C_out, C_in, kH, kW); SumPool2d sums each window; Threshold is z = x > threshold; Flatten's dims exclude the batch.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import nir
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def windows(x: np.ndarray, size: tuple[int, int], stride: tuple[int, int], padding: Any) -> np.ndarray:
    """[B, C, H, W] as its windows [B, C, H', W', kH, kW] (no padding: the exporter writes none)."""
    if np.any(np.asarray(padding) != 0):
        raise NotImplementedError("padding")
    return sliding_window_view(x, size, axis=(2, 3))[:, :, :: stride[0], :: stride[1]]


def conv2d(node: nir.Conv2d, x: np.ndarray) -> np.ndarray:
    if node.groups != 1 or np.any(np.asarray(node.dilation) != 1):
        raise NotImplementedError("groups, dilation")
    patches = windows(x, node.weight.shape[-2:], tuple(np.broadcast_to(node.stride, 2)), node.padding)
    return np.einsum("bchwij,ocij->bohw", patches, node.weight) + node.bias[:, None, None]


def sum_pool(node: nir.SumPool2d, x: np.ndarray) -> np.ndarray:
    return windows(x, tuple(node.kernel_size), tuple(node.stride), node.padding).sum(axis=(-2, -1))


def flatten(node: nir.Flatten, x: np.ndarray) -> np.ndarray:
    shape = x.shape[1:]
    end = node.end_dim % len(shape)
    return x.reshape(len(x), *shape[: node.start_dim], -1, *shape[end + 1 :])


STATELESS = {
    nir.Input: lambda node, x: x,
    nir.Output: lambda node, x: x,
    nir.Conv2d: conv2d,
    nir.SumPool2d: sum_pool,
    nir.Threshold: lambda node, x: (x > node.threshold).astype(np.float64),
    nir.Flatten: flatten,
    nir.Affine: lambda node, x: x @ node.weight.T + node.bias,
    nir.Linear: lambda node, x: x @ node.weight.T,
    nir.Scale: lambda node, x: x * node.scale,
}


def topological_order(graph: nir.NIRGraph) -> list[str]:
    """Node names, each after all the nodes that feed it (Kahn's algorithm)."""
    waiting = {name: sum(1 for _, dst in graph.edges if dst == name) for name in graph.nodes}
    ready, order = deque(name for name, count in waiting.items() if count == 0), []
    while ready:
        name = ready.popleft()
        order.append(name)
        for src, dst in graph.edges:
            if src == name:
                waiting[dst] -= 1
                if waiting[dst] == 0:
                    ready.append(dst)
    assert len(order) == len(graph.nodes), "the graph has a cycle"
    return order


def simulate(graph: nir.NIRGraph, inputs: np.ndarray, dt: float) -> dict[str, np.ndarray]:
    """Every node's output at every step, [T, B, ...], for ``inputs`` [T, B, ...] fed to the graph's one Input node."""
    order = topological_order(graph)
    (input_name,) = graph.inputs
    state: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    outputs: dict[str, list[np.ndarray]] = {name: [] for name in order}
    for x in inputs.astype(np.float64):
        step: dict[str, np.ndarray] = {input_name: x}
        for name in order:
            node = graph.nodes[name]
            if name != input_name:
                x = sum(step[src] for src, dst in graph.edges if dst == name)
            if isinstance(node, (nir.CubaLIF, nir.CubaLI)):
                current, v = state.get(name, (np.zeros_like(x), np.broadcast_to(node.v_leak, x.shape).copy()))
                current = current + dt / node.tau_syn * (-current + node.w_in * x)
                v = v + dt / node.tau_mem * (node.v_leak - v + node.r * current)
                if isinstance(node, nir.CubaLIF):
                    spikes = v > node.v_threshold
                    v = np.where(spikes, node.v_reset, v)
                state[name] = current, v
                step[name] = spikes.astype(np.float64) if isinstance(node, nir.CubaLIF) else v
            else:
                step[name] = STATELESS[type(node)](node, x)
            outputs[name].append(step[name])
    return {name: np.stack(values) for name, values in outputs.items()}
