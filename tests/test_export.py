"""snn-export: the NIR graph survives nir.write/nir.read, and an independent NIR simulator runs it to ConvSNN's
spikes."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from snn_train import ConvSNN, load_config
from snn_train.checkpoint import load_checkpoint
from snn_train.cli import run_export
from snn_train.config import compose
from snn_train.data import load_split, to_unit_interval
from snn_train.encoders import build_encoder
from snn_train.errors import ExportError
from snn_train.export import to_nir
from snn_train.model import LayerTrace
from snn_train.train import fit

from conftest import make_mnist

nir = pytest.importorskip("nir")
from nir_simulator import simulate  # noqa: E402 (after the skip: it imports nir)

NETWORKS = {
    "default": [],
    "batch_norm": ["model.batch_norm=true"],
    "fc_batch_norm": ["model.fc_batch_norm=true", "model.fc_features=[64,32]"],
    "learned_tau_v_th": ["model.learn_tau_mem=true", "model.learn_v_th=true"],
    "other_constants": [
        "model.lif.dt=0.0005",
        "model.lif.tau_syn_inv=300",
        "model.lif.tau_mem_inv=150",
        "model.lif.v_leak=0.1",
        "model.lif.v_th=0.7",
        "model.lif.v_reset=-0.1",
        "model.readout.tau_syn_inv=250",
        "model.readout.tau_mem_inv=80",
        "model.readout.v_leak=0.05",
        "model.readout_bias=true",
        "model.conv_channels=[8,16]",
        "model.kernel_sizes=[4,3]",
        "model.conv_scales=[2.0,5.0]",
        "model.pool_size=3",
        "model.fc_features=[64,32]",
    ],
}
# Run to a checkpoint and exported by the command: batch norms (conv and fc) and learned τ/θ together, spiking from the
# first step.
TRAINING = [
    "data.val_size=0",
    "seq_length=8",
    "optim.lr=5e-3",
    "train.batch_size=16",
    "train.limit_batches=3",
    "train.device=cpu",
    "train.compile=false",
    "log.progress_bar=false",
    "encoder.input_scale=5",
    "data.download=false",
    "model.batch_norm=true",
    "model.fc_batch_norm=true",
    "model.learn_tau_mem=true",
    "model.learn_v_th=true",
]


def network(overrides: list[str], seed: int = 0) -> tuple[ConvSNN, Any]:
    """The configured network, its batch norms' statistics and learned values moved away from their start values and
    its fc weights ×5 (an fc layer's batch-norm shift positive), so that every layer spikes within a few steps."""
    cfg = load_config(overrides)
    torch.manual_seed(seed)
    model = ConvSNN.from_config(cfg.model, (1, 28, 28))
    with torch.no_grad():
        for fc in model.fcs:
            fc.weight.mul_(5)
        for norm in [*model.norms, *model.fc_norms]:
            if isinstance(norm, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d):
                norm.running_mean.uniform_(-0.2, 0.2)
                norm.running_var.uniform_(0.5, 2.0)
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-0.3, 0.3) if isinstance(norm, torch.nn.BatchNorm2d) else norm.bias.uniform_(0, 0.4)
        for lif in [*model.conv_lifs, *model.fc_lifs]:
            if lif.tau_mem_logit is not None:
                lif.tau_mem_logit.add_(torch.empty(()).uniform_(-1, 1))
            if lif.v_th is not None:
                lif.v_th.mul_(torch.empty(()).uniform_(0.7, 1.3))
    return model.eval(), cfg


def run_float64(model: ConvSNN, inputs: torch.Tensor) -> tuple[torch.Tensor, dict[str, LayerTrace]]:
    """ConvSNN in float64 (as the graph's parameters are): readout voltages and every LIF layer's spikes."""
    trace: dict[str, LayerTrace] = {}
    with torch.no_grad():
        voltages = model.double()(inputs.double(), trace, record_voltage=False)
    return voltages, trace


def assert_simulator_reproduces(graph: Any, model: ConvSNN, inputs: torch.Tensor, dt: float) -> None:
    """Same spikes in every LIF layer (and some spikes, some silence in each), readout voltages within 1e-5."""
    voltages, trace = run_float64(model, inputs)
    simulated = simulate(graph, inputs.double().numpy(), dt)
    for name, layer in trace.items():
        spikes = layer.spikes.numpy()
        assert 0 < spikes.mean() < 1, name
        np.testing.assert_array_equal(simulated[f"{name}_lif"], spikes, err_msg=name)
    np.testing.assert_allclose(simulated["output"], voltages.numpy(), rtol=0, atol=1e-5)


def same(a: Any, b: Any) -> bool:
    """Equal values, arrays element for element with the same dtype, dicts key for key."""
    if isinstance(a, dict) or isinstance(b, dict):
        return isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype != b.dtype:
        return False
    return bool(np.array_equal(np.asarray(a), np.asarray(b)))


def test_the_default_network_maps_to_the_documented_nodes_and_constants() -> None:
    model, _ = network([])
    graph = to_nir(model, {})
    assert [(name, type(node).__name__, tuple(node.output_type["output"])) for name, node in graph.nodes.items()] == [
        ("input", "Input", (1, 28, 28)),
        ("conv1_conv", "Conv2d", (32, 24, 24)),
        ("conv1_lif", "CubaLIF", (32, 24, 24)),
        ("conv1_sumpool", "SumPool2d", (32, 12, 12)),
        ("conv1_threshold", "Threshold", (32, 12, 12)),
        ("conv2_conv", "Conv2d", (64, 8, 8)),
        ("conv2_lif", "CubaLIF", (64, 8, 8)),
        ("conv2_sumpool", "SumPool2d", (64, 4, 4)),
        ("conv2_threshold", "Threshold", (64, 4, 4)),
        ("flatten", "Flatten", (1024,)),
        ("fc1_affine", "Affine", (1024,)),
        ("fc1_lif", "CubaLIF", (1024,)),
        ("readout_linear", "Linear", (10,)),
        ("readout_li", "CubaLI", (10,)),
        ("output", "Output", (10,)),
    ]
    names = list(graph.nodes)
    assert graph.edges == list(itertools.pairwise(names))
    # The ×10 of conv2 folded into its weights and bias; the checkpoint's float32 values exactly, in float64.
    conv2 = graph.nodes["conv2_conv"]
    assert conv2.weight.dtype == np.float64 and np.array_equal(
        conv2.weight, 10 * model.convs[1].weight.detach().double().numpy()
    )
    assert np.array_equal(conv2.bias, 10 * model.convs[1].bias.detach().double().numpy())
    # tau = 1/tau_inv, r = 1, w_in = tau_syn/dt for the LIF layers (dt 1 ms, 1/200 s, 1/100 s) and the readout.
    for name in ("conv1_lif", "fc1_lif", "readout_li"):
        node = graph.nodes[name]
        assert np.all(node.tau_syn == 1 / 200) and np.all(node.tau_mem == 1 / 100) and np.all(node.r == 1.0)
        assert np.all(node.w_in == 1 / (1e-3 * 200)) and np.all(node.v_leak == 0.0)
    assert np.all(graph.nodes["fc1_lif"].v_threshold == 1.0) and np.all(graph.nodes["fc1_lif"].v_reset == 0.0)
    assert np.all(graph.nodes["conv1_threshold"].threshold == 0.5)


@pytest.mark.parametrize("name", NETWORKS)
def test_write_and_read_keep_every_parameter(name: str, tmp_path: Path) -> None:
    model, _ = network(NETWORKS[name])
    metadata = {"dt": 0.001, "time_steps": 16, "decoder": "max", "encoder": {"name": "direct", "input_scale": 1.0}}
    graph = to_nir(model, metadata)
    nir.write(tmp_path / "model.nir", graph)
    read = nir.read(tmp_path / "model.nir")
    assert same(read.to_dict(), graph.to_dict())
    assert read.edges == graph.edges and read.metadata == metadata


def image_inputs(root: Path) -> torch.Tensor:
    """Eight steps of the direct encoder (input_scale 4) on six MNIST-format test images read from IDX files."""
    cfg = load_config([f"data.root={root}", "data.download=false", "encoder.input_scale=4"])
    return build_encoder(cfg.encoder, 8)(
        to_unit_interval(load_split(cfg.data, train=False, seq_length=8).images[:6]).double()
    )


@pytest.mark.parametrize("inputs", ["random", "images"])
@pytest.mark.parametrize("name", NETWORKS)
def test_the_simulator_reproduces_the_networks_spikes(name: str, inputs: str, mnist_root: Path) -> None:
    model, cfg = network(NETWORKS[name])
    graph = to_nir(model, {})
    if inputs == "random":  # a new input at every step
        sequence = torch.rand((8, 3, 1, 28, 28), generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 4
    else:
        sequence = image_inputs(mnist_root)
    assert_simulator_reproduces(graph, model, sequence, cfg.model.lif.dt)


def test_learned_values_are_exported_at_their_trained_values() -> None:
    model, cfg = network(NETWORKS["learned_tau_v_th"])
    graph = to_nir(model, {})
    for name, lif in zip(("conv1_lif", "conv2_lif", "fc1_lif"), [*model.conv_lifs, *model.fc_lifs]):
        decay = torch.sigmoid(lif.tau_mem_logit.detach().double()).item()  # dt·τm⁻¹ as the layer learns it
        assert graph.nodes[name].tau_mem == pytest.approx(
            np.full_like(graph.nodes[name].tau_mem, cfg.model.lif.dt / decay), rel=1e-15
        )
        assert np.all(graph.nodes[name].v_threshold == lif.v_th.item()) and lif.v_th.item() != 1.0


@pytest.mark.parametrize("kernel, pool", [(5, 2), (4, 2), (5, 3)])
def test_sumpool_then_threshold_is_max_pooling_on_spikes(kernel: int, pool: int) -> None:
    model, _ = network([f"model.kernel_sizes=[{kernel},{kernel}]", f"model.pool_size={pool}", "model.fc_features=[16]"])
    graph = to_nir(model, {})
    sumpool, threshold = graph.nodes["conv1_sumpool"], graph.nodes["conv1_threshold"]
    assert (list(sumpool.kernel_size), list(sumpool.stride), list(sumpool.padding)) == (
        [pool, pool],
        [pool, pool],
        [0, 0],
    )
    size = 28 - kernel + 1  # 25 with kernel 4: pooling drops the last row and column, as max_pool2d does
    nodes = {
        "input": nir.Input(input_type=np.array([32, size, size])),
        "sumpool": sumpool,
        "threshold": threshold,
        "output": nir.Output(output_type=threshold.output_type["output"]),
    }
    pooled = nir.NIRGraph(nodes=nodes, edges=[("input", "sumpool"), ("sumpool", "threshold"), ("threshold", "output")])
    for rate in (0.02, 0.1, 0.5):
        spikes = (torch.rand((1, 6, 32, size, size), generator=torch.Generator().manual_seed(2)) < rate).double()
        expected = F.max_pool2d(spikes[0], pool)
        assert 0 < expected.mean() < 1
        np.testing.assert_array_equal(simulate(pooled, spikes.numpy(), 1e-3)["output"][0], expected.numpy())


def test_a_norm_that_does_not_fold_is_refused_naming_its_layer() -> None:
    model, _ = network(["model.batch_norm=true"])
    model.norms[1] = torch.nn.GroupNorm(4, 64)
    with pytest.raises(
        ExportError,
        match="^cannot export conv2: NIR has no GroupNorm, and only a batch norm with running statistics folds",
    ):
        to_nir(model, {})
    model, _ = network(["model.fc_batch_norm=true"])
    model.fc_norms[0] = torch.nn.LayerNorm(1024)
    with pytest.raises(ExportError, match="^cannot export fc1: NIR has no LayerNorm"):
        to_nir(model, {})


def test_a_non_finite_parameter_is_refused_naming_its_node() -> None:
    model, _ = network([])
    with torch.no_grad():
        model.fcs[0].bias[3] = float("nan")
    with pytest.raises(ExportError, match="^cannot export fc1_affine: its bias holds NaN or infinite values"):
        to_nir(model, {})


def export_config(overrides: list[str]):
    return compose("export", overrides)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with batch norm and learned τ/θ, trained for three steps on tiny data (48 test images)."""
    root = make_mnist(tmp_path_factory.mktemp("data"))
    run = tmp_path_factory.mktemp("run")
    fit(load_config([*TRAINING, f"data.root={root}"]), run)
    return run


@pytest.mark.slow
def test_snn_export_writes_a_graph_the_simulator_runs_to_the_checkpoints_spikes(run_dir: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        ["snn-export", f"checkpoint={run_dir}"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    file = run_dir / "checkpoints" / "model.nir"
    assert f"wrote        {file} (NIR {nir.version}, 15 nodes)" in result.stdout
    assert "conv2_conv: batch norm (running statistics), scale 10" in result.stdout
    assert "  encoder      name=direct, input_scale=5.0" in result.stdout and "  decoder      max: " in result.stdout
    assert list(tmp_path.iterdir()) == []  # nothing written where snn-export runs

    graph = nir.read(file)
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    cfg = load_config([*TRAINING, f"data.root={checkpoint['config']['data']['root']}"])
    metadata = graph.metadata
    assert (metadata["dt"], metadata["time_steps"], metadata["decoder"]) == (0.001, 8, "max")
    assert metadata["encoder"] == {"name": "direct", "input_scale": 5.0} and metadata["step"] == 3
    model = ConvSNN.from_config(cfg.model, (1, 28, 28))
    model.load_state_dict(checkpoint["model"])
    # The test images as the metadata says the graph takes them: the encoder's output for images in [0, 1].
    images = to_unit_interval(load_split(cfg.data, train=False, seq_length=cfg.seq_length).images)
    inputs = build_encoder(cfg.encoder, metadata["time_steps"])(images.double())
    assert_simulator_reproduces(graph, model.eval(), inputs, metadata["dt"])


def test_out_names_the_file_written(run_dir: Path, tmp_path: Path, capsys) -> None:
    run_export(export_config([f"checkpoint={run_dir / 'checkpoints' / 'last.pt'}", f"out={tmp_path / 'net.nir'}"]))
    assert f"wrote        {tmp_path / 'net.nir'}" in capsys.readouterr().out
    assert len(nir.read(tmp_path / "net.nir").nodes) == 15


def test_errors_a_user_can_cause_exit_2_with_one_line(run_dir: Path, tmp_path: Path, capsys) -> None:
    cases = [
        ([], "no checkpoint given; use snn-export checkpoint="),
        ([f"checkpoint={tmp_path / 'nowhere.pt'}"], f"no checkpoint at {tmp_path / 'nowhere.pt'};"),
        (
            [f"checkpoint={run_dir}", "input_shape=[1,28]"],
            "input_shape must be [channels, height, width], each > 0, got [1, 28]",
        ),
        (
            [f"checkpoint={run_dir}", "input_shape=[1,20,20]"],
            f"input_shape=[1, 20, 20] does not fit the network of {run_dir / 'checkpoints' / 'last.pt'} (",
        ),
        (
            [f"checkpoint={run_dir}", f"out={tmp_path / 'missing' / 'model.nir'}"],
            f"cannot write {tmp_path / 'missing' / 'model.nir'} (No such file",
        ),
    ]
    for overrides, message in cases:
        with pytest.raises(SystemExit) as raised:
            run_export(export_config(overrides))
        error = capsys.readouterr().err
        assert (
            raised.value.code == 2 and error.startswith(f"snn-export: error: {message}") and error.count("\n") == 1
        ), error


def test_without_nir_the_error_names_the_extra(run_dir: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        sys.modules, "nir", None
    )  # as if the package were not installed: importing it raises ImportError
    with pytest.raises(SystemExit) as raised:
        run_export(export_config([f"checkpoint={run_dir}"]))
    assert raised.value.code == 2
    assert (
        capsys.readouterr().err
        == "snn-export: error: exporting to NIR needs the nir package: pip install 'snn-train[nir]'\n"
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "override, message",
    [
        ("nonsense=1", "Could not override 'nonsense': Key 'nonsense' not in 'ExportConfig'"),
        ("input_shape=[1,", "cannot parse override 'input_shape=[1,'"),
        ("input_shape=many", "Error merging override input_shape=many"),
    ],
)
def test_hydras_errors_exit_2_with_one_line(run_dir: Path, tmp_path: Path, override: str, message: str) -> None:
    result = subprocess.run(
        ["snn-export", f"checkpoint={run_dir}", override], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2 and result.stderr.startswith(f"snn-export: error: {message}"), result.stderr
    assert result.stderr.count("\n") == 1 and list(tmp_path.iterdir()) == []
