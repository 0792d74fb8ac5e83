"""Evaluate a trained checkpoint: accuracy, confusion matrix, spike counts and synaptic operations, as eval.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn import functional as F

from snn_train.checkpoint import CheckpointError, find_checkpoint, load_checkpoint, write_atomically
from snn_train.config import Config, resolve_device
from snn_train.data import DataError, Split, batch_indices, load_split, to_unit_interval
from snn_train.encoders import build_encoder
from snn_train.model import ConvSNN, LayerTrace
from snn_train.tensorboard import RunLogger
from snn_train.train import decode, seed_everything


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts [num_classes, num_classes]: row = true class, column = predicted class."""
    return torch.bincount(labels * num_classes + predictions, minlength=num_classes**2).reshape(num_classes, num_classes)


def per_class_accuracy(matrix: torch.Tensor) -> list[float | None]:
    """Recall of each class (correct / samples of that class); None for a class with no samples."""
    totals = matrix.sum(1)
    return [None if total == 0 else (matrix[k, k] / total).item() for k, total in enumerate(totals)]


def training_config(file: Path, checkpoint: dict[str, Any]) -> DictConfig:
    """The config the checkpoint was trained with; one from an older snn-train that lacks a key the network needs is refused."""
    train_cfg = OmegaConf.merge(OmegaConf.structured(Config), checkpoint["config"])
    missing = sorted(OmegaConf.missing_keys(train_cfg))
    if missing:
        raise CheckpointError(f"{file}: its config lacks {', '.join(missing)} (written by an older snn-train, which can evaluate it)")
    return train_cfg


def build_network(checkpoint: dict[str, Any], train_cfg: DictConfig, test_set: Split, data_name: str) -> ConvSNN:
    """The checkpoint's network for this data's image size, or DataError if the data does not fit it."""
    if not len(test_set):
        raise DataError(f"the {data_name} test set is empty")
    input_shape = (1, *test_set.images.shape[1:])
    incompatible = f"{data_name} test images {tuple(input_shape)} do not fit the checkpoint's network"
    try:
        model = ConvSNN.from_config(train_cfg.model, input_shape)
        model.load_state_dict(checkpoint["model"])
    except (ValueError, RuntimeError) as error:
        raise DataError(f"{incompatible} ({str(error).strip().splitlines()[-1].strip()})") from None
    return model


@dataclass
class TestCounts:
    """Sums over the test set: the confusion matrix, the loss, and each LIF layer's spikes and synaptic operations."""

    confusion: torch.Tensor
    loss_sum: float
    spikes: dict[str, float]
    operations: dict[str, float]
    neurons: dict[str, int]


@torch.no_grad()
def count_test_set(model: ConvSNN, encoder: nn.Module, test_set: Split, decoder: str, batch_size: int, limit: int | None) -> TestCounts:
    """Run the test set (or its first ``limit`` batches) through the network with every layer traced."""
    num_classes = model.readout_linear.out_features
    counts = TestCounts(
        torch.zeros(num_classes, num_classes, dtype=torch.int64, device=test_set.labels.device), 0.0,
        dict.fromkeys(model.lif_layer_names(), 0.0), dict.fromkeys(model.lif_layer_names(), 0.0), {},
    )
    for index in batch_indices(len(test_set), batch_size, None, limit):
        labels = test_set.labels[index]
        trace: dict[str, LayerTrace] = {}
        logits = decode(model(encoder(to_unit_interval(test_set.images[index])), trace), decoder)
        counts.loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        counts.confusion += confusion_matrix(labels, logits.argmax(1), num_classes)
        for name, layer in trace.items():
            counts.spikes[name] += layer.spikes.sum(dtype=torch.float64).item()
            counts.neurons[name] = layer.spikes[0, 0].numel()
        for name, operations in model.synaptic_operations(trace).items():
            counts.operations[name] += operations.sum(dtype=torch.float64).item()
    return counts


def report(file: Path, checkpoint: dict[str, Any], train_cfg: DictConfig, data_cfg: DictConfig, counts: TestCounts) -> dict[str, Any]:
    """The figures of eval.json (README: "Evaluate a checkpoint"), per test sample where they are counts."""
    samples = int(counts.confusion.sum())
    steps = train_cfg.seq_length
    return {
        "checkpoint": str(file),
        "epoch": checkpoint["epoch"],
        "step": checkpoint["step"],
        "data": {"name": data_cfg.name, "root": data_cfg.root, "split": "test"},
        "samples": samples,
        "time_steps": steps,
        "latency_s": steps * train_cfg.model.lif.dt,
        "accuracy": counts.confusion.trace().item() / samples,
        "loss": counts.loss_sum / samples,
        "per_class_accuracy": per_class_accuracy(counts.confusion),
        "confusion_matrix": counts.confusion.tolist(),
        "layers": {
            name: {
                "neurons": counts.neurons[name],
                "spike_rate": counts.spikes[name] / (samples * steps * counts.neurons[name]),
                "spikes_per_sample": counts.spikes[name] / samples,
                "synops_per_sample": counts.operations[name] / samples,
            }
            for name in counts.spikes
        },
        "spikes_per_sample": sum(counts.spikes.values()) / samples,
        "synops_per_sample": sum(counts.operations.values()) / samples,
    }


def evaluate_checkpoint(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.checkpoint`` on its own test set (or ``cfg.data``'s); write eval.json beside it and return the report."""
    file = find_checkpoint(Path(cfg.checkpoint))
    checkpoint = load_checkpoint(file)
    train_cfg = training_config(file, checkpoint)
    data_cfg = cfg.data if cfg.data is not None else train_cfg.data
    device = resolve_device(cfg.device, "device")
    test_set = load_split(data_cfg, train=False)
    model = build_network(checkpoint, train_cfg, test_set, data_cfg.name).to(device).eval()
    test_set = test_set.to(device)
    encoder = build_encoder(train_cfg.encoder, train_cfg.seq_length).to(device)
    seed_everything(train_cfg.train.seed)
    counts = count_test_set(model, encoder, test_set, train_cfg.decoder, cfg.batch_size, cfg.limit_batches)
    result = report(file, checkpoint, train_cfg, data_cfg, counts)
    text = json.dumps(result, indent=2)
    write_atomically(file.with_name("eval.json"), lambda f: f.write(text.encode()))
    if cfg.tensorboard:
        write_images(file.parent, checkpoint["step"], counts.confusion, model, encoder, test_set, cfg.raster_samples)
    return result


@torch.no_grad()
def write_images(log_dir: Path, step: int, confusion: torch.Tensor, model: ConvSNN, encoder: nn.Module, test_set: Split, samples: int) -> None:
    """TensorBoard images beside eval.json: the confusion matrix and each layer's spike raster for the first test samples."""
    logger = RunLogger(log_dir)
    logger.confusion_matrix(step, confusion)
    if samples:
        trace: dict[str, LayerTrace] = {}
        model(encoder(to_unit_interval(test_set.images[:samples])), trace)
        logger.spike_rasters(step, trace, test_set.labels[:samples].tolist())
    logger.close()


def format_report(report: dict[str, Any]) -> str:
    """The report as text for the terminal: one block per figure."""
    classes = range(len(report["confusion_matrix"]))
    per_class = "  ".join("  -  " if a is None else f"{a:.3f}" for a in report["per_class_accuracy"])
    lines = [
        f"checkpoint   {report['checkpoint']} (epoch {report['epoch']}, step {report['step']})",
        f"data         {report['data']['name']} {report['data']['split']} set in {report['data']['root']}, {report['samples']} samples",
        f"latency      T = {report['time_steps']} time steps ({report['latency_s'] * 1e3:g} ms of simulated time)",
        f"accuracy     {report['accuracy']:.4f} (loss {report['loss']:.4f})",
        "",
        "per-class accuracy",
        "  class  " + "  ".join(f"{k:>5}" for k in classes),
        "         " + per_class,
        "",
        "confusion matrix (rows: true class, columns: predicted class)",
        "  " + " " * 5 + "".join(f"{k:>6}" for k in classes),
        *(f"  {k:>5}" + "".join(f"{n:>6}" for n in row) for k, row in zip(classes, report["confusion_matrix"])),
        "",
        f"  {'layer':<7}{'neurons':>9}{'spike rate':>12}{'spikes/sample':>15}{'synops/sample':>15}",
        *(
            f"  {name:<7}{layer['neurons']:>9}{layer['spike_rate']:>12.5f}{layer['spikes_per_sample']:>15.1f}{layer['synops_per_sample']:>15.4g}"
            for name, layer in report["layers"].items()
        ),
        f"  {'total':<7}{'':>21}{report['spikes_per_sample']:>15.1f}{report['synops_per_sample']:>15.4g}",
    ]
    return "\n".join(lines)
