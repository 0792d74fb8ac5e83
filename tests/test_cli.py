"""The installed ``snn-train`` command, run as a user would, on tiny generated IDX data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from snn_train.checkpoint import load_checkpoint

from conftest import make_mnist, write_idx

pytestmark = pytest.mark.slow  # each test starts snn-train (or a script) as a process

LIF_LAYERS = ("conv1", "conv2", "fc1")
ROOT = Path(__file__).parents[1]


def snn_train(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["snn-train", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def run_dirs(outputs: Path) -> list[Path]:
    return sorted(path.parent for path in outputs.rglob("metrics.json"))


def event_tags(run_dir: Path) -> dict[str, list[str]]:
    events = EventAccumulator(str(run_dir), size_guidance={"histograms": 0, "images": 0, "scalars": 0})
    events.Reload()
    return events.Tags()


def test_training_run_writes_metrics_checkpoint_and_tensorboard(tmp_path: Path, tiny_overrides: list[str]) -> None:
    result = snn_train([*tiny_overrides, "train.epochs=2", "train.limit_batches=3"], tmp_path)
    assert result.returncode == 0, result.stderr
    (run_dir,) = run_dirs(tmp_path / "outputs")
    assert run_dir.relative_to(tmp_path / "outputs").parts[0] != "multirun"

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [epoch["epoch"] for epoch in metrics["epochs"]] == [1, 2]
    final, last = metrics["final"], metrics["epochs"][-1]
    assert (final["test_accuracy"], final["test_loss"]) == (last["test_accuracy"], last["test_loss"])
    assert (final["step"], final["test_on"], final["test_step"], final["best_val_accuracy"]) == (6, "last", 6, None)
    assert metrics["validations"] == [] and last["val_accuracy"] is None
    assert 0.0 <= final["test_accuracy"] <= 1.0 and final["samples_per_s"] > 0
    log_lines = (run_dir / "cli.log").read_text().splitlines()
    assert log_lines[-1].endswith(
        f"final test accuracy {final['test_accuracy']:.4f} (loss {final['test_loss']:.4f}) of the last weights "
        f"(step 6), after 6 steps in {final['wall_s']:.1f} s"
    )

    checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert {"model", "optimizer", "scheduler", "loop", "config", "rng"} <= checkpoint.keys()
    assert {"data_order", "python", "torch"} <= checkpoint["rng"].keys()
    assert (checkpoint["loop"]["epoch"], checkpoint["loop"]["step"]) == (2, 6)
    assert checkpoint["config"]["seq_length"] == 4
    assert Path(checkpoint["config"]["data"]["root"]).is_absolute()

    tags = event_tags(run_dir)
    expected_scalars = {"Loss/train", "Accuracy/train", "Loss/test", "Accuracy/test", "LR", "SpikeRate/encoder"}
    expected_scalars |= {f"SpikeRate/{layer}" for layer in LIF_LAYERS}
    assert expected_scalars <= set(tags["scalars"])
    histograms = set(tags["histograms"])
    assert {f"Voltage/{layer}" for layer in LIF_LAYERS} | {f"SpikeCount/{layer}" for layer in LIF_LAYERS} <= histograms
    assert "Parameters/convs.0.weight" in histograms and "Gradients/fcs.0.weight" in histograms
    assert {"Readout/voltage_traces", "Input/spike_raster"} <= set(tags["images"])
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert [s.step for s in events.Scalars("Accuracy/test")] == [3, 6]
    assert [s.step for s in events.Scalars("Loss/train")] == list(range(1, 7))
    assert [s.step for s in events.Scalars("SpikeRate/conv1")] == list(range(1, 7))  # log.every_n_steps=1
    every_histogram = EventAccumulator(str(run_dir), size_guidance={"histograms": 0})  # 0: keep them all
    every_histogram.Reload()
    for layer in LIF_LAYERS:  # log.histogram_every_n_steps=2: binning costs more than a step, only there
        assert [h.step for h in every_histogram.Histograms(f"Voltage/{layer}")] == [2, 4, 6]
        assert [h.step for h in every_histogram.Histograms(f"SpikeCount/{layer}")] == [2, 4, 6]


def test_hparams_entry_carries_the_best_validation_and_the_test_metrics(
    tmp_path: Path, tiny_overrides: list[str]
) -> None:
    result = snn_train([*tiny_overrides, "train.limit_batches=2", "optim.lr=0.004", "data.val_size=20"], tmp_path)
    assert result.returncode == 0, result.stderr
    (run_dir,) = run_dirs(tmp_path / "outputs")
    found = {}
    events = EventAccumulator(str(run_dir))
    events.Reload()
    for content in events.PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.HasField("session_start_info"):
            found = dict(data.session_start_info.hparams)
    assert found["optim.lr"].number_value == pytest.approx(0.004)
    assert found["model.surrogate"].string_value == "super"
    metrics = json.loads((run_dir / "metrics.json").read_text())["final"]
    assert events.Scalars("hparam/test_accuracy")[0].value == pytest.approx(metrics["test_accuracy"])
    assert events.Scalars("hparam/val_accuracy")[0].value == pytest.approx(metrics["best_val_accuracy"])
    assert events.Tensors("Test/weights/text_summary")[0].tensor_proto.string_val[0].decode() == (
        f"best (epoch 1, step {metrics['best_step']})"
    )


def test_two_job_sweep_runs_each_job_in_its_own_folder(tmp_path: Path, tiny_overrides: list[str]) -> None:
    sweep = [
        "-m",
        *tiny_overrides,
        "train.limit_batches=2",
        "data.val_size=20",
        "encoder.input_scale=5",
        "decoder=mean",
    ]
    result = snn_train([*sweep, "model=super,tanh"], tmp_path)
    assert result.returncode == 0, result.stderr
    jobs = run_dirs(tmp_path / "outputs" / "multirun")
    assert [job.name for job in jobs] == ["0", "1"]
    surrogates = [load_checkpoint(job / "checkpoints" / "last.pt")["config"]["model"]["surrogate"] for job in jobs]
    assert surrogates == ["super", "tanh"]

    summary = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "summarize_sweep.py"), str(jobs[0].parent), "--csv"],
        capture_output=True,
        text=True,
        check=True,
    )
    header, *rows = summary.stdout.splitlines()
    assert header.startswith("overrides,seq_length,epochs,steps,val_accuracy,val_loss,test_accuracy,test_loss,test_on")
    assert sorted("model=super" in row for row in rows) == [False, True]
    # The rows: sorted by the best validation accuracy, each with its job's figures.
    finals = [json.loads((job / "metrics.json").read_text())["final"] for job in jobs]
    cells = [(float(c[4]), float(c[6]), c[8]) for c in (row.split(",") for row in rows)]
    assert [c[0] for c in cells] == sorted((c[0] for c in cells), reverse=True)
    assert sorted(cells) == sorted(
        (round(f["best_val_accuracy"], 4), round(f["test_accuracy"], 4), "best") for f in finals
    )


def test_runs_started_together_get_separate_folders(tmp_path: Path, tiny_overrides: list[str]) -> None:
    command = ["snn-train", *tiny_overrides, "train.limit_batches=1"]
    processes = [
        subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)
    ]
    assert [p.wait(timeout=300) for p in processes] == [0, 0]
    assert len(run_dirs(tmp_path / "outputs")) == 2


def test_python_dash_m_runs_the_same_application(tmp_path: Path, tiny_overrides: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "snn_train", *tiny_overrides, "train.limit_batches=1", "seq_length=0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "seq_length must be > 0" in result.stderr


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epoch=2", "Key 'epoch' not in 'TrainConfig'"),
        ("model=supr", "Could not find 'model/supr'"),
        ("encoder=poison", "Could not find 'encoder/poison'"),
        ("train.epochs=many", "Value 'many' of type 'str' could not be converted to Integer"),
        ("seq_length=0", "seq_length must be > 0"),
        ("train.batch_size=0", "train.batch_size must be > 0"),
        ("optim.lr=-1", "optim.lr must be > 0"),
        ("model.lif.v_th=-0.5", "model.lif.v_th (-0.5) must be above model.lif.v_reset (0.0)"),
        ("model.lif.tau_syn_inv=0", "model.lif.tau_syn_inv must be > 0"),
        ("train.device=gpu", "train.device=gpu is not a device"),
        ("data.val_size=96", "data.val_size=96 must be smaller than the mnist training set (96 images)"),
        ("train.early_stopping_patience=2", "train.early_stopping_patience needs a validation split"),
        ("train.test_on=first", "train.test_on=first is not one of best, last"),
        ("~warmup_epochs", "missing config values: warmup_epochs; set them on the command line (key=value)"),
    ],
)
def test_bad_input_gives_a_message_and_no_traceback(
    tmp_path: Path, tiny_overrides: list[str], override: str, message: str
) -> None:
    result = snn_train([*tiny_overrides, override], tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("snn-train: error: ") and result.stderr.count("\n") == 1
    assert message in result.stderr
    assert not (tmp_path / "outputs").exists() or not run_dirs(tmp_path / "outputs")


def test_a_run_folder_that_cannot_be_created_is_reported_before_training(
    tmp_path: Path, tiny_overrides: list[str]
) -> None:
    (tmp_path / "file").write_text("not a folder")
    result = snn_train([*tiny_overrides, f"hydra.run.dir={tmp_path / 'file' / 'run'}"], tmp_path)
    assert result.returncode == 2
    assert result.stderr == f"snn-train: error: Not a directory: {tmp_path / 'file' / 'run'}\n"


def test_a_cpu_run_with_the_cuda_toolkit_installed_does_not_open_with_a_cuda_warning(
    tmp_path: Path, tiny_overrides: list[str]
) -> None:
    """Building the C++ kernels imports torch's extension tools, whose import logs "No CUDA runtime is found, using
    CUDA_HOME=…" where CUDA_HOME (or nvcc) exists but no GPU does, as on a cluster's login node: not for a CPU run."""
    env = {**os.environ, "CUDA_HOME": str(tmp_path)}
    command = ["snn-train", *tiny_overrides, "train.compile=true", "train.limit_batches=1"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "CUDA" not in result.stdout + result.stderr


def corrupt_images(raw: Path) -> None:
    path = raw / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])


def wrong_magic(raw: Path) -> None:
    path = raw / "t10k-labels-idx1-ubyte"
    path.write_bytes(b"\x00\x00\x09\x01" + path.read_bytes()[4:])


def label_count_mismatch(raw: Path) -> None:
    write_idx(raw / "train-labels-idx1-ubyte", torch.zeros(7, dtype=torch.uint8))


def label_out_of_range(raw: Path) -> None:
    write_idx(raw / "t10k-labels-idx1-ubyte", torch.full((48,), 12, dtype=torch.uint8))


@pytest.mark.parametrize(
    "damage, message",
    [
        (corrupt_images, "train-images-idx3-ubyte: IDX header says [96, 28, 28]"),
        (wrong_magic, "t10k-labels-idx1-ubyte: not a 1-dimensional uint8 IDX file"),
        (label_count_mismatch, "holds 96 images but"),
        (label_out_of_range, "t10k-labels-idx1-ubyte: labels must lie in 0..9, found 12 at index 0"),
    ],
)
def test_corrupt_data_is_reported_by_file(tmp_path: Path, tiny_overrides: list[str], damage, message: str) -> None:
    damage(tmp_path / "data" / "MNIST" / "raw")
    result = snn_train(tiny_overrides, tmp_path)
    assert result.returncode == 2
    assert (
        result.stderr.startswith(f"snn-train: error: {tmp_path / 'data' / 'MNIST' / 'raw'}/")
        and result.stderr.count("\n") == 1
    )
    assert message in result.stderr


def test_missing_data_without_download_says_where_to_put_it(tmp_path: Path, tiny_overrides: list[str]) -> None:
    result = snn_train([*tiny_overrides, f"data.root={tmp_path / 'nowhere'}"], tmp_path)
    assert result.returncode == 2
    assert "not found in" in result.stderr and "point data.root at the folder that holds MNIST/raw" in result.stderr


def test_data_root_is_relative_to_where_the_user_runs(tmp_path: Path, tiny_overrides: list[str]) -> None:
    make_mnist(tmp_path / "here", n_train=16, n_test=8)
    overrides = [o for o in tiny_overrides if not o.startswith("data.root=")]
    result = snn_train([*overrides, "data.root=here", "train.limit_batches=1"], tmp_path)
    assert result.returncode == 0, result.stderr
