"""snn-eval: confusion matrix and synaptic operations against hand counts, a checkpoint end to end, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from snn_train import ConvSNN, LIFParameters, LIParameters, load_config
from snn_train.checkpoint import load_checkpoint
from snn_train.cli import run_eval
from snn_train.config import compose
from snn_train.data import load_split, to_unit_interval
from snn_train.encoders import build_encoder
from snn_train.evaluation import confusion_matrix, per_class_accuracy
from snn_train.model import LayerTrace, conv_fan_out
from snn_train.report import evaluate_checkpoint
from snn_train.train import fit

from conftest import make_mnist, write_idx

LIF = LIFParameters(
    tau_syn_inv=200.0, tau_mem_inv=100.0, v_leak=0.0, v_th=1.0, v_reset=0.0, dt=1e-3, surrogate="super", alpha=10.0
)
LI = LIParameters(tau_syn_inv=200.0, tau_mem_inv=100.0, v_leak=0.0, dt=1e-3)
# Spiking from the first step (input_scale 5) and trained a few steps, so every layer's statistics are non-trivial;
# validated after every step, so best.pt holds one of them.
TRAINING = [
    "data.val_size=20",
    "log.val_every_n_steps=1",
    "seq_length=4",
    "train.batch_size=16",
    "train.limit_batches=3",
    "train.device=cpu",
    "log.progress_bar=false",
    "encoder.input_scale=5",
    "decoder=mean",
    "optim.lr=5e-3",
    "data.download=false",
]


def eval_config(overrides: list[str]):
    return compose("eval", ["device=cpu", *overrides])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run trained for three steps on tiny data (20 validation, 48 test images), tested on its best weights."""
    root = make_mnist(tmp_path_factory.mktemp("data"))
    run = tmp_path_factory.mktemp("run")
    fit(load_config([*TRAINING, f"data.root={root}"]), run)
    return run


def test_confusion_matrix_and_per_class_accuracy_match_a_hand_count() -> None:
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    predictions = torch.tensor([0, 1, 1, 1, 0, 2, 3])
    matrix = confusion_matrix(labels, predictions, 4)
    assert matrix.tolist() == [[1, 1, 0, 0], [1, 2, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]]
    assert per_class_accuracy(matrix) == pytest.approx([1 / 2, 2 / 3, 1 / 2, None])


def test_conv_fan_out_counts_the_output_windows_covering_each_input() -> None:
    fan_out = conv_fan_out(torch.nn.Conv2d(2, 3, 3), (4, 5))
    border = torch.tensor([1.0, 2, 3, 2, 1])
    assert fan_out.tolist() == (3 * torch.outer(torch.tensor([1.0, 2, 2, 1]), border)).tolist()
    assert fan_out.sum() == 3 * 3**2 * (2 * 3)  # every output neuron has k² input synapses


def test_synaptic_operations_match_a_hand_count() -> None:
    # 9×9 input: conv1 k3 → 7×7 → pool 2 → 3×3 → conv2 (3 channels, k2) → 2×2 → pool 2 → 1×1 → fc1 (3 → 5) → readout
    # (5 → 4). The events are what each layer sends on: a conv layer's pooled spikes (which test_model checks).
    net = ConvSNN((1, 9, 9), [2, 3], [3, 2], [1.0, 1.0], 2, [5], 4, False, LIF, LI)
    conv1, conv2, fc1 = torch.zeros(2, 2, 2, 3, 3), torch.zeros(2, 2, 3, 1, 1), torch.zeros(2, 2, 5)
    conv1[0, 0, 0, 0, 0] = 1  # a corner of conv2's 3×3 input: 1 window × 3 channels = 3
    conv1[0, 0, 1, 1, 1] = 1  # the centre: 4 windows × 3 = 12
    conv1[1, 0, 0, 0, 0] = 1  # the corner again at t=1: 3
    conv1[1, 0, 1, 0, 1] = 1  # an edge: 2 windows × 3 = 6
    conv2[0, 1, 0, 0, 0] = 1  # into fc1: 5
    conv2[1, 1, 2, 0, 0] = 1  # 5
    fc1[0, 0, [0, 3]] = 1
    fc1[1, 0, 4] = 1  # three spikes into the 4 readout neurons: 12
    events = {"conv1": conv1, "conv2": conv2, "fc1": fc1}
    trace = {
        name: LayerTrace(None, layer_events, None, torch.zeros((), dtype=torch.float64), 0)
        for name, layer_events in events.items()
    }
    operations = net.synaptic_operations(trace)
    assert {name: ops.tolist() for name, ops in operations.items()} == {
        "conv1": [24, 0],
        "conv2": [0, 10],
        "fc1": [12, 0],
    }


def test_report_matches_the_training_run_and_a_whole_set_forward_pass(run_dir: Path) -> None:
    report = evaluate_checkpoint(eval_config([f"checkpoint={run_dir}", "batch_size=10"]))
    final = json.loads((run_dir / "metrics.json").read_text())["final"]
    assert report["checkpoint"] == str(run_dir / "checkpoints" / "best.pt")  # a run folder means its best weights
    assert final["test_on"] == "best" and final["test_step"] == final["best_step"]
    assert report["accuracy"] == pytest.approx(final["test_accuracy"])
    assert report["loss"] == pytest.approx(final["test_loss"], rel=1e-5)
    assert report["samples"] == 48 and sum(map(sum, report["confusion_matrix"])) == 48
    assert (report["epoch"], report["step"], report["time_steps"], report["latency_s"]) == (
        1,
        final["best_step"],
        4,
        pytest.approx(4e-3),
    )

    # Independently: the checkpoint's network on all 48 test images in one batch.
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    cfg = load_config([*TRAINING, f"data.root={report['data']['root']}"])
    net = ConvSNN.from_config(cfg.model, (1, 28, 28))
    net.load_state_dict(checkpoint["model"])
    trace: dict[str, LayerTrace] = {}
    with torch.no_grad():
        net(
            build_encoder(cfg.encoder, 4)(to_unit_interval(load_split(cfg.data, train=False, seq_length=4).images)),
            trace,
        )
    synops = net.synaptic_operations(trace)
    for name, layer in report["layers"].items():
        assert layer["spikes_per_sample"] == pytest.approx(trace[name].spikes.sum().item() / 48)
        assert layer["spike_rate"] == pytest.approx(trace[name].spikes.mean().item())
        assert layer["synops_per_sample"] == pytest.approx(synops[name].sum().item() / 48)
    assert report["layers"]["conv1"]["spikes_per_sample"] > 0 and report["synops_per_sample"] > 0
    assert json.loads((run_dir / "checkpoints" / "eval.json").read_text()) == report


def test_the_training_runs_spike_count_equals_snn_evals(run_dir: Path) -> None:
    report = evaluate_checkpoint(eval_config([f"checkpoint={run_dir}", "batch_size=7"]))
    final = json.loads((run_dir / "metrics.json").read_text())["final"]
    assert report["spikes_per_sample"] > 0
    assert final["test_spikes_per_sample"] == pytest.approx(report["spikes_per_sample"], rel=1e-9)


@pytest.mark.slow
def test_snn_eval_prints_the_report_and_writes_tensorboard_images(run_dir: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            "snn-eval",
            f"checkpoint={run_dir / 'checkpoints' / 'last.pt'}",
            "tensorboard=true",
            "raster_samples=2",
            "device=cpu",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((run_dir / "checkpoints" / "eval.json").read_text())
    assert f"accuracy     {report['accuracy']:.4f}" in result.stdout
    assert "confusion matrix (rows: true class, columns: predicted class)" in result.stdout
    assert "latency      T = 4 time steps (4 ms of simulated time)" in result.stdout
    assert list(tmp_path.iterdir()) == []  # nothing written where snn-eval runs
    events = EventAccumulator(str(run_dir / "checkpoints"), size_guidance={"images": 0})
    events.Reload()
    assert set(events.Tags()["images"]) == {
        "Eval/confusion_matrix",
        "Eval/spike_raster/conv1",
        "Eval/spike_raster/conv2",
        "Eval/spike_raster/fc1",
    }


def test_the_checkpoints_own_data_set_in_another_folder(run_dir: Path, tmp_path: Path, capsys) -> None:
    elsewhere = make_mnist(tmp_path / "elsewhere")  # the same data set, in a folder the run never saw
    accuracy = run_eval(eval_config([f"checkpoint={run_dir}", f"data.root={elsewhere}"]))
    report = json.loads((run_dir / "checkpoints" / "eval.json").read_text())
    assert report["data"] == {"name": "mnist", "root": str(elsewhere), "split": "test"}
    assert (
        accuracy
        == report["accuracy"]
        == pytest.approx(json.loads((run_dir / "metrics.json").read_text())["final"]["test_accuracy"])
    )
    assert f"mnist test set in {elsewhere}, 48 samples" in capsys.readouterr().out


def test_a_run_folder_without_best_pt_means_its_last_pt(tmp_path: Path) -> None:
    root = make_mnist(tmp_path / "data")
    fit(load_config([*TRAINING, f"data.root={root}", "data.val_size=0"]), tmp_path / "run")
    report = evaluate_checkpoint(eval_config([f"checkpoint={tmp_path / 'run'}"]))
    assert report["checkpoint"] == str(tmp_path / "run" / "checkpoints" / "last.pt") and report["step"] == 3


@pytest.mark.slow
def test_snn_eval_as_a_new_user_types_it_finds_the_data_in_another_folder(run_dir: Path, tmp_path: Path) -> None:
    """The data beside the folder the user works in, as ../shared/data is beside a clone: the report names it as it
    is, without the detour."""
    make_mnist(tmp_path / "downloads")
    (tmp_path / "work").mkdir()
    result = subprocess.run(
        ["snn-eval", f"checkpoint={run_dir}", "data.root=../downloads", "device=cpu"],
        cwd=tmp_path / "work",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert f"checkpoint   {run_dir / 'checkpoints' / 'best.pt'}" in result.stdout
    assert f"mnist test set in {tmp_path / 'downloads'}, 48 samples" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["~checkpoint"], "no checkpoint given"),
        (["checkpoint.x=1"], "Error merging override checkpoint.x=1"),
        (["data.roott=x"], "Could not override 'data.roott'"),
        (["++data.x=1"], "data.x: Key 'x' not in 'DataConfig'"),
        (["data.name=emnist"], "data.name=emnist is not one of mnist, fashion_mnist, kmnist"),
        (["data=emnist"], "Could not find 'data/emnist'"),
        (["batch_size=${oops}"], "batch_size: Interpolation key 'oops' not found"),
        (["~tensorboard"], "tensorboard: Key 'tensorboard' not in 'EvalConfig'"),
        (["data.download=maybe"], "Value 'maybe' is not a valid bool"),
        (["limit_batches=0"], "limit_batches must be > 0"),
    ],
)
def test_every_snn_eval_input_error_is_one_line_and_exit_2(
    run_dir: Path, tmp_path: Path, overrides: list[str], message: str
) -> None:
    result = subprocess.run(
        ["snn-eval", f"checkpoint={run_dir}", "device=cpu", *overrides],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("snn-eval: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:1000])


def not_a_checkpoint(file: Path) -> None:
    torch.save({"weights": torch.zeros(3)}, file)


@pytest.mark.parametrize(
    "damage, message",
    [(truncate, "is not a readable checkpoint"), (not_a_checkpoint, "is not an snn-train checkpoint")],
)
def test_a_damaged_checkpoint_is_named_in_one_line(run_dir: Path, tmp_path: Path, capsys, damage, message: str) -> None:
    file = tmp_path / "last.pt"
    file.write_bytes((run_dir / "checkpoints" / "last.pt").read_bytes())
    damage(file)
    with pytest.raises(SystemExit) as raised:
        run_eval(eval_config([f"checkpoint={file}"]))
    error = capsys.readouterr().err
    assert raised.value.code == 2 and error.startswith(f"snn-eval: error: {file} {message}") and error.count("\n") == 1


def older_config(file: Path) -> None:
    checkpoint = torch.load(file, weights_only=True)
    del checkpoint["config"]["model"]["batch_norm"]  # as written before the option existed
    torch.save(checkpoint, file)


def test_a_checkpoint_from_an_older_version_names_the_keys_it_lacks(run_dir: Path, tmp_path: Path, capsys) -> None:
    file = tmp_path / "last.pt"
    file.write_bytes((run_dir / "checkpoints" / "last.pt").read_bytes())
    older_config(file)
    with pytest.raises(SystemExit) as raised:
        run_eval(eval_config([f"checkpoint={file}"]))
    error = capsys.readouterr().err
    assert raised.value.code == 2 and error == (
        f"snn-eval: error: {file}: its config lacks model.batch_norm "
        "(written by an older snn-train, which can evaluate it)\n"
    )


@pytest.mark.parametrize("key", ["kernel", "fc_batch_norm"])
def test_a_checkpoint_from_before_a_model_key_is_evaluated_as_one_that_has_it(
    key: str, run_dir: Path, tmp_path: Path
) -> None:
    """model.kernel says how to compute, which snn-eval picks for its own device; a network trained before
    model.fc_batch_norm existed had none: their absence is no loss."""
    file = tmp_path / "last.pt"
    checkpoint = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    del checkpoint["config"]["model"][key]
    torch.save(checkpoint, file)
    report = evaluate_checkpoint(eval_config([f"checkpoint={file}", "batch_size=10"]))
    original = evaluate_checkpoint(eval_config([f"checkpoint={run_dir / 'checkpoints' / 'last.pt'}", "batch_size=10"]))
    assert report["accuracy"] == original["accuracy"] and report["loss"] == original["loss"]
    assert report["spikes_per_sample"] == original["spikes_per_sample"] > 0


@pytest.mark.slow
def test_snn_eval_reports_the_same_on_the_cpu_kernels_as_on_the_torch_kernels(run_dir: Path, tmp_path: Path) -> None:
    """compile=true (the default) evaluates on lif_cpu's C++ kernels, compile=false on the eager torch kernels, which
    need no compiler; where the build fails, compile=true is one error line naming the way out (in a process of its
    own: a build folder changed within a process makes torch rebuild the kernels there, and then in every other)."""
    compiled = evaluate_checkpoint(eval_config([f"checkpoint={run_dir}", "compile=true"]))
    eager = evaluate_checkpoint(eval_config([f"checkpoint={run_dir}", "compile=false"]))
    assert eager == compiled and compiled["spikes_per_sample"] > 0
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "CXX": str(tmp_path / "no-compiler")}
    command = ["snn-eval", f"checkpoint={run_dir}", "device=cpu"]
    failed = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert failed.returncode == 2 and failed.stderr.count("\n") == 1, failed.stderr
    assert failed.stderr.startswith("snn-eval: error: compile=true builds the CPU LIF kernels with a C++ compiler")
    assert failed.stderr.endswith("; install them, or use compile=false\n")


def test_errors_a_user_can_cause_exit_2_with_one_line(run_dir: Path, tmp_path: Path, capsys) -> None:
    kmnist = tmp_path / "kmnist"
    for prefix in ("train", "t10k"):  # 20×20 images: a KMNIST-layout set the 28×28 network cannot take
        write_idx(kmnist / "KMNIST" / "raw" / f"{prefix}-images-idx3-ubyte", torch.zeros(8, 20, 20, dtype=torch.uint8))
        write_idx(kmnist / "KMNIST" / "raw" / f"{prefix}-labels-idx1-ubyte", torch.zeros(8, dtype=torch.uint8))
    cases = [
        ([], "no checkpoint given; use snn-eval checkpoint="),
        ([f"checkpoint={tmp_path / 'nowhere.pt'}"], f"no checkpoint at {tmp_path / 'nowhere.pt'};"),
        ([f"checkpoint={kmnist}"], f"no checkpoint at {kmnist / 'checkpoints' / 'last.pt'};"),
        ([f"checkpoint={run_dir}", "device=gpu"], "device=gpu is not a device"),
        (
            [f"checkpoint={run_dir}", "data=kmnist", f"data.root={kmnist}", "data.download=false"],
            "kmnist test images (1, 20, 20) do not fit the checkpoint's network",
        ),
        (
            [f"checkpoint={run_dir}", "data=fashion_mnist", f"data.root={kmnist}", "data.download=false"],
            "fashion_mnist not found in",
        ),
    ]
    for overrides, message in cases:
        with pytest.raises(SystemExit) as raised:
            run_eval(eval_config(overrides))
        error = capsys.readouterr().err
        assert raised.value.code == 2 and error.startswith("snn-eval: error: ") and message in error
        assert error.count("\n") == 1
