"""The config schema: types only (every value lives in configs/), registered with Hydra by ``register``, and
``flat_config``, a config as flat ``a.b.c`` keys.

Importing this module changes nothing and imports no torch (the commands' ``--help`` and TAB completion need only
this, Hydra and the configs); the entry points and ``config.compose`` call ``register`` before Hydra composes a config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


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
    fc_batch_norm: bool = MISSING
    dropout: float = MISSING
    learn_tau_mem: bool = MISSING
    learn_v_th: bool = MISSING
    kernel: str = MISSING
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
class EventsEncoderConfig(DirectEncoderConfig):
    clip: bool = MISSING


# encoder: one of these (LatencyEncoderConfig is DirectEncoderConfig's fields)
EncoderConfig = DirectEncoderConfig | PoissonEncoderConfig | ConstantCurrentEncoderConfig | EventsEncoderConfig


@dataclass
class DataConfig:
    name: str = MISSING
    root: str = MISSING
    download: bool = MISSING
    val_size: int = MISSING
    split_seed: int = MISSING


@dataclass
class EventDataConfig(DataConfig):
    time_window_ms: float | None = MISSING
    first_saccade_only: bool = MISSING


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
    grad_clip: float | None = MISSING
    limit_batches: int | None = MISSING
    precision: str = MISSING
    compile: bool = MISSING
    checkpoint_every_n_steps: int = MISSING
    on_nan: str = MISSING
    early_stopping_patience: int | None = MISSING
    test_on: str = MISSING
    ema_decay: float | None = MISSING
    resume: str | None = MISSING


@dataclass
class LogConfig:
    every_n_steps: int = MISSING
    histogram_every_n_steps: int = MISSING
    val_every_n_steps: int | None = MISSING
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
    data: Any = MISSING  # name, root, download: each ??? takes the checkpoint's; data=<name> sets a data set's keys
    encoder: Any = None  # set only by data=nmnist's defaults (encoder=events); the checkpoint's encoder is the one run
    device: str = MISSING
    compile: bool = MISSING
    batch_size: int = MISSING
    limit_batches: int | None = MISSING
    tensorboard: bool = MISSING
    raster_samples: int = MISSING


@dataclass
class ExportConfig:
    checkpoint: str = MISSING
    out: str | None = MISSING
    input_shape: list[int] = MISSING


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


def hydra_run_dir(resume: str | None, new_dir: str) -> str:
    """``hydra.run.dir``: a resumed run continues in its own folder (``<run>/checkpoints/<file>`` or ``<run>``)."""
    path = Path(resume) if resume is not None else None
    if path is not None and path.is_file() and path.parent.name == "checkpoints":
        path = path.parent.parent
    return str(path) if path is not None and path.is_dir() else new_dir


def run_started(pattern: str) -> str:
    """``${snn_train_now:pattern}`` in ``hydra.run.dir``: Hydra's ``now``, but rank 0's clock, so all ranks share one
    run folder."""
    from snn_train import distributed  # imported only when a run folder is named: it imports torch

    return distributed.from_rank_0(datetime.now()).strftime(pattern)


def register() -> None:
    """Put the schemas where configs/config.yaml, eval.yaml, export.yaml, configs/encoder/*.yaml and
    configs/data/nmnist.yaml find them, and the resolvers configs/config.yaml uses; calling it again changes nothing."""
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    cs.store(name="eval_schema", node=EvalConfig)
    cs.store(name="export_schema", node=ExportConfig)
    cs.store(group="schema/encoder", name="direct", node=DirectEncoderConfig)
    cs.store(group="schema/encoder", name="latency", node=LatencyEncoderConfig)
    cs.store(group="schema/encoder", name="poisson", node=PoissonEncoderConfig)
    cs.store(group="schema/encoder", name="constant_current", node=ConstantCurrentEncoderConfig)
    cs.store(group="schema/encoder", name="events", node=EventsEncoderConfig)
    cs.store(group="schema/data", name="events", node=EventDataConfig)
    OmegaConf.register_new_resolver("snn_train_run_dir", hydra_run_dir, replace=True)
    OmegaConf.register_new_resolver("snn_train_now", run_started, use_cache=True, replace=True)
