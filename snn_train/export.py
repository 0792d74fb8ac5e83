"""A trained network as a NIR graph (Neuromorphic Intermediate Representation), for hardware toolchains and simulators.

The graph, per time step, for the reference network::

    input (C, H, W) → conv1_conv → conv1_lif (CubaLIF) → conv1_sumpool → conv1_threshold → conv2_conv → conv2_lif → …
    → flatten → fc1_affine → fc1_lif (CubaLIF) → … → readout_linear (Affine with a bias) → readout_li (CubaLI) → output

Max-pooling has no NIR node, but on spikes (0 or 1) a p×p max-pool is exactly a p×p SumPool2d (stride p) followed
by a Threshold at 0.5: the sum is ≥ 1 exactly where the maximum is 1. Batch norm (its running statistics, as
evaluation uses them) and the conv scale are folded into the convolution, an fc layer's batch norm into its affine
map (s = 1): W' = s·γ/√(σ² + ε)·W and b' = s·(γ·(b − μ)/√(σ² + ε) + β). Learned τm and v_th enter at their trained
values. Parameters are float64: the checkpoint's float32 weights exactly, the folded ones and the time constants
computed in float64.

From this project's Euler step to NIR's continuous-time neurons. One LIF step of length dt with input x_n::

    i ← i + x_n;   v ← v + dt·τm⁻¹·(v_leak − v + i);   i ← i − dt·τs⁻¹·i;   z = Θ(v − v_th);   v ← (1 − z)·v + z·v_reset

Write I_n for the synaptic current just after step n's input has arrived, the value the voltage update uses.
Then I_n = (1 − dt/τs)·I_(n−1) + x_n, that is::

    I_n = I_(n−1) + (dt/τs)·(−I_(n−1) + (τs/dt)·x_n)
    v_n = v_(n−1) + (dt/τm)·(v_leak − v_(n−1) + 1·I_n)

which is the forward-Euler step, of length dt, of NIR's CubaLIF::

    τ_syn·dI/dt = −I + w_in·S        τ_mem·dv/dt = (v_leak − v) + r·I        z = v > v_threshold, then v = v_reset

with S_n = x_n and tau_syn = 1/τs⁻¹, tau_mem = 1/τm⁻¹, r = 1, w_in = tau_syn/dt = 1/(dt·τs⁻¹),
v_threshold = v_th, and v_leak, v_reset as they are. (An input x held for one step of length dt raises I by
(dt/tau_syn)·w_in·x = x, as ``i ← i + x`` does.) CubaLI is the readout, the same without spike and reset.
A simulator reproduces the trained network only if it: steps at exactly dt = ``model.lif.dt`` (the graph's
``dt`` metadata) for ``time_steps`` steps, feeding each step's input as one value held for that step; within a
step updates I first, then v from the new I, then spikes and resets; and starts from rest, v = v_leak and I = 0.
Exact integration of the ODEs, or another step, computes a different network.

What NIR cannot say (the encoder that turns an image into the input sequence, T, dt, the decoder that turns
the readout voltages into logits, the initial state, the update order) goes into the graph's metadata.
"""

from __future__ import annotations

import copy
import io
import itertools
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from snn_train.checkpoint import evaluated_weights, find_checkpoint, load_checkpoint, write_atomically
from snn_train.errors import ExportError
from snn_train.model import LI, LIF, ConvSNN
from snn_train.report import training_config
from snn_train.schema import Config, ExportConfig

if TYPE_CHECKING:
    import nir

EXTRA = "pip install 'snn-train[nir]'"
MAX_POOL_THRESHOLD = 0.5  # SumPool2d then Threshold at 0.5 is a max-pool on 0/1 spikes
DECODER_RULES = {
    "max": "logits = maximum over the time steps of the output (readout voltage)",
    "mean": "logits = mean over the time steps of the output (readout voltage)",
    "last": "logits = the output (readout voltage) at the last time step",
}
EULER_STEP = (
    "per time step of length dt, for each CubaLIF / CubaLI node with input S: I <- I + dt/tau_syn*(-I + w_in*S); "
    "v <- v + dt/tau_mem*(v_leak - v + r*I) (with the new I); CubaLIF: z = v > v_threshold, v <- v_reset where z"
)


def import_nir() -> ModuleType:
    """The ``nir`` package, or ExportError naming the extra that installs it."""
    try:
        import nir
    except ImportError:
        raise ExportError(f"exporting to NIR needs the nir package: {EXTRA}") from None
    return nir


def array(value: float, shape: Sequence[int]) -> np.ndarray:
    """One neuron parameter for every neuron of a layer: float64 [shape]."""
    return np.full(tuple(shape), value, dtype=np.float64)


def cuba_lif(nir: ModuleType, layer: LIF, shape: Sequence[int]) -> nir.CubaLIF:
    """A LIF layer as CubaLIF (module docstring), its learned τm and v_th at their trained values."""
    p = layer.p
    learned_tau_mem_inv = layer.tau_mem_inv()
    tau_mem_inv = p.tau_mem_inv if learned_tau_mem_inv is None else learned_tau_mem_inv.item()
    v_th = p.v_th if layer.v_th is None else layer.v_th.item()
    return nir.CubaLIF(
        tau_syn=array(1 / p.tau_syn_inv, shape),
        tau_mem=array(1 / tau_mem_inv, shape),
        r=array(1.0, shape),
        v_leak=array(p.v_leak, shape),
        v_threshold=array(v_th, shape),
        v_reset=array(p.v_reset, shape),
        w_in=array(1 / (p.dt * p.tau_syn_inv), shape),
    )


def cuba_li(nir: ModuleType, readout: LI, shape: Sequence[int]) -> nir.CubaLI:
    """The leaky-integrator readout as CubaLI (module docstring)."""
    p = readout.p
    return nir.CubaLI(
        tau_syn=array(1 / p.tau_syn_inv, shape),
        tau_mem=array(1 / p.tau_mem_inv, shape),
        r=array(1.0, shape),
        v_leak=array(p.v_leak, shape),
        w_in=array(1 / (p.dt * p.tau_syn_inv), shape),
    )


def folded(
    layer: nn.Conv2d | nn.Linear, norm: nn.Module, scale: float, name: str
) -> tuple[np.ndarray, np.ndarray, str]:
    """scale·norm(layer(x)) as one layer's weight and bias (float64), and what was folded into it."""
    weight, bias = layer.weight.detach(), layer.bias.detach()
    folded = f"scale {scale:g}"
    if isinstance(norm, nn.BatchNorm1d | nn.BatchNorm2d) and norm.running_mean is not None:
        gain = norm.weight.detach() / torch.sqrt(norm.running_var + norm.eps)
        weight = weight * gain.view(-1, *[1] * (weight.dim() - 1))
        bias = gain * (bias - norm.running_mean) + norm.bias.detach()
        folded = f"batch norm (running statistics), {folded}"
    elif not isinstance(norm, nn.Identity):
        only = "only a batch norm with running statistics folds into the layer before it"
        raise ExportError(f"cannot export {name}: NIR has no {type(norm).__name__}, and {only}")
    return (scale * weight).numpy(), (scale * bias).numpy(), folded


def graph_nodes(nir: ModuleType, model: ConvSNN) -> dict[str, nir.NIRNode]:
    """The nodes of ``model`` (in float64) in order from input to output, with shapes per time step (no batch, no
    time)."""
    c, h, w = model.input_shape
    nodes: dict[str, Any] = {"input": nir.Input(input_type=np.array([c, h, w]))}
    p = model.pool_size
    for n, (conv, norm, scale, lif) in enumerate(zip(model.convs, model.norms, model.conv_scales, model.conv_lifs), 1):
        weight, bias, what = folded(conv, norm, scale, f"conv{n}")
        nodes[f"conv{n}_conv"] = nir.Conv2d(
            input_shape=(h, w),
            weight=weight,
            stride=1,
            padding=0,
            dilation=1,
            groups=1,
            bias=bias,
            metadata={"folded": what},
        )
        c, h, w = conv.out_channels, h - conv.kernel_size[0] + 1, w - conv.kernel_size[1] + 1
        nodes[f"conv{n}_lif"] = cuba_lif(nir, lif, (c, h, w))
        nodes[f"conv{n}_sumpool"] = nir.SumPool2d(
            kernel_size=np.array([p, p]), stride=np.array([p, p]), padding=np.array([0, 0])
        )
        h, w = h // p, w // p
        nodes[f"conv{n}_threshold"] = nir.Threshold(
            threshold=array(MAX_POOL_THRESHOLD, (c, h, w)),
            metadata={"max_pool": f"{p}x{p} max-pool of the spikes, as SumPool2d then > 0.5"},
        )
    nodes["flatten"] = nir.Flatten(input_type={"input": np.array([c, h, w])}, start_dim=0, end_dim=-1)
    for n, (fc, norm, lif) in enumerate(zip(model.fcs, model.fc_norms, model.fc_lifs), 1):
        weight, bias, what = folded(fc, norm, 1.0, f"fc{n}")
        metadata = {} if isinstance(norm, nn.Identity) else {"folded": what}
        nodes[f"fc{n}_affine"] = nir.Affine(weight=weight, bias=bias, metadata=metadata)
        nodes[f"fc{n}_lif"] = cuba_lif(nir, lif, (fc.out_features,))
    readout = model.readout_linear
    weight = readout.weight.detach().numpy()
    nodes["readout_linear"] = (
        nir.Linear(weight=weight)
        if readout.bias is None
        else nir.Affine(weight=weight, bias=readout.bias.detach().numpy())
    )
    nodes["readout_li"] = cuba_li(nir, model.readout, (readout.out_features,))
    nodes["output"] = nir.Output(output_type=np.array([readout.out_features]))
    return nodes


def check_finite(nodes: dict[str, Any]) -> None:
    """Refuse a graph with a NaN or infinite parameter (no NIR consumer can run one), naming the node and parameter."""
    for name, node in nodes.items():
        for key, value in vars(node).items():
            if isinstance(value, np.ndarray) and value.dtype.kind == "f" and not np.isfinite(value).all():
                reason = f"its {key} holds NaN or infinite values; retrain or use an earlier checkpoint"
                raise ExportError(f"cannot export {name}: {reason}")


def to_nir(model: ConvSNN, metadata: dict[str, Any]) -> nir.NIRGraph:
    """The network as a type-checked NIR graph of the nodes above, one edge after another, with ``metadata``.

    The model is read in float64, so time constants and folded weights carry no float32 rounding of their own.
    """
    nir = import_nir()
    with torch.no_grad():
        nodes = graph_nodes(nir, copy.deepcopy(model).double())
    check_finite(nodes)
    return nir.NIRGraph(nodes=nodes, edges=list(itertools.pairwise(nodes)), metadata=metadata)


def graph_metadata(
    file: Path, checkpoint: dict[str, Any], train_cfg: Config, input_shape: Sequence[int]
) -> dict[str, Any]:
    """What the graph cannot express: how to feed it (encoder, T, dt, initial state, update order) and read it
    (decoder)."""
    encoder = OmegaConf.to_container(train_cfg.encoder, resolve=True)
    return {
        "generator": "snn-train",
        "checkpoint": str(file),
        "epoch": checkpoint["loop"]["epoch"],
        "step": checkpoint["loop"]["step"],
        "dt": train_cfg.model.lif.dt,
        "time_steps": train_cfg.seq_length,
        "euler_step": EULER_STEP,
        "initial_state": "v = v_leak, I = 0 in every CubaLIF and CubaLI node",
        "input": f"per time step, the encoder's output for an image scaled to [0, 1], shape {tuple(input_shape)}",
        "encoder": encoder,
        "decoder": train_cfg.decoder,
        "decoder_rule": DECODER_RULES[train_cfg.decoder],
    }


def load_network(file: Path, checkpoint: dict[str, Any], train_cfg: Config, input_shape: Sequence[int]) -> ConvSNN:
    """The checkpoint's network for images of ``input_shape``, or ExportError if they do not fit it."""
    try:
        model = ConvSNN.from_config(train_cfg.model, input_shape)
        model.load_state_dict(evaluated_weights(checkpoint))
    except (ValueError, RuntimeError) as error:
        reason = str(error).strip().splitlines()[-1].strip()
        raise ExportError(f"input_shape={list(input_shape)} does not fit the network of {file} ({reason})") from None
    return model.eval()


def export_checkpoint(cfg: ExportConfig) -> dict[str, Any]:
    """Write ``cfg.checkpoint``'s network as a NIR graph to ``cfg.out`` (default model.nir beside it); returns the
    report."""
    nir = import_nir()
    file = find_checkpoint(Path(cfg.checkpoint))
    checkpoint = load_checkpoint(file)
    train_cfg = training_config(file, checkpoint)
    input_shape = list(cfg.input_shape)
    metadata = graph_metadata(file, checkpoint, train_cfg, input_shape)
    graph = to_nir(load_network(file, checkpoint, train_cfg, input_shape), metadata)
    out = Path(cfg.out) if cfg.out is not None else file.with_name("model.nir")
    buffer = io.BytesIO()
    nir.write(buffer, graph)
    write_atomically(out, lambda f: f.write(buffer.getvalue()))
    return {"checkpoint": str(file), "out": str(out), "nir_version": nir.version, "graph": graph, "metadata": metadata}


def format_report(report: dict[str, Any]) -> str:
    """The report for the terminal: the file written, each node and its output shape, and what went to metadata."""
    graph, metadata = report["graph"], report["metadata"]
    lines = [
        f"checkpoint   {report['checkpoint']} (epoch {metadata['epoch']}, step {metadata['step']})",
        f"wrote        {report['out']} (NIR {report['nir_version']}, {len(graph.nodes)} nodes)",
        (
            f"simulate     forward Euler at dt = {metadata['dt']:g} s for {metadata['time_steps']} steps from rest "
            "(v = v_leak, I = 0), I updated before v"
        ),
        "",
        f"  {'node':<18}{'type':<11}output shape",
        *(
            f"  {name:<18}{type(node).__name__:<11}{tuple(int(n) for n in node.output_type['output'])}"
            for name, node in graph.nodes.items()
        ),
        "",
        "folded into the weights: "
        + "; ".join(
            f"{name}: {node.metadata['folded']}" for name, node in graph.nodes.items() if "folded" in node.metadata
        ),
        "not expressible in NIR, written to the graph's metadata:",
        f"  encoder      {', '.join(f'{key}={value}' for key, value in metadata['encoder'].items())}",
        f"  decoder      {metadata['decoder']}: {metadata['decoder_rule']}",
        f"  time_steps   {metadata['time_steps']}",
        f"  dt           {metadata['dt']:g} s",
        f"  initial      {metadata['initial_state']}",
    ]
    return "\n".join(lines)
