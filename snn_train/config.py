"""Compose a config from configs/ and check it, section by section: what Hydra's typing cannot check.

Each choice's names come from its registry (surrogates, encoders, datasets, optimizers, decoders, schedulers), so a
new choice is accepted once it is registered.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_module
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from snn_train import schema
from snn_train.data import DATASETS, check_installed
from snn_train.distributed import resolve_device
from snn_train.encoders import ENCODERS, EVENT_ENCODERS
from snn_train.errors import ConfigError
from snn_train.lif_kernels import KERNELS, triton_runs_on
from snn_train.schema import flat_config
from snn_train.surrogates import SURROGATES
from snn_train.task import DECODERS, OPTIMIZERS, PRECISIONS, SCHEDULERS, build_optimizer

CONFIG_MODULE = "snn_train.conf"
ON_NAN = ("stop", "skip")  # train.on_nan: a non-finite loss stops the run, or its batch makes no update
TEST_ON = ("best", "last")  # train.test_on: the weights of the best validation, or the last ones


def compose(config_name: str, overrides: list[str] | None = None, return_hydra_config: bool = False) -> DictConfig:
    """Compose configs/<config_name>.yaml with command-line style overrides (Hydra's compose API), unchecked."""
    schema.register()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return hydra_compose(config_name, overrides=overrides or [], return_hydra_config=return_hydra_config)


def load_config(overrides: list[str] | None = None) -> DictConfig:
    """Compose the packaged configs with command-line style overrides, as ``snn-train`` would, and validate."""
    cfg = compose("config", overrides)
    validate(cfg)
    return cfg


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_positive(cfg: DictConfig, key: str, hint: str) -> None:
    value = OmegaConf.select(cfg, key)
    _check(value is not None and value > 0, f"{key} must be > 0, got {value}; {hint}")


def _check_choice(cfg: DictConfig, key: str, choices: Any) -> None:
    value = OmegaConf.select(cfg, key)
    _check(value in choices, f"{key}={value} is not one of {', '.join(choices)}")


def _resolve(cfg: DictConfig) -> None:
    """Replace interpolations (${...}) by their values, which the schema's types then check."""
    try:
        OmegaConf.to_container(cfg, resolve=True)  # names the key of an interpolation that does not resolve
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as error:
        where = error.full_key or "an interpolation"  # not known when a resolved value fails its type
        raise ConfigError(f"{where}: {str(error).splitlines()[0]}") from None


def _check_complete(cfg: DictConfig) -> None:
    """No key or value missing (``~key`` deletes a top-level key), every number finite."""
    absent = [field.name for field in dataclasses.fields(schema.Config) if field.name not in cfg]
    missing = sorted([*absent, *OmegaConf.missing_keys(cfg)])
    _check(not missing, f"missing config values: {', '.join(missing)}; set them on the command line (key=value)")
    for key, value in flat_config(cfg).items():
        for number in value if isinstance(value, list) else [value]:
            _check(not isinstance(number, float) or math.isfinite(number), f"{key}={value} is not a finite number")


def check_model(cfg: DictConfig) -> None:
    """``model``: time constants, threshold, layer sizes, dropout, surrogate, the LIF kernels for the device."""
    model, lif = cfg.model, cfg.model.lif
    for key in ("dt", "tau_syn_inv", "tau_mem_inv", "alpha"):
        _check_positive(cfg, f"model.lif.{key}", "time constants (as inverses), dt and alpha must be positive")
    for key in ("tau_syn_inv", "tau_mem_inv"):
        _check_positive(cfg, f"model.readout.{key}", "time constants (as inverses) must be positive")
    _check(lif.v_th > lif.v_reset, f"model.lif.v_th ({lif.v_th}) must be above model.lif.v_reset ({lif.v_reset})")
    stable = lif.dt * max(lif.tau_mem_inv, lif.tau_syn_inv) <= 1
    _check(stable, "model.lif.dt·tau_*_inv must be <= 1 for a stable Euler step")
    _check(
        len(model.conv_channels) == len(model.kernel_sizes) == len(model.conv_scales),
        "model.conv_channels, model.kernel_sizes and model.conv_scales need one entry per conv layer",
    )
    _check_positive(cfg, "model.pool_size", "e.g. model.pool_size=2")
    for key in ("conv_channels", "kernel_sizes", "fc_features"):
        _check(all(size > 0 for size in model[key]), f"model.{key} must hold sizes > 0, got {list(model[key])}")
    _check_positive(cfg, "model.num_classes", "e.g. model.num_classes=10")
    _check(0 <= model.dropout < 1, f"model.dropout is a probability in [0, 1), got {model.dropout}")
    if model.learn_tau_mem:
        learnable = lif.dt * lif.tau_mem_inv < 1
        _check(learnable, "model.learn_tau_mem needs model.lif.dt·tau_mem_inv < 1 (it is learned as a sigmoid)")
    _check_choice(cfg, "model.surrogate", SURROGATES)
    _check_choice(cfg, "model.kernel", KERNELS)
    _check(
        model.kernel != "triton" or triton_runs_on(resolve_device(cfg.train.device)),
        f"model.kernel=triton needs Triton and a CUDA GPU (train.device={cfg.train.device}); "
        "use model.kernel=auto or torch",
    )


def check_encoder(cfg: DictConfig) -> None:
    """``encoder``: its name and the values its kind takes."""
    _check_positive(cfg, "encoder.input_scale", "e.g. encoder.input_scale=1.0")
    _check_choice(cfg, "encoder.name", ENCODERS)
    if cfg.encoder.name == "poisson":
        _check_positive(cfg, "encoder.f_max", "the maximum firing rate in Hz, e.g. encoder.f_max=1000")
    if cfg.encoder.name in ("poisson", "constant_current"):
        _check_positive(cfg, "encoder.dt", "e.g. encoder.dt=0.001")
    if cfg.encoder.name == "constant_current":
        _check_positive(cfg, "encoder.tau_mem_inv", "e.g. encoder.tau_mem_inv=100")
        _check(cfg.encoder.v_th > cfg.encoder.v_reset, "encoder.v_th must be above encoder.v_reset")


def check_encoder_for_data(encoder_name: str, data_name: str) -> None:
    """An encoder for the data's kind: ``EVENT_ENCODERS`` for event data sets, the others for images."""
    if DATASETS[data_name].events:
        _check(
            encoder_name in EVENT_ENCODERS,
            f"data={data_name} holds event frames, which encoder={encoder_name} cannot take (it encodes images); "
            f"use encoder={' or encoder='.join(EVENT_ENCODERS)}",
        )
    else:
        _check(
            encoder_name not in EVENT_ENCODERS,
            f"encoder={encoder_name} takes event frames, but data={data_name} holds images; "
            f"use an event data set ({', '.join(name for name in DATASETS if DATASETS[name].events)}) or an image "
            f"encoder ({', '.join(name for name in ENCODERS if name not in EVENT_ENCODERS)})",
        )


def check_data(cfg: DictConfig) -> None:
    """``data``: a data set that is installed, its event binning, and an encoder and augmentation for its kind."""
    _check_choice(cfg, "data.name", DATASETS)
    check_installed(cfg.data.name)
    check_encoder_for_data(cfg.encoder.name, cfg.data.name)
    if not DATASETS[cfg.data.name].events:
        return
    window = cfg.data.time_window_ms
    _check(
        window is None or round(window * 1000) >= 1,
        f"data.time_window_ms must be at least 0.001 (1 µs, the timestamps' unit), got {window}; "
        "or null for seq_length equal bins per recording",
    )
    off = all(cfg.augment[key] == 0 for key in ("shift", "rotate", "scale"))
    _check(off, f"augment.* transforms images; data={cfg.data.name} holds event frames: leave augment.* at 0")


def check_optim(cfg: DictConfig) -> None:
    """``optim``, the learning-rate schedule and the loss: ranges, then the optimizer's own checks."""
    _check_positive(cfg, "optim.lr", "e.g. optim.lr=2e-3")
    _check(cfg.optim.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {cfg.optim.weight_decay}")
    _check(cfg.optim.momentum >= 0, f"optim.momentum must be >= 0, got {cfg.optim.momentum}")
    _check_choice(cfg, "optim.name", OPTIMIZERS)
    build_optimizer(torch.nn.Linear(1, 1), cfg.optim)  # what only the optimizer knows (adam's beta1 < 1)
    _check_choice(cfg, "scheduler", SCHEDULERS)
    _check(
        0 <= cfg.warmup_epochs <= cfg.train.epochs,
        f"warmup_epochs must lie in 0..train.epochs ({cfg.train.epochs}), got {cfg.warmup_epochs}",
    )
    smoothing = cfg.loss.label_smoothing
    _check(0 <= smoothing < 1, f"loss.label_smoothing must lie in [0, 1), got {smoothing}")


def check_train(cfg: DictConfig) -> None:
    """``train``, ``seq_length``, ``decoder`` and ``augment``: sizes, ranges, choices, the device."""
    _check_positive(cfg, "seq_length", "the number of time steps T, e.g. seq_length=16")
    _check_choice(cfg, "decoder", DECODERS)
    _check_positive(cfg, "train.epochs", "e.g. train.epochs=1")
    _check_positive(cfg, "train.batch_size", "e.g. train.batch_size=32")
    _check_positive(cfg, "train.eval_batch_size", "e.g. train.eval_batch_size=256")
    _check(0 <= cfg.train.seed < 2**63, f"train.seed must lie in 0..2**63-1, got {cfg.train.seed}")
    if cfg.train.grad_clip is not None:
        _check_positive(cfg, "train.grad_clip", "or train.grad_clip=null to turn clipping off")
    if cfg.train.limit_batches is not None:
        _check_positive(cfg, "train.limit_batches", "or train.limit_batches=null for whole epochs")
    _check_positive(cfg, "train.checkpoint_every_n_steps", "e.g. train.checkpoint_every_n_steps=500")
    _check_choice(cfg, "train.on_nan", ON_NAN)
    _check_choice(cfg, "train.precision", PRECISIONS)
    check_validation(cfg)
    for key in ("shift", "rotate", "scale"):
        _check(cfg.augment[key] >= 0, f"augment.{key} must be >= 0 (0 = off), got {cfg.augment[key]}")
    _check(cfg.augment.scale < 1, f"augment.scale is a relative zoom and must be < 1, got {cfg.augment.scale}")
    resolve_device(cfg.train.device)


def check_validation(cfg: DictConfig) -> None:
    """The validation split, early stopping and the weights validated and tested (the split's size against the data
    set is checked once it is loaded)."""
    _check(cfg.data.val_size >= 0, f"data.val_size must be >= 0 (0 = no validation split), got {cfg.data.val_size}")
    _check(0 <= cfg.data.split_seed < 2**63, f"data.split_seed must lie in 0..2**63-1, got {cfg.data.split_seed}")
    patience = cfg.train.early_stopping_patience
    if patience is not None:
        _check_positive(cfg, "train.early_stopping_patience", "or train.early_stopping_patience=null to turn it off")
        _check(
            cfg.data.val_size > 0,
            "train.early_stopping_patience needs a validation split; set data.val_size > 0 "
            "or train.early_stopping_patience=null",
        )
    _check_choice(cfg, "train.test_on", TEST_ON)
    decay = cfg.train.ema_decay
    _check(
        decay is None or 0 < decay < 1,
        f"train.ema_decay must lie in (0, 1), e.g. 0.999 (null = off), got {decay}",
    )


def check_log(cfg: DictConfig) -> None:
    """``log``: the logging intervals."""
    _check_positive(cfg, "log.every_n_steps", "e.g. log.every_n_steps=50")
    _check_positive(cfg, "log.histogram_every_n_steps", "e.g. log.histogram_every_n_steps=500")
    every = cfg.log.val_every_n_steps
    _check(
        every is None or every > 0,
        f"log.val_every_n_steps must be > 0 (null = at epoch ends only), got {every}; e.g. log.val_every_n_steps=500",
    )


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first impossible value of an ``snn-train`` config; types and key names are
    checked by Hydra."""
    _resolve(cfg)
    _check_complete(cfg)
    check_train(cfg)
    check_log(cfg)
    check_model(cfg)
    check_encoder(cfg)
    check_data(cfg)
    check_optim(cfg)


def validate_eval(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first impossible value of an ``snn-eval`` config (configs/eval.yaml)."""
    _resolve(cfg)
    no_checkpoint = "no checkpoint given; use snn-eval checkpoint=<checkpoint file or run directory>"
    _check(OmegaConf.select(cfg, "checkpoint") is not None, no_checkpoint)
    _check_positive(cfg, "batch_size", "e.g. batch_size=100")
    if OmegaConf.select(cfg, "limit_batches") is not None:
        _check_positive(cfg, "limit_batches", "or limit_batches=null for the whole test set")
    raster_samples = OmegaConf.select(cfg, "raster_samples")
    _check(raster_samples is not None and raster_samples >= 0, f"raster_samples must be >= 0, got {raster_samples}")
    if OmegaConf.select(cfg, "data.name") is not None:  # ??? (the checkpoint's) selects as None
        _check_choice(cfg, "data.name", DATASETS)
    resolve_device(OmegaConf.select(cfg, "device") or "", "device")


def validate_export(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first impossible value of an ``snn-export`` config (configs/export.yaml)."""
    no_checkpoint = "no checkpoint given; use snn-export checkpoint=<checkpoint file or run directory>"
    _check(not OmegaConf.is_missing(cfg, "checkpoint"), no_checkpoint)
    shape = list(cfg.input_shape)
    _check(len(shape) == 3 and min(shape) > 0, f"input_shape must be [channels, height, width], each > 0, got {shape}")
