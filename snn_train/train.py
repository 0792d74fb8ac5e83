"""Fit and evaluate: the training loop, from a validated config to metrics, checkpoints and event files."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from omegaconf import DictConfig
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from snn_train.allocator import keep_freed_memory
from snn_train.checkpoint import save_checkpoint, write_atomically
from snn_train.config import resolve_device
from snn_train.data import Split, batch_indices, load_split, to_unit_interval
from snn_train.encoders import build_encoder
from snn_train.model import ConvSNN, LayerTrace
from snn_train.tensorboard import RunLogger

log = logging.getLogger(__name__)


@dataclass
class EpochMetrics:
    epoch: int
    step: int
    train_loss: float
    train_accuracy: float
    test_loss: float
    test_accuracy: float
    samples_per_s: float
    wall_s: float


def decode(voltages: torch.Tensor, decoder: str) -> torch.Tensor:
    """Readout voltages [T, B, classes] into logits [B, classes]."""
    if decoder == "max":
        return voltages.max(dim=0).values
    if decoder == "mean":
        return voltages.mean(dim=0)
    return voltages[-1]


def build_optimizer(parameters: Iterable[nn.Parameter], optim_cfg: Any) -> torch.optim.Optimizer:
    """Adam and AdamW take ``momentum`` as beta1; SGD as its momentum."""
    if optim_cfg.name == "sgd":
        return torch.optim.SGD(parameters, lr=optim_cfg.lr, momentum=optim_cfg.momentum, weight_decay=optim_cfg.weight_decay)
    optimizer_class = torch.optim.AdamW if optim_cfg.name == "adamw" else torch.optim.Adam
    return optimizer_class(parameters, lr=optim_cfg.lr, betas=(optim_cfg.momentum, 0.999), weight_decay=optim_cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """``cosine`` anneals the learning rate to zero over all optimizer steps of the run."""
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return None


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """Mixed precision for ``train.precision=bf16``: convolutions and matmuls in bfloat16, neuron state in float32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate(model: ConvSNN, encoder: nn.Module, split: Split, cfg: DictConfig) -> tuple[float, float]:
    """Mean loss and accuracy over the split (or its first ``train.limit_batches`` batches)."""
    model.eval()
    loss_sum = torch.zeros((), device=split.labels.device)
    correct = torch.zeros((), device=split.labels.device)
    count = 0
    for index in batch_indices(len(split), cfg.train.eval_batch_size, None, cfg.train.limit_batches):
        labels = split.labels[index]
        with autocast(labels.device, cfg.train.precision):
            logits = decode(model(encoder(to_unit_interval(split.images[index]))), cfg.decoder)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum")
        correct += (logits.argmax(1) == labels).sum()
        count += len(index)
    model.train()
    return loss_sum.item() / count, correct.item() / count


def log_test_sample(logger: RunLogger, model: ConvSNN, encoder: nn.Module, split: Split, step: int) -> None:
    """Readout voltage traces and input raster of test sample 0, so epochs can be compared."""
    with torch.no_grad():
        model.eval()
        encoded = encoder(to_unit_interval(split.images[:1]))
        voltages = model(encoded)
        model.train()
    logger.readout_traces(step, voltages[:, 0], int(split.labels[0]))
    logger.input_raster(step, encoded[:, 0])


def write_metrics(path: Path, epochs: list[EpochMetrics]) -> None:
    """metrics.json: the final epoch's figures and every epoch's, written atomically."""
    text = json.dumps({"final": asdict(epochs[-1]), "epochs": [asdict(e) for e in epochs]}, indent=2)
    write_atomically(path, lambda f: f.write(text.encode()))


def fit(cfg: DictConfig, run_dir: Path) -> list[EpochMetrics]:
    """Train ``cfg``'s network, evaluating on the full test set after every epoch; returns per-epoch metrics."""
    device = resolve_device(cfg.train.device)
    keep_freed_memory()
    train_set = load_split(cfg.data, train=True).to(device)
    test_set = load_split(cfg.data, train=False).to(device)
    seed_everything(cfg.train.seed)
    shuffle = torch.Generator().manual_seed(cfg.train.seed)

    input_shape = (1, *train_set.images.shape[1:])
    model = ConvSNN.from_config(cfg.model, input_shape, cfg.train.compile).to(device)
    encoder = build_encoder(cfg.encoder, cfg.seq_length).to(device)
    steps_per_epoch = math.ceil(len(train_set) / cfg.train.batch_size)
    if cfg.train.limit_batches is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.train.limit_batches)
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.scheduler, cfg.train.epochs * steps_per_epoch)
    logger = RunLogger(run_dir)
    log.info("run dir %s, device %s, %d train / %d test samples\n%s\n%s", run_dir, device, len(train_set), len(test_set), encoder, model)

    history: list[EpochMetrics] = []
    step = 0
    start = time.perf_counter()
    for epoch in range(1, cfg.train.epochs + 1):
        epoch_start = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        seen = 0
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{cfg.train.epochs}", disable=not cfg.log.progress_bar)
        for index in batch_indices(len(train_set), cfg.train.batch_size, shuffle, cfg.train.limit_batches):
            step += 1
            labels = train_set.labels[index]
            encoded = encoder(to_unit_interval(train_set.images[index]))
            trace: dict[str, LayerTrace] | None = {} if step % cfg.log.every_n_steps == 0 else None
            with autocast(device, cfg.train.precision):
                logits = decode(model(encoded, trace), cfg.decoder)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()

            loss_sum += loss.detach() * len(index)
            correct += (logits.argmax(1) == labels).sum()
            seen += len(index)
            bar.update()
            if trace is not None:
                train_loss, train_accuracy = loss_sum.item() / seen, correct.item() / seen
                samples_per_s = seen / (time.perf_counter() - epoch_start)
                bar.set_postfix(loss=f"{train_loss:.4f}", acc=f"{train_accuracy:.4f}", samples_s=f"{samples_per_s:.0f}")
                logger.scalars(step, {"Loss/train": train_loss, "Accuracy/train": train_accuracy, "LR": optimizer.param_groups[0]["lr"]})
                logger.spike_statistics(step, encoded, trace)
            if step % cfg.log.histogram_every_n_steps == 0:
                logger.parameters(step, model)
        bar.close()

        epoch_wall = time.perf_counter() - epoch_start
        test_loss, test_accuracy = evaluate(model, encoder, test_set, cfg)
        metrics = EpochMetrics(
            epoch=epoch,
            step=step,
            train_loss=loss_sum.item() / seen,
            train_accuracy=correct.item() / seen,
            test_loss=test_loss,
            test_accuracy=test_accuracy,
            samples_per_s=seen / epoch_wall,
            wall_s=time.perf_counter() - start,
        )
        history.append(metrics)
        if step % cfg.log.every_n_steps != 0:
            logger.scalars(step, {"Loss/train": metrics.train_loss, "Accuracy/train": metrics.train_accuracy, "LR": optimizer.param_groups[0]["lr"]})
        logger.scalars(step, {"Loss/test": test_loss, "Accuracy/test": test_accuracy})
        log_test_sample(logger, model, encoder, test_set, step)
        save_checkpoint(run_dir / "checkpoints" / "last.pt", model, optimizer, scheduler, epoch, step, cfg, shuffle)
        write_metrics(run_dir / "metrics.json", history)
        log.info(
            "epoch %d: train loss %.4f acc %.4f | test loss %.4f acc %.4f | %.0f samples/s",
            epoch, metrics.train_loss, metrics.train_accuracy, test_loss, test_accuracy, metrics.samples_per_s,
        )

    logger.hparams(cfg, {"hparam/test_accuracy": history[-1].test_accuracy, "hparam/test_loss": history[-1].test_loss})
    logger.close()
    log.info("final test accuracy %.4f (loss %.4f) after %d steps in %.1f s", history[-1].test_accuracy, history[-1].test_loss, step, history[-1].wall_s)
    return history
