"""Starting a run: the run folder checked, the data loaded, the network, encoder, optimizer and schedule built from
the config, and, when resuming, everything a checkpoint holds put back."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from snn_train import distributed
from snn_train.allocator import keep_freed_memory
from snn_train.checkpoint import check_writable, load_for_resume, restore
from snn_train.data import Split, hold_out, load_split
from snn_train.distributed import resolve_device
from snn_train.encoders import build_encoder
from snn_train.errors import ConfigError
from snn_train.model import ConvSNN
from snn_train.progress import Progress
from snn_train.schema import Config
from snn_train.task import bf16_emulated, build_average, build_model, build_optimizer, build_scheduler, seed_everything
from snn_train.tensorboard import RunLogger

log = logging.getLogger(__name__)


@dataclass
class Run:
    """One run's objects, shared by the loop's functions; ``progress`` is what changes."""

    cfg: Config
    run_dir: Path
    train_set: Split
    val_set: Split | None  # held out from the training set (data.val_size); None without a validation split
    test_set: Split
    model: ConvSNN
    trained: nn.Module  # what the training steps call: the model, or its DistributedDataParallel wrapper
    encoder: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    average: AveragedModel | None  # the moving average of the weights (train.ema_decay); None when it is off
    data_order: torch.Generator
    logger: RunLogger | None  # rank 0's alone: it writes the event files, checkpoints and metrics.json; None elsewhere
    progress: Progress
    started: float  # time.perf_counter() at the run's start, earlier sessions included

    @property
    def evaluated(self) -> ConvSNN:
        """The network validations, best.pt and the tests evaluate: the average of the weights with train.ema_decay,
        else the model itself."""
        return self.average.module if self.average is not None else self.model


def start_run(cfg: Config, run_dir: Path) -> Run:
    """Check the run folder, load data, build everything; continue ``train.resume``'s checkpoint if given."""
    check_writable(run_dir, run_dir / "checkpoints")
    resumed = load_for_resume(cfg) if cfg.train.resume is not None else None
    device = distributed.local_device(resolve_device(cfg.train.device))
    if distributed.is_main() and bf16_emulated(device, cfg.train.precision):
        log.warning("train.precision=bf16: this CPU has no bfloat16 hardware, so it is emulated and slower than fp32")
    keep_freed_memory()
    train_set, val_set = training_splits(cfg, load_split(cfg.data, train=True, seq_length=cfg.seq_length))
    train_set, val_set = train_set.to(device), val_set.to(device) if val_set is not None else None
    test_set = load_split(cfg.data, train=False, seq_length=cfg.seq_length).to(device)
    seed_everything(cfg.train.seed)
    data_order = torch.Generator().manual_seed(cfg.train.seed)

    model = build_model(cfg, train_set.input_shape, device)
    encoder = build_encoder(cfg.encoder, cfg.seq_length).to(device)
    steps_per_epoch = math.ceil(len(train_set) / cfg.train.batch_size)
    if cfg.train.limit_batches is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.train.limit_batches)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    average = build_average(model, cfg.train.ema_decay)
    progress = Progress()
    if resumed is not None:
        path, state = resumed
        progress = Progress.from_checkpoint(state["loop"])
        if progress.epoch > cfg.train.epochs:
            raise ConfigError(f"train.epochs={cfg.train.epochs} but {path} has already begun epoch {progress.epoch}")
        # the schedule follows train.epochs, which may have changed
        restore(state, model, optimizer, scheduler, average, data_order)
        log.info("resuming %s: epoch %d, batch %d, step %d", path, progress.epoch, progress.batch, progress.step)
    purge_step = progress.step + 1 if resumed is not None else None
    logger = RunLogger(run_dir, purge_step=purge_step) if distributed.is_main() else None
    log.info(
        "run dir %s, device %s, %d train / %d validation / %d test samples, %d process(es)\n%s\n%s",
        run_dir,
        device,
        len(train_set),
        len(val_set) if val_set is not None else 0,
        len(test_set),
        distributed.world_size(),
        encoder,
        model,
    )
    started = time.perf_counter() - progress.wall_s
    trained = distributed.data_parallel(model)
    return Run(
        cfg,
        run_dir,
        train_set,
        val_set,
        test_set,
        model,
        trained,
        encoder,
        optimizer,
        scheduler,
        average,
        data_order,
        logger,
        progress,
        started,
    )


def training_splits(cfg: Config, train_set: Split) -> tuple[Split, Split | None]:
    """The training split without the validation split (data.val_size images, data.split_seed), and that split; the
    whole training split and None for data.val_size=0."""
    size = cfg.data.val_size
    if size == 0:
        return train_set, None
    if size >= len(train_set):
        raise ConfigError(
            f"data.val_size={size} must be smaller than the {cfg.data.name} training set ({len(train_set)} images); "
            "use a smaller data.val_size, or 0 for no validation split"
        )
    return hold_out(train_set, size, cfg.data.split_seed)
