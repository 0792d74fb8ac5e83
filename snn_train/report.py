"""``snn-eval``'s report on a checkpoint: accuracy, confusion matrix, spike counts and synaptic operations, written
as eval.json beside it (and, if asked, TensorBoard images), and as text for the terminal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from snn_train.allocator import keep_freed_memory
from snn_train.checkpoint import (
    ADDED_KEYS,
    BEST,
    LAST,
    evaluated_weights,
    find_checkpoint,
    load_checkpoint,
    write_atomically,
)
from snn_train.config import check_encoder_for_data
from snn_train.data import DATASETS, Split, load_split
from snn_train.distributed import resolve_device
from snn_train.encoders import build_encoder
from snn_train.errors import CheckpointError, DataError
from snn_train.evaluation import TestCounts, evaluate, per_class_accuracy, sample_forward
from snn_train.model import ConvSNN
from snn_train.schema import Config, DataConfig, EvalConfig
from snn_train.task import build_cpu_kernels, seed_everything
from snn_train.tensorboard import RunLogger

# Keys of a training config snn-eval has no use for, which a checkpoint written before they existed lacks: how the run
# computed (snn-eval's choice), split off its validation set, validated, stopped, tested and averaged its weights.
NOT_FOR_EVAL = (
    "model.kernel",
    "data.val_size",
    "data.split_seed",
    "log.val_every_n_steps",
    "train.early_stopping_patience",
    "train.test_on",
    "train.ema_decay",
)


def training_config(file: Path, checkpoint: dict[str, Any]) -> DictConfig:
    """The config the checkpoint was trained with, keys added since it was written (ADDED_KEYS) filled in; one from an
    older snn-train that lacks another key snn-eval uses is refused."""
    saved = checkpoint["config"]
    schema = OmegaConf.structured(Config)
    dataset = DATASETS.get(saved.get("data", {}).get("name"))
    if dataset is not None:
        schema.data = OmegaConf.structured(dataset.schema)  # an event data set's keys are more than DataConfig's
    train_cfg = OmegaConf.merge(schema, saved)
    for key in ADDED_KEYS.keys() & OmegaConf.missing_keys(train_cfg):
        OmegaConf.update(train_cfg, key, ADDED_KEYS[key])
    missing = sorted(set(OmegaConf.missing_keys(train_cfg)) - set(NOT_FOR_EVAL))
    if missing:
        raise CheckpointError(
            f"{file}: its config lacks {', '.join(missing)} (written by an older snn-train, which can evaluate it)"
        )
    return train_cfg


def build_network(
    checkpoint: dict[str, Any], train_cfg: Config, test_set: Split, data_name: str, compiled: bool
) -> ConvSNN:
    """The checkpoint's network for this data's image size (with the compiled LIF kernels if ``compiled``), or
    DataError if the data does not fit it."""
    if not len(test_set):
        raise DataError(f"the {data_name} test set is empty")
    input_shape = test_set.input_shape
    samples = "event frames" if test_set.events else "images"
    incompatible = f"{data_name} test {samples} {input_shape} do not fit the checkpoint's network"
    try:
        model = ConvSNN.from_config(train_cfg.model, input_shape, compiled)
        model.load_state_dict(evaluated_weights(checkpoint))
    except (ValueError, RuntimeError) as error:
        raise DataError(f"{incompatible} ({str(error).strip().splitlines()[-1].strip()})") from None
    return model


def report(
    file: Path, checkpoint: dict[str, Any], train_cfg: Config, data_cfg: DataConfig, counts: TestCounts
) -> dict[str, Any]:
    """The figures of eval.json (README: "Evaluate a checkpoint"), per test sample where they are counts."""
    samples = counts.samples
    steps = train_cfg.seq_length
    return {
        "checkpoint": str(file),
        "epoch": checkpoint["loop"]["epoch"],
        "step": checkpoint["loop"]["step"],
        "data": {"name": data_cfg.name, "root": data_cfg.root, "split": "test"},
        "samples": samples,
        "time_steps": steps,
        "latency_s": steps * train_cfg.model.lif.dt,
        "accuracy": counts.accuracy,
        "loss": counts.loss,
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
        "spikes_per_sample": counts.spikes_per_sample,
        "synops_per_sample": sum(counts.operations.values()) / samples,
    }


def test_data(chosen: DictConfig, trained_on: DataConfig) -> DictConfig:
    """The data set to test: snn-eval's ``data`` keys where given, the checkpoint's own where missing (``???``)."""
    given = {key: chosen[key] for key in chosen if not OmegaConf.is_missing(chosen, key)}
    return OmegaConf.merge(trained_on, given)


def evaluate_checkpoint(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate ``cfg.checkpoint`` (a run folder's best.pt, else its last.pt) on the test set of its own data or
    ``cfg.data``'s; write eval.json beside it and return the report."""
    file = find_checkpoint(Path(cfg.checkpoint), (BEST, LAST))
    checkpoint = load_checkpoint(file)
    train_cfg = training_config(file, checkpoint)
    data_cfg = test_data(cfg.data, train_cfg.data)
    device = resolve_device(cfg.device, "device")
    check_encoder_for_data(train_cfg.encoder.name, data_cfg.name)
    build_cpu_kernels(cfg.compile, device, "compile")
    keep_freed_memory()  # each batch's traces reuse warm pages, as training's steps do
    test_set = load_split(data_cfg, train=False, seq_length=train_cfg.seq_length)
    model = build_network(checkpoint, train_cfg, test_set, data_cfg.name, cfg.compile).to(device)
    test_set = test_set.to(device)
    encoder = build_encoder(train_cfg.encoder, train_cfg.seq_length).to(device)
    seed_everything(train_cfg.train.seed)
    counts = evaluate(
        model, encoder, test_set, train_cfg.decoder, cfg.batch_size, cfg.limit_batches, "fp32", train_cfg.train.seed
    )
    result = report(file, checkpoint, train_cfg, data_cfg, counts)
    text = json.dumps(result, indent=2)
    write_atomically(file.with_name("eval.json"), lambda f: f.write(text.encode()))
    if cfg.tensorboard:
        write_images(
            file.parent, checkpoint["loop"]["step"], counts.confusion, model, encoder, test_set, cfg.raster_samples
        )
    return result


def write_images(
    log_dir: Path,
    step: int,
    confusion: torch.Tensor,
    model: ConvSNN,
    encoder: torch.nn.Module,
    test_set: Split,
    samples: int,
) -> None:
    """TensorBoard images beside eval.json: the confusion matrix and each layer's spike raster for the first test
    samples."""
    logger = RunLogger(log_dir)
    logger.confusion_matrix(step, confusion)
    if samples:
        _, _, trace = sample_forward(model, encoder, test_set, samples)
        logger.spike_rasters(step, trace, test_set.labels[:samples].tolist())
    logger.close()


def format_report(report: dict[str, Any]) -> str:
    """The report as text for the terminal: one block per figure."""
    classes = range(len(report["confusion_matrix"]))
    per_class = "  ".join("  -  " if a is None else f"{a:.3f}" for a in report["per_class_accuracy"])
    lines = [
        f"checkpoint   {report['checkpoint']} (epoch {report['epoch']}, step {report['step']})",
        f"data         {report['data']['name']} {report['data']['split']} set in {report['data']['root']}, "
        f"{report['samples']} samples",
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
            f"  {name:<7}{layer['neurons']:>9}{layer['spike_rate']:>12.5f}{layer['spikes_per_sample']:>15.1f}"
            f"{layer['synops_per_sample']:>15.4g}"
            for name, layer in report["layers"].items()
        ),
        f"  {'total':<7}{'':>21}{report['spikes_per_sample']:>15.1f}{report['synops_per_sample']:>15.4g}",
    ]
    return "\n".join(lines)
