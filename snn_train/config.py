"""The config schema (types only: values live in configs/) and the checks Hydra's typing cannot do."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import torch
from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from snn_train import distributed

CONFIG_MODULE = "snn_train.conf"


class ConfigError(ValueError):
    """A config value that composes but cannot work; the message says what to change."""


@dataclass
class LIFConfig:
    dt: float = MISSING
    tau_syn_inv: float = MISSING
    tau_mem_inv: float = MISSING
    v_leak: float = MISSING
    v_th: float = MISSING
    v_reset: float = MISSING
    alpha: float = MISSING


@dataclass
class ReadoutConfig:
    tau_syn_inv: float = MISSING
    tau_mem_inv: float = MISSING
    v_leak: float = MISSING


@dataclass
class ModelConfig:
    surrogate: str = MISSING
    conv_channels: list[int] = MISSING
    kernel_sizes: list[int] = MISSING
    conv_scales: list[float] = MISSING
    pool_size: int = MISSING
    fc_features: list[int] = MISSING
    num_classes: int = MISSING
    readout_bias: bool = MISSING
    batch_norm: bool = MISSING
    dropout: float = MISSING
    learn_tau_mem: bool = MISSING
    learn_v_th: bool = MISSING
    lif: LIFConfig = field(default_factory=LIFConfig)
    readout: ReadoutConfig = field(default_factory=ReadoutConfig)


@dataclass
class DirectEncoderConfig:
    name: str = MISSING
    input_scale: float = MISSING


@dataclass
class LatencyEncoderConfig(DirectEncoderConfig):
    pass


@dataclass
class PoissonEncoderConfig(DirectEncoderConfig):
    f_max: float = MISSING
    dt: float = MISSING


@dataclass
class ConstantCurrentEncoderConfig(DirectEncoderConfig):
    tau_mem_inv: float = MISSING
    v_leak: float = MISSING
    v_th: float = MISSING
    v_reset: float = MISSING
    dt: float = MISSING


@dataclass
class DataConfig:
    name: str = MISSING
    root: str = MISSING
    download: bool = MISSING


@dataclass
class OptimConfig:
    name: str = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    momentum: float = MISSING


@dataclass
class LossConfig:
    per_step: bool = MISSING
    label_smoothing: float = MISSING


@dataclass
class AugmentConfig:
    shift: float = MISSING
    rotate: float = MISSING
    scale: float = MISSING


@dataclass
class TrainConfig:
    epochs: int = MISSING
    batch_size: int = MISSING
    eval_batch_size: int = MISSING
    seed: int = MISSING
    device: str = MISSING
    grad_clip: Optional[float] = MISSING
    limit_batches: Optional[int] = MISSING
    precision: str = MISSING
    compile: bool = MISSING
    checkpoint_every_n_steps: int = MISSING
    on_nan: str = MISSING
    resume: Optional[str] = MISSING


@dataclass
class LogConfig:
    every_n_steps: int = MISSING
    histogram_every_n_steps: int = MISSING
    progress_bar: bool = MISSING


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    encoder: Any = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    seq_length: int = MISSING
    decoder: str = MISSING
    scheduler: str = MISSING
    warmup_epochs: float = MISSING
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)


@dataclass
class EvalConfig:
    checkpoint: str = MISSING
    data: Optional[DataConfig] = MISSING
    device: str = MISSING
    batch_size: int = MISSING
    limit_batches: Optional[int] = MISSING
    tensorboard: bool = MISSING
    raster_samples: int = MISSING


def register_schema() -> None:
    """Put the schemas where configs/config.yaml, configs/eval.yaml and configs/encoder/*.yaml find them."""
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    cs.store(name="eval_schema", node=EvalConfig)
    cs.store(group="schema/encoder", name="direct", node=DirectEncoderConfig)
    cs.store(group="schema/encoder", name="latency", node=LatencyEncoderConfig)
    cs.store(group="schema/encoder", name="poisson", node=PoissonEncoderConfig)
    cs.store(group="schema/encoder", name="constant_current", node=ConstantCurrentEncoderConfig)


def hydra_run_dir(resume: Optional[str], new_dir: str) -> str:
    """``hydra.run.dir``: a resumed run continues in its own folder (``<run>/checkpoints/<file>`` or ``<run>``)."""
    path = Path(resume) if resume is not None else None
    if path is not None and path.is_file() and path.parent.name == "checkpoints":
        path = path.parent.parent
    return str(path) if path is not None and path.is_dir() else new_dir


def run_started(pattern: str) -> str:
    """``${snn_train_now:pattern}`` in ``hydra.run.dir``: Hydra's ``now``, but rank 0's clock, so all ranks share one run folder."""
    return distributed.from_rank_0(datetime.now()).strftime(pattern)


register_schema()
OmegaConf.register_new_resolver("snn_train_run_dir", hydra_run_dir, replace=True)
OmegaConf.register_new_resolver("snn_train_now", run_started, use_cache=True, replace=True)

DECODERS = ("max", "mean", "last")
SCHEDULERS = ("none", "cosine")
PRECISIONS = ("fp32", "bf16")
OPTIMIZERS = ("adam", "adamw", "sgd")
SURROGATES = ("super", "tanh", "triangle", "circ", "erfc", "atan")
ENCODERS = ("direct", "poisson", "latency", "constant_current")
DATASETS = ("mnist", "fashion_mnist", "kmnist")
ON_NAN = ("stop", "skip")
# What may differ from a checkpoint's config when resuming it: how long to run, where and how to compute,
# log and evaluate, where the data lives. Everything else (network, T, data set, optimizer, seed, batches) must match.
CHANGEABLE_ON_RESUME = (
    "train.epochs", "train.resume", "train.device", "train.eval_batch_size", "train.checkpoint_every_n_steps",
    "train.on_nan", "train.precision", "train.compile", "log", "data.root", "data.download",
)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_positive(cfg: DictConfig, key: str, hint: str) -> None:
    value = OmegaConf.select(cfg, key)
    _check(value is not None and value > 0, f"{key} must be > 0, got {value}; {hint}")


def _check_choice(cfg: DictConfig, key: str, choices: tuple[str, ...]) -> None:
    value = OmegaConf.select(cfg, key)
    _check(value in choices, f"{key}={value} is not one of {', '.join(choices)}")


def resolve_device(device: str, key: str = "train.device") -> torch.device:
    """``auto`` is cuda when a GPU is present, else cpu; anything else must exist on this machine."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"{key}={device} is not a device; use auto, cpu or cuda[:N]") from None
    _check(resolved.type in ("cpu", "cuda"), f"{key}={device} is not supported; use auto, cpu or cuda[:N]")
    if resolved.type == "cuda":
        _check(torch.cuda.is_available(), f"{key}={device} but no CUDA GPU is available; use {key}=cpu or auto")
        index = resolved.index or 0
        count = torch.cuda.device_count()
        _check(index < count, f"{key}={device} but only {count} GPU(s) are present")
    return resolved


def flat_config(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """The resolved config (or a checkpoint's copy of it) as flat ``a.b.c`` keys."""
    tree = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    flat: dict[str, Any] = {}

    def visit(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                visit(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    visit(tree, "")
    return flat


def resume_differences(saved: dict[str, Any], cfg: DictConfig) -> list[str]:
    """``key (saved → now)`` for each key a checkpoint depends on whose value ``cfg`` changes."""
    old, new = flat_config(saved), flat_config(cfg)
    changeable = tuple(f"{key}." for key in CHANGEABLE_ON_RESUME)
    return [
        f"{key} ({old.get(key, 'absent')} → {new.get(key, 'absent')})"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key) and not f"{key}.".startswith(changeable)
    ]


def _resolve(cfg: DictConfig) -> None:
    """Replace interpolations (${...}) by their values, which the schema's types then check."""
    try:
        OmegaConf.to_container(cfg, resolve=True)  # names the key of an interpolation that does not resolve
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as error:
        where = error.full_key or "an interpolation"  # not known when a resolved value fails its type
        raise ConfigError(f"{where}: {str(error).splitlines()[0]}") from None


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first impossible value; types and key names are checked by Hydra."""
    _resolve(cfg)
    missing = sorted(OmegaConf.missing_keys(cfg))
    _check(not missing, f"missing config values: {', '.join(missing)}; set them on the command line (key=value)")
    for key, value in flat_config(cfg).items():
        for number in value if isinstance(value, list) else [value]:
            _check(not isinstance(number, float) or math.isfinite(number), f"{key}={value} is not a finite number")
    _check_positive(cfg, "seq_length", "the number of time steps T, e.g. seq_length=16")
    _check_positive(cfg, "train.epochs", "e.g. train.epochs=1")
    _check_positive(cfg, "train.batch_size", "e.g. train.batch_size=32")
    _check_positive(cfg, "train.eval_batch_size", "e.g. train.eval_batch_size=256")
    _check_positive(cfg, "optim.lr", "e.g. optim.lr=2e-3")
    _check(cfg.optim.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {cfg.optim.weight_decay}")
    _check(cfg.optim.momentum >= 0, f"optim.momentum must be >= 0, got {cfg.optim.momentum}")
    if cfg.optim.name in ("adam", "adamw"):
        _check(cfg.optim.momentum < 1, f"optim.momentum is {cfg.optim.name}'s beta1 and must be < 1, got {cfg.optim.momentum}")
    _check(0 <= cfg.train.seed < 2**63, f"train.seed must lie in 0..2**63-1, got {cfg.train.seed}")
    if cfg.train.grad_clip is not None:
        _check_positive(cfg, "train.grad_clip", "or train.grad_clip=null to turn clipping off")
    if cfg.train.limit_batches is not None:
        _check_positive(cfg, "train.limit_batches", "or train.limit_batches=null for whole epochs")
    _check_positive(cfg, "train.checkpoint_every_n_steps", "e.g. train.checkpoint_every_n_steps=500")
    _check_choice(cfg, "train.on_nan", ON_NAN)
    _check_positive(cfg, "log.every_n_steps", "e.g. log.every_n_steps=50")
    _check_positive(cfg, "log.histogram_every_n_steps", "e.g. log.histogram_every_n_steps=500")
    for key in ("dt", "tau_syn_inv", "tau_mem_inv", "alpha"):
        _check_positive(cfg, f"model.lif.{key}", "time constants (as inverses), dt and alpha must be positive")
    for key in ("tau_syn_inv", "tau_mem_inv"):
        _check_positive(cfg, f"model.readout.{key}", "time constants (as inverses) must be positive")
    lif = cfg.model.lif
    _check(lif.v_th > lif.v_reset, f"model.lif.v_th ({lif.v_th}) must be above model.lif.v_reset ({lif.v_reset})")
    _check(lif.dt * max(lif.tau_mem_inv, lif.tau_syn_inv) <= 1, "model.lif.dt·tau_*_inv must be <= 1 for a stable Euler step")
    _check(
        len(cfg.model.conv_channels) == len(cfg.model.kernel_sizes) == len(cfg.model.conv_scales),
        "model.conv_channels, model.kernel_sizes and model.conv_scales need one entry per conv layer",
    )
    _check_positive(cfg, "model.pool_size", "e.g. model.pool_size=2")
    for key in ("conv_channels", "kernel_sizes", "fc_features"):
        sizes = cfg.model[key]
        _check(all(size > 0 for size in sizes), f"model.{key} must hold sizes > 0, got {list(sizes)}")
    _check_positive(cfg, "model.num_classes", "e.g. model.num_classes=10")
    _check(0 <= cfg.model.dropout < 1, f"model.dropout is a probability in [0, 1), got {cfg.model.dropout}")
    if cfg.model.learn_tau_mem:
        _check(lif.dt * lif.tau_mem_inv < 1, "model.learn_tau_mem needs model.lif.dt·tau_mem_inv < 1 (it is learned as a sigmoid)")
    _check(0 <= cfg.loss.label_smoothing < 1, f"loss.label_smoothing must lie in [0, 1), got {cfg.loss.label_smoothing}")
    _check(
        0 <= cfg.warmup_epochs <= cfg.train.epochs,
        f"warmup_epochs must lie in 0..train.epochs ({cfg.train.epochs}), got {cfg.warmup_epochs}",
    )
    for key in ("shift", "rotate", "scale"):
        _check(cfg.augment[key] >= 0, f"augment.{key} must be >= 0 (0 = off), got {cfg.augment[key]}")
    _check(cfg.augment.scale < 1, f"augment.scale is a relative zoom and must be < 1, got {cfg.augment.scale}")
    _check_positive(cfg, "encoder.input_scale", "e.g. encoder.input_scale=1.0")
    _check_choice(cfg, "model.surrogate", SURROGATES)
    _check_choice(cfg, "encoder.name", ENCODERS)
    _check_choice(cfg, "data.name", DATASETS)
    _check_choice(cfg, "optim.name", OPTIMIZERS)
    _check_choice(cfg, "decoder", DECODERS)
    _check_choice(cfg, "scheduler", SCHEDULERS)
    _check_choice(cfg, "train.precision", PRECISIONS)
    if cfg.encoder.name == "poisson":
        _check_positive(cfg, "encoder.f_max", "the maximum firing rate in Hz, e.g. encoder.f_max=1000")
    if cfg.encoder.name in ("poisson", "constant_current"):
        _check_positive(cfg, "encoder.dt", "e.g. encoder.dt=0.001")
    if cfg.encoder.name == "constant_current":
        _check_positive(cfg, "encoder.tau_mem_inv", "e.g. encoder.tau_mem_inv=100")
        _check(cfg.encoder.v_th > cfg.encoder.v_reset, "encoder.v_th must be above encoder.v_reset")
    resolve_device(cfg.train.device)


def validate_eval(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first impossible value of an ``snn-eval`` config (configs/eval.yaml)."""
    _check(not OmegaConf.is_missing(cfg, "checkpoint"), "no checkpoint given; use snn-eval checkpoint=<checkpoint file or run directory>")
    _check_positive(cfg, "batch_size", "e.g. batch_size=100")
    if cfg.limit_batches is not None:
        _check_positive(cfg, "limit_batches", "or limit_batches=null for the whole test set")
    _check(cfg.raster_samples >= 0, f"raster_samples must be >= 0, got {cfg.raster_samples}")
    resolve_device(cfg.device, "device")


def load_config(overrides: list[str] | None = None) -> DictConfig:
    """Compose the packaged configs with command-line style overrides, as ``snn-train`` would, and validate."""
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides or [])
    validate(cfg)
    return cfg
